"""Loading a run config: defaults <- a YAML file <- dotted `KEY=VALUE` overrides, every key and type checked
as it is set (`NeoxrayError`s name the dotted key and its source, with the closest valid key); and writing one
back as YAML."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml

from neoxray.errors import NeoxrayError, load_yaml_file
from neoxray.model.config import ModelConfig
from neoxray.platform.train.config.coerce import coerce, field_types, type_name
from neoxray.platform.train.config.schema import (
    LAYOUT,
    SECTIONS,
    TOP_LEVEL,
    ParallelSection,
    RunConfig,
    check_model_overrides,
    suggest,
    to_dict,
)


def load_run_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """The run config: defaults, overridden by the YAML file at `path` (if any), then by `KEY=VALUE`
    overrides (dotted keys, values parsed as YAML: `train.steps=5`, `optimizer.betas=[0.9,0.95]`,
    `parallel=auto`, `model.overrides.vocab_size=1024`). Not validated against the model: call `validate`."""
    builder = _Builder()
    if path is not None:
        builder.apply_mapping(_read_yaml(path), source=str(path))
    for item in overrides:
        builder.apply_override(item)
    return builder.build()


def from_dict(d: dict, source: str = "run config") -> RunConfig:
    """A RunConfig from a (possibly partial) nested dict, such as `to_dict`'s output stored in a checkpoint."""
    builder = _Builder()
    builder.apply_mapping(d, source=source)
    return builder.build()


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """A copy of `cfg` with `KEY=VALUE` overrides applied (as in `load_run_config`)."""
    builder = _Builder()
    builder.apply_mapping(to_dict(cfg), source="run config")
    for item in overrides:
        builder.apply_override(item)
    return builder.build()


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise NeoxrayError(f"run config file not found: {p}")
    if not p.is_file():
        raise NeoxrayError(f"run config {p} is not a file")
    data = load_yaml_file(p, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NeoxrayError(f"{p}: a run config must be a mapping of sections, got {type_name(data)}")
    return data


class _Builder:
    """Collects values over the defaults, checking every key and type as it goes."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = to_dict(RunConfig())
        self.explicit_layout: set[str] = set()

    # a whole mapping (a file, or a dict from a checkpoint)
    def apply_mapping(self, data: dict, source: str) -> None:
        if not isinstance(data, dict):
            raise NeoxrayError(f"{source}: a run config must be a mapping of sections, got {type_name(data)}")
        for key, value in data.items():
            key = str(key)
            if key in TOP_LEVEL:
                self.set_value((key,), value, source)
            elif key in SECTIONS:
                self.set_section(key, value, source)
            else:
                raise _unknown_key(key, source)

    def set_section(self, section: str, value: Any, source: str) -> None:
        if section == "parallel" and value == "auto":
            self.state["parallel"]["auto"] = True
            self.explicit_layout.clear()
            return
        if value is None:  # an empty section (`logging:`) changes nothing
            return
        if not isinstance(value, dict):
            hint = " (or the string 'auto')" if section == "parallel" else ""
            raise NeoxrayError(
                f"{section} must be a mapping of keys{hint}, got {type_name(value)} {value!r} ({source})"
            )
        for key, v in value.items():
            self.set_value((section, str(key)), v, source)

    def set_value(self, keys: tuple[str, ...], value: Any, source: str) -> None:
        dotted = ".".join(keys)
        if len(keys) == 1:
            (name,) = keys
            if name in SECTIONS:
                self.set_section(name, value, source)
                return
            if name not in TOP_LEVEL:
                raise _unknown_key(name, source)
            self.state[name] = coerce(value, field_types(RunConfig)[name], name, source)
            return
        section, name, *rest = keys
        if section not in SECTIONS:
            raise _unknown_key(dotted, source)
        cls = SECTIONS[section]
        hints = field_types(cls)
        if name not in hints:
            raise _unknown_key(dotted, source)
        if section == "model" and name == "overrides":
            if rest:  # model.overrides.FIELD=VALUE sets one field
                if len(rest) > 1:
                    raise _unknown_key(dotted, source)
                field_name = rest[0]
                check_model_overrides({field_name: None}, "model.overrides", source)
                self.state["model"]["overrides"][field_name] = coerce(
                    value, field_types(ModelConfig)[field_name], dotted, source
                )
                return
            value = coerce(value, hints[name], dotted, source)
            check_model_overrides(value, "model.overrides", source)
            mhints = field_types(ModelConfig)
            self.state["model"]["overrides"] = {
                k: coerce(v, mhints[k], f"model.overrides.{k}", source) for k, v in value.items()
            }
            return
        if dataclasses.is_dataclass(hints[name]):  # a sub-section: logging.wandb.project=P, or a mapping
            self._set_sub(keys, hints[name], value, source)
            return
        if rest:
            raise _unknown_key(dotted, source)
        self.state[section][name] = coerce(value, hints[name], dotted, source)
        if section == "parallel" and name in LAYOUT:
            self.explicit_layout.add(name)

    def _set_sub(self, keys: tuple[str, ...], cls: type, value: Any, source: str) -> None:
        section, name, *rest = keys
        dotted = ".".join(keys)
        if not rest:
            if value is None:
                return
            if not isinstance(value, dict):
                raise NeoxrayError(f"{dotted} must be a mapping of keys, got {type_name(value)} {value!r} ({source})")
            for k, v in value.items():
                self._set_sub((section, name, str(k)), cls, v, source)
            return
        hints = field_types(cls)
        if len(rest) > 1 or rest[0] not in hints:
            raise _unknown_key(dotted, source)
        self.state[section][name][rest[0]] = coerce(value, hints[rest[0]], dotted, source)

    # one KEY=VALUE string
    def apply_override(self, item: str) -> None:
        source = f"override {item!r}"
        if not isinstance(item, str) or "=" not in item:
            raise NeoxrayError(f"{source}: expected KEY=VALUE, e.g. train.steps=5 or parallel.data=2")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise NeoxrayError(f"{source}: expected KEY=VALUE with a dotted key such as train.steps")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise NeoxrayError(f"{source}: the value of {key} is not valid YAML ({problem})") from None
        self.set_value(tuple(key.split(".")), value, source)

    def build(self) -> RunConfig:
        s = self.state
        parallel = s["parallel"]
        defaults = ParallelSection()
        for k in LAYOUT:
            if k not in self.explicit_layout:
                parallel[k] = None if parallel["auto"] else getattr(defaults, k)
        sections = {name: _make(cls, s[name]) for name, cls in SECTIONS.items()}
        return RunConfig(name=s["name"], run_dir=s["run_dir"], **sections)


def _make(cls: type, values: dict):
    """A section's dataclass from its values, its sub-sections (`logging.wandb`) made too."""
    hints = field_types(cls)
    return cls(**{k: _make(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in values.items()})


def _unknown_key(dotted: str, source: str) -> NeoxrayError:
    """An error naming the unknown dotted key and its source, with the closest valid key."""
    parts = dotted.split(".")
    top = [*TOP_LEVEL, *SECTIONS]
    if len(parts) == 1:
        hint = suggest(parts[0], top)
        if not hint:  # a field written without its section: `lr` -> `optimizer.lr`
            hint = suggest(parts[0], _all_dotted_keys(), leaf=True)
        return NeoxrayError(f"unknown key '{dotted}' in {source}{hint}; top-level keys: {', '.join(top)}")
    if parts[0] not in SECTIONS:
        hint = suggest(parts[0], list(SECTIONS))
        if hint:  # `optimiser.lr` -> `optimizer.lr`
            hint = hint.replace("'?)", f".{'.'.join(parts[1:])}'?)")
        return NeoxrayError(
            f"unknown key '{dotted}' in {source}: there is no section '{parts[0]}'{hint}; "
            f"sections: {', '.join(SECTIONS)}"
        )
    section = parts[0]
    hints = field_types(SECTIONS[section])
    if len(parts) > 2 and dataclasses.is_dataclass(hints.get(parts[1])):  # logging.wandb.projct
        where = f"{section}.{parts[1]}"
        valid = list(field_types(hints[parts[1]]))
        hint = suggest(parts[2], valid, prefix=where + ".")
        return NeoxrayError(f"unknown key '{dotted}' in {source}{hint}; keys of {where}: {', '.join(valid)}")
    valid = list(hints)
    hint = suggest(parts[1], valid, prefix=section + ".")
    if not hint:  # right field, wrong section: `train.lr` -> `optimizer.lr`
        hint = suggest(parts[1], _all_dotted_keys(), leaf=True)
    return NeoxrayError(f"unknown key '{dotted}' in {source}{hint}; keys of {section}: {', '.join(valid)}")


def _all_dotted_keys() -> list[str]:
    out = []
    for s, cls in SECTIONS.items():
        for k, tp in field_types(cls).items():
            out += [f"{s}.{k}.{j}" for j in field_types(tp)] if dataclasses.is_dataclass(tp) else [f"{s}.{k}"]
    return out


# --------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Sections in block style, lists (betas, paths, weights) inline."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML, sections in schema order; `load_run_config` reads it back."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write `dump_yaml(cfg)` to `path` atomically (a temporary sibling renamed into place)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_yaml(cfg))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
