"""YAML recipes and `--section.field=value` overrides into a typed JobConfig, and back to YAML.

Values are checked against the dataclass field types; unknown sections or fields are errors (listed
together with the known names), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from llamatron.config.job import JobConfig
from llamatron.errors import LlamatronError

RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes"


def _coerce(value: Any, annotation: Any, *, where: str) -> Any:
    """Convert a YAML value or an override string to `annotation`, or raise naming `where`."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where=where)
            except LlamatronError as err:
                errors.append(str(err))
        raise LlamatronError(errors[0] if errors else f"{where}: cannot be None")
    if origin is Literal:
        choices = get_args(annotation)
        text = value if not isinstance(value, bool) else str(value).lower()
        for choice in choices:
            if text == choice or str(text) == str(choice):
                return choice
        raise LlamatronError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin is list:
        (item_type,) = get_args(annotation)
        if isinstance(value, str):
            value = [part for part in value.replace(",", " ").split() if part]
        if not isinstance(value, list):
            raise LlamatronError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, item_type, where=where) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise LlamatronError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise LlamatronError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise LlamatronError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise LlamatronError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise LlamatronError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {annotation} at {where}")


def _section_types(config_cls: type) -> dict[str, Any]:
    return get_type_hints(config_cls)


def from_dict(raw: dict[str, Any], *, source: str) -> JobConfig:
    """Build a JobConfig from a nested dict, gathering every unknown key and bad value into one error."""
    if not isinstance(raw, dict):
        raise LlamatronError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    problems: list[str] = []
    top_types = _section_types(JobConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top_types:
            problems.append(f"unknown key {key!r} (known: {', '.join(top_types)})")
            continue
        annotation = top_types[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _section_from_dict(annotation, value, section=key, problems=problems)
        else:
            try:
                kwargs[key] = _coerce(value, annotation, where=key)
            except LlamatronError as err:
                problems.append(str(err))
    if problems:
        raise LlamatronError(f"{source}: " + "; ".join(problems))
    return JobConfig(**kwargs)


def _section_from_dict(section_cls: type, value: Any, *, section: str, problems: list[str]) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"section {section!r} must be a mapping, got {value!r}")
        return section_cls()
    field_types = _section_types(section_cls)
    fields = {}
    for name, item in value.items():
        if name not in field_types:
            problems.append(f"unknown key {section}.{name} (known: {', '.join(field_types)})")
            continue
        try:
            fields[name] = _coerce(item, field_types[name], where=f"{section}.{name}")
        except LlamatronError as err:
            problems.append(str(err))
    return section_cls(**fields)


def to_dict(config: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(config: JobConfig, overrides: list[str]) -> JobConfig:
    """Apply `--section.field=value` (or `section.field=value`) strings; every bad one is reported."""
    raw = to_dict(config)
    problems = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            problems.append(f"override {item!r} must look like --section.field=value")
            continue
        path, value = text.split("=", 1)
        parts = path.replace("-", "_").split(".")
        if len(parts) == 1 and parts[0] in raw and not isinstance(raw[parts[0]], dict):
            raw[parts[0]] = value
            continue
        if len(parts) != 2 or parts[0] not in raw or not isinstance(raw[parts[0]], dict):
            problems.append(f"unknown option {item!r} (sections: {', '.join(k for k, v in raw.items() if isinstance(v, dict))})")
            continue
        section, name = parts
        if name not in raw[section]:
            problems.append(f"unknown option --{section}.{name} (known in {section}: {', '.join(raw[section])})")
            continue
        raw[section][name] = value
    if problems:
        raise LlamatronError("; ".join(problems))
    return from_dict(raw, source="overrides")


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a bare name looked up in the repository's recipes/ directory."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise LlamatronError(f"recipe {name_or_path!r} not found; give a YAML path or one of: {', '.join(known) or 'none'}")


def load_config(recipe: str | None, overrides: list[str] = ()) -> JobConfig:
    """A recipe (or the defaults) with overrides applied. Not yet validated: the caller adds its flags first."""
    config = JobConfig()
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise LlamatronError(f"{path}: not valid YAML: {err}") from None
        config = from_dict(raw, source=str(path))
    return apply_overrides(config, list(overrides)) if overrides else config


def dump_yaml(config: JobConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
