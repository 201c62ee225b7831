"""The input pipeline: corpus -> tokenizer -> token store on disk -> grain batches."""

from data.config import DataConfig
from data.errors import DataError
from data.pipeline import Data, load, scoring_batches

__all__ = ["Data", "DataConfig", "DataError", "load", "scoring_batches"]
