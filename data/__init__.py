"""The input pipeline: corpus -> tokenizer -> token store on disk -> grain batches.

The pipeline (and grain, tokenizers) loads on first use of `Data`, `load` or `scoring_batches`, so what needs only
`DataConfig` (the typed configs, the train step) imports without them: benchmarks/accelerator.py trains on
synthetic batches on machines that lack grain.
"""

from data.config import DataConfig
from data.errors import DataError

__all__ = ["Data", "DataConfig", "DataError", "calibration_windows", "load", "scoring_batches"]
_PIPELINE = ("Data", "calibration_windows", "load", "scoring_batches")


def __getattr__(name: str):
    if name in _PIPELINE:
        from data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
