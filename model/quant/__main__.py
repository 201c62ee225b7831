"""Quantize a workdir's checkpoint into a new workdir, weights stored packed with their scales and zero points.

    python -m model.quant runs/tiny runs/tiny-int8 --quant int8                 # per output channel, RTN
    python -m model.quant runs/tiny runs/tiny-int4 --quant int4 --quant_group 128 --quant_method gptq --calib_batches 16
    python -m model.quant runs/tiny runs/tiny-awq --quant int4-zp --quant_method awq --calib_file some_text.txt
    python -m model.quant runs/qat runs/qat-int4                                # a QAT run: its train.qat scheme

infer.py, `python -m experiments.evaluate` and `python -m model.hf export` then load OUT like any workdir, without
recalibrating (`infer.py --quant` quantizes on load instead). Schemes: int8, int4 (ggml's q8_0 / q4_0 rules),
int8-zp, int4-zp (affine), nf4; groups 0 (per output channel), 32, 64, 128. --quant_skip globs keep matching
parameter paths in float (default: 'router'; e.g. --quant_skip embed --quant_skip head). Bad input prints one line
and exits with code 2; OUT is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.quant", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the run (or checkpoint directory) to quantize")
    parser.add_argument("out", help="the quantized workdir to write")
    parser.add_argument("--quant", help="scheme: int8 | int4 | int8-zp | int4-zp | nf4 (default: the run's train.qat)")
    parser.add_argument("--quant_group", type=int, help="input channels per scale: 0 (per channel), 32, 64, 128")
    parser.add_argument("--quant_method", default="rtn", help="rtn | gptq | awq")
    parser.add_argument("--calib_batches", type=int, default=0, help="calibration windows of the training corpus")
    parser.add_argument("--calib_file", help="calibrate on windows of this text file instead")
    parser.add_argument("--gptq_act_order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    parser.add_argument("--quant_skip", action="append", help="keep parameters matching this glob in float")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    from training.quantize import out_problem

    if problem := out_problem(args.out, args.workdir, args.overwrite, "quantized"):
        fail(problem)
    out = pathlib.Path(args.out).expanduser().absolute()
    from training import quantize as quantize_lib

    request = None
    if args.quant is not None:
        request = quantize_lib.Request(
            args.quant,
            args.quant_group,
            args.quant_method,
            args.calib_batches,
            args.calib_file,
            args.quant_skip,
            args.gptq_act_order,
        )
        for message in request.errors():
            fail(message)

    from model.quant.schemes import DEFAULT_GROUP, QuantError
    from training.checkpoint import CheckpointError, load_clips, load_for_inference

    try:
        run, weights, tokenizer, step = load_for_inference(args.workdir, args.step)
    except CheckpointError as e:
        fail(str(e))
    if request is None:
        request = quantize_lib.default_request(run)
        if request is None:
            fail("--quant: give a scheme (int8, int4, int8-zp, int4-zp, nf4); the run did not train with train.qat")
    try:
        clips = load_clips(args.workdir, step)  # a QAT run's learned clipping factors (None: it learned none)
        run, quantized = quantize_lib.quantize_run(run, weights, tokenizer, request, clips)
    except QuantError as e:
        fail(str(e))
    staging = quantize_lib.replace_dir(out, args.overwrite)
    quantize_lib.write_workdir(staging, run, quantized, tokenizer, step)
    quantize_lib.commit_dir(staging, out)
    q = run.quant
    group = q.group if q.group >= 0 else DEFAULT_GROUP[q.scheme]
    print(f"wrote {args.out}: step {step} as {q.scheme} (group {group or 'per channel'}, {q.method})", file=sys.stderr)


if __name__ == "__main__":
    main()
