"""GPT-2, and the block of today's LLMs beside it, written out by hand so that every step can be read.

GPT-2 (Radford et al., 2019): token plus learned position embeddings, a stack of pre-LayerNorm blocks
(causal self-attention, then a 4x MLP with tanh-GELU, each wrapped in a residual connection), a final
LayerNorm and a head that shares its weight with the token embedding. Llama, Qwen3, Mistral and OLMo
keep that skeleton and change a few pieces: rotary positions instead of a position table, RMSNorm,
normalised queries and keys, a gated MLP, no biases, an untied head, fewer key/value heads than query
heads. Each piece is one small class set beside GPT-2's, chosen once from the config when the model
is built (ARCHITECTURES names the usual sets); the forward pass reads the same for every choice.

The file reads top to bottom as the model is explained:
    GPTConfig, ARCHITECTURES, presets  the sizes and the pieces
    LayerNorm / RMSNorm                the norms
    LearnedPositions / RotaryPositions where a token's position enters
    KVCache, CausalSelfAttention       attention, with the cache that makes decoding one token cheap
    MLP / GatedMLP, Block              the rest of a transformer block
    GPT                                embeddings, blocks, head and loss; generation; FLOP count

Machinery lives in the package: the CPU trainer's head and loss in one pass (wikigpt/fused_loss.py),
sampling filters (wikigpt/generation.py), the mapping to Hugging Face's files (wikigpt/convert.py:
GPT-2's module names, `h.0.attn.c_attn`, become Qwen3's or Llama's, `layers.0.self_attn.q_proj`).

Notation in shape comments:
    B  batch size            T  sequence length (tokens in this call)
    C  embedding width       nh query heads     nkv key/value heads     hs head size (C // nh by default)
    V  vocabulary rows (padded_vocab_size)             L  number of layers    N  rows, B * T
Run `python -m pytest tests/test_transformer.py` to check it against Hugging Face's implementations.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wikigpt import convert
from wikigpt.fused_loss import fused_head_and_loss
from wikigpt.generation import sample_next_token
from wikigpt.tokenizer import EOT_TOKEN, VOCAB_SIZE

# ---- Sizes and pieces ----


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length in tokens; sets the size of the position table
    vocab_size: int = VOCAB_SIZE  # real tokens (GPT-2's BPE by default); logits beyond them are masked out
    padded_vocab_size: int = 50304  # embedding rows: vocab_size rounded up to a multiple of 64 for fast matmuls
    eot_token: int = EOT_TOKEN  # <|endoftext|>, which starts every article: where document_mask cuts
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per block
    n_embd: int = 768  # residual stream width C
    n_kv_head: int | None = None  # key/value heads, each shared by n_head // n_kv_head query heads; None: n_head
    head_dim: int | None = None  # hs, the width of each head; None: n_embd // n_head
    mlp_hidden: int | None = None  # the MLP's inner width; None: 4 C, or for the gated MLP as many parameters
    dropout: float = 0.0  # on embeddings, attention weights and residual branches; 0 for pretraining
    attention: str = "auto"  # "sdpa" (fused kernel, flash attention on CUDA), "manual" (explicit softmax), or
    # "auto": whichever is faster for the device and context (explicit_is_faster); all compute the same
    # The pieces in which today's block differs from GPT-2's (ARCHITECTURES names the usual sets):
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (scale only, no centring)
    norm_eps: float = 1e-5  # added to the variance inside every norm
    positions: str = "learned"  # "learned": a table added to the embeddings (GPT-2); "rotary": q and k rotated
    rope_theta: float = 10000.0  # rotary: the base of the rotation frequencies
    qk_norm: bool = False  # RMSNorm each head's queries and keys before the scores
    mlp: str = "gelu"  # "gelu" (GPT-2), "relu2" (ReLU squared) or "swiglu" (gated SiLU)
    bias: bool = True  # biases in the linear layers and LayerNorms
    tie_embeddings: bool = True  # the head reuses the token embedding's weight

    def __post_init__(self):
        choices = dict(attention=("auto", "sdpa", "manual"), norm=("layernorm", "rmsnorm"),
                       positions=("learned", "rotary"), mlp=("gelu", "relu2", "swiglu"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if min(self.block_size, self.n_layer, self.n_head, self.n_embd, self.head_dim or 1, self.mlp_hidden or 1) < 1:
            raise ValueError("block_size, n_layer, n_head, n_embd, head_dim and mlp_hidden must be positive")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or head_dim set")
        # Defaults resolved once, so that equal models have equal configs. The gated MLP's inner width is by
        # default 2/3 of 4 C (in 64s): its three matrices then hold the plain MLP's parameters, a fair comparison.
        self.n_kv_head, self.head_dim = self.n_kv_head or self.n_head, self.head_dim or self.n_embd // self.n_head
        gated_width = max(64, round(8 * self.n_embd / 3 / 64) * 64)
        self.mlp_hidden = self.mlp_hidden or (gated_width if self.mlp == "swiglu" else 4 * self.n_embd)
        if self.n_head % self.n_kv_head or (self.positions == "rotary" and self.head_dim % 2):
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}), and "
                             f"rotary positions need an even head_dim ({self.head_dim})")
        if self.padded_vocab_size < self.vocab_size or not 0 <= self.eot_token < self.vocab_size:
            raise ValueError(f"padded_vocab_size must be at least vocab_size, and eot_token ({self.eot_token}) one "
                             "of the vocabulary's ids")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_pretrained(cls, path_or_name, **overrides):
        """The config of a Hugging Face model directory or hub name (GPT-2, Qwen3, Llama, ...), from config.json."""
        return convert.read_config(convert.model_directory(path_or_name), cls, **overrides)


# The pieces of each --arch, named after the Hugging Face class that computes the same (checkpoints load as it).
ARCHITECTURES = {
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, positions="learned", qk_norm=False, mlp="gelu", bias=True,
                 head_dim=None),  # heads that split the width (n_embd / n_head), the only ones its class has
    "qwen3": dict(norm="rmsnorm", norm_eps=1e-6, positions="rotary", qk_norm=True, mlp="swiglu", bias=False),
    "llama": dict(norm="rmsnorm", norm_eps=1e-6, positions="rotary", qk_norm=False, mlp="swiglu", bias=False),
    "arcee": dict(norm="rmsnorm", norm_eps=1e-5, positions="rotary", qk_norm=False, mlp="relu2", bias=False),
}

# Sizes of the four GPT-2 releases, plus small models that train on a laptop CPU.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # trains in seconds; used by the tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, head_dim=64),  # the quickstart (docs/benchmarks.md)
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # a larger CPU or small-GPU model
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_from_preset(name, arch="gpt2", **overrides):
    """GPTConfig of a named preset and architecture; `overrides` that are None keep their value."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    values = {**PRESETS[name], **ARCHITECTURES[arch], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(**values)


# ---- Norms: what each branch reads ----


def LayerNorm(config, size):
    """GPT-2's norm: each vector minus its mean, over its standard deviation, times a gain plus a bias."""
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


class RMSNorm(nn.Module):
    """Replaces LayerNorm: divides by the root mean square, without subtracting the mean or adding a bias:
    one reduction instead of two, as good (Zhang and Sennrich, 2019). In float32, as Qwen3 and Llama."""

    def __init__(self, config, size):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


# ---- Positions: where the order of the tokens enters ----


class LearnedPositions(nn.Embedding):
    """GPT-2's positions: one learned vector per position, added to the token embeddings: no position past
    block_size can be read, and each token's position is in the residual stream from the first layer on."""

    can_slide = False  # cached keys hold absolute positions: generate re-encodes when the context is full

    def __init__(self, config):
        super().__init__(config.block_size, config.n_embd)

    def embed(self, x, start):
        return x + super().forward(torch.arange(start, start + x.size(1), device=x.device))  # (B, T, C)

    def rotation(self, start, T):
        return lambda q, k: (q, k)  # positions are in the embeddings already


class RotaryPositions(nn.Module):
    """Replaces the position table (Su et al., 2021, RoFormer): nothing is added to the embeddings;
    instead, in every layer, each pair of a head's query and key coordinates is rotated by an angle
    proportional to the token's position, at a frequency of its own. A score q . k then depends only on
    the distance between query and key, never on where both are. No weights; the tables of cos and sin
    are built once for the context (and on the fly only for positions past it, when decoding slides).
    Coordinate i is paired with i + hs/2 (the "rotate half" convention of Llama and Qwen3's files)."""

    can_slide = True  # scores depend on distances only, so the oldest cached keys may simply be dropped

    def __init__(self, config):
        super().__init__()
        hs = config.head_dim
        # On the CPU even while from_pretrained builds the model on the meta device: no file holds them.
        self.register_buffer("inv_freq", 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, device="cpu").float() / hs),
                             persistent=False)  # (hs/2,)
        cos, sin = self.tables(torch.arange(config.block_size, device="cpu"))
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, positions):
        angles = positions.float()[:, None] * self.inv_freq.float()  # (T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, hs): coordinates i and i + hs/2 share an angle
        return angles.cos(), angles.sin()

    def embed(self, x, start):
        return x

    def rotation(self, start, T):
        """The function that rotates (B, nh, T, hs) queries and keys at positions start .. start + T - 1."""
        if start + T <= self.cos.size(0):
            cos, sin = self.cos[start : start + T], self.sin[start : start + T]
        else:  # past the context: only when decoding slides (GPT.generate)
            cos, sin = self.tables(torch.arange(start, start + T, device=self.inv_freq.device))

        def rotate(q, k):
            c, s = cos.to(q.dtype), sin.to(q.dtype)
            return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

        return rotate


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the halves of the last dimension: x cos + rotate_half(x) sin turns each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


POSITIONS = {"learned": LearnedPositions, "rotary": RotaryPositions}


# ---- Attention, with its key/value cache ----


class KVCache:
    """Keys and values of the tokens seen so far, so that decoding one token costs one token's work.

    One preallocated (L, B, nkv, slots, hs) buffer each for keys and values; `length` counts the slots
    filled and `position` is that of the next token (they differ after drop_oldest, which rotary
    positions allow). GPT.forward appends to it and advances both after the last layer.
    """

    def __init__(self, config, batch_size, device, dtype, slots=None):  # slots: tokens it will hold, <= block_size
        slots = min(slots or config.block_size, config.block_size)
        shape = (config.n_layer, batch_size, config.n_kv_head, slots, config.head_dim)
        self.keys, self.values = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        self.length = self.position = 0

    def drop_oldest(self):
        """Frees a slot by dropping every layer's oldest token: the next one sees the newest block_size."""
        self.keys[:, :, :, :-1] = self.keys[:, :, :, 1:].clone()
        self.values[:, :, :, :-1] = self.values[:, :, :, 1:].clone()
        self.length -= 1


def causal_mask(T, past, device):
    """(T, past + T) booleans: query i, at absolute position past + i, may see keys 0 .. past + i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def document_mask(idx, eot_token):
    """(B, 1, T, T) booleans for a training window of several articles: causal, and a token sees only
    the tokens of its own article (each starts with eot_token), not the end of the one before."""
    B, T = idx.size()
    article = (idx == eot_token).cumsum(dim=1)  # (B, T): which article of the window each token is in
    same_article = article[:, :, None] == article[:, None, :]  # (B, T, T)
    return (same_article & causal_mask(T, 0, idx.device))[:, None]  # (B, 1, T, T), one mask for all heads


def attend(q, k, v, past, mask, dropout_p, explicit):
    """softmax(q k^T / sqrt(hs)) v: each of the (B, nh, T, hs) queries takes the weighted sum of the values
    of the (B, nh, past + T, hs) keys it may see (causal, or `mask`): as the paper writes it (explicit),
    or in PyTorch's fused kernel (flash attention on CUDA), which computes the same."""
    if explicit:
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, past + T)
        allowed = causal_mask(q.size(2), past, q.device) if mask is None else mask
        scores = scores.masked_fill(~allowed, float("-inf"))  # no query sees a later key
        weights = F.dropout(F.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p)  # each row sums to 1
        return weights @ v  # (B, nh, T, hs)
    if mask is None and past == 0:  # no cached keys: the kernel's own causal triangle, the fastest
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if mask is None and q.size(2) > 1:  # a chunk after cached keys: the causal mask shifted by `past`
        mask = causal_mask(q.size(2), past, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def explicit_is_faster(q, keys, max_keys=128):
    """attention="auto": the explicit path where the products run in bf16 on a CPU (autocast's dtype, not q's:
    query/key norms leave q in float32), up to max_keys keys or for one decoding query; the fused kernel
    elsewhere. Where each wins, on three kinds of CPU: bench/bench_attention.py, docs/benchmarks.md."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    return q.device.type == "cpu" and dtype == torch.bfloat16 and (keys <= max_keys or q.size(2) == 1)


def shared_heads(x, groups):
    """(B, nkv, T, hs) -> (B, nkv * groups, T, hs): each key/value head serves `groups` query heads in a
    row (grouped-query attention, Ainslie et al. 2023: a smaller cache for the same queries)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_dim
        self.dropout, self.attention = config.dropout, config.attention
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim  # 3 C for GPT-2
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)  # queries, keys, values in one matmul
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)  # mixes the heads
        # Query/key norms (Qwen3, OLMo 2): each head's queries and keys get unit RMS (times a learned gain)
        # before the dot product, so that no score can grow without bound and saturate the softmax.
        self.q_norm = RMSNorm(config, config.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config, config.head_dim) if config.qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotate, cache=None, layer=0, mask=None):
        """rotate: the position scheme's rotation of queries and keys (none for GPT-2's table).
        mask: None for plain causal attention, or (B, 1, T, T) booleans, True where a query may see a
        key (document_mask); not combined with a cache."""
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.hs
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)  # (B, T, nh hs), 2 x (B, T, nkv hs)
        q = self.q_norm(q.view(B, T, nh, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, nkv, hs)).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = rotate(q, k)
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.keys[layer, :, :, past : past + T] = k
            cache.values[layer, :, :, past : past + T] = v
            k = cache.keys[layer, :, :, : past + T]  # (B, nkv, past + T, hs)
            v = cache.values[layer, :, :, : past + T]  # (B, nkv, past + T, hs)
        k, v = shared_heads(k, nh // nkv), shared_heads(v, nh // nkv)  # (B, nh, past + T, hs)
        explicit = self.attention == "manual" or (self.attention == "auto" and explicit_is_faster(q, past + T))
        y = attend(q, k, v, past, mask, self.dropout if self.training else 0.0, explicit)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh hs): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """max(0, x)^2: as cheap as ReLU, smooth at 0 for its gradient, and sparse (So et al. 2021, Primer)."""
    forward = staticmethod(lambda x: F.relu(x).square())


class MLP(nn.Module):
    """GPT-2's MLP: widen to 4 C, a nonlinearity, back to C. tanh-GELU as GPT-2 was trained, or ReLU^2."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLUSquared()  # GPT-2: tanh GELU
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, 4C) inside, (B, T, C) out


class GatedMLP(nn.Module):
    """Replaces GPT-2's MLP (SwiGLU, Shazeer 2020): two projections up, one through SiLU gating the other
    elementwise, then one down. c_fc makes both in one matmul, the gate first (gate_proj, up_proj)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # each (B, T, hidden)
        return self.dropout(self.c_proj(F.silu(gate) * up))  # (B, T, C)


MLPS = {"gelu": MLP, "relu2": MLP, "swiglu": GatedMLP}


class Block(nn.Module):
    """Pre-norm: each branch reads a normalised copy and adds its result to the residual stream."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = NORMS[config.norm](config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = NORMS[config.norm](config, config.n_embd)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, x, rotate, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), rotate, cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
            wpe=POSITIONS[config.positions](config),  # positions: GPT-2's table, or rotary (no weights)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=NORMS[config.norm](config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:  # the head scores each token by its embedding (and saves V x C parameters)
            self.lm_head.weight = self.transformer.wte.weight
        self.fused_loss = False  # the CPU trainer's head and loss in one pass: faster, equal in value
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
        the new tokens, which attend to the cached ones and are appended. Training options:
        mask_documents keeps attention within each article of the window (document_mask); z_loss adds
        z_loss * log(Z)^2 per token (Z the softmax's normaliser), which keeps the logits from drifting
        up together and lets higher learning rates stay stable.
        """
        B, T = idx.size()
        past, start = (cache.length, cache.position) if cache is not None else (0, 0)
        if past + T > self.config.block_size:
            raise ValueError(f"{past + T} positions exceed the context of {self.config.block_size}")
        positions = self.transformer.wpe
        x = self.transformer.drop(positions.embed(self.transformer.wte(idx), start))  # (B, T, C)
        rotate = positions.rotation(start, T)  # the same rotation for every layer
        mask = document_mask(idx, self.config.eot_token) if mask_documents else None
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rotate, cache, layer, mask)
        if cache is not None:
            cache.length, cache.position = cache.length + T, cache.position + T
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
        runs the model on one token. When the window is full: with rotary positions a score depends
        only on the distance between query and key, so the oldest cached token is dropped and each new
        token sees the newest block_size tokens in every layer (a sliding window, like llama.cpp's
        context shift). GPT-2's table puts absolute positions into everything computed from them, so
        its cached keys cannot move: the newest half window is encoded afresh. Without the cache, each
        step re-reads the newest block_size tokens, the reference behaviour.
        """
        window, slides = self.config.block_size, self.transformer.wpe.can_slide
        cache, tokens = None, idx
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(tokens[:, -window:])[0]
            elif cache is None or (cache.length == window and not slides):
                context = tokens[:, -window:] if cache is None else tokens[:, -(window // 2) :]
                cache = KVCache(self.config, tokens.size(0), tokens.device, self.transformer.wte.weight.dtype,
                                slots=idx.size(1) + max_new_tokens)
                logits = self(context, cache=cache)[0]
            else:
                if cache.length == window:
                    cache.drop_oldest()
                logits = self(tokens[:, -1:], cache=cache)[0]
            next_token = sample_next_token(logits[:, -1, : self.config.vocab_size], temperature=temperature,
                                           top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            yield next_token

    # ---- What training needs to know about the model ----

    def num_params(self, embeddings=True):
        """Parameter count; a tied head is counted once. embeddings=False drops wte and wpe."""
        dropped = self.transformer.wte.weight.numel() + sum(p.numel() for p in self.transformer.wpe.parameters())
        return sum(p.numel() for p in self.parameters()) - (0 if embeddings else dropped)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 N + 12 L T (nh hs) (forward plus backward, which costs twice forward).
        N counts every weight used in a matmul: all but the position table and, with an untied head, the
        token embedding (a lookup). 6 N is 2 FLOPs per multiply-add times three passes; 12 L T (nh hs)
        adds the attention scores and weighted sums (PaLM, Chowdhery et al. 2022, appendix B)."""
        n = self.num_params() - sum(p.numel() for p in self.transformer.wpe.parameters())
        if not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * self.config.n_layer * seq_len * self.config.n_head * self.config.head_dim

    # ---- Hugging Face's files (the mapping is in wikigpt/convert.py) ----

    def save_pretrained(self, directory):
        """Writes config.json, model.safetensors and generation_config.json as the stock class of the
        architecture (GPT2LMHeadModel, Qwen3ForCausalLM, LlamaForCausalLM) and pipeline load them."""
        convert.write_hf_model(directory, self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path_or_name, **config_overrides):
        """Loads a Hugging Face directory of GPT-2, Qwen3 or Llama, or a hub name such as 'gpt2' or
        'Qwen/Qwen3-0.6B' (downloads when online). Only JSON and safetensors are read, so nothing in the
        files can run code. The model is built on the meta device (no memory, no initialisation), the
        safetensors header is checked against its shapes before any tensor is read. `config_overrides`
        (for example dropout) replace fields."""
        directory = convert.model_directory(path_or_name)
        with torch.device("meta"):
            model = cls(GPTConfig.from_pretrained(directory, **config_overrides))
        weights = convert.read_weights(directory, model)
        model.load_state_dict(weights, strict=True, assign=True)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight  # assign=True gave the tied pair two parameters
        return model
