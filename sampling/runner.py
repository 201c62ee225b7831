"""What infer.py does with a loaded checkpoint: turn prompts into samples (streamed, stopped at stop
strings, batched) or beams. (Scoring a text file is training.evaluation.score_file.)"""

from __future__ import annotations

import dataclasses
import re
from typing import TextIO

import numpy as np

from data.tokenizer import Tokenizer
from model import ModelConfig, Transformer
from model.positions import POSITIONS
from model.runtime import DecodeConfig, Runtime
from parallel import decoding
from sampling import speculative
from sampling.beam import beam_search
from sampling.decode import DONE, generate_batch, prompt_ids
from sampling.rules import Rules


@dataclasses.dataclass(frozen=True)
class Request:
    prompts: list[str]
    max_new_tokens: int = 200
    max_len: int = 256
    num_samples: int = 1
    seed: int = 0
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    beam_size: int = 1
    stop: tuple[str, ...] = ()
    eos: bool = True
    kv_cache: bool = True
    batch_size: int = 32
    speculative: str = ""  # '' (plain decoding), 'mtp' or 'draft' (run_speculative)
    draft_tokens: int = 0  # per verify pass; 0: `draft_tokens`' default
    decode: DecodeConfig = DecodeConfig()  # how the model decodes (cache, weight format, the kind's variant)
    mesh: str = ""  # decode on a mesh of the local devices, e.g. 'data=2,tensor=4' (parallel/decoding.py); '': one


# Tokens a draft model proposes per verify pass unless told otherwise (MTP heads draft one each).
DRAFT_MODEL_TOKENS = 4


def draft_tokens(cfg: ModelConfig, given: int, drafter: str) -> int:
    """Tokens drafted per verify pass: `given` when > 0, else one per MTP head of `cfg` for drafter 'mtp' and
    DRAFT_MODEL_TOKENS for a draft model ('draft'). MTP heads draft one token each: a ValueError names a `given`
    above their number, or a model without them."""
    if drafter == "mtp" and not cfg.mtp.num_heads:
        raise ValueError("the model has no MTP heads (model.mtp.num_heads=0)")
    if drafter == "mtp" and given > cfg.mtp.num_heads:
        raise ValueError(
            f"--draft_tokens={given}: model.mtp.num_heads={cfg.mtp.num_heads} MTP heads, each drafting one token"
        )
    if given > 0:
        return given
    return cfg.mtp.num_heads if drafter == "mtp" else DRAFT_MODEL_TOKENS


@dataclasses.dataclass
class Speeds:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""A `--stop` string as typed in a shell, where "\n" reaches the program as a backslash and an n: `\n` is a
    newline, `\t` a tab and `\\` one backslash; any other backslash stays as it is."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


class Watcher:
    """The decode loop's host callback: collects each row's tokens, stops rows whose text reached a
    stop string, and (with `echo`) prints row 0's text as it grows."""

    def __init__(self, tokenizer: Tokenizer, rows: int, stops: tuple[str, ...], eos_id: int, echo: TextIO | None):
        self.tokenizer, self.stops, self.eos_id, self.echo = tokenizer, stops, eos_id, echo
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.printed = 0
        self.hold = max((len(s) for s in stops), default=1) - 1  # a stop string may be half-written

    def __call__(self, tokens_B: np.ndarray, step) -> np.ndarray:
        stop_B = np.zeros(len(self.ids), bool)
        for b, token in enumerate(np.asarray(tokens_B).tolist()):
            if token in (DONE, self.eos_id):
                continue
            self.ids[b].append(token)
            if self.stops:
                text = self.tokenizer.decode(self.ids[b])
                stop_B[b] = any(s in text for s in self.stops)
        if self.echo is not None:
            text = self.tokenizer.decode(self.ids[0]).rstrip("\ufffd")  # a character still missing bytes
            text = cut_at_stop(text, self.stops)
            self.show(text[: max(len(text) - self.hold, self.printed)] if self.hold else text)
        return stop_B

    def show(self, text: str) -> None:
        """Prints what `text` adds to what was already printed."""
        if len(text) > self.printed:
            self.echo.write(text[self.printed :])
            self.echo.flush()
            self.printed = len(text)


def check_fits(m: ModelConfig, request: Request, longest_prompt: int) -> None:
    """ValueError (shown to the user as one line) for a request the model cannot serve."""
    if POSITIONS[m.position].bounded and request.max_len > m.max_seq_len:
        raise ValueError(
            f"--max_len={request.max_len}: a model with learned positions reaches only its seq_len={m.max_seq_len}"
        )
    if longest_prompt >= request.max_len:
        raise ValueError(
            f"a prompt of {longest_prompt} tokens (with the leading end-of-document token) does not fit in "
            f"--max_len={request.max_len} with room for a new token"
        )


def run_request(cfg: ModelConfig, params, tokenizer: Tokenizer, request: Request, out: TextIO) -> Speeds:
    """Writes every prompt's samples (or best beams) to `out`; returns the measured speeds."""
    model = Transformer(cfg, Runtime.decoding(request.decode))
    encoded = [prompt_ids(tokenizer, p) for p in request.prompts]
    check_fits(cfg, request, max(len(ids) for ids in encoded))
    if not request.mesh:
        return _run(model, params, tokenizer, request, encoded, out, shards=1)
    if request.beam_size > 1:
        raise ValueError(f"--mesh={request.mesh!r}: beam search decodes on one device (drop --mesh or --beam_size)")
    layout = decoding.decode_layout(cfg, request.mesh)
    with layout.activate():
        params = decoding.place_weights(params, cfg, layout)
        return _run(model, params, tokenizer, request, encoded, out, decoding.row_shards(layout))


def _run(model, params, tokenizer, request: Request, encoded: list[list[int]], out: TextIO, shards: int) -> Speeds:
    """run_request's decoding, each batch of rows padded (with copies of its last prompt) to a multiple of
    `shards`, the mesh's row shards."""
    eos_id = tokenizer.eod_id if request.eos else -1
    speeds = Speeds()
    if request.beam_size > 1:
        for i, (text, ids) in enumerate(zip(request.prompts, encoded)):
            beams = beam_search(
                model, params, ids, request.max_new_tokens, request.beam_size, max_len=request.max_len, eos_id=eos_id
            )
            speeds.decode_tokens += beams.steps * request.beam_size  # prefill included in the time
            speeds.decode_seconds += beams.seconds
            for j, (tokens, score) in enumerate(zip(beams.tokens[: request.num_samples], beams.scores)):
                header = f"prompt {i + 1}/{len(encoded)}, beam {j + 1} (log-prob {score:.3f})"
                _write(out, header, text + cut_at_stop(tokenizer.decode(tokens), request.stop), request, len(encoded))
        return speeds

    rules = Rules(request.temperature, request.top_k, request.top_p, request.min_p)
    rows = [(i, j) for i in range(len(encoded)) for j in range(request.num_samples)]
    stream = len(rows) == 1
    for first in range(0, len(rows), request.batch_size):
        chunk = rows[first : first + request.batch_size]
        prompts = [encoded[i] for i, _ in chunk]
        prompts += [prompts[-1]] * (-len(prompts) % shards)
        watcher = None
        if stream or request.stop:
            watcher = Watcher(tokenizer, len(prompts), request.stop, eos_id, out if stream else None)
        if stream:
            out.write(request.prompts[0])
            out.flush()
        generation = generate_batch(
            model,
            params,
            prompts,
            request.max_new_tokens,
            rules,
            max_len=request.max_len,
            eos_id=eos_id,
            seed=request.seed,
            first_row=first,
            kv_cache=request.kv_cache,
            on_token=watcher,
        )
        speeds.prefill_tokens += generation.prefill_tokens
        speeds.prefill_seconds += generation.prefill_seconds
        speeds.decode_tokens += generation.decode_tokens
        speeds.decode_seconds += generation.decode_seconds
        for (i, j), tokens in zip(chunk, generation.tokens):
            text = cut_at_stop(tokenizer.decode(tokens), request.stop)
            if stream:
                watcher.show(text)
                out.write("\n")
            else:
                header = f"prompt {i + 1}/{len(encoded)}, sample {j + 1}/{request.num_samples}"
                _write(out, header, request.prompts[i] + text, request, len(encoded))
    return speeds


def run_speculative(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    request: Request,
    out: TextIO,
    err: TextIO,
    draft: tuple[ModelConfig, object] | None = None,
) -> None:
    """Samples every prompt with speculative decoding (drafting with the model's MTP heads, or with `draft`'s
    (config, params) model), writes them to `out`, and reports to `err` the acceptance rate per draft position
    and tokens/s against plain decoding of the same prompts (run after it, same rules and seed)."""
    model = Transformer(cfg, Runtime.decoding(request.decode))
    encoded = [prompt_ids(tokenizer, p) for p in request.prompts]
    check_fits(cfg, request, max(len(ids) for ids in encoded))
    eos_id = tokenizer.eod_id if request.eos else -1
    k = draft_tokens(cfg, request.draft_tokens, "mtp" if draft is None else "draft")
    if draft is None:
        drafter, draft_params = speculative.MTPDrafter(cfg, k, request.decode), None
    else:
        drafter, draft_params = speculative.ModelDrafter(Transformer(draft[0]), k), draft[1]
    rules = Rules(request.temperature, request.top_k, request.top_p, request.min_p)
    rows = [(i, j) for i in range(len(encoded)) for j in range(request.num_samples)]
    accepted, proposed = np.zeros(k), np.zeros(k)
    spec_speed, plain_speed, rounds = Speeds(), Speeds(), 0
    for first in range(0, len(rows), request.batch_size):
        chunk = rows[first : first + request.batch_size]
        prompts = [encoded[i] for i, _ in chunk]
        common = dict(max_len=request.max_len, eos_id=eos_id, seed=request.seed, first_row=first)
        generation = speculative.generate(
            model, params, prompts, request.max_new_tokens, rules, drafter=drafter, draft_params=draft_params, **common
        )
        plain = generate_batch(model, params, prompts, request.max_new_tokens, rules, **common)
        accepted, proposed = accepted + generation.accepted_K, proposed + generation.proposed_K
        rounds += generation.rounds
        spec_speed.decode_tokens += generation.decode_tokens
        spec_speed.decode_seconds += generation.decode_seconds
        plain_speed.decode_tokens += sum(len(t) for t in plain.tokens)
        plain_speed.decode_seconds += plain.decode_seconds
        for (i, j), tokens in zip(chunk, generation.tokens):
            header = f"prompt {i + 1}/{len(encoded)}, sample {j + 1}/{request.num_samples}"
            text = request.prompts[i] + cut_at_stop(tokenizer.decode(tokens), request.stop)
            _write(out, header, text, request, len(encoded))
    rates = " ".join(f"{a / max(n, 1):.3f}" for a, n in zip(accepted, proposed))
    speed = lambda s: s.decode_tokens / s.decode_seconds if s.decode_seconds > 0 else float("nan")  # noqa: E731
    what = "mtp heads" if draft is None else "draft model"
    print(
        f"speculative ({what}, k={k}): acceptance per draft position [{rates}], "
        f"{spec_speed.decode_tokens / max(rounds, 1):.2f} tokens per verify round | "
        f"decode {speed(spec_speed):,.0f} tokens/s vs plain {speed(plain_speed):,.0f} tokens/s "
        f"({speed(spec_speed) / speed(plain_speed):.2f}x)",
        file=err,
    )


def _write(out: TextIO, header: str, text: str, request: Request, prompts: int) -> None:
    if prompts > 1 or request.num_samples > 1:
        out.write(f"=== {header} ===\n")
    out.write(text + "\n")
    out.flush()


def report_speed(speeds: Speeds, file: TextIO) -> None:
    def rate(tokens: int, seconds: float) -> str:
        return f"{tokens} tokens in {seconds:.3f}s ({tokens / seconds:,.0f} tokens/s)" if seconds > 0 else "n/a"

    print(
        f"prefill: {rate(speeds.prefill_tokens, speeds.prefill_seconds)} | "
        f"decode: {rate(speeds.decode_tokens, speeds.decode_seconds)}",
        file=file,
    )
