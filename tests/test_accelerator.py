"""benchmarks/accelerator.py --smoke, as a GPU machine would run it (a subprocess from the repo root, without the
packages a bare jax/flax/optax/orbax image lacks): every stage at toy sizes on CPU, so the one command lent GPU time
depends on never rots. Checks what it writes, not its figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

STAGES = ("kernels", "attention", "decode", "training", "grouped_matmul")
KEYS = {  # what identifies a row of each stage
    "kernels": {"case"},
    "attention": {"T", "D", "batch", "impl"},
    "decode": {"batch", "context", "impl"},
    "training": {"config", "attention_impl"},
    "grouped_matmul": {"mode", "impl", "groups", "shape"},
}
# Runs the script with these top-level packages hidden, as if not installed.
HIDING = """
import runpy, sys

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] in HIDDEN else self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)

HIDDEN = set(sys.argv[1].split(","))
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
sys.argv = ["benchmarks/accelerator.py", *sys.argv[2:]]
runpy.run_path("benchmarks/accelerator.py", run_name="__main__")
"""
# What an image with jax, flax, optax, orbax and tensorstore lacks (and the script must not need).
# ml_collections is carried as a wheel (docs/accelerators.md).
NOT_ON_A_GPU_IMAGE = ("grain", "tokenizers", "tqdm", "tensorboardX", "safetensors", "torch")


def run_without(hidden, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", HIDING, ",".join(hidden), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


FIGURES = {  # what a row that ran must carry
    "kernels": {"passed"},
    "attention": {"fwd_tflops", "fwd_bwd_tflops", "fwd_ms", "fwd_bwd_ms"},
    "decode": {"step_ms", "cache_gb_per_s"},
    "training": {"ran", "mfu", "step_s", "tokens_per_s", "loss"},
    "grouped_matmul": {"tflops", "ms", "vs_dense"},
}


@pytest.mark.slow(90)
def test_the_smoke_run_writes_every_stage_with_figures_or_reasons(tmp_path):
    out = tmp_path / "out"
    result = run_without(NOT_ON_A_GPU_IMAGE, "--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "accelerator.json").read_text())
    assert data["smoke"] and data["platform"] == "cpu" and data["device"] and data["jax"]
    assert set(data["stages"]) == set(STAGES)
    for stage, rows in data["stages"].items():
        assert rows, stage
        for row in rows:
            assert KEYS[stage] <= set(row), (stage, row)
            assert "failed" not in row, (stage, row)
            if "skipped" in row:
                assert isinstance(row["skipped"], str) and row["skipped"], (stage, row)
                continue
            assert FIGURES[stage] <= set(row), (stage, row)
            numbers = [v for v in row.values() if isinstance(v, int | float) and not isinstance(v, bool)]
            assert all(math.isfinite(v) for v in numbers), (stage, row)
        assert any("skipped" not in row for row in rows), f"{stage}: nothing ran"

    kernels = data["stages"]["kernels"]
    assert all(r["passed"] for r in kernels if "skipped" not in r)
    assert {r["case"].split("/")[0] for r in kernels if "skipped" not in r} == {"flash", "decode"}
    assert all(r["case"].startswith("cudnn/") for r in kernels if "skipped" in r)  # no GPU: cuDNN only is skipped
    trained = {(r["config"], r["ran"]) for r in data["stages"]["training"] if "mfu" in r}
    assert {("llama_1b", "xla"), ("llama_1b", "pallas")} <= trained
    assert {c for c, _ in trained} == {"llama_1b", "llama_1b_moe", "llama_1b_mla"}
    assert data["auto_order"]["order"][-1] == "xla"
    assert len(data["skipped"]) == sum("skipped" in r for rows in data["stages"].values() for r in rows)
    assert data["failed"] == []

    md = (out / "accelerator.md").read_text()
    for heading in ("### 1. Kernels", "### 2. Attention", "### 2. Decode", "### 3. Training", "### 4. MoE grouped"):
        assert heading in md
    assert "| flash/gqa2-window-softcap-dv | True |" in md
    assert f"wrote {out / 'accelerator.json'}" in result.stdout


def test_a_missing_requirement_is_said_in_one_line(tmp_path):
    result = run_without(("optax",), "--smoke", "--out", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("missing: optax (pip install them; docs/accelerators.md")
