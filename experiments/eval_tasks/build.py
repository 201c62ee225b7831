"""Builds the local lm-eval tasks' JSONL files from held-out standard-library sources:
`python -m experiments.eval_tasks.build` rewrites them (and sources.json) next to this module.

The documents are the validation side of the `stdlib` corpus (data/corpus.py) at the default `data.val_fraction`,
so a model trained on the stdlib is scored on files it never trained on. Everything is a function of SEED and the
running interpreter's standard library: the committed files came from the Python version sources.json names (another
version's stdlib gives other, equally valid, files). Each document's `source` is its `file:line`; sources.json
lists the stdlib files each task used.

  stdlib_mc       the first lines of a function; choose its next line among 4 (3 from other functions, re-indented)
  stdlib_lambada  the lines of a function up to a line's last identifier (one named earlier); target " identifier"
  stdlib_ppl      whole small modules and chunks of larger ones (cut between top-level statements), 0.05-3 KB
  stdlib_gen      the first lines of a function; generate its next line (indentation included)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import keyword
import pathlib
import random
import re
import sys
from collections.abc import Iterator

from configs import base
from data.corpus import STDLIB, Document, is_validation, read_documents

HERE = pathlib.Path(__file__).resolve().parent
SEED = 0
SIZES = {"stdlib_mc": 100, "stdlib_lambada": 100, "stdlib_ppl": 40, "stdlib_gen": 100}
MAX_CONTEXT_LINES = 12  # a prompt is a function's first lines: at most this many
MIN_LINE_CHARS = 8  # a target or distractor line has at least this many non-blank characters
MAX_LINE_CHARS = 100  # and at most this many characters
MAX_GEN_CHARS = 47  # stdlib_gen's targets: their line and its newline fit max_gen_toks=48 even as bytes
PPL_BYTES = (200, 1600)  # stdlib_ppl chunk sizes (many past 256 bytes or tokens, so scoring windows roll)
FINAL_WORD = re.compile(r"^(.*\S) ([A-Za-z_][A-Za-z0-9_]{2,})$")


@dataclasses.dataclass(frozen=True)
class Function:
    source: str  # stdlib file
    lineno: int  # of its `def` line in the file
    lines: list[str]  # from the `def` line, dedented by the def's column
    starts: list[int]  # indices of lines that begin a statement of its body (the docstring's excluded)
    ends: list[int]  # indices of lines that end a simple (not compound) statement of its body


def held_out() -> list[Document]:
    """The stdlib corpus's validation documents at the default val_fraction."""
    val_fraction = base.get_config().data.val_fraction
    return [d for d in read_documents(STDLIB) if is_validation(d.name, val_fraction)]


def functions(docs: list[Document]) -> list[Function]:
    """Every function and method of `docs` with at least 4 lines, in file order."""
    out = []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        file_lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno - node.lineno < 3:
                continue
            col = node.col_offset
            lines = [ln[col:] if ln[:col].isspace() else ln for ln in file_lines[node.lineno - 1 : node.end_lineno]]
            lines = [ln.rstrip() for ln in lines]
            first = node.body[0]
            docstring = isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str)
            stmts = [s for s in ast.walk(node) if isinstance(s, ast.stmt) and s is not node]
            stmts = [s for s in stmts if not (docstring and s is first)]
            indent = lambda i: len(lines[i]) - len(lines[i].lstrip())
            starts = sorted(
                {s.lineno - node.lineno for s in stmts if indent(s.lineno - node.lineno) == s.col_offset - col}
            )
            ends = sorted({s.end_lineno - node.lineno for s in stmts if not hasattr(s, "body")})
            keep = lambda i: MIN_LINE_CHARS <= len(lines[i].strip()) and len(lines[i]) <= MAX_LINE_CHARS
            if starts := [i for i in starts if keep(i)]:
                out.append(Function(doc.name, node.lineno, lines, starts, [i for i in ends if keep(i)]))
    return sorted(out, key=lambda f: (f.source, f.lineno))


def round_robin(items: list, rng: random.Random, key) -> Iterator:
    """`items` in a random order that takes one from each `key` group in turn (so no file dominates)."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    rng.shuffle(queues)
    while queues:
        queues = [q for q in queues if q]
        for q in queues:
            yield q.pop()


def prompt(f: Function, k: int) -> str:
    return "".join(ln + "\n" for ln in f.lines[:k])


def next_line_items(
    fns: list[Function], rng: random.Random, n: int, max_chars: int = MAX_LINE_CHARS
) -> Iterator[tuple[Function, int]]:
    """n (function, line index) pairs, one per function: a line within the first MAX_CONTEXT_LINES + 1 that starts a
    statement and has at most `max_chars` characters."""
    count = 0
    for f in round_robin(fns, rng, key=lambda f: f.source):
        ks = [k for k in f.starts if k <= MAX_CONTEXT_LINES and len(f.lines[k]) <= max_chars]
        if ks and count < n:
            count += 1
            yield f, rng.choice(ks)


def build_mc(fns: list[Function], rng: random.Random, n: int) -> list[dict]:
    """The true next line and 3 lines that start statements of other functions, each re-indented as the true one is."""
    pool = sorted({(f.source, f.lineno, f.lines[i].strip()) for f in fns for i in f.starts})
    docs = []
    for f, k in next_line_items(fns, rng, n):
        gold = f.lines[k]
        indent = gold[: len(gold) - len(gold.lstrip())]
        distractors: list[str] = []
        while len(distractors) < 3:
            source, lineno, text = rng.choice(pool)
            line = indent + text
            if (source, lineno) != (f.source, f.lineno) and line != gold and line not in distractors:
                distractors.append(line)
        choices = [gold, *distractors]
        rng.shuffle(choices)
        docs.append({"context": prompt(f, k), "choices": choices, "label": choices.index(gold), "source": _at(f, k)})
    return docs


def build_lambada(fns: list[Function], rng: random.Random, n: int) -> list[dict]:
    """A function's lines up to the end of a simple statement that ends in ' identifier', where the identifier (not
    a keyword, `self` or `cls`) appears earlier in the passage; the target is ' identifier' (lambada_openai's form)."""
    docs = []
    for f in round_robin(fns, rng, key=lambda f: f.source):
        if len(docs) == n:
            break
        candidates = []
        for k in f.ends:
            if k > 2 * MAX_CONTEXT_LINES or not (m := FINAL_WORD.match(f.lines[k])):
                continue
            head, word = m.groups()
            context = prompt(f, k) + head
            if word not in ("self", "cls") and not keyword.iskeyword(word) and re.search(rf"\b{word}\b", context):
                candidates.append((k, context, word))
        if candidates:
            k, context, word = rng.choice(candidates)
            docs.append({"context": context, "target": " " + word, "source": _at(f, k)})
    return docs


def build_gen(fns: list[Function], rng: random.Random, n: int) -> list[dict]:
    """The first lines of a function and its next line (one that fits MAX_GEN_CHARS)."""
    items = next_line_items(fns, rng, n, MAX_GEN_CHARS)
    return [{"context": prompt(f, k), "target": f.lines[k], "source": _at(f, k)} for f, k in items]


def build_ppl(docs: list[Document], rng: random.Random, n: int) -> list[dict]:
    """Whole modules up to PPL_BYTES[1], and chunks of longer ones: runs of top-level statements (with the lines
    between them) of a random size in PPL_BYTES, at most 3 per file."""
    out = []
    for doc in rng.sample(docs, len(docs)):
        if len(doc.text.encode()) <= PPL_BYTES[1]:
            out.append({"text": doc.text, "source": f"{doc.name}:1"})
            continue
        try:
            starts = [node.lineno for node in ast.parse(doc.text).body]
        except SyntaxError:
            continue
        lines = doc.text.splitlines(keepends=True)
        starts = [s - 1 for s in starts] + [len(lines)]
        chunks = []
        i = 0
        while i < len(starts) - 1:
            size = rng.randint(*PPL_BYTES)
            j = i + 1
            while j < len(starts) - 1 and len("".join(lines[starts[i] : starts[j + 1]]).encode()) <= size:
                j += 1
            text = "".join(lines[starts[i] : starts[j]])
            if PPL_BYTES[0] <= len(text.encode()) <= 2 * PPL_BYTES[1]:
                chunks.append({"text": text, "source": f"{doc.name}:{starts[i] + 1}"})
            i = j
        out += rng.sample(chunks, min(3, len(chunks)))
    return sorted(rng.sample(out, min(n, len(out))), key=lambda d: d["source"])


def _at(f: Function, k: int) -> str:
    return f"{f.source}:{f.lineno + k}"


def build(out_dir: pathlib.Path = HERE) -> dict[str, list[dict]]:
    """Writes each task's JSONL and sources.json into `out_dir`; returns the documents by task."""
    docs = held_out()
    fns = functions(docs)
    rng = lambda task: random.Random(f"{SEED}:{task}")  # one stream per task: changing one leaves the others
    tasks = {
        "stdlib_mc": build_mc(fns, rng("stdlib_mc"), SIZES["stdlib_mc"]),
        "stdlib_lambada": build_lambada(fns, rng("stdlib_lambada"), SIZES["stdlib_lambada"]),
        "stdlib_ppl": build_ppl(docs, rng("stdlib_ppl"), SIZES["stdlib_ppl"]),
        "stdlib_gen": build_gen(fns, rng("stdlib_gen"), SIZES["stdlib_gen"]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in tasks.items():
        with (out_dir / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sources = {
        "python": sys.version.split()[0],
        "seed": SEED,
        "val_fraction": base.get_config().data.val_fraction,
        "held_out_files": [d.name for d in docs],
        "files": {task: sorted({row["source"].rsplit(":", 1)[0] for row in rows}) for task, rows in tasks.items()},
    }
    (out_dir / "sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    return tasks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.eval_tasks.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="directory to write (default: this package's)")
    args = parser.parse_args(argv)
    for task, rows in build(args.out).items():
        size = (args.out / f"{task}.jsonl").stat().st_size
        print(f"{task}: {len(rows)} documents, {size / 1024:.1f} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
