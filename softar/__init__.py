"""softAR: autoregressive language models that think in soft tokens."""

import os
import signal

__version__ = "0.1.0"

# Inductor's on-disk caches (compiled graphs, kernels) default to /tmp, which machines clear; softAR keeps them where
# they outlast it, so a later run at the same shapes loads what an earlier one compiled (docs/performance.md). Set
# before torch is imported: the first use of Inductor fixes the folder. TORCHINDUCTOR_CACHE_DIR, if set, wins.
_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
if os.path.isabs(_cache):  # no home folder: torch's own default
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_cache, "softar", "inductor"))


class SoftarError(Exception):
    """An error caused by the user's input: the CLI prints it on one line and exits with code 2."""


class Preempted(BaseException):  # noqa: N818 - a stop, not an error; like KeyboardInterrupt, never an Exception
    """SIGTERM or SIGINT arrived in a phase that stops at once (start-up, evaluation, the final evaluation)."""

    def __init__(self, signum: int, saved: bool = False, how: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved, self.how = signum, saved, how  # saved: state is on disk; how: to continue
