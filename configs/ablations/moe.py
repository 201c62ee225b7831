"""configs/tiny.py with a Mixtral-like sparse MLP: softmax top-2 of 8 experts of width 256 in every layer, the
Switch balancing loss at 0.01, dropless dispatch. Active MLP weights per token (2 x 3 x 192 x 256) equal the dense
baseline's (3 x 192 x 512), plus the 192 x 8 router, so configs/tiny.py is its equal-active-params baseline.

    python train.py --config configs/ablations/moe.py --workdir runs/ablate_moe

Compared with the baseline by experiments/sweeps/ablate_moe.py. Expect (experiments/RESULTS.md, 350 steps, 2 seeds):
eval/bpb 2.022 +- 0.010 against the dense baseline's 2.037 +- 0.011 (0.015 lower for each seed); training about as
fast as the dense model (BENCHMARKS.md).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.mlp = "moe"
    config.model.moe.update(num_experts=8, top_k=2, d_ff_expert=256, router="softmax", norm_topk_prob=True)
    config.model.moe.update(aux_loss_weight=0.01, z_loss_weight=1e-3, dispatch="dropless")
    return base.apply_arg(config, arg)
