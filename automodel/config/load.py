"""TOML file + dotted overrides -> a validated, frozen TrainConfig.

    raw dict (tomllib) -> apply overrides -> check keys (suggest the closest) -> cattrs structure
    (strict scalar types) -> cross-field validation (validate.py) -> TrainConfig

Every failure is a ConfigError whose message names the file or override, the key and what to do.
"""

import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import attrs
import cattrs
import tomli_w

from automodel.config.errors import ConfigError
from automodel.config.schema import TrainConfig
from automodel.config.validate import validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# ---------------------------------------------------------------------------------------------
# Reading and overrides


def read_toml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise ConfigError(f"{path}: not valid TOML for a config: arrays or tables nested too deeply") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], value). VALUE is TOML (3e-5, true, "x", [1, 2], {k = 1});
    anything that is not valid TOML is taken as a plain string, so `model.name_or_path=./my-model` works."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override `{text}`: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-5")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Returns a new dict with each override applied in order (later ones win)."""
    out = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        parts = list(path)
        i = 0
        while i < len(parts) - 1:
            part = parts[i]
            child = node.setdefault(part, {})
            prefix = ".".join(parts[: i + 1])
            if isinstance(child, list) and child and all(isinstance(x, dict) for x in child):
                # An array of tables ([[data.train]]): `data.train.1.limit`, or without an index its only entry.
                if parts[i + 1].isdigit() and int(parts[i + 1]) < len(child):
                    child = child[int(parts[i + 1])]
                    i += 1
                elif len(child) == 1:
                    child = child[0]
                else:
                    raise ConfigError(f"override `{text}`: `{prefix}` has {len(child)} entries; name one by index, "
                                      f"e.g. {prefix}.0.{'.'.join(parts[i + 1:])}=...")
            if not isinstance(child, dict):
                raise ConfigError(f"override `{text}`: `{prefix}` is a value, not a section")
            node = child
            i += 1
        node[parts[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    def copy(v: Any) -> Any:
        if isinstance(v, dict):
            return _deep_copy(v)
        return [copy(x) for x in v] if isinstance(v, list) else v

    return {k: copy(v) for k, v in d.items()}


SOURCE_LISTS = ("train", "validation")  # [data.train] / [[data.train]]: one table, or an array of them


def normalize_sources(raw: dict[str, Any]) -> dict[str, Any]:
    """A single [data.train] or [data.validation] table as a list of one, as the schema types them (a config saved
    before arrays were allowed reads the same)."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in SOURCE_LISTS:
            if isinstance(data.get(key), dict):
                data[key] = [data[key]]
    return raw


# ---------------------------------------------------------------------------------------------
# Unknown keys, with suggestions across the whole schema


def _section_type(tp: Any) -> Optional[type]:
    """The attrs class inside `tp` (also inside Optional[...]), else None."""
    if attrs.has(tp):
        return tp
    for arg in typing.get_args(tp):
        if arg is not type(None) and attrs.has(arg):
            return arg
    return None


def all_key_paths(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. `optim.weight_decay`."""
    paths = []
    for f in attrs.fields(cls):
        path = f"{prefix}{f.name}"
        sub = _section_type(f.type)
        if sub is not None:
            paths.extend(all_key_paths(sub, path + "."))
        else:
            paths.append(path)
    return paths


def _suggest(bad_path: str, section_keys: list[str], all_paths: list[str]) -> str:
    leaf = bad_path.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, section_keys, n=1, cutoff=0.6)
    if close:
        parent = bad_path.rsplit(".", 1)[0] + "." if "." in bad_path else ""
        return f"did you mean `{parent}{close[0]}`?"
    # The key may live in another section: `optim.warmup_steps` -> `schedule.warmup_steps`.
    by_leaf = [p for p in all_paths if p.rsplit(".", 1)[-1] == leaf]
    if by_leaf:
        return f"did you mean `{by_leaf[0]}`?"
    close = difflib.get_close_matches(bad_path, all_paths, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return f"valid keys here: {', '.join(sorted(section_keys))}"


def check_keys(raw: dict[str, Any], origin_of: Any, cls: type = TrainConfig, prefix: str = "") -> None:
    """Raises ConfigError for the first key the schema does not know. `origin_of(path)` says where a
    key came from (the file, or a command-line override)."""
    names = {f.name: f for f in attrs.fields(cls)}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            hint = _suggest(path, list(names), all_key_paths())
            raise ConfigError(f"{origin_of(path)}: unknown key `{path}`; {hint}")
        sub = _section_type(names[key].type)
        if sub is not None and typing.get_origin(names[key].type) is list:
            if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                raise ConfigError(f"{origin_of(path)}: `{path}` is a table ([{path}]) or an array of tables "
                                  f"([[{path}]]), not {value!r}")
            for i, entry in enumerate(value):
                check_keys(entry, origin_of, sub, f"{path}." if len(value) == 1 else f"{path}.{i}.")
        elif sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{origin_of(path)}: `{path}` is a section; write it as [{path}] with keys inside, "
                    f"not as a value ({value!r})"
                )
            check_keys(value, origin_of, sub, path + ".")


# ---------------------------------------------------------------------------------------------
# Structuring with strict scalar types


class _TypeMismatch(TypeError):
    pass


def _strict(expected: type, accept: tuple[type, ...]):
    def hook(value: Any, _type: Any) -> Any:
        # bool is an int subclass in Python; never accept true/false for a number or vice versa.
        if isinstance(value, bool) and expected is not bool:
            raise _TypeMismatch(f"expected {expected.__name__}, got boolean {value!r}")
        if not isinstance(value, accept):
            raise _TypeMismatch(f"expected {expected.__name__}, got {type(value).__name__} {value!r}")
        return expected(value)

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    # Any (model.config values) passes through as TOML gave it.
    conv.register_structure_hook(typing.Any, lambda v, _: v)

    def fixed_tuple(value: Any, tp: Any) -> tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _TypeMismatch(f"expected an array of {len(args)} numbers, got {value!r}")
        return tuple(conv.structure(v, a) for v, a in zip(value, args))

    conv.register_structure_hook_func(
        lambda tp: typing.get_origin(tp) is tuple and Ellipsis not in typing.get_args(tp), fixed_tuple
    )

    def literal(value: Any, tp: Any) -> Any:
        # Compare type too: `true == 1` must not pass for `zero_stage`.
        for choice in typing.get_args(tp):
            if type(value) is type(choice) and value == choice:
                return value
        raise _TypeMismatch("expected one of " + ", ".join(repr(c) for c in typing.get_args(tp)))

    conv.register_structure_hook_func(lambda tp: typing.get_origin(tp) is typing.Literal, literal)
    return conv


_converter = _make_converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, _TypeMismatch):
        return str(exc)
    origin = typing.get_origin(type_)
    if origin is typing.Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(type_))
        return f"expected one of {choices}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, (TypeError, ValueError, AttributeError)) and origin is dict:
        return "expected a table (section) of key = value pairs"
    return cattrs.v.format_exception(exc, type_)


def structure(raw: dict[str, Any], origin_of: Any) -> TrainConfig:
    try:
        return _converter.structure(raw, TrainConfig)
    except cattrs.BaseValidationError as exc:
        messages = cattrs.transform_error(exc, path="$", format_exception=_format_exception)
        lines = []
        for msg in messages:
            text, _, where = msg.rpartition(" @ ")
            key = where.removeprefix("$").lstrip(".").replace("[", ".").replace("]", "").replace("'", "")
            value = _lookup(raw, key)
            key = _single_source_key(raw, key)
            shown = f" (got {value!r})" if value is not _MISSING and "got" not in text else ""
            lines.append(f"{origin_of(key)}: `{key}`: {text}{shown}")
        raise ConfigError("\n".join(lines)) from None


_MISSING = object()


def _single_source_key(raw: dict[str, Any], key: str) -> str:
    """`data.train.0.source` -> `data.train.source` when there is one source (as the file wrote it)."""
    for name in SOURCE_LISTS:
        prefix = f"data.{name}.0."
        if key.startswith(prefix) and len(raw.get("data", {}).get(name, [])) == 1:
            return f"data.{name}." + key[len(prefix):]
    return key


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


# ---------------------------------------------------------------------------------------------
# Public entry points


def from_dict(raw: dict[str, Any], overrides: Sequence[str] = (), source: str = "config",
              world_size: Optional[int] = None) -> TrainConfig:
    override_paths = {".".join(parse_override(o)[0]) for o in overrides}

    def origin_of(path: str) -> str:
        if any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in override_paths):
            return f"{source} (command-line override)"
        return source

    merged = normalize_sources(apply_overrides(raw, overrides))
    check_keys(merged, origin_of)
    cfg = structure(merged, origin_of)
    return validate(cfg, world_size if world_size is not None else _world_size_from_env(), source)


def load_config(path: Union[str, os.PathLike], overrides: Sequence[str] = (),
                world_size: Optional[int] = None) -> TrainConfig:
    """Reads a TOML config, applies dotted overrides (`optim.lr=3e-5`) and returns a validated TrainConfig."""
    return from_dict(read_toml(path), overrides, source=str(path), world_size=world_size)


def _world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data, None values left out (TOML has no null; a missing key reloads as its default None)."""
    return _drop_none(_converter.unstructure(cfg))


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, (tuple, list)):
        return [_drop_none(x) for x in d]
    return d


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}: dotted key paths to the leaves (an empty table is a leaf; an
    array of tables is indexed, data.train.1.source, unless it holds one table: data.train.source, as a config with a
    single [data.train] table reads)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{prefix}{key}." + (f"{i}." if len(value) > 1 else "")))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_toml(cfg: TrainConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike], comment: str = "") -> None:
    """`cfg` as TOML at `path` (whole or not at all), after `comment`'s lines as TOML comments."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"# {line}\n" for line in comment.splitlines()) + to_toml(cfg))
    os.replace(tmp, path)
