"""Sampling and text out of GPT.generate: the filters that draw each next token (temperature, top-k,
top-p), the default settings, and the decoding of generated ids into text as they come.

Used by transformer.py (GPT.generate draws with sample_next_token), infer.py (streamed to the
terminal), the trainer's text samples at each evaluation (wikigpt/monitor.py) and the
generation_config.json of every checkpoint (wikigpt/convert.py), so that all of them sample alike.
"""

import codecs

import torch
import torch.nn.functional as F

# How infer.py, the trainer's samples and a checkpoint's generation_config.json sample by default: a
# little below temperature 1 and among the 200 likeliest tokens, which keeps a small model on topic.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 200


@torch.no_grad()
def generate_text(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=DEFAULT_TEMPERATURE,
                  top_k=DEFAULT_TOP_K, top_p=None, seed=None, stop_at_eot=True, use_cache=True, on_text=None):
    """Continues `prompt_ids` and returns the new text; `on_text` receives it piece by piece.

    Pieces are cut on UTF-8 boundaries: one token can hold half of a multi-byte character, so bytes
    wait in an incremental decoder until their character is whole.
    """
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    tokens = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, use_cache=use_cache)
    for token in tokens:
        token = token.item()
        if token == tokenizer.eot_token and stop_at_eot:
            break
        pieces.append(decoder.decode(tokenizer.decode_single_token_bytes(token)))
        if on_text and pieces[-1]:
            on_text(pieces[-1])
    pieces.append(decoder.decode(b"", final=True))
    if on_text and pieces[-1]:
        on_text(pieces[-1])
    return "".join(pieces)


# ---- The sampling filters: what GPT.generate draws the next token with ----


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
