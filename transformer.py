"""GPT-2, written out by hand so that every step can be read.

The model is the one of "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019):
token plus learned position embeddings, a stack of pre-LayerNorm blocks (causal self-attention, then
a 4x MLP with tanh-GELU, each wrapped in a residual connection), a final LayerNorm and a language-model
head that shares its weight with the token embedding.

The file reads top to bottom as the model is explained:
    GPTConfig and the presets          the sizes
    KVCache, CausalSelfAttention       attention, with the cache that makes decoding one token cheap
    MLP, Block                         the rest of a transformer block
    GPT                                embeddings, blocks, head and loss; generation; parameter counts;
                                       saving and loading in Hugging Face's layout
    LinearCrossEntropy                 the head and the loss in one pass, a CPU training speed-up that
                                       the trainer switches on (GPT.fused_loss); the model reads without it
    sample_next_token, keep_top_k/p    the sampling filters that generation uses
    hf_config_dict, ...                conversion to and from Hugging Face's GPT2Config and weights

Module names follow the original checkpoints (`transformer.h.0.attn.c_attn`, ...), so weights move
to and from Hugging Face's `GPT2LMHeadModel` with one documented change: GPT-2 stores its projection
weights as Conv1D, (in, out), where `nn.Linear` keeps (out, in).

Notation used in shape comments:
    B  batch size            T  sequence length (tokens in this call)
    C  embedding width       nh number of heads        hs head size, C // nh
    V  vocabulary rows (padded_vocab_size)             L  number of layers    N  rows, B * T

Run `python -m pytest tests/test_transformer.py` to check it against Hugging Face's implementation.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import EOT_TOKEN, VOCAB_SIZE, CheckpointError

# ---- Sizes ----


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length in tokens; sets the size of the position table
    vocab_size: int = VOCAB_SIZE  # real tokens; logits beyond them are masked out
    padded_vocab_size: int = 50304  # embedding rows: 50257 rounded up to a multiple of 64 for fast matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width C
    dropout: float = 0.0  # on embeddings, attention weights and residual branches; 0 for pretraining
    attention: str = "sdpa"  # "sdpa" (fused kernel, flash attention on CUDA) or "manual" (explicit softmax)

    def __post_init__(self):
        if min(self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError("block_size, n_layer, n_head and n_embd must all be positive")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be at least vocab_size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("sdpa", "manual"):
            raise ValueError(f"attention must be 'sdpa' or 'manual', got {self.attention!r}")


# Sizes of the four GPT-2 releases, plus small models that train on a laptop CPU.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # trains in seconds; used by the tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # the CPU quickstart (docs/benchmarks.md)
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # a larger CPU or small-GPU model
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_from_preset(name, **overrides):
    """GPTConfig of a named preset; `overrides` that are None keep the preset's value."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(**values)


# ---- Attention, with its key/value cache ----


class KVCache:
    """Keys and values of the tokens seen so far, so that decoding one token costs one token's work.

    One preallocated (L, B, nh, block_size, hs) buffer each for keys and values; `length` counts the
    positions filled. GPT.forward appends to it and advances `length` after the last layer.
    """

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0


def causal_mask(T, past, device):
    """(T, past + T) booleans: query i, at absolute position past + i, may see keys 0 .. past + i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def document_mask(idx):
    """(B, 1, T, T) booleans for a training window of several articles: causal, and a token sees only
    the tokens of its own article (each starts with <|endoftext|>), not the end of the one before."""
    B, T = idx.size()
    article = (idx == EOT_TOKEN).cumsum(dim=1)  # (B, T): which article of the window each token is in
    same_article = article[:, :, None] == article[:, None, :]  # (B, T, T)
    return (same_article & causal_mask(T, 0, idx.device))[:, None]  # (B, 1, T, T), one mask for all heads


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.attention = config.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # queries, keys, values in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads back into the stream
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0, mask=None):
        """mask: None for plain causal attention, or (B, 1, T, T) booleans, True where a query may see
        a key (document_mask); not combined with a cache."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            cache.keys[layer, :, :, past : past + T] = k
            cache.values[layer, :, :, past : past + T] = v
            k = cache.keys[layer, :, :, : past + T]  # (B, nh, past + T, hs)
            v = cache.values[layer, :, :, : past + T]  # (B, nh, past + T, hs)

        if self.attention == "sdpa":
            # Without past keys the mask is the plain causal triangle, which the fused kernels apply
            # themselves; one new query may see every cached key; only a chunk after a cache needs a mask.
            dropout_p = self.dropout if self.training else 0.0
            if mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                mask = causal_mask(T, past, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, past + T)
            allowed = causal_mask(T, past, x.device) if mask is None else mask
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = self.attn_dropout(F.softmax(scores.float(), dim=-1).to(q.dtype))
            y = weights @ v  # (B, nh, T, hs)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, 4C) inside, (B, T, C) out


class Block(nn.Module):
    """Pre-LayerNorm: each branch reads a normalised copy and adds its result to the residual stream."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying: the head scores each token by its embedding (and saves V x C parameters).
        self.lm_head.weight = self.transformer.wte.weight
        # The trainer sets this on a CPU: the head and the loss then run as one pass, equal in value
        # (LinearCrossEntropy, after the model). It changes speed only, never the result.
        self.fused_loss = False
        self.apply(self._init_weights)
        # GPT-2's scaling: each block adds two projections to the residual stream, so their initial
        # std is divided by sqrt(2 L) to keep the stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None, mask_documents=False, z_loss=0.0):
        """Logits (B, T, V) for every position, and the mean cross-entropy when targets are given.

        idx and targets are (B, T) token ids; targets of -1 are ignored. With a KVCache, idx holds only
        the new tokens: they attend to the cached ones and are appended to the cache. mask_documents
        (a training option) keeps attention within each article of the window (document_mask).
        z_loss (a training option) adds z_loss * log(Z)^2 per token, Z the softmax's normaliser: it
        keeps the logits from drifting upwards together, which lets higher learning rates stay stable.
        """
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"{past + T} positions exceed the context of {self.config.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = document_mask(idx) if mask_documents else None
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, mask)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.fused_loss:
            return fused_head_and_loss(x, self.lm_head.weight, targets, self.config.vocab_size, z_loss)
        logits = self.lm_head(x)  # (B, T, V)
        # Padding rows are no tokens: -inf gives them zero probability in the loss and in sampling.
        logits[..., self.config.vocab_size :] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if z_loss:
                log_z = logits.float().logsumexp(dim=-1)[targets >= 0]  # (tokens with a target,)
                loss = loss + z_loss * log_z.square().mean()
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, generator=None,
                 use_cache=True):
        """Yields the next token ids, (B,), one step at a time, continuing the (B, T) prompt `idx`.

        A generator, so callers can print tokens as they come and stop early. With the cache, each step
        runs the model on one token. Position embeddings are absolute, so cached keys cannot be moved
        when the context window is full: the newest half window is then encoded afresh, and each
        later token again costs one token until the window fills up once more. Without the cache, each
        step re-reads the newest block_size tokens, the reference behaviour.
        """
        window = self.config.block_size
        cache = None
        tokens = idx
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(tokens[:, -window:])[0]
            elif cache is None or cache.length == window:
                context = tokens[:, -window:] if cache is None else tokens[:, -(window // 2) :]
                cache = KVCache(self.config, tokens.size(0), tokens.device, self.lm_head.weight.dtype)
                logits = self(context, cache=cache)[0]
            else:
                logits = self(tokens[:, -1:], cache=cache)[0]
            next_token = sample_next_token(
                logits[:, -1, : self.config.vocab_size],
                temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
            )  # (B,)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            yield next_token

    # ---- What training needs to know about the model ----

    def num_params(self, embeddings=True):
        """Parameter count; the tied head is counted once. embeddings=False drops wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 N + 12 L T C (forward plus backward, which costs twice forward).

        N counts every weight used in a matmul: all parameters but the position table (the tied token
        embedding counts, since it is the head's matmul). 6 N is 2 FLOPs per multiply-add times three
        passes; 12 L T C adds the attention scores and weighted sums, which have no weights
        (PaLM, Chowdhery et al. 2022, appendix B).
        """
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * self.config.n_layer * seq_len * self.config.n_embd

    # ---- Hugging Face GPT-2 layout: config.json + model.safetensors ----

    def save_pretrained(self, directory):
        """Writes `config.json`, `model.safetensors` and `generation_config.json` (infer.py's default
        sampling) that `GPT2LMHeadModel.from_pretrained` loads."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {}
        for name, tensor in self.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte; the HF loader ties it again
            if name == "transformer.wte.weight":
                tensor = tensor[: self.config.vocab_size]  # padding rows are not part of GPT-2
            if name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()  # nn.Linear (out, in) -> GPT-2 Conv1D (in, out)
            tensors[name] = tensor.detach().to("cpu").contiguous()
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf_config_dict(self.config), f, indent=2)
        with open(os.path.join(directory, "generation_config.json"), "w") as f:  # what pipeline() samples with
            json.dump({"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "pad_token_id": EOT_TOKEN,
                       "do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path_or_name, **config_overrides):
        """Loads a Hugging Face GPT-2 directory, or a hub name such as 'gpt2' (downloads when online).

        Only JSON and safetensors are read, so nothing in the files can run code. The tensor names and
        shapes in the safetensors header are checked against config.json before anything is read or
        allocated, so a damaged or mismatched checkpoint is refused at once, however large its config
        claims to be. The model is built on the meta device (no memory, no initialisation) and takes
        the loaded tensors as its parameters. The vocabulary is padded to a multiple of 64 rows;
        `config_overrides` (for example dropout) replace config fields.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = resolve_model_dir(path_or_name)
        config = pretrained_config(directory, **config_overrides)
        weights_path = os.path.join(directory, "model.safetensors")
        with torch.device("meta"):
            model = cls(config)
        check_safetensors_header(weights_path, model)
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights_path} is damaged or incomplete ({e}); save or copy it again") from e
        model.load_state_dict(state_dict_from_hf(tensors, model), strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True gave the tied pair two parameters
        return model


# ---- The head and the loss in one pass: a CPU training speed-up ----


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
    gradient is bound by memory bandwidth. Here the logits are made ROWS rows at a time, and each
    group of SOFTMAX_ROWS rows is turned into its loss and the loss's gradient while it is still in
    cache. That gradient is computed in the forward pass (it needs
    the same softmax) and only scaled in the backward pass. Gradients that reach the returned logits
    (when something besides the loss uses them) are handled too. On CUDA, and under torch.compile,
    the fused kernels of F.cross_entropy are faster: the trainer leaves GPT.fused_loss off there.

    Only the first vocab_size rows of weight are tokens: their logits beyond are -inf, so the padding
    rows get zero probability and no gradient from the loss. Targets of -1 are ignored.
    """

    ROWS = 256  # rows per matrix product: enough for the products to run at full speed
    SOFTMAX_ROWS = 16  # 16 x 50304 float32 values is 3 MB, within a core's share of cache

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, z_loss, wants_grad):
        ctx.set_materialize_grads(False)  # an unused output gets None in backward, not zeros
        ctx.vocab_size = vocab_size
        N, block_rows, softmax_rows = x.size(0), LinearCrossEntropy.ROWS, LinearCrossEntropy.SOFTMAX_ROWS
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)
        count = valid.sum()
        # d loss / d logits = (softmax(logits) * (1 + 2 z_loss log Z) - one_hot(target)) / count, for
        # valid rows only: the z-loss z_loss * (log Z)^2 has the gradient 2 z_loss log Z * softmax.
        row_scale = valid.float() / count  # (N,)
        needs_grad = wants_grad
        logits = torch.empty(N, weight.size(0), dtype=x.dtype, device=x.device)  # (N, V)
        if needs_grad:
            grad_logits = torch.empty_like(logits)  # of the loss
            grad_x = torch.empty_like(x)  # (N, C)
        losses = torch.empty(N, dtype=torch.float32, device=x.device)
        for start in range(0, N, block_rows):
            block = slice(start, start + block_rows)
            torch.mm(x[block], weight.t(), out=logits[block])
            logits[block, vocab_size:] = float("-inf")
            for offset in range(start, min(start + block_rows, N), softmax_rows):
                rows = slice(offset, offset + softmax_rows)
                z = logits[rows].to(torch.float32, copy=True)  # (SOFTMAX_ROWS, V), worked on in place
                row_ids = torch.arange(z.size(0), device=x.device)
                target_logits = z[row_ids, safe_targets[rows]]
                row_max = z.amax(dim=1, keepdim=True)
                z.sub_(row_max).exp_()  # exp(z - max), so that nothing overflows
                row_sum = z.sum(dim=1, keepdim=True)
                log_z = row_max + row_sum.log()  # (SOFTMAX_ROWS, 1), the log-sum-exp
                losses[rows] = log_z.squeeze(1) - target_logits + z_loss * log_z.squeeze(1).square()
                if needs_grad:
                    z.mul_(row_scale[rows, None] * (1 + 2 * z_loss * log_z) / row_sum)  # softmax, scaled
                    z[row_ids, safe_targets[rows]] -= row_scale[rows]
                    grad_logits[rows] = z
            if needs_grad:
                torch.mm(grad_logits[block], weight, out=grad_x[block])
        if needs_grad:
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


# ---- Sampling: what generate draws the next token with ----


# How infer.py, the trainer's samples and a checkpoint's generation_config.json sample by default: a
# little below temperature 1 and among the 200 likeliest tokens, which keeps a small model on topic.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 200


def check_sampling(temperature, top_k, top_p):
    """Refuses sampling settings that have no meaning, with a ValueError naming the setting."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draws one token id per row of (B, V) logits. temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def keep_top_k(logits, k):
    """Sets all but the k largest logits of each row to -inf (ties with the k-th are kept)."""
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(logits, p):
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p  # the top token has mass_before 0, so it always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


# ---- Hugging Face GPT-2 layout: config.json + model.safetensors ----

# nn.Linear weights that GPT-2 checkpoints store transposed, as Conv1D (in, out).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config_dict(config):
    """config.json in the GPT2Config schema; our own fields ride along under their own names."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # Hugging Face's name for the tanh approximation
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "padded_vocab_size": config.padded_vocab_size,
        "attention": config.attention,
    }


def gpt_config_from_hf(hf, **overrides):
    """GPTConfig from a GPT2Config dict, refusing options this implementation does not compute."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"config.json describes a {hf.get('model_type')!r} model; only 'gpt2' is supported")
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
        "tie_word_embeddings": (True,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"config.json sets {key}={hf[key]!r}, which this GPT-2 does not implement")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise CheckpointError("config.json sets n_inner to other than 4 * n_embd, which this GPT-2 does not implement")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError("config.json sets a layer_norm_epsilon other than 1e-5")
    try:
        vocab_size = int(hf["vocab_size"])
        values = dict(
            block_size=int(hf["n_positions"]),
            vocab_size=vocab_size,
            padded_vocab_size=int(hf.get("padded_vocab_size", math.ceil(vocab_size / 64) * 64)),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            dropout=float(hf.get("resid_pdrop", 0.0)),
            attention=str(hf.get("attention", "sdpa")),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GPTConfig(**values)
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the field {e.args[0]!r}; it is not a GPT-2 config") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json holds an impossible GPT-2 config: {e}") from e


def our_name(hf_name):
    """Our parameter name for a tensor name in a GPT-2 safetensors file, or None for what is no weight."""
    if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # old causal-mask buffers, not weights
    if not hf_name.startswith("transformer.") and hf_name != "lm_head.weight":
        return "transformer." + hf_name  # hub checkpoints saved from GPT2Model have no prefix
    return hf_name


def stored_shapes(model):
    """{our parameter name: the shape a GPT-2 file stores it in}: Conv1D weights transposed, and the
    token embedding (and the head tied to it) without the padding rows."""
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, shape in shapes.items():
        if name.endswith(CONV1D_WEIGHTS):
            shapes[name] = shape[::-1]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            shapes[name] = (model.config.vocab_size, model.config.n_embd)
    return shapes


def check_safetensors_header(weights_path, model):
    """Refuses a safetensors file whose tensor names or shapes differ from what `model`'s config
    implies, from the file's header alone (a few kilobytes, whatever the file's size)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{os.path.dirname(weights_path) or '.'} has no model.safetensors; GPT-2 weights are "
                              "read only from safetensors (convert a pytorch_model.bin with transformers first)")
    try:
        with safe_open(weights_path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(k).get_shape()) for k in f.keys() if (name := our_name(k))}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is damaged or incomplete ({e}); save or copy it again") from e
    implied = stored_shapes(model)
    expected = set(implied) - {"lm_head.weight"}  # the head may be stored or not: it is tied
    missing, unexpected = sorted(expected - set(shapes)), sorted(set(shapes) - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not match config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}; the checkpoint is damaged or of another model")
    for name, shape in shapes.items():
        if shape != implied[name]:
            raise CheckpointError(f"{weights_path}: {name} has shape {shape}, config.json implies "
                                  f"{implied[name]}; the checkpoint is damaged or of another model")


def state_dict_from_hf(tensors, model):
    """Our state dict from GPT-2 safetensors whose names and shapes check_safetensors_header has
    accepted: transposes the Conv1D weights, pads the vocabulary, and checks the values."""
    config = model.config
    expected = model.state_dict()
    loaded = {name: v for k, v in tensors.items() if (name := our_name(k))}
    head = loaded.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, loaded["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight differs from the token embedding; this GPT-2 ties them")
    state = {}
    for name, tensor in loaded.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name} holds {tensor.dtype} values; weights must be floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{name} contains NaN or infinite values; the checkpoint is damaged")
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            padding = tensor.new_zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
            tensor = torch.cat([tensor, padding])
        state[name] = tensor.to(expected[name].dtype).contiguous()  # the model's own layout (transposes copied)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def read_json(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found; a model directory holds config.json and model.safetensors")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is damaged")
    return value


def pretrained_config(path_or_name, **overrides):
    """GPTConfig of a Hugging Face GPT-2 directory or hub name, read from its config.json alone."""
    return gpt_config_from_hf(read_json(os.path.join(resolve_model_dir(path_or_name), "config.json")), **overrides)


def resolve_model_dir(path_or_name):
    """A local directory as is; otherwise a Hugging Face hub name, downloaded (weights only) when online."""
    if os.path.isdir(path_or_name):
        return path_or_name
    if os.path.exists(path_or_name) or path_or_name.startswith((".", "/", "~")) or path_or_name.count("/") > 1:
        raise CheckpointError(f"{path_or_name} is not a model directory (config.json + model.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # the hub client raises many types: offline, unknown repo, gated, ...
        raise CheckpointError(f"could not fetch {path_or_name!r} from the Hugging Face hub ({type(e).__name__}); "
                              "check the name and the network, or pass a local model directory") from e
