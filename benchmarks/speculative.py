"""Speculative decoding against plain decoding on trained checkpoints: acceptance rate per draft position, tokens
per verify round and end-to-end decode tokens/s, for a model's MTP heads and for a draft model.

    python benchmarks/speculative.py --workdir runs/ablate_mtp --mtp_k 1
    python benchmarks/speculative.py --workdir runs/ablate_mtp_parallel --mtp_k 1,2
    python benchmarks/speculative.py --workdir runs/tiny --draft_workdir runs/small --draft_k 2,4,8

Prompts are the starts of held-out lines of the embedded corpus (the standard library's sources), decoded at
batch 1 (one prompt at a time) and greedily (temperature 0: the speculative output equals the plain one, which
is checked), or with --temperature. Each speed is the median over prompts of the same compiled programs
(compilation excluded); one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from data.corpus import stdlib_files
from model import Transformer
from sampling import Rules, generate_batch, prompt_ids
from sampling import speculative as spec
from training.checkpoint import load_for_inference


def prompts_from_corpus(count: int, chars: int) -> list[str]:
    """`count` line starts of `chars` ASCII characters, from files spread over the corpus."""
    _, files = stdlib_files()
    out = []
    for f in files[:: max(1, len(files) // (4 * count))]:
        lines = [ln for ln in f.read_text(errors="ignore").splitlines() if len(ln.strip()) >= chars and ln.isascii()]
        if lines:
            out.append(lines[len(lines) // 2].strip()[:chars])
        if len(out) == count:
            break
    return out


def measure(model, params, prompts, new_tokens, rules, max_len, drafter=None, draft_params=None) -> dict:
    rates, tokens, accepted, proposed, rounds = [], [], 0, 0, 0
    for seed, ids in enumerate(prompts):
        if drafter is None:  # (both time the compiled programs only)
            out = generate_batch(model, params, [ids], new_tokens, rules, max_len=max_len, seed=seed)
        else:
            out = spec.generate(model, params, [ids], new_tokens, rules, drafter=drafter,
                                draft_params=draft_params, max_len=max_len, seed=seed)  # fmt: skip
        rates.append(len(out.tokens[0]) / out.decode_seconds)
        tokens.append(out.tokens[0])
        if drafter is not None:
            accepted, proposed, rounds = accepted + out.accepted_K, proposed + out.proposed_K, rounds + out.rounds
    result = {"tokens_per_s": statistics.median(rates), "tokens": tokens}
    if drafter is not None:
        result["acceptance"] = np.round(accepted / np.maximum(proposed, 1), 3).tolist()
        result["tokens_per_round"] = round(sum(map(len, tokens)) / max(rounds, 1), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mtp_k", default="", help="draft lengths for the MTP heads, e.g. 1,2")
    parser.add_argument("--draft_workdir", default="")
    parser.add_argument("--draft_k", default="", help="draft lengths for the draft model, e.g. 2,4,8")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt_chars", type=int, default=24)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()

    run, params, tokenizer, step = load_for_inference(args.workdir)
    model = Transformer(run.model)
    texts = prompts_from_corpus(args.prompts, args.prompt_chars)
    prompts = [prompt_ids(tokenizer, t) for t in texts]
    max_len = max(map(len, prompts)) + args.new_tokens
    rules = Rules(temperature=args.temperature)
    plain = measure(model, params, prompts, args.new_tokens, rules, max_len)
    settings = [("mtp", int(k), spec.MTPDrafter(run.model, int(k)), None) for k in filter(None, args.mtp_k.split(","))]
    if args.draft_workdir:
        draft_run, draft_params, _, _ = load_for_inference(args.draft_workdir)
        for k in filter(None, args.draft_k.split(",")):
            settings.append(("draft", int(k), spec.ModelDrafter(Transformer(draft_run.model), int(k)), draft_params))
    for mode, k, drafter, draft_params in settings:
        got = measure(model, params, prompts, args.new_tokens, rules, max_len, drafter, draft_params)
        row = {
            "workdir": args.workdir,
            "step": step,
            "mode": mode,
            "k": k,
            "mtp": f"{run.model.mtp.style} x{run.model.mtp.num_heads}" if mode == "mtp" else None,
            "draft_workdir": args.draft_workdir if mode == "draft" else None,
            "temperature": args.temperature,
            "prompts": len(prompts),
            "new_tokens": args.new_tokens,
            "acceptance": got["acceptance"],
            "tokens_per_round": got["tokens_per_round"],
            "plain_tokens_per_s": round(plain["tokens_per_s"], 1),
            "speculative_tokens_per_s": round(got["tokens_per_s"], 1),
            "speedup": round(got["tokens_per_s"] / plain["tokens_per_s"], 3),
        }
        if args.temperature == 0:
            row["same_tokens_as_plain"] = got["tokens"] == plain["tokens"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
