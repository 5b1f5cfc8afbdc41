"""
Fused C++ kernels of Refiner-ViT (`csrc/`), built the first time they are needed and registered as
`torch.ops.refiner_hf.*` custom ops, with fake implementations (so that `torch.compile` can trace through them) and
an autograd formula for the training op:

- `refine_eval`, `refine_train`, `refine_train_backward`: the attention-map refinement (`csrc/refinement.cpp`);
- `attention_probs`, `attention_context`: the explicit attention of the inference fast path (`csrc/attention.cpp`).

Building needs a C++ compiler with OpenMP, `ninja` and the source files, and takes about a minute; the compiled
library is cached by `torch.utils.cpp_extension` (under `$TORCH_EXTENSIONS_DIR`, by default
`~/.cache/torch_extensions`), keyed by the sources, the PyTorch version and the instruction set. Whenever the
kernels cannot be built or loaded (no compiler, no source files as in a model directory's copy of this code, a
compiler without GCC vector extensions), `kernels_available()` is `False` and callers use their PyTorch
implementations. Set `REFINER_HF_DISABLE_CPU_KERNELS=1` to never build or use them.
"""

import hashlib
import logging
import os
import threading
import warnings
from inspect import signature
from pathlib import Path

import torch

from .refinement_ops import (
    fake_refine_eval,
    fake_refine_train,
    fake_refine_train_backward,
    register_refine_train_autograd,
)


logger = logging.getLogger(__name__)

DISABLE_ENV_VAR = "REFINER_HF_DISABLE_CPU_KERNELS"
_SOURCE_DIR = Path(__file__).parent / "csrc"
_SOURCES = ("refinement.cpp", "attention.cpp")
_HEADERS = ("vector.h",)
_OPS = ("refine_eval", "refine_train", "refine_train_backward", "attention_probs", "attention_context")

_lock = threading.Lock()
_state: dict[str, bool | None] = {"available": None, "enabled": True}


def _isa_flags() -> tuple[str, list[str]]:
    """Instruction-set flags for the CPU PyTorch dispatches to; part of the cache key, since the code is specific."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return capability, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX2":
        return capability, ["-mavx2", "-mfma", "-mf16c"]
    return capability, []


def _ops_registered() -> bool:
    return all(hasattr(torch.ops.refiner_hf, name) for name in _OPS)


def _build() -> bool:
    if _ops_registered():  # already loaded in this process (e.g. by another copy of this module)
        return _register_python_parts()
    files = [_SOURCE_DIR / name for name in _SOURCES + _HEADERS]
    if not all(path.is_file() for path in files):
        logger.info("No kernel sources in %s; using the PyTorch implementations.", _SOURCE_DIR)
        return False
    try:
        from torch.utils import cpp_extension

        capability, isa = _isa_flags()
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in files) + torch.__version__.encode())
        name = f"refiner_hf_kernels_{capability.lower().replace(' ', '_')}_{digest.hexdigest()[:12]}"
        if not _is_cached(cpp_extension, name):
            # A visible note: the first model run on a machine would otherwise pause for a minute unexplained.
            logger.warning(
                "Building the fused Refiner-ViT CPU kernels (about a minute, once per machine and PyTorch version; "
                "%s=1 skips them and runs the same computation in PyTorch).",
                DISABLE_ENV_VAR,
            )
        cpp_extension.load(
            name=name,
            sources=[str(_SOURCE_DIR / name) for name in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", *isa],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # any build or load failure: fall back to PyTorch
        warnings.warn(
            f"Could not build the fused Refiner-ViT kernels ({type(error).__name__}: {error}); "
            "using the (slower) PyTorch implementations.",
            stacklevel=3,
        )
        return False
    return _ops_registered() and _register_python_parts()


def _is_cached(cpp_extension, name: str) -> bool:
    """Whether `torch.utils.cpp_extension` has this library built already (False when that cannot be told)."""
    try:
        return (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:
        return False


def kernels_available() -> bool:
    """
    Whether the fused CPU ops can be used. The first call (outside `torch.compile` tracing) builds or loads them; under
    tracing the answer is whatever an earlier eager call found, so that compiling never starts a build.
    """
    if not _state["enabled"] or os.environ.get(DISABLE_ENV_VAR, "0") not in ("", "0"):
        return False
    if _state["available"] is None:
        if torch.compiler.is_compiling():
            return False
        with _lock:
            if _state["available"] is None:
                _state["available"] = _build()
    return bool(_state["available"])


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels can take `x`: a float32 or bfloat16 CPU tensor, with the kernels built."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and kernels_available()


def set_kernels_enabled(enabled: bool) -> bool:
    """Switches the fused CPU ops on or off for this process (e.g. to compare with the PyTorch path); returns the
    previous setting."""
    previous = bool(_state["enabled"])
    _state["enabled"] = enabled
    return previous


# ---------------------------------------------------------------------------------------------------------------------
# Fake (shape) implementations of the attention ops (the refinement ops' are in `refinement_ops`).


def _fake_attention_probs(qkv, previous, heads, scale, alpha):
    batch, tokens, _ = qkv.shape
    return qkv.new_empty((batch, heads, tokens, tokens))


def _fake_attention_context(probs, values, value_offset):
    batch, heads, tokens, _ = probs.shape
    return probs.new_empty((batch, tokens, values.shape[-1] - value_offset))


def _register_python_parts() -> bool:
    """Fake implementations and the autograd formula; False (kernels unused) if this PyTorch cannot register them."""
    fakes = {
        "refine_eval": fake_refine_eval,
        "refine_train": fake_refine_train,
        "refine_train_backward": fake_refine_train_backward,
        "attention_probs": _fake_attention_probs,
        "attention_context": _fake_attention_context,
    }
    # Overriding keeps a second copy of this module (a model directory's remote code) from failing.
    override = {"allow_override": True} if "allow_override" in signature(torch.library.register_fake).parameters else {}
    try:
        for name, fake in fakes.items():
            torch.library.register_fake(f"refiner_hf::{name}", fake, **override)
        register_refine_train_autograd("refiner_hf")
    except Exception as error:
        warnings.warn(
            f"Could not register the fused Refiner-ViT kernels ({type(error).__name__}: {error}); "
            "using the PyTorch implementations.",
            stacklevel=4,
        )
        return False
    return True
