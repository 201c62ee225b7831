"""configs/tiny.py with document masking: attention never crosses an end-of-document token and positions restart
at each document, as in Llama 3's pretraining.

    python train.py --config configs/ablations/document_mask.py --workdir runs/ablate_documents

Compared with the baseline by experiments/sweeps/ablate_attention.py (eval/bpb is measured with the same mask).
"""

from configs import base, tiny


def get_config(arg: str | None = None):
    config = tiny.get_config()
    config.data.document_mask = True
    return base.apply_arg(config, arg)
