"""The lm-eval adapter (experiments/harness.py) and `python -m experiments.evaluate`: results equal lm-eval's own
`hf` model's on our exported checkpoint, training logs downstream metrics, bad input is one line."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from experiments import evaluate as cli

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def tasks_dir(tmp_path) -> pathlib.Path:
    """An include path with one multiple-choice task over 3 questions (one longer than the model's window) and one
    task whose data is behind a download that cannot be made."""
    root = tmp_path / "tasks"
    root.mkdir()
    rows = [
        {"q": "def f1_2(x):\n    return x *", "choices": [" 2 + 1", " 7 + 0", " 9"], "gold": 0},
        {"q": "def f0_3(x):\n    return", "choices": [" x * 3 + 0", " y"], "gold": 0},
        {"q": "def f2_5(x):\n    return x * 5 + 2\n\n" * 40 + "def f2_6(x):", "choices": ["\n", " ("], "gold": 0},
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text(MC_TASK.format(data=root / "mc.jsonl"))
    (root / "far.yaml").write_text(
        MC_TASK.replace("tiny_mc", "far_mc").format(data="http://127.0.0.1:9/unreachable.jsonl")
    )
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_writes_lm_evals_results_and_refuses_to_overwrite(eval_run, tasks_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run_cli(
        capsys, "--workdir", eval_run, "--tasks", "tiny_mc", "--include_path", tasks_dir, "--output_path", out,
        "--log_samples", "--batch_size", 4,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert "tiny_mc" in printed and f"{acc:.4f}" in printed  # lm-eval's table
    assert results["truncated"] == 2  # the long question's two choices lost tokens from the left
    assert "truncated" in printed or "lost tokens" in printed
    samples = [json.loads(line) for line in (out / "samples_tiny_mc.jsonl").read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == [0, 1, 2] and acc == sum(s["acc"] for s in samples) / 3
    before = (out / "results.json").read_text()
    code, _, err = run_cli(capsys, "--workdir", eval_run, "--tasks", "tiny_mc", "--include_path", tasks_dir,
                           "--output_path", out)  # fmt: skip
    assert (
        code == 2
        and err.strip()
        == f"error: --output_path='{out}': {out / 'results.json'} exists (pass --overwrite to replace it)"
    )
    assert (out / "results.json").read_text() == before


def test_bad_input_is_one_line_with_exit_code_2(eval_run, tasks_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer = tmp_path / "hf"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    cases = {
        ("--tasks", "tiny_mc"): "give exactly one of --workdir or --hf_dir",
        ("--workdir", eval_run, "--tasks", "tiny_mc", "--limit", 0): "--limit=0: must be >= 1",
        ("--workdir", eval_run, "--tasks", "no_such_task"): "unknown task 'no_such_task'",
        ("--workdir", eval_run, "--tasks", "tiny_mc", "--include_path", empty): "holds no task YAML files",
        ("--hf_dir", no_tokenizer, "--tasks", "tiny_mc"): "has no tokenizer.json",
        (
            "--workdir",
            eval_run,
            "--tasks",
            "far_mc",
            "--include_path",
            tasks_dir,
        ): "task 'far_mc': cannot load its data",
    }
    for argv, message in cases.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err

    # train.eval_tasks: the same check, before the run starts (lm-eval's task index is the one just built).
    from tests.conftest import tiny_run
    from training.config import ConfigError
    from training.loop import train

    run = tiny_run(train={"eval_tasks": ("stdlib_mc", "no_such_task")})
    with pytest.raises(ConfigError, match=r"^train.eval_tasks=\('stdlib_mc', 'no_such_task'\): --tasks: unknown task"):
        train(run, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_training_logs_downstream_metrics_and_per_document_scores(eval_run):
    from experiments import harness
    from sampling.scoring import Scorer

    rows = [json.loads(line) for line in (eval_run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/stdlib_mc/acc" in r]
    assert [r["step"] for r in logged] == [20, 40] and "eval/stdlib_mc/acc_norm" in logged[-1]
    downstream = json.loads((eval_run / "downstream.json").read_text())
    per_doc = downstream["tasks"]["stdlib_mc"]["acc"]
    assert downstream["step"] == 40 and sorted(per_doc, key=int) == [str(i) for i in range(8)]
    assert logged[-1]["eval/stdlib_mc/acc"] == pytest.approx(sum(per_doc.values()) / 8)
    # The same as evaluating the final checkpoint afterwards.
    lm = harness.JaxLM(Scorer.load(workdir=eval_run, batch_size=8)[0])
    after = harness.evaluate(lm, ["stdlib_mc"], options=harness.Options(limit=8))
    assert after["results"]["stdlib_mc"]["acc,none"] == logged[-1]["eval/stdlib_mc/acc"]


def test_per_document_scores_equal_lm_evals_hf_model_on_the_export(eval_run, tmp_path):
    """The reference: our four local task types run through lm-eval's own `hf` model (PyTorch) on the checkpoint
    exported with `python -m model.hf export`, against our adapter on the workdir: the same log-likelihood for every
    request of every document (1e-4), so the same accuracies and perplexities, and the same greedy generations."""
    pytest.importorskip("accelerate")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from experiments import harness
    from model.hf.__main__ import main as hf_command
    from sampling.scoring import Scorer

    hf_command(["export", str(eval_run), str(tmp_path / "hf")])
    limits = {"stdlib_mc": 12, "stdlib_lambada": 12, "stdlib_ppl": 3, "stdlib_gen": 6}
    theirs_lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=8)
    ours_lm = harness.JaxLM(Scorer.load(workdir=eval_run, batch_size=8)[0])
    assert theirs_lm.max_length == ours_lm.max_length == 128
    manager = harness.task_manager(None, list(limits))
    runs = {}
    for name, lm in (("theirs", theirs_lm), ("ours", ours_lm)):
        with harness.quiet_lm_eval():
            results = evaluator.simple_evaluate(
                model=lm, tasks=list(limits), samples={t: list(range(n)) for t, n in limits.items()},
                log_samples=True, bootstrap_iters=0, task_manager=manager,
            )  # fmt: skip
        runs[name] = dict.fromkeys(limits, results)
    for task in limits:
        ours, theirs = runs["ours"][task], runs["theirs"][task]
        assert len(ours["samples"][task]) == limits[task]
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            if task == "stdlib_gen":
                assert a["resps"] == b["resps"]
                continue
            scores = lambda s: [r[0][0] if isinstance(r[0], list | tuple) else r[0] for r in s["resps"]]  # noqa: E731
            np.testing.assert_allclose(scores(a), scores(b), rtol=1e-5, atol=1e-4)
        for key, value in theirs["results"][task].items():
            if key.split(",")[0] in ("acc", "acc_norm", "exact_match"):
                assert ours["results"][task][key] == value, (task, key)
            elif key.split(",")[0] in ("perplexity", "word_perplexity", "bits_per_byte"):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
    # What training keeps per document: means per document; a perplexity as its aggregate, its per-document
    # target log-likelihoods as 'loglikelihood'; rolling perplexities as aggregates only.
    kept = harness.per_document(runs["ours"]["stdlib_lambada"])["stdlib_lambada"]
    lambada = runs["ours"]["stdlib_lambada"]
    assert kept["perplexity"] == lambada["results"]["stdlib_lambada"]["perplexity,none"]
    assert kept["acc"] == {str(s["doc_id"]): s["acc"] for s in lambada["samples"]["stdlib_lambada"]}
    assert kept["loglikelihood"] == {
        str(s["doc_id"]): s["resps"][0][0][0] for s in lambada["samples"]["stdlib_lambada"]
    }
    assert all(isinstance(v, float) for v in harness.per_document(runs["ours"]["stdlib_ppl"])["stdlib_ppl"].values())
    # The Hugging Face directory scores as the workdir it was exported from.
    pairs = [(ours_lm.tok_encode(a), ours_lm.tok_encode(b)) for a, b in (("def f", "1_2(x):"), ("    return", " x"))]
    from_hf = Scorer.load(hf_dir=tmp_path / "hf", batch_size=8)[0].loglikelihood(pairs)
    assert from_hf == ours_lm.scorer.loglikelihood(pairs)
    mc = [s["acc"] for s in runs["ours"]["stdlib_mc"]["samples"]["stdlib_mc"]]
    assert 0 < sum(mc) < len(mc)  # right on some documents and wrong on others: a mix-up would show
    assert any(s["resps"][0][0] for s in runs["ours"]["stdlib_gen"]["samples"]["stdlib_gen"])
