"""The one exception type that the CLI turns into a one-line error (no traceback), and how to find it again when
Ray hands it back from another process wrapped in its own errors."""

from __future__ import annotations


class NeoxrayError(Exception):
    """A user-facing error: bad input, a missing file, a wrong config. The message names the input."""


def find_user_error(exc: BaseException | None) -> NeoxrayError | None:
    """The NeoxrayError behind an exception, if any: itself, its causes and contexts, the original error of a
    Ray task or actor (`.cause`) and each failed worker of a Ray Train worker group (`.worker_failures`).
    Returned as a plain NeoxrayError carrying the original message's first line (Ray appends its own notes and
    tracebacks to messages it passes on; a NeoxrayError's message is one line)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NeoxrayError):
            original = getattr(e, "cause", None)
            if isinstance(original, NeoxrayError):  # a Ray task error posing as the original class
                e = original
            text = str(e.args[0]) if e.args else str(e)
            return NeoxrayError(text.strip().splitlines()[0] if text.strip() else text)
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
    return None
