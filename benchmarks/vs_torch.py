"""Side by side: our train step vs Hugging Face LlamaForCausalLM (PyTorch) on the same model, same CPU.

    python benchmarks/vs_torch.py --config configs/bench_10m.py --vocab 8192 --rounds 3 \
        --torch_python .venv-torch/bin/python

Alternates the two benchmarks `--rounds` times (so machine noise hits both alike) and prints
the median tokens/s of each, their ratio, and our MFU against the measured matmul peak.
The torch side needs its own environment: `pip install torch==2.13.0 transformers`.

An MoE config (model.mlp='moe', softmax router) runs against `MixtralForCausalLM` with the same experts; add
`--dense_config configs/tiny.py` for a third arm: our dense model (e.g. with the same active params).

    python benchmarks/vs_torch.py --config configs/ablations/moe.py --vocab 257 --dense_config configs/tiny.py \
        --torch_python /work/main/.venv/bin/python

Our side sets glibc's allocator up as train.py does (training/allocator.py); PyTorch runs with glibc's defaults,
as its users get it. `--torch_same_malloc` adds a third arm each round: PyTorch with our allocator settings (as
environment variables), so the ratio can be read both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def mixtral_flags(m) -> dict[str, str]:
    """MixtralForCausalLM with our experts: each of width d_ff_expert."""
    e = m.moe
    return {
        "--d_ff": str(e.d_ff_of(m)),
        "--num_experts": str(e.num_experts),
        "--top_k": str(e.top_k),
        "--aux_loss_weight": str(e.aux_loss_weight),
    }


# torch_llama.py's flags for our MLP kind (model.mlp), over the dense SwiGLU ones; a kind not here runs as SwiGLU.
TORCH_MLP_FLAGS = {"moe": mixtral_flags}


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_10m.py")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--torch_python", default=".venv-torch/bin/python")
    parser.add_argument("--dense_config", default="", help="also time our model on this config (e.g. dense)")
    parser.add_argument("--torch_same_malloc", action="store_true", help="also time PyTorch with our malloc settings")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.throughput import load_config  # the config both sides build from
    from training.allocator import environment

    run = load_config(args.config, args.vocab)
    m, d, t = run.model, run.data, run.train
    flags = {
        "--steps": str(args.steps), "--d_model": str(m.d_model), "--num_layers": str(m.num_layers),
        "--num_heads": str(m.num_heads), "--num_kv_heads": str(m.num_kv_heads), "--d_ff": str(m.d_ff),
        "--vocab": str(args.vocab), "--seq_len": str(d.seq_len), "--batch": str(t.batch_size),
    }  # fmt: skip
    if m.mlp in TORCH_MLP_FLAGS:
        flags |= TORCH_MLP_FLAGS[m.mlp](m)
    torch_cmd = [
        args.torch_python, str(HERE / "torch_llama.py"), "--json", *(x for flag in flags.items() for x in flag),
        *(["--tie_embeddings"] if m.tie_embeddings else []),
    ]  # fmt: skip
    ours_cmd = [
        sys.executable,
        str(HERE / "throughput.py"),
        "--config",
        args.config,
        "--vocab",
        str(args.vocab),
        "--steps",
        str(args.steps),
    ]
    arms = {"jax": (ours_cmd, None), "torch": (torch_cmd, None)}
    if args.dense_config:
        dense_cmd = [*ours_cmd]
        dense_cmd[dense_cmd.index("--config") + 1] = args.dense_config
        arms["jax_dense"] = (dense_cmd, None)
    if args.torch_same_malloc:
        arms["torch_same_malloc"] = (torch_cmd, {**os.environ, **environment()})
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name, (cmd, env) in arms.items():
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent, env=env)
            results[name].append(last_json(proc.stdout))
            print(f"round {r + 1} {name}: {results[name][-1]['tokens_per_sec']:,.0f} tokens/s", flush=True)

    tokens_per_sec = {name: statistics.median(x["tokens_per_sec"] for x in rows) for name, rows in results.items()}
    peak = statistics.median(x["matmul_peak_gflops"] for x in results["jax"]) * 1e9
    summary = {
        "config": args.config,
        **{f"{name}_tokens_per_sec": tps for name, tps in tokens_per_sec.items()},
        "ratio_jax_over_torch": tokens_per_sec["jax"] / tokens_per_sec["torch"],
        "jax_mfu": statistics.median(x["mfu"] for x in results["jax"]),
        "matmul_peak_gflops": peak / 1e9,
        "torch_mfu": tokens_per_sec["torch"] * results["jax"][0]["flops_per_token"] / peak,
    }
    if args.dense_config:
        summary["dense_config"] = args.dense_config
        summary["ratio_jax_over_jax_dense"] = tokens_per_sec["jax"] / tokens_per_sec["jax_dense"]
    if args.torch_same_malloc:
        summary["ratio_jax_over_torch_same_malloc"] = tokens_per_sec["jax"] / tokens_per_sec["torch_same_malloc"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
