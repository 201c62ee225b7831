"""lm-eval hooks for the pass_at_k_stdlib task (pass_at_k_stdlib.yaml): the problems, the programs and pass@k.

The problems load from problems.jsonl beside this file through `custom_dataset`: lm-eval hands a YAML's
`dataset_kwargs: {data_files: ...}` to `datasets.load_dataset` as is, which reads a relative path against the
working directory, so a path in the YAML would only work when run from this folder.
"""

from __future__ import annotations

import json
import pathlib

import datasets

from experiments import passk

PROBLEMS = pathlib.Path(__file__).with_name("problems.jsonl")


def load_problems(**metadata) -> datasets.DatasetDict:
    """The problem set as a one-split dataset; lm-eval passes the task's metadata, which it does not need."""
    with PROBLEMS.open(encoding="utf-8") as f:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in f])})


def with_prompt(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: every sampled completion of a problem (all `repeats` of them, not only the first) after its prompt."""
    return [[doc["prompt"] + completion for completion in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int], timeout_s: float = 5.0) -> dict:
    """Metric for one problem: references holds its tests, predictions its n programs; {"pass@K": ...} for each K."""
    (tests,), (programs,) = references, predictions
    result = passk.evaluate_samples({"prompt": "", "tests": tests}, programs, tuple(k), timeout_s=timeout_s)
    return {name: value for name, value in result.items() if name.startswith("pass@")}
