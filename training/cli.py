"""What train.py and infer.py share: one-line errors with an exit code, and absl flag parsing that uses them.

Imports no JAX, so a bad flag is answered at once.
"""

from __future__ import annotations

import sys

from absl import flags


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str], config_errors: tuple[type[Exception], ...] = ()) -> list[str]:
    """absl parsing, but a bad flag is one line and exit code 2, not a usage dump; so are the
    `config_errors` a --config file may raise while it loads."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except config_errors as e:
        fail(f"--config: {str(e).splitlines()[0]}")
