"""Merge a LoRA run's adapters into its base: a plain workdir (and a Hugging Face directory) with W + (alpha / rank) A B.

    python -m model.lora merge runs/lora runs/lora-merged                  # infer.py --workdir runs/lora-merged
    python -m model.lora merge runs/lora runs/lora-merged --hf hf/merged   # and from_pretrained("hf/merged")

A QLoRA run (model.lora.base_quant='nf4') merges into its dequantized base. Bad input prints one line and exits
with code 2; OUT is replaced (--overwrite) only once the new one is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.lora", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="a LoRA run -> a workdir with the adapters merged into the weights")
    merge.add_argument("workdir", help="the LoRA run (or one of its checkpoint directories)")
    merge.add_argument("out", help="the merged workdir to write")
    merge.add_argument("--hf", help="also write the merged model as a Hugging Face directory here")
    merge.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    from training.quantize import out_problem

    if problem := out_problem(args.out, args.workdir, args.overwrite, "merged"):
        fail(problem)
    out = pathlib.Path(args.out).expanduser().absolute()

    from model import lora
    from model.hf import HFError, check_writable
    from training import hf, quantize
    from training.checkpoint import CheckpointError, load_for_inference

    try:
        if args.hf:
            check_writable(args.hf)
        run, weights, tokenizer, step = load_for_inference(args.workdir, args.step)
    except (CheckpointError, HFError) as e:
        fail(str(e))
    if not run.model.lora.rank:
        fail(f"{args.workdir}: not a LoRA run (model.lora.rank=0); nothing to merge")
    merged = lora.merge(run.model, weights)
    trainable = tuple(p for p in run.train.trainable if p != lora.TRAINABLE)
    plain = dataclasses.replace(
        run, model=lora.base_config(run.model), train=dataclasses.replace(run.train, trainable=trainable)
    )
    staging = quantize.replace_dir(out, args.overwrite)
    quantize.write_workdir(staging, plain, merged, tokenizer, step)
    quantize.commit_dir(staging, out)
    print(f"wrote {args.out}: step {step} with the adapters merged (alpha / rank = {run.model.lora.scale:g})")
    if args.hf:
        try:
            family = hf.export(out, args.hf)
        except HFError as e:
            fail(str(e))
        print(f"wrote {args.hf} as {family.architecture}", file=sys.stderr)


if __name__ == "__main__":
    main()
