"""eval/bpb of a trained run's weights quantized every way: float32 against each scheme and group by round to
nearest, GPTQ and AWQ, all on the same held-out batches (the run's eval set), calibrated on the same windows of its
training corpus.

    python -m benchmarks.quant_bpb --workdir runs/bench_10m [--calib_batches 8] [--eval_batches 16]

Prints a markdown table (bpb and its change against float32 per cell, and the seconds each quantization took) and
one JSON line. QAT is `benchmarks/qat_vs_ptq.py`'s (it needs its own training run).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

import data as data_lib
from model import Transformer
from model.quant import calibrated
from model.quant.params import check
from model.quant.schemes import Spec
from training import evaluation
from training.checkpoint import load_for_inference

ROWS = [("int8", 0), ("int8-zp", 0), ("int4", 32), ("int4", 128), ("int4-zp", 128), ("nf4", 64)]
METHODS = ("rtn", "gptq", "awq")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--calib_batches", type=int, default=8, help="batches of train.batch_size windows")
    parser.add_argument("--eval_batches", type=int, default=0, help="0: the run's train.eval_batches")
    parser.add_argument("--rows", default=",".join(f"{s}:{g}" for s, g in ROWS), help="scheme:group,...")
    args = parser.parse_args()

    run, weights, tokenizer, step = load_for_inference(args.workdir)
    specs = []
    for row in args.rows.split(","):  # every row checked before any work: one line and exit 2 for a bad one
        scheme, _, group = row.partition(":")
        try:
            specs.append(Spec(scheme, int(group)))
            check(run.model, specs[-1])
        except ValueError as e:  # QuantError is one
            print(f"error: --rows {row!r}: {e} (rows are scheme:group, e.g. int4:32)", file=sys.stderr)
            sys.exit(2)
    t = run.train
    batches = data_lib.load(run.data, pathlib.Path(args.workdir)).validation_batches(
        t.batch_size, args.eval_batches or t.eval_batches
    )
    calib = data_lib.calibration_windows(run.data, tokenizer, args.calib_batches * t.batch_size)
    inputs = evaluation.Inputs(eod_id=tokenizer.eod_id if run.data.document_mask else None)
    eval_step = jax.jit(evaluation.make_eval_step(Transformer(run.model), tokenizer.token_bytes, inputs))

    def bpb(w) -> float:
        params, state = evaluation.split_weights(w)
        return evaluation.evaluate(eval_step, params, batches, state)["eval/bpb"]

    base = bpb(weights)
    tokens = sum(int(b["mask"].sum()) for b in batches)
    print(f"{args.workdir} step {step}: {tokens} eval tokens, calibration {calib.shape[0]} x {calib.shape[1]} tokens")
    print(f"| weights | {' | '.join(METHODS)} |")
    print("| --- |" + " --- |" * len(METHODS))
    print(f"| float32 | {base:.4f} |" + " |" * (len(METHODS) - 1))
    result = {"workdir": args.workdir, "step": step, "float32": base, "rows": {}}
    for spec in specs:
        cells, figures = [], {}
        for method in METHODS:
            start = time.perf_counter()
            quantized = calibrated.quantize(run.model, weights, spec, method, calib)
            seconds = time.perf_counter() - start
            value = bpb(quantized)
            figures[method] = {"bpb": value, "seconds": seconds}
            cells.append(f"{value:.4f} ({100 * (value / base - 1):+.2f}%, {seconds:.0f} s)")
        name = f"{spec.scheme} {'per channel' if spec.group_size == 0 else f'g{spec.group_size}'}"
        print(f"| {name} | {' | '.join(cells)} |", flush=True)
        result["rows"][name] = figures
    print(json.dumps(result))


if __name__ == "__main__":
    main()
