"""Every fenced command of README.md and docs/*.md still works, so no example rots.

Each command of a ```bash block is checked without running it: its entry point exists (a script or a module of this
repository, or a tool the install provides), every `--flag` it passes is one that the entry point (or a repository
module it imports) defines, a `pip install -e ".[X]"` names extras pyproject.toml has, and a train.py command's
`--config FILE[:ARG]` with its `--config.key=value` overrides loads and passes training/config.py's validation. The
cheap one then runs end to end, with tiny step counts and a small corpus: README's main Quickstart command (train,
then sample). The other commands' behaviour is what the rest of the suite tests (e.g. tests/test_sampling.py runs
`infer.py --score`).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHONS = ("python", "python3", ".venv/bin/python", ".venv-torch/bin/python")
# Commands that set up an environment or use one; what they install is checked through pyproject.toml.
ENVIRONMENT = (".", "source", "tensorboard", "pip", "export")


def fenced_commands(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(`file:line`, argv) for each command of each ```bash block: continued lines joined, comments dropped,
    `a && b` split into two commands."""
    found, block, start = [], None, 0
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            if block is None and line.strip() == "```bash":
                block, start = [], number
            elif block is not None:
                text = "\n".join(block).replace("\\\n", " ")
                for offset, logical in enumerate(text.splitlines()):
                    words = shlex.split(logical, comments=True)
                    command: list[str] = []
                    for word in [*words, "&&"]:
                        if word in ("&&", ";", "||"):
                            if command:
                                found.append((f"{path.relative_to(REPO)}:{start + 1 + offset}", command))
                            command = []
                        else:
                            command.append(word)
                block = None
            continue
        if block is not None:
            block.append(line)
    return found


ALL = [(where, argv) for doc in DOCS for where, argv in fenced_commands(doc)]


def entry_point(argv: list[str]) -> tuple[pathlib.Path | None, list[str]]:
    """(the repository file a `python ...` command runs, its arguments), or (None, argv) for any other tool."""
    if argv[0] not in PYTHONS or argv[1] == "-c":
        return None, argv
    if argv[1] == "-m":
        module = REPO / argv[2].replace(".", "/")
        if not module.is_dir() and not module.with_suffix(".py").is_file():  # an installed tool: pytest, venv
            assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]} is installed"
            return None, argv
        return (module / "__main__.py" if module.is_dir() else module.with_suffix(".py")), argv[3:]
    return REPO / argv[1], argv[2:]


@functools.cache
def defined_flags(path: pathlib.Path) -> frozenset[str]:
    """Flag names that `path` and the repository modules it imports (transitively) define with absl or argparse."""
    seen, names, todo = set(), set(), [path]
    while todo:
        file = todo.pop()
        if file in seen or not file.is_file():
            continue
        seen.add(file)
        source = file.read_text()
        names |= set(re.findall(r"DEFINE_\w+\(\s*['\"](\w+)['\"]", source))
        names |= set(re.findall(r"add_argument\(\s*['\"]--([\w-]+)['\"]", source))
        for node in ast.walk(ast.parse(source)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for module in modules:
                base = REPO / module.replace(".", "/")
                todo += [base.with_suffix(".py"), base / "__init__.py"]
    return frozenset(names | {"help", "helpfull", "config"})


def flag_names(args: list[str]) -> list[str]:
    """The `--name` of every flag in `args` (absl's `--noname` form included), config overrides left out."""
    names = []
    for arg in args:
        if arg.startswith("--") and not arg.startswith("--config."):
            name = arg[2:].split("=", 1)[0]
            names.append(name)
    return names


def test_the_docs_have_commands_and_readme_stays_short():
    assert len(ALL) > 40, len(ALL)
    assert len((REPO / "README.md").read_text().splitlines()) < 200


@pytest.mark.parametrize("where,argv", ALL, ids=[w for w, _ in ALL])
def test_each_command_names_an_entry_point_and_flags_that_exist(where, argv):
    if argv[0] == "pip":
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in argv[2:]:
            for extra in re.findall(r"\[([\w,-]+)\]", spec):
                assert set(extra.split(",")) <= set(extras), f"{where}: {spec}: extras are {sorted(extras)}"
        return
    script, args = entry_point(argv)
    if script is None:
        assert argv[0] in (*PYTHONS, *ENVIRONMENT), f"{where}: unknown tool {argv[0]!r}"
        return
    assert script.is_file(), f"{where}: {script.relative_to(REPO)} does not exist"
    known = defined_flags(script)
    for name in flag_names(args):
        plain = name[2:] if name.startswith("no") and name[2:] in known else name
        assert plain in known, f"{where}: {script.relative_to(REPO)} defines no --{name}"


TRAIN = [(w, a) for w, a in ALL if entry_point(a)[0] == REPO / "train.py"]


@pytest.mark.parametrize("where,argv", TRAIN, ids=[w for w, _ in TRAIN])
def test_each_train_command_config_validates(where, argv):
    """`--config FILE[:ARG]` plus its overrides, as train.py parses them, passes training/config.py's checks.
    Configs that an earlier command writes (e.g. runs/llama/config.py) are not in the repository: skipped."""
    from absl import flags
    from ml_collections import config_flags

    from training.cli import ConfigFileParser
    from training.config import resolve

    args = entry_point(argv)[1]
    path = next((args[i + 1] for i, a in enumerate(args) if a == "--config"), "configs/tiny.py")
    if not (REPO / path.split(":")[0]).is_file():
        pytest.skip(f"{path} is written by an earlier command")
    argv = ["train.py", "--config", path, *(a for a in args if a.startswith("--config."))]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values["config"].parser = ConfigFileParser("config")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        values(argv)
    finally:
        os.chdir(cwd)
    resolve(values.config)


@pytest.mark.slow(25)
def test_the_quickstart_trains_then_samples(tmp_path):
    """README's first Quickstart command after its install step: train (3 steps on a small corpus), then sample."""
    from tests import golden

    quickstart = next(a for w, a in ALL if w.startswith("README.md") and "train.py" in a)
    workdir = str(tmp_path / "runs" / "tiny")
    corpus = golden.write_corpus(tmp_path / "corpus")
    tiny = ["--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.eval_every=3", "--config.train.eval_batches=1",
            "--config.train.sample_tokens=0", f"--config.data.corpus={corpus}", "--config.train.peak_flops=1e12"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(argv):
        argv = [sys.executable, *[workdir if a == "runs/tiny" else a for a in argv[1:]]]
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    assert quickstart[:2] == ["python", "train.py"], quickstart
    run(quickstart + tiny)
    sample = next(a for w, a in ALL if w.startswith("README.md") and "infer.py" in a)
    max_new = sample.index("--max_new_tokens")
    out = run(sample[: max_new + 1] + ["5"] + sample[max_new + 2 :])
    assert out.startswith("def fib(n):"), out
