"""TOML file + dotted overrides -> a validated, frozen TrainConfig.

    raw dict (tomllib) -> apply overrides -> check keys (suggest the closest) -> cattrs structure
    (strict scalar types) -> cross-field validation -> TrainConfig

Every failure is a ConfigError whose message names the file or override, the key and what to do.
"""

import difflib
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import attrs
import cattrs
import tomli_w

from automodel.config.schema import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config problem a person can fix; the CLI prints it without a traceback."""


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
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(path[: i + 1])
                raise ConfigError(f"override `{text}`: `{prefix}` is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


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
        if sub is not None:
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
            shown = f" (got {value!r})" if value is not _MISSING and "got" not in text else ""
            lines.append(f"{origin_of(key)}: `{key}`: {text}{shown}")
        raise ConfigError("\n".join(lines)) from None


_MISSING = object()


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
# Cross-field checks: everything that can be known before a model is loaded


def validate(cfg: TrainConfig, world_size: int = 1, source: str = "config") -> TrainConfig:
    problems = []
    t = cfg.train
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        problems.append("train.global_batch_size and train.micro_batch_size must be >= 1")
    elif t.global_batch_size % (t.micro_batch_size * world_size) != 0:
        per_step = t.micro_batch_size * world_size
        problems.append(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x ranks ({world_size}) = {per_step}; e.g. set train.global_batch_size = "
            f"{max(per_step, t.global_batch_size // per_step * per_step)}"
        )
    if (t.max_steps is None) == (t.epochs is None):
        problems.append("set exactly one of train.max_steps and train.epochs")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps must be >= 1 (got {t.max_steps})")
    if t.epochs is not None and t.epochs <= 0:
        problems.append(f"train.epochs must be > 0 (got {t.epochs})")
    if t.max_steps is not None and cfg.schedule.warmup_steps > t.max_steps:
        problems.append(
            f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) is larger than train.max_steps ({t.max_steps})"
        )
    for name in ("eval_every", "log_every"):
        if getattr(t, name) < 0:
            problems.append(f"train.{name} must be >= 0")
    if t.log_every == 0:
        problems.append("train.log_every must be >= 1")
    if cfg.schedule.warmup_steps < 0:
        problems.append("schedule.warmup_steps must be >= 0")
    if not 0.0 <= cfg.schedule.decay_fraction <= 1.0:
        problems.append(f"schedule.decay_fraction must be in [0, 1] (got {cfg.schedule.decay_fraction})")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr must be > 0 (got {cfg.optim.lr})")
    if cfg.schedule.min_lr > cfg.optim.lr:
        problems.append(f"schedule.min_lr ({cfg.schedule.min_lr}) is larger than optim.lr ({cfg.optim.lr})")
    if cfg.optim.clip_grad_norm < 0:
        problems.append("optim.clip_grad_norm must be >= 0 (0 turns clipping off)")
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        problems.append(f"optim.betas must each be in [0, 1) (got {list(cfg.optim.betas)})")
    if cfg.model.init == "pretrained" and not cfg.model.name_or_path:
        problems.append('model.name_or_path is required with model.init = "pretrained" (a hub id or local dir)')
    if cfg.model.init == "random":
        if "model_type" not in cfg.model.config and not cfg.model.name_or_path:
            problems.append(
                'model.init = "random" needs model.config.model_type (e.g. "llama") or a model.name_or_path '
                "whose config to use"
            )
        if not cfg.model.name_or_path and not cfg.tokenizer.name_or_path:
            problems.append('model.init = "random" without model.name_or_path needs tokenizer.name_or_path')
    if cfg.data.train is None:
        problems.append("[data.train] is required: set data.train.source (a hub dataset id or a local file)")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        problems.append(f"data.validation_fraction must be in [0, 1) (got {cfg.data.validation_fraction})")
    if cfg.data.validation_fraction > 0 and cfg.data.validation is not None:
        problems.append("data.validation_fraction and [data.validation] both define a validation set; keep one")
    if cfg.data.packing and cfg.model.attn_implementation == "flex_attention":
        problems.append('data.packing works with sdpa, eager and flash_attention_2, not "flex_attention"')
    if cfg.data.seq_len < 2:
        problems.append(f"data.seq_len must be >= 2 (got {cfg.data.seq_len})")
    for name in ("train", "validation"):
        src = getattr(cfg.data, name)
        if src is not None and src.limit is not None and src.limit < 1:
            problems.append(f"data.{name}.limit must be >= 1 (got {src.limit}); leave it out for all rows")
    d = cfg.distributed
    if d.backend == "functional" and (d.offload_optimizer != "none" or d.offload_params != "none"
                                      or d.deepspeed_overrides):
        problems.append('distributed.offload_* and distributed.deepspeed_overrides need distributed.backend = '
                        '"deepspeed"')
    if d.offload_params != "none" and d.zero_stage != 3:
        problems.append(f"distributed.offload_params needs distributed.zero_stage = 3 (got {d.zero_stage})")
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        problems.append("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    if d.deepspeed_overrides:
        from automodel.distributed.deepspeed_config import check_overrides

        problems.extend(check_overrides(d.deepspeed_overrides))
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        problems.append("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    if cfg.peft is not None:
        if cfg.peft.rank < 1 or cfg.peft.alpha <= 0 or not 0.0 <= cfg.peft.dropout < 1.0:
            problems.append("peft.rank must be >= 1, peft.alpha > 0 and peft.dropout in [0, 1)")
        if not cfg.peft.target_modules:
            problems.append('peft.target_modules is empty; e.g. ["all-linear"] or ["*_proj"]')
    if cfg.checkpoint.export_merged and cfg.peft is None:
        problems.append("checkpoint.export_merged needs a [peft] section (a full fine-tune's final/ is already whole)")
    if cfg.eval.generate_samples > 0 and cfg.data.validation is None:
        problems.append("eval.generate_samples needs a [data.validation] set")
    problems.extend(_memory_problems(cfg))
    problems.extend(_vlm_problems(cfg))
    problems.extend(_launch_problems(cfg.launch))
    if problems:
        raise ConfigError(f"{source}: " + f"\n{source}: ".join(problems))
    return cfg


def _memory_problems(cfg: TrainConfig) -> list[str]:
    """Recompute, loss chunks and precision: settings that contradict each other."""
    problems = []
    t, o = cfg.train, cfg.optim
    if t.loss_chunk_tokens < 0:
        problems.append(f"train.loss_chunk_tokens must be >= 0 (got {t.loss_chunk_tokens}); 0 computes whole logits")
    if t.grad_method == "grad_and_value":
        if t.activation_checkpointing:
            problems.append('train.activation_checkpointing needs train.grad_method = "autograd": torch.func\'s '
                            "grad_and_value refuses the saved-tensor hooks that recompute layers")
        if t.loss_chunk_tokens > 0:
            problems.append('train.grad_method = "grad_and_value" cannot recompute loss chunks (torch.func refuses '
                            "saved-tensor hooks); set train.loss_chunk_tokens = 0")
    if o.master_dtype != "auto" and cfg.model.dtype == "float32":
        problems.append(f'optim.master_dtype = "{o.master_dtype}" is for bfloat16/float16 models; model.dtype is '
                        'float32, whose weights are their own masters: leave it at "auto"')
    elif o.master_dtype == "same" and cfg.distributed.backend == "deepspeed":
        problems.append('optim.master_dtype = "same" is for the functional backend; DeepSpeed always keeps float32 '
                        "masters for bfloat16/float16 models")
    if o.fused and cfg.distributed.backend == "deepspeed":
        problems.append("optim.fused is for the functional backend; DeepSpeed's AdamW is fused on CUDA already")
    return problems


def _vlm_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    sources = [(n, getattr(cfg.data, n)) for n in ("train", "validation") if getattr(cfg.data, n) is not None]
    vlm = cfg.recipe == "vlm_finetune"
    for name, src in sources:
        if (src.format == "vlm") != vlm:
            problems.append(f'data.{name}.format = "{src.format}" with recipe = "{cfg.recipe}": image conversations '
                            'use format = "vlm" with recipe = "vlm_finetune"')
    if vlm:
        if cfg.data.packing:
            problems.append("data.packing is not supported by vlm_finetune (images make samples unpackable)")
        if cfg.data.validation_fraction:
            problems.append("data.validation_fraction is not supported by vlm_finetune; give [data.validation]")
        if cfg.checkpoint.export_merged:
            problems.append("checkpoint.export_merged is not supported by vlm_finetune yet; merge with peft")
    elif cfg.model.freeze:
        problems.append('model.freeze is for recipe = "vlm_finetune" (a text LLM has no parts to choose)')
    return problems


# Slurm's --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED.
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$")


def _launch_problems(launch: Any) -> list[str]:
    problems = []
    if launch.nodes < 1 or launch.gpus_per_node < 0 or launch.nproc_per_node < 0:
        problems.append("launch.nodes must be >= 1, launch.gpus_per_node and launch.nproc_per_node >= 0")
    s = launch.slurm
    if not _SLURM_TIME.match(s.time):
        problems.append(f'launch.slurm.time "{s.time}" is not a Slurm time; e.g. "04:00:00", "90" (minutes) '
                        'or "2-00:00:00"')
    if s.cpus_per_task < 1 or s.signal_seconds < 0 or s.max_requeues < 0:
        problems.append("launch.slurm.cpus_per_task must be >= 1, signal_seconds and max_requeues >= 0")
    for line in s.sbatch:
        if not line.startswith("-") or "\n" in line:
            problems.append(f'launch.slurm.sbatch entry "{line}": one sbatch option per entry, e.g. '
                            '"--constraint=h100" (without "#SBATCH")')
    for key in s.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            problems.append(f'launch.slurm.env key "{key}" is not a shell variable name')
    for name in ("job_name", "partition", "account", "qos", "mem"):
        if any(ch.isspace() for ch in getattr(s, name)):
            problems.append(f"launch.slurm.{name} must not contain spaces")
    return problems


# ---------------------------------------------------------------------------------------------
# Public entry points


def from_dict(raw: dict[str, Any], overrides: Sequence[str] = (), source: str = "config",
              world_size: Optional[int] = None) -> TrainConfig:
    override_paths = {".".join(parse_override(o)[0]) for o in overrides}

    def origin_of(path: str) -> str:
        if any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in override_paths):
            return f"{source} (command-line override)"
        return source

    merged = apply_overrides(raw, overrides)
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
    if isinstance(d, tuple):
        return list(d)
    return d


def to_toml(cfg: TrainConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_toml(cfg))
    os.replace(tmp, path)
