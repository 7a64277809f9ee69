"""Loading: YAML files with ``--set a.b=c`` overrides.

Every model forbids unknown keys; a misspelled key is reported with its dotted path and
the closest valid name. Models are frozen: a run's configuration never changes after it
has been loaded, and the resolved form is written next to the run's outputs.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Tag,
    ValidationError,
)

from hpcdeconv.errors import ConfigError

# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars.

    Parameters
    ----------
    items
        Strings of the form ``dotted.key=value``.

    Returns
    -------
    dict
        Nested mapping, e.g. ``{"a": {"b": 3}, "c": [1, 2]}``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


#: Keys that tag a member of a tagged union (``method.name``, ``generator.kind``, ``psf.model``).
UNION_TAGS = ("name", "kind", "model")


def _switches_member(base: Mapping[str, Any], update: Mapping[str, Any]) -> bool:
    """``update`` names another member of a tagged union than ``base`` does."""
    return any(tag in base and tag in update and base[tag] != update[tag] for tag in UNION_TAGS)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; mappings merge, the rest replaces.

    A mapping that switches a tagged union to another member (e.g. ``--set
    method.generator.kind=resnet`` over a ``kind: unet`` block) replaces the block: the
    other member's keys would be unknown to the new one, so it starts from its defaults.
    """
    merged: dict[str, Any] = dict(base)
    for key, value in update.items():
        current = merged.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(current, Mapping)
            and not _switches_member(current, value)
        ):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def _walk(
    model: type[BaseModel], data: Mapping[str, Any], loc: Sequence[Any]
) -> tuple[list[str], list[str]]:
    """Follow a pydantic error location through ``model``.

    Returns the valid field names of the (sub)model reached and the location as the
    user wrote it (union tags that pydantic inserts are dropped).
    """
    current: Any = model
    node: Any = data
    shown: list[str] = []
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list | tuple) and part < len(node) else None
            shown.append(str(part))
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            tagged = [c for c in _union_members(current) if _tag_of(c) == part]
            if tagged:
                current = tagged[0]
                continue
            shown.append(str(part))
            return [], shown
        shown.append(part)
        current = fields[part].annotation
        node = node.get(part) if isinstance(node, Mapping) else None
    return list(getattr(current, "model_fields", {})), shown


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    """Model classes inside a (possibly ``Annotated``, possibly tagged) union annotation."""
    found: list[type[BaseModel]] = []
    stack = [annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            found.append(item)
        elif get_origin(item) is not None:
            stack.extend(a for a in get_args(item) if not isinstance(a, Tag | Discriminator))
    return found


def _tag_of(model: type[BaseModel]) -> Any:
    """The discriminating literal of a union member: its ``model``, ``name`` or ``kind``
    default."""
    for key in ("model", "name", "kind"):
        field = model.model_fields.get(key)
        if field is not None:
            return field.default
    return None


def _format_error(model: type[BaseModel], data: Mapping[str, Any], exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = list(err["loc"])
    valid, shown = _walk(model, data, loc[:-1] if err["type"] == "extra_forbidden" else loc)
    path = ".".join([*shown, str(loc[-1])] if err["type"] == "extra_forbidden" else shown)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"unknown configuration key '{path}'{hint}"
    if err["type"] == "union_tag_invalid":
        return _unknown_tag(path, err)
    msg = err["msg"].removeprefix("Value error, ")
    if not path:  # a rule across several keys: the message names them
        return f"invalid configuration: {msg}"
    return f"invalid configuration value at '{path}': {msg}"


def _unknown_tag(path: str, err: Mapping[str, Any]) -> str:
    """``method.generator.kind 'vit' is not one of unet, resnet``: an unknown tag of a tagged
    union, named by its key (pydantic's message names our internal tag function)."""
    tag = err["ctx"]["tag"]
    given = err["input"] if isinstance(err["input"], Mapping) else {}
    key = next((str(k) for k, v in given.items() if str(v) == tag), None)
    where = ".".join(p for p in (path, key) if p)
    expected = err["ctx"]["expected_tags"].replace("'", "")
    return f"{where} '{tag}' is not one of {expected}"


def build_config(model: type[M], data: Mapping[str, Any] | None = None) -> M:
    """Validate ``data`` against ``model``; errors become one-line :class:`ConfigError`."""
    data = dict(data or {})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(model, data, exc)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Load a YAML file (optional), apply ``--set`` overrides and validate.

    Parameters
    ----------
    model
        The pydantic model of the top level, e.g. :class:`SimulateConfig`.
    path
        YAML file; ``None`` starts from the model's defaults.
    overrides
        ``dotted.key=value`` strings applied after the file.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = dict(loaded or {})
    data = deep_merge(data, parse_overrides(overrides))
    return build_config(model, data)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the fully resolved configuration as YAML (tuples become lists)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
