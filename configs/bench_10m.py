"""The ~10M non-embedding-parameter benchmark model (BENCHMARKS.md): Llama-style, float32.

python benchmarks/throughput.py --config configs/bench_10m.py
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.model.update(d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, d_ff=1024, tie_embeddings=False)
    # On CPU, recomputing elementwise work in the backward pass is faster than stacking it per layer, and
    # keeping attention's matmul outputs too is ~3% faster than recomputing them (BENCHMARKS.md).
    config.model.remat = "dots"
    config.data.update(tokenizer="bpe:8192", seq_len=256)
    config.train.update(batch_size=8, lr=1e-3, warmup_steps=100)
    return base.apply_arg(config, arg)
