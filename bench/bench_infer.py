"""Generated tokens per second at batch 1: infer.py with and without the KV cache, in float32, bf16,
float16 (on a CPU: fbgemm's kernel, float32 activations) and weight-only int8, beside transformers,
and each against the memory roofline of its weights.

    python bench/bench_infer.py [--new-tokens 256] [--presets small,gpt2] [--archs gpt2,qwen3] [--device cpu]
    python bench/bench_infer.py --kernels --presets gpt2 --archs gpt2   # each dtype's kernel alone

Each preset and block gets random weights (speed does not depend on their values), saved once in the
Hugging Face layout, then loaded by infer.load_model and by transformers' AutoModelForCausalLM (GPT-2's
or Qwen3's class), so that all rows run the same weights. Greedy decoding with no early stop, so every
row generates exactly --new-tokens tokens after the same 8-token prompt; the best of --trials runs
counts. Decoding one token at batch 1 reads every matrix once, so its speed is bounded by the bytes of
weights read per token over the rate at which the machine reads memory, measured here as the best of
five sums over 1 GiB: the roofline column. --kernels times instead the linear layers alone, as each
dtype's decoding multiplies them: one row through every matrix of the model in turn, nothing else.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from infer import load_model  # noqa: E402
from transformer import GPT, config_from_preset  # noqa: E402
from wikigpt.generation import generate_text  # noqa: E402
from wikigpt.quantize import HalfLinear, Int8Linear, MatVecLinear  # noqa: E402
from wikigpt.runtime import inference_weight_dtype, pick_device  # noqa: E402
from wikigpt.tokenizer import gpt2_tokenizer  # noqa: E402


def best_time(function, repeats, device):
    """The shortest of `repeats` timed calls of `function`, in seconds, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def best_rate(generate, new_tokens, trials, device):
    return new_tokens / best_time(generate, trials, device)


def memory_read_rate(device, gib=1, repeats=5):
    """Bytes per second of summing a float32 tensor of `gib` GiB, best of `repeats`: what one pass over
    weights that do not fit in any cache can reach."""
    data = torch.ones(gib * 2**28, device=device)
    return gib * 2**30 / best_time(data.sum, repeats, device)


def weight_bytes_per_token(model):
    """Bytes of weights that one decoding step reads: every tensor of the model once (int8's scales
    included, float16's packed matrices and their float32 biases too), where the token embedding is
    only looked up, one row, unless a tied head reads it all."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied pair once; no rotary tables
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for packed in (m for m in model.modules() if isinstance(m, HalfLinear)):  # fbgemm's, not in the state dict
        weight, bias = torch.ops.quantized.linear_unpack_fp16(packed.packed)
        total += weight.numel() * 2 + (0 if bias is None else bias.numel() * 4)
    embedding = model.transformer.wte.weight
    if getattr(model.lm_head, "weight", None) is not embedding:  # untied, or int8's or float16's own copy
        total -= (embedding.size(0) - 1) * embedding.size(1) * embedding.element_size()
    return total


def kernel_rows(model, read_rate, repeats=10):
    """For each way infer.py multiplies a decoded token by the weights: (name, ms for one row through
    all of the model's linear layers in turn, best of `repeats`, and GB/s over their weights' bytes)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    parts = torch.get_num_threads()
    variants = [("float32, F.linear", torch.float32, lambda linear: linear, 4),
                ("float32 over the cores (--dtype float32)", torch.float32, lambda linear: MatVecLinear(linear, parts), 4),
                ("bfloat16, F.linear (--dtype bfloat16)", torch.bfloat16,
                 lambda linear: nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          dtype=torch.bfloat16).requires_grad_(False), 2),
                ("float16, fbgemm (--dtype float16, the default)", torch.float32, HalfLinear, 2),
                ("int8, _weight_int8pack_mm (--quantize int8)", torch.bfloat16,
                 lambda linear: Int8Linear(linear, torch.bfloat16), 1)]
    rows = []
    for name, dtype, make, bytes_per_weight in variants:
        layers = [make(linear) for linear in linears]
        rows_in = {n: torch.randn(1, n, dtype=dtype) for n in {linear.in_features for linear in linears}}
        with torch.no_grad():
            seconds = best_time(lambda: [layer(rows_in[linear.in_features]) for layer, linear in zip(layers, linears)],
                                repeats, torch.device("cpu"))
        weight_bytes = sum(linear.weight.numel() for linear in linears) * bytes_per_weight
        rows.append((name, seconds * 1e3, weight_bytes / seconds / 1e9, weight_bytes / seconds / read_rate))
        del layers
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small,gpt2")
    parser.add_argument("--archs", default="gpt2,qwen3", help="comma-separated blocks: gpt2, qwen3, llama, arcee")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", action="store_true", help="time the linear layers alone, on the CPU")
    args = parser.parse_args()
    if args.kernels:
        read_rate = memory_read_rate(torch.device("cpu"))
        print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}; memory read "
              f"at {read_rate / 1e9:.1f} GB/s; one row through every linear layer, best of 10")
        print("| preset | block | kernel | ms a token | GB/s over the weights | of the read rate |")
        print("|---|---|---|---|---|---|")
        for preset, arch in [(p, a) for p in args.presets.split(",") for a in args.archs.split(",")]:
            torch.manual_seed(0)
            model = GPT(config_from_preset(preset, arch)).requires_grad_(False)
            for name, ms, rate, share in kernel_rows(model, read_rate):
                print(f"| {preset} | {arch} | {name} | {ms:.2f} | {rate:.1f} | {share:.0%} |", flush=True)
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    device = pick_device(args.device)
    prompt = [464, 2106, 286, 6342, 318, 257, 1621, 286]  # "The history of Paris is a story of"
    read_rate = memory_read_rate(device)
    int8_activations = inference_weight_dtype("auto", device, "int8")  # as infer.py --quantize int8 runs
    print(f"device: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {args.new_tokens} new tokens, batch 1, greedy; memory read at "
          f"{read_rate / 1e9:.1f} GB/s; int8 activations in {str(int8_activations)[6:]}")
    print("| preset | block | weights | implementation | tokens/s | MB read a token | roofline tokens/s | "
          "of roofline | vs. float32 no cache |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, arch in [(p, a) for p in args.presets.split(",") for a in args.archs.split(",")]:
        with tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(0)
            # A 1024-token context for every preset, so that prompt plus new tokens fit without sliding.
            GPT(config_from_preset(preset, arch, block_size=1024)).save_pretrained(directory)
            models = {"float32": load_model(directory, device), "bfloat16": load_model(directory, device, torch.bfloat16),
                      "float16": load_model(directory, device, torch.float16),
                      "int8": load_model(directory, device, int8_activations, quantize="int8")}
            hf = transformers.AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
        idx = torch.tensor([prompt], device=device)

        def ours(model, use_cache):
            @torch.inference_mode()  # as infer.py decodes
            def generate():
                generate_text(model, gpt2_tokenizer(), prompt, max_new_tokens=args.new_tokens, temperature=0,
                              stop_at_eot=False, use_cache=use_cache)

            return generate

        @torch.no_grad()
        def theirs():
            hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=50256)

        rows = [("float32", "infer.py, no cache", ours(models["float32"], False), models["float32"])]
        rows += [(name, "infer.py, KV cache", ours(model, True), model) for name, model in models.items()]
        rows += [("float32", "transformers generate (KV cache)", theirs, models["float32"])]
        baseline = None
        for weights, implementation, generate, model in rows:
            rate = best_rate(generate, args.new_tokens, args.trials, device)
            baseline = baseline or rate
            bytes_per_token = weight_bytes_per_token(model)
            roofline = read_rate / bytes_per_token
            print(f"| {preset} | {arch} | {weights} | {implementation} | {rate:,.1f} | {bytes_per_token / 1e6:,.0f} | "
                  f"{roofline:,.0f} | {rate / roofline:.0%} | {rate / baseline:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
