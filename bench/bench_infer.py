"""Generated tokens per second at batch 1: infer.py with and without the KV cache, and transformers.

    python bench/bench_infer.py [--new-tokens 256] [--presets small,gpt2] [--archs gpt2,qwen3] [--device cpu]

Each preset and block gets random weights (speed does not depend on their values), saved once in the
Hugging Face layout, then loaded by infer.load_model and by transformers' AutoModelForCausalLM (GPT-2's
or Qwen3's class), so that all rows run the same weights, in float32 and in bfloat16. Greedy decoding with no early stop, so every row generates exactly
--new-tokens tokens after the same 8-token prompt; the best of --trials runs counts.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from infer import load_model  # noqa: E402
from transformer import GPT, config_from_preset  # noqa: E402
from wikigpt.generation import generate_text  # noqa: E402
from wikigpt.runtime import pick_device  # noqa: E402
from wikigpt.tokenizer import gpt2_tokenizer  # noqa: E402


def best_rate(generate, new_tokens, trials, device):
    rates = []
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        generate()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(new_tokens / (time.perf_counter() - started))
    return max(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small,gpt2")
    parser.add_argument("--archs", default="gpt2,qwen3", help="comma-separated blocks: gpt2, qwen3, llama, arcee")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    device = pick_device(args.device)
    prompt = [464, 2106, 286, 6342, 318, 257, 1621, 286]  # "The history of Paris is a story of"
    print(f"device: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {args.new_tokens} new tokens, batch 1, greedy")
    print("| preset | block | weights | implementation | tokens/s | vs. float32 no cache |")
    print("|---|---|---|---|---|---|")
    for preset, arch in [(p, a) for p in args.presets.split(",") for a in args.archs.split(",")]:
        with tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(0)
            # A 1024-token context for every preset, so that prompt plus new tokens fit without sliding.
            GPT(config_from_preset(preset, arch, block_size=1024)).save_pretrained(directory)
            ours = load_model(directory, device)
            hf = transformers.AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
        idx = torch.tensor([prompt], device=device)
        baseline = None
        for dtype in (torch.float32, torch.bfloat16):
            ours, hf = ours.to(dtype), hf.to(dtype)
            rows = {}
            for use_cache in (False, True):
                if dtype == torch.bfloat16 and not use_cache:
                    continue  # the no-cache baseline is measured once, in float32
                rows[f"infer.py, {'KV cache' if use_cache else 'no cache'}"] = best_rate(
                    lambda: generate_text(ours, gpt2_tokenizer(), prompt, max_new_tokens=args.new_tokens, temperature=0,
                                          stop_at_eot=False, use_cache=use_cache),
                    args.new_tokens, args.trials, device)

            @torch.no_grad()
            def hf_generate():
                hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=50256)

            rows["transformers generate (KV cache)"] = best_rate(hf_generate, args.new_tokens, args.trials, device)
            baseline = rows["infer.py, no cache"] if dtype == torch.float32 else baseline
            for name, rate in rows.items():
                print(f"| {preset} | {arch} | {str(dtype)[6:]} | {name} | {rate:,.1f} | {rate / baseline:.1f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
