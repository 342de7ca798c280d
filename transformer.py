"""GPT-2, written out by hand so that every step can be read.

The model is the one of "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019):
token plus learned position embeddings, a stack of pre-LayerNorm blocks (causal self-attention, then
a 4x MLP with tanh-GELU, each wrapped in a residual connection), a final LayerNorm and a language-model
head that shares its weight with the token embedding.

The file reads top to bottom as the model is explained:
    GPTConfig and the presets          the sizes
    KVCache, CausalSelfAttention       attention, with the cache that makes decoding one token cheap
    MLP, Block                         the rest of a transformer block
    GPT                                embeddings, blocks, head and loss; generation; FLOP count
    sample_next_token, keep_top_k/p    the sampling filters that generation uses

Two pieces of machinery live in the package beside this file: the CPU trainer's head and loss in
one pass (wikigpt/fused_loss.py, switched on by GPT.fused_loss; the model reads the same without it)
and the mapping to and from Hugging Face's GPT-2 files (wikigpt/convert.py). Module names follow the
original checkpoints (`transformer.h.0.attn.c_attn`, ...), so weights move to and from Hugging
Face's `GPT2LMHeadModel` with one documented change: GPT-2 stores its projection weights as Conv1D,
(in, out), where `nn.Linear` keeps (out, in).

Notation used in shape comments:
    B  batch size            T  sequence length (tokens in this call)
    C  embedding width       nh number of heads        hs head size, C // nh
    V  vocabulary rows (padded_vocab_size)             L  number of layers    N  rows, B * T

Run `python -m pytest tests/test_transformer.py` to check it against Hugging Face's implementation.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wikigpt import convert
from wikigpt.fused_loss import fused_head_and_loss
from wikigpt.tokenizer import EOT_TOKEN, VOCAB_SIZE

# ---- Sizes ----


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length in tokens; sets the size of the position table
    vocab_size: int = VOCAB_SIZE  # real tokens (GPT-2's BPE by default); logits beyond them are masked out
    padded_vocab_size: int = 50304  # embedding rows: vocab_size rounded up to a multiple of 64 for fast matmuls
    eot_token: int = EOT_TOKEN  # <|endoftext|>, which starts every article: where document_mask cuts
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
        if not 0 <= self.eot_token < self.vocab_size:
            raise ValueError(f"eot_token ({self.eot_token}) must be one of the vocabulary's ids")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("sdpa", "manual"):
            raise ValueError(f"attention must be 'sdpa' or 'manual', got {self.attention!r}")

    @classmethod
    def from_pretrained(cls, path_or_name, **overrides):
        """The config of a Hugging Face GPT-2 directory or hub name, from its config.json alone."""
        return convert.read_config(convert.model_directory(path_or_name), cls, **overrides)


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


def document_mask(idx, eot_token):
    """(B, 1, T, T) booleans for a training window of several articles: causal, and a token sees only
    the tokens of its own article (each starts with eot_token), not the end of the one before."""
    B, T = idx.size()
    article = (idx == eot_token).cumsum(dim=1)  # (B, T): which article of the window each token is in
    same_article = article[:, :, None] == article[:, None, :]  # (B, T, T)
    return (same_article & causal_mask(T, 0, idx.device))[:, None]  # (B, 1, T, T), one mask for all heads


def fused_attention(q, k, v, past, mask, dropout_p):
    """F.scaled_dot_product_attention with the mask it needs: none for a window without cached keys
    (the kernels apply the causal triangle themselves, the fastest case) or for one new query (it may
    see every cached key); the causal mask shifted by `past` for a chunk after cached keys."""
    if mask is None and past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if mask is None and q.size(2) > 1:
        mask = causal_mask(q.size(2), past, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


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

        if self.attention == "manual":  # the attention of the paper, written out
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, past + T)
            allowed = causal_mask(T, past, x.device) if mask is None else mask
            scores = scores.masked_fill(~allowed, float("-inf"))  # no query sees a later key
            weights = self.attn_dropout(F.softmax(scores.float(), dim=-1).to(q.dtype))  # each row sums to 1
            y = weights @ v  # (B, nh, T, hs): for each query, the weighted sum of the values
        else:  # the same in one fused kernel (flash attention on CUDA)
            y = fused_attention(q, k, v, past, mask, self.dropout if self.training else 0.0)

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
        mask = document_mask(idx, self.config.eot_token) if mask_documents else None
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

    # ---- Hugging Face's GPT-2 layout (the mapping is in wikigpt/convert.py) ----

    def save_pretrained(self, directory):
        """Writes config.json, model.safetensors and generation_config.json, as GPT2LMHeadModel's
        from_pretrained (and pipeline, and lm-evaluation-harness) load them."""
        convert.write_hf_model(directory, self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path_or_name, **config_overrides):
        """Loads a Hugging Face GPT-2 directory, or a hub name such as 'gpt2' (downloads when online).

        Only JSON and safetensors are read, so nothing in the files can run code. The model is built
        on the meta device (no memory, no initialisation), the safetensors header is checked against
        its shapes before any tensor is read, and the loaded tensors become its parameters.
        `config_overrides` (for example dropout) replace config fields.
        """
        directory = convert.model_directory(path_or_name)
        with torch.device("meta"):
            model = cls(GPTConfig.from_pretrained(directory, **config_overrides))
        weights = convert.read_weights(directory, model)
        model.load_state_dict(weights, strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True gave the tied pair two parameters
        return model


# ---- Sampling: what generate draws the next token with ----


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
