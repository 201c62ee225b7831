"""Speculative decoding against plain decoding on trained checkpoints: acceptance rate per draft position, tokens
per verify round and end-to-end decode tokens/s, for a model's MTP heads and for a draft model.

    python benchmarks/speculative.py --workdir runs/ablate_mtp --mtp_k 1
    python benchmarks/speculative.py --workdir runs/ablate_mtp_parallel --mtp_k 1,2
    python benchmarks/speculative.py --workdir runs/tiny --draft_workdir runs/small --draft_k 2,4,8

Prompts are the starts of held-out lines of the embedded corpus (the standard library's sources), decoded at
batch 1 (one prompt at a time) and greedily (temperature 0: the speculative output equals the plain one, which
is checked), or with --temperature. Plain and speculative decoding take turns prompt by prompt (each timed on
its second call, compiled programs only); a setting's speed-up is the median over prompts of its tokens/s over
plain decoding's on the same prompt, so both arms of a ratio ran under the same load. One JSON line per setting.
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


def decode_once(model, params, ids, new_tokens, rules, max_len, seed, drafter=None, draft_params=None):
    """One prompt decoded plainly (drafter None) or speculatively; timings cover the compiled programs only."""
    if drafter is None:
        return generate_batch(model, params, [ids], new_tokens, rules, max_len=max_len, seed=seed)
    return spec.generate(model, params, [ids], new_tokens, rules, drafter=drafter, draft_params=draft_params,
                         max_len=max_len, seed=seed)  # fmt: skip


def measure(model, params, prompts, new_tokens, rules, max_len, settings) -> tuple[dict, list[dict]]:
    """Plain decoding and every setting (drafter, draft params), taking turns prompt by prompt so that both
    arms of each speed-up ran under the same machine load: (plain, [per setting]) with tokens/s medians over the
    prompts, and each setting's median over prompts of its speed-up against plain decoding of the same prompt."""
    plain = {"rates": [], "tokens": []}
    got = [{"rates": [], "tokens": [], "ratios": [], "accepted": 0, "proposed": 0, "rounds": 0} for _ in settings]
    for seed, ids in enumerate(prompts):
        for _ in range(2):  # the first call of a prompt length compiles; time the second
            base = decode_once(model, params, ids, new_tokens, rules, max_len, seed)
        plain["rates"].append(len(base.tokens[0]) / base.decode_seconds)
        plain["tokens"].append(base.tokens[0])
        for g, (drafter, draft_params) in zip(got, settings, strict=True):
            for _ in range(2):
                out = decode_once(model, params, ids, new_tokens, rules, max_len, seed, drafter, draft_params)
            rate = len(out.tokens[0]) / out.decode_seconds
            g["rates"].append(rate)
            g["ratios"].append(rate / plain["rates"][-1])
            g["tokens"].append(out.tokens[0])
            g["accepted"], g["proposed"] = g["accepted"] + out.accepted_K, g["proposed"] + out.proposed_K
            g["rounds"] += out.rounds
    results = []
    for g in got:
        results.append({
            "tokens_per_s": statistics.median(g["rates"]),
            "speedup": statistics.median(g["ratios"]),
            "tokens": g["tokens"],
            "acceptance": np.round(g["accepted"] / np.maximum(g["proposed"], 1), 3).tolist(),
            "tokens_per_round": round(sum(map(len, g["tokens"])) / max(g["rounds"], 1), 2),
        })  # fmt: skip
    return {"tokens_per_s": statistics.median(plain["rates"]), "tokens": plain["tokens"]}, results


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
    settings = [("mtp", int(k), spec.MTPDrafter(run.model, int(k)), None) for k in filter(None, args.mtp_k.split(","))]
    if args.draft_workdir:
        draft_run, draft_params, _, _ = load_for_inference(args.draft_workdir)
        for k in filter(None, args.draft_k.split(",")):
            settings.append(("draft", int(k), spec.ModelDrafter(Transformer(draft_run.model), int(k)), draft_params))
    plain, results = measure(model, params, prompts, args.new_tokens, rules, max_len, [s[2:] for s in settings])
    for (mode, k, _, _), got in zip(settings, results, strict=True):
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
            "speedup": round(got["speedup"], 3),
        }
        if args.temperature == 0:
            row["same_tokens_as_plain"] = got["tokens"] == plain["tokens"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
