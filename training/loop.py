"""The training loop: data -> model -> jitted step with donated state -> metrics and evaluation.

`train(run, workdir)` is what train.py, the tests and the experiments all call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import data as data_lib
from model import Transformer, flops_per_token, param_counts
from model.attention import cpu_kernel_blocker
from parallel.sharding import global_batch, process_rows, replicated_batch
from sampling import generate, prompt_ids
from training.checkpoint import (
    Checkpointer,
    CheckpointError,
    Restored,
    check_same,
    checkpoints_dir,
    differences,
    meta_for,
    restore_params,
)
from training.config import ConfigError, RunConfig, TrainConfig, with_vocab
from training.layout import (
    Layout,
    TrainState,
    abstract_params,
    abstract_state,
    host_copy,
    model_for,
    plan,
    sequence_order,
    shardings_of,
)
from training.metrics import MetricsWriter, StepClock, mfu_warning, peak_flops
from training.optim import make_optimizer


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss: float = 0.0, label_smoothing: float = 0.0):
    """Per-token training loss and plain negative log-likelihood, both float32 [B, T]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    loss_BT = nll_BT
    if label_smoothing > 0:
        uniform_BT = log_z_BT - jnp.mean(logits_BTV, axis=-1)  # cross-entropy against the uniform distribution
        loss_BT = (1 - label_smoothing) * nll_BT + label_smoothing * uniform_BT
    if z_loss > 0:
        loss_BT = loss_BT + z_loss * jnp.square(log_z_BT)
    return loss_BT, nll_BT


def model_inputs(tokens_BT1: jax.Array, order_T: np.ndarray | None = None):
    """(inputs, targets, positions or None) of a batch of windows; with `order_T` (ring attention's zig-zag
    layout) the tokens are permuted along the sequence and the positions say where each one really is."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    if order_T is None:
        return inputs_BT, targets_BT, None
    return inputs_BT[:, order_T], targets_BT[:, order_T], jnp.broadcast_to(jnp.asarray(order_T), inputs_BT.shape)


def make_train_step(
    model: Transformer, tx: optax.GradientTransformation, schedule, t: TrainConfig, order_T: np.ndarray | None = None
):
    def loss_fn(params, tokens_BT1):
        inputs_BT, targets_BT, positions_BT = model_inputs(tokens_BT1, order_T)
        logits_BTV = model.apply({"params": params}, inputs_BT, positions_BT)
        loss_BT, _ = cross_entropy(logits_BTV, targets_BT, t.z_loss, t.label_smoothing)
        return jnp.mean(loss_BT)

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        tokens_BT1 = batch["tokens"]
        if t.grad_accum == 1:
            loss, grads = grad_fn(state.params, tokens_BT1)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: every batch shard holds 1/A of each one.
            micro_ABT1 = tokens_BT1.reshape(-1, t.grad_accum, tokens_BT1.shape[-1]).swapaxes(0, 1)

            def accumulate(carry, micro_BT1):
                loss, grads = grad_fn(state.params, micro_BT1)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_ABT1)
            loss, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads), "train/lr": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(model: Transformer, tx, schedule, run: RunConfig, layout: Layout, state_shardings: TrainState):
    """The train step jitted for `layout`: state and batches sharded as it says, the state donated."""
    return jax.jit(
        make_train_step(model, tx, schedule, run.train, sequence_order(run.data.seq_len, layout)),
        in_shardings=(state_shardings, layout.batch),
        out_shardings=(state_shardings, layout.replicated),
        donate_argnums=0,
    )


def make_eval_step(model: Transformer, token_bytes: np.ndarray, order_T: np.ndarray | None = None):
    bytes_V = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch: dict) -> dict:
        inputs_BT, targets_BT, positions_BT = model_inputs(batch["tokens"], order_T)
        mask_BT = batch["mask"] if order_T is None else batch["mask"][:, order_T]
        logits_BTV = model.apply({"params": params}, inputs_BT, positions_BT)
        _, nll_BT = cross_entropy(logits_BTV, targets_BT)
        return {
            "nll": jnp.sum(nll_BT * mask_BT),
            "tokens": jnp.sum(mask_BT),
            "bytes": jnp.sum(bytes_V[targets_BT] * mask_BT),
        }

    return eval_step


def evaluate(eval_step, params, batches: list[dict]) -> dict:
    """Mean loss (nats/token), perplexity and bits per UTF-8 byte over `batches` ({'tokens', 'mask'})."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(params, batch))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    loss = totals["nll"] / max(totals["tokens"], 1.0)
    return {
        "eval/loss": loss,
        "eval/ppl": math.exp(min(loss, 700.0)),
        "eval/bpb": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0),
    }


def score_text(model: Transformer, params, tokenizer, text: str, seq_len: int, batch_size: int) -> dict:
    """eval/loss, eval/ppl and eval/bpb of `text` as one document (end-of-document appended, as the
    token store does), every token scored once: what train.py's eval reports for the same text."""
    tokens = np.asarray(tokenizer.encode(text) + [tokenizer.eod_id], np.int32)
    eval_step = jax.jit(make_eval_step(model, tokenizer.token_bytes))
    return evaluate(eval_step, params, data_lib.scoring_batches(tokens, seq_len, batch_size))


def init_state(
    model: Transformer, tx: optax.GradientTransformation, seed: int, params: Any = None, shardings: Any = None
) -> TrainState:
    """Step 0: the model's initial params (or the given ones, e.g. another run's), fresh optimizer state and RNG,
    created directly in place when `shardings` (a TrainState of shardings) says where: the whole model is
    never built on one device."""
    init_rng, state_rng = jax.random.split(jax.random.key(seed))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(params):
        if params is None:
            dummy_BT = jnp.zeros((1, model.cfg.max_seq_len), jnp.int32)
            # Plain attention: parameters do not depend on how attention is computed (ring attention splits
            # the batch, which a 1-row dummy cannot be).
            params = nn.unbox(model.clone(attention=None).init(init_rng, dummy_BT)["params"])
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_rng)

    return init(params)


def describe(run: RunConfig) -> str:
    counts = param_counts(run.model)
    fpt = flops_per_token(run.model, run.data.seq_len)
    return (
        f"params: {counts.total:,} total, {counts.non_embedding:,} non-embedding | "
        f"training FLOPs/token: {fpt:,} ({fpt / 1e6:.1f} MFLOP)"
    )


# Model keys that change only how the same function of the same params is computed: causal_blocks and
# attention_impl the attention math, scan_unroll how the layer loop is compiled.
COMPUTE_ONLY = {"model.causal_blocks", "model.attention_impl", "model.scan_unroll"}

# Keys a resumed run may not change without a CheckpointError, but for these: the vocabulary size is checked
# against the tokenizer once it is loaded, max_seq_len is data.seq_len, cache_dir only says where token
# stores are cached, and the COMPUTE_ONLY keys.
RESUME_IGNORES = {"model.vocab_size", "model.max_seq_len", "data.cache_dir"} | COMPUTE_ONLY


def resume_targets(run: RunConfig, directory: pathlib.Path, stored: RunConfig, layout: Layout | None = None) -> dict:
    """Abstract params and optimizer state for resuming `run` from a checkpoint written with `stored`, placed
    as `layout` shards them (whatever mesh wrote them)."""
    check_same(stored, run, directory, ("model", "data"), RESUME_IGNORES)
    run = with_vocab(run, stored.model.vocab_size)
    model, (tx, _) = Transformer(run.model), make_optimizer(run.train, run.model)
    if layout is None:
        abstract = jax.eval_shape(lambda: init_state(model, tx, run.train.seed))
    else:
        abstract = abstract_state(model, tx, layout)
    return {"params": abstract.params, "opt_state": abstract.opt_state}


def init_from_check(run: RunConfig, path: str, stored: RunConfig) -> None:
    """Another run's params fit this one if the model configs agree (max_seq_len only sizes learned positions)."""
    ignore = {"model.vocab_size"} | COMPUTE_ONLY | ({"model.max_seq_len"} if run.model.position != "learned" else set())
    check_same(stored, run, pathlib.Path(path), ("model",), ignore)


def find_start(
    run: RunConfig, checkpointer: Checkpointer, layout: Layout, log
) -> tuple[Restored | None, Restored | None]:
    """(the checkpoint to resume from, where the params come from): the workdir's latest complete checkpoint,
    else `train.init_from`'s params, else (None, None) for a fresh start.

    Everything that can refuse the run (an incompatible or unreadable checkpoint, a bad init_from) is
    checked here, before anything in the workdir is written.
    """
    t = run.train
    restored = checkpointer.restore(functools.partial(resume_targets, run, checkpointer.directory, layout=layout))
    if restored is not None:
        log(f"resuming from {restored.path}")
        for key, old, new in differences(restored.run, run, ("train",)):
            log(f"{key}: {old!r} in the checkpoint, {new!r} now")
        if t.init_from:
            log(f"train.init_from={t.init_from!r} ignored: the workdir has checkpoints, resuming instead")
        return restored, restored
    if t.init_from:
        source = restore_params(
            t.init_from,
            check=functools.partial(init_from_check, run, t.init_from),
            abstract=lambda cfg: abstract_params(Transformer(cfg), layout),
        )
        log(f"initialising params from {source.path} (fresh optimizer state)")
        return None, source
    return None, None


def check_vocab(source: Restored, vocab_size: int, tokenizer_spec: str) -> None:
    if source.run.model.vocab_size != vocab_size:
        raise CheckpointError(
            f"{source.path}: model.vocab_size={source.run.model.vocab_size} in the checkpoint but "
            f"data.tokenizer={tokenizer_spec!r} gives {vocab_size}"
        )


def restored_state(restored: Restored, layout: Layout) -> TrainState:
    rng = jax.random.wrap_key_data(
        np.asarray(restored.train["rng"]["data"], np.uint32), impl=restored.train["rng"]["impl"]
    )
    step = jax.device_put(np.int32(restored.step), layout.replicated)
    params, opt_state = restored.arrays["params"], restored.arrays["opt_state"]
    return TrainState(step, params, opt_state, jax.device_put(rng, layout.replicated))


def train_record(state: TrainState, data_state: dict, pending_host: list[dict]) -> dict:
    """The `train` item of a checkpoint: what besides the arrays a resumed run needs to continue exactly."""
    rng = {"impl": str(jax.random.key_impl(state.rng)), "data": jax.device_get(jax.random.key_data(state.rng)).tolist()}
    pending = [{name: float(value) for name, value in m.items()} for m in pending_host]
    return {"step": int(state.step), "rng": rng, "data": data_state, "pending": pending}


def check_finite(pending_host: list[dict], step: int, saved: int | None) -> None:
    """Raises FloatingPointError naming the first of the pending steps (ending at `step`) that went non-finite."""
    first = step - len(pending_host) + 1
    for i, metrics in enumerate(pending_host):
        for name in ("train/loss", "train/grad_norm"):
            if not np.isfinite(metrics[name]):
                kept = f"the last checkpoint, step {saved}, is intact" if saved is not None else "no checkpoint"
                raise FloatingPointError(f"step {first + i}: {name} is {float(metrics[name])}; stopping ({kept})")


def trim_metrics(path: pathlib.Path, step: int) -> tuple[dict, int]:
    """Drops metric rows after `step` (a resumed run writes them again) and any line torn by a kill.

    Returns the latest value of each metric kept and how many rows were dropped.
    """
    if not path.exists():
        return {}, 0
    lines = path.read_text().splitlines()
    kept, last = [], {}
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line)
            last.update(row)
    if len(kept) < len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    last.pop("step", None)
    return last, len(lines) - len(kept)


@contextlib.contextmanager
def sigterm_flag():
    """Yields a function telling whether SIGTERM arrived; the previous handler comes back on exit.

    Only the main thread can install signal handlers; in other threads SIGTERM keeps its usual meaning.
    """
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received.is_set
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def train(run: RunConfig, workdir: str | pathlib.Path, *, quiet: bool = False, devices: list | None = None) -> dict:
    """Trains `run` into `workdir`, resuming from its latest complete checkpoint if it has one.

    Runs on a mesh over `devices` (default: all global devices) shaped by `run.mesh`; on several processes
    each loads its rows of every batch, all take part in checkpoints and only process 0 writes logs,
    metrics and samples.
    Returns the last logged train and eval metrics, the step reached, `preempted`: True when SIGTERM
    stopped the run early (after finishing the step and writing a checkpoint), and `loop_seconds`: the wall
    time of the training loop, evaluations and saves included.
    """
    workdir = pathlib.Path(workdir)
    t, c = run.train, run.checkpoint
    layout = plan(run, devices)  # a mesh that does not fit fails here, before anything is read or written
    if run.model.attention_impl == "cpu_kernel" and (blocker := cpu_kernel_blocker(run.model)) is not None:
        raise ConfigError(f"model.attention_impl='cpu_kernel' cannot run here: {blocker} (allowed here: auto, xla)")
    lead = jax.process_index() == 0
    quiet = quiet or not lead
    log = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    checkpointer = Checkpointer(checkpoints_dir(workdir), c)
    try:
        with sigterm_flag() as preempted, layout.activate():
            restored, source = find_start(run, checkpointer, layout, log)
            data = data_lib.load(run.data, workdir)
            run = with_vocab(run, data.tokenizer.vocab_size)
            if source is not None:
                check_vocab(source, data.tokenizer.vocab_size, run.data.tokenizer)
            model = model_for(run.model, layout)
            order_T = sequence_order(run.data.seq_len, layout)
            tx, schedule = make_optimizer(t, run.model)
            state_shardings = shardings_of(abstract_state(model, tx, layout))
            if restored is not None:
                state = restored_state(restored, layout)
            else:
                params = source.arrays["params"] if source else None
                state = init_state(model, tx, t.seed, params, state_shardings)
            start = restored.step if restored else 0
            if lead:
                workdir.mkdir(parents=True, exist_ok=True)
            for damaged in checkpointer.set_aside_after(start):
                log(f"kept the damaged checkpoint {damaged} as {damaged}.damaged-* in {checkpointer.directory}")
            last, dropped = trim_metrics(workdir / "metrics.jsonl", start) if lead else ({}, 0)
            if dropped:
                log(f"dropped {dropped} rows after step {start} from metrics.jsonl")
            if start >= t.steps:
                log(f"the checkpoint at step {start} completes the run (train.steps={t.steps}); nothing to train")
                return {"step": start, **last, "preempted": False, "loop_seconds": 0.0}
            if lead:
                (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
            meta = meta_for(run, data.tokenizer)

            first_row, rows = process_rows(layout.batch, t.batch_size)
            train_iter = data.train_iterator(t.batch_size, t.seed, first_row // rows, t.batch_size // rows)
            pending: list[dict] = []  # per-step metrics of the current log interval
            if restored is not None:
                train_iter.set_state(restored.train["data"])
                pending = [{k: np.asarray(v, np.float32) for k, v in m.items()} for m in restored.train["pending"]]
            val_batches = [
                replicated_batch(b, layout.batch) for b in data.validation_batches(t.batch_size, t.eval_batches)
            ]

            compile_start = time.perf_counter()
            batch = global_batch(next(train_iter), layout.batch)
            step_fn = jit_train_step(model, tx, schedule, run, layout, state_shardings).lower(state, batch).compile()
            eval_fn = jax.jit(
                make_eval_step(model, data.tokenizer.token_bytes, order_T),
                in_shardings=(state_shardings.params, layout.batch),
                out_shardings=layout.replicated,
            )
            log(describe(run))
            log(f"mesh: {mesh_summary(layout)} over {layout.mesh.size} devices, {jax.process_count()} process(es)")
            log(f"compiled the train step in {time.perf_counter() - compile_start:.1f}s")

            tokens_per_step = t.batch_size * run.data.seq_len
            train_flops = flops_per_token(run.model, run.data.seq_len) * tokens_per_step
            peak, peak_source = peak_flops(run.model.dtype, layout.mesh.size, t.peak_flops)
            log(f"peak for MFU: {peak / 1e9:,.1f} GFLOP/s ({peak_source})")
            log(f"checkpoints: every {c.every} steps into {checkpointer.directory}")

            writer = MetricsWriter(workdir, enabled=lead)
            saved = restored.step if restored else None  # the last checkpoint known to be good
            stopped = False
            progress = tqdm(
                total=t.steps, initial=start, disable=quiet, desc="train", dynamic_ncols=True, file=sys.stderr
            )
            clock, peak_recorded, mfu_warned = StepClock(), False, False
            loop_start = time.perf_counter()
            for step in range(start + 1, t.steps + 1):
                state, metrics = step_fn(state, batch)
                clock.step()
                pending.append(metrics)
                data_state = train_iter.get_state()  # this step's batch consumed, the next one not yet fetched
                if step < t.steps:
                    batch = global_batch(next(train_iter), layout.batch)  # overlaps with the running step
                progress.update(1)
                if step % t.log_every == 0 or step == t.steps:
                    # Timed over this process's steps only: `pending` may also hold restored ones.
                    seconds, steps_timed = clock.interval(metrics)
                    host = jax.device_get(pending)
                    step_time = seconds / steps_timed
                    logged = {name: float(np.mean([m[name] for m in host])) for name in host[0]}
                    logged["train/lr"] = float(host[-1]["train/lr"])
                    logged["perf/step_time"] = step_time
                    logged["perf/tokens_per_sec"] = tokens_per_step / step_time
                    logged["perf/mfu"] = train_flops / step_time / peak
                    logged["perf/peak_flops"] = peak
                    if not peak_recorded:  # once per process: a resumed run may measure another peak
                        logged["perf/peak_source"], peak_recorded = peak_source, True
                    writer.write(step, logged)
                    last.update(logged)
                    progress.set_postfix(
                        loss=f"{logged['train/loss']:.3f}",
                        tok_s=f"{logged['perf/tokens_per_sec']:,.0f}",
                        mfu=f"{100 * logged['perf/mfu']:.3g}%",
                    )
                    if lead and not mfu_warned and (warning := mfu_warning(logged["perf/mfu"], peak, peak_source)):
                        progress.write(warning, file=sys.stderr)
                        mfu_warned = True
                    check_finite(host, step, saved)
                    pending = []
                if step % t.eval_every == 0 or step == t.steps:
                    clock.pause(state)  # evaluation time is not training time; the step's own time is
                    evaluated = evaluate(eval_fn, state.params, val_batches)
                    writer.write(step, evaluated)
                    last.update(evaluated)
                    if not quiet:
                        progress.write(
                            f"step {step}: eval/loss {evaluated['eval/loss']:.4f}  eval/bpb {evaluated['eval/bpb']:.4f}"
                        )
                stopped = preempted() and step < t.steps
                if step % c.every == 0 or step == t.steps or stopped:
                    clock.pause(state)  # nor is saving
                    host = jax.device_get(pending)
                    check_finite(host, step, saved)  # never checkpoint a diverged state
                    arrays = {"params": state.params, "opt_state": state.opt_state}
                    checkpointer.save(step, arrays, train_record(state, data_state, host), meta)
                    saved = step
                clock.resume()
                if stopped:
                    break
            loop_seconds = time.perf_counter() - loop_start
            progress.close()
            writer.close()
            sample_params = host_copy(state.params) if t.sample_tokens > 0 and not stopped else None
        if stopped:
            log(f"SIGTERM: stopped after step {step} and wrote a checkpoint; re-run the same command to resume")
        elif sample_params is not None and lead:
            prompt = prompt_ids(data.tokenizer, t.sample_prompt)
            sampler = Transformer(run.model)
            sample = data.tokenizer.decode(generate(sampler, sample_params, prompt, t.sample_tokens, seed=t.seed))
            (workdir / "samples.txt").write_text(t.sample_prompt + sample + "\n")
            log(f"--- sample ---\n{t.sample_prompt}{sample}\n--------------")
        return {"step": step, **last, "preempted": stopped, "loop_seconds": loop_seconds}
    finally:
        checkpointer.close()  # waits for a pending save


def mesh_summary(layout: Layout) -> str:
    split = [f"{axis}={size}" for axis, size in layout.mesh.shape.items() if size > 1]
    return " x ".join(split) or "1 device"


def run_summary(result: dict) -> str:
    keys = ("train/loss", "eval/loss", "eval/bpb", "perf/tokens_per_sec", "perf/mfu")
    return "  ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)
