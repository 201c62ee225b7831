"""The training loop: data -> model -> jitted step with donated state -> metrics and evaluation.

`train(run, workdir)` is what train.py, the tests and the experiments all call.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import data as data_lib
from model import Transformer, flops_per_token, param_counts
from sampling import generate
from training.config import RunConfig, TrainConfig, with_vocab
from training.metrics import MetricsWriter, peak_flops_per_device
from training.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


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


def make_train_step(model: Transformer, tx: optax.GradientTransformation, schedule, t: TrainConfig):
    def loss_fn(params, tokens_BT1):
        logits_BTV = model.apply({"params": params}, tokens_BT1[:, :-1])
        loss_BT, _ = cross_entropy(logits_BTV, tokens_BT1[:, 1:], t.z_loss, t.label_smoothing)
        return jnp.mean(loss_BT)

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        tokens_BT1 = batch["tokens"]
        if t.grad_accum == 1:
            loss, grads = grad_fn(state.params, tokens_BT1)
        else:
            micro_ABT1 = tokens_BT1.reshape(t.grad_accum, -1, tokens_BT1.shape[-1])

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


def make_eval_step(model: Transformer, token_bytes: np.ndarray):
    bytes_V = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch: dict) -> dict:
        tokens_BT1 = batch["tokens"]
        logits_BTV = model.apply({"params": params}, tokens_BT1[:, :-1])
        _, nll_BT = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
        return {"nll": jnp.sum(nll_BT), "tokens": nll_BT.size, "bytes": jnp.sum(bytes_V[tokens_BT1[:, 1:]])}

    return eval_step


def evaluate(eval_step, params, batches: list[dict]) -> dict:
    """Mean loss (nats/token), perplexity and bits per UTF-8 byte over the fixed validation batches."""
    totals = {"nll": 0.0, "tokens": 0, "bytes": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(params, batch))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    loss = totals["nll"] / totals["tokens"]
    return {
        "eval/loss": loss,
        "eval/ppl": math.exp(min(loss, 700.0)),
        "eval/bpb": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0),
    }


def init_state(model: Transformer, tx: optax.GradientTransformation, seed: int) -> TrainState:
    init_rng, state_rng = jax.random.split(jax.random.key(seed))

    @jax.jit
    def init():
        dummy_BT = jnp.zeros((1, model.cfg.max_seq_len), jnp.int32)
        params = nn.unbox(model.init(init_rng, dummy_BT)["params"])
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_rng)

    return init()


def describe(run: RunConfig) -> str:
    counts = param_counts(run.model)
    fpt = flops_per_token(run.model, run.data.seq_len)
    return (
        f"params: {counts.total:,} total, {counts.non_embedding:,} non-embedding | "
        f"training FLOPs/token: {fpt:,} ({fpt / 1e6:.1f} MFLOP)"
    )


def train(run: RunConfig, workdir: str | pathlib.Path, *, quiet: bool = False) -> dict:
    """Trains `run` into `workdir`; returns the last logged train and eval metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = run.train
    data = data_lib.load(run.data, workdir)
    run = with_vocab(run, data.tokenizer.vocab_size)
    (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    log = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))

    model = Transformer(run.model)
    tx, schedule = make_optimizer(t)
    state = init_state(model, tx, t.seed)
    train_iter = data.train_iterator(t.batch_size, t.seed)
    val_batches = data.validation_batches(t.batch_size, t.eval_batches)

    compile_start = time.perf_counter()
    batch = next(train_iter)
    step_fn = jax.jit(make_train_step(model, tx, schedule, t), donate_argnums=0).lower(state, batch).compile()
    eval_fn = jax.jit(make_eval_step(model, data.tokenizer.token_bytes))
    log(describe(run))
    log(f"compiled the train step in {time.perf_counter() - compile_start:.1f}s")

    tokens_per_step = t.batch_size * run.data.seq_len
    train_flops = flops_per_token(run.model, run.data.seq_len) * tokens_per_step
    peak, peak_source = peak_flops_per_device(run.model.dtype)
    peak *= jax.device_count()
    log(f"peak for MFU: {peak / 1e9:,.1f} GFLOP/s ({peak_source})")

    writer = MetricsWriter(workdir)
    last: dict = {}
    pending: list[dict] = []
    progress = tqdm(total=t.steps, disable=quiet, desc="train", dynamic_ncols=True, file=sys.stderr)
    interval_start = time.perf_counter()
    for step in range(1, t.steps + 1):
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        if step < t.steps:
            batch = next(train_iter)  # overlaps with the step running asynchronously
        progress.update(1)
        if step % t.log_every == 0 or step == t.steps:
            host = jax.device_get(pending)
            elapsed = time.perf_counter() - interval_start
            step_time = elapsed / len(pending)
            logged = {name: float(np.mean([m[name] for m in host])) for name in host[0]}
            logged["train/lr"] = float(host[-1]["train/lr"])
            logged["perf/step_time"] = step_time
            logged["perf/tokens_per_sec"] = tokens_per_step / step_time
            logged["perf/mfu"] = train_flops / step_time / peak
            writer.write(step, logged)
            last.update(logged)
            progress.set_postfix(loss=f"{logged['train/loss']:.3f}", tok_s=f"{logged['perf/tokens_per_sec']:,.0f}")
            if not math.isfinite(logged["train/loss"]):
                raise FloatingPointError(f"step {step}: train/loss is {logged['train/loss']}; stopping")
            pending = []
            interval_start = time.perf_counter()
        if step % t.eval_every == 0 or step == t.steps:
            eval_start = time.perf_counter()
            evaluated = evaluate(eval_fn, state.params, val_batches)
            writer.write(step, evaluated)
            last.update(evaluated)
            if not quiet:
                progress.write(
                    f"step {step}: eval/loss {evaluated['eval/loss']:.4f}  eval/bpb {evaluated['eval/bpb']:.4f}"
                )
            interval_start += time.perf_counter() - eval_start  # evaluation time is not training time
    progress.close()
    writer.close()

    if t.sample_tokens > 0:
        prompt = data.tokenizer.encode(t.sample_prompt)
        sample = data.tokenizer.decode(generate(model, state.params, prompt, t.sample_tokens, seed=t.seed))
        (workdir / "samples.txt").write_text(t.sample_prompt + sample + "\n")
        log(f"--- sample ---\n{t.sample_prompt}{sample}\n--------------")
    return {"step": t.steps, **last}


def run_summary(result: dict) -> str:
    keys = ("train/loss", "eval/loss", "eval/bpb", "perf/tokens_per_sec", "perf/mfu")
    return "  ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)
