"""
When Refiner-ViT's Triton kernels run, and how they are loaded.

The kernels (`triton_refinement_kernels`, `triton_attention_kernels`) run on CUDA tensors when Triton can be
imported; everywhere else the callers keep their other implementations (the C++ CPU kernels or PyTorch). Nothing
here imports Triton at import time, so CPU-only installations without it are unaffected.

Testing without a GPU: inside `interpreted()`, Triton's CPU interpreter (`TRITON_INTERPRET=1`) runs the same kernels
on CPU tensors, slowly; the rest of the process keeps compiling kernels as usual.

Set `REFINER_HF_DISABLE_TRITON=1`, or call `set_triton_enabled(False)`, to never use them (e.g. to measure the PyTorch
implementations on a GPU).
"""

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch


logger = logging.getLogger(__name__)

DISABLE_ENV_VAR = "REFINER_HF_DISABLE_TRITON"
INTERPRET_ENV_VAR = "TRITON_INTERPRET"

_lock = threading.Lock()
_state: dict[str, object] = {"enabled": True, "available": None, "on_cpu": False}
_modules: dict[tuple[str, bool], ModuleType] = {}


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # ImportError, or a broken installation
        logger.info(
            "Triton is not usable (%s: %s); the Refiner-ViT Triton kernels are off.", type(error).__name__, error
        )
        return False
    return True


def triton_available() -> bool:
    """Whether Triton can be imported (checked once per process)."""
    if _state["available"] is None:
        with _lock:
            if _state["available"] is None:
                _state["available"] = _import_triton()
    return bool(_state["available"])


def triton_enabled() -> bool:
    """Whether the Triton kernels may be used at all: enabled, not disabled by the environment, Triton importable."""
    if not _state["enabled"] or os.environ.get(DISABLE_ENV_VAR, "0") not in ("", "0"):
        return False
    return triton_available()


def set_triton_enabled(enabled: bool) -> bool:
    """Switches the Triton kernels on or off for this process; returns the previous setting."""
    previous = bool(_state["enabled"])
    _state["enabled"] = enabled
    return previous


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (`TRITON_INTERPRET=1`)."""
    return os.environ.get(INTERPRET_ENV_VAR, "0") not in ("", "0")


def runs_on(tensor: torch.Tensor) -> bool:
    """
    Whether the Triton kernels take this tensor: a float32 or bfloat16 CUDA tensor (or, inside `interpreted()`, a CPU
    tensor), with the kernels enabled.
    """
    if tensor.dtype not in (torch.float32, torch.bfloat16) or not triton_enabled():
        return False
    if tensor.device.type == "cuda":
        return not interpreting()
    return tensor.device.type == "cpu" and bool(_state["on_cpu"]) and interpreting()


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """
    Runs the Triton kernels on CPU tensors through Triton's interpreter inside the block (for testing them without a
    GPU): CPU tensors then take the Triton paths wherever a CUDA tensor would.
    """
    if not triton_available():
        raise RuntimeError("Triton is not installed: its interpreter cannot run the Refiner-ViT kernels.")
    previous_env, previous_on_cpu = os.environ.get(INTERPRET_ENV_VAR), _state["on_cpu"]
    os.environ[INTERPRET_ENV_VAR] = "1"
    _state["on_cpu"] = True
    try:
        yield
    finally:
        _state["on_cpu"] = previous_on_cpu
        if previous_env is None:
            os.environ.pop(INTERPRET_ENV_VAR, None)
        else:
            os.environ[INTERPRET_ENV_VAR] = previous_env


def kernel_module(name: str) -> ModuleType:
    """
    The kernel module `refiner_hf.<name>`: imported as usual (kernels compiled for the GPU), or, under the interpreter,
    a separate copy of it whose kernels Triton decorated in interpreter mode (Triton chooses when it decorates).
    """
    interpret = interpreting()
    key = (name, interpret)
    if key not in _modules:
        with _lock:
            if key not in _modules:
                qualified = f"{__package__}.{name}"
                if not interpret:
                    _modules[key] = importlib.import_module(qualified)
                else:
                    spec = importlib.util.find_spec(qualified)
                    if spec is None or spec.loader is None:
                        raise ImportError(f"No module named {qualified!r}")
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
                    _modules[key] = module
    return _modules[key]


def has_kernel_module(name: str) -> bool:
    """Whether the kernel source is there (a model directory's copy of this code has none)."""
    try:
        return importlib.util.find_spec(f"{__package__}.{name}") is not None
    except (ImportError, ValueError):
        return False


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; elsewhere a small number (the interpreter runs programs in turn)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class OpRegistration:
    """
    Registers a module's Triton custom ops (`define`) once per process, unless they exist already (another copy of
    the module, such as a model directory's remote code, registered them); never while compiling, and not where the
    kernel module cannot be loaded.
    """

    def __init__(self, namespace: str, op_names: tuple[str, ...], kernels: str, define: Callable[[], None]) -> None:
        self.namespace, self.op_names, self.kernels, self.define = namespace, op_names, kernels, define
        self._lock = threading.Lock()
        self._done = False

    def ensure(self) -> bool:
        """Whether the ops are registered (registering them now if needed)."""
        if self._done:
            return True
        if torch.compiler.is_compiling() or not has_kernel_module(self.kernels):
            return False
        with self._lock:
            if not self._done:
                if not all(hasattr(getattr(torch.ops, self.namespace), name) for name in self.op_names):
                    self.define()
                self._done = True
        return True
