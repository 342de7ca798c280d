"""Muon for the blocks' matrices, with its Newton-Schulz iteration in the dtype of the run's matrix products.

Used by gpt_train.py (make_optimizers). torch.optim.Muon orthogonalises each update in bf16, always.
Where bf16 is native (CUDA, CPUs with AVX512-BF16 or AMX) that is the fast choice, and this class
computes what torch's does, bit for bit, the matrices of one shape in batched products. A CPU
without bf16 instructions emulates it: on an AMD EPYC with AVX2 only, bf16 products ran at 0.9
GFLOP/s against 130 in float32, and torch's Muon took half of the quickstart's step
(docs/benchmarks.md). There the run trains in float32 and so does the iteration here. The state (one
momentum buffer per matrix) and the settings are torch's, so checkpoints hold the same names either way.
"""

import math

import torch


class Muon(torch.optim.Muon):
    """torch.optim.Muon with `ns_dtype`, the dtype of the Newton-Schulz products (torch's: bfloat16)."""

    def __init__(self, params, *, ns_dtype=torch.bfloat16, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every matrix with a gradient, as torch.optim.Muon makes it (closure unused).
        Matrices of one shape are orthogonalised together, in batched products: each layer's own
        arithmetic (bit for bit in tests/test_train.py and at every preset's shapes on a Zen 4) in a
        quarter of the calls for four layers, which small matrices are bound by (the quickstart's
        Muon: 24 -> 14 ms a step on 2 cores)."""
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            same_shape = {}  # (shape, dtype) -> indices; a sharded (DTensor) matrix is orthogonalised alone
            for i, param in enumerate(params):
                key = (param.shape, param.dtype) if type(param.grad) is torch.Tensor else i
                same_shape.setdefault(key, []).append(i)
            updates = [self.momentum_update(param, group["nesterov"], momentum) for param in params]
            for indices in same_shape.values():
                stacked = torch.stack([updates[i] for i in indices]) if len(indices) > 1 else updates[indices[0]]
                orthogonal = orthogonalise(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                           self.ns_dtype)
                for i, update in zip(indices, orthogonal if len(indices) > 1 else [orthogonal]):
                    param = params[i]
                    param.mul_(1 - lr * decay)
                    param.add_(update, alpha=-lr * lr_scale(group["adjust_lr_fn"], *param.shape[:2]))

    def momentum_update(self, param, nesterov, momentum):
        """The matrix that Muon orthogonalises: the gradient's momentum (Nesterov's look-ahead by default)."""
        grad, state = param.grad, self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)
        return grad.lerp(buffer, momentum) if nesterov else buffer


def lr_scale(adjust_lr_fn, rows, columns):
    """torch's factor on the rate of a rows x columns matrix: "match_rms_adamw" gives the update the
    RMS of a typical AdamW update, 0.2 sqrt(max(rows, columns)); "original" Muon's sqrt(max(1, rows / columns))."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns)) if adjust_lr_fn in (None, "original") else 1.0


def orthogonalise(matrix, coefficients, steps, eps, dtype):
    """The Newton-Schulz iteration of Muon (Jordan et al., 2024): a quintic polynomial of the matrix,
    `steps` times, that drives its singular values towards 1 (to about 0.7-1.2), so that the update
    moves every direction alike. Worked on the wide orientation, whose Gram matrix is smaller. A (k, r, c)
    stack is k matrices at once, each normalised by its own norm."""
    a, b, c = coefficients
    x = matrix.to(dtype, copy=True)  # a copy: without Nesterov momentum `matrix` is the momentum itself
    tall = matrix.size(-2) > matrix.size(-1)
    if tall:
        x = x.mT
    one = x.dim() == 2  # one matrix (a sharded one too), else a stack
    norm = x.norm() if one else x.norm(dim=(1, 2), keepdim=True)
    x.div_(norm.clamp(min=eps))  # spectral norm at most 1, where the iteration converges
    multiply_add = torch.addmm if one else torch.baddbmm  # beta * first + alpha * second @ third
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.mT if tall else x
