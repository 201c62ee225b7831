"""The training loop: data -> model -> jitted step with donated state -> metrics and evaluation.

`train(run, workdir)` is what train.py, the tests and the experiments all call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

import data as data_lib
from data.tokenizer import (
    HFTokenizer,
    Tokenizer,
    bpe_vocab_size,
    build_tokenizer,
    cache_tokenizer,
    tokenizer_from_dict,
    tokenizer_to_dict,
)
from model import Transformer, flops_per_token, lora, param_counts
from model import heads as heads_lib
from model.positions import POSITIONS
from model.quant.params import check as quant_check
from model.quant.schemes import QuantError
from parallel.layout import Layout, abstract_params, host_copy, model_for, plan, sequence_order
from parallel.sharding import global_batch, process_rows, replicated_batch
from sampling import generate, prompt_ids
from training import hf
from training.checkpoint import (
    Checkpointer,
    CheckpointError,
    Restored,
    check_same,
    checkpoints_dir,
    differences,
    lora_start,
    meta_for,
    restore_params,
)
from training.checkpoint import abstract_params as model_params
from training.config import ConfigError, RunConfig, with_vocab
from training.evaluation import Inputs, evaluate, make_eval_step
from training.metrics import MetricsWriter, StepClock, mfu_warning, peak_flops
from training.objectives import OBJECTIVES
from training.optim import SCHEDULES, make_optimizer, path_name, unmatched
from training.qat import check as check_qat
from training.qat import init_qat, jit_forward_weights, learns_clips
from training.qat import spec_of as qat_spec
from training.state import TrainState, abstract_state, shardings_of
from training.step import init_state, make_train_step
from training.workdir import hold_workdir


def inputs_for(run: RunConfig, layout: Layout, eod_id: int | None) -> Inputs:
    """How this run's batches become model inputs on `layout` (`eod_id`: the tokenizer's end-of-document token,
    which data.document_mask needs)."""
    if run.data.document_mask and eod_id is None:
        raise ValueError("data.document_mask needs the tokenizer's end-of-document id")
    order_T = sequence_order(run.data.seq_len, layout)
    return Inputs(order_T, eod_id if run.data.document_mask else None, heads_lib.extra_tokens(run.model))


def jit_train_step(
    model: Transformer,
    tx,
    schedule,
    run: RunConfig,
    layout: Layout,
    state_shardings: TrainState,
    eod_id: int | None = None,
    teacher: Transformer | None = None,
):
    """The train step jitted for `layout`: state and batches sharded as it says, the state donated."""
    return jax.jit(
        make_train_step(model, tx, schedule, run.train, inputs_for(run, layout, eod_id), teacher),
        in_shardings=(state_shardings, layout.batch),
        out_shardings=(state_shardings, layout.replicated),
        donate_argnums=0,
    )


def check_trainable(run: RunConfig) -> None:
    """ConfigError (one line) when a train.trainable pattern selects no parameter of the model (a typo would
    otherwise freeze what it meant to train); reads only the params' abstract shapes."""
    patterns = run.train.trainable
    if patterns and (missed := unmatched(patterns, params := model_params(run.model))):
        example = path_name(jax.tree_util.tree_leaves_with_path(params)[-1][0])
        raise ConfigError(
            f"train.trainable={patterns!r}: {missed[0]!r} matches no parameter path (re.search over paths like "
            f"{example!r})"
        )


def check_lora(run: RunConfig) -> None:
    """ConfigError (one line) when model.lora.targets adapt no weight of this model, or when its weights cannot be
    stored as model.lora.base_quant (QLoRA's NF4 groups of 64 input channels must divide each weight's)."""
    lo = run.model.lora
    if lo.rank and not jax.tree.leaves(lora.adapters(model_params(run.model))):
        raise ConfigError(f"model.lora.targets={lo.targets!r}: no weight of this model has these names")
    if lo.base_quant:
        try:
            quant_check(run.model, lora.base_quant_spec(run.model))
        except QuantError as e:
            raise ConfigError(f"model.lora.base_quant={lo.base_quant!r}: {e}") from None


def describe(run: RunConfig) -> str:
    counts = param_counts(run.model)
    fpt = flops_per_token(run.model, run.data.seq_len)
    adapters = ""
    if run.model.lora.rank:  # not part of the model's counts (the merged model has none)
        size = sum(x.size for x in jax.tree.leaves(lora.adapters(model_params(run.model))))
        adapters = f" + {size:,} LoRA adapter params (trained)"
    return (
        f"params: {counts.total:,} total, {counts.non_embedding:,} non-embedding, {counts.active:,} active per token"
        f"{adapters} | training FLOPs/token: {fpt:,} ({fpt / 1e6:.1f} MFLOP)"
    )


# Model keys that change only how the same function of the same params is computed: causal_blocks and
# attention_impl the attention math, scan_unroll how the layer loop is compiled.
COMPUTE_ONLY = {"model.causal_blocks", "model.attention_impl", "model.scan_unroll"}

# Keys a resumed run may not change without a CheckpointError, but for these: the vocabulary size is checked
# against the tokenizer once it is loaded, max_seq_len is data.seq_len, cache_dir only says where token
# stores are cached, and the COMPUTE_ONLY keys.
# model.lora.lr_ratio is the optimizer's (LoRA+), which keeps the same state for any ratio.
RESUME_IGNORES = {"model.vocab_size", "model.max_seq_len", "model.lora.lr_ratio", "data.cache_dir"} | COMPUTE_ONLY


def resume_targets(run: RunConfig, directory: pathlib.Path, stored: RunConfig, layout: Layout | None = None) -> dict:
    """Abstract params and optimizer state for resuming `run` from a checkpoint written with `stored`, placed
    as `layout` shards them (whatever mesh wrote them)."""
    check_same(stored, run, directory, ("model", "data"), RESUME_IGNORES)
    if stored.train.trainable != run.train.trainable:  # the optimizer state holds moments for the trained params only
        raise CheckpointError(
            f"{directory}: train.trainable={stored.train.trainable!r} in the checkpoint but {run.train.trainable!r} "
            "in this config (use another workdir, or the checkpoint's value)"
        )
    run = with_vocab(run, stored.model.vocab_size)
    model, (tx, _) = Transformer(run.model), make_optimizer(run.train, run.model)
    if layout is None:
        abstract = jax.eval_shape(lambda: init_state(model, tx, run.train.seed, train=run.train))
    else:
        abstract = abstract_state(model, tx, layout, train=run.train)
    arrays = arrays_of(abstract, adapters_only=bool(run.model.lora.rank))
    if not same_clips(stored, run):  # learned clipping switched on at resume (or for another scheme): fresh factors
        arrays.pop("qat", None)
    return arrays


def same_clips(stored: RunConfig, run: RunConfig) -> bool:
    """Whether a checkpoint written with `stored` holds the clipping factors `run` learns (training/qat.py)."""
    return (
        learns_clips(stored.train.qat)
        and learns_clips(run.train.qat)
        and qat_spec(stored.train.qat) == qat_spec(run.train.qat)
    )


def arrays_of(state: TrainState, frozen_from: str | None = None, adapters_only: bool = False) -> dict:
    """The array items of a checkpoint (model_state only where the model keeps any, as older checkpoints lack it;
    the frozen params only where the state holds some that are not the checkpoint `frozen_from` already holds).
    `adapters_only`: a LoRA run's params are its adapters; the frozen base is rebuilt from `lora_base` (see
    `train_record`)."""
    params = lora.adapters(state.params) if adapters_only else state.params
    arrays = {"params": params, "opt_state": state.opt_state}
    arrays |= {"model_state": state.model_state} if jax.tree.leaves(state.model_state) else {}
    arrays |= {"qat": state.qat} if jax.tree.leaves(state.qat) else {}  # train.qat's learned clipping factors
    return arrays | ({"frozen": state.frozen} if jax.tree.leaves(state.frozen) and frozen_from is None else {})


def init_from_check(run: RunConfig, path: str, stored: RunConfig) -> None:
    """Another run's params fit this one if the model configs agree (max_seq_len only sizes learned positions)."""
    ignore = (
        {"model.vocab_size", "model.lora"}  # a LoRA run starts from a plain run's params, adapters added
        | COMPUTE_ONLY
        | (set() if POSITIONS[run.model.position].bounded else {"model.max_seq_len"})
    )
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
        if restored.run.train.batch_size != t.batch_size:
            log(f"continuing at window {stream_position(restored)} of the training stream, {t.batch_size} per step")
        old_lr, new_lr = (float(SCHEDULES[r.train.schedule](r.train)(restored.step)) for r in (restored.run, run))
        if new_lr > old_lr * (1 + 1e-6):
            log(
                f"the learning rate re-warms at step {restored.step}: {old_lr:.3g} on the checkpoint's schedule, "
                f"{new_lr:.3g} on this run's ({t.schedule} over train.steps={t.steps})"
            )
        if t.init_from:
            log(f"train.init_from={t.init_from!r} ignored: the workdir has checkpoints, resuming instead")
        if OBJECTIVES[t.objective].frozen and "frozen_from" not in restored.train:
            raise CheckpointError(
                f"{restored.path}: holds no frozen model, which train.objective={t.objective!r} needs (resume with "
                f"the checkpoint's train.objective={restored.run.train.objective!r}, or start another workdir from "
                "it with train.init_from)"
            )
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


def load_teacher(run: RunConfig, layout: Layout) -> tuple[Transformer, dict, str, Any]:
    """(the teacher's model, its variables {"params"} placed for `layout`, where they came from, its tokenizer) of
    train.distill: a workdir's latest (or a step directory's) params, or a Hugging Face directory's. Read-only, and
    read again on resume: checkpoints do not hold it. Called outside `layout.activate()`, as the HF reader must."""
    d = run.train.distill
    if d.teacher_workdir:
        source = restore_params(d.teacher_workdir, abstract=lambda cfg: abstract_params(Transformer(cfg), layout))
        cfg, params, where = source.run.model, source.arrays["params"], str(source.path)
        tokenizer = tokenizer_from_dict(source.meta["tokenizer"])
    else:
        teacher_run, params, tokenizer = hf.load(d.teacher_hf_dir, layout)
        cfg, where = teacher_run.model, d.teacher_hf_dir
    if not POSITIONS[cfg.position].bounded:  # max_seq_len only sizes learned positions
        cfg = dataclasses.replace(cfg, max_seq_len=run.data.seq_len)
    return model_for(cfg, layout), {"params": params}, where, tokenizer


def same_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether the two tokenizers give every token the same id (an exported byte tokenizer is the byte tokenizer)."""
    vocabulary = lambda tok: tok.to_tokenizers().get_vocab(with_added_tokens=True)  # noqa: E731
    return vocabulary(a) == vocabulary(b)


def check_teacher_tokenizer(run: RunConfig, teacher_tokenizer, tokenizer) -> None:
    """ConfigError (one line naming both) unless the teacher's tokenizer gives the student's tokens the same ids."""
    if not same_ids(teacher_tokenizer, tokenizer):
        d = run.train.distill
        key, value = (
            ("train.distill.teacher_workdir", d.teacher_workdir)
            if d.teacher_workdir
            else ("train.distill.teacher_hf_dir", d.teacher_hf_dir)
        )
        raise ConfigError(
            f"{key}={value!r}: the teacher's tokenizer {teacher_tokenizer.name!r} is not the student's "
            f"data.tokenizer={run.data.tokenizer!r} (distillation compares their next-token distributions)"
        )


def start_tokenizer(run: RunConfig, source: Restored, workdir: pathlib.Path) -> None:
    """A run that starts from another run's params (train.init_from) reads text with that run's tokenizer: the
    params' embedding rows are its token ids. With data.tokenizer='bpe:N' (train a BPE on the corpus) the source's
    own N-token BPE is taken instead, written as this workdir's tokenizer.json (which data.load reads and resumes
    keep); a BPE trained on the fine-tuning corpus would give the same ids to other strings. Any other tokenizer
    that does not give the same ids is a one-line ConfigError, before anything is written."""
    theirs = tokenizer_from_dict(source.meta["tokenizer"])
    spec, n = run.data.tokenizer, bpe_vocab_size(run.data.tokenizer)
    if n is not None and isinstance(theirs, HFTokenizer) and theirs.vocab_size == n:
        cache_tokenizer(theirs, workdir)
        return
    if n is None and same_ids(theirs, build_tokenizer(spec, workdir, lambda: ())):
        return
    raise ConfigError(
        f"data.tokenizer={spec!r}: train.init_from={run.train.init_from!r} was trained with {theirs.name!r} "
        f"({theirs.vocab_size} tokens), whose ids its embeddings hold: use data.tokenizer={theirs.name!r}"
    )


def stream_position(restored: Restored) -> int:
    """How many windows of the training stream the checkpointed run had consumed. (Older checkpoints hold grain's
    iterator state, a count of batches of the batch size they were written with.)"""
    data = restored.train["data"]
    if "windows" in data:
        return int(data["windows"])
    return int(data["next_index"]) * restored.run.train.batch_size


def model_vocab(source: Restored, tokenizer, tokenizer_spec: str) -> int:
    """The vocabulary size of a run whose params come from `source`: the tokenizer's, or the checkpoint's larger
    one when it was written with this very tokenizer (a Hugging Face model's embedding has rows no token uses)."""
    stored = source.run.model.vocab_size
    if stored == tokenizer.vocab_size:
        return stored
    if stored > tokenizer.vocab_size and source.meta.get("tokenizer") == tokenizer_to_dict(tokenizer):
        return stored
    raise CheckpointError(
        f"{source.path}: model.vocab_size={stored} in the checkpoint but "
        f"data.tokenizer={tokenizer_spec!r} gives {tokenizer.vocab_size}"
    )


def restored_state(restored: Restored, layout: Layout) -> TrainState:
    rng = jax.random.wrap_key_data(
        np.asarray(restored.train["rng"]["data"], np.uint32), impl=restored.train["rng"]["impl"]
    )
    step = jax.device_put(np.int32(restored.step), layout.replicated)
    params, opt_state = restored.arrays["params"], restored.arrays["opt_state"]
    model_state, qat = restored.arrays.get("model_state", {}), restored.arrays.get("qat", {})
    return TrainState(step, params, opt_state, jax.device_put(rng, layout.replicated), model_state, qat=qat)


def restored_frozen(restored: Restored, checkpointer: Checkpointer, abstract: Any) -> Any:
    """The frozen params of a resumed run, placed as `abstract` (the params' ShapeDtypeStructs) says: from the
    checkpoint they were loaded from when its `train` item names one (`frozen_from`), else its own `frozen` item."""
    frozen_from = restored.train["frozen_from"]
    if frozen_from is not None:
        return restore_params(frozen_from, abstract=lambda cfg: abstract).arrays["params"]
    return checkpointer.restore(lambda run: {"frozen": abstract}, step=restored.step).arrays["frozen"]


def train_record(
    state: TrainState,
    data_state: dict,
    pending_host: list[dict],
    frozen_from: str | None = None,
    lora_base: tuple[str | None] | None = None,
) -> dict:
    """The `train` item of a checkpoint: what besides the arrays a resumed run needs to continue exactly. For a
    state with frozen params, `frozen_from`: the step directory they were loaded from and are reloaded from on
    resume (None: the `frozen` item holds them). For a LoRA run, `lora_base`: (the step directory its base params
    came from, None: train.seed's initialisation), which `checkpoint.lora_start` rebuilds them from."""
    rng = {"impl": str(jax.random.key_impl(state.rng)), "data": jax.device_get(jax.random.key_data(state.rng)).tolist()}
    pending = [{name: float(value) for name, value in m.items()} for m in pending_host]
    record = {"step": int(state.step), "rng": rng, "data": data_state, "pending": pending}
    record |= {"lora_base": lora_base[0]} if lora_base is not None else {}
    return record | ({"frozen_from": frozen_from} if jax.tree.leaves(state.frozen) else {})


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_flag():
    """Yields a function giving the name of the first stop signal (SIGTERM, SIGINT) that arrived, or None; the
    previous handlers come back on exit.

    A SIGINT after the first stop signal (a second Ctrl-C during the final save) kills the process with SIGINT
    at once: orbax writes a step into a temporary directory and renames it only when complete, so the abandoned
    save never reads as a checkpoint and the re-run resumes from the last complete one. Only the main thread
    can install signal handlers; in other threads both signals keep their usual meaning.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            print(f"{received[0]} then SIGINT: aborting without finishing the checkpoint", file=sys.stderr, flush=True)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        if not received:
            received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, p in previous.items():
            signal.signal(s, p if p is not None else signal.SIG_DFL)


def check_eval_tasks(run: RunConfig) -> None:
    """ConfigError (one line) for a train.eval_tasks entry lm-eval does not know or cannot load, before anything
    compiles or is written."""
    if not run.train.eval_tasks:
        return
    from experiments import harness

    try:
        harness.check_training_tasks(run.train.eval_tasks)
    except harness.EvalError as e:
        raise ConfigError(f"train.eval_tasks={run.train.eval_tasks!r}: {e}") from None


def downstream(run: RunConfig, params, model_state, tokenizer, step: int, workdir: pathlib.Path | None) -> dict:
    """eval/<task>/<metric> of train.eval_tasks on `params` (the weights the forward pass reads now); each
    document's scores go to `workdir`/downstream.json (the latest evaluation's; sweep reports pair them across
    runs)."""
    from experiments import harness

    weights = {"params": params, "state": model_state} if model_state else params
    t = run.train
    results = harness.downstream(run.model, weights, tokenizer, t.eval_tasks, t.eval_tasks_limit, t.batch_size)
    if workdir is not None:
        record = {"step": step, "tasks": harness.per_document(results)}
        tmp = workdir / "downstream.json.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(workdir / "downstream.json")
    return harness.training_metrics(results)


def train(run: RunConfig, workdir: str | pathlib.Path, *, quiet: bool = False, devices: list | None = None) -> dict:
    """Trains `run` into `workdir`, resuming from its latest complete checkpoint if it has one.

    Runs on a mesh over `devices` (default: all global devices) shaped by `run.mesh`; on several processes
    each loads its rows of every batch, all take part in checkpoints and only process 0 writes logs,
    metrics and samples.
    Returns the last logged train and eval metrics, the step reached, `preempted`: True when SIGTERM or SIGINT
    stopped the run early (after finishing the step and writing a checkpoint), and `loop_seconds`: the wall
    time of the training loop, evaluations and saves included.
    """
    workdir = pathlib.Path(workdir)
    t, c = run.train, run.checkpoint
    # A mesh that does not fit, or an attention implementation that cannot run here, fails before anything is read
    # or written.
    layout = plan(run, devices)
    check_trainable(run)
    check_lora(run)
    check_qat(run)
    check_eval_tasks(run)
    objective = OBJECTIVES[t.objective]
    lead = jax.process_index() == 0
    quiet = quiet or not lead
    log = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    lock = hold_workdir(workdir)  # before anything in the workdir is read or written; held until the last save
    checkpointer = Checkpointer(checkpoints_dir(workdir), c)
    try:
        teacher = None  # the teacher's model, with objectives that have one
        if objective.teacher:
            teacher, teacher_variables, teacher_from, teacher_tokenizer = load_teacher(run, layout)
        with stop_flag() as preempted, layout.activate():
            restored, source = find_start(run, checkpointer, layout, log)
            if restored is None and source is not None:
                start_tokenizer(run, source, workdir)
            data = data_lib.load(run.data, workdir)
            if teacher is not None:
                check_teacher_tokenizer(run, teacher_tokenizer, data.tokenizer)
            vocab = data.tokenizer.vocab_size
            if source is not None:
                vocab = model_vocab(source, data.tokenizer, run.data.tokenizer)
            run = with_vocab(run, vocab)
            model = model_for(run.model, layout)
            inputs = inputs_for(run, layout, data.tokenizer.eod_id)
            tx, schedule = make_optimizer(t, run.model)
            abstract = abstract_state(model, tx, layout, frozen=objective.frozen, train=t)
            state_shardings = shardings_of(abstract)
            frozen_from = None  # the checkpoint that holds the frozen params (None: ours do)
            lora_base = None  # a LoRA run: (where its base params come from,), see train_record
            if restored is not None:
                state = restored_state(restored, layout)
                if run.model.lora.rank:
                    lora_base = (restored.train["lora_base"],)
                    base_abstract = lambda cfg: abstract_params(Transformer(cfg), layout)  # noqa: E731
                    start_params = lora_start(run, lora_base[0], tx, base_abstract, state_shardings)
                    state = state.replace(params=lora.combine(start_params, state.params))
                if learns_clips(t.qat) and "qat" not in restored.arrays:
                    log("train.qat.clip_lr: the checkpoint holds no clipping factors for this scheme; they start at 1")
                    fresh = jax.jit(functools.partial(init_qat, run.model, t), out_shardings=state_shardings.qat)
                    state = state.replace(qat=fresh(state.params))
                if objective.frozen:
                    frozen_from = restored.train["frozen_from"]
                    state = state.replace(frozen=restored_frozen(restored, checkpointer, abstract.frozen))
            else:
                params = source.arrays["params"] if source else None
                state = init_state(model, tx, t.seed, params, state_shardings, frozen=objective.frozen, train=t)
                frozen_from = str(source.path) if source and objective.frozen else None
                lora_base = (str(source.path) if source else None,) if run.model.lora.rank else None
            if teacher is not None:  # the state's frozen variables are the teacher's, placed as they were loaded
                log(f"distilling from {teacher_from}")
                frozen_from = teacher_from
                state = state.replace(frozen=teacher_variables)
                state_shardings = state_shardings.replace(frozen=shardings_of(teacher_variables))
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
            start_window = stream_position(restored) if restored is not None else 0
            train_iter = data.train_iterator(
                t.batch_size,
                t.seed,
                first_row // rows,
                t.batch_size // rows,
                start_window,
                inputs.extra_tokens,
                objective.fields,
            )
            pending: list[dict] = []  # per-step metrics of the current log interval
            if restored is not None:
                pending = [{k: np.asarray(v, np.float32) for k, v in m.items()} for m in restored.train["pending"]]
            val_batches = [
                replicated_batch(b, layout.batch) for b in data.validation_batches(t.batch_size, t.eval_batches)
            ]

            compile_start = time.perf_counter()
            batch = global_batch(next(train_iter), layout.batch)
            step_fn = jit_train_step(model, tx, schedule, run, layout, state_shardings, data.tokenizer.eod_id, teacher)
            step_fn = step_fn.lower(state, batch).compile()
            eval_fn = jax.jit(
                make_eval_step(model, data.tokenizer.token_bytes, inputs),
                in_shardings=(state_shardings.params, layout.batch, state_shardings.model_state),
                out_shardings=layout.replicated,
            )
            # What evaluation, eval tasks and the sample read: under train.qat, the weights fake-quantized.
            forward_weights = jit_forward_weights(run.model, t.qat, state_shardings.params)
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
                data_state = {"windows": start_window + (step - start) * t.batch_size}  # consumed through this step
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
                    weights = forward_weights(state.params, state.step, state.qat.get("clips"))
                    evaluated = evaluate(eval_fn, weights, val_batches, state.model_state)
                    writer.write(step, evaluated)
                    last.update(evaluated)
                    if not quiet:
                        progress.write(
                            f"step {step}: eval/loss {evaluated['eval/loss']:.4f}  eval/bpb {evaluated['eval/bpb']:.4f}"
                        )
                if t.eval_tasks and (step % (t.eval_tasks_every or t.eval_every) == 0 or step == t.steps):
                    clock.pause(state)
                    weights = forward_weights(state.params, state.step, state.qat.get("clips"))
                    scores = downstream(
                        run, weights, state.model_state, data.tokenizer, step, workdir if lead else None
                    )
                    writer.write(step, scores)
                    last.update(scores)
                    if not quiet:
                        progress.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                stopped = preempted() is not None and step < t.steps
                if step % c.every == 0 or step == t.steps or stopped:
                    clock.pause(state)  # nor is saving
                    host = jax.device_get(pending)
                    check_finite(host, step, saved)  # never checkpoint a diverged state
                    record = train_record(state, data_state, host, frozen_from, lora_base)
                    checkpointer.save(step, arrays_of(state, frozen_from, lora_base is not None), record, meta)
                    saved = step
                clock.resume()
                if stopped:
                    break
            loop_seconds = time.perf_counter() - loop_start
            progress.close()
            writer.close()
            if stopped:
                checkpointer.wait()  # with the stop handlers still installed: a second Ctrl-C abandons this save
            sample_params = None
            if t.sample_tokens > 0 and not stopped:
                sample_params = host_copy(forward_weights(state.params, state.step, state.qat.get("clips")))
                if jax.tree.leaves(state.model_state):  # sampling/ takes {"params", "state"} for such models
                    sample_params = {"params": sample_params, "state": host_copy(state.model_state)}
        if stopped:
            log(f"{preempted()}: stopped after step {step} and wrote a checkpoint; re-run the same command to resume")
        elif sample_params is not None and lead:
            prompt = prompt_ids(data.tokenizer, t.sample_prompt)
            sampler = Transformer(run.model)
            sample = data.tokenizer.decode(generate(sampler, sample_params, prompt, t.sample_tokens, seed=t.seed))
            (workdir / "samples.txt").write_text(t.sample_prompt + sample + "\n")
            log(f"--- sample ---\n{t.sample_prompt}{sample}\n--------------")
        return {"step": step, **last, "preempted": stopped, "loop_seconds": loop_seconds}
    finally:
        checkpointer.close()  # waits for a pending save
        if lock is not None:
            lock.release()


def mesh_summary(layout: Layout) -> str:
    split = [f"{axis}={size}" for axis, size in layout.mesh.shape.items() if size > 1]
    return " x ".join(split) or "1 device"


def run_summary(result: dict) -> str:
    keys = ("train/loss", "eval/loss", "eval/bpb", "perf/tokens_per_sec", "perf/mfu")
    return "  ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)
