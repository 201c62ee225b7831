"""configs/tiny.py with DeepSeek-V3-style experts: sigmoid router over 16 experts of width 128 in 4 groups (a
token uses the best 2 groups, by their top-2 scores), top-3 routed plus 1 shared expert, gates renormalised
(routed_scaling 1.0), the first layer dense, auxiliary-loss-free balancing (bias step 1e-2) with a tiny balancing
loss.
Active MLP weights per token in an MoE layer ((3 + 1) x 3 x 192 x 128) equal the dense baseline's (3 x 192 x
512), plus the 192 x 16 router: configs/tiny.py is its equal-active-params baseline.

    python train.py --config configs/ablations/moe_deepseek.py --workdir runs/ablate_moe_deepseek

Compared with the baseline by experiments/sweeps/ablate_moe.py (experiments/RESULTS.md): at 350 steps, 2 seeds,
eval/bpb 2.009 +- 0.003 against the dense 2.037 +- 0.011. DeepSeek-V3's own settings
(bias step 1e-3, scaling 2.5) are tuned for runs of ~10^5 steps: at 150 steps they left the load unbalanced (max
load 4.4) and eval/bpb at 2.834, behind the dense 2.703; a bias step of 1e-2 gave 2.665 (max load 1.32), and
scaling 1.0 as well 2.574 (max load 1.36).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.mlp = "moe"
    config.model.moe.update(num_experts=16, top_k=3, d_ff_expert=128, num_shared_experts=1, first_dense_layers=1)
    config.model.moe.update(router="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling=1.0)
    config.model.moe.update(bias_update_rate=1e-2, aux_loss_weight=1e-4, dispatch="dropless")
    return base.apply_arg(config, arg)
