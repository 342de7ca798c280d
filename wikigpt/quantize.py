"""Decoding's linear layers on a CPU: float16 weights multiplied by fbgemm's half-precision kernel
(infer.py's default there), float32 matrix-vector products spread over every core, and weight-only int8,
each weight row stored as int8 with one scale and multiplied by PyTorch's own int8 kernel
(torch.ops.aten._weight_int8pack_mm).

Used by infer.py (load_model, and --quantize int8). Decoding one token at batch 1 reads every weight
once and does little arithmetic on each, so its speed is set by the bytes of weights read per token
and by how fast the kernel reads them. PyTorch's float32 product of one vector with a matrix runs on
one core, at about half of what two cores read (docs/benchmarks.md); the same rows cut into one slice
per core and multiplied in one batched call (torch.bmm, which gives each slice a core) read about twice
as fast, the same sums in another order. fbgemm's float16 kernel (PyTorch's quantized::linear_dynamic_fp16,
x86 only) reads half of float32's bytes at the memory's own rate on every core and sums in float32, so
with float16 weights the activations, norms and cache stay float32; PyTorch's bf16 kernel reads at half
that rate. int8 halves float16's bytes, but its kernel is bound by its arithmetic. With int8,
activations, the token embedding (a lookup), the norms and the key/value cache keep the model's
dtype; each weight row w becomes round(w / s) with s = max|w| / 127, so the largest entry of every row
is exact and the others are off by at most s / 2. docs/benchmarks.md gives the speeds and the
agreement with bf16 on real text; tests/test_infer.py checks the math.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wikigpt.cli import UsageError


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 (out, in) with a scale per output row, in the activations' dtype."""

    def __init__(self, linear, dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the row's largest entry maps to 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1)).contiguous()  # the kernel takes (rows, in)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def check_int8_kernel(device, dtype):
    """Refuses --quantize int8 where PyTorch has no int8 weight-only kernel for this device and dtype."""
    try:
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, device=device, dtype=dtype),
                                           torch.ones(8, 32, device=device, dtype=torch.int8),
                                           torch.ones(8, device=device, dtype=dtype))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        raise UsageError(f"--quantize int8: this PyTorch ({torch.__version__}) has no int8 weight-only kernel for "
                         f"{device.type} in {str(dtype)[6:]} ({type(e).__name__}); decode without --quantize") from e


def quantize_int8(model):
    """Replaces, in place, every nn.Linear of the model (the blocks' projections and the head) by an
    Int8Linear in the model's dtype. A tied head gets an int8 copy; the embedding keeps its rows."""
    dtype, device = model.transformer.wte.weight.dtype, model.transformer.wte.weight.device
    check_int8_kernel(device, dtype)
    return replace_linears(model, lambda linear: Int8Linear(linear, dtype).to(device))


def replace_linears(model, replacement):
    """Puts replacement(linear) in place of every nn.Linear of the model, in place; returns the model."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, replacement(child))
    return model


class HalfLinear(nn.Module):
    """An nn.Linear whose weight is stored in float16, packed for fbgemm's kernel, which multiplies float32
    activations by it and sums in float32: the product of the float16-rounded weight, bias added."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        if weight.abs().max() > torch.finfo(torch.float16).max:  # fbgemm would clamp them
            raise UsageError("--dtype float16: this model has weights beyond float16's range (65,504); "
                             "use --dtype float32")
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def half_kernel_error():
    """None where fbgemm's float16 kernel runs on this machine's CPU, else why not (ARM has no fbgemm)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 32), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 32), packed)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no kernel'}"
    return None


def half_linears(model):
    """Replaces, in place, every nn.Linear of a float32 model on a CPU (the blocks' projections and the
    head) by a HalfLinear. A tied head gets a float16 copy; the embedding keeps its float32 rows."""
    error = half_kernel_error()
    if error:
        raise UsageError(f"--dtype float16 on a CPU needs fbgemm's float16 kernel, which this PyTorch "
                         f"({torch.__version__}) lacks here ({error}); use --dtype float32")
    return replace_linears(model, HalfLinear)


def matvec_over_cores(x, weight, parts):
    """x (1, in) times weight.T (in, out) as `parts` slices of the weight's rows in one batched product,
    which PyTorch spreads over the cores: (1, out), equal to F.linear(x, weight) but for summation order."""
    slices = weight.view(parts, weight.size(0) // parts, weight.size(1))  # (parts, out / parts, in)
    column = x.t().expand(parts, -1, -1)  # (parts, in, 1); as x.view(1, -1, 1) bmm ran slower than F.linear
    return torch.bmm(slices, column).view(1, -1)  # (parts, out / parts, 1) -> (1, out)


class MatVecLinear(nn.Module):
    """An nn.Linear (the same weight and bias, shared, not copied) that multiplies a single row, one
    decoded token's, over every core (matvec_over_cores); prompts of several rows take F.linear."""

    def __init__(self, linear, parts):
        super().__init__()
        self.weight, self.bias, self.parts = linear.weight, linear.bias, parts

    def forward(self, x):
        if x.numel() != x.size(-1):  # several rows: a matrix product, which uses every core already
            return F.linear(x, self.weight, self.bias)
        y = matvec_over_cores(x.reshape(1, -1), self.weight, self.parts).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def spread_matvecs(model):
    """For float32 decoding on a CPU: replaces, in place, every nn.Linear whose rows split evenly over
    the cores by a MatVecLinear (a tied head keeps sharing the embedding's weight). Other models are
    returned as they are: bf16's and int8's kernels use every core by themselves."""
    weight = model.transformer.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or torch.get_num_threads() < 2:
        return model

    def spread(linear):
        parts = math.gcd(linear.out_features, torch.get_num_threads())
        return MatVecLinear(linear, parts) if parts > 1 else linear

    return replace_linears(model, spread)
