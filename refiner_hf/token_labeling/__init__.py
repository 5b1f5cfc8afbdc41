"""Token labeling: relabel stores of a teacher's dense predictions and the per-token soft labels made from them."""

from .dense_labels import (
    CropLabels,
    crop_soft_labels,
    scatter_top_k,
)
from .store import (
    PackedRelabelStore,
    PackedRelabelWriter,
    PerFileRelabelStore,
    RelabelError,
    RelabelMap,
    check_relabel_coverage,
    finalize_packed_store,
    open_relabel_store,
    pack_relabel_store,
    read_relabel_file,
    relabel_key,
    validate_relabel_tensor,
)


__all__ = [
    "CropLabels",
    "PackedRelabelStore",
    "PackedRelabelWriter",
    "PerFileRelabelStore",
    "RelabelError",
    "RelabelMap",
    "check_relabel_coverage",
    "crop_soft_labels",
    "finalize_packed_store",
    "open_relabel_store",
    "pack_relabel_store",
    "read_relabel_file",
    "relabel_key",
    "scatter_top_k",
    "validate_relabel_tensor",
]
