"""Text out of GPT.generate: the default sampling settings and the decoding of generated ids into
text as they come.

Used by infer.py (streamed to the terminal), the trainer's text samples at each evaluation
(wikigpt/monitor.py) and the generation_config.json of every checkpoint (wikigpt/convert.py), so
that all three sample alike.
"""

import codecs

import torch

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
    device = model.lm_head.weight.device
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
