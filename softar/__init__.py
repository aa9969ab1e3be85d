"""softAR: autoregressive language models that think in soft tokens."""

__version__ = "0.1.0"


class SoftarError(Exception):
    """An error caused by the user's input: the CLI prints it on one line and exits with code 2."""
