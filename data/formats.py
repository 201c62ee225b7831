"""Post-training data: JSONL records of conversations (`data.format='chat'`) or preference pairs
(`data.format='preference'`) -> the rows a train step reads.

Chat records are `{"messages": [{"role", "content"}, ...]}`, rendered with the tokenizer's chat template
(data/chat.py: a Hugging Face directory's own, beside its tokenizer.json, rendered as transformers renders it; ChatML
for our tokenizers). A conversation is rendered prefix by prefix, so each assistant message's text (its content and
the end-of-turn marker the template closes it with) is known exactly; the pieces are tokenized one by one, and the
assistant's tokens are the ones learned (weight 1; `data.train_on_prompt`: every token). Conversations are packed
into windows of seq_len + 1 tokens, best fit by decreasing length: `segment_ids` keep attention inside each (positions
restart), and a target weighs 0 where it crosses into the next conversation or padding.

Preference records are TRL's forms: standard `{"prompt", "chosen", "rejected"}` strings (each response ends with the
end-of-document token, as TRL appends EOS), or conversational, each of the three a list of messages (the prompt
rendered with the generation prompt, each response as the template continues it). A pair is one row each of
`chosen` and `rejected` [seq_len + 1] with `chosen_weights` / `rejected_weights` [seq_len] on their response targets.

A record that cannot be used (not JSON, a missing field, empty content, an unknown role, no assistant message,
longer than seq_len + 1 tokens) is counted and skipped with one warning naming the first few line numbers; a file
without a usable record is a DataError. The split into training and validation is corpus.is_validation of
'<file name>:<line index>', as for JSONL text corpora.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from data import corpus
from data.chat import ROLES, ChatError, ChatTemplate, read_template
from data.errors import DataError
from data.tokenizer import Tokenizer


class BadRecord(ValueError):
    """Why a record is skipped."""


@dataclasses.dataclass(frozen=True)
class Split:
    """A split's rows: field -> array with one row per window (chat) or pair (preference)."""

    rows: dict[str, np.ndarray]
    records: int  # the records in it

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))


def template_for(tokenizer_spec: str, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template beside a tokenizer file (its Hugging Face directory's), else ChatML."""
    path = pathlib.Path(tokenizer_spec).expanduser()
    return read_template(path.parent, tokenizer) if path.is_file() else ChatTemplate()


def records(spec: str) -> Iterator[tuple[str, int, object]]:
    """(split name, 1-based line number, parsed JSON or a BadRecord) of every non-empty line of a .jsonl file."""
    root, files = corpus.resolve_files(spec)
    for path in files:
        name = str(path.relative_to(root)) if path != root else path.name
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    value = BadRecord("not JSON")
                yield f"{name}:{i}", i + 1, value


def texts(recs) -> Iterator[str]:
    """Every string in `records`' values: what a `bpe:N` tokenizer for the corpus is trained on."""

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for _, _, value in recs:
        yield from strings(value)


def messages(value, field: str) -> list[dict]:
    """A record's list of messages, each {role, content} with non-empty text content in a known role."""
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{field} is not a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise BadRecord(f"{field}[{i}] is not an object with a role and a string content")
        if m["role"] not in ROLES:
            raise BadRecord(f"{field}[{i}].role={m['role']!r} is not one of {', '.join(ROLES)}")
        if not m["content"]:
            raise BadRecord(f"{field}[{i}] has empty content")
    return value


def _continues(template: ChatTemplate, head: str, text: str) -> str:
    """The text the template adds after `head` (a record it does not render prefix by prefix is refused)."""
    if not text.startswith(head):
        raise BadRecord("the chat template does not render it prefix by prefix")
    return text[len(head) :]


def render_chat(
    value, template: ChatTemplate, tokenizer: Tokenizer, train_on_prompt: bool = False
) -> tuple[list[int], list[float]]:
    """A chat record's token ids and their weights (1: the token is learned), rendered as the docstring says."""
    if not isinstance(value, dict) or "messages" not in value:
        raise BadRecord("no 'messages' field")
    msgs = messages(value["messages"], "messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("no assistant message (nothing to learn)")
    try:
        pieces, done = [], ""  # (text, learned)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = template.render(msgs[:i], add_generation_prompt=True)
            pieces.append((_continues(template, done, head), False))
            done = template.render(msgs[: i + 1], add_generation_prompt=False)
            pieces.append((_continues(template, head, done), True))
        pieces.append((_continues(template, done, template.render(msgs, add_generation_prompt=False)), False))
    except ChatError as e:
        raise BadRecord(str(e)) from None
    ids = template.encode(tokenizer, "")
    weights = [float(train_on_prompt)] * len(ids)
    for text, learned in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        weights += [float(learned or train_on_prompt)] * len(piece)
    return ids, weights


def render_pair(value, template: ChatTemplate, tokenizer: Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of a preference record in either TRL form."""
    if not isinstance(value, dict):
        raise BadRecord("not a JSON object")
    if missing := [k for k in ("prompt", "chosen", "rejected") if k not in value]:
        raise BadRecord(f"no {missing[0]!r} field")
    prompt, chosen, rejected = value["prompt"], value["chosen"], value["rejected"]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if empty := [k for k in ("prompt", "chosen", "rejected") if not value[k]]:
            raise BadRecord(f"{empty[0]!r} is empty")
        end = [tokenizer.eod_id]
        head = [*tokenizer.document_start, *tokenizer.encode(prompt)]
        return head, tokenizer.encode(chosen) + end, tokenizer.encode(rejected) + end
    if any(isinstance(x, str) for x in (prompt, chosen, rejected)):
        raise BadRecord("prompt, chosen and rejected mix strings and lists of messages")
    prompt = messages(prompt, "prompt")
    try:
        head = template.render(prompt, add_generation_prompt=True)
        responses = []
        for field in ("chosen", "rejected"):
            full = template.render(prompt + messages(value[field], field), add_generation_prompt=False)
            responses.append(tokenizer.encode(_continues(template, head, full)))
    except ChatError as e:
        raise BadRecord(str(e)) from None
    return template.encode(tokenizer, head), *responses


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: best fit, longest first (ties by index), each
    bin's indices in increasing order. Deterministic: the windows do not depend on the seed (the stream shuffles
    them)."""
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]


def packed_rows(conversations: list[tuple[list[int], list[float]]], seq_len: int) -> dict[str, np.ndarray]:
    """{'tokens' [N, seq_len + 1], 'loss_weights' [N, seq_len], 'segment_ids' [N, seq_len]} of conversations
    packed by `pack`: target t weighs token t + 1's weight inside its conversation and 0 elsewhere; segment ids count
    the window's conversations from 1 (0: padding)."""
    bins = pack([len(ids) for ids, _ in conversations], seq_len + 1)
    tokens = np.zeros((len(bins), seq_len + 1), np.int32)
    weights = np.zeros((len(bins), seq_len), np.float32)
    segments = np.zeros((len(bins), seq_len), np.int32)
    for w, members in enumerate(bins):
        start = 0
        for s, c in enumerate(members, 1):
            ids, token_weights = conversations[c]
            end = start + len(ids)
            tokens[w, start:end] = ids
            segments[w, start : min(end, seq_len)] = s
            weights[w, start : end - 1] = token_weights[1:]
            start = end
    return {"tokens": tokens, "loss_weights": weights, "segment_ids": segments}


def pair_rows(pairs: list[tuple[list[int], list[int], list[int]]], seq_len: int) -> dict[str, np.ndarray]:
    """{'chosen', 'rejected' [N, seq_len + 1], 'chosen_weights', 'rejected_weights' [N, seq_len]}: prompt +
    response, zero-padded, with weight 1 on the targets that are response tokens."""
    out = {}
    for k, name in ((1, "chosen"), (2, "rejected")):
        tokens = np.zeros((len(pairs), seq_len + 1), np.int32)
        weights = np.zeros((len(pairs), seq_len), np.float32)
        for r, pair in enumerate(pairs):
            prompt, response = pair[0], pair[k]
            tokens[r, : len(prompt) + len(response)] = prompt + response
            weights[r, len(prompt) - 1 : len(prompt) + len(response) - 1] = 1.0
        out[name], out[f"{name}_weights"] = tokens, weights
    return out


def load(cfg, tokenizer: Tokenizer, recs=None) -> tuple[Split, Split]:
    """(train, validation) rows of a chat or preference corpus (`cfg`: a DataConfig; `recs`: its `records`, when
    already read)."""
    template = template_for(cfg.tokenizer, tokenizer)
    kept: tuple[list, list] = ([], [])
    skipped: list[tuple[int, str]] = []
    for name, line, value in records(cfg.corpus) if recs is None else recs:
        try:
            if isinstance(value, BadRecord):
                raise value
            if cfg.format == "chat":
                item = render_chat(value, template, tokenizer, cfg.train_on_prompt)
                length = len(item[0])
            else:
                item = render_pair(value, template, tokenizer)
                length = len(item[0]) + max(len(item[1]), len(item[2]))
            if length > cfg.seq_len + 1:
                raise BadRecord(f"{length} tokens, more than data.seq_len + 1 = {cfg.seq_len + 1}")
        except BadRecord as e:
            skipped.append((line, str(e)))
            continue
        kept[corpus.is_validation(name, cfg.val_fraction)].append(item)
    total = sum(map(len, kept)) + len(skipped)
    if skipped:
        first = "; ".join(f"line {line}: {why}" for line, why in skipped[:3])
        print(
            f"warning: data.corpus={cfg.corpus!r}: skipped {len(skipped)} of {total} records ({first})",
            file=sys.stderr,
            flush=True,
        )
    train, val = kept
    if not train and not val:
        why = f" (line {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"data.corpus={cfg.corpus!r}: no usable data.format={cfg.format!r} record{why}")
    if not val:  # tiny sets: hold out the last record so evaluation always has data
        val = [train.pop()]
    if not train:
        raise DataError(
            f"data.corpus={cfg.corpus!r}: needs at least two usable records to split into train and validation"
        )
    rows = packed_rows if cfg.format == "chat" else pair_rows
    return Split(rows(train, cfg.seq_len), len(train)), Split(rows(val, cfg.seq_len), len(val))
