"""Per-device memory of an MoE model on fake-device meshes, from XLA's memory analysis of the compiled train step
(what `train.py --dry_run --fake_devices N` reports), one row per mesh.

    python benchmarks/moe_memory.py [--config configs/ablations/moe.py] [--devices 8] [--set key=value,...]

Compiles one step per mesh (nothing runs), so the figures are the compiler's: parameters and AdamW moments per
device, the step's temporaries, and the peak estimate (arguments + outputs - aliased + temporaries).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/ablations/moe.py")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--set", default="", help="config overrides as key=value,key=value")
    args = parser.parse_args()

    from parallel.cpu_devices import with_fake_device_flags

    os.environ["XLA_FLAGS"] = with_fake_device_flags(os.environ.get("XLA_FLAGS", ""), args.devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks.throughput import load_config
    from training.dry_run import dry_run

    n = args.devices
    meshes = [
        {"data": n},
        {"data": n // 2, "fsdp": 2},
        {"data": 1, "fsdp": n},
        {"data": n // 4, "expert": 4},
        {"data": 1, "expert": n},
        {"data": n // 4, "fsdp": 2, "expert": 2},
    ]
    print(f"config {args.config} {args.set} | {n} fake CPU devices | batch {args.batch_size}", file=sys.stderr)
    print("| mesh | params / device (MiB) | AdamW / device (MiB) | temporaries (MiB) | peak estimate (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    mib = 1 << 20
    for mesh in meshes:
        sets = ",".join(filter(None, [args.set, f"train.batch_size={args.batch_size}"]))
        sets += "".join(f",mesh.{axis}={size}" for axis, size in mesh.items())
        run = load_config(args.config, 257, sets)
        plan = dry_run(run)
        b = plan["bytes_per_device"]
        name = " x ".join(f"{size} {axis}" for axis, size in mesh.items() if size > 1)
        print(f"| {name} | {b['params'] / mib:.2f} | {b['optimizer_state'] / mib:.2f} | {b['temporaries'] / mib:.2f} "
              f"| {b['peak_estimate'] / mib:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
