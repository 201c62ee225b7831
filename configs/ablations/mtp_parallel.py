"""configs/tiny.py with two parallel multi-token prediction heads (Gloeckle et al. 2024; model/mtp.py, style
'parallel'): head d is one transformer block on the trunk's last hidden state predicting the token d + 1 ahead,
through the shared final norm and unembedding.

    python train.py --config configs/ablations/mtp_parallel.py --workdir runs/ablate_mtp_parallel
    python infer.py --workdir runs/ablate_mtp_parallel --prompt "def " --speculative=mtp --draft_tokens 2

eval/bpb is the main head's, comparable with configs/tiny.py's (BENCHMARKS.md has the figures).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.model.mtp.update(num_heads=2, style="parallel", loss_weight=0.3)
    return base.apply_arg(config, arg)
