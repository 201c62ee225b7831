"""A loaded run quantized (round to nearest, GPTQ or AWQ on calibration windows) and written as a workdir: what
`python -m model.quant` and `infer.py --quant` share. The schemes and the params-level work are in model/quant/.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Any

from data.pipeline import calibration_windows
from data.tokenizer import Tokenizer
from model.quant import calibrated
from model.quant.params import check, clipped, quantize_params, scheme_of, spec_of
from model.quant.schemes import GROUPS, SCHEMES, QuantError, Spec
from training.checkpoint import Checkpointer, checkpoints_dir, meta_for
from training.cli import read_text
from training.config import QUANT_METHODS, CheckpointConfig, QuantConfig, RunConfig
from training.qat import learns_clips

METHODS = ("rtn", "gptq", "awq")  # what a quantizing command runs (QUANT_METHODS adds "qat", a training option)
assert set(METHODS) <= set(QUANT_METHODS)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to quantize with: `scheme`, `group` (None: the scheme's default), `method`, calibration windows of
    the training corpus (`calib_batches` batches of train.batch_size windows of data.seq_len tokens) or every
    window of a text file (`calib_file`), `skip` globs (None: the default)."""

    scheme: str
    group: int | None = None
    method: str = "rtn"
    calib_batches: int = 0
    calib_file: str | None = None
    skip: tuple[str, ...] | None = None
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal

    def errors(self) -> list[str]:
        """One line per problem, checkable before anything loads."""
        out = []
        if self.scheme not in SCHEMES:
            out.append(f"--quant={self.scheme!r}: one of {', '.join(SCHEMES)}")
        if self.group is not None and self.group not in GROUPS:
            out.append(f"--quant_group={self.group}: one of {', '.join(map(str, GROUPS))} (0: per output channel)")
        if self.method not in METHODS:
            out.append(f"--quant_method={self.method!r}: one of {', '.join(METHODS)}")
        if self.calib_batches < 0 or (self.calib_batches == 0 and self.calib_file is None and self.method != "rtn"):
            out.append(
                f"--calib_batches={self.calib_batches}: --quant_method={self.method} needs calibration windows "
                "(>= 1, or --calib_file)"
            )
        if self.calib_batches and self.calib_file:
            out.append("--calib_batches and --calib_file: give one (windows of the training corpus, or of a file)")
        if self.act_order and self.method != "gptq":
            out.append(f"--gptq_act_order: a GPTQ option (--quant_method={self.method})")
        if self.calib_file is not None and not pathlib.Path(self.calib_file).is_file():
            out.append(f"--calib_file={self.calib_file!r}: no such file")
        return out

    def spec(self, run: RunConfig) -> Spec:
        skip = self.skip if self.skip is not None else QuantConfig().skip
        return Spec(self.scheme, self.group, tuple(skip))


def quantize_run(
    run: RunConfig, weights: Any, tokenizer: Tokenizer, request: Request, clips: Any = None
) -> tuple[RunConfig, Any]:
    """(the run with `quant` set, its weights quantized as `request` says). A QAT run asked for the scheme it trained
    with is rounded exactly as it trained: with `clips`, its learned clipping factors (training.checkpoint.
    load_clips), where it learned them. QuantError for a model the spec does not fit (a group that does not divide
    a weight, a workdir already quantized)."""
    if scheme_of(weights) is not None:
        raise QuantError(f"the weights are already quantized ({scheme_of(weights)}); quantize their float source")
    spec = request.spec(run)
    check(run.model, spec)
    qat = run.train.qat
    trained_for = qat.scheme and request.method == "rtn" and spec_of(qat) == spec  # exactly what it trained with
    if trained_for and learns_clips(qat) and clips is None:
        raise QuantError("the run learned clipping factors (train.qat.clip_lr); quantizing it needs them (load_clips)")
    if trained_for and learns_clips(qat):
        quantized = quantize_params(run.model, weights, spec, clipped(spec, clips))
    elif request.method == "rtn":
        quantized = quantize_params(run.model, weights, spec)
    else:
        text = None if request.calib_file is None else read_text(request.calib_file, "--calib_file")
        if text is not None and not text.strip():
            raise QuantError(f"--calib_file={request.calib_file!r}: the file is empty (nothing to calibrate on)")
        count = request.calib_batches * run.train.batch_size
        windows = calibration_windows(run.data, tokenizer, count, text)
        quantized = calibrated.quantize(run.model, weights, spec, request.method, windows, request.act_order)
    quant = QuantConfig(
        scheme=spec.scheme,
        group=-1 if request.group is None else request.group,
        skip=spec.skip,
        method="qat" if trained_for else request.method,
    )
    return dataclasses.replace(run, quant=quant), quantized


def default_request(run: RunConfig) -> Request | None:
    """The Request a QAT run quantizes exactly to (its train.qat), or None."""
    qat = run.train.qat
    if not qat.scheme:
        return None
    spec = spec_of(qat)
    return Request(scheme=spec.scheme, group=spec.group, skip=spec.skip)


def write_workdir(out: pathlib.Path, run: RunConfig, weights: Any, tokenizer: Tokenizer, step: int) -> None:
    """A workdir holding `weights` (quantized, `run.quant` saying how) as checkpoint `step`: infer.py, the
    evaluation harness and `model.hf export` load it as they load any workdir."""
    checkpointer = Checkpointer(checkpoints_dir(out), CheckpointConfig(async_save=False))
    try:
        arrays = {"params": weights}
        if isinstance(weights, dict) and "params" in weights and isinstance(weights["params"], dict):
            arrays = {"params": weights["params"]} | ({"model_state": weights["state"]} if "state" in weights else {})
        checkpointer.save(step, arrays, {"step": step, "quantized": run.quant.scheme}, meta_for(run, tokenizer))
        checkpointer.wait()
    finally:
        checkpointer.close()


def out_problem(out: str, workdir: str, overwrite: bool, doing: str) -> str | None:
    """Why a command cannot write the workdir `out` from `workdir` (it exists and may not be replaced, or it is the
    workdir being `doing`, e.g. 'quantized'), else None: checked before anything loads."""
    path = pathlib.Path(out).expanduser().absolute()
    if path.exists() and not overwrite:
        return f"{out}: exists (pass --overwrite to replace it)"
    if path == pathlib.Path(workdir).expanduser().absolute():
        return f"{out}: is the workdir being {doing}; write a new one"
    return None


def replace_dir(out: pathlib.Path, overwrite: bool) -> pathlib.Path:
    """A fresh staging directory beside `out`, to be renamed onto it once complete (`out` is kept until then)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def commit_dir(staging: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
