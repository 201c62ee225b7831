"""llama.cpp against our model on a trained workdir's GGUF exports (`python -m model.gguf export`).

    python benchmarks/gguf_check.py --workdir runs/tiny [--types f16,q8_0,q4_0] \
        [--llama_cpp_python /tmp/llvenv/bin/python] [--out_dir DIR]

Trains nothing: it exports the workdir's latest checkpoint once per type and prints, per type, the file size, the
largest relative error of llama.cpp's next-token logits against our float32 forward on the prompts (max |theirs -
ours| / max |ours|, over every position of every prompt), how many of the prompts llama.cpp continues greedily with
exactly our greedy tokens, the smallest top-1/top-2 logit margin along our greedy paths (a small one is a near tie
that either side may break its own way) and, where continuations diverge, the largest of our margins at a first
divergence (small: only near ties went the other way). Then how many texts llama.cpp tokenizes to our ids (code,
Unicode, whitespace runs, digits; and the prompts, with bos). llama.cpp needs llama-cpp-python, which the repo's
environment need not have: pass an interpreter that has it (default: $LLAMA_CPP_PYTHON, else this one). Its
key/value cache is float16, as by default.

The default prompts are Python-like (the test corpus of tests/conftest.py's `write_corpus`); `--prompts stdlib`
gives openings of standard-library code, `--prompts FILE` (one per line, `\\n` for newlines) others.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Lines of tests/conftest.py's `write_corpus` to continue, each with a clear greedy choice at every step for its
# 40-step `eval_run` model (top-1/top-2 logit margins >= 0.1, where q8_0 moves logits by < 0.07).
PROMPTS = [
    *(f"def f{i}_{j}(x):\n    return x * {j}" for i, j in [(0, 3), (1, 7), (2, 11), (3, 19), (4, 23)]),
    *(f"def f{i}_{j}(x):\n    return x * {j} + " for i, j in [(1, 4), (2, 5), (3, 6), (4, 9)]),
    "def f1_4(x):\n    return",
]
# Openings of Python standard-library code, for runs trained on it (configs/tiny.py): `--prompts stdlib`.
STDLIB_PROMPTS = [
    "import os\nimport sys\n\n",
    "    def __init__(self, ",
    "class Error(Exception):\n    ",
    "if __name__ == '__main__':\n    ",
    "    for i in range(",
    "    def __repr__(self):\n        return ",
    "        raise ValueError(",
    "from collections import ",
    '    """Return the ',
    "        if self._closed:\n            ",
]
# Varied text: code, Unicode (accents, CJK, emoji, combining marks, RTL), whitespace runs, digits, and llama.cpp's own
# pre-tokenizer probe (convert_hf_to_gguf.py's `chktxt`).
TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}  # comment\r\n",
    "héllo wörld, naïve café — 日本語のテキスト 🙂👍🏽 e\u0301 مرحبا",
    "   leading and trailing spaces   \n\n\n  \t\t mixed \u00a0 nbsp \u3000 ideographic",
    "3 33 333 3333 1234567890 3.14159 1e-9 0x1F 2024-12-05 12:30",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there",
    "",
]
NEW_TOKENS = 16


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |theirs - ours| / max |ours|."""
    return float(np.abs(theirs - ours).max() / np.abs(ours).max())


def ours_on(workdir: pathlib.Path, prompts: list[str], new_tokens: int) -> dict:
    """Our model's side: prompt ids, float32 logits on them, greedy continuations and their smallest margin."""
    import model
    from sampling.decode import generate_batch, prompt_ids
    from sampling.rules import Rules
    from training.checkpoint import load_for_inference

    run, params, tokenizer, _ = load_for_inference(workdir)
    cfg = run.model
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    logits = [np.asarray(model.logits(cfg, params, np.array([p])))[0] for p in ids]
    max_len = min(cfg.max_seq_len, max(map(len, ids)) + new_tokens)
    greedy = generate_batch(model.Transformer(cfg), params, ids, new_tokens, Rules(temperature=0.0), max_len=max_len)
    margins = []  # per prompt, per greedy step: our top-1 minus top-2 logit
    for p, cont in zip(ids, greedy.tokens):
        path = np.asarray(model.logits(cfg, params, np.array([p + cont])))[0, len(p) - 1 : len(p) + len(cont) - 1]
        top2 = np.sort(path, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
    return {"ids": ids, "logits": logits, "greedy": greedy.tokens, "margins": margins, "tokenizer": tokenizer}


def divergence_margin(ours: list[int], theirs: list[int], margins: np.ndarray) -> float | None:
    """Our margin at the first step where llama.cpp's greedy tokens leave ours (None: they never do)."""
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return None if len(ours) == len(theirs) else float(margins[min(len(ours), len(theirs))])
    return float(margins[k])


def check(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    types: list[str],
    python: str,
    prompts: list[str] = PROMPTS,
    texts: list[str] = TEXTS,
    new_tokens: int = NEW_TOKENS,
) -> list[dict]:
    """One row per type: {type, bytes, logit_error, greedy_agree, prompts, margin, divergence_margin, tokenize_agree,
    texts}: `margin` is the smallest of our top-1/top-2 margins along our greedy paths, `divergence_margin` the
    largest of ours where a path of llama.cpp's leaves ours (None: none does)."""
    from model.gguf.llama_cpp_side import llama_cpp
    from training import gguf

    workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
    ours = ours_on(workdir, prompts, new_tokens)
    tokenizer = ours["tokenizer"]
    n_ctx = max(map(len, ours["ids"])) + new_tokens
    # llama.cpp reads the text of a special token as that token only with `special`, as our BPE encode always does.
    tokenize = [{"text": t, "special": True} for t in texts] + [{"text": p, "add_bos": True} for p in prompts]
    rows = []
    for type in types:
        path = out_dir / f"{workdir.name}.{type}.gguf"
        gguf.export(path, type, workdir=workdir, overwrite=True)
        request = {
            "n_ctx": n_ctx,
            "logits": ours["ids"],
            "greedy": {"prompts": ours["ids"], "new_tokens": new_tokens},
            "tokenize": tokenize,
        }
        theirs = llama_cpp(python, path, request)
        want = [tokenizer.encode(t) for t in texts] + ours["ids"]
        diverged = [
            m
            for a, b, margins in zip(ours["greedy"], theirs["greedy"], ours["margins"])
            if (m := divergence_margin(a, b, margins)) is not None
        ]
        rows.append(
            {
                "type": type,
                "bytes": path.stat().st_size,
                "logit_error": max(relative_error(o, np.array(t)) for o, t in zip(ours["logits"], theirs["logits"])),
                "greedy_agree": sum(a == b for a, b in zip(ours["greedy"], theirs["greedy"])),
                "prompts": len(prompts),
                "margin": float(min(m.min() for m in ours["margins"])),
                "divergence_margin": max(diverged, default=None),
                "tokenize_agree": sum(a == b for a, b in zip(want, theirs["tokenize"])),
                "texts": len(want),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| type | file size | max rel. logit error | greedy continuations equal | smallest greedy margin "
        "| margin where one diverged | texts tokenized equal |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        diverged = "-" if r["divergence_margin"] is None else f"{r['divergence_margin']:.3f}"
        lines.append(
            f"| {r['type']} | {r['bytes'] / 1024:.1f} KiB | {r['logit_error']:.2e} | {r['greedy_agree']}/{r['prompts']} "
            f"| {r['margin']:.3f} | {diverged} | {r['tokenize_agree']}/{r['texts']} |"
        )
    return "\n".join(lines)


def main() -> None:
    from model.gguf.llama_cpp_side import python_with_llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained run (its latest checkpoint is exported)")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--llama_cpp_python", default=python_with_llama_cpp(), help="a Python with llama_cpp")
    parser.add_argument("--out_dir", help="where the .gguf files go (default: a temporary directory)")
    parser.add_argument(
        "--prompts",
        default="default",
        help="'default', 'stdlib', or a file of prompts, one per line (\\n for a newline)",
    )
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
    args = parser.parse_args()
    if args.llama_cpp_python is None:
        parser.error("no Python with llama_cpp: pass --llama_cpp_python or set $LLAMA_CPP_PYTHON")
    prompts = {"default": PROMPTS, "stdlib": STDLIB_PROMPTS}.get(args.prompts)
    if prompts is None:
        prompts = [line.replace("\\n", "\n") for line in pathlib.Path(args.prompts).read_text().splitlines() if line]
    with tempfile.TemporaryDirectory() as tmp:
        rows = check(args.workdir, args.out_dir or tmp, args.types.split(","), args.llama_cpp_python, prompts,
                     new_tokens=args.new_tokens)  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
