"""Sample from (or score text under) a trained run's checkpoint.

    python infer.py --workdir runs/tiny --prompt "def fib(n):" --max_new_tokens 200
    python infer.py --workdir runs/tiny --prompt_file prompts.txt --num_samples 4 --top_p 0.9
    python infer.py --workdir runs/tiny --prompt "def " --beam_size 4 --temperature 0
    python infer.py --workdir runs/tiny --score some_file.py

A single prompt streams its continuation as it is generated. Every prompt starts a document (it
follows the end-of-document token, as documents do in training). Prefill and decode speeds go to
stderr. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging

from training.cli import fail, parse_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (or a checkpoint directory) to load.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest complete one).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample (at most).")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "K/V cache size: prompt plus new tokens (0: the model's seq_len).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt (with beams: the best N beams).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set whose probability reaches p (1: all).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens less likely than min_p times the most likely (0: none).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 1, "Beam search with this many beams (1: sample).")
_STOP = flags.DEFINE_multi_string(
    "stop", [], r"Stop a sample when its text contains this string (repeatable; \n is a newline, \t a tab)."
)
_EOS = flags.DEFINE_boolean("eos", True, "Stop a sample at the end-of-document token (--noeos: keep going).")
_KV_CACHE = flags.DEFINE_boolean("kv_cache", True, "Decode with the K/V cache (--kv_cache=false: recompute).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows decoded together for many prompts or samples.")
_SCORE = flags.DEFINE_string("score", None, "Print the loss, perplexity and bits per byte of this text file.")


def check_flags() -> None:
    """Everything that can be checked before loading a checkpoint; one line per problem."""
    rules = [
        (_WORKDIR.value, "--workdir is required"),
        (_TEMPERATURE.value >= 0, f"--temperature={_TEMPERATURE.value}: must be >= 0 (0 is greedy)"),
        (0 < _TOP_P.value <= 1, f"--top_p={_TOP_P.value}: must be in (0, 1]"),
        (_TOP_K.value >= 0, f"--top_k={_TOP_K.value}: must be >= 0 (0: no limit)"),
        (0 <= _MIN_P.value <= 1, f"--min_p={_MIN_P.value}: must be in [0, 1]"),
        (_BEAM_SIZE.value >= 1, f"--beam_size={_BEAM_SIZE.value}: must be >= 1"),
        (_NUM_SAMPLES.value >= 1, f"--num_samples={_NUM_SAMPLES.value}: must be >= 1"),
        (_MAX_NEW.value >= 1, f"--max_new_tokens={_MAX_NEW.value}: must be >= 1"),
        (_MAX_LEN.value >= 0, f"--max_len={_MAX_LEN.value}: must be >= 0 (0: the model's seq_len)"),
        (_BATCH_SIZE.value >= 1, f"--batch_size={_BATCH_SIZE.value}: must be >= 1"),
        (all(_STOP.value), "--stop='': a stop string must not be empty (it would stop every sample at once)"),
        (
            _BEAM_SIZE.value == 1 or _NUM_SAMPLES.value <= _BEAM_SIZE.value,
            f"--num_samples={_NUM_SAMPLES.value}: with beam search it must be <= --beam_size={_BEAM_SIZE.value}",
        ),
        (
            _BEAM_SIZE.value == 1 or _KV_CACHE.value,
            "--kv_cache=false: beam search always decodes with the cache",
        ),
        (
            sum(x is not None for x in (_PROMPT.value, _PROMPT_FILE.value, _SCORE.value)) == 1,
            "give exactly one of --prompt, --prompt_file or --score",
        ),
    ]
    for ok, message in rules:
        if not ok:
            fail(message)
    for name, value in (("--prompt_file", _PROMPT_FILE.value), ("--score", _SCORE.value)):
        if value is not None and not pathlib.Path(value).is_file():
            fail(f"{name}={value!r}: no such file")
    if _WORKDIR.value and not pathlib.Path(_WORKDIR.value).is_dir():
        fail(f"--workdir={_WORKDIR.value!r}: no such directory")


def read_prompts() -> list[str]:
    if _PROMPT.value is not None:
        return [_PROMPT.value]
    lines = pathlib.Path(_PROMPT_FILE.value).read_text(encoding="utf-8").splitlines()
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        fail(f"--prompt_file={_PROMPT_FILE.value!r}: has no non-empty lines")
    return prompts


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO

    # Imported after the flags are checked: a bad flag answers at once, without starting JAX.
    from sampling.runner import Request, report_speed, run_request, unescape
    from training.checkpoint import CheckpointError, load_for_inference
    from training.evaluation import score_file

    try:
        run, params, tokenizer, step = load_for_inference(_WORKDIR.value, _STEP.value)
    except CheckpointError as e:
        fail(str(e))
    print(f"loaded step {step} from {_WORKDIR.value}", file=sys.stderr)

    if _SCORE.value is not None:
        text = pathlib.Path(_SCORE.value).read_text(encoding="utf-8")
        if not text:
            fail(f"--score={_SCORE.value!r}: the file is empty")
        print(json.dumps(score_file(run, params, tokenizer, text)))
        return

    request = Request(
        prompts=read_prompts(),
        max_new_tokens=_MAX_NEW.value,
        max_len=_MAX_LEN.value or run.model.max_seq_len,
        num_samples=_NUM_SAMPLES.value,
        seed=_SEED.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        min_p=_MIN_P.value,
        beam_size=_BEAM_SIZE.value,
        stop=tuple(unescape(s) for s in _STOP.value),
        eos=_EOS.value,
        kv_cache=_KV_CACHE.value,
        batch_size=_BATCH_SIZE.value,
    )
    try:
        speeds = run_request(run.model, params, tokenizer, request, out=sys.stdout)
    except ValueError as e:  # a request the model cannot serve (prompt too long, cache too large)
        fail(str(e))
    report_speed(speeds, file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
