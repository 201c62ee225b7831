"""pass@k (experiments/passk.py): the estimator equals enumeration of every k-subset; the sandbox fails every way a
program can go wrong (and an early exit), kills what a timed-out program started, and keeps going; the problem set's
canonical solutions pass; the lm-eval task loads from any directory and scores all repeats of a fake model."""

from __future__ import annotations

import collections
import itertools
import json
import pathlib
import time

import pytest

from experiments import passk
from tests.conftest import REPO

TASK_DIR = REPO / "experiments" / "eval_tasks"
PROBLEMS = [json.loads(line) for line in (TASK_DIR / "pass_at_k_stdlib" / "problems.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "n, c, k", [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 5, 2), (5, 2, 4), (6, 2, 3), (10, 3, 1), (10, 3, 5), (8, 1, 8)]
)
def test_estimator_matches_enumeration(n: int, c: int, k: int):
    """Samples 0..c-1 are the correct ones; pass@k is the share of k-subsets holding one of them."""
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(i < c for i in subset) for subset in subsets) / len(subsets)
    assert passk.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "n, c, k, named", [(0, 0, 1, "n=0"), (5, 6, 1, "c=6"), (5, -1, 1, "c=-1"), (5, 2, 0, "k=0"), (5, 2, 6, "k=6")]
)
def test_estimator_rejects_bad_counts(n: int, c: int, k: int, named: str):
    with pytest.raises(ValueError, match=named):
        passk.pass_at_k(n, c, k)


def _alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie nobody reaped counts as dead)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_sandbox_fails_what_goes_wrong_and_keeps_going():
    good = "def f(x):\n    return x + 1\n\nassert f(1) == 2\n"
    cases = [
        (good, "passed", ""),
        ("assert 1 + 1 == 3\n", "failed", "AssertionError"),
        ("{}['missing']\n", "failed", "KeyError"),
        ("import sys\nsys.exit(0)\nassert False\n", "exit", "code 0"),
        ("import os\nos._exit(0)\n", "exit", "code 0"),
        ("x = bytearray(1 << 30)\n", "failed", "MemoryError"),  # 1 GiB against a 256 MiB limit
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "failed", "network access is disabled"),
        (good, "passed", ""),
    ]
    for program, status, detail in cases:
        outcome = passk.run_tests(program, timeout_s=10.0, memory_mb=256)
        assert (outcome.status, outcome.passed) == (status, status == "passed"), (program, outcome)
        assert detail in outcome.detail, (program, outcome)


def test_sandbox_timeout_kills_the_process_group():
    """An infinite loop that first started a child: both are gone soon after the timeout, and the next program runs."""
    program = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', child.pid, file=sys.stderr, flush=True)\n"
        "while True:\n    pass\n"
    )
    start = time.monotonic()
    outcome = passk.run_tests(program, timeout_s=1.0)
    assert (outcome.status, outcome.passed) == ("timeout", False), outcome
    assert time.monotonic() - start < 4.0
    child = int(outcome.stderr.split("child ")[1].split()[0])
    deadline = time.monotonic() + 2.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"the timed-out program's child {child} outlived it"
    assert passk.run_tests("assert True\n").passed


def test_problem_set_canonical_solutions_pass_and_wrong_bodies_fail():
    assert len(PROBLEMS) >= 20 and len({p["task_id"] for p in PROBLEMS}) == len(PROBLEMS)
    for problem in PROBLEMS:
        assert problem["prompt"].startswith(f"def {problem['entry_point']}(") and problem["prompt"].endswith('"""\n')
        assert problem["tests"].count("assert ") >= 2 and problem["entry_point"] in problem["tests"]
        result = passk.evaluate_samples(
            problem, [problem["canonical_solution"], "    pass\n"], ks=(1, 2), timeout_s=10.0
        )
        assert result == {"n": 2, "c": 1, "pass@1": 0.5, "pass@2": 1.0}, problem["task_id"]


def test_lm_eval_task_scores_every_repeat(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """Through lm-eval itself, run from an unrelated directory: a fake model answers problem 0 with its canonical
    body, problem 1 wrongly, problem 2 correctly in 3 of its 10 samples; pass@1 and pass@10 per problem follow."""
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    answers = {p["prompt"]: p["canonical_solution"] for p in PROBLEMS}
    right_for = {PROBLEMS[0]["prompt"]: 10, PROBLEMS[1]["prompt"]: 0, PROBLEMS[2]["prompt"]: 3}

    class FakeLM(LM):
        def __init__(self):
            super().__init__()
            self.requests, self.asked = [], collections.Counter()

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            completions = []
            for request in requests:
                prompt = request.args[0]
                self.requests.append(request.args)
                self.asked[prompt] += 1
                completions.append(answers[prompt] if self.asked[prompt] <= right_for[prompt] else "    pass\n")
            return completions

    monkeypatch.chdir(tmp_path)
    lm = FakeLM()
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # not indexing its ~14k YAMLs saves 12 s
    out = evaluator.simple_evaluate(
        model=lm,
        tasks=["pass_at_k_stdlib"],
        task_manager=tasks,
        limit=3,
        confirm_run_unsafe_code=True,
        log_samples=True,
    )
    assert len(lm.requests) == 30
    assert lm.requests[0][1] == {
        "until": ["\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint("],
        "do_sample": True,
        "temperature": 0.8,
        "max_gen_toks": 128,
    }
    per_doc = {s["doc_id"]: (s["pass@1"], s["pass@10"]) for s in out["samples"]["pass_at_k_stdlib"]}
    assert per_doc == {0: (1.0, 1.0), 1: (0.0, 0.0), 2: (pytest.approx(0.3), 1.0)}
    results = out["results"]["pass_at_k_stdlib"]
    assert results["pass@1,all_samples"] == pytest.approx(1.3 / 3)
    assert results["pass@10,all_samples"] == pytest.approx(2 / 3)
