"""Start a test's command as from a terminal (shared by the Ctrl-C and SIGTERM tests)."""

from __future__ import annotations

import signal


def as_from_a_terminal() -> None:
    """(Popen ``preexec_fn``) The signal dispositions a command started from a terminal has: a test
    runner started in the background by a shell without job control ignores SIGINT, and an ignored
    signal stays ignored across exec (Python then installs no KeyboardInterrupt handler)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
