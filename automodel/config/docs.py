"""The config reference (docs/config.md), generated from the attrs schema so it cannot drift.

    automodel config docs > docs/config.md
"""

import typing
from typing import Any

import attrs

from automodel.config.load import _section_type
from automodel.config.schema import TrainConfig

HEADER = """# Config reference

Generated from `automodel/config/schema.py` by `automodel config docs > docs/config.md`; a test fails
when this file and the schema disagree. Every key is optional unless marked required; unknown keys are
errors. Override any key on the command line with `KEY=VALUE` (TOML syntax), e.g. `optim.lr=3e-5`.
"""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' for a in args)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in inner)
    if origin is dict:
        return "table"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


def _default(f: attrs.Attribute) -> str:
    if f.default is attrs.NOTHING:
        return "**required**"
    value = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(map(str, value)) + "]`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{value}`"


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """[(toml path, attrs class)] in schema order, the top level first as ""."""
    out = [(prefix, cls)]
    for f in attrs.fields(cls):
        sub = _section_type(f.type)
        if sub is not None:
            out += _sections(sub, f"{prefix}.{f.name}" if prefix else f.name)
    return out


def config_reference() -> str:
    lines = [HEADER]
    for path, cls in _sections(TrainConfig, ""):
        rows = [f for f in attrs.fields(cls) if _section_type(f.type) is None]
        if not rows:
            continue
        lines.append(f"\n## {'top level' if not path else f'[{path}]'}\n")
        lines.append(f"{(cls.__doc__ or '').strip()}\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for f in rows:
            key = f"{path}.{f.name}" if path else f.name
            doc = f.metadata.get("doc", "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_type_name(f.type)} | {_default(f)} | {doc} |")
    return "\n".join(lines) + "\n"
