"""The default: a small byte-level model on the Python standard library, about 6 minutes on 2 CPU cores.

    python train.py --config configs/tiny.py --workdir runs/tiny

Expect eval/bpb to fall from ~8 to about 2 and the final sample to read like Python.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, d_ff=768)
    config.data.update(tokenizer="bytes", seq_len=256)
    config.train.update(steps=600, batch_size=16, lr=3e-3, warmup_steps=50, log_every=25, eval_every=200)
    return base.apply_arg(config, arg)
