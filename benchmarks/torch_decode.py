"""PyTorch reference for benchmarks/decode.py: greedy decoding with Hugging Face Llama's K/V cache on CPU.

    .venv-torch/bin/python benchmarks/torch_decode.py --d_model 384 --num_layers 6 --num_heads 6 \
        --d_ff 1024 --vocab 8192

Same shapes as decode.py (random weights, a 16-token prompt, 128 new tokens, batch 1 and 32, no end
token). Decode tokens/s = batch * (new tokens - 1) / (time of generate(new tokens) - time of
generate(1 token)), so the prompt's prefill is left out as in decode.py. Medians over --repeats.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_llama import build_model  # noqa: E402


def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, default=192)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=6)
    p.add_argument("--num_kv_heads", type=int, default=None)
    p.add_argument("--d_ff", type=int, default=512)
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--tie_embeddings", action="store_true")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.num_kv_heads = args.num_kv_heads or args.num_heads
    args.seq_len, args.attn, args.num_experts = args.prompt_len + args.new_tokens, "sdpa", 0  # a dense Llama
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args).eval()
    model.generation_config.use_cache = True

    result = {"framework": "torch", "torch_version": torch.__version__}
    for batch in (1, 32):
        prompt = torch.randint(0, args.vocab, (batch, args.prompt_len))
        rates = []
        for i in range(args.repeats + 1):  # the first is a warm-up
            full = timed_generate(model, prompt, args.new_tokens)
            prefill = timed_generate(model, prompt, 1)
            if i:
                rates.append(batch * (args.new_tokens - 1) / (full - prefill))
        result[f"decode_tokens_per_sec_batch{batch}"] = statistics.median(rates)
        print(f"batch {batch:2d}: decode {statistics.median(rates):,.0f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
