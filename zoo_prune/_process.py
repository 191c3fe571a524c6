"""Process plumbing shared by the lmms-eval runner and the pipeline stages (Linux; a no-op elsewhere)."""

from __future__ import annotations

import signal
import sys

try:  # resolved once, at import: the child side of a fork must not look symbols up
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None

PR_SET_PDEATHSIG = 1


def parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (even by SIGKILL); 0 cancels.
    Safe between fork and exec (``preexec_fn``). Returns whether the platform supports it."""
    if _PRCTL is None:
        return False
    return _PRCTL(PR_SET_PDEATHSIG, int(signum)) == 0
