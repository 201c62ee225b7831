"""Train a language model from a config.

    python train.py --config configs/tiny.py --workdir runs/tiny --config.train.steps=500

Re-running the same command with the same workdir resumes from its latest complete checkpoint. SIGTERM
(preemption) finishes the current step, writes a checkpoint and exits with code 0.

Bad config values, data inputs or checkpoints print one line and exit with code 2; a diverged run
(non-finite loss) exits with code 1.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from data import DataError
from training.checkpoint import CheckpointError
from training.config import ConfigError, resolve
from training.loop import run_summary, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (a get_config(arg) module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the resolved config.")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad flag or override is one line and exit code 2, not a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except (ValueError, KeyError, AttributeError, TypeError, FileNotFoundError) as e:
        fail(f"--config: {str(e).splitlines()[0]}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        fail("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        run = resolve(_CONFIG.value)
        result = train(run, _WORKDIR.value)
    except (ConfigError, DataError, CheckpointError) as e:
        fail(str(e))
    except FloatingPointError as e:  # a diverged run: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(run_summary(result))
    if result["preempted"]:
        print(f"preempted at step {result['step']}; re-run the same command to resume")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
