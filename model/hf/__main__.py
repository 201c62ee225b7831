"""Hugging Face checkpoints to and from workdirs.

    python -m model.hf import HF_DIR --workdir runs/llama   # then: infer.py --workdir runs/llama, or
                                                            # train.py --config runs/llama/config.py ...
    python -m model.hf export runs/tiny OUT_DIR [--step N]  # transformers' from_pretrained(OUT_DIR) loads it

Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a Hugging Face directory -> a workdir")
    imp.add_argument("hf_dir")
    imp.add_argument("--workdir", required=True)
    imp.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="params dtype (default: config.json's)"
    )
    exp = commands.add_parser("export", help="a workdir's checkpoint -> a Hugging Face directory")
    exp.add_argument("workdir")
    exp.add_argument("out_dir")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    args = parser.parse_args(argv)

    from data import DataError
    from model.hf import HFError
    from training import hf
    from training.checkpoint import CheckpointError
    from training.config import ConfigError

    try:
        if args.command == "import":
            run = hf.import_dir(args.hf_dir, args.workdir, args.dtype)
            print(f"imported {args.hf_dir} into {args.workdir} ({run.model.num_layers} layers)", file=sys.stderr)
        else:
            family = hf.export(args.workdir, args.out_dir, args.step)
            print(f"exported {args.workdir} to {args.out_dir} as {family.architecture}", file=sys.stderr)
    except (HFError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
