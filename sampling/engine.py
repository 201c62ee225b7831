"""The serving engine: continuous batching over a paged K/V cache, with chunked prefill and prefix caching.

Requests arrive at any time (`Engine.submit`, thread-safe); one engine thread runs `step` in a loop. Each step
1. admits waiting requests (oldest first) while a batch row is free and the pool has pages for the prompt,
   reusing the cached pages of a prompt's longest known prefix (automatic prefix caching: a full page is known by
   a hash of its tokens and every token before it; pages no row holds stay cached until evicted, least recently
   used first);
2. gives every decoding row a slot for its next token and the oldest prefilling rows their next chunk of the
   prompt, preempting the newest rows (their pages freed, their tokens recomputed when they return) when pages
   run out: the oldest row can always run, so the engine never deadlocks;
3. runs one prefill call and one decode call [max_batch, 1], each writing its tokens into the pages and sampling
   each row's next token by that row's own rules. The prefill call holds chunk x prefill_rows token slots, shaped
   [prefill_rows, chunk] or, when shorter prompts wait, [2 prefill_rows, chunk / 2] or [4 prefill_rows, chunk / 4]
   (`prefill_shapes`): whichever computes the most prompt tokens. A prefill call that would be less than half full
   waits up to `prefill_wait` steps for more prompts while other rows decode;
4. hands each request its tokens (with logprobs and text deltas), and retires finished rows at once.

The calls have a few fixed shapes (rows left empty are padding that writes to the null page; `warmup` compiles them
all), all with the same number of token slots per call, and a row's numbers never depend on which rows run beside
it: a request gets the same tokens alone and in a crowd (greedy, and seeded sampling: the row's draws are those of
`infer.py --seed S` row `sample_index`). On CPUs attention reads the pages through the page tables in a C++ kernel
(model/kernels/cpu_attention.cc); elsewhere the Pallas kernel or the gathered reference (model/attention.py).

Layers with a sliding window keep their own pool: pages that slide out of the window are freed. Prefix caching
is on when every layer is global (a windowed layer keeps only the window of a prefix, so its pages are not a
prefix's whole state).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from data.tokenizer import Tokenizer
from model import Transformer
from model.cache import Pages, bind, init_cache
from model.runtime import DecodeConfig
from parallel.decoding import place_weights, row_shards
from parallel.layout import Layout
from parallel.sharding import spec_for
from sampling.decode import for_inference, unrolled


class RequestError(ValueError):
    """A request the engine can never serve (the server answers 400 with its message)."""


class QueueFull(RuntimeError):
    """The waiting queue is full (the server answers 429)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # rows decoded together
    page_size: int = 16  # slots per page
    num_pages: int = 0  # pages per pool, the null page included (0: enough for max_batch rows of max_len)
    max_queue: int = 256  # requests waiting beyond it are refused (QueueFull)
    chunk: int = 64  # the most prompt tokens a row prefills per call
    prefill_rows: int = 2  # rows of a prefill call of `chunk`-token rows (its slots: chunk x prefill_rows)
    max_len: int = 0  # tokens a row may hold, prompt included (0: the model's max_seq_len)
    prefix_caching: bool = True
    # Steps a prefill call that would be less than half full may wait for more prompts while other rows decode (each
    # prefill call stalls every decoding row for its length: fewer, fuller calls serve more tokens per second).
    prefill_wait: int = 4
    # Tokens a decode call samples per row, feeding each back in (one call, one dispatch and one host round trip
    # for several tokens; a row takes fewer where its max_tokens or max_len ends sooner). Tokens arrive this many
    # at a time; a row that stops (end of document, stop string) mid-call wastes the rest of its steps.
    decode_steps: int = 4
    max_logprobs: int = 5  # the most alternatives a request may ask for per token

    def resolved(self, context: int) -> EngineConfig:
        max_len = self.max_len or context
        pages = self.num_pages or 1 + self.max_batch * -(-max_len // self.page_size)
        return dataclasses.replace(self, max_len=max_len, num_pages=pages)

    def errors(self) -> list[str]:
        checks = [
            (self.max_batch >= 1, f"max_batch={self.max_batch}: must be >= 1"),
            (self.page_size >= 1, f"page_size={self.page_size}: must be >= 1"),
            (self.num_pages == 0 or self.num_pages >= 2, f"num_pages={self.num_pages}: must be >= 2 (0: enough)"),
            (self.max_queue >= 1, f"max_queue={self.max_queue}: must be >= 1"),
            (self.chunk >= 1, f"chunk={self.chunk}: must be >= 1"),
            (self.prefill_rows >= 1, f"prefill_rows={self.prefill_rows}: must be >= 1"),
            (self.max_len >= 0, f"max_len={self.max_len}: must be >= 0 (0: the model's seq_len)"),
            (self.prefill_wait >= 0, f"prefill_wait={self.prefill_wait}: must be >= 0"),
            (self.decode_steps >= 1, f"decode_steps={self.decode_steps}: must be >= 1"),
        ]
        return [message for ok, message in checks if not ok]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's rules (OpenAI's completion parameters, as the server maps them)."""

    max_tokens: int = 16  # 0: only the prompt's logprobs (with prompt_logprobs)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all
    min_p: float = 0.0
    seed: int = 0
    sample_index: int = 0  # draws as row `sample_index` of infer.py's batch (n > 1: 0 .. n - 1)
    stop: tuple[str, ...] = ()  # stop when the text contains one (the text ends before it)
    stop_at_eos: bool = True  # stop at the end-of-document token (not part of the text)
    logprobs: int | None = None  # each token's logprob and this many most likely alternatives (None: none)
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (OpenAI's echo)

    def errors(self, max_logprobs: int) -> list[str]:
        checks = [
            (self.max_tokens >= 0, f"max_tokens={self.max_tokens}: must be >= 0"),
            (self.temperature >= 0, f"temperature={self.temperature}: must be >= 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]"),
            (self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0: no limit)"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p}: must be in [0, 1]"),
            (0 <= self.seed < 2**32, f"seed={self.seed}: must be in [0, 2**32)"),
            (self.sample_index >= 0, f"sample_index={self.sample_index}: must be >= 0"),
            (all(self.stop), "stop: a stop string must not be empty"),
            (
                self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
                f"logprobs={self.logprobs}: must be in [0, {max_logprobs}]",
            ),
            (self.max_tokens > 0 or self.prompt_logprobs, "max_tokens=0 asks for nothing without prompt logprobs"),
        ]
        return [message for ok, message in checks if not ok]


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their logprobs, most likely first


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request got in one step: new tokens (with their logprobs when asked), the text they add (held back
    while it might still be a stop string's start or half a character), and why it finished (None: not yet;
    'stop': end of document or a stop string; 'length': max_tokens or the row's max_len; 'cancelled'; 'error': the
    engine's step failed)."""

    tokens: list[int]
    logprobs: list[TokenLogprob]
    text: str
    finish_reason: str | None = None


class Handle:
    """A submitted request: its events (to `on_event` when given, else queued for `events()`), and once it has
    finished its whole result (`wait()`)."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, on_event):
        self.id, self.prompt, self.params = request_id, prompt, params
        self._on_event = on_event
        self._queue: queue.Queue[Event] = queue.Queue()
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []  # per prompt token (None for the first)
        self.text = ""
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_seconds: float | None = None
        self.done = threading.Event()

    def _emit(self, event: Event) -> None:
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        self.text += event.text
        if event.tokens and self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.submitted
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        (self._on_event or self._queue.put)(event)
        if event.finish_reason is not None:
            self.done.set()

    def events(self, timeout: float | None = None):
        """The events as they come (when no `on_event` was given), ending with the finishing one."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def wait(self, timeout: float | None = None) -> Handle:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        return self


class PagePool:
    """One pool's pages: a free list, reference counts (rows sharing a prefix share its pages) and the prefix
    cache: digest of a full page (its tokens and all before them) -> page, with the cached pages no row holds kept
    in least-recently-used order and evicted only when no free page is left. Page 0 is the null page."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, 0, -1))
        self.refs = [0] * num_pages
        self.page_of: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.allocations = 0  # pages filled so far (a shared page counts once)
        self.peak = 0  # the most pages rows held at once

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def held(self) -> int:
        return self.num_pages - 1 - self.available()

    def allocate(self) -> int | None:
        if self.free:
            page = self.free.pop()
        elif self.idle:
            page, _ = self.idle.popitem(last=False)
            del self.page_of[self.digest_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        self.allocations += 1
        self.peak = max(self.peak, self.held())
        return page

    def release(self, page: int) -> None:
        if page == 0:
            return
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.digest_of:
                self.idle[page] = None  # the most recently used end
            else:
                self.free.append(page)

    def share(self, digest: bytes) -> int | None:
        """The cached page of `digest`, now held once more; None when it is not cached."""
        page = self.page_of.get(digest)
        if page is not None:
            if self.refs[page] == 0:
                del self.idle[page]
            self.refs[page] += 1
            self.peak = max(self.peak, self.held())
        return page

    def remember(self, page: int, digest: bytes) -> None:
        if digest not in self.page_of and page not in self.digest_of:
            self.page_of[digest], self.digest_of[page] = page, digest


def page_digests(tokens: list[int], page_size: int) -> list[bytes]:
    """The digest of every full page of `tokens`: each covers its page's tokens and, through the one before it,
    every earlier token."""
    digests, previous = [], b""
    for start in range(0, len(tokens) - page_size + 1, page_size):
        page = np.asarray(tokens[start : start + page_size], np.int64).tobytes()
        previous = hashlib.sha256(previous + page).digest()
        digests.append(previous)
    return digests


@dataclasses.dataclass
class Sequence:
    handle: Handle
    tokens: list[int]  # prompt + generated
    order: int  # admission order (the newest are preempted first)
    computed: int = 0  # tokens whose keys and values are in the pages
    pages: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # window -> page per block (0: freed)
    emitted: int = 0  # characters of the text already handed out
    prompt_done: bool = False  # the prompt's logprobs were handed out (prompt_logprobs)

    @property
    def params(self) -> SamplingParams:
        return self.handle.params

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.handle.prompt) :]

    @property
    def prefilling(self) -> bool:
        return len(self.tokens) - self.computed > 1


@dataclasses.dataclass
class Stats:
    """Counters since the engine started (the server's /metrics)."""

    requests: int = 0
    finished: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (prefix cache hits excluded, recomputation included)
    generated_tokens: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # ... found there
    preemptions: int = 0
    first_token_seconds_sum: float = 0.0
    first_token_count: int = 0
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (rows, width) -> calls
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=64))

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the recent steps."""
        if len(self.recent) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.recent[0], self.recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Engine:
    """See the module docstring. `model` is a Transformer (its config; the engine decodes it paged), `params` its
    weights (or {"params", "state"}), `decode` the rest of how it decodes (cache dtype, weight format, MLA's
    variant). The engine keeps its own copy of the weights, layer by layer (sliced once from the stacked ones), so
    while the caller also holds `params` the weights take twice their memory."""

    def __init__(
        self,
        model: Transformer,
        params,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        decode: DecodeConfig | None = None,
        layout: Layout | None = None,
    ):
        config, decode = config or EngineConfig(), decode or DecodeConfig()
        if errors := config.errors():
            raise ValueError(errors[0])
        self.layout = layout
        if layout is not None:
            shards = row_shards(layout)
            if config.max_batch % shards or config.prefill_rows % shards:
                raise ValueError(
                    f"max_batch={config.max_batch} and prefill_rows={config.prefill_rows} must be multiples of the "
                    f"mesh's {shards} row shards"
                )
            params = place_weights(params, model.cfg, layout)
        self.cfg = config.resolved(model.cfg.max_seq_len)
        cfg = self.cfg
        decode = dataclasses.replace(decode, cache="pages", page_size=cfg.page_size, num_pages=cfg.num_pages)
        decode = dataclasses.replace(decode, max_rewind=0)
        self.model = for_inference(model.clone(rt=dataclasses.replace(model.rt, decode=decode)))
        # Each layer's weights as the unrolled network applies them, sliced from the stacked ones once here: sliced
        # inside every call, XLA would copy all the weights each step (a decode step reads each weight once).
        with self._on_mesh():
            self.weights = jax.jit(unrolled, static_argnums=1)(params, self.model)
        self.tokenizer = tokenizer
        self.windows = sorted({spec.window for spec in model.cfg.layer_specs()})
        self.caching = cfg.prefix_caching and self.windows == [0]
        self.pools = {w: PagePool(cfg.num_pages) for w in self.windows}
        self.blocks = -(-cfg.max_len // cfg.page_size)  # page table width
        self.prefill_shapes = prefill_shapes(cfg, row_shards(layout) if layout is not None else 1)
        with self._on_mesh():
            self.cache = self._empty_cache()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.stats = Stats()
        self._lock = threading.Condition()
        self._cancelled: set[int] = set()
        self._ids = 0
        self._order = 0
        self._deferred = 0  # steps the pending prefill call has waited (prefill_wait)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _empty_cache(self) -> dict:
        cache = unbound(jax.jit(init_cache, static_argnums=(0, 1, 2))(self.model, self.cfg.max_batch, self.cfg.max_len))
        if self.layout is not None:
            return place_pools(cache, self.layout)
        # committed to the device, as a call returns them: the first call then compiles no variant of its own
        return jax.device_put(cache, jax.devices()[0])

    def _on_mesh(self):
        """The context the engine's programs trace and run in: its mesh's, if it has one."""
        return self.layout.activate() if self.layout is not None else contextlib.nullcontext()

    # -- requests ------------------------------------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """RequestError (one line, naming the limit) when the engine can never serve this request."""
        if errors := params.errors(self.cfg.max_logprobs):
            raise RequestError(errors[0])
        if not prompt:
            raise RequestError("the prompt is empty (no tokens)")
        if bad := [t for t in prompt if not 0 <= t < self.model.cfg.vocab_size]:
            raise RequestError(f"prompt token {bad[0]}: ids must be in [0, {self.model.cfg.vocab_size})")
        need = len(prompt) + params.max_tokens
        if need > self.cfg.max_len:
            raise RequestError(
                f"the prompt's {len(prompt)} tokens plus max_tokens={params.max_tokens} need {need} positions; "
                f"this model's context is {self.cfg.max_len}"
            )
        pages = -(-need // self.cfg.page_size)
        if pages > self.cfg.num_pages - 1:
            raise RequestError(
                f"the prompt's {len(prompt)} tokens plus max_tokens={params.max_tokens} need {pages} pages of "
                f"{self.cfg.page_size}; the pool has {self.cfg.num_pages - 1}"
            )

    def submit(
        self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None] | None = None
    ) -> Handle:
        """Queues a request (RequestError: it can never run; QueueFull: too many are waiting)."""
        self.check(prompt, params)
        with self._lock:
            if len(self.waiting) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.cfg.max_queue})")
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            self._ids += 1
            handle = Handle(self._ids, list(prompt), params, on_event)
            self.waiting.append(Sequence(handle, list(prompt), order=0))
            self.stats.requests += 1
            self._lock.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Drops a request (a client that went away): its pages are freed at the start of the next step."""
        with self._lock:
            self._cancelled.add(handle.id)
            self._lock.notify_all()

    def serving(self) -> bool:
        """The engine thread is running and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def free_pages(self) -> int:
        """Pages no row holds in the global pool (cached prefix pages count: they are evicted when needed)."""
        return self.pools[self.windows[0]].available()

    # -- the loop ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops the engine thread: with `drain`, once every admitted and waiting request has finished."""
        with self._lock:
            self._stopping = True
            if not drain:
                for seq in [*self.waiting, *self.running]:
                    self._cancelled.add(seq.handle.id)
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle() and not self._stopping and not self._cancelled:
                    self._lock.wait()
                if self.idle() and self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug, or out of memory: every request in flight ends with 'error', serving goes on
                logging.exception("the engine's step failed; ending the requests in flight")
                self._reset()

    def _reset(self) -> None:
        """Ends every request with finish_reason 'error' and starts from empty pools (the failed call may have
        consumed the donated cache)."""
        with self._lock:
            for seq in [*self.running, *self.waiting]:
                self._finish(seq, Event([], [], "", "error"))
            self.pools = {w: PagePool(self.cfg.num_pages) for w in self.windows}
            with self._on_mesh():
                self.cache = self._empty_cache()

    def warmup(self) -> None:
        """Compiles every call shape (each prefill shape and the decode call) before any request needs one: calls
        with no rows, which write only to the null page."""
        for rows, width in self.prefill_shapes:
            self._run([], rows, width)
        (self._run if self.cfg.decode_steps == 1 else self._run_decode)([], self.cfg.max_batch, 1)

    def run_until_done(self) -> None:
        """Runs steps on this thread until every submitted request has finished (tests, benchmarks)."""
        while not self.idle():
            self.step()

    def step(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for seq in [s for s in [*self.running, *self.waiting] if s.handle.id in cancelled]:
                self._finish(seq, Event([], [], "", "cancelled"))
            self._admit()
        decoding = [s for s in self.running if not s.prefilling]
        rows, width, prefilling = self._prefill_shape([s for s in self.running if s.prefilling])
        if prefilling and decoding and self._deferred < self.cfg.prefill_wait:
            tokens = sum(min(width, len(s.tokens) - s.computed) for s in prefilling)
            if 2 * tokens < rows * width:  # less than half full: wait a step or two for more prompts
                self._deferred += 1
                prefilling = []
        if prefilling:
            self._deferred = 0
        for seq in sorted(decoding + prefilling, key=lambda s: s.order):
            if seq in self.running:  # (not preempted for an older row)
                upto = seq.computed + (
                    min(width, len(seq.tokens) - seq.computed) if seq.prefilling else self._steps(seq)
                )
                self._reserve(seq, upto)
        prefilling = [s for s in prefilling if s in self.running]
        decoding = [s for s in decoding if s in self.running]
        if prefilling:
            self._run(prefilling, rows, width)
        if decoding:
            (self._run if self.cfg.decode_steps == 1 else self._run_decode)(decoding, self.cfg.max_batch, 1)
        now = time.perf_counter()
        self.stats.recent.append((now, self.stats.generated_tokens))

    def _prefill_shape(self, prefilling: list[Sequence]) -> tuple[int, int, list[Sequence]]:
        """(rows, width, the rows' sequences) of the prefill call that computes the most prompt tokens (oldest rows
        first; on a tie the wider shape): one long prompt takes chunk tokens a call, several short ones share it."""
        best = (-1, 0, 0, [])
        for rows, width in self.prefill_shapes:
            take = prefilling[:rows]
            tokens = sum(min(width, len(s.tokens) - s.computed) for s in take)
            if tokens > best[0]:
                best = (tokens, rows, width, take)
        return best[1:]

    # -- pages ---------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.cfg.max_batch:
            seq = self.waiting[0]
            hits = self._share_prefix(seq)
            need = -(-len(seq.tokens) // self.cfg.page_size) - hits
            if any(pool.available() < need + 1 for pool in self.pools.values()) and self.running:
                self._release(seq)
                return
            self.waiting.popleft()
            self._order += 1
            seq.order = self._order
            self.running.append(seq)

    def _share_prefix(self, seq: Sequence) -> int:
        """Holds the cached pages of the longest known prefix of `seq` (at least its last token is computed: its
        logits pick the next token), marks those tokens computed, returns how many pages."""
        seq.pages = {w: [] for w in self.windows}
        seq.computed = 0
        if not self.caching or seq.params.prompt_logprobs:
            return 0
        pool, shared = self.pools[0], seq.pages[0]
        usable = (len(seq.tokens) - 1) // self.cfg.page_size
        self.stats.prefix_query_tokens += usable * self.cfg.page_size
        for digest in page_digests(seq.tokens, self.cfg.page_size)[:usable]:
            page = pool.share(digest)
            if page is None:
                break
            shared.append(page)
        seq.computed = len(shared) * self.cfg.page_size
        self.stats.prefix_hit_tokens += seq.computed
        return len(shared)

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Pages for `seq`'s slots up to `upto` in every pool, preempting the newest rows while a pool runs out
        (possibly `seq` itself: then False)."""
        for window, pool in self.pools.items():
            pages = seq.pages[window]
            while len(pages) * self.cfg.page_size < upto:
                page = pool.allocate()
                if page is None:
                    victim = max(self.running, key=lambda s: s.order)
                    self._preempt(victim)
                    if victim is seq:
                        return False
                    continue
                pages.append(page)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Frees `seq`'s pages and puts it first in the queue: it recomputes its tokens when it is admitted again
        (and its prompt's logprobs, if they were not all handed out)."""
        self._release(seq)
        if not seq.prompt_done:
            seq.handle.prompt_logprobs.clear()
        with self._lock:  # (submit appends to the queue from other threads)
            self.running.remove(seq)
            self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        for window, pages in seq.pages.items():
            for page in pages:
                self.pools[window].release(page)
        seq.pages = {w: [] for w in self.windows}

    def _slide(self, seq: Sequence) -> None:
        """Frees the pages of windowed layers that no later query can see (every slot < next position - window)."""
        for window, pages in seq.pages.items():
            if window:
                for block in range(max(0, (seq.computed - window + 1) // self.cfg.page_size)):
                    self.pools[window].release(pages[block])
                    pages[block] = 0

    def _remember(self, seq: Sequence, before: int) -> None:
        """Caches the pages `seq` filled in the last call (global layers: every layer's pages of the same blocks)."""
        if not self.caching:
            return
        ps = self.cfg.page_size
        first, last = before // ps, seq.computed // ps
        if last > first:
            digests = page_digests(seq.tokens[: last * ps], ps)
            for block in range(first, last):
                self.pools[0].remember(seq.pages[0][block], digests[block])

    # -- calls -------------------------------------------------------------------------------------------------
    def _run(self, seqs: list[Sequence], rows: int, width: int) -> None:
        """One call over `seqs` (padded to `rows` rows of `width` tokens), then each row's results."""
        tokens = np.zeros((rows, width), np.int32)
        counts, written = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        targets = np.full((rows, width), -1, np.int32)  # the prompt tokens whose logprobs a row wants (-1: none)
        for r, seq in enumerate(seqs):
            n = min(width, len(seq.tokens) - seq.computed)
            tokens[r, :n] = seq.tokens[seq.computed : seq.computed + n]
            if seq.params.prompt_logprobs and not seq.prompt_done:
                following = seq.tokens[seq.computed + 1 : seq.computed + n + 1]
                targets[r, : len(following)] = following
            counts[r], written[r] = n, seq.computed
        with self._on_mesh():
            call = functools.partial(_call, model=self.model, top=self.cfg.max_logprobs)
            self.cache, out = call(self.weights, self.cache, tokens, counts, written, *self._rows(seqs, rows), targets)
        out = jax.tree.map(np.asarray, out)
        now = time.perf_counter()
        for r, seq in enumerate(seqs):
            before = seq.computed
            seq.computed += int(counts[r])
            if seq.params.prompt_logprobs and not seq.prompt_done:
                self._prompt_logprobs(seq, before, out, r)
            self._remember(seq, before)
            self._slide(seq)
            if seq.computed == len(seq.tokens):  # (else more of the prompt to prefill)
                self._take(seq, out, r, now)
        if seqs:
            self.stats.calls[rows, width] += 1
        if width > 1:
            self.stats.prompt_tokens += int(counts.sum())

    def _rows(self, seqs: list[Sequence], rows: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What every call takes of its rows, padded to `rows`: page tables (window -> [rows, blocks]), sampling
        rules [rows, 4] (temperature, top_k, top_p, min_p), seeds, sample indices and tokens generated so far."""
        tables = {w: np.zeros((rows, self.blocks), np.int32) for w in self.windows}
        rules = np.zeros((rows, 4), np.float32)
        rules[:, 2] = 1.0
        seeds, index, steps = np.zeros(rows, np.uint32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for r, seq in enumerate(seqs):
            for w in self.windows:
                tables[w][r, : len(seq.pages[w])] = seq.pages[w]
            p = seq.params
            rules[r] = (p.temperature, p.top_k, p.top_p, p.min_p)
            seeds[r], index[r], steps[r] = p.seed, p.sample_index, len(seq.generated)
        return tables, rules, seeds, index, steps

    def _steps(self, seq: Sequence) -> int:
        """Tokens a decode call samples for `seq`: decode_steps, or fewer where its max_tokens or max_len ends."""
        left = min(seq.params.max_tokens - len(seq.generated), self.cfg.max_len - len(seq.tokens))
        return max(1, min(self.cfg.decode_steps, left))

    def _run_decode(self, seqs: list[Sequence], rows: int, _width: int = 1) -> None:
        """One call of decode_steps steps over the decoding rows `seqs` (padded to `rows`), then each row's
        tokens in order, up to where it finishes."""
        token, n, written = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for r, seq in enumerate(seqs):
            token[r], n[r], written[r] = seq.tokens[seq.computed], self._steps(seq), seq.computed
        with self._on_mesh():
            call = functools.partial(_decode, model=self.model, top=self.cfg.max_logprobs, steps=self.cfg.decode_steps)
            self.cache, out = call(self.weights, self.cache, token, n, written, *self._rows(seqs, rows))
        out = jax.tree.map(np.asarray, out)
        now = time.perf_counter()
        for r, seq in enumerate(seqs):
            before = seq.computed
            for j in range(int(n[r])):
                self._take(seq, {key: x[:, j] for key, x in out.items()}, r, now)
                if seq not in self.running:  # finished (or cancelled)
                    break
            else:
                seq.computed = before + int(n[r])  # (_take counts one token a call)
                self._remember(seq, before)
                self._slide(seq)
        if seqs:
            self.stats.calls[rows, 1] += 1

    def _prompt_logprobs(self, seq: Sequence, before: int, out, r: int) -> None:
        """The logprob of each prompt token this call's logits predict (position i predicts token i + 1)."""
        prompt = seq.handle.prompt
        if before == 0:
            seq.handle.prompt_logprobs.append(None)
        for j in range(seq.computed - before):
            i = before + j + 1
            if i < len(prompt):
                top = tuple(zip(out["prompt_top_ids"][r, j].tolist(), out["prompt_top_lp"][r, j].tolist()))
                seq.handle.prompt_logprobs.append(TokenLogprob(prompt[i], float(out["prompt_lp"][r, j]), top))
        seq.prompt_done = seq.computed >= len(prompt)

    def _take(self, seq: Sequence, out, r: int, now: float) -> None:
        """The token row r sampled after `seq`'s last token: appended, handed out, maybe the end of `seq`."""
        p = seq.params
        if p.max_tokens == 0:  # the prompt's logprobs only
            self._finish(seq, Event([], [], "", "length"))
            return
        token = int(out["token"][r])
        if seq.handle.first_token_seconds is None:
            self.stats.first_token_seconds_sum += now - seq.handle.submitted
            self.stats.first_token_count += 1
        seq.tokens.append(token)
        seq.computed = min(seq.computed, len(seq.tokens) - 1)
        self.stats.generated_tokens += 1
        logprobs = []
        if p.logprobs is not None:
            k = p.logprobs
            top = tuple(zip(out["top_ids"][r, :k].tolist(), out["top_lp"][r, :k].tolist()))
            logprobs.append(TokenLogprob(token, float(out["lp"][r]), top))
        eos = p.stop_at_eos and token == self.tokenizer.eod_id
        text_ids = seq.generated[:-1] if eos else seq.generated
        text = self.tokenizer.decode(text_ids)
        reason = None
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif eos:
            reason = "stop"
        elif len(seq.generated) >= p.max_tokens or len(seq.tokens) >= self.cfg.max_len:
            reason = "length"
        if reason is None:  # hold back half a character and what may be the start of a stop string
            hold = max((len(s) for s in p.stop), default=1) - 1
            visible = len(text.rstrip("\ufffd"))
            text = text[: max(seq.emitted, min(visible, len(text) - hold))]
        kept = [] if eos else [token]  # the end of document ends the text: not one of its tokens
        event = Event(kept, [] if eos else logprobs, text[seq.emitted :], reason)
        seq.emitted = len(text)
        if reason is None:
            seq.handle._emit(event)
        else:
            self._finish(seq, event)

    def _finish(self, seq: Sequence, event: Event) -> None:
        self._release(seq)
        with self._lock:  # (submit appends to the queue from other threads: no iterating it meanwhile)
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
        self.stats.finished += 1
        seq.handle._emit(event)


def prefill_shapes(cfg: EngineConfig, shards: int) -> list[tuple[int, int]]:
    """The prefill call's shapes [rows, width]: [prefill_rows, chunk], then twice the rows of half the width while
    the width halves evenly and the rows fit in max_batch (at most three shapes). Every shape holds the same
    chunk x prefill_rows token slots: the call's matmuls then always multiply that many rows, and XLA:CPU picks its
    matmul routine (with its own rounding) by their number, so a row's numbers are the same in every shape."""
    shapes = [(cfg.prefill_rows, cfg.chunk)]
    while len(shapes) < 3:
        rows, width = shapes[-1]
        if width % 2 or 2 * rows > cfg.max_batch or (2 * rows) % shards:
            break
        shapes.append((2 * rows, width // 2))
    return shapes


def place_pools(cache: dict, layout: Layout) -> dict:
    """The pools of a paged cache on the layout's mesh: a field stored [pages, K/V heads, page slots, head_dim]
    split over the heads as the rules split `kv_heads` (each device holds its heads' pages), others whole."""

    def place(c):
        if not isinstance(c, Pages):
            return c
        arrays = {}
        for name, x in c.arrays.items():
            names = (None, "kv_heads", None, None) if dict(c.slot_axes).get(name) == 2 and x.ndim == 4 else ()
            spec = spec_for(names, x.shape, layout.mesh, layout.rules) if names else jax.sharding.PartitionSpec()
            arrays[name] = jax.device_put(x, jax.sharding.NamedSharding(layout.mesh, spec))
        return c.replace(arrays=arrays)

    return jax.tree.map(place, cache, is_leaf=lambda c: isinstance(c, Pages))


def sample_rows(logits_BV, rules_B4, keys_B):
    """Each row's next token by its own rules (rules_B4: temperature, top_k, top_p, min_p), as
    sampling.rules.pick draws it: greedy at temperature 0, else a categorical draw from `filtered_rows`."""
    temperature_B = rules_B4[:, 0]
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def draw(_):
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_rows(logits_BV, rules_B4)).astype(jnp.int32)
        return jnp.where(temperature_B > 0, drawn_B, greedy_B)

    # (a batch of greedy rows skips the filters' sorts over the vocabulary: most of a small model's decode call)
    return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda _: greedy_B, None)


def filtered_rows(logits_BV, rules_B4):
    """The tempered, filtered logits of each row by its own rules: the filters of sampling.rules.filtered, in the
    same order and arithmetic, with each one skipped in the rows that do not ask for it."""
    temperature_B, top_k_B, top_p_B, min_p_B = (rules_B4[:, i] for i in range(4))
    x_BV = logits_BV.astype(jnp.float32) / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    V = x_BV.shape[-1]
    k_B = top_k_B.astype(jnp.int32)
    use_k_B = (k_B > 0) & (k_B < V)
    sorted_filters = functools.partial(_top_k_top_p, k_B=k_B, use_k_B=use_k_B, top_p_B=top_p_B)
    x_BV = jax.lax.cond(jnp.any(use_k_B | (top_p_B < 1.0)), sorted_filters, lambda x: x, x_BV)
    # min-p: logit >= max + log(min_p)
    threshold_B = jnp.max(x_BV, axis=-1) + jnp.log(jnp.where(min_p_B > 0, min_p_B, 1.0))
    return jnp.where((min_p_B > 0)[:, None] & (x_BV < threshold_B[:, None]), -jnp.inf, x_BV)


def _top_k_top_p(x_BV, k_B, use_k_B, top_p_B):
    """Top-k, then top-p on what it kept, in the rows that ask (the filters that sort the vocabulary)."""
    V = x_BV.shape[-1]
    order_BV = jnp.argsort(-x_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(x_BV, order_BV, axis=-1)
    # top-k: keep logits >= the k-th largest (ties with it stay)
    kth_B = jnp.take_along_axis(sorted_BV, jnp.clip(k_B - 1, 0, V - 1)[:, None], axis=-1)[:, 0]
    x_BV = jnp.where(use_k_B[:, None] & (x_BV < kth_B[:, None]), -jnp.inf, x_BV)
    # top-p on the top-k-filtered logits (sorted again: filtered entries sort last)
    order_BV = jnp.argsort(-x_BV, axis=-1)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(x_BV, order_BV, axis=-1), axis=-1)
    keep_sorted_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p_B[:, None]
    rows_B1 = jnp.arange(x_BV.shape[0])[:, None]
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[rows_B1, order_BV].set(keep_sorted_BV)
    return jnp.where((top_p_B < 1.0)[:, None] & ~keep_BV, -jnp.inf, x_BV)


@functools.partial(jax.jit, static_argnames=("model", "top"), donate_argnames=("cache",))
def _call(
    weights,
    cache,
    tokens_BT,
    counts_B,
    written_B,
    tables,
    rules_B4,
    seeds_B,
    index_B,
    steps_B,
    targets_BT,
    *,
    model,
    top,
):
    """One engine call: each row's `counts_B` tokens (the rest padding) written after its `written_B`, the next
    token sampled from the last one's logits, with logprobs (and for prompts, every position's)."""
    B, T = tokens_BT.shape
    cache = bind(cache, tables, written_B)
    positions_BT = jnp.where(jnp.arange(T) < counts_B[:, None], written_B[:, None] + jnp.arange(T), -1)
    logits_BTV, variables = model.apply({**weights, "cache": cache}, tokens_BT, positions_BT, mutable=["cache"])
    last_BV = logits_BTV[jnp.arange(B), jnp.maximum(counts_B - 1, 0)]
    out = _next(last_BV, rules_B4, seeds_B, index_B, steps_B, top)
    if T > 1:  # a prefill call: the logprob of every prompt token after the first, when a row asks for them

        def prompt_logprobs(_):
            lp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
            top_lp_BTk, top_ids_BTk = jax.lax.top_k(lp_BTV, top)
            return jnp.take_along_axis(lp_BTV, targets_BT[..., None], axis=-1)[..., 0], top_ids_BTk, top_lp_BTk

        def none(_):
            return jnp.zeros((B, T)), jnp.zeros((B, T, top), jnp.int32), jnp.zeros((B, T, top))

        prompt = jax.lax.cond(jnp.any(targets_BT >= 0), prompt_logprobs, none, None)
        out.update(zip(("prompt_lp", "prompt_top_ids", "prompt_top_lp"), prompt))
    return unbound(variables["cache"]), out


def _next(last_BV, rules_B4, seeds_B, index_B, steps_B, top: int) -> dict:
    """Each row's next token drawn by its rules from its last logits (the draw of `infer.py --seed` row
    `sample_index` at step `steps_B`), its logprob and the `top` most likely tokens'."""
    keys_B = jax.vmap(lambda s, i, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), t))(
        seeds_B, index_B, steps_B
    )
    token_B = sample_rows(last_BV, rules_B4, keys_B)
    lp_BV = jax.nn.log_softmax(last_BV.astype(jnp.float32), axis=-1)
    top_lp_Bk, top_ids_Bk = jax.lax.top_k(lp_BV, top)
    lp_B = jnp.take_along_axis(lp_BV, token_B[:, None], axis=-1)[:, 0]
    return dict(token=token_B, lp=lp_B, top_ids=top_ids_Bk, top_lp=top_lp_Bk)


@functools.partial(jax.jit, static_argnames=("model", "top", "steps"), donate_argnames=("cache",))
def _decode(weights, cache, token_B, n_B, written_B, tables, rules_B4, seeds_B, index_B, steps_B, *, model, top, steps):
    """`steps` decode steps in one call (a scan): row b feeds each token it samples back in for its first n_B steps
    (the rest of its steps write to the null page and are not used). Outputs are [B, steps, ...]."""

    def step(carry, i):
        cache, token_B = carry
        active_B = i < n_B
        cache = bind(cache, tables, written_B + i)
        positions_B1 = jnp.where(active_B, written_B + i, -1)[:, None]
        logits_B1V, variables = model.apply(
            {**weights, "cache": cache}, token_B[:, None], positions_B1, mutable=["cache"]
        )
        out = _next(logits_B1V[:, 0], rules_B4, seeds_B, index_B, steps_B + i, top)
        return (unbound(variables["cache"]), out["token"]), out

    (cache, _), outs = jax.lax.scan(step, (cache, token_B), jnp.arange(steps))
    return cache, jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), outs)


def unbound(cache: dict) -> dict:
    """The pools without any call's rows (empty page tables and lengths): the cache a call takes then has the same
    shapes whatever call came before it, so each call shape compiles once."""

    def one(c):
        if not isinstance(c, Pages):
            return c
        return c.replace(table_BM=jnp.zeros((0, c.table_BM.shape[1]), jnp.int32), written_B=jnp.zeros((0,), jnp.int32))

    return jax.tree.map(one, cache, is_leaf=lambda c: isinstance(c, Pages))
