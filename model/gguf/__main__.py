"""GGUF files (llama.cpp's format) from workdirs or Hugging Face directories.

    python -m model.gguf export runs/tiny OUT.gguf --type q8_0 [--step N] [--overwrite]
    python -m model.gguf export --hf_dir HF_DIR OUT.gguf --type f16

--type: f16, q8_0 or q4_0 (model/gguf/__init__.py says what each stores). Bad input prints one line and exits with
code 2 before anything is written; an existing OUT is only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see python -m model.gguf export --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    from model.gguf import TYPES

    parser = _Parser(prog="python -m model.gguf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    exp = commands.add_parser("export", help="a workdir's checkpoint or a Hugging Face directory -> a .gguf file")
    exp.add_argument("workdir", nargs="?", help="the run to export (or --hf_dir)")
    exp.add_argument("out", help="the .gguf file to write")
    exp.add_argument("--hf_dir", help="a Hugging Face model directory to export instead of a workdir")
    exp.add_argument("--type", required=True, choices=tuple(TYPES), help="how matrices are stored")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.hf_dir is None):
        parser.error("give either a workdir or --hf_dir")
    if args.hf_dir is not None and args.step is not None:
        parser.error("--step is for a workdir's checkpoints, not --hf_dir")

    from data import DataError
    from model.gguf import GGUFError
    from model.hf import HFError
    from training import gguf
    from training.checkpoint import CheckpointError
    from training.config import ConfigError

    source = args.hf_dir or args.workdir
    try:
        written = gguf.export(args.out, args.type, workdir=args.workdir, hf_dir=args.hf_dir, step=args.step,
                              overwrite=args.overwrite)  # fmt: skip
    except (GGUFError, HFError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {source} to {args.out} ({written})", file=sys.stderr)


if __name__ == "__main__":
    main()
