"""The CLI's standard output, guarded: a write that fails (``| head`` closed the pipe, a redirect onto a
full disk, a terminal that went away) stops the output, not the command. A training goes on to its
checkpoints and its student, a bench to its ``--json``; the first failure is said once, on stderr, at
the end. Standard library only: the CLI installs it before anything heavy is imported."""
from __future__ import annotations

import errno
import os
import sys
from typing import Optional


class GuardedStdout:
    def __init__(self, stream):
        self._stream = stream
        self.failed: Optional[OSError] = None

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                return self._stream.write(text)
            except (OSError, ValueError) as err:  # ValueError: the file object was closed
                self._stop(err if isinstance(err, OSError) else OSError(0, str(err)))
        return len(text)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self._stream.flush()
            except (OSError, ValueError) as err:
                self._stop(err if isinstance(err, OSError) else OSError(0, str(err)))

    def _stop(self, err: OSError) -> None:
        self.failed = err
        # what the stream still buffers, and what child processes inherit, now goes nowhere instead of
        # failing again (Python's own flush at exit would otherwise print a traceback-like warning)
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._stream, name)


def guard_stdout() -> Optional[GuardedStdout]:
    """Guard sys.stdout; None where there is none (started with stdout closed: Python's print and rich
    already write nothing then)."""
    if sys.stdout is None:
        return None
    guarded = sys.stdout if isinstance(sys.stdout, GuardedStdout) else GuardedStdout(sys.stdout)
    sys.stdout = guarded
    return guarded


def say_if_stopped(guarded: Optional[GuardedStdout]) -> None:
    """One line on stderr, unless the reader closed the pipe on purpose (``| head``: the usual silence)."""
    if guarded is not None and guarded.failed is not None and guarded.failed.errno != errno.EPIPE:
        reason = guarded.failed.strerror or type(guarded.failed).__name__
        try:
            print(f"ekdc: note: standard output stopped taking the output ({reason}); the command went on to its "
                  "end, its files are whole", file=sys.stderr)
        except OSError:
            pass
