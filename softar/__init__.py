"""softAR: autoregressive language models that think in soft tokens."""

import os
import signal

__version__ = "0.1.0"


def use_compile_cache() -> None:
    """Point Inductor's on-disk caches (compiled graphs, kernels) at $XDG_CACHE_HOME/softar/inductor (~/.cache/...)
    instead of torch's /tmp default, which machines clear, so that a later run at the same shapes loads what an
    earlier one compiled (docs/performance.md). The `softar` command calls it first thing: Inductor fixes its folder
    the first time it asks for it. TORCHINDUCTOR_CACHE_DIR, if set, wins; a folder that cannot be made or written
    leaves torch's default."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "softar", "inductor")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return
    if os.path.isabs(folder) and os.access(folder, os.W_OK | os.X_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder


class SoftarError(Exception):
    """An error caused by the user's input: the CLI prints it on one line and exits with code 2."""


# SIGTERM/SIGINT taken by the `softar` command's first handler (`softar.cli.main`), in order. Its `Preempted` can be
# lost: CPython drops an exception raised in a signal handler while it compiles an imported module's source, and the
# command then runs on. So a phase with its own handling (`softar.train.Preemption`) stops at once if a signal is
# here, and `main` reports one that no phase acted on.
RECEIVED: list[int] = []


class Preempted(BaseException):  # noqa: N818 - a stop, not an error; like KeyboardInterrupt, never an Exception
    """SIGTERM or SIGINT arrived in a phase that stops at once (start-up, evaluation, the final evaluation)."""

    def __init__(self, signum: int, saved: bool = False, how: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved, self.how = signum, saved, how  # saved: state is on disk; how: to continue
