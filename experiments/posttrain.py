"""Post-training data built from the corpus, and held-out scores of post-trained workdirs (experiments/RESULTS.md).

    python -m experiments.posttrain build --out DIR [--corpus stdlib] [--max_chars 360]
    python -m experiments.posttrain score --workdir W --data FILE [--format chat|preference] [--reference W0]
    python -m experiments.posttrain subset --data FILE --records N --out FILE [--val_fraction 0.05] [--seed 0]
        [--overwrite]
    python -m experiments.posttrain mix --data FILE --replay FILE --out FILE [--val_fraction 0.05] [--overwrite]

`build` writes three JSONL sets from the Python functions with docstrings in the corpus (read with `ast`):
- `doc2code.jsonl` (data.format='chat'): the user gives a signature and its docstring, the assistant writes the
  function (without its docstring);
- `code2doc.jsonl` (chat): the user gives a function without its docstring, the assistant writes the docstring's
  first paragraph (a second skill, for merging);
- `nodoc.jsonl` (chat): the user gives a function with a docstring (its first paragraph), the assistant writes it
  back without the docstring (a format skill: everything the response needs is in the prompt, unlike doc2code);
- `prefs.jsonl` (data.format='preference', conversational): the doc2code prompt; chosen: the real function,
  rejected: the same function with its body's lines shuffled (a seeded permutation that moves at least one).

`subset` writes a smaller training set with the same held-out records: N of FILE's training records, drawn with
`--seed`, and every one of its held-out records (the split `--val_fraction` makes: data/corpus.py `is_validation`,
a hash of the file's name and the line's index). Each record sits at a line index of OUT whose hash puts it on its
side of the split again; the lines between are blank (the reader skips them). So a run on OUT is evaluated on
exactly the records a run on FILE is (experiments/RESULTS.md: LoRA against full fine-tuning by training-set size).

`mix` writes a fine-tuning set that keeps replaying another: FILE's training records evenly interleaved with
REPLAY's (its held-out records left out), and FILE's held-out records placed as `subset` places them. A run on OUT is
evaluated on exactly FILE's held-out records, while it keeps training on REPLAY's task, as SFT mixtures keep general
instruction data beside a new skill (experiments/RESULTS.md: TIES merging of fine-tunes that replay a chat set).

`score` evaluates a workdir on the held-out records of a set (the split training used: data/formats.py): for chat,
the mean loss of the assistant tokens (`eval/loss`, nats per token); for preference, the share of pairs whose chosen
response the workdir prefers: by log-likelihood (`pref/logp_accuracy`), and with `--reference`, by DPO's implicit
reward, the log-ratio to the reference (`pref/dpo_accuracy`, the held-out form of train/dpo_accuracy).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import pathlib
import random
import sys
import textwrap

SETS = ("doc2code", "code2doc", "nodoc", "prefs")


@dataclasses.dataclass(frozen=True)
class Function:
    signature: str  # "def name(args):" as written
    doc: str  # the docstring's first paragraph
    code: str  # the function's source without its docstring, dedented
    source: str  # the function's source with its docstring's first paragraph as the docstring, dedented


def functions(spec: str, max_chars: int) -> list[Function]:
    """Functions with a docstring whose source (without it) is 3+ lines and at most `max_chars` characters."""
    from data import corpus

    out = []
    for doc in corpus.read_documents(spec):
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not ast.get_docstring(node) or node.decorator_list:
                continue
            first = node.body[0]
            if len(node.body) < 2 or first.end_lineno >= node.end_lineno:
                continue
            head = lines[node.lineno - 1 : first.lineno - 1]
            body = lines[first.end_lineno : node.end_lineno]
            code = textwrap.dedent("\n".join(head + body))
            summary = ast.get_docstring(node).split("\n\n")[0].strip()
            if len(code) > max_chars or len(code.splitlines()) < 4 or not summary or not code.startswith("def "):
                continue
            indent = " " * (first.col_offset)
            quoted = [indent + line if line else line for line in f'"""{summary}"""'.splitlines()]
            source = textwrap.dedent("\n".join(head + quoted + body))
            out.append(Function(code.splitlines()[0], summary, code, source))
    return out


def corrupted(code: str, rng: random.Random) -> str:
    """The function with its body's lines in a random order that moves at least one of them."""
    lines = code.splitlines()
    head, body = lines[:1], lines[1:]
    order = list(range(len(body)))
    while order == sorted(order):
        rng.shuffle(order)
    return "\n".join(head + [body[i] for i in order])


def doc2code_prompt(f: Function) -> str:
    return f"Write the function {f.signature}\nthat does this: {f.doc}"


def build(out: pathlib.Path, spec: str, max_chars: int) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    found = functions(spec, max_chars)
    rng = random.Random(0)
    records = {name: [] for name in SETS}
    for f in found:
        user = {"role": "user", "content": doc2code_prompt(f)}
        records["doc2code"].append({"messages": [user, {"role": "assistant", "content": f.code}]})
        body = f"Write the docstring of this function:\n{f.code}"
        records["code2doc"].append(
            {"messages": [{"role": "user", "content": body}, {"role": "assistant", "content": f.doc}]}
        )
        body = f"Remove the docstring from this function:\n{f.source}"
        records["nodoc"].append(
            {"messages": [{"role": "user", "content": body}, {"role": "assistant", "content": f.code}]}
        )
        records["prefs"].append(
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": f.code}],
                "rejected": [{"role": "assistant", "content": corrupted(f.code, rng)}],
            }
        )
    for name, rows in records.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in records.items()}


def subset(
    data_file: str, records: int, out: str, val_fraction: float = 0.05, seed: int = 0, overwrite: bool = False
) -> dict[str, int]:
    """Writes `records` of `data_file`'s training records and all its held-out ones to `out` (see the module
    docstring); returns the counts. An existing `out` is replaced only with `overwrite`."""
    from data.errors import DataError

    check_output(data_file, out, overwrite)
    train, held = split_lines(pathlib.Path(data_file), val_fraction)
    if not 0 < records <= len(train):
        raise DataError(f"--records={records}: between 1 and the {len(train)} training records of {data_file!r}")
    rows = placed(random.Random(seed).sample(train, records), held, pathlib.Path(out), val_fraction)
    return {"train": records, "held_out": len(held), "lines": len(rows)}


def mix(
    data_file: str, replay_file: str, out: str, val_fraction: float = 0.05, overwrite: bool = False
) -> dict[str, int]:
    """Writes `data_file`'s records with `replay_file`'s training records interleaved among its own (see the module
    docstring); returns the counts. An existing `out` is replaced only with `overwrite`."""
    from data.errors import DataError

    check_output(data_file, out, overwrite)
    if (
        pathlib.Path(replay_file).suffix != ".jsonl"
        or pathlib.Path(replay_file).resolve() == pathlib.Path(out).resolve()
    ):
        raise DataError(f"--replay={replay_file!r}: must be a .jsonl file other than --out")
    train, held = split_lines(pathlib.Path(data_file), val_fraction)
    replay, _ = split_lines(pathlib.Path(replay_file), val_fraction)
    if not train or not replay:
        raise DataError(f"--data={data_file!r} --replay={replay_file!r}: each needs at least one training record")
    # the k-th of all T + R training records comes from data_file where floor(k T / (T + R)) steps up: evenly spread
    total, mixed, taken = len(train) + len(replay), [], 0
    for k in range(total):
        take = (k + 1) * len(train) // total
        mixed.append(train[taken] if take > taken else replay[k - taken])
        taken = take
    rows = placed(mixed, held, pathlib.Path(out), val_fraction)
    return {"train": len(train), "replay": len(replay), "held_out": len(held), "lines": len(rows)}


def check_output(data_file: str, out: str, overwrite: bool) -> None:
    from data.errors import DataError

    source, target = pathlib.Path(data_file), pathlib.Path(out)
    if source.suffix != ".jsonl" or target.suffix != ".jsonl":
        raise DataError(f"--data={data_file!r} --out={out!r}: both must be .jsonl files")
    if source.resolve() == target.resolve():
        raise DataError(f"--out={out!r}: the same file as --data (it would be overwritten)")
    if target.exists() and not overwrite:
        raise DataError(f"--out={out!r}: exists (pass --overwrite to replace it)")


def split_lines(source: pathlib.Path, val_fraction: float) -> tuple[list[str], list[str]]:
    """(training, held-out) non-blank lines of a JSONL set, split as data/formats.py splits its records."""
    from data import corpus

    train, held = [], []
    for i, line in enumerate(source.read_text(encoding="utf-8").split("\n")):
        if line.strip():
            (held if corpus.is_validation(f"{source.name}:{i}", val_fraction) else train).append(line)
    return train, held


def placed(train: list[str], held: list[str], target: pathlib.Path, val_fraction: float) -> list[str]:
    """Writes `target` with each line at an index whose hash puts it on its side of the split (blank lines between),
    in the given orders; returns the rows written."""
    from data import corpus

    queues, rows, i = (list(train), list(held)), [], 0  # indexed by "is this line held out"
    while queues[0] or queues[1]:
        side = queues[corpus.is_validation(f"{target.name}:{i}", val_fraction)]
        rows.append(side.pop(0) if side else "")
        i += 1
    target.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return rows


def score(
    workdir: str,
    data_file: str,
    fmt: str,
    reference: str | None = None,
    batch_size: int = 16,
    seq_len: int = 0,
    val_fraction: float = 0.0,
) -> dict:
    """Held-out scores of `workdir` on `data_file`'s validation records (see the module docstring): the records the
    workdir's data.seq_len and data.val_fraction hold out, or those `seq_len` and `val_fraction` do (to score a
    run's starting point on the set it was fine-tuned on)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from data import formats
    from data.pipeline import record_batches
    from model import Transformer
    from training.checkpoint import load_for_inference
    from training.evaluation import Inputs, cross_entropy, evaluate, make_eval_step, split_weights

    run, weights, tokenizer, _ = load_for_inference(workdir)
    cfg = dataclasses.replace(run.data, corpus=data_file, format=fmt, train_on_prompt=False)
    cfg = dataclasses.replace(cfg, seq_len=seq_len or cfg.seq_len, val_fraction=val_fraction or cfg.val_fraction)
    _, val = formats.load(cfg, tokenizer)
    model = Transformer(run.model)
    params, state = split_weights(weights)
    if fmt == "chat":
        eval_step = jax.jit(make_eval_step(model, tokenizer.token_bytes))
        return {
            **evaluate(eval_step, params, record_batches(val.rows, batch_size, len(val)), state),
            "records": len(val),
        }

    @jax.jit
    def logps(params, tokens_BT1, weights_BT):
        out, targets_BT = Inputs()(tokens_BT1, model, {"params": params})
        return -jnp.sum(cross_entropy(out.logits_BTV, targets_BT)[1] * weights_BT, axis=1)

    def margins(params) -> np.ndarray:
        rows, out = val.rows, []
        for i in range(0, len(val), batch_size):
            chosen = logps(params, rows["chosen"][i : i + batch_size], rows["chosen_weights"][i : i + batch_size])
            rejected = logps(params, rows["rejected"][i : i + batch_size], rows["rejected_weights"][i : i + batch_size])
            out.append(np.asarray(chosen - rejected))
        return np.concatenate(out)

    policy = margins(params)
    result = {
        "pref/logp_accuracy": float(np.mean(policy > 0)),
        "pref/logp_margin": float(np.mean(policy)),
        "records": len(val),
    }
    if reference:
        _, ref_weights, _, _ = load_for_inference(reference)
        ratio = policy - margins(split_weights(ref_weights)[0])
        result |= {"pref/dpo_accuracy": float(np.mean(ratio > 0)), "pref/dpo_margin": float(np.mean(ratio))}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.posttrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write doc2code.jsonl, code2doc.jsonl, nodoc.jsonl and prefs.jsonl into --out")
    b.add_argument("--out", required=True)
    b.add_argument("--corpus", default="stdlib")
    b.add_argument("--max_chars", type=int, default=360)
    s = sub.add_parser("score", help="held-out scores of a workdir on a chat or preference set")
    s.add_argument("--workdir", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--format", default="chat", choices=("chat", "preference"))
    s.add_argument("--reference", default=None)
    s.add_argument("--seq_len", type=int, default=0, help="0: the workdir's data.seq_len")
    s.add_argument("--val_fraction", type=float, default=0.0, help="0: the workdir's data.val_fraction")
    t = sub.add_parser("subset", help="N training records of a set, with all its held-out records, into --out")
    t.add_argument("--data", required=True)
    t.add_argument("--records", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--val_fraction", type=float, default=0.05, help="the split the runs use (data.val_fraction)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m = sub.add_parser("mix", help="a set's records with another's training records interleaved, into --out")
    m.add_argument("--data", required=True)
    m.add_argument("--replay", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--val_fraction", type=float, default=0.05, help="the split the runs use (data.val_fraction)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    from data.errors import DataError

    try:
        if args.command == "build":
            if args.max_chars <= 0:
                raise DataError(f"--max_chars={args.max_chars}: must be a positive number of characters")
            counts = build(pathlib.Path(args.out).expanduser(), args.corpus, args.max_chars)
        elif args.command in ("subset", "mix"):
            if not 0 < args.val_fraction < 1:
                raise DataError(f"--val_fraction={args.val_fraction}: must be in (0, 1)")
            if args.command == "subset":
                counts = subset(args.data, args.records, args.out, args.val_fraction, args.seed, args.overwrite)
            else:
                counts = mix(args.data, args.replay, args.out, args.val_fraction, args.overwrite)
        else:
            if args.seq_len < 0 or not 0 <= args.val_fraction < 1:
                raise DataError(f"--seq_len={args.seq_len} --val_fraction={args.val_fraction}: need >= 0 and [0, 1)")
            counts = score(
                args.workdir,
                args.data,
                args.format,
                args.reference,
                seq_len=args.seq_len,
                val_fraction=args.val_fraction,
            )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
