"""Side by side: our train step vs Hugging Face LlamaForCausalLM (PyTorch) on the same model, same CPU.

    python benchmarks/vs_torch.py --config configs/bench_10m.py --vocab 8192 --rounds 3 \
        --torch_python .venv-torch/bin/python

Alternates the two benchmarks `--rounds` times (so machine noise hits both alike) and prints
the median tokens/s of each, their ratio, and our MFU against the measured matmul peak.
The torch side needs its own environment: `pip install torch==2.13.0 transformers`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_10m.py")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--torch_python", default=".venv-torch/bin/python")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parent))
    from benchmarks.throughput import load_config  # the config both sides build from

    run = load_config(args.config, args.vocab)
    m, d, t = run.model, run.data, run.train
    torch_cmd = [
        args.torch_python, str(HERE / "torch_llama.py"), "--json", "--steps", str(args.steps),
        "--d_model", str(m.d_model), "--num_layers", str(m.num_layers), "--num_heads", str(m.num_heads),
        "--num_kv_heads", str(m.num_kv_heads), "--d_ff", str(m.d_ff), "--vocab", str(args.vocab),
        "--seq_len", str(d.seq_len), "--batch", str(t.batch_size),
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
    results: dict[str, list[dict]] = {"jax": [], "torch": []}
    for r in range(args.rounds):
        for name, cmd in (("jax", ours_cmd), ("torch", torch_cmd)):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent)
            results[name].append(last_json(proc.stdout))
            print(f"round {r + 1} {name}: {results[name][-1]['tokens_per_sec']:,.0f} tokens/s", flush=True)

    jax_tps = statistics.median(x["tokens_per_sec"] for x in results["jax"])
    torch_tps = statistics.median(x["tokens_per_sec"] for x in results["torch"])
    summary = {
        "config": args.config,
        "jax_tokens_per_sec": jax_tps,
        "torch_tokens_per_sec": torch_tps,
        "ratio_jax_over_torch": jax_tps / torch_tps,
        "jax_mfu": statistics.median(x["mfu"] for x in results["jax"]),
        "matmul_peak_gflops": statistics.median(x["matmul_peak_gflops"] for x in results["jax"]),
        "torch_mfu": statistics.median(
            x["tokens_per_sec"] * results["jax"][0]["flops_per_token"] / (j["matmul_peak_gflops"] * 1e9)
            for x, j in zip(results["torch"], results["jax"])
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
