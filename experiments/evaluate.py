"""Downstream evaluation with lm-evaluation-harness: a workdir's checkpoint or a Hugging Face directory on lm-eval
tasks, through the in-process adapter (experiments/harness.py).

    python -m experiments.evaluate --workdir runs/tiny --tasks stdlib_mc,stdlib_lambada --output_path out/
    python -m experiments.evaluate --hf_dir ~/models/Qwen3-0.6B --tasks hellaswag,arc_easy --limit 200
    python -m experiments.evaluate --workdir runs/tiny --tasks pass_at_k_stdlib          # pass@1, pass@10
    python -m experiments.evaluate --workdir runs/tiny --tasks my_task --include_path my_tasks/ --mesh data=2

Tasks are lm-eval's own, ours (experiments/eval_tasks/: stdlib_mc, stdlib_lambada, stdlib_ppl, stdlib_gen,
pass_at_k_stdlib) and those under --include_path. It prints lm-eval's table and writes lm-eval's results JSON
(`results[task]["acc,none"]`, ...) to OUT/results.json (or OUT itself when it ends in .json), with
`truncated` (requests whose context lost tokens from the left); --log_samples adds OUT/samples_TASK.jsonl.
Bad input prints one line and exits with code 2; an existing results file is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a run directory (or a checkpoint directory) to evaluate")
    p.add_argument("--hf_dir", help="a Hugging Face model directory to evaluate instead")
    p.add_argument("--step", type=int, help="with --workdir: the checkpoint step (default: the latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (globs allowed)")
    p.add_argument("--include_path", help="a directory of further task YAML files")
    p.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    p.add_argument("--batch_size", type=int, default=32, help="requests scored together (default 32)")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt (default: each task's)")
    p.add_argument("--output_path", help="a directory (or a .json file) for the results")
    p.add_argument("--log_samples", action="store_true", help="also write every document's requests and scores")
    p.add_argument("--overwrite", action="store_true", help="replace results already at --output_path")
    p.add_argument("--add_bos_token", action="store_true", help="start every context as a document starts")
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation seed")
    p.add_argument("--bootstrap_iters", type=int, default=1000, help="lm-eval's stderr bootstrap (0: none)")
    p.add_argument("--mesh", default="", help="score on a mesh of the local devices, e.g. data=2,tensor=4")
    p.add_argument("--fake_devices", type=int, help="run on this many fake CPU devices (to try --mesh)")
    return p.parse_args(argv)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def output_files(args: argparse.Namespace, tasks: list[str]) -> list[pathlib.Path]:
    """The files this run writes: the results JSON, then (with --log_samples) one JSONL of samples per task."""
    if not args.output_path:
        return []
    out = pathlib.Path(args.output_path).expanduser()
    results = out if out.suffix == ".json" else out / "results.json"
    samples = [results.parent / f"samples_{t}.jsonl" for t in tasks] if args.log_samples else []
    return [results, *samples]


def check(args: argparse.Namespace) -> list[str]:
    """Everything that can be checked before a model loads; fails with one line. Returns the task names given."""
    if (args.workdir is None) == (args.hf_dir is None):
        fail("give exactly one of --workdir or --hf_dir")
    for flag, value in (("--workdir", args.workdir), ("--hf_dir", args.hf_dir)):
        if value is not None and not pathlib.Path(value).expanduser().is_dir():
            fail(f"{flag}={value!r}: no such directory")
    if args.hf_dir is not None and args.step is not None:
        fail("--step: only with --workdir (a Hugging Face directory has one)")
    if args.hf_dir is not None and not (pathlib.Path(args.hf_dir).expanduser() / "tokenizer.json").is_file():
        fail(f"--hf_dir={args.hf_dir!r}: has no tokenizer.json (the model's tokenizer; evaluation needs one)")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit={args.limit}: must be >= 1 (leave it out for every document)")
    if args.batch_size < 1:
        fail(f"--batch_size={args.batch_size}: must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        fail(f"--num_fewshot={args.num_fewshot}: must be >= 0")
    if args.bootstrap_iters < 0:
        fail(f"--bootstrap_iters={args.bootstrap_iters}: must be >= 0")
    if args.fake_devices is not None and args.fake_devices < 1:
        fail(f"--fake_devices={args.fake_devices}: must be >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        fail(f"--tasks={args.tasks!r}: name at least one task")
    return tasks


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    tasks = check(args)
    if args.fake_devices is not None:  # before JAX starts its backends
        from parallel.cpu_devices import with_fake_device_flags

        os.environ["XLA_FLAGS"] = with_fake_device_flags(os.environ.get("XLA_FLAGS", ""), args.fake_devices)
        os.environ["JAX_PLATFORMS"] = "cpu"

    from data import DataError
    from experiments import harness
    from model.hf import HFError
    from parallel.mesh import MeshError
    from training.checkpoint import CheckpointError
    from training.config import ConfigError

    try:
        if args.include_path:
            harness.check_include_path(args.include_path)
        manager = harness.task_manager(args.include_path, tasks)
        names = harness.resolve_tasks(tasks, manager)
        harness.build_tasks(names, manager)
    except harness.EvalError as e:
        fail(str(e))
    existing = [f for f in output_files(args, names) if f.exists()]  # the task names resolved (globs expanded)
    if existing and not args.overwrite:
        fail(f"--output_path={args.output_path!r}: {existing[0]} exists (pass --overwrite to replace it)")

    from sampling.scoring import Scorer

    try:
        scorer, _ = Scorer.load(
            workdir=args.workdir, hf_dir=args.hf_dir, step=args.step, mesh=args.mesh, batch_size=args.batch_size
        )
    except (CheckpointError, HFError, DataError, ConfigError, MeshError) as e:
        fail(str(e))
    lm = harness.JaxLM(scorer, add_bos_token=args.add_bos_token, seed=args.seed)
    options = harness.Options(args.limit, args.num_fewshot, args.log_samples, args.bootstrap_iters, args.seed)
    try:
        results = harness.evaluate(lm, names, args.include_path, options)
    except harness.EvalError as e:
        fail(str(e))
    write(results, output_files(args, names))

    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if results["truncated"]:
        print(f"{results['truncated']} requests were longer than the model's context and lost tokens from the left")


def write(results: dict, files: list[pathlib.Path]) -> None:
    """lm-eval's results JSON (its own serialisation), and each task's samples as JSON lines."""
    if not files:
        return
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", {})
    files[0].parent.mkdir(parents=True, exist_ok=True)
    files[0].write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for path in files[1:]:
        task = path.stem.removeprefix("samples_")
        with open(path, "w") as f:
            for sample in samples.get(task, []):
                f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
    results["samples"] = samples


if __name__ == "__main__":
    main()
