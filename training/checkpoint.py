"""Checkpoints of a run: orbax step directories under `WORKDIR/checkpoints`, restoring them onto any device
layout, and loading one for inference.

Each step directory holds these items:
- `params`, `opt_state`: the arrays (orbax StandardSave), restored onto the shardings the caller asks for;
- `model_state`: the model's non-trained variables (e.g. a router's bias), only for models that keep any;
- `frozen`: the frozen params an objective trains beside (training/objectives.py), only where they are not another
  checkpoint's params: a run whose frozen params came from `train.init_from` records that step directory instead;
- `qat`: train.qat's learned clipping factors and their Adam state (training/qat.py), only for runs that learn them
  (`train.qat.clip_lr` > 0); `load_clips` reads them for quantizing the checkpoint;
- `train`: JSON with the step, the RNG key data, the position in the training stream ({"windows": consumed})
  and the per-step metrics of the current log interval, so a resumed run logs exactly what an uninterrupted
  one would; with frozen params, `frozen_from`: the step directory that holds them (null: the `frozen` item);
- `meta`: JSON with the format version, the resolved config and the tokenizer, so a step directory alone
  is enough to sample from.

Every error is a `CheckpointError` with a one-line message; entry points print it and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from data.tokenizer import Tokenizer, tokenizer_from_dict, tokenizer_to_dict
from model import ModelConfig, Transformer, init_variables, lora
from training.config import CheckpointConfig, RunConfig, from_dict
from training.qat import abstract_qat, learns_clips
from training.step import init_state

FORMAT_VERSION = 1
ITEMS = ("params", "opt_state", "model_state", "frozen", "qat", "train", "meta")

# Where restored arrays go: one jax.sharding.Sharding for all, a pytree of Shardings matching the targets (a dict
# by item name), or a function from each abstract leaf to its Sharding. None: the first device.
Shardings = Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, damaged, or written for another config or format)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    arrays: dict[str, Any]  # item name -> pytree of jax.Array
    train: dict  # step, rng, stream position, pending per-step metrics
    meta: dict  # format_version, config, tokenizer
    run: RunConfig  # the config the checkpoint was written with
    path: pathlib.Path  # the step directory


def checkpoints_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / "checkpoints"


def meta_for(run: RunConfig, tokenizer: Tokenizer) -> dict:
    """The `meta` item: what a step directory needs to be read back and sampled from on its own."""
    return {"format_version": FORMAT_VERSION, "config": run.to_dict(), "tokenizer": tokenizer_to_dict(tokenizer)}


class Checkpointer:
    """The steps of one checkpoints directory; without a CheckpointConfig it only reads."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig | None = None):
        self.directory = pathlib.Path(directory).absolute()
        self.writable = cfg is not None
        options = ocp.CheckpointManagerOptions(create=False)  # the directory appears with the first save
        if cfg is not None:
            keep = [ocp.checkpoint_managers.LatestN(n=cfg.keep)]
            if cfg.keep_every:
                keep.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=cfg.keep_every))
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
                enable_async_checkpointing=cfg.async_save,
                cleanup_tmp_directories=True,  # half-written steps of a killed save
                create=False,
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """Complete (finalized) steps, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, arrays: dict[str, Any], train: dict, meta: dict) -> None:
        """Starts writing `step`. Returns once the arrays are copied off the devices, so they may be donated."""
        assert self.writable, "a read-only Checkpointer"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        args |= {"train": ocp.args.JsonSave(train), "meta": ocp.args.JsonSave(meta)}
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def set_aside_after(self, step: int) -> list[int]:
        """Renames the steps after `step` (damaged ones that `restore` skipped) to STEP.damaged-TIME, kept for
        inspection, so that a run resumed from `step` can write them again; returns them."""
        newer = [s for s in self.steps() if s > step]
        for s in newer if jax.process_index() == 0 else ():
            path = self.directory / str(s)
            path.rename(path.with_name(f"{s}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
        if newer and jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint set_aside_after")
        if newer:
            self._manager.reload()
        return newer

    def restore(
        self,
        targets: Callable[[RunConfig], dict[str, Any]],
        step: int | None = None,
        shardings: Shardings = None,
    ) -> Restored | None:
        """Restores `step`, or the newest step that reads back completely, warning about each damaged one.

        `targets(config the checkpoint was written with)` gives the abstract arrays to restore by item name
        (e.g. {"params": ...}); it may raise CheckpointError for an incompatible config. None when the
        directory holds no checkpoints; CheckpointError when it holds some but none of them reads back.
        """
        steps = self.steps()
        if step is not None and step not in steps:
            listed = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (steps: {listed})")
        candidates = [step] if step is not None else steps[::-1]
        for s in candidates:
            path = self.directory / str(s)
            try:
                meta = self._manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
                warn_damaged(path, e)
                continue
            run = stored_config(meta, path)
            abstract = with_shardings(targets(run), shardings)
            args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
            hide_closed_loop_noise()  # installed before the read: its threads may start printing at once
            try:
                items = self._manager.restore(s, args=ocp.args.Composite(**args, train=ocp.args.JsonRestore()))
            except Exception as e:
                warn_damaged(path, e)
                continue
            arrays = {name: items[name] for name in abstract}
            return Restored(step=s, arrays=arrays, train=items["train"], meta=meta, run=run, path=path)
        if candidates:
            listed = ", ".join(map(str, candidates))
            raise CheckpointError(
                f"{self.directory}: no checkpoint reads back completely (damaged: {listed}); "
                "move the directory away to start over"
            )
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a pending save, and for the removal of half-written steps, to finish."""
        self._manager.close()
        # orbax 0.12 removes half-written steps in a thread that close() does not wait for; one still running
        # at interpreter exit prints a traceback.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()


# What orbax's reads of a damaged step print while and after it gives up: each array read still in flight
# reports to sys.stderr, from its own thread, that the event loop it would report to is closed (tens to
# hundreds of lines, no information).
TRACEBACK = "Traceback (most recent call last):"
CLOSED_LOOP_NOISE = (
    'File "',  # the two frames in asyncio/base_events.py
    "self._check_closed()",
    "raise RuntimeError('Event loop is closed')",
    "RuntimeError: Event loop is closed",
)


def closed_loop_noise(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(CLOSED_LOOP_NOISE) and ("asyncio" in line or not stripped.startswith('File "'))


class WithoutClosedLoopNoise:
    """A text stream that passes everything to `stream` but the lines of 'Event loop is closed' tracebacks
    (which several threads write at once, each a line in several pieces). A traceback header is held until a
    frame outside asyncio shows it is a real one; text that cannot start a noise line goes through at once, so a
    progress bar's carriage-return updates are not held back. Lines are assembled per thread: one thread's
    'RuntimeError: ' and another's '    self._check_closed()' must not make one line that no pattern matches."""

    def __init__(self, stream):
        self.stream = stream
        self.threads: dict[int, list] = {}  # thread id -> [its unfinished line, a traceback header held]
        self.lock = threading.Lock()  # the noise comes from several threads at once

    def _line(self, line: str, state: list) -> None:
        if line.strip() == TRACEBACK:
            state[1] = True  # a header before it got no frame of its own: it was noise too
            return
        if closed_loop_noise(line):
            state[1] = False
            return
        if state[1] and line.strip().startswith('File "'):  # a real traceback's first frame
            self.stream.write(TRACEBACK + "\n")
            state[1] = False
        self.stream.write(line + "\n")  # other threads' lines may come between a header and its frames

    def write(self, text: str) -> int:
        with self.lock:
            return self._write(text, self.threads.setdefault(threading.get_ident(), ["", False]))

    def _write(self, text: str, state: list) -> int:
        state[0] += text
        *lines, state[0] = state[0].split("\n")
        for line in lines:
            self._line(line, state)
        start = state[0].strip()
        patterns = (TRACEBACK, *CLOSED_LOOP_NOISE)
        if start and not any(p.startswith(start) or start.startswith(p) for p in patterns):
            self.stream.write(state[0])
            state[0] = ""
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def hide_closed_loop_noise() -> None:
    """Filters sys.stderr from now on (the noise keeps coming after the failed restore returns), and drops what the
    other reads of a damaged step raise once it has failed: Python reports each of orbax's abandoned read
    coroutines as 'Exception ignored in: <coroutine ...>' with a traceback and the whole TensorStore spec (tens of
    lines per array), when it is collected."""
    if not isinstance(sys.stderr, WithoutClosedLoopNoise):
        sys.stderr = WithoutClosedLoopNoise(sys.stderr)
    if not getattr(sys.unraisablehook, "drops_orbax_reads", False):
        sys.unraisablehook = _without_orbax_reads(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxReadsLogged) for f in asyncio_log.filters):
        asyncio_log.addFilter(_OrbaxReadsLogged())


class _OrbaxReadsLogged(logging.Filter):
    """Drops asyncio's '... exception was never retrieved' for an abandoned orbax read: the same failure as the
    unraisable coroutine above, reported through logging (with the whole TensorStore spec) when the task, or the
    future of an asyncio.gather over such tasks (whose repr names no file), is collected; or when a bare future
    holding TensorStore's read error is (its error was set from C++, so no traceback passes through orbax)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" not in text.split("\n")[0]:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (ORBAX in text or raised_in_orbax(error) or TENSORSTORE_READ.search(text))


ORBAX = f"{os.sep}orbax{os.sep}"
# TensorStore's error for a chunk of an orbax (OCDBT) checkpoint that cannot be read.
TENSORSTORE_READ = re.compile(r"Error reading .* in OCDBT database at ")


def raised_in_orbax(error: BaseException | None) -> bool:
    """Whether `error`, or an exception it was raised from, passed through orbax's code."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        tb = error.__traceback__
        while tb is not None:
            if ORBAX in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def _without_orbax_reads(hook):
    def unraisable(u) -> None:
        code = getattr(u.object, "cr_code", None)  # a coroutine's
        if not ((code is not None and ORBAX in code.co_filename) or raised_in_orbax(u.exc_value)):
            hook(u)

    unraisable.drops_orbax_reads = True
    return unraisable


def warn_damaged(path: pathlib.Path, error: Exception) -> None:
    print(f"warning: skipping damaged checkpoint {path}: {damage(error)}", file=sys.stderr, flush=True)


def damage(error: BaseException) -> str:
    """Why a step does not read back, in one line: the innermost cause's message (tensorstore's names the array and
    the file), without the TensorStore spec orbax appends as a bound method's repr."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    for e in reversed(chain):
        line = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0].strip()
        if line:
            return line[:300]
    return type(error).__name__


def stored_config(meta: dict, path: pathlib.Path) -> RunConfig:
    """The RunConfig in a checkpoint's meta, after checking the format version."""
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version={version!r}, this code reads format_version={FORMAT_VERSION}"
        )
    try:
        return from_dict(meta["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the stored config does not fit this code ({e})") from None


def differences(stored: RunConfig, current: RunConfig, groups: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(group.key, stored value, current value) for every field of `groups` that differs."""
    a, b = stored.to_dict(), current.to_dict()
    return [
        (f"{group}.{key}", a[group][key], b[group][key])
        for group in groups
        for key in a[group]
        if a[group][key] != b[group][key]
    ]


def check_same(
    stored: RunConfig, current: RunConfig, where: pathlib.Path, groups: tuple[str, ...], ignore: set[str] = frozenset()
) -> None:
    """Raises CheckpointError naming the first key of `groups` (not in `ignore`) whose value differs."""
    for key, old, new in differences(stored, current, groups):
        if key not in ignore:
            raise CheckpointError(
                f"{where}: {key}={old!r} in the checkpoint but {new!r} in this config "
                "(use another workdir, or the checkpoint's value)"
            )


def with_shardings(targets: Any, shardings: Shardings = None) -> Any:
    """ShapeDtypeStructs of `targets` (arrays or abstract arrays) placed as `shardings` says (see `Shardings`);
    with None, abstract leaves that carry a sharding keep it and the others go to the first device."""
    if shardings is None:
        first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = lambda x: getattr(x, "sharding", None) or first  # noqa: E731
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = lambda _, one=shardings: one
    placed = jax.tree.map(shardings, targets) if callable(shardings) else shardings
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), targets, placed)


def abstract_params(cfg: ModelConfig) -> Any:
    """The shapes and dtypes of a model's params, without allocating them."""
    return jax.eval_shape(lambda: nn.unbox(init_variables(Transformer(cfg), jax.random.key(0))["params"]))


def abstract_weights(run: RunConfig) -> Any:
    """The params as a run's checkpoint stores them: float, or quantized as `run.quant` says (model/quant)."""
    params = abstract_params(run.model)
    if not run.quant.scheme:
        return params
    from model.quant.params import quantize_params, spec_of

    return jax.eval_shape(lambda p: quantize_params(run.model, p, spec_of(run.quant)), params)


def locate(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """(checkpoints directory, step or None) for a workdir, its checkpoints directory, or one step directory."""
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "meta").is_dir():
        return path.parent, int(path.name)
    if path.name == "checkpoints" or any(child.name.isdigit() for child in path.iterdir()):
        return path, None
    raise CheckpointError(f"{path}: no checkpoints (not a workdir with checkpoints/, nor a checkpoint directory)")


def list_steps(path: str | pathlib.Path) -> list[int]:
    """The complete checkpoint steps of a workdir (or checkpoints directory, or step directory's siblings);
    CheckpointError when `path` is missing or holds no checkpoints."""
    checkpointer = Checkpointer(locate(path)[0])
    try:
        return checkpointer.steps()
    finally:
        checkpointer.close()


def restore_params(
    path: str | pathlib.Path,
    step: int | None = None,
    shardings: Shardings = None,
    check: Callable[[RunConfig], None] = lambda run: None,
    abstract: Callable[[ModelConfig], Any] = abstract_params,
) -> Restored:
    """The params (not the optimizer state) of the given or latest complete step under `path`.

    `check(config the checkpoint was written with)` may refuse it with a CheckpointError before any array is read;
    `abstract(its model config)` gives the params' shapes (and, if they carry them, their shardings).
    """

    def targets(run: RunConfig) -> dict:
        if run.quant.scheme:
            raise CheckpointError(
                f"{path}: its weights are quantized (quant.scheme={run.quant.scheme!r}); training starts from "
                "float weights (its source workdir, or QAT: train.qat)"
            )
        if run.model.lora.rank:
            raise CheckpointError(
                f"{path}: a LoRA run's checkpoints hold its adapters only; start from its merged workdir "
                "(python -m model.lora merge)"
            )
        check(run)
        return {"params": abstract(run.model)}

    return restore_step(path, step, targets, shardings)


def restore_step(
    path: str | pathlib.Path, step: int | None, targets: Callable[[RunConfig], dict], shardings: Shardings = None
) -> Restored:
    """The items `targets(the checkpoint's config)` names of the given (or the path's, or the latest) complete step
    under a workdir, its checkpoints directory or a step directory; CheckpointError when there is none."""
    directory, path_step = locate(path)
    checkpointer = Checkpointer(directory)
    try:
        restored = checkpointer.restore(targets, step if step is not None else path_step, shardings)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"{path}: no checkpoints in {directory}")
    return restored


def abstract_model_state(cfg: ModelConfig) -> Any:
    """The shapes and dtypes of a model's non-trained state ({} for a model that keeps none)."""
    return jax.eval_shape(lambda: nn.unbox(init_variables(Transformer(cfg), jax.random.key(0)).get("state", {})))


def lora_start(
    run: RunConfig,
    base_from: str | None,
    tx=None,
    abstract: Callable[[ModelConfig], Any] = abstract_params,
    shardings: Any = None,
) -> Any:
    """The params a LoRA run started from (its checkpoints hold only the adapters): `base_from`'s params (a step
    directory; None: `train.seed`'s initialisation), quantized as `model.lora.base_quant` says, with fresh adapters,
    bit for bit what `init_state` built. `shardings`: a TrainState of shardings (with `tx`, the run's optimizer)."""
    base = None if base_from is None else restore_params(base_from, abstract=abstract).arrays["params"]
    return init_state(Transformer(run.model), tx or optax.identity(), run.train.seed, base, shardings).params


def load_clips(path: str | pathlib.Path, step: int | None = None) -> Any:
    """The learned clipping factors (training/qat.py) of the latest complete (or the given) step of a workdir,
    its checkpoints directory or a step directory; None for a run that learned none."""

    def targets(run: RunConfig) -> dict:
        if not learns_clips(run.train.qat):
            return {}
        return {"qat": abstract_qat(run.model, run.train, abstract_params(run.model))}

    restored = restore_step(path, step, targets)
    return restored.arrays["qat"]["clips"] if "qat" in restored.arrays else None


def load_for_inference(path: str | pathlib.Path, step: int | None = None) -> tuple[RunConfig, Any, Tokenizer, int]:
    """(config, weights, tokenizer, step) of the latest complete (or the given) step of a workdir, its checkpoints
    directory, or a step directory; needs no corpus. The weights are the params, or {"params", "state"} for a model
    that keeps non-trained state (e.g. a router's bias), as sampling/ and training.evaluation take them."""

    def targets(run: RunConfig) -> dict:
        state = abstract_model_state(run.model)
        params = lora.adapters(abstract_weights(run)) if run.model.lora.rank else abstract_weights(run)
        return {"params": params} | ({"model_state": state} if jax.tree.leaves(state) else {})

    restored = restore_step(path, step, targets)
    weights = restored.arrays["params"]
    if restored.run.model.lora.rank:  # adapters only: the frozen base comes from where the run's came from
        weights = lora.combine(lora_start(restored.run, restored.train.get("lora_base")), weights)
    if "model_state" in restored.arrays:
        weights = {"params": weights, "state": restored.arrays["model_state"]}
    return restored.run, weights, tokenizer_from_dict(restored.meta["tokenizer"]), restored.step
