"""The model, both blocks: shapes, causality, the two attention paths, the KV cache (also sliding past the
context), and parity with Hugging Face's GPT-2, Qwen3 and Llama both ways."""

import math

import pytest
import torch

import transformer
from transformer import ARCHITECTURES, GPT, GPTConfig, KVCache, config_from_preset
from wikigpt import convert
from wikigpt.generation import keep_top_k, keep_top_p, sample_next_token
from wikigpt.cli import CheckpointError
from wikigpt.fused_loss import LinearCrossEntropy, fused_head_and_loss

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
# Today's block with grouped-query attention and a head width other than C / nh, its head untied.
QWEN3 = dict(**ARCHITECTURES["qwen3"], n_head=4, n_kv_head=2, head_dim=12, tie_embeddings=False)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # norm gains away from 1, so that a gain applied in the wrong place shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.normal_(1.0, 0.2)
    return model


BLOCKS = pytest.mark.parametrize("block", [{}, QWEN3], ids=["gpt2", "qwen3"])


def test_logits_shape_and_initial_loss_near_uniform():
    model = tiny_model()
    idx = torch.randint(0, 50257, (3, 16))
    targets = torch.randint(0, 50257, (3, 16))  # not idx: tied weights favour repeating the input
    logits, loss = model(idx, targets=targets)
    assert logits.shape == (3, 16, 50304)
    assert torch.isneginf(logits[..., 50257:]).all()  # padding rows can never be predicted
    torch.testing.assert_close(logits, model(idx)[0])  # the same logits with or without targets
    assert abs(loss.item() - math.log(50257)) < 0.1


@BLOCKS
@pytest.mark.parametrize("fused_loss", [True, False])
def test_training_loss_and_gradients_equal_cross_entropy_of_the_logits(fused_loss, block):
    idx, targets = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    targets[0, :3] = -1
    fused, plain = tiny_model(**block), tiny_model(**block)
    fused.fused_loss = fused_loss  # True: the CPU trainer's path; False: the plain one of CUDA and torch.compile
    fused(idx, targets)[1].backward()
    logits = plain(idx)[0]
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1).backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused_loss", [True, False])
def test_z_loss_adds_the_mean_squared_log_normaliser(fused_loss):
    idx, targets = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    targets[1, 5:] = -1
    model = tiny_model()
    model.fused_loss = fused_loss
    with torch.no_grad():
        logits, plain_loss = model(idx, targets)
        _, with_z = model(idx, targets, z_loss=0.5)
    log_z = torch.logsumexp(logits[targets >= 0].double(), dim=-1)
    assert log_z.abs().min() > 1  # so that the term below is far from zero
    torch.testing.assert_close(with_z.double(), plain_loss.double() + 0.5 * (log_z**2).mean(), rtol=1e-5, atol=1e-5)
    fused, plain = tiny_model(), tiny_model()  # and the two paths' gradients agree with the z-loss too
    fused.fused_loss = True
    fused(idx, targets, z_loss=0.5)[1].backward()
    plain(idx, targets, z_loss=0.5)[1].backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_without_targets_returns_no_loss():
    logits, loss = tiny_model()(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, 50304) and loss is None


@BLOCKS
def test_future_tokens_do_not_change_past_logits(block):
    model = tiny_model(**block)
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50257
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@BLOCKS
def test_sdpa_and_manual_attention_agree(block):
    sdpa = tiny_model(**block, attention="sdpa")
    manual = tiny_model(**block, attention="manual")
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50257, (2, 32))
    torch.testing.assert_close(sdpa(idx)[0], manual(idx)[0], rtol=1e-5, atol=1e-5)


# Every length at which attention="auto" may take the explicit path (bf16 on a CPU: up to 128 keys, or
# one query), and past it.
@pytest.mark.parametrize("T, past", [(1, 0), (16, 0), (128, 0), (1, 127), (8, 120), (129, 0), (1, 300), (8, 300)])
def test_the_automatic_attention_takes_a_path_that_agrees_with_the_other(T, past):
    B, nh, hs = 2, 4, 32
    generator = torch.Generator().manual_seed(T + past)
    q = torch.randn(B, nh, T, hs, generator=generator, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, nh, past + T, hs, generator=generator, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    explicit = transformer.explicit_is_faster(q, past + T)
    assert explicit == (past + T <= 128 or T == 1) and not transformer.explicit_is_faster(q.float(), past + T)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 queries whose products autocast runs in bf16
        assert transformer.explicit_is_faster(q.float(), past + T) == explicit
    outputs, grads = [], []
    for path in (True, False):
        y = transformer.attend(q, k, v, past, None, 0.0, explicit=path)
        y.float().square().sum().backward()
        outputs.append(y.float())
        grads.append([t.grad.float().clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    # bf16 keeps 8 bits: the two paths round their products at different points
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0.02, atol=0.02)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    for block in ({}, QWEN3):  # the model takes the path the rule names: auto equals it exactly
        model = tiny_model(**block, block_size=512)
        chosen = tiny_model(**block, block_size=512, attention="manual" if past + T <= 128 else "sdpa")
        idx = torch.randint(0, 50257, (1, past + T))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(idx)[0], chosen(idx)[0], rtol=0, atol=0)


@BLOCKS
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_masked_documents_do_not_see_each_other(attention, block):
    model = tiny_model(**block, attention=attention)
    idx = torch.randint(0, 50256, (2, 24))
    idx[:, 0], idx[:, 10] = 50256, 50256  # two articles: tokens 0-9 and 10-23
    changed = idx.clone()
    changed[:, 3] = (idx[:, 3] + 1) % 50256  # a token of the first article
    masked, masked_changed = model(idx, mask_documents=True)[0], model(changed, mask_documents=True)[0]
    torch.testing.assert_close(masked[:, 10:], masked_changed[:, 10:], rtol=0, atol=0)  # the second cannot see it
    assert not torch.allclose(masked[:, 3:10], masked_changed[:, 3:10])
    assert not torch.allclose(model(idx)[0][:, 10:], model(changed)[0][:, 10:])  # without the mask it can
    torch.testing.assert_close(masked[:, :10], model(idx)[0][:, :10])  # the first article sees the same either way
    other = tiny_model(**block, attention="manual" if attention == "sdpa" else "sdpa")
    torch.testing.assert_close(other(idx, mask_documents=True)[0], masked, rtol=1e-5, atol=1e-5)


@BLOCKS
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_kv_cache_decoding_equals_full_recompute(attention, block):
    model = tiny_model(**block, attention=attention)
    idx = torch.randint(0, 50257, (2, 24))
    full = model(idx)[0]
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    pieces = [model(idx[:, :10], cache=cache)[0]]  # a prompt, then a chunk, then one token at a time
    pieces.append(model(idx[:, 10:15], cache=cache)[0])
    for t in range(15, 24):
        pieces.append(model(idx[:, t : t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_pytorchs(dtype, z_loss, monkeypatch):
    monkeypatch.setattr(LinearCrossEntropy, "ROWS", 32)  # several blocks, the last one partial
    monkeypatch.setattr(LinearCrossEntropy, "SOFTMAX_BYTES", 12 * 4 * 1000)  # softmax groups of 12, 12 and 8 rows
    torch.manual_seed(0)
    x, weight = torch.randn(100, 24), torch.randn(1000, 24)  # 1000 rows, of which 990 are tokens
    targets = torch.randint(0, 990, (100,))
    targets[::7] = -1  # ignored positions
    probe = torch.randn(100, 1000)  # a second use of the logits, as a gradient through them

    def loss_and_grads(x, weight, fused):
        if fused:
            logits, loss = LinearCrossEntropy.apply(x, weight, targets, 990, z_loss, True)
        else:
            logits = torch.cat([x @ weight.t()[:, :990], torch.full((100, 10), float("-inf"))], dim=1)
            loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
            log_z = torch.log(torch.exp(logits[targets >= 0, :990]).sum(dim=1))  # the definition, spelled out
            loss = loss + z_loss * (log_z**2).mean()
        x_grad, weight_grad = torch.autograd.grad(2 * loss, (x, weight), retain_graph=True)
        finite = torch.where(logits.isinf(), 0.0, logits)  # so that the probe can touch the padding too
        both_grads = torch.autograd.grad(loss + (finite * probe).sum(), (x, weight))
        return logits, loss, (x_grad, weight_grad, *both_grads)

    ours_x, ours_w = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    ref_x, ref_w = ours_x.detach().float().requires_grad_(), ours_w.detach().float().requires_grad_()
    logits, ours, ours_grads = loss_and_grads(ours_x, ours_w, fused=True)
    ref_logits, ref, ref_grads = loss_and_grads(ref_x, ref_w, fused=False)
    assert logits.dtype == dtype and torch.isneginf(logits[:, 990:]).all()
    torch.testing.assert_close(logits.float(), ref_logits, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    # bf16 logits are rounded before the softmax, as under autocast: a looser tolerance there
    torch.testing.assert_close(ours, ref, rtol=1e-6 if dtype == torch.float32 else 2e-3, atol=1e-6)
    for got, want in zip(ours_grads, ref_grads):
        assert got.dtype == dtype
        tolerance = 1e-5 * want.abs().max().item() if dtype == torch.float32 else 2e-2 * want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=0, atol=tolerance)
    assert torch.all(ours_grads[1][990:] == 0)  # padding rows are never predicted, so never pushed down
    with torch.no_grad():  # evaluation: the same logits and loss, without the gradient work
        no_grad_logits, no_grad_loss = fused_head_and_loss(ours_x[None], ours_w, targets[None], 990, z_loss)
    torch.testing.assert_close(no_grad_loss, ours, rtol=0, atol=0)
    torch.testing.assert_close(no_grad_logits[0], logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_of_a_target_whose_probability_underflows(dtype):
    """The fused loss reads log Z off the target's probability; where that underflows to zero (a
    target logit 200 below the others) the loss must still be the finite cross-entropy."""
    x = torch.ones(3, 1, dtype=dtype, requires_grad=True)
    weight = torch.tensor([[0.0], [-200.0], [1.0], [0.5]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([1, 2, 1])
    logits, loss = LinearCrossEntropy.apply(x, weight, targets, 4, 0.01, True)
    loss.backward()
    ref_x, ref_w = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_logits = ref_x @ ref_w.t()
    log_z = torch.logsumexp(ref_logits, dim=1)
    ref = torch.nn.functional.cross_entropy(ref_logits, targets) + 0.01 * (log_z**2).mean()
    ref.backward()
    assert torch.isfinite(loss) and loss.item() > 100
    torch.testing.assert_close(loss.float(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad.float(), ref_w.grad, rtol=1e-2, atol=1e-3)


def forward_flops(model, idx, targets):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(idx, targets)
    return counter.get_total_flops()


@pytest.mark.parametrize("fused_loss", [True, False])
def test_evaluation_does_no_gradient_work(fused_loss):
    """Under torch.no_grad, the loss costs no more matrix products than the logits alone (the head's
    gradient would add two products of the head's size: about 3x the FLOPs of the tiny preset)."""
    model = GPT(config_from_preset("tiny"))
    model.fused_loss = fused_loss
    idx, targets = torch.randint(0, 50257, (4, 64)), torch.randint(0, 50257, (4, 64))
    without_loss, with_loss = forward_flops(model, idx, None), forward_flops(model, idx, targets)
    assert without_loss > 0 and with_loss <= 1.01 * without_loss


def test_context_overflow_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceed the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


@BLOCKS
def test_generation_with_cache_matches_reference_within_the_window(block):
    model = tiny_model(**block)
    prompt = torch.randint(0, 50257, (2, 5))
    cached = torch.stack(list(model.generate(prompt, 27, temperature=0)), dim=1)
    plain = torch.stack(list(model.generate(prompt, 27, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(cached, plain)


def test_generation_slides_past_the_context_window():
    """Past the window, each token is the greedy choice given the newest tokens the cache holds:
    after every re-encode the cache holds the last block_size/2 tokens and grows from there."""
    model = tiny_model()
    prompt = torch.randint(0, 50257, (1, 30))
    out = torch.stack(list(model.generate(prompt, 60, temperature=0)), dim=1)
    assert out.shape == (1, 60)
    tokens = torch.cat([prompt, out], dim=1)
    window, context = 32, 30  # the prompt fills 30 of 32 positions
    for step in range(60):
        end = 30 + step  # tokens known before this step
        if context > window:  # a full cache: the newest half window is encoded afresh
            context = window // 2
        logits = model(tokens[:, end - context : end])[0][:, -1, :50257]
        assert logits.argmax(-1).item() == out[0, step].item(), f"step {step}"
        context += 1


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_rotary_decoding_slides_a_window_over_every_layer(attention):
    """Past the context, rotary decoding drops the oldest cached token, so that token t sees tokens
    t - 31 .. t in every layer: what one pass over the whole sequence computes with a band of width 32
    as its mask, in a model of a longer context and the same weights (rotary tables hold no weights)."""
    model = tiny_model(**QWEN3, attention=attention)
    tokens = torch.randint(0, 50257, (2, 70))  # more than twice the context of 32
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    pieces = [model(tokens[:, :32], cache=cache)[0]]
    for t in range(32, 70):
        cache.drop_oldest()
        pieces.append(model(tokens[:, t : t + 1], cache=cache)[0])
    assert (cache.length, cache.position) == (32, 70)
    longer = GPT(GPTConfig(**{**TINY, **QWEN3, "block_size": 128})).eval()
    longer.load_state_dict(model.state_dict())
    distance = torch.arange(70)[:, None] - torch.arange(70)[None, :]
    band = ((distance >= 0) & (distance < 32))[None, None]  # (1, 1, T, T)
    x, rotate = longer.transformer.wte(tokens), longer.transformer.wpe.rotation(0, 70)
    for layer, block in enumerate(longer.transformer.h):
        x = block(x, rotate, None, layer, band)
    expected = longer.lm_head(longer.transformer.ln_f(x))[..., :50257]
    torch.testing.assert_close(torch.cat(pieces, dim=1)[..., :50257], expected, rtol=1e-4, atol=1e-4)
    # and generate decodes that way: each greedy token is the argmax of the sliding window's logits
    out = torch.stack(list(model.generate(tokens[:1, :30], 20, temperature=0)), dim=1)[0]
    sequence = torch.cat([tokens[0, :30], out])
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    logits = model(sequence[None, :30], cache=cache)[0][0, -1]
    for t in range(30, 49):
        assert logits[:50257].argmax().item() == sequence[t].item(), f"token {t}"
        if cache.length == 32:
            cache.drop_oldest()
        logits = model(sequence[None, t : t + 1], cache=cache)[0][0, -1]


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny_model()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack(list(model.generate(prompt, 10, temperature=1.0, top_k=50, generator=g)), 1)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = keep_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.equal(keep_top_k(logits, 99), logits)  # k beyond V keeps everything


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(keep_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(keep_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(keep_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(keep_top_p(logits, 1.0)).all()
    assert torch.isfinite(keep_top_p(logits, 1e-9)).tolist() == [[True, False, False, False]]


def test_sampling_filters_reject_impossible_values():
    logits = torch.zeros(1, 4)
    for kwargs in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_next_token(logits, **kwargs)


def test_greedy_sampling_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]


def test_presets_and_parameter_counts():
    config = config_from_preset("gpt2")
    model = GPT(config)
    # 124M with the padded vocabulary; GPT-2's published 124M counts 50257 rows.
    assert model.num_params() == 124_475_904
    assert model.num_params(embeddings=False) == 124_475_904 - 50304 * 768 - 1024 * 768
    n = model.num_params() - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 1024 * 768
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("gpt5")
    assert config_from_preset("tiny", n_layer=3, dropout=None).n_layer == 3


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(config_from_preset("gpt2", n_layer=8))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 2e-4
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 2e-4


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0),
                                 dict(attention="flash"), dict(padded_vocab_size=100)])
def test_impossible_configs_are_refused(bad):
    with pytest.raises(ValueError):
        GPTConfig(**{**TINY, **bad})


# ---- Hugging Face interoperability ----

def hf_model(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=50257)
    return transformers.GPT2LMHeadModel(config).eval()


def test_loads_hugging_face_weights_with_equal_logits_and_greedy_tokens(tmp_path):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.block_size == 48 and ours.config.padded_vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        expected = theirs(idx).logits
    torch.testing.assert_close(ours(idx)[0][..., :50257], expected, rtol=1e-5, atol=1e-5)

    prompt = idx[:1, :8]
    hf_tokens = theirs.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                attention_mask=torch.ones_like(prompt), pad_token_id=50256)[0, 8:]
    our_tokens = torch.stack(list(ours.generate(prompt, 20, temperature=0)), dim=1)[0]
    assert our_tokens.tolist() == hf_tokens.tolist()


def test_hugging_face_loads_our_weights_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(seed=3)
    ours.save_pretrained(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        expected = ours(idx)[0][..., :50257]
        torch.testing.assert_close(theirs(idx).logits, expected, rtol=1e-5, atol=1e-5)
    reloaded = GPT.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(reloaded(idx)[0], ours(idx)[0], rtol=0, atol=0)


def test_damaged_model_directories_are_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a model directory"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))


# ---- Today's block against transformers' Qwen3 and Llama ----

SHAPES = [  # (family, our config fields): heads as GPT-2's, grouped keys/values, a head width other than C / nh
    ("qwen3", dict(n_head=4, tie_embeddings=True)),
    ("qwen3", dict(n_head=4, n_kv_head=2, head_dim=24, tie_embeddings=False)),
    ("qwen3", dict(n_head=6, n_kv_head=1, head_dim=8, mlp_hidden=80, rope_theta=500.0, tie_embeddings=False)),
    ("llama", dict(n_head=4, n_kv_head=2, tie_embeddings=False)),
    ("arcee", dict(n_head=4, n_kv_head=2, head_dim=12, tie_embeddings=True)),
]


def hf_twin(family, fields, seed=0):
    """A transformers model of the family with the shape of our `fields` (n_embd 32, 2 layers, context
    48, 1,000 ids), its weights random, norm gains included."""
    transformers = pytest.importorskip("transformers")
    config = GPTConfig(**{**TINY, **ARCHITECTURES[family], **fields, "block_size": 48, "vocab_size": 1000,
                          "padded_vocab_size": 1024, "eot_token": 999})
    hf_class = {"qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM,
                "arcee": transformers.ArceeForCausalLM}[family]
    hf_config = hf_class.config_class(**{k: v for k, v in convert.hf_config_dict(config).items()
                                         if k not in ("architectures", "model_type", "rope_scaling")})
    torch.manual_seed(seed)
    model = hf_class(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return config, model


@pytest.mark.parametrize("family, fields", SHAPES)
def test_today_s_block_loads_transformers_weights_with_equal_logits_and_greedy_tokens(family, fields, tmp_path):
    config, theirs = hf_twin(family, fields)
    theirs.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config == config and convert.family_of(ours.config) == family
    idx = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0][..., :1000], theirs(idx).logits, rtol=1e-5, atol=1e-5)
    prompt = idx[:1, :8]
    hf_tokens = theirs.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                attention_mask=torch.ones_like(prompt), pad_token_id=999)[0, 8:]
    assert torch.stack(list(ours.generate(prompt, 20, temperature=0)), dim=1)[0].tolist() == hf_tokens.tolist()


@pytest.mark.parametrize("family, fields", SHAPES)
def test_transformers_loads_today_s_block_with_equal_logits(family, fields, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(seed=5, **{**ARCHITECTURES[family], **fields})
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == convert.CLASS_NAMES[family]
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0][..., :50257], rtol=1e-5, atol=1e-5)
    reloaded = GPT.from_pretrained(str(tmp_path)).eval()
    assert reloaded.config == ours.config
    torch.testing.assert_close(reloaded(idx)[0], ours(idx)[0], rtol=0, atol=0)


def test_every_architecture_is_saved_as_the_family_of_its_name():
    for arch in ARCHITECTURES:
        for tied in (True, False):
            config = config_from_preset("tiny", arch, tie_embeddings=tied)
            assert convert.family_of(config) == (arch if tied or arch != "gpt2" else "wikigpt")


def test_the_quickstart_s_wider_heads_leave_gpt2_s_block_as_its_class_computes_it():
    assert config_from_preset("mini", "qwen3").head_dim == 64  # 4 heads of 64 beside a stream of 128
    gpt2 = config_from_preset("mini", "gpt2")
    assert gpt2.head_dim == 128 // 4 and convert.family_of(gpt2) == "gpt2"
    asked = config_from_preset("mini", "gpt2", head_dim=64)  # given when asked for, in its own format
    assert asked.head_dim == 64 and convert.family_of(asked) == "wikigpt"


@pytest.mark.parametrize("pieces", [dict(positions="rotary"), dict(norm="rmsnorm", qk_norm=True, mlp="relu2"),
                                    {**ARCHITECTURES["qwen3"], "bias": True}])
def test_a_mix_no_stock_class_runs_round_trips_in_its_own_format(pieces, tmp_path):
    ours = tiny_model(seed=2, **pieces)
    ours.save_pretrained(tmp_path)
    assert convert.read_json(str(tmp_path / "config.json"))["model_type"] == "wikigpt"
    reloaded = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 16))
    assert reloaded.config == ours.config
    torch.testing.assert_close(reloaded(idx)[0], ours(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 4}, "has shape"),  # the file holds 2 key/value heads
    ({"num_hidden_layers": 3}, "missing"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu', which this model does not implement"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "scales rotary positions"),
    ({"model_type": "mamba"}, "describes a 'mamba' model"),
])
def test_a_qwen3_directory_that_does_not_fit_is_refused(change, message, tmp_path):
    tiny_model(**QWEN3).save_pretrained(tmp_path)
    config = convert.read_json(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(__import__("json").dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        GPT.from_pretrained(str(tmp_path))


def test_untied_head_counts_its_own_parameters_and_flops():
    tied, untied = (GPT(config_from_preset("tiny", "qwen3", tie_embeddings=t)) for t in (True, False))
    head = 50304 * 64
    assert untied.num_params() == tied.num_params() + head
    assert untied.num_params(embeddings=False) == tied.num_params(embeddings=False) + head
    assert untied.flops_per_token(64) == tied.flops_per_token(64)  # the embedding is a lookup, the head a matmul
    assert tied.flops_per_token(64) == 6 * tied.num_params() + 12 * 2 * 64 * 64
