"""The error type for bad data input; entry points print it as one line and exit with code 2."""


class DataError(ValueError):
    """A corpus, tokenizer or token store that cannot be used, named in the message."""
