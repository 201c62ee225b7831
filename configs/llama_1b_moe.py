"""configs/llama_1b.py with DeepSeek-V3-style experts at the same active size: in every layer but the first, a
sigmoid router picks 6 of 16 experts of width 1024 (d_ff / 8), plus 2 shared experts, gates renormalised,
auxiliary-loss-free balancing (bias step 1e-3) with a tiny balancing loss, dropless dispatch (a grouped matmul,
`jax.lax.ragged_dot` on accelerators). Active MLP weights per token ((6 + 2) x 3 x 2048 x 1024) equal llama_1b's
(3 x 2048 x 8192), plus the 2048 x 16 router: ~1.24B active of ~2.2B parameters, which with Adam's float32 state
(~35 GB) still trains on one 80 GB GPU.

    python train.py --config configs/llama_1b_moe.py --dry_run --fake_devices=8 --config.mesh.fsdp=-1 --config.mesh.data=1

benchmarks/accelerator.py measures its training MFU beside llama_1b's; no figures yet (BENCHMARKS.md).
"""

from configs import base, llama_1b


def get_config(arg: str | None = None):
    config = llama_1b.get_config()
    config.model.mlp = "moe"
    config.model.moe.update(num_experts=16, top_k=6, d_ff_expert=1024, num_shared_experts=2, first_dense_layers=1)
    config.model.moe.update(router="sigmoid", norm_topk_prob=True, routed_scaling=1.0)
    config.model.moe.update(bias_update_rate=1e-3, aux_loss_weight=1e-4, dispatch="dropless")
    return base.apply_arg(config, arg)
