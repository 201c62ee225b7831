"""Side by side: log-likelihood requests per second of our lm-eval adapter (experiments/harness.py) vs lm-eval's own
`hf` model (PyTorch) on the same checkpoint exported with `python -m model.hf export`, same task, same batch size,
float32, same CPU.

    python benchmarks/eval_harness.py --workdir runs/tiny --task stdlib_mc --batch_size 32 --rounds 5

Both answer the same task's requests (lm-eval builds them once); the two alternate `--rounds` times after one
untimed warm-up each (our compiles, PyTorch's first allocations), so machine noise hits both alike. Prints the median
requests/s of each, their ratio and the largest difference between their log-likelihoods.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained run (its latest checkpoint is measured)")
    p.add_argument("--task", default="stdlib_mc", help="an lm-eval task with loglikelihood requests")
    p.add_argument("--limit", type=int, default=0, help="documents of the task (0: all)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--malloc",
        choices=("reuse", "system"),
        default="system",
        help="glibc's allocator: its defaults (as experiments.evaluate runs) or train.py's reuse of freed memory; both arms",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from training.allocator import reuse_freed_memory

    if args.malloc == "reuse":
        reuse_freed_memory()  # before JAX starts (training/allocator.py); PyTorch, in this process, gets it too
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    import numpy as np
    import torch
    from lm_eval.models.huggingface import HFLM

    from experiments import harness
    from sampling.scoring import Scorer
    from training import hf

    manager = harness.task_manager(None, [args.task])
    task = harness.build_tasks([args.task], manager)[args.task]
    task.build_all_requests(limit=args.limit or None, rank=0, world_size=1)
    requests = [i for i in task.instances if i.request_type == "loglikelihood"]
    if not requests:
        sys.exit(f"--task={args.task!r}: has no loglikelihood requests")

    ours = harness.JaxLM(Scorer.load(workdir=args.workdir, batch_size=args.batch_size)[0])
    with tempfile.TemporaryDirectory() as export_dir:
        hf.export(args.workdir, pathlib.Path(export_dir) / "hf")
        theirs = HFLM(pretrained=str(pathlib.Path(export_dir) / "hf"), device="cpu", dtype="float32",
                      batch_size=args.batch_size)  # fmt: skip
        arms = {"ours (jax)": ours, "lm-eval hf (torch)": theirs}
        rates: dict[str, list[float]] = {name: [] for name in arms}
        answers = {}
        for name, lm in arms.items():  # warm-up
            answers[name] = lm.loglikelihood(requests, disable_tqdm=True)
        for _ in range(args.rounds):
            for name, lm in arms.items():
                start = time.perf_counter()
                lm.loglikelihood(requests, disable_tqdm=True)
                rates[name].append(len(requests) / (time.perf_counter() - start))
    a, b = (np.array([s for s, _ in answers[n]]) for n in arms)
    print(f"{args.task}: {len(requests)} loglikelihood requests, batch size {args.batch_size}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")  # fmt: skip
    for name, r in rates.items():
        print(
            f"  {name:20s} median {statistics.median(r):8.1f} requests/s  (rounds: {', '.join(f'{x:.1f}' for x in r)})"
        )
    ratio = statistics.median(rates["ours (jax)"]) / statistics.median(rates["lm-eval hf (torch)"])
    print(f"  ratio ours / hf: {ratio:.2f}x; largest |log-likelihood difference|: {np.max(np.abs(a - b)):.2e}")


if __name__ == "__main__":
    main()
