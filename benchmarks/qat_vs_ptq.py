"""Quantization-aware training against post-training quantization (round to nearest) at equal training steps.

    python -m benchmarks.qat_vs_ptq --config configs/tiny.py --steps 300 --qat_steps 100 [--scheme int4 --group 32]

One float run trains `steps + qat_steps` steps (one learning-rate schedule over all of them) and keeps its checkpoint
at `steps`; a second run resumes from that checkpoint and trains the last `qat_steps` steps with train.qat
(`start_step=steps`), so both see the same batches under the same schedule. `--steps 0` trains with QAT from the
first step; `--clip_lr` also learns each group's clipping factor (train.qat.clip_lr), the QAT run then going to
`qat_from_<steps>_clip_lr<lr>`. `--init gptq` starts the QAT run's master weights from GPTQ's solution instead of
the float weights (PTQ-initialised QAT, as NVIDIA's ModelOpt and EfficientQAT start theirs): the shared
checkpoint's params quantized by GPTQ on `--calib_batches` batches of calibration windows of the training corpus,
then dequantized, the optimizer state kept; that QAT run goes to `qat_from_<steps>_gptq`. A `--workdir` whose
float run is already finished keeps it (so several QAT phases share one float run); the QAT run goes to
`qat_from_<steps>` there. Reported, on the same held-out batches (`--eval_batches` of the config's eval set):
eval/bpb of the float run, of its weights quantized by round to nearest (PTQ), of the QAT run's checkpoint quantized
with the same scheme (what it deploys as; also the bpb its last evaluation logged) and of the QAT run's float
master weights.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=300, help="float steps both runs share")
    parser.add_argument("--qat_steps", type=int, default=100, help="steps after them: float, or QAT")
    parser.add_argument("--scheme", default="int4")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--clip_lr", type=float, default=0.0, help="train.qat.clip_lr (> 0: learned clipping)")
    parser.add_argument("--init", default="float", choices=("float", "gptq"), help="the QAT run's master weights")
    parser.add_argument("--calib_batches", type=int, default=8, help="--init gptq: batches of calibration windows")
    parser.add_argument("--eval_batches", type=int, default=32)
    parser.add_argument("--set", default="", help="config overrides as key=value,key=value")
    parser.add_argument("--workdir", default="", help="where the two runs go (default: a temporary directory)")
    args = parser.parse_args()

    from training.allocator import reuse_freed_memory

    reuse_freed_memory()  # as train.py does (training/allocator.py)
    import jax

    import data as data_lib
    from benchmarks.throughput import load_config
    from model import Transformer
    from model.quant.params import clipped, quantize_params
    from training.checkpoint import checkpoints_dir, load_clips, load_for_inference
    from training.evaluation import Inputs, evaluate, make_eval_step
    from training.loop import train
    from training.qat import spec_of

    total = args.steps + args.qat_steps
    sets = [args.set, f"train.steps={total},train.eval_every={total},train.eval_batches={args.eval_batches}"]
    kept = args.steps or total  # the step both runs share; QAT from the first step shares none
    sets.append(f"checkpoint.every={kept},checkpoint.keep_every={kept},train.sample_tokens=0")
    qat = f"train.qat.scheme={args.scheme},train.qat.group_size={args.group},train.qat.start_step={args.steps}"
    qat += f",train.qat.clip_lr={args.clip_lr}"
    float_run = load_config(args.config, 257, ",".join(filter(None, sets)))
    qat_run = load_config(args.config, 257, ",".join(filter(None, [*sets, qat])))
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="qat_vs_ptq_"))

    if (checkpoints_dir(root / "float") / str(total)).exists():
        print(f"float: {root / 'float'} already holds step {total}", file=sys.stderr)
    else:
        print(f"float: {total} steps into {root / 'float'}", file=sys.stderr)
        train(float_run, root / "float")
    if args.init == "gptq" and not args.steps:
        parser.error("--init gptq: needs --steps > 0 (a float checkpoint to quantize)")
    suffix = (f"_clip_lr{args.clip_lr:g}" if args.clip_lr else "") + ("_gptq" if args.init == "gptq" else "")
    qat_dir = root / f"qat_from_{args.steps}{suffix}"
    checkpoints_dir(qat_dir).mkdir(parents=True, exist_ok=True)
    if args.steps:
        shared = checkpoints_dir(root / "float") / str(args.steps)
        shutil.copytree(shared, checkpoints_dir(qat_dir) / str(args.steps), dirs_exist_ok=True)
        if args.init == "gptq":
            start_from_gptq(checkpoints_dir(qat_dir), args.steps, spec_of(qat_run.train.qat), args.calib_batches)
    if (root / "float" / "tokenizer.json").exists():  # the same tokenizer, not one trained again
        shutil.copy(root / "float" / "tokenizer.json", qat_dir / "tokenizer.json")
    print(f"QAT: steps {args.steps + 1}-{total} into {qat_dir}", file=sys.stderr)
    logged = train(qat_run, qat_dir)

    spec = spec_of(qat_run.train.qat)
    run, float_params, tokenizer, _ = load_for_inference(root / "float")
    _, qat_params, _, qat_step = load_for_inference(qat_dir)
    clips = load_clips(qat_dir, qat_step)  # learned clipping's factors (None without --clip_lr)
    t = run.train
    batches = data_lib.load(run.data, root / "float").validation_batches(t.batch_size, t.eval_batches)
    inputs = Inputs(eod_id=tokenizer.eod_id if run.data.document_mask else None)
    eval_step = jax.jit(make_eval_step(Transformer(run.model), tokenizer.token_bytes, inputs))
    bpb = {
        "float": float_params,
        f"float + RTN {args.scheme} g{args.group} (PTQ)": quantize_params(run.model, float_params, spec),
        f"QAT {args.scheme} g{args.group}, quantized": quantize_params(
            run.model, qat_params, spec, None if clips is None else clipped(spec, clips)
        ),
        "QAT float master weights": qat_params,
    }
    bpb = {name: evaluate(eval_step, params, batches)["eval/bpb"] for name, params in bpb.items()}
    print(f"config {args.config} {args.set} | {args.steps} float steps, then {args.qat_steps} float or QAT steps")
    print(f"| weights | eval/bpb ({args.eval_batches} eval batches) |")
    print("| --- | --- |")
    for name, value in bpb.items():
        print(f"| {name} | {value:.4f} |")
    print(json.dumps({"bpb": bpb, "qat_run_logged_bpb": logged["eval/bpb"]}))


def start_from_gptq(directory: pathlib.Path, step: int, spec, calib_batches: int) -> None:
    """Rewrites checkpoint `step` of `directory` with its params replaced by GPTQ's dequantized solution, every
    other item (the optimizer state, the train record) as it was."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from data.pipeline import calibration_windows
    from model.quant import calibrated
    from model.quant.params import dequantize_params, quantize_params
    from training.checkpoint import ITEMS, Checkpointer, load_for_inference
    from training.config import CheckpointConfig

    run, params, tokenizer, _ = load_for_inference(directory / str(step))
    windows = calibration_windows(run.data, tokenizer, calib_batches * run.train.batch_size)
    solution = dequantize_params(run.model, calibrated.quantize(run.model, params, spec, "gptq", windows))
    # QAT's forward rounds the master weights again with scales of their own: how many land elsewhere
    again = dequantize_params(run.model, quantize_params(run.model, solution, spec))
    pairs = list(zip(jax.tree.leaves(solution), jax.tree.leaves(again)))
    moved = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in pairs)
    print(f"GPTQ start: {moved} of {sum(a.size for a, _ in pairs)} weights round elsewhere in QAT", file=sys.stderr)

    stored = [name for name in ITEMS if (directory / str(step) / name).exists()]
    json_items = ("train", "meta")
    restore = {n: ocp.args.JsonRestore() if n in json_items else ocp.args.StandardRestore() for n in stored}
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    items = manager.restore(step, args=ocp.args.Composite(**restore))
    manager.close()
    arrays = {name: items[name] for name in stored if name not in json_items}
    assert jax.tree.structure(arrays["params"]) == jax.tree.structure(solution), "a model with non-trained state"
    arrays["params"] = jax.tree.map(np.asarray, solution)
    shutil.rmtree(directory / str(step))
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False))
    checkpointer.save(step, arrays, items["train"], items["meta"])
    checkpointer.wait()
    checkpointer.close()


if __name__ == "__main__":
    main()
