"""The local lm-eval tasks (experiments/eval_tasks): the builder reproduces the committed files, and each task loads
from any working directory and runs through lm-eval's evaluator with an oracle LM (no model), so every field, delimiter
and metric is wired as intended."""

from __future__ import annotations

import json
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from experiments.eval_tasks import build  # noqa: E402

TASKS = ("stdlib_mc", "stdlib_lambada", "stdlib_ppl", "stdlib_gen")
METRICS = {
    "stdlib_mc": {"acc,none": 1.0, "acc_norm,none": 1.0},
    "stdlib_lambada": {"acc,none": 1.0, "perplexity,none": 1.0},
    "stdlib_ppl": {"bits_per_byte,none": 1.0, "byte_perplexity,none": 2.0},
    "stdlib_gen": {"exact_match,none": 1.0},
}


def rows(task: str) -> list[dict]:
    with (build.HERE / f"{task}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Oracle(LM):
    """Knows each document's answer: log-probability 0 (and greedy) for it, -10 for anything else; generates the
    target; scores text at exactly 1 bit per byte. A mis-wired task (a wrong field, an extra delimiter) scores below 1."""

    def __init__(self):
        super().__init__()
        mc = {r["context"]: r["choices"][r["label"]] for r in rows("stdlib_mc")}
        self.truth = {"stdlib_mc": mc} | {t: {r["context"]: r["target"] for r in rows(t)} for t in TASKS[1::2]}
        self.gen_kwargs = []

    def loglikelihood(self, requests):
        def score(r):
            right = self.truth[r.task_name].get(r.args[0]) == r.args[1]
            return (0.0, True) if right else (-10.0, False)

        return [score(r) for r in requests]

    def loglikelihood_rolling(self, requests):
        return [-len(r.args[0].encode()) * 0.6931471805599453 for r in requests]

    def generate_until(self, requests):
        self.gen_kwargs += [r.args[1] for r in requests]
        return [self.truth[r.task_name][r.args[0]] for r in requests]


def test_the_stdlib_group_runs_every_task_from_any_working_directory(tmp_path, monkeypatch):
    """`include_path` finds the tasks and the `stdlib` group; their JSONL is found from another directory (lm-eval
    alone resolves `data_files` against the working directory); the metric keys are lm-eval's `NAME,none`."""
    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(build.HERE), include_defaults=False)  # not lm-eval's ~10k YAML files
    assert {*TASKS, "stdlib"} <= set(manager.all_tasks)
    oracle = Oracle()
    out = lm_eval.simple_evaluate(
        model=oracle, tasks=["stdlib"], task_manager=manager, bootstrap_iters=0, log_samples=False
    )
    for task, expected in METRICS.items():
        got = out["results"][task]
        assert got["sample_len"] == len(rows(task))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), (task, key)
    assert "word_perplexity,none" in out["results"]["stdlib_ppl"]
    assert all(k["until"] == ["\n"] and not k["do_sample"] and k["max_gen_toks"] == 48 for k in oracle.gen_kwargs)


def test_the_documents_fit_their_tasks():
    mc = rows("stdlib_mc")
    assert all(len(set(r["choices"])) == 4 and r["context"].endswith("\n") for r in mc)
    assert 0.15 < sum(r["label"] == 0 for r in mc) / len(mc) < 0.35  # the true line's place is shuffled
    assert all(r["target"].startswith(" ") and r["target"][1:].isidentifier() for r in rows("stdlib_lambada"))
    assert all(len(r["target"]) < 48 and "\n" not in r["target"] for r in rows("stdlib_gen"))
    ppl = [len(r["text"].encode()) for r in rows("stdlib_ppl")]
    assert sum(n > 1024 for n in ppl) >= 10  # past a 256-token window even at 4 bytes a token: windows roll
    for task in TASKS:
        assert 40 <= len(rows(task)) <= 100 and (build.HERE / f"{task}.jsonl").stat().st_size < 64 * 1024


def test_the_builder_reproduces_the_committed_files(tmp_path):
    sources = json.loads((build.HERE / "sources.json").read_text())
    if sources["python"] != sys.version.split()[0]:
        pytest.skip(f"the files were built from Python {sources['python']}'s stdlib")
    build.build(tmp_path)
    for name in [f"{task}.jsonl" for task in TASKS] + ["sources.json"]:
        assert (tmp_path / name).read_text() == (build.HERE / name).read_text(), name
