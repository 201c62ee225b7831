"""Train a language model from a config.

    python train.py --config configs/tiny.py --workdir runs/tiny --config.train.steps=500

Re-running the same command with the same workdir resumes from its latest complete checkpoint. SIGTERM
(preemption) finishes the current step, writes a checkpoint and exits with code 0.

Bad config values, data inputs or checkpoints print one line and exit with code 2; a diverged run
(non-finite loss) exits with code 1.
"""

from __future__ import annotations

import functools

from absl import app, flags, logging
from ml_collections import config_flags

from data import DataError
from training.checkpoint import CheckpointError
from training.cli import fail
from training.cli import parse_flags as parse_any_flags
from training.config import ConfigError, resolve
from training.loop import run_summary, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (a get_config(arg) module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the resolved config.")


# What a bad --config file or override raises while absl loads it.
CONFIG_ERRORS = (ValueError, KeyError, AttributeError, TypeError, FileNotFoundError)
parse_flags = functools.partial(parse_any_flags, config_errors=CONFIG_ERRORS)


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
        fail(str(e), code=1)
    print(run_summary(result))
    if result["preempted"]:
        print(f"preempted at step {result['step']}; re-run the same command to resume")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
