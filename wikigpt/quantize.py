"""Weight-only int8 for decoding: each linear layer's weight stored as int8 with one scale per output
row, multiplied by PyTorch's own int8 kernel (torch.ops.aten._weight_int8pack_mm).

Used by infer.py (--quantize int8). Decoding one token at batch 1 reads every weight once and does
little arithmetic on each, so its speed is set by the bytes of weights read per token: int8 halves
bf16's and quarters float32's. Activations, the token embedding (a lookup), the norms and the key/value
cache keep the model's dtype; each weight row w becomes round(w / s) with s = max|w| / 127, so the
largest entry of every row is exact and the others are off by at most s / 2. docs/benchmarks.md
gives the speed and the agreement with bf16 on real text; tests/test_infer.py checks the math.
"""

import torch
import torch.nn as nn

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
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child, dtype).to(device))
    return model
