"""What the entry points share: one-line errors with an exit code, absl flag parsing that uses them, a
--config flag whose every failure is one line, and checks of the files a run will read or write.

Imports no JAX, so a bad flag is answered at once.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import pathlib
import sys
import traceback

from absl import flags
from ml_collections import config_flags


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """`e`'s message on one line; a KeyError's own text, not the repr that str() gives it (ml_collections
    also wraps KeyErrors in AttributeErrors)."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    message = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(e).__name__


def where(e: BaseException) -> str:
    """'file:line: Type: message' of the deepest frame of `e` outside installed packages (a config file
    or a helper it calls), or of the offending line for a SyntaxError."""
    if isinstance(e, SyntaxError):
        return f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "-packages" not in f.filename]
    frames = frames or traceback.extract_tb(e.__traceback__)
    place = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{place}{type(e).__name__}: {one_line(e)}"


class ConfigFileParser(flags.ArgumentParser):
    """Loads `file.py[:arg]` as ml_collections does (`get_config(arg)`), but a missing file, a syntax error
    or an exception in get_config is a one-line ValueError naming the file and the line, raised at once
    (ml_collections defers a missing file and puts a whole traceback into the message)."""

    def __init__(self, name: str, lock_config: bool = True):
        self.name, self.lock_config = name, lock_config

    def flag_type(self) -> str:
        return "config object"

    def parse(self, path: str):
        file, *arg = path.split(":", 1)
        if not pathlib.Path(file).is_file():
            raise ValueError(f"{file!r}: no such config file")
        try:
            loader = importlib.machinery.SourceFileLoader(f"{self.name}_config", file)
            module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
            loader.exec_module(module)
        except Exception as e:
            raise ValueError(where(e)) from None
        if not callable(getattr(module, "get_config", None)):
            raise ValueError(f"{file}: defines no get_config(arg) function")
        try:
            config = module.get_config(*arg)
        except Exception as e:
            raise ValueError(where(e)) from None
        if config is None:
            raise ValueError(f"{file}: get_config() returned None (a missing return?)")
        if self.lock_config and callable(getattr(config, "lock", None)):
            config.lock()
        return config


def define_config_file(name: str, default: str, help_string: str) -> flags.FlagHolder:
    """config_flags.DEFINE_config_file (with `--NAME.field=value` overrides) using ConfigFileParser."""
    holder = config_flags.DEFINE_config_file(name, None, help_string)
    flags.FLAGS[name].parser = ConfigFileParser(name)
    try:
        flags.FLAGS.set_default(name, default)  # parsed now (with its overrides) only when --NAME is not given
    except flags.Error as e:
        fail(one_line(e))
    except CONFIG_ERRORS as e:
        fail(override_error(e, sys.argv))
    return holder


# What a --config override of an unknown or mistyped field raises while absl parses it.
CONFIG_ERRORS = (ValueError, KeyError, AttributeError, TypeError)


def parse_flags(argv: list[str], config_errors: tuple[type[Exception], ...] = CONFIG_ERRORS) -> list[str]:
    """absl parsing, but a bad flag is one line and exit code 2, not a usage dump; so are the
    `config_errors` a --config override may raise."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(one_line(e))
    except config_errors as e:
        fail(override_error(e, argv))


def override_error(e: Exception, argv: list[str]) -> str:
    """The line for an exception from a --config.field=value override: an unknown field names the flag."""
    message = one_line(e)
    key = message.split(";")[0].strip("'\"")
    overrides = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--") and f".{key}" in a]
    if isinstance(e, (KeyError, AttributeError)) and overrides:
        return f"--{overrides[0]}: unknown field {message}"
    return f"--config: {message}"


def read_text(path: str, flag: str) -> str:
    """The file as UTF-8 text; one line and exit 2 when it cannot be read or is not UTF-8."""
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fail(f"{flag}={path!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")
    except OSError as e:
        fail(f"{flag}={path!r}: cannot read it ({e.strerror or one_line(e)})")


def check_new_file(path: str | os.PathLike, flag: str) -> None:
    """Refuses to overwrite an existing file (nothing already on disk is lost)."""
    if pathlib.Path(path).exists():
        fail(f"{flag}={str(path)!r}: already exists; remove it or choose another path")
