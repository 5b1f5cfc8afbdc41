"""
The Triton kernels through Triton's GPU compiler and ptxas for an H100/H200 (sm_90), without a GPU: the interpreter
tests (`test_triton_kernels.py`) run the kernels' Python, not the compiler, which rejects things the interpreter
accepts (products of unsupported shapes, loop-carried values changing type, ...). The kernels are compiled with the
exact arguments the ops launch them with: the launches are recorded (not run) while the ops' host code runs on CPU
tensors shaped like Refiner-ViT-S's (12 heads, expansion 3: 36 channels in 3 chunks), and once more for the other
branches (no expansion, float32; the attention map without a previous one). ptxas also reports register spills.
"""

import importlib
import os

import pytest
import torch

from refiner_hf import triton_attention, triton_refinement


triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with PyTorch's CUDA builds)")


def ptxas_available() -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


class _Recorder:
    """Stands in for a kernel module: `module.kernel[grid](*args, **kwargs)` records the launch instead of running."""

    def __init__(self, name: str, launches: list) -> None:
        self.module = importlib.import_module(f"refiner_hf.{name}")
        self.launches = launches

    def __getattr__(self, name: str):
        fn = getattr(self.module, name)
        launches = self.launches

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((fn, args, kwargs))

        return Launcher()


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return {torch.float32: "*fp32", torch.bfloat16: "*bf16"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"Unexpected kernel argument {value!r}")


def _record(monkeypatch) -> list:
    launches: list = []
    for module in (triton_refinement, triton_attention):
        monkeypatch.setattr(module, "kernel_module", lambda name: _Recorder(name, launches))
    generator = torch.Generator().manual_seed(0)
    for dtype, expansion in ((torch.bfloat16, 3), (torch.float32, 1)):
        heads, channels, kernel = 12, 12 * expansion, 3
        x = torch.rand(2, heads, 33, 33, generator=generator).to(dtype)  # the GPU's 2 x 32 tiles
        expand = torch.randn(channels, heads) if expansion > 1 else None
        bn1 = (torch.ones(channels), torch.zeros(channels)) if expansion > 1 else (None, None)
        params = (expand, *bn1, torch.randn(channels, kernel, kernel), torch.ones(channels), torch.zeros(channels),
                  torch.randn(heads, channels), torch.ones(heads), torch.zeros(heads), torch.ones(heads),
                  torch.zeros(heads))  # fmt: skip
        eps = [1e-5] * 4
        triton_refinement._refine_eval(x, expand, bn1[1], *params[3:5], *params[6:8], torch.ones(heads), 1)
        _, *stats = triton_refinement._refine_train(x, *params, eps, 0.3, 1)
        stats = [torch.rand(2, s.shape[1]) + 0.5 for s in stats]  # plausible statistics (the passes did not run)
        triton_refinement._refine_train_backward(torch.randn(x.shape).to(dtype), x, *params, *stats, eps, 0.3, 1)
    for dtype, previous in ((torch.bfloat16, True), (torch.float32, False)):
        qkv = torch.randn(2, 197, 3 * 384).to(dtype)
        prev = torch.rand(2, 12, 197, 197) if previous else None
        triton_attention._attention_probs(qkv, prev, 12, 0.17, torch.float32)
        triton_attention._softmax_backward(torch.rand(2, 12, 197, 197), torch.rand(2, 12, 197, 197), prev, 0.17, dtype)
    return launches


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90(monkeypatch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = _record(monkeypatch)
    compiled = set()
    for fn, args, kwargs in launches:
        constants = {name: value for name, value in kwargs.items() if name != "num_warps"}
        signature = {name: _type(value) for name, value in zip(fn.arg_names, args)}
        signature.update({name: "constexpr" for name in constants})
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constants.items())))
        if key in compiled:
            continue
        compiled.add(key)
        source = ASTSource(fn, signature, constexprs=constants)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kwargs["num_warps"]})
        assert kernel.asm["cubin"], fn.__name__
    names = {key[0] for key in compiled}
    assert names == {
        "refine_folded_kernel", "channel_stats_kernel", "head_stats_kernel", "backward_sums_kernel",
        "backward_project_kernel", "backward_depthwise_kernel", "backward_expand_kernel", "attention_probs_kernel",
        "softmax_backward_kernel",
    }  # fmt: skip
    assert len(compiled) == 18  # 8 + 6 refinement variants, 4 attention ones
