"""Finding and loading lm-eval tasks for `neoxray eval`, with one-line errors for what a user can get wrong.

- The task index is lm-eval's `TaskManager`: its built-in tasks plus `--include-path` folders, whose tasks take
  precedence over built-in ones of the same name (lm-eval indexes the include paths last and lets them
  override, with a warning). Indexing lm-eval's 14,000 built-in tasks takes about ten seconds, so when every
  name asked for is a task in the include paths, only those are indexed. A task YAML there that does not parse
  is a NeoxrayError naming the file and the parser's complaint (lm-eval skips such a file silently).
- An unknown name is a NeoxrayError that lists the closest names in the index (glob patterns such as `mmlu_*`
  and paths to task YAML files are accepted as lm-eval accepts them).
- Loading a task reads its dataset (`datasets.load_dataset`): a dataset that cannot be had (no network, offline
  mode without a cached copy, a missing local file) is a NeoxrayError naming the task and the dataset and saying
  how to provide it.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from pathlib import Path

import yaml

from neoxray.errors import NeoxrayError, load_yaml_file

OFFLINE_HINT = (
    "fetch it once where the Hugging Face hub is reachable and copy the datasets cache "
    "(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets), then run with HF_DATASETS_OFFLINE=1 "
    "HF_HUB_OFFLINE=1; or point a local task YAML at local files with --include-path (docs/evaluation.md)"
)


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()


def task_manager(names: list[str], include_path: list[str] | None = None):
    """lm-eval's TaskManager for `names`: the include paths alone when every name is a task defined there,
    else lm-eval's built-in tasks and the include paths (which override built-in names)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    paths = [str(Path(p).expanduser()) for p in include_path or []]
    for p in paths:
        if not Path(p).is_dir():
            raise NeoxrayError(f"--include-path {p}: no such directory")
        check_task_yamls(p)
    if paths and names:
        local = TaskManager(include_path=paths, include_defaults=False)
        index = local.task_index
        if all(n in index and index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names):
            return local
    return TaskManager(include_path=paths) if paths else _builtin_tasks()


@functools.cache
def _builtin_tasks():
    """lm-eval's index of its own ~14,000 tasks, built once per process (10-30 s each time on a small machine;
    a training run evaluates every checkpoint): lm-eval copies a task's config when it loads it."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


class _TaskYamlLoader(yaml.SafeLoader):
    """YAML as lm-eval's task files use it: plain YAML plus lm-eval's `!function module.name` tag."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_task_yamls(folder: str) -> None:
    """Every task YAML under an include path parses (the files lm-eval indexes: `**/*.yaml`); lm-eval itself skips
    one that does not without a word, and its task is then merely unknown. A NeoxrayError names the file, the
    line and the parser's complaint."""
    for f in sorted(Path(folder).glob("**/*.yaml")):
        if "__pycache__" in f.parts or ".ipynb_checkpoints" in f.parts:
            continue
        load_yaml_file(f, f"--include-path {folder}: {f}", _TaskYamlLoader)  # a SafeLoader subclass


def resolve_names(tm, names: list[str]) -> list[str]:
    """`names` with glob patterns expanded against the index; a NeoxrayError, with the closest names, for a name
    that is neither in the index nor a task YAML file."""
    known = tm.all_tasks
    out: list[str] = []
    for name in names:
        if _is_yaml_path(name):
            out.append(name)
        elif _is_glob(name):
            matched = sorted(fnmatch.filter(known, name))
            if not matched:
                raise NeoxrayError(f"no task matches {name!r}")
            out.extend(matched)
        elif name in known:
            out.append(name)
        else:
            raise NeoxrayError(f"unknown task {name!r}; {_suggest(name, known)}")
    return list(dict.fromkeys(out))


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if not close:
        low = name.lower()
        close = [k for k in known if low in k.lower()][:5]
    if not close:
        return "no similar names (`lm-eval ls tasks` lists them all; local tasks come with --include-path)"
    return f"did you mean: {', '.join(close)}?"


def load_tasks(tm, names: list[str], num_fewshot: dict[str, int] | None = None) -> list:
    """lm-eval Task and Group objects for `names` (datasets read now), in order; `num_fewshot` sets the shot
    count of every task under the named entry (a suite's per-task shots)."""
    objs: list = []
    for name in names:
        try:
            loaded = tm.load([name])
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise _load_error(tm, name, e) from None
        group = loaded.get("groups", {}).get(name)
        if group is not None:
            items, leaves = [group], list(group.get_all_tasks())
        elif name in loaded["tasks"]:
            items = leaves = [loaded["tasks"][name]]
        else:  # a tag, or a YAML file: its tasks
            items = leaves = list(loaded["tasks"].values())
        if num_fewshot and name in num_fewshot:
            for task in leaves:
                task.set_config(key="num_fewshot", value=num_fewshot[name])
        objs.extend(items)
    return objs


def _load_error(tm, name: str, exc: Exception) -> NeoxrayError:
    """One line for a task that failed to load: its dataset when that was the trouble."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    datasets = sorted(_datasets_of(tm, name))
    what = f"dataset {', '.join(datasets)}" if datasets else "its dataset"
    if isinstance(exc, (OSError, ConnectionError)) or type(exc).__name__.endswith("NotFoundError"):
        return NeoxrayError(f"task {name}: cannot load {what} ({first}); {OFFLINE_HINT}")
    return NeoxrayError(f"task {name}: cannot be loaded ({type(exc).__name__}: {first})")


def _datasets_of(tm, name: str, depth: int = 0) -> set[str]:
    """The datasets (`dataset_path`, with `data_files` for local ones) of a task, or of a group's tasks."""
    entry = tm.task_index.get(name)
    cfg = (entry.cfg if entry is not None else None) or {}
    found: set[str] = set()
    if cfg.get("dataset_path"):
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        found.add(f"{cfg['dataset_path']} {files}" if files else str(cfg["dataset_path"]))
    members = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    if entry is not None and not members and entry.tags and not cfg:
        members = sorted(entry.tags)  # a tag: its tasks
    for m in members if depth < 4 else []:
        child = m.get("task") if isinstance(m, dict) else m
        if isinstance(child, str):
            found |= _datasets_of(tm, child, depth + 1)
        if len(found) > 3:
            break
    return found
