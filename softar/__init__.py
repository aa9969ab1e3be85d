"""softAR: autoregressive language models that think in soft tokens."""

import signal

__version__ = "0.1.0"


class SoftarError(Exception):
    """An error caused by the user's input: the CLI prints it on one line and exits with code 2."""


class Preempted(BaseException):  # noqa: N818 - a stop, not an error; like KeyboardInterrupt, never an Exception
    """SIGTERM or SIGINT arrived in a phase that stops at once (start-up, evaluation, the final evaluation)."""

    def __init__(self, signum: int, saved: bool = False, how: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved, self.how = signum, saved, how  # saved: state is on disk; how: to continue
