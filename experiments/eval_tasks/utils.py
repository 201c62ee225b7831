"""Loads the tasks' JSONL files from this folder, whatever the working directory: lm-eval hands a task's
`dataset_kwargs.data_files` to `datasets.load_dataset`, which resolves relative paths against the working directory,
so every task's YAML names this `load` as its `custom_dataset` (lm-eval calls it with `dataset_kwargs`)."""

from __future__ import annotations

import json
import pathlib

import datasets

HERE = pathlib.Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_) -> datasets.DatasetDict:
    """{split: the rows of its JSONL file}, file names relative to this folder (the other keyword arguments are
    lm-eval's task metadata, unused)."""
    splits = {}
    for split, name in data_files.items():
        with (HERE / name).open(encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    return datasets.DatasetDict(splits)
