"""The language-model head and the cross-entropy in one pass: the CPU's training loss.

Used by transformer.py: GPT.forward calls fused_head_and_loss when the trainer has set
GPT.fused_loss (on a CPU, without torch.compile); the model reads the same without it. On CUDA, and
under torch.compile, the fused kernels of F.cross_entropy are faster, so the trainer leaves it off.
tests/test_transformer.py checks values and gradients against F.linear plus F.cross_entropy.
"""

import torch


def fused_head_and_loss(x, weight, targets, vocab_size, z_loss=0.0):
    """(logits (B, T, V), mean cross-entropy plus z_loss * log(Z)^2) of the final hidden states
    x (B, T, C), equal to the plain head and loss of GPT.forward. In the dtype that autocast would
    pick for the head's matrix product (bf16 in mixed precision). The gradient work is done only
    when a gradient will be asked for: evaluation under torch.no_grad pays for the forward products
    alone."""
    B, T, C = x.size()
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, weight = x.reshape(B * T, C).to(dtype), weight.to(dtype)  # (N, C), (V, C)
    # Inside a Function's forward, grad mode is always off and needs_input_grad ignores torch.no_grad,
    # so whether a gradient will be wanted is decided here, by the caller's grad mode.
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    logits, loss = LinearCrossEntropy.apply(x, weight, targets.reshape(-1), vocab_size, z_loss, wants_grad)
    return logits.view(B, T, -1), loss


class LinearCrossEntropy(torch.autograd.Function):
    """The language-model head and the mean cross-entropy in one pass: the CPU training loss.

    Returns (logits, loss), the same as logits = x @ weight.T and F.cross_entropy(logits, targets),
    plus z_loss times the mean squared log-normaliser when z_loss > 0 (tests check both and their
    gradients). Why it exists: with GPT-2's vocabulary the logits of one batch take hundreds of
    megabytes, far more than a CPU's caches, and reading them back for the loss and again for its
    gradient is bound by memory bandwidth. Here the logits are made ROWS rows at a time (a chunk),
    and each group of rows whose float32 logits fill about SOFTMAX_BYTES is turned into its loss and
    the loss's gradient while it is still in cache. That gradient is computed in the forward pass (it
    needs the same softmax) and only scaled in the backward pass. Gradients that reach the returned logits (when something
    besides the loss uses them) are handled too.

    Only the first vocab_size rows of weight are tokens: their logits beyond are -inf, so the padding
    rows get zero probability and no gradient from the loss. Targets of -1 are ignored.
    """

    ROWS = 512  # rows per matrix product: enough for the products to run at full speed
    # Rows of float32 logits worked on at once: about 4 MB, within the caches (64 rows of 16,384 ids, 20
    # of GPT-2's 50,304). Fewer, larger groups spend less on dispatching the operations of each: the
    # quickstart's head and loss 6% faster than with 16 rows (2 cores of a Zen 4).
    SOFTMAX_BYTES = 4 << 20

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, z_loss, wants_grad):
        ctx.set_materialize_grads(False)  # an unused output gets None in backward, not zeros
        ctx.vocab_size = vocab_size
        N, chunk_rows = x.size(0), LinearCrossEntropy.ROWS
        softmax_rows = max(1, LinearCrossEntropy.SOFTMAX_BYTES // (4 * weight.size(0)))
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        count = valid.sum()
        # d loss / d logits = (softmax(logits) * (1 + 2 z_loss log Z) - one_hot(target)) / count, for
        # valid rows only: the z-loss z_loss * (log Z)^2 has the gradient 2 z_loss log Z * softmax.
        row_scale = valid.float() / count  # (N,)
        logits = torch.empty(N, weight.size(0), dtype=x.dtype, device=x.device)  # (N, V)
        if wants_grad:
            grad_logits = torch.empty_like(logits)  # of the loss
            grad_x = torch.empty_like(x)  # (N, C)
        losses = torch.empty(N, dtype=torch.float32, device=x.device)
        # Each group's softmax is float32: made straight into the gradient's rows when those are float32,
        # else (bf16, or no gradient wanted) into a scratch group of rows.
        probs = grad_logits if wants_grad and x.dtype == torch.float32 else None
        scratch = None if probs is not None else torch.empty(softmax_rows, weight.size(0), device=x.device)
        for start in range(0, N, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            torch.mm(x[chunk], weight.t(), out=logits[chunk])
            logits[chunk, vocab_size:] = float("-inf")
            for offset in range(start, min(start + chunk_rows, N), softmax_rows):
                rows = slice(offset, offset + softmax_rows)
                group, group_targets = logits[rows], safe_targets[rows]
                p = probs[rows] if probs is not None else scratch[: group.size(0)]
                # PyTorch's softmax takes max, exp and sum in one kernel, where separate operations each
                # pass over the rows (and bf16 logits are widened inside it, not copied first): in float32
                # the groups' work in two thirds of the time (docs/benchmarks.md).
                torch.softmax(group, dim=1, dtype=torch.float32, out=p)
                row_ids = torch.arange(p.size(0), device=x.device)
                target_logits = group[row_ids, group_targets].float()
                target_probs = p[row_ids, group_targets]
                log_z = target_logits - target_probs.log()  # log Z, as log p(target) = logit - log Z
                # A probability near float32's smallest (about 1e-38) or below it, rounded to zero, has
                # no usable log: such rows take the log-sum-exp the long way.
                underflow = target_probs < 1e-30
                if underflow.any():
                    log_z[underflow] = torch.logsumexp(group[underflow].float(), dim=1)
                losses[rows] = log_z - target_logits + z_loss * log_z.square()
                if wants_grad:
                    scale = row_scale[rows] * (1 + 2 * z_loss * log_z)
                    p.mul_(scale[:, None])
                    p[row_ids, group_targets] -= row_scale[rows]  # in float32, then rounded once
                    if probs is None:
                        grad_logits[rows] = p
            if wants_grad:
                torch.mm(grad_logits[chunk], weight, out=grad_x[chunk])
        if wants_grad:
            # d loss / dx and d loss / d weight, then what a gradient of the logits needs
            ctx.save_for_backward(grad_x, grad_logits.t() @ x, x, weight)
        return logits, (losses * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_of_logits, grad_of_loss):
        loss_grad_x, loss_grad_weight, x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if grad_of_loss is not None:
            scale = grad_of_loss.to(x.dtype)
            grad_x, grad_weight = loss_grad_x * scale, loss_grad_weight * scale
        if grad_of_logits is not None:  # the plain backward of logits = x @ weight.T
            grad_of_logits = grad_of_logits.to(x.dtype, copy=True)
            grad_of_logits[:, ctx.vocab_size :] = 0  # the padding logits are constants (-inf)
            from_logits_x, from_logits_weight = grad_of_logits @ weight, grad_of_logits.t() @ x
            grad_x = from_logits_x if grad_x is None else grad_x + from_logits_x
            grad_weight = from_logits_weight if grad_weight is None else grad_weight + from_logits_weight
        return grad_x, grad_weight, None, None, None, None
