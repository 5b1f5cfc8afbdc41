"""
What the fused refinement ops of both kernel backends share: `torch.ops.refiner_hf` (C++, `cpu_kernels`) and
`torch.ops.refiner_hf_triton` (Triton, `triton_refinement`) take the same arguments, so their shape-only fake
implementations (which `torch.compile` traces with) and the training op's autograd formula are defined once, here.

- `refine_eval(x, w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale, padding)`;
- `refine_train(x, <the 11 parameters of `memory_lean_training.RefinementParameters`>, eps, scale, padding)` returns
  the output and four (2, channels) float32 tensors of batch mean and biased variance (expansion, depthwise,
  projection, adapt BatchNorm; the expansion's has 0 channels when there is none);
- `refine_train_backward(grad_out, x, <the 11 parameters>, <the 4 statistics>, eps, scale, padding)` returns the
  gradients of x and of the 11 parameters (empty for the missing expansion).
"""

import torch


def fake_refine_eval(x, w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale, padding):
    return x.new_empty(x.shape)


def fake_refine_train(x, w_expand, bn1_weight, bn1_bias, w_depthwise, *rest):
    channels, heads = w_depthwise.shape[0], x.shape[1]
    shapes = [(2, channels if w_expand is not None else 0), (2, channels), (2, heads), (2, heads)]
    return (x.new_empty(x.shape), *(x.new_empty(shape, dtype=torch.float32) for shape in shapes))


def fake_refine_train_backward(grad_out, x, *params_stats_and_constants):
    def like(t: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((0,) if t is None else t.shape, dtype=torch.float32)

    return [x.new_empty(x.shape), *(like(t) for t in params_stats_and_constants[:11])]


def register_refine_train_autograd(namespace: str) -> None:
    """Registers the backward of `namespace::refine_train`: its `refine_train_backward` op, from the saved input,
    parameters and batch statistics (nothing else is kept)."""

    def setup_context(ctx, inputs, output) -> None:
        x, *params, eps, scale, padding = inputs
        ctx.save_for_backward(x, *params, *output[1:])
        ctx.eps, ctx.scale, ctx.padding = eps, scale, padding
        ctx.has_expansion = params[0] is not None
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_out, *unused_statistics_grads):
        x, *saved = ctx.saved_tensors
        params, stats = saved[:11], saved[11:]
        backward_op = getattr(torch.ops, namespace).refine_train_backward
        grads = backward_op(grad_out, x, *params, *stats, ctx.eps, ctx.scale, ctx.padding)
        grads = [
            None if p is None or (grad.numel() == 0 and p.numel() != 0) else grad.to(p.dtype)
            for grad, p in zip(grads, (x, *params))
        ]
        if not ctx.has_expansion:
            grads[1:4] = [None, None, None]
        return (*grads, None, None, None)

    torch.library.register_autograd(f"{namespace}::refine_train", backward, setup_context=setup_context)
