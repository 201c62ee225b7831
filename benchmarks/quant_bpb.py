"""eval/bpb of a trained run's weights quantized every way: float32 against each scheme and group by round to
nearest, GPTQ and AWQ, all on the same held-out batches (the run's eval set), calibrated on the same windows of its
training corpus.

    python -m benchmarks.quant_bpb --workdir runs/bench_10m [--calib_batches 8] [--eval_batches 16]
    python -m benchmarks.quant_bpb --workdir runs/bench_10m --rows int4:32 --qat runs/bench_10m_qat

Prints a markdown table (bpb and its change against float32 per cell, and the seconds each quantization took) and
one JSON line. QAT needs its own training run (`benchmarks/qat_vs_ptq.py`, or train.py with `train.qat`); `--qat W`
scores such a run's checkpoint, quantized exactly as it trained, on the same held-out windows, and compares it with
each PTQ method of its scheme by a paired bootstrap over the windows (experiments/bootstrap.py): the bpb difference
QAT minus PTQ with its 95% interval, a star where the interval excludes zero. The windows are the resampled unit,
each scored by both weights, so the interval is the spread a new draw of held-out text would give; it leaves out how
much another QAT run (another seed or data order) would move.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

import data as data_lib
from experiments.bootstrap import paired_bootstrap
from model import Transformer
from model.quant import calibrated
from model.quant.params import check, clipped, quantize_params
from model.quant.schemes import Spec
from training import evaluation
from training.checkpoint import CheckpointError, load_clips, load_for_inference
from training.qat import spec_of

ROWS = [("int8", 0), ("int8-zp", 0), ("int4", 32), ("int4", 128), ("int4-zp", 128), ("nf4", 64)]
METHODS = ("rtn", "gptq", "awq")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--calib_batches", type=int, default=8, help="batches of train.batch_size windows")
    parser.add_argument("--eval_batches", type=int, default=0, help="0: the run's train.eval_batches")
    parser.add_argument("--rows", default=",".join(f"{s}:{g}" for s, g in ROWS), help="scheme:group,...")
    parser.add_argument("--qat", default="", help="a QAT run's workdir (train.qat) of the same model, to compare")
    args = parser.parse_args()

    run, weights, tokenizer, step = load_or_exit("--workdir", args.workdir)
    specs = []
    for row in args.rows.split(","):  # every row checked before any work: one line and exit 2 for a bad one
        scheme, _, group = row.partition(":")
        try:
            specs.append(Spec(scheme, int(group)))
            check(run.model, specs[-1])
        except ValueError as e:  # QuantError is one
            print(f"error: --rows {row!r}: {e} (rows are scheme:group, e.g. int4:32)", file=sys.stderr)
            sys.exit(2)
    qat = load_qat(args.qat, run, tokenizer) if args.qat else None
    if qat is not None:  # its scheme's PTQ rows, with its skip patterns, are what it is compared with
        specs = [s for s in specs if row_name(s) != row_name(qat["spec"])] + [qat["spec"]]
    t = run.train
    batches = data_lib.load(run.data, pathlib.Path(args.workdir)).validation_batches(
        t.batch_size, args.eval_batches or t.eval_batches
    )
    calib = data_lib.calibration_windows(run.data, tokenizer, args.calib_batches * t.batch_size)
    inputs = evaluation.Inputs(eod_id=tokenizer.eod_id if run.data.document_mask else None)
    model = Transformer(run.model)
    eval_step = jax.jit(evaluation.make_eval_step(model, tokenizer.token_bytes, inputs, per_window=True))
    windows: dict = {}  # (row name, method) -> each window's bits over the mean window's bytes (they average to bpb)

    def bpb(w, key=None) -> float:
        params, state = evaluation.split_weights(w)
        nll_W, bytes_W = evaluation.window_scores(eval_step, params, batches, state)
        if key is not None:
            windows[key] = nll_W / np.log(2) / bytes_W.mean()
        return float(nll_W.sum() / np.log(2) / bytes_W.sum())

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
            value = bpb(quantized, (row_name(spec), method))
            figures[method] = {"bpb": value, "seconds": seconds}
            cells.append(f"{value:.4f} ({100 * (value / base - 1):+.2f}%, {seconds:.0f} s)")
        print(f"| {row_name(spec)} | {' | '.join(cells)} |", flush=True)
        result["rows"][row_name(spec)] = figures
    if qat is not None:
        result["qat"] = compare_qat(qat, bpb(qat["weights"], (row_name(qat["spec"]), "qat")), windows, base)
    print(json.dumps(result))


def row_name(spec: Spec) -> str:
    return f"{spec.scheme} {'per channel' if spec.group_size == 0 else f'g{spec.group_size}'}"


def load_or_exit(flag: str, workdir: str):
    """load_for_inference(workdir), or one line naming the flag and exit 2 where it holds no checkpoint."""
    try:
        return load_for_inference(workdir)
    except CheckpointError as e:
        print(f"error: {flag} {workdir!r}: {e}", file=sys.stderr)
        sys.exit(2)


def load_qat(workdir: str, run, tokenizer) -> dict:
    """A QAT run's checkpoint quantized as it trained (its scheme, group and learned clipping factors), after
    checking it is the same model and tokenizer as the PTQ rows'; exit 2 with one line otherwise."""
    qat_run, weights, qat_tokenizer, step = load_or_exit("--qat", workdir)
    spec = spec_of(qat_run.train.qat)
    problem = (
        "its train.qat.scheme is empty (not a QAT run)"
        if spec is None
        else "its model config differs from --workdir's"
        if qat_run.model != run.model
        else "its tokenizer differs from --workdir's"
        if list(qat_tokenizer.token_bytes) != list(tokenizer.token_bytes)
        else ""
    )
    if problem:
        print(f"error: --qat {workdir!r}: {problem}", file=sys.stderr)
        sys.exit(2)
    check(run.model, spec)
    clips = load_clips(workdir, step)
    quantizer = None if clips is None else clipped(spec, clips)
    return {
        "workdir": workdir,
        "step": step,
        "spec": spec,
        "weights": quantize_params(run.model, weights, spec, quantizer),
    }


def compare_qat(qat: dict, value: float, windows: dict, base: float) -> dict:
    """Prints QAT's bpb and, per PTQ method of its scheme, QAT minus PTQ with its paired-bootstrap interval."""
    name = row_name(qat["spec"])
    print(f"QAT {qat['workdir']} step {qat['step']}, quantized {name}: {value:.4f} ({100 * (value / base - 1):+.2f}%)")
    print("| QAT minus | bpb difference [95% interval] |")
    print("| --- | --- |")
    out = {"workdir": qat["workdir"], "step": qat["step"], "scheme": name, "bpb": value, "minus": {}}
    for method in METHODS:
        d = paired_bootstrap(windows[(name, method)], windows[(name, "qat")])
        print(f"| {method} | {d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{' *' if d.excludes_zero else ''} |")
        out["minus"][method] = {"difference": d.difference, "low": d.low, "high": d.high}
    return out


if __name__ == "__main__":
    main()
