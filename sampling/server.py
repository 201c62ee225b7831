"""The OpenAI-compatible HTTP server over the serving engine (sampling/engine.py): what `infer.py --serve` runs.

    POST /v1/completions        a text, texts, token ids or lists of them; n, stop, logprobs (0..5), echo, stream
    POST /v1/chat/completions   messages through the model's chat template (data/chat.py); logprobs, stream
    GET  /v1/models, /health, /metrics (Prometheus text: queue, rows, pages, tokens/s, time to first token, counters)
    POST /tokenize, /detokenize, GET /tokenizer_info: vLLM's tokenizer endpoints, which lm-evaluation-harness's
         `local-completions` model finds, so it needs nothing but the server's URL

Each (prompt, sample) of a request is one engine request. Choice k of a request draws as row k of infer.py's batch
of the same prompts with the same seed and `--num_samples n` (SamplingParams.sample_index = k), so a seeded sample
reproduces offline; a request without a seed gets a random one. A text prompt starts a document (it follows the
end-of-document token, as infer.py's prompts do); token ids are used as they are.

The engine's events reach the event loop through `call_soon_threadsafe`. A client that goes away (mid-stream, or
while it waits for a whole answer) has its engine requests cancelled, so their pages are free at the next step.
Every field is checked before anything reaches the engine: malformed JSON, a wrong type, an unknown field, a value
out of range or a request the engine can never serve is a 400 with OpenAI's error body naming the field; a full
queue is a 429 with Retry-After. The app's lifespan starts the engine, compiles its two calls on a warm-up request
before the first client can connect, and drains it at shutdown: on SIGTERM uvicorn stops accepting connections, the
requests in flight finish, and `serve` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from data.chat import ChatError, ChatTemplate, messages_of
from data.tokenizer import Tokenizer
from sampling.decode import prompt_ids
from sampling.engine import Engine, Event, Handle, QueueFull, RequestError, SamplingParams, Stats, TokenLogprob
from sampling.runner import cut_at_stop

MAX_STOPS = 16  # stop strings a request may give (each is looked for after every token)
MAX_BODY = 16 << 20  # bytes of a request body
RETRY_AFTER = "1"  # seconds a client refused for a full queue is told to wait


class BadRequest(Exception):
    """A request answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.headers = message, param, status, headers or {}

    def response(self) -> JSONResponse:
        kind = {429: "rate_limit_error", 500: "server_error"}.get(self.status, "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": None}
        return JSONResponse({"error": error}, self.status, self.headers)


# ---------------------------------------------------------------------------------------------- request fields
REQUIRED = object()
NUMBER = (int, float)


@dataclasses.dataclass(frozen=True)
class Field:
    """A request field: the JSON types it takes, its value when absent or null (REQUIRED: none), the rule it keeps."""

    types: tuple[type, ...]
    default: object = None
    ok: Callable[[object], bool] = lambda value: True
    rule: str = ""


def _stops_ok(value) -> bool:
    stops = [value] if isinstance(value, str) else value
    return len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)


SAMPLING_FIELDS = {
    "model": Field((str,)),  # any name: this server serves one model
    "user": Field((str,)),
    "max_tokens": Field((int,), None, lambda v: v >= 0, "must be >= 0"),
    "temperature": Field(NUMBER, 1.0, lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
    "top_p": Field(NUMBER, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": Field((int,), 0, lambda v: v >= 0, "must be >= 0 (0: no limit)"),
    "min_p": Field(NUMBER, 0.0, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "seed": Field((int,), None, lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
    "stop": Field((str, list), None, _stops_ok, f"a non-empty string or a list of at most {MAX_STOPS} of them"),
    "n": Field((int,), 1, lambda v: v >= 1, "must be >= 1"),
    "stream": Field((bool,), False),
    "stream_options": Field(
        (dict,),
        {},
        lambda v: set(v) <= {"include_usage"} and isinstance(v.get("include_usage", False), bool),
        "only {include_usage: true|false}",
    ),  # fmt: skip
    "frequency_penalty": Field(NUMBER, 0, lambda v: v == 0, "only 0 (this server applies no penalties)"),
    "presence_penalty": Field(NUMBER, 0, lambda v: v == 0, "only 0 (this server applies no penalties)"),
    "logit_bias": Field((dict,), None, lambda v: not v, "only empty (this server applies no biases)"),
}
COMPLETION_FIELDS = SAMPLING_FIELDS | {
    "prompt": Field((str, list), REQUIRED),
    "logprobs": Field((int,), None, lambda v: v >= 0, "must be >= 0"),
    "echo": Field((bool,), False),
    "best_of": Field((int,), None, lambda v: v >= 1, "must be >= 1 (and equal n: each sample is returned)"),
    "suffix": Field((str,), None, lambda v: not v, "not supported (no insertion)"),
}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages": Field((list,), REQUIRED),
    "max_completion_tokens": Field((int,), None, lambda v: v >= 0, "must be >= 0"),
    "logprobs": Field((bool,), False),
    "top_logprobs": Field((int,), None, lambda v: v >= 0, "must be >= 0"),
    "response_format": Field((dict,), None, lambda v: v == {"type": "text"}, "only {type: text}"),
}


def parse(body, fields: dict[str, Field]) -> dict:
    """Every field of `fields` from a request's JSON body, checked; BadRequest names the first one wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if unknown := sorted(set(body) - set(fields)):
        raise BadRequest(f"{unknown[0]}: unknown field (this server takes {', '.join(sorted(fields))})", unknown[0])
    out = {}
    for name, field in fields.items():
        value = body.get(name)
        if value is None:
            if field.default is REQUIRED:
                raise BadRequest(f"{name}: required", name)
            out[name] = field.default
            continue
        is_bool = isinstance(value, bool)
        if not isinstance(value, field.types) or (is_bool and bool not in field.types):
            raise BadRequest(f"{name}={value!r}: must be {' or '.join(_JSON_TYPES[t] for t in field.types)}", name)
        if (isinstance(value, float) and not math.isfinite(value)) or not field.ok(value):
            raise BadRequest(f"{name}={value!r}: {field.rule or 'must be finite'}", name)
        out[name] = value
    return out


_JSON_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


# ---------------------------------------------------------------------------------------------- one request
@dataclasses.dataclass
class Choice:
    """One (prompt, sample) of a request, as its client has seen it so far."""

    index: int
    prompt_index: int
    prompt: list[int]
    prompt_text: str | None  # (None: given as token ids)
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()  # end-of-turn tokens: the answer ends before them
    handle: Handle | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    started: bool = False  # the echoed prompt has been sent (its first piece)
    offset: int = 0  # characters of the token texts listed so far (legacy logprobs' text_offset)

    def take(self, event: Event, tokenizer: Tokenizer) -> Event | None:
        """`event` as the client sees it (None once the choice has finished): an end-of-turn token ends it, its
        text cut there as the end-of-document token cuts it."""
        if self.finish_reason is not None:
            return None
        tokens, logprobs, text, reason = event.tokens, event.logprobs, event.text, event.finish_reason
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        if end is not None:
            tokens, logprobs, reason = tokens[: end + 1], logprobs[: end + 1], "stop"
            whole = cut_at_stop(tokenizer.decode(self.tokens + tokens[:end]), self.params.stop)
            text = whole[len(self.text) :] if whole.startswith(self.text) else ""
        self.tokens += tokens
        self.logprobs += logprobs
        self.text += text
        self.finish_reason = reason
        return Event(tokens, logprobs, text, reason)

    def prompt_logprobs(self) -> list[tuple[int, TokenLogprob | None]]:
        """(token, its logprob) of every prompt token (None for the first); the engine has them once the choice's
        first event has come."""
        computed = self.handle.prompt_logprobs
        return list(zip(self.prompt, computed))


class ClientGone(Exception):
    """The client disconnected before its answer was whole."""


class Session:
    """One HTTP request's engine requests: their events, queued on the event loop in the order they came."""

    def __init__(self, server: Server, choices: list[Choice]):
        self.server, self.choices = server, choices
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def submit(self) -> None:
        """Queues every choice (all or none: RequestError or QueueFull leave nothing queued)."""
        engine = self.server.engine
        for choice in self.choices:
            engine.check(choice.prompt, choice.params)
        try:
            for choice in self.choices:
                on_event = functools.partial(self._hand_over, choice)
                choice.handle = engine.submit(choice.prompt, choice.params, on_event=on_event)
        except QueueFull:
            self.cancel()
            raise

    def _hand_over(self, choice: Choice, event: Event) -> None:  # (on the engine thread)
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, event))

    async def watch(self, request: Request) -> None:
        """Ends `events` with ClientGone once the client has disconnected."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.queue.put_nowait((None, None))

    async def events(self) -> AsyncIterator[tuple[Choice, Event]]:
        """Each choice's events as its client sees them, until every choice has finished."""
        while any(c.finish_reason is None for c in self.choices):
            choice, event = await self.queue.get()
            if choice is None:
                raise ClientGone
            if (seen := choice.take(event, self.server.tokenizer)) is not None:
                yield choice, seen

    def cancel(self) -> None:
        """Cancels the engine requests still running (the client went away, or an end-of-turn token ended them)."""
        for choice in self.choices:
            if choice.handle is not None and not choice.handle.done.is_set():
                self.server.engine.cancel(choice.handle)
                self.server.cancelled += 1

    def usage(self) -> dict:
        prompts = {c.prompt_index: len(c.prompt) for c in self.choices}  # each prompt once, whatever n
        generated = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": sum(prompts.values()), "completion_tokens": generated,
                "total_tokens": sum(prompts.values()) + generated}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the server
class Server:
    """The HTTP endpoints over one engine. `name`: the model's name in responses (requests may name any);
    `chat`: how chat messages become a prompt (default: ChatML)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, name: str = "model", chat: ChatTemplate | None = None):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.chat = chat or ChatTemplate()
        self.cancelled = 0  # engine requests cancelled
        self._texts: dict[int, str] = {}
        added = tokenizer.to_tokenizers().get_added_tokens_decoder()
        self._specials = {token.content: i for i, token in added.items() if token.special}

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
        ]
        handlers = {BadRequest: _bad_request, HTTPException: _http_error, Exception: _server_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan, max_body_size=MAX_BODY)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        await asyncio.to_thread(warm_up, self.engine)
        try:
            yield
        finally:
            await asyncio.to_thread(self.engine.stop, True)

    # -- completions ---------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        args = parse(await _body(request), COMPLETION_FIELDS)
        if args["best_of"] not in (None, args["n"]):
            raise BadRequest(
                f"best_of={args['best_of']}: only equal to n={args['n']} (each sample is returned)", "best_of"
            )
        limit = self.engine.cfg.max_logprobs
        if args["logprobs"] is not None and args["logprobs"] > limit:
            raise BadRequest(f"logprobs={args['logprobs']}: must be in [0, {limit}]", "logprobs")
        prompts = self._prompts(args["prompt"])
        max_tokens = 16 if args["max_tokens"] is None else args["max_tokens"]
        echo_logprobs = args["echo"] and (args["logprobs"] is not None or max_tokens == 0)
        session = self._session(args, prompts, max_tokens, logprobs=args["logprobs"], prompt_logprobs=echo_logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def piece(choice: Choice, event: Event | None) -> dict:
            """The choice's text and logprobs that `event` adds (None: its whole answer), the echoed prompt first."""
            text, entries = "", []
            if args["echo"] and not choice.started:
                text = choice.prompt_text if choice.prompt_text is not None else self.tokenizer.decode(choice.prompt)
                entries = choice.prompt_logprobs() if args["logprobs"] is not None else []
            choice.started = True
            text += choice.text if event is None else event.text
            entries += [(lp.token, lp) for lp in (choice.logprobs if event is None else event.logprobs)]
            logprobs = None if args["logprobs"] is None else self._legacy_logprobs(choice, entries, args["logprobs"])
            reason = choice.finish_reason if event is None else event.finish_reason
            return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": reason}

        head = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
        if args["stream"]:

            async def chunks():
                async for c, e in session.events():
                    choice = piece(c, e)
                    if choice["text"] or choice["finish_reason"] or (choice["logprobs"] or {}).get("tokens"):
                        yield {**head, "choices": [choice]}

            return self._stream(session, chunks(), head, args["stream_options"].get("include_usage", False))
        await self._finish(request, session)
        choices = [piece(c, None) for c in session.choices]
        return JSONResponse({**head, "choices": choices, "usage": session.usage()})

    def _prompts(self, value) -> list[tuple[list[int], str | None]]:
        """(ids, text or None) of each prompt: a text follows the document start (prompt_ids), ids are as given."""
        is_id = lambda t: isinstance(t, int) and not isinstance(t, bool)
        if isinstance(value, str) or (value and all(is_id(t) for t in value)):
            value = [value]
        if not value:
            raise BadRequest("prompt: empty (give a text, token ids, or a list of either)", "prompt")
        vocab, out = self.tokenizer.vocab_size, []
        for i, p in enumerate(value):
            if isinstance(p, str) and p:
                out.append((prompt_ids(self.tokenizer, p), p))
            elif isinstance(p, list) and p and all(is_id(t) for t in p):
                if bad := [t for t in p if not 0 <= t < vocab]:
                    raise BadRequest(f"prompt[{i}]: token {bad[0]} is not in [0, {vocab})", "prompt")
                out.append((p, None))
            else:
                raise BadRequest(f"prompt[{i}]: must be a non-empty text or a non-empty list of token ids", "prompt")
        return out

    def _legacy_logprobs(self, choice: Choice, entries: list[tuple[int, TokenLogprob | None]], k: int) -> dict:
        """OpenAI's completions logprobs: each token's text, logprob, its k most likely alternatives (and itself, as
        vLLM lists them) and its offset in the choice's text, counted as the tokens' texts add up."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in entries:
            out["tokens"].append(self.token_text(token))
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            top = None
            if lp is not None:
                top = {}
                for t, value in [*lp.top[:k], (token, lp.logprob)]:
                    top.setdefault(self.token_text(t), value)  # (two tokens of one text: the likelier)
            out["top_logprobs"].append(top)
            out["text_offset"].append(choice.offset)
            choice.offset += len(self.tokenizer.decode([token]))  # (a special token adds no text)
        return out

    # -- chat ----------------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        args = parse(await _body(request), CHAT_FIELDS)
        if args["top_logprobs"] is not None and not args["logprobs"]:
            raise BadRequest("top_logprobs: only with logprobs=true", "top_logprobs")
        limit = self.engine.cfg.max_logprobs
        if (args["top_logprobs"] or 0) > limit:
            raise BadRequest(f"top_logprobs={args['top_logprobs']}: must be in [0, {limit}]", "top_logprobs")
        try:
            prompt = self.chat.prompt(self.tokenizer, messages_of(args["messages"]))
        except ChatError as e:
            raise BadRequest(str(e), "messages") from None
        max_tokens = args["max_completion_tokens"] if args["max_completion_tokens"] is not None else args["max_tokens"]
        if max_tokens is None:  # as much as the context holds (a prompt that leaves no room: the engine says so)
            max_tokens = max(1, self.engine.cfg.max_len - len(prompt))
        k = (args["top_logprobs"] or 0) if args["logprobs"] else None
        session = self._session(args, [(prompt, None)], max_tokens, logprobs=k, chat=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(lps: list[TokenLogprob]) -> dict | None:
            return None if k is None else {"content": [self._chat_logprob(lp, k) for lp in lps]}

        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name}
        if args["stream"]:

            async def chunks():
                for c in session.choices:
                    delta = {"role": "assistant", "content": ""}
                    yield {**head, "choices": [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}]}  # fmt: skip
                async for c, e in session.events():
                    if not (e.text or e.finish_reason or (k is not None and e.logprobs)):
                        continue  # (text held back: nothing to say yet)
                    delta = {"content": e.text} if e.text else {}
                    choice = {"index": c.index, "delta": delta, "logprobs": logprobs(e.logprobs)}
                    yield {**head, "choices": [{**choice, "finish_reason": e.finish_reason}]}

            return self._stream(session, chunks(), head, args["stream_options"].get("include_usage", False))
        await self._finish(request, session)
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs(c.logprobs),
             "finish_reason": c.finish_reason}
            for c in session.choices
        ]  # fmt: skip
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": session.usage()})

    def _chat_logprob(self, lp: TokenLogprob, k: int) -> dict:
        entry = lambda t, v: {"token": self.token_text(t), "logprob": v, "bytes": list(self.token_text(t).encode())}
        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:k]]}

    # -- what completions and chat share -------------------------------------------------------------------------
    def _session(self, args: dict, prompts, max_tokens: int, logprobs, prompt_logprobs=False, chat=False) -> Session:
        """The request's choices (prompt i, sample j is choice i * n + j) submitted to the engine."""
        n = args["n"]
        if n * len(prompts) > self.engine.cfg.max_queue:
            raise BadRequest(
                f"n={n} samples of {len(prompts)} prompts: more than the {self.engine.cfg.max_queue} requests this "
                "server queues", "n",
            )  # fmt: skip
        stop = [args["stop"]] if isinstance(args["stop"], str) else list(args["stop"] or [])
        stop = tuple(stop) + (self.chat.stop if chat else ())
        seed = random.randrange(2**32) if args["seed"] is None else args["seed"]
        top_k = args["top_k"] if args["top_k"] < self.tokenizer.vocab_size else 0  # (k >= vocabulary: no limit)
        choices = []
        for i, (ids, text) in enumerate(prompts):
            for j in range(n):
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=float(args["temperature"]),
                    top_p=float(args["top_p"]),
                    top_k=top_k,
                    min_p=float(args["min_p"]),
                    seed=seed,
                    sample_index=i * n + j,
                    stop=stop,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
                stop_ids = self.chat.stop_ids if chat else frozenset()
                choices.append(Choice(i * n + j, i, ids, text, params, stop_ids))
        session = Session(self, choices)
        try:
            session.submit()
        except RequestError as e:
            raise BadRequest(str(e)) from None
        except QueueFull as e:
            raise BadRequest(str(e), status=429, headers={"Retry-After": RETRY_AFTER}) from None
        return session

    async def _finish(self, request: Request, session: Session) -> None:
        """Waits for every choice of `session` to finish, cancelling them if the client goes away first."""
        watcher = asyncio.create_task(session.watch(request))
        try:
            async for _ in session.events():
                pass
        except ClientGone:
            pass
        finally:
            watcher.cancel()
            session.cancel()

    def _stream(self, session: Session, chunks: AsyncIterator[dict], head: dict, usage: bool) -> StreamingResponse:
        """Server-sent events: each chunk, then (with include_usage) the usage, then [DONE]. Starlette ends the
        generator when the client disconnects; what it leaves running is cancelled."""

        async def events():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
                if usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': session.usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                session.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def token_ids(self, text: str, document_start: bool = False) -> list[int]:
        """/tokenize: a text's ids as a text prompt's (after the document start when asked), except that a special
        token's name alone is that token (lm-eval asks for /tokenizer_info's eos_token and bos_token ids so, and the
        byte tokenizer would spell the name in bytes)."""
        ids = [self._specials[text]] if text in self._specials else self.tokenizer.encode(text)
        return [*self.tokenizer.document_start, *ids] if document_start else ids

    def token_text(self, token: int) -> str:
        """A token's text (a special token's name, which decoding drops)."""
        if token not in self._texts:
            text = self.tokenizer.decode([token])
            self._texts[token] = text or self.tokenizer.to_tokenizers().id_to_token(token) or ""
        return self._texts[token]

    # -- the rest ------------------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "jax-lm"}
        return JSONResponse({"object": "list", "data": [{**model, "max_model_len": self.engine.cfg.max_len}]})

    async def health(self, request: Request) -> Response:
        if not self.engine.serving():
            return JSONResponse({"status": "stopped"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        engine, stats = self.engine, self.engine.stats
        rows = [
            ("queue_length", "gauge", "Requests waiting for a batch row.", len(engine.waiting)),
            ("running_rows", "gauge", "Batch rows decoding or prefilling a request.", len(engine.running)),
            ("free_pages", "gauge", "K/V cache pages no row holds (cached prefixes included).", engine.free_pages()),
            ("total_pages", "gauge", "K/V cache pages in the pool (the null page excluded).", engine.cfg.num_pages - 1),
            ("generated_tokens_per_second", "gauge", "Tokens generated per second, recent steps.",
             stats.tokens_per_second()),
            ("requests_total", "counter", "Engine requests submitted (one per prompt and sample).", stats.requests),
            ("finished_requests_total", "counter", "Engine requests finished (cancelled included).", stats.finished),
            ("cancelled_requests_total", "counter", "Engine requests cancelled: the client went away, or an "
             "end-of-turn token ended the answer.", self.cancelled),
            ("prompt_tokens_total", "counter", "Prompt tokens computed (prefix cache hits excluded).",
             stats.prompt_tokens),
            ("generated_tokens_total", "counter", "Tokens generated.", stats.generated_tokens),
            ("prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_query_tokens),
            ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
             stats.prefix_hit_tokens),
            ("preemptions_total", "counter", "Rows preempted for pages (recomputed later).", stats.preemptions),
        ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP jaxlm_{name} {help_text}", f"# TYPE jaxlm_{name} {kind}", f"jaxlm_{name} {value}"]
        ttft = "jaxlm_time_to_first_token_seconds"
        lines += [f"# HELP {ttft} Seconds from submission to a request's first token.", f"# TYPE {ttft} summary"]
        lines += [f"{ttft}_sum {stats.first_token_seconds_sum}", f"{ttft}_count {stats.first_token_count}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def tokenize(self, request: Request) -> Response:
        fields = {"model": Field((str,)), "prompt": Field((str,), REQUIRED), "add_special_tokens": Field((bool,), True)}
        args = parse(await _body(request), fields)
        ids = self.token_ids(args["prompt"], args["add_special_tokens"])
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.cfg.max_len})

    async def detokenize(self, request: Request) -> Response:
        args = parse(await _body(request), {"model": Field((str,)), "tokens": Field((list,), REQUIRED)})
        vocab = self.tokenizer.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in args["tokens"]):
            raise BadRequest(f"tokens: must be token ids in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(args["tokens"])})

    async def tokenizer_info(self, request: Request) -> Response:
        name = self.tokenizer.to_tokenizers().id_to_token
        return JSONResponse(
            {
                "tokenizer_class": type(self.tokenizer).__name__,
                "eos_token": name(self.tokenizer.eod_id),
                "bos_token": name(self.tokenizer.document_start[0]),
                "chat_template": self.chat.source,
                "model_max_length": self.engine.cfg.max_len,
            }
        )


async def _body(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise BadRequest(f"the request body is not JSON ({type(e).__name__}: {str(e)[:200]})") from None


async def _bad_request(request: Request, e: BadRequest) -> Response:
    return e.response()


async def _http_error(request: Request, e: HTTPException) -> Response:
    return BadRequest(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code).response()


async def _server_error(request: Request, e: Exception) -> Response:
    return BadRequest(f"internal error ({type(e).__name__})", status=500).response()


def warm_up(engine: Engine) -> None:
    """Compiles the engine's prefill and decode calls on a request of its own (a 2-token prompt, 2 new tokens), so
    no client waits for them; its counts are then dropped."""
    params = SamplingParams(max_tokens=2, temperature=0.0, stop_at_eos=False)
    engine.submit([engine.tokenizer.eod_id] * 2, params).wait()
    engine.stats = Stats()


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves until SIGTERM or SIGINT; then stops accepting connections, lets the requests in flight finish, drains
    the engine and returns."""
    config = uvicorn.Config(server.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    # uvicorn raises the signal that stopped it once more when it is done, for the handler it found installed:
    # ignored, the process ends as the caller does (infer.py: exit code 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    uvicorn.Server(config).run()
