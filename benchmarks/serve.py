"""Serving on CPU: the continuous-batching engine (sampling/engine.py) against static batching (sampling.decode's
`generate_batch`) and Hugging Face transformers' `generate` on the same checkpoint, one long-tailed workload; the
K/V memory a sequence holds paged and dense; prefix caching on a shared system prompt.

    python -m benchmarks.serve --workdir runs/tiny --profile
    python -m benchmarks.serve --workdir runs/qbench/float --profile   # configs/bench_10m.py, trained

The workload: --requests requests, each prompt a window of the run's held-out text (its corpus's validation
documents, tokenized and joined by end-of-document tokens as training reads them) and each output a length;
both lengths lognormal (medians --prompt_median and --output_median, sigma --sigma), the prompt clipped to
[4, context - 16], the output to [1, context - prompt], one seed. Greedy, with no stop at end-of-document, so every
request gets exactly its drawn output length. Three systems serve it, with --max_batch rows each:
- engine: every request submitted at t=0, then `run_until_done` on this thread;
- static: the requests in arrival order in batches of max_batch, each batch one `generate_batch` call (prompts
  left-padded to the batch's longest, max_new_tokens and the dense cache sized to the batch's longest);
- hf: the same batches through transformers' `generate` on the checkpoint exported by training.hf.export (torch
  CPU float32, left-padded, greedy, use_cache), once per --torch_threads count (torch.set_num_threads; default:
  the cores this process may use, then 1: on a busy machine 2 threads on 2 cores can be many times slower than 1).
Output tokens/s = requested output tokens / wall time. Time to first token (TTFT) counts from t=0; a request's
per-token latency is (its last token's time - its first's) / (tokens - 1). A batch hands out no token before its
prefill ends and all at its end: static and hf TTFT = the batch's start + its prefill, per-token = the batch's
decode time / its steps. Compilation is excluded: each system first serves --warmup requests of its own, static
counts only `generate_batch`'s own prefill and decode seconds (each batch shape compiles before them), and hf
the time inside `generate`. The systems take turns, --rounds times (machine load hits them alike); the figures
are medians over rounds. `--profile` splits the engine's steps into its jitted calls and host Python.

K/V memory: the bytes of a page (from the engine's pools' shapes) times the pages the pool held at its peak (per row
of max_batch) and each request's pages when it finishes, against a dense row of the context (from the dense cache's
shapes). Prefix caching: --prefix_requests requests of one --prefix_tokens window plus their own --suffix_tokens
window, --prefix_output tokens each, all at t=0, through an engine with caching on and one with it off: hit rate,
prompt tokens computed, wall time (the first max_batch requests are admitted together, before any page of the prefix
is filled, so they miss). One JSON line at the end (and --json_out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np

import sampling.engine as engine_lib
from data.corpus import split_documents
from model import Transformer
from model.cache import Pages, init_cache
from model.runtime import DecodeConfig, Runtime
from sampling.decode import for_inference, generate_batch
from sampling.engine import Engine, EngineConfig, SamplingParams
from sampling.rules import Rules
from training.checkpoint import load_for_inference


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


@dataclasses.dataclass
class Served:
    """One system's pass over the workload: per request (in order) its tokens, TTFT and per-token seconds."""

    wall: float
    tokens: list[list[int]]
    ttft: list[float]
    per_token: list[float]


# -- the workload ----------------------------------------------------------------------------------------------------
def held_out_tokens(run, tokenizer) -> np.ndarray:
    """The run's validation documents as training reads them: each one's tokens, then end-of-document."""
    _, val = split_documents(run.data.corpus, run.data.text_field, run.data.val_fraction)
    ids = [t for doc in val for t in [*tokenizer.encode(doc.text), tokenizer.eod_id]]
    return np.asarray(ids, np.int32)


def lognormal_lengths(rng, n: int, median: float, sigma: float, low: int, high) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def workload(
    stream: np.ndarray, n: int, context: int, prompt_median: float, output_median: float, sigma: float, seed: int
) -> list[Request]:
    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, n, prompt_median, sigma, 4, context - 16)
    outputs = lognormal_lengths(rng, n, output_median, sigma, 1, context - prompts)
    starts = rng.integers(0, len(stream) - context, n)
    return [Request(stream[s : s + p].tolist(), int(o)) for s, p, o in zip(starts, prompts, outputs)]


def shared_prefix_workload(stream: np.ndarray, n: int, prefix: int, suffix: int, output: int, seed: int):
    """n requests: one `prefix`-token window (the system prompt) + a different `suffix`-token window each."""
    rng = np.random.default_rng(seed)
    system = stream[: len(stream) // 2][rng.integers(0, len(stream) // 2 - prefix) :][:prefix].tolist()
    starts = rng.integers(len(stream) // 2, len(stream) - suffix, n)
    return [Request(system + stream[s : s + suffix].tolist(), output) for s in starts]


def batches(requests: list[Request], size: int) -> list[list[Request]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


# -- the three systems -----------------------------------------------------------------------------------------------
GREEDY = SamplingParams(temperature=0, stop_at_eos=False)


def serve_engine(make_engine, requests: list[Request]) -> tuple[Served, Engine]:
    engine = make_engine()
    engine.warmup()  # every call shape compiled (a no-op after the first engine of a config)
    first, last = [None] * len(requests), [None] * len(requests)

    def on_event(i):
        def record(event):
            if event.tokens:
                now = time.perf_counter()
                first[i] = first[i] or now
                last[i] = now

        return record

    start = time.perf_counter()
    handles = [
        engine.submit(r.prompt, dataclasses.replace(GREEDY, max_tokens=r.max_tokens), on_event(i))
        for i, r in enumerate(requests)
    ]
    engine.run_until_done()
    wall = time.perf_counter() - start
    per_token = [(b - a) / max(len(h.tokens) - 1, 1) for a, b, h in zip(first, last, handles)]
    return Served(wall, [h.tokens for h in handles], [a - start for a in first], per_token), engine


def serve_static(model, params, requests: list[Request], batch: int) -> Served:
    clock, out = 0.0, Served(0.0, [], [], [])
    for rows in batches(requests, batch):
        steps, longest = max(r.max_tokens for r in rows), max(len(r.prompt) for r in rows)
        g = generate_batch(
            model, params, [r.prompt for r in rows], steps, Rules(temperature=0), max_len=longest + steps
        )
        out.tokens += [t[: r.max_tokens] for t, r in zip(g.tokens, rows)]
        out.ttft += [clock + g.prefill_seconds] * len(rows)
        out.per_token += [g.decode_seconds / steps] * len(rows)
        clock += g.prefill_seconds + g.decode_seconds
    out.wall = clock
    return out


def serve_hf(hf_model, requests: list[Request], batch: int, pad_id: int, threads: int) -> Served:
    import torch
    import transformers

    torch.set_num_threads(threads)

    class Stamps(transformers.LogitsProcessor):
        """The time of every step's logits (the first: the prefill's)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    clock, out = 0.0, Served(0.0, [], [], [])
    for rows in batches(requests, batch):
        steps, longest = max(r.max_tokens for r in rows), max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, longest - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[b, longest - len(r.prompt) :] = 1
        stamps = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            got = hf_model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=steps,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
                logits_processor=transformers.LogitsProcessorList([stamps]),
            )
        seconds = time.perf_counter() - start
        if got.shape[1] - longest != steps:
            raise RuntimeError(f"hf generated {got.shape[1] - longest} tokens, asked for {steps}")
        out.tokens += [got[b, longest : longest + r.max_tokens].tolist() for b, r in enumerate(rows)]
        out.ttft += [clock + stamps.times[0] - start] * len(rows)
        out.per_token += [(stamps.times[-1] - stamps.times[0]) / max(steps - 1, 1)] * len(rows)
        clock += seconds
    out.wall = clock
    return out


def load_hf(workdir: str, hf_dir: str):
    """transformers' model of the workdir's checkpoint (exported into `hf_dir`, or a temporary directory)."""
    import torch
    import transformers

    from training import hf

    directory = hf_dir or tempfile.mkdtemp(prefix="serve_hf_")
    if not (pathlib.Path(directory) / "config.json").exists():
        hf.export(workdir, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no stop at end-of-document, as the other two
    # left padding makes a batch longer than the context; each row's own positions stay inside it (from the mask)
    transformers.logging.set_verbosity_error()
    return model, torch.__version__, transformers.__version__


# -- figures ---------------------------------------------------------------------------------------------------------
def figures(served: Served, requests: list[Request]) -> dict[str, float]:
    tokens = sum(r.max_tokens for r in requests)
    got = sum(len(t) for t in served.tokens)
    if got != tokens:
        raise RuntimeError(f"served {got} output tokens, the workload asks for {tokens}")
    ttft = np.asarray(served.ttft)
    per_token = np.asarray([p for p, r in zip(served.per_token, requests) if r.max_tokens > 1])
    return {
        "tokens_per_s": tokens / served.wall,
        "wall_s": served.wall,
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "per_token_p50_ms": 1e3 * float(np.percentile(per_token, 50)),
        "per_token_p99_ms": 1e3 * float(np.percentile(per_token, 99)),
    }


def same_tokens(a: Served, b: Served) -> float:
    """The fraction of requests whose greedy tokens agree exactly."""
    return sum(x == y for x, y in zip(a.tokens, b.tokens)) / len(a.tokens)


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kv_memory(engine: Engine, model: Transformer, requests: list[Request], context: int, batch: int) -> dict:
    """K/V bytes a running sequence holds: paged (the pool's pages) against a dense row of `context` slots."""
    pools = [c for c in jax.tree.leaves(engine.cache, is_leaf=lambda c: isinstance(c, Pages)) if isinstance(c, Pages)]
    page_bytes = sum(tree_bytes(p.arrays) for p in pools) // engine.cfg.num_pages
    dense_model = for_inference(model.clone(rt=Runtime.decoding(DecodeConfig())))
    dense = jax.eval_shape(lambda: init_cache(dense_model, 1, context))
    row_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(dense) if x.ndim >= 3)
    pool = engine.pools[0]
    ps = engine.cfg.page_size
    final_pages = [-(-(len(r.prompt) + r.max_tokens - 1) // ps) for r in requests]  # the last token is not written
    static_slots = [
        max(len(r.prompt) for r in rows) + max(r.max_tokens for r in rows) for rows in batches(requests, batch)
    ]
    return {
        "page_size": ps,
        "bytes_per_page": page_bytes,
        "bytes_per_token": page_bytes // ps,
        "pool_pages": engine.cfg.num_pages - 1,
        "pool_bytes": (engine.cfg.num_pages - 1) * page_bytes,
        "peak_pages": pool.peak,
        "allocations": pool.allocations,
        "pages_per_sequence_at_peak": pool.peak / batch,
        "paged_bytes_per_sequence_at_peak": pool.peak * page_bytes / batch,
        "pages_per_request_mean": pool.allocations / len(requests),
        "paged_bytes_per_request_final_mean": float(np.mean(final_pages)) * page_bytes,
        "dense_slots_per_row": context,
        "dense_bytes_per_row": row_bytes,
        "static_slots_per_row_mean": float(np.mean(static_slots)),
        "static_bytes_per_row_mean": float(np.mean(static_slots)) * row_bytes / context,
    }


@contextlib.contextmanager
def timed_calls():
    """Times every jitted engine call with rows (to its outputs on the host): `_call`s of width 1 and `_decode`
    (several steps a call) as decode, other `_call`s as prefill."""
    seconds = {"prefill": [], "decode": []}
    originals = {name: getattr(engine_lib, name) for name in ("_call", "_decode")}

    def timed(name):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            cache, out = originals[name](*args, **kwargs)
            out = jax.block_until_ready(out)
            if args[3].any():  # (not a warm-up call, which has no rows)
                decode = name == "_decode" or args[2].shape[1] == 1
                seconds["decode" if decode else "prefill"].append(time.perf_counter() - start)
            return cache, out

        return wrapped

    for name in originals:
        setattr(engine_lib, name, timed(name))
    try:
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(engine_lib, name, fn)


def profile_engine(make_engine, requests: list[Request]) -> dict:
    """Where an engine pass spends its wall time: its jitted calls against the host's Python around them."""
    import cProfile
    import pstats

    with timed_calls() as seconds:
        served, engine = serve_engine(make_engine, requests)
    calls = {k: sum(v) for k, v in seconds.items()}
    result = {
        "wall_s": served.wall,
        "prefill_calls": len(seconds["prefill"]),
        "decode_calls": len(seconds["decode"]),
        "prefill_s": calls["prefill"],
        "decode_s": calls["decode"],
        "prefill_ms_per_call": 1e3 * calls["prefill"] / max(len(seconds["prefill"]), 1),
        "decode_ms_per_call": 1e3 * calls["decode"] / max(len(seconds["decode"]), 1),
        "host_s": served.wall - sum(calls.values()),
    }
    # the engine's own sampling function alone, on a decode call's logits (every row greedy, as here)
    engine = make_engine()
    logits_BV = jax.random.normal(jax.random.key(0), (engine.cfg.max_batch, engine.model.cfg.vocab_size))
    rules_B4 = np.tile(np.asarray([0.0, 0, 1.0, 0], np.float32), (engine.cfg.max_batch, 1))
    keys_B = jax.random.split(jax.random.key(0), engine.cfg.max_batch)
    sample = jax.jit(engine_lib.sample_rows)
    jax.block_until_ready(sample(logits_BV, rules_B4, keys_B))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(sample(logits_BV, rules_B4, keys_B))
        times.append(time.perf_counter() - start)
    result["sample_rows_ms"] = 1e3 * statistics.median(times)
    profiler = cProfile.Profile()
    profiler.enable()
    serve_engine(make_engine, requests)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]  # by own time
    result["host_top_tottime"] = [
        {"function": f"{pathlib.Path(f).name}:{line} {name}", "tottime_s": round(tt, 3), "calls": nc}
        for (f, line, name), (_, nc, tt, _, _) in rows
    ]
    return result


# -- main -------------------------------------------------------------------------------------------------------------
def table(title: str, rows: dict[str, dict[str, float]], base: str) -> None:
    print(f"\n{title}")
    print(
        f"{'system':9s} {'tokens/s':>9s} {'vs ' + base:>9s} {'TTFT p50':>9s} {'p99':>9s} {'per-token p50':>14s} {'p99':>8s}"
    )
    for name, f in rows.items():
        print(
            f"{name:9s} {f['tokens_per_s']:9.1f} {f['tokens_per_s'] / rows[base]['tokens_per_s']:8.2f}x "
            f"{f['ttft_p50_ms']:7.0f}ms {f['ttft_p99_ms']:7.0f}ms {f['per_token_p50_ms']:12.1f}ms "
            f"{f['per_token_p99_ms']:6.1f}ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--prompt_median", type=float, default=48)
    parser.add_argument("--output_median", type=float, default=32)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--systems", default="engine,static,hf")
    parser.add_argument("--torch_threads", default="", help="hf's thread counts, one arm each (default: cores,1)")
    parser.add_argument("--hf_dir", default="", help="the exported checkpoint (default: export into a temp dir)")
    parser.add_argument("--page_size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--prefill_rows", type=int, default=2)
    parser.add_argument("--prefill_wait", type=int, default=EngineConfig.prefill_wait)
    parser.add_argument("--decode_steps", type=int, default=EngineConfig.decode_steps)
    parser.add_argument("--prefix_requests", type=int, default=64)
    parser.add_argument("--prefix_tokens", type=int, default=200)
    parser.add_argument("--suffix_tokens", type=int, default=16)
    parser.add_argument("--prefix_output", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="also split an engine pass into jitted calls and host")
    parser.add_argument("--json_out", default="")
    args = parser.parse_args()

    run, params, tokenizer, step = load_for_inference(args.workdir)
    model, context = Transformer(run.model), run.model.max_seq_len
    stream = held_out_tokens(run, tokenizer)
    lengths = (args.prompt_median, args.output_median, args.sigma)
    requests = workload(stream, args.requests, context, *lengths, args.seed)
    warm = workload(stream, args.warmup, context, args.prompt_median, 8, args.sigma, args.seed + 1)
    config = EngineConfig(
        max_batch=args.max_batch,
        page_size=args.page_size,
        chunk=args.chunk,
        prefill_rows=args.prefill_rows,
        prefill_wait=args.prefill_wait,
        decode_steps=args.decode_steps,
        max_queue=max(args.requests, args.prefix_requests, args.warmup),
    )

    def make_engine(**changes):
        return lambda: Engine(model, params, tokenizer, dataclasses.replace(config, **changes))

    systems = args.systems.split(",")
    cores = len(os.sched_getaffinity(0))
    threads_list = [int(t) for t in (args.torch_threads or (f"{cores},1" if cores > 1 else "1")).split(",")]
    serve = {
        "engine": lambda reqs: serve_engine(make_engine(), reqs)[0],
        "static": lambda reqs: serve_static(model, params, reqs, args.max_batch),
    }
    result = {
        "workdir": args.workdir,
        "step": step,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "context": context,
        "jax_version": jax.__version__,
        "cores": cores,
        "args": vars(args),
        "engine_config": dataclasses.asdict(config),
    }
    if "hf" in systems:
        hf_model, torch_version, transformers_version = load_hf(args.workdir, args.hf_dir)
        for threads in threads_list:
            serve[f"hf {threads}t"] = functools.partial(
                lambda reqs, t: serve_hf(hf_model, reqs, args.max_batch, tokenizer.eod_id, t), t=threads
            )
        result.update(
            torch_threads=threads_list, torch_version=torch_version, transformers_version=transformers_version
        )
    serve = {name: fn for name, fn in serve.items() if name.split()[0] in systems}

    prompt_lens, output_lens = [len(r.prompt) for r in requests], [r.max_tokens for r in requests]
    result["workload"] = {
        "requests": len(requests),
        "prompt_tokens": sum(prompt_lens),
        "output_tokens": sum(output_lens),
        **{f"prompt_p{q}": float(np.percentile(prompt_lens, q)) for q in (50, 90, 99, 100)},
        **{f"output_p{q}": float(np.percentile(output_lens, q)) for q in (50, 90, 99, 100)},
    }
    print(f"workdir {args.workdir} (step {step}, {result['params']:,} params, context {context})")
    print("workload:", json.dumps(result["workload"]))

    for fn in serve.values():  # compiles (engine) and warms caches and thread pools
        fn(warm)
    per_round: dict[str, list[dict]] = {name: [] for name in serve}
    last: dict[str, Served] = {}
    for r in range(args.rounds):
        for name, fn in serve.items():
            last[name] = fn(requests)
            per_round[name].append(figures(last[name], requests))
            print(f"round {r + 1} {name}: {per_round[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    summary = {name: medians(rounds) for name, rounds in per_round.items()}
    base = "static" if "static" in summary else next(iter(summary))
    table(f"medians of {args.rounds} rounds, {len(requests)} requests, batch {args.max_batch}", summary, base)
    result["systems"], result["rounds"] = summary, per_round
    for other in [name for name in summary if "engine" in summary and name != "engine"]:
        ratio = summary["engine"]["tokens_per_s"] / summary[other]["tokens_per_s"]
        same = same_tokens(last["engine"], last[other])
        key = other.replace(" ", "_")
        result[f"engine_over_{key}"], result[f"same_tokens_engine_{key}"] = ratio, same
        print(
            f"engine / {other}: {ratio:.2f}x output tokens/s; greedy tokens identical in {100 * same:.0f}% of requests"
        )

    # K/V memory per running sequence, from the pool of one engine pass over the workload
    served, engine = serve_engine(make_engine(), requests)
    kv = kv_memory(engine, model, requests, context, args.max_batch)
    result["kv_memory"] = kv
    print(
        f"\nK/V memory per sequence: a page of {kv['page_size']} slots is {kv['bytes_per_page']:,} bytes. Peak "
        f"{kv['peak_pages']} pages held by {args.max_batch} rows = {kv['paged_bytes_per_sequence_at_peak']:,.0f} "
        f"bytes per running sequence; a request's pages when it finishes: {kv['paged_bytes_per_request_final_mean']:,.0f}"
        f" bytes on average ({kv['allocations']} pages filled for {len(requests)} requests). Dense: "
        f"{kv['dense_bytes_per_row']:,} bytes per row of {context} slots ({kv['dense_bytes_per_row'] / kv['paged_bytes_per_sequence_at_peak']:.1f}x "
        f"the paged peak); static batching's rows here: {kv['static_slots_per_row_mean']:.0f} slots, "
        f"{kv['static_bytes_per_row_mean']:,.0f} bytes on average. The pool as configured reserves "
        f"{kv['pool_pages']} pages = {kv['pool_bytes']:,} bytes (max_batch rows of the context)."
    )

    # prefix caching: a shared system prompt (--prefix_requests 0: skipped)
    if args.prefix_requests > 0:
        shared = shared_prefix_workload(
            stream, args.prefix_requests, args.prefix_tokens, args.suffix_tokens, args.prefix_output, args.seed + 2
        )
        prefix_rounds = {True: [], False: []}
        for _ in range(args.rounds):
            for caching in (True, False):
                served, engine = serve_engine(make_engine(prefix_caching=caching), shared)
                s = engine.stats
                prefix_rounds[caching].append(
                    {
                        "wall_s": served.wall,
                        "prompt_tokens_computed": s.prompt_tokens,
                        "hit_rate": s.prefix_hit_tokens / max(s.prefix_query_tokens, 1),
                        **{k: v for k, v in figures(served, shared).items() if k != "wall_s"},
                    }
                )
        prefix = {("on" if c else "off"): medians(v) for c, v in prefix_rounds.items()}
        prefix["prompt_tokens"] = sum(len(r.prompt) for r in shared)
        prefix["speedup"] = prefix["off"]["wall_s"] / prefix["on"]["wall_s"]
        result["prefix_caching"] = prefix
        print(
            f"\nprefix caching, {len(shared)} requests of a {args.prefix_tokens}-token shared prefix + {args.suffix_tokens}"
            f" own tokens, {args.prefix_output} output tokens each (medians of {args.rounds}):"
        )
        for name in ("on", "off"):
            p = prefix[name]
            print(
                f"  {name:3s}: hit rate {100 * p['hit_rate']:4.1f}%, prompt tokens computed {p['prompt_tokens_computed']:,.0f}"
                f" of {prefix['prompt_tokens']:,}, wall {p['wall_s']:.2f} s, TTFT p50 {p['ttft_p50_ms']:.0f} ms"
            )
        print(f"  wall time off / on: {prefix['speedup']:.2f}x")

    if args.profile:
        result["engine_profile"] = profile_engine(make_engine(), requests)
        p = result["engine_profile"]
        print(
            f"\nengine profile: wall {p['wall_s']:.2f} s = prefill calls {p['prefill_s']:.2f} s "
            f"({p['prefill_calls']} x {p['prefill_ms_per_call']:.1f} ms) + decode calls {p['decode_s']:.2f} s "
            f"({p['decode_calls']} x {p['decode_ms_per_call']:.1f} ms) + host {p['host_s']:.2f} s"
        )
        print(
            f"  of a decode call's {p['decode_ms_per_call']:.1f} ms, sample_rows alone on its [{args.max_batch}, vocab]"
            f" logits (all greedy) takes {p['sample_rows_ms']:.1f} ms; host Python by own time (a cProfiled pass):"
        )
        for row in p["host_top_tottime"]:
            print(f"  {row['tottime_s']:7.3f} s {row['calls']:8d} calls  {row['function']}")
    line = json.dumps(result)
    print(line)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
