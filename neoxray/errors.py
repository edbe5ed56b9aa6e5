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


def load_yaml_file(path, label: str, loader=None):
    """The YAML document of a UTF-8 text file (`loader`: a yaml Loader class, default SafeLoader). A file that does
    not parse, or is not UTF-8 text, is a NeoxrayError starting with `label` that names the line, the column and
    the parser's complaint in one line."""
    from pathlib import Path

    import yaml

    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader or yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NeoxrayError(f"{label}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise NeoxrayError(f"{label}: not a UTF-8 text file ({e.reason})") from None
