"""A setting's value as text and back: how ``key=value`` overrides and YAML values are read as a
field's type (``coerce``), and how a value is written so it reads back the same (``override_text``).

Override values are YAML (``tune.lr=[1e-5,1e-4]``, ``train.use_gpu=true``, ``mine.shards=null``),
except for a text field, whose value is the text as written (``run.train=/data/a,b.jsonl`` is one
path, ``encoder.query_prefix=query: `` keeps its colon and space). A list field also takes a plain
comma list (``train.lora_targets=query,value``); an element holding a comma needs YAML quotes
(``filter.decontaminate=['/data/a,b.jsonl']``). Numbers written as ``1e-5`` (a string to YAML 1.1)
are numbers here; an integer field refuses 2.5 rather than rounding it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    pass


def _members(annotation: Any) -> list:
    """The types a field accepts, None left out: ``int | Literal["auto"] | None`` -> [int, Literal["auto"]]."""
    union = get_origin(annotation) in (Union, UnionType)
    return [a for a in (get_args(annotation) if union else (annotation,)) if a is not type(None)]


def _takes_text(annotation: Any) -> bool:
    """A text field (str, or a choice of strings): its override is the text as written, not YAML."""
    return all(a is str or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)))
               for a in _members(annotation))


def _kind(annotation: Any) -> str:
    """What a field accepts, in words, for error messages."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    return " or ".join(f"one of {list(get_args(a))}" if get_origin(a) is Literal
                       else f"a list ({_kind(get_args(a)[0])} each)" if get_origin(a) is list
                       else words.get(a, str(a)) for a in _members(annotation))


class Override(str):
    """An override's text, read once its field's type is known (YAML, or as written for text)."""


def read_override(text: str, annotation: Any, key: str) -> Any:
    if _takes_text(annotation):
        return str(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}={text!r} is not a YAML value ({getattr(e, 'problem', e)}); a list is written [a,b], "
                          "and an element holding a comma is quoted: ['a,b']") from None


def _number(value: Any, typ: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    if typ is float:
        return float(value)  # '1e-5' too: YAML 1.1 reads a number without a dot as a string
    if isinstance(value, int):
        return value
    number = float(value)  # 1e6, 2.0: an integer written as a float
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _as(value: Any, typ: Any, key: str, example: str | None) -> Any:
    """``value`` as one member type of a field; ValueError/TypeError when it is not one."""
    if typ is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[str(value).strip().lower()]
    if typ in (int, float):
        return _number(value, typ)
    if typ is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)
    if get_origin(typ) is Literal:
        if isinstance(value, str) and value in get_args(typ):
            return value
        raise ValueError(value)
    if get_origin(typ) is list:
        if isinstance(value, str):  # a plain comma list: train.lora_targets=query,value
            value = [v.strip() for v in value.split(",") if v.strip()]
        items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        (element,) = get_args(typ)
        out = []
        for item in items:
            try:
                out.append(_as(item, element, key, example))
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{key}: {item!r} is not {_kind(element)}; write e.g. {key}={example or '[a,b]'}") from None
        return out
    raise TypeError(typ)


def coerce(value: Any, annotation: Any, key: str, example: str | None = None) -> Any:
    """A YAML value (or, for a text field, an override's text) as the field's type."""
    if type(None) in get_args(annotation) and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))):
        return None
    for typ in _members(annotation):
        try:
            return _as(value, typ, key, example)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError):
            continue
    raise ConfigError(f"{key}={value!r} is not {_kind(annotation)}{', or empty' if type(None) in get_args(annotation) else ''}")


def override_text(value: Any) -> str:
    """The text of an override that reads back as ``value``: lists in YAML flow syntax, with
    quotes where an element needs them (``['/data/a,b.jsonl']``); None as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):  # floats as Python writes them (1e-05, not YAML's 1.0e-05)
        return "[" + ", ".join(repr(v) if isinstance(v, float) else
                               yaml.safe_dump([v], default_flow_style=True, width=1 << 30).strip()[1:-1] for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------- sections from text


def valid_keys(sections: dict[str, type]) -> list[str]:
    return [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)]


def load_config(
    sections: dict[str, type], path: str | Path | None = None, overrides: list[str] | tuple = ()
) -> dict[str, Any]:
    """Build ``{section: dataclass instance}`` from defaults, a YAML file, then ``key=value`` overrides.

    An unknown section or key is an error that lists the valid keys.
    """
    raw: dict[str, dict[str, Any]] = {name: {} for name in sections}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections {sorted(sections)}, got {type(data).__name__}")
        for name, values in data.items():
            if name not in sections:
                raise ConfigError(
                    f"{path}: unknown section {name!r}; valid keys: {', '.join(valid_keys(sections))}"
                )
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {name!r} must be a mapping, got {values!r}")
            raw[name].update(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. encoder.batch_size=64")
        key, value = item.split("=", 1)
        name, _, field = key.strip().partition(".")
        if name not in sections or not field:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(valid_keys(sections))}")
        raw[name][field] = Override(value)
    out = {}
    for name, cls in sections.items():
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for field, value in raw[name].items():
            key = f"{name}.{field}"
            if field not in fields:
                raise ConfigError(f"unknown key '{key}'; valid keys: {', '.join(valid_keys(sections))}")
            if isinstance(value, Override):
                value = read_override(value, hints[field], key)
            values[field] = coerce(value, hints[field], key, fields[field].metadata.get("example"))
        out[name] = cls(**values)
    return out


def config_to_dict(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(section) for name, section in config.items()}


def profile_overrides(profile: dict[str, dict]) -> list[str]:
    """``{section: {key: value}}`` -> ``["section.key=value", ...]``, which load back as those values."""
    return [f"{section}.{key}={override_text(value)}" for section, values in profile.items() for key, value in values.items()]
