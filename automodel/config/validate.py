"""Cross-field checks: everything that can be known about a config before a model is loaded.

Each problem is a line naming the key and what to do; all of them are reported at once.
"""

import difflib
import importlib.util
import re
from pathlib import Path
from typing import Any

from automodel.config.batch import BatchShape
from automodel.config.errors import ConfigError
from automodel.config.schema import CHAT_ROLES, TrainConfig

# Top-level keys of DeepSpeed's config JSON (deepspeed.ai/docs/config-json), for checking overrides.
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "flops_profiler", "activation_checkpointing",
    "aio", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "compression_training", "curriculum_learning",
    "data_efficiency", "elasticity", "autotuning", "checkpoint", "memory_breakdown", "disable_allgather",
    "compile", "pipeline", "nebula", "weight_quantization", "hybrid_engine", "use_data_before_expert_parallelism",
    "graph_harvesting", "sparse_attention", "timers", "monitor_config", "tensor_parallel",
})
# These always come from [train] (BatchShape) so they cannot disagree with the data pipeline.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_overrides(overrides: dict[str, Any]) -> list[str]:
    """Problems with `distributed.deepspeed_overrides`, as messages (empty when fine)."""
    problems = []
    for key in overrides:
        if key in BATCH_KEYS:
            problems.append(f"distributed.deepspeed_overrides.{key}: batch sizes come from [train] "
                            "(train.global_batch_size, train.micro_batch_size); remove it here")
        elif key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_KEYS), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append(f"distributed.deepspeed_overrides.{key}: not a DeepSpeed config key{hint}")
    return problems


def validate(cfg: TrainConfig, world_size: int = 1, source: str = "config") -> TrainConfig:
    """`cfg` if every check passes, else a ConfigError listing each problem on a line of its own."""
    problems = [*_schedule_problems(cfg, world_size), *_model_problems(cfg), *_data_problems(cfg),
                *_distributed_problems(cfg), *_memory_problems(cfg), *_vlm_problems(cfg), *_distill_problems(cfg),
                *_preference_problems(cfg), *_quantization_problems(cfg),
                *_logging_problems(cfg), *_launch_problems(cfg.launch)]
    if problems:
        raise ConfigError(f"{source}: " + f"\n{source}: ".join(problems))
    return cfg


def _schedule_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """Batch shape, length, cadence, schedule, optimizer."""
    t, o, sched = cfg.train, cfg.optim, cfg.schedule
    problems = [p for p in [BatchShape.of(t, world_size).problem()] if p]
    if (t.max_steps is None) == (t.epochs is None):
        problems.append("set exactly one of train.max_steps and train.epochs")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps must be >= 1 (got {t.max_steps})")
    if t.epochs is not None and t.epochs <= 0:
        problems.append(f"train.epochs must be > 0 (got {t.epochs})")
    if t.max_steps is not None and sched.warmup_steps > t.max_steps:
        problems.append(f"schedule.warmup_steps ({sched.warmup_steps}) is larger than train.max_steps ({t.max_steps}); "
                        "lower it, or give the warmup as a share of the run instead (it then scales with max_steps): "
                        "schedule.warmup_ratio = 0.1 with schedule.warmup_steps = 0")
    if t.eval_every < 0:
        problems.append("train.eval_every must be >= 0")
    if t.log_every < 1:
        problems.append("train.log_every must be >= 1")
    if sched.warmup_steps < 0:
        problems.append("schedule.warmup_steps must be >= 0")
    if not 0 <= sched.warmup_ratio < 1:
        problems.append(f"schedule.warmup_ratio must be in [0, 1) (got {sched.warmup_ratio})")
    if sched.warmup_ratio and sched.warmup_steps:
        problems.append("schedule.warmup_steps and schedule.warmup_ratio both set the warmup; keep one (the other 0)")
    if not 0.0 <= sched.decay_fraction <= 1.0:
        problems.append(f"schedule.decay_fraction must be in [0, 1] (got {sched.decay_fraction})")
    if not o.lr > 0 or o.lr == float("inf"):
        problems.append(f"optim.lr must be a finite number > 0 (got {o.lr})")
    if sched.min_lr > o.lr:
        problems.append(f"schedule.min_lr ({sched.min_lr}) is larger than optim.lr ({o.lr})")
    if not o.clip_grad_norm >= 0:
        problems.append("optim.clip_grad_norm must be >= 0 (0 turns clipping off)")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        problems.append(f"optim.betas must each be in [0, 1) (got {list(o.betas)})")
    return problems


def _model_problems(cfg: TrainConfig) -> list[str]:
    problems = _output_dir_problems(cfg.output_dir)
    if cfg.model.init == "pretrained" and not cfg.model.name_or_path:
        problems.append('model.name_or_path is required with model.init = "pretrained" (a hub id or local dir)')
    if cfg.model.init == "random":
        if "model_type" not in cfg.model.config and not cfg.model.name_or_path:
            problems.append('model.init = "random" needs model.config.model_type (e.g. "llama") or a model.name_or_path '
                            "whose config to use")
        if not cfg.model.name_or_path and not cfg.tokenizer.name_or_path:
            problems.append('model.init = "random" without model.name_or_path needs tokenizer.name_or_path')
    if cfg.peft is not None:
        if cfg.peft.rank < 1 or cfg.peft.alpha <= 0 or not 0.0 <= cfg.peft.dropout < 1.0:
            problems.append("peft.rank must be >= 1, peft.alpha > 0 and peft.dropout in [0, 1)")
        if not cfg.peft.target_modules:
            problems.append('peft.target_modules is empty; e.g. ["all-linear"] or ["*_proj"]')
    if cfg.checkpoint.export_merged and cfg.peft is None:
        problems.append("checkpoint.export_merged needs a [peft] section (a full fine-tune's final/ is already whole)")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        problems.append("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
    return problems


def _output_dir_problems(output_dir: str) -> list[str]:
    """A run writes checkpoints, logs and final/ into output_dir and prunes old checkpoints there: never into the
    working directory as a whole, the filesystem root or a home directory."""
    if not output_dir.strip():
        return ['output_dir is empty; give the run a directory of its own, e.g. output_dir = "runs/my_run"']
    where = Path(output_dir).expanduser().resolve()
    what = ("the filesystem root" if where == Path(where.anchor) else
            "a home directory" if where == Path.home().resolve() else None)
    if what:
        return [f"output_dir = {output_dir!r} is {what}; a run writes and prunes its files there: give it a "
                'directory of its own, e.g. output_dir = "runs/my_run"']
    return []


def _data_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    d = cfg.data
    if not d.train:
        problems.append("[data.train] is required: set data.train.source (a hub dataset id or a local file)")
    if not 0.0 <= d.validation_fraction < 1.0:
        problems.append(f"data.validation_fraction must be in [0, 1) (got {d.validation_fraction})")
    if d.validation_fraction > 0 and d.validation:
        problems.append("data.validation_fraction and [data.validation] both define a validation set; keep one")
    if d.shuffle_window < 0:
        problems.append(f"data.shuffle_window must be >= 0 (got {d.shuffle_window}); 0 keeps the stream's order")
    for name, role in d.role_map.items():
        if role not in CHAT_ROLES:
            problems.append(f'data.role_map.{name} = "{role}" is not a role; use one of {", ".join(CHAT_ROLES)}')
    if d.shuffle_window and not any(src.streaming for src in d.train):
        problems.append("data.shuffle_window shuffles streamed sources; sources read in full are shuffled every "
                        "epoch already: leave it out, or set streaming = true")
    if d.num_proc < 0:
        problems.append(f"data.num_proc must be >= 0 (got {d.num_proc}); 0 uses the available cores")
    if d.seq_len < 2:
        problems.append(f"data.seq_len must be >= 2 (got {d.seq_len})")
    for name in ("train", "validation"):
        sources = getattr(d, name)
        for i, src in enumerate(sources):
            key = f"data.{name}" + (f".{i}" if len(sources) > 1 else "")
            if src.limit is not None and src.limit < 1:
                problems.append(f"{key}.limit must be >= 1 (got {src.limit}); leave it out for all rows")
            if src.weight is not None and not 0 < src.weight < float("inf"):
                problems.append(f"{key}.weight must be a finite number > 0 (got {src.weight})")
            if name == "validation" and src.weight is not None:
                problems.append(f"{key}.weight: validation sets are not sampled; leave weight out")
            if name == "validation" and src.streaming:
                problems.append(f"{key}.streaming: validation sets are read in full (every evaluation sees the same "
                                "rows); set streaming = false, and `limit` to keep it small")
            if src.streaming and src.format == "vlm":
                problems.append(f"{key}.streaming: vlm sources are not streamed; set streaming = false")
    weights = [src.weight is not None for src in d.train]
    if any(weights) and not all(weights):
        problems.append("data.train: give every source a weight, or none (then each draws in proportion to its size)")
    streamed = [src.streaming for src in d.train]
    if any(streamed) and not all(streamed):
        problems.append("data.train: stream every training source or none (streaming = true on each)")
    if any(streamed) and cfg.train.max_steps is None:
        problems.append("train.epochs: a streamed source's length is not known ahead; set train.max_steps instead")
    if any(streamed) and d.validation_fraction > 0:
        problems.append("data.validation_fraction cannot carve a streamed source; give a [data.validation] set")
    names = [src.name for src in d.validation]
    if len(names) > 1 and (not all(names) or len(set(names)) != len(names)):
        problems.append(f"[[data.validation]]: with several validation sets each needs its own name (got {names}); "
                        "their metrics are eval_loss/<name>")
    if cfg.eval.generate_samples > 0 and not d.validation:
        problems.append("eval.generate_samples needs a [data.validation] set")
    return problems


def _logging_problems(cfg: TrainConfig) -> list[str]:
    """Trackers, profiling, early stopping and the best checkpoint."""
    problems = []
    t, log = cfg.train, cfg.logging
    validating = bool(cfg.data.validation) or cfg.data.validation_fraction > 0
    if len(set(log.backends)) != len(log.backends):
        problems.append(f"logging.backends lists a tracker twice ({log.backends})")
    if log.profile_steps and not (len(log.profile_steps) == 2 and 1 <= log.profile_steps[0] <= log.profile_steps[1]):
        problems.append(f"logging.profile_steps must be [first, last] with 1 <= first <= last (got {log.profile_steps})")
    if t.early_stopping_patience < 0 or t.early_stopping_min_delta < 0:
        problems.append("train.early_stopping_patience and train.early_stopping_min_delta must be >= 0")
    for key, on in (("train.early_stopping_patience", t.early_stopping_patience > 0),
                    ("checkpoint.keep_best", cfg.checkpoint.keep_best)):
        if on and not (validating and t.eval_every > 0):
            problems.append(f"{key} needs evaluations: a validation set ([data.validation] or "
                            "data.validation_fraction) and train.eval_every > 0")
    return problems


def _distributed_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    d = cfg.distributed
    if d.backend == "functional" and (d.offload_optimizer != "none" or d.offload_params != "none"
                                      or d.deepspeed_overrides):
        problems.append('distributed.offload_* and distributed.deepspeed_overrides need distributed.backend = '
                        '"deepspeed"')
    if d.bucket_mb < 0:
        problems.append(f"distributed.bucket_mb must be >= 0 (got {d.bucket_mb}); 0 turns the overlap off")
    if d.offload_params != "none" and d.zero_stage != 3:
        problems.append(f"distributed.offload_params needs distributed.zero_stage = 3 (got {d.zero_stage})")
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        problems.append("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    if d.deepspeed_overrides:
        problems.extend(check_overrides(d.deepspeed_overrides))
    return problems


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
    if t.compile and cfg.distributed.backend == "deepspeed" and cfg.distributed.zero_stage == 3:
        problems.append("train.compile is not supported under ZeRO-3 (its hooks gather each layer's weights inside the "
                        "compiled region); use zero_stage 0-2 or the functional backend")
    if t.compile and t.grad_method == "grad_and_value":
        problems.append('train.compile needs train.grad_method = "autograd"')
    if o.master_dtype != "auto" and cfg.model.dtype == "float32":
        problems.append(f'optim.master_dtype = "{o.master_dtype}" is for bfloat16/float16 models; model.dtype is '
                        'float32, whose weights are their own masters: leave it at "auto"')
    elif o.master_dtype == "same" and cfg.distributed.backend == "deepspeed":
        problems.append('optim.master_dtype = "same" is for the functional backend; DeepSpeed always keeps float32 '
                        "masters for bfloat16/float16 models")
    if cfg.train.on_nonfinite == "skip" and cfg.distributed.backend == "deepspeed":
        problems.append('train.on_nonfinite = "skip" is for the functional backend (a DeepSpeed engine applies its '
                        'update inside its step); use "stop"')
    if o.fused and cfg.distributed.backend == "deepspeed":
        problems.append("optim.fused is for the functional backend; DeepSpeed's AdamW is fused on CUDA already")
    if o.fused and o.name not in ("adamw", "adamw8bit"):
        problems.append(f'optim.fused is torch\'s AdamW kernel; optim.name = "{o.name}" has none: leave it out')
    problems.extend(_shaped_optimizer_problems(cfg))
    return problems


def _shaped_optimizer_problems(cfg: TrainConfig) -> list[str]:
    """Muon, Adafactor and SOAP read each weight's shape (a matrix's rows and columns)."""
    o, d = cfg.optim, cfg.distributed
    problems = []
    if o.name not in ("muon", "adafactor", "soap"):
        return problems
    if d.backend == "deepspeed" and (d.zero_stage != 0 or cfg.model.dtype != "float32"):
        problems.append(f'optim.name = "{o.name}" needs each weight whole, as a matrix, and DeepSpeed hands its '
                        "optimizer flat shards (ZeRO 1-3) or flat float32 copies (bfloat16/float16 ZeRO-0); under "
                        "DeepSpeed use distributed.zero_stage = 0 with model.dtype = \"float32\", or "
                        'distributed.backend = "functional" (any number of ranks, each holding the whole optimizer '
                        "state)")
    if o.name == "muon":
        if not o.muon_lr > 0:
            problems.append(f"optim.muon_lr must be > 0 (got {o.muon_lr})")
        if not 0 <= o.muon_momentum < 1:
            problems.append(f"optim.muon_momentum must be in [0, 1) (got {o.muon_momentum})")
    if o.name == "soap":
        if o.soap_precondition_frequency < 1:
            problems.append(f"optim.soap_precondition_frequency must be >= 1 (got {o.soap_precondition_frequency})")
        if o.soap_max_precondition_dim < 1:
            problems.append(f"optim.soap_max_precondition_dim must be >= 1 (got {o.soap_max_precondition_dim})")
    return problems


def _quantization_problems(cfg: TrainConfig) -> list[str]:
    """Quantised bases, 8-bit optimizer states and activation offloading (docs/lora.md)."""
    problems = []
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.distributed
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    q = f'model.quantization = "{m.quantization}"'
    if m.quantization != "none":
        if not has_bnb:
            problems.append(f"{q} needs bitsandbytes, which is not installed: pip install 'automodel[quant]'")
        if cfg.peft is None:
            problems.append(f"{q}: a quantised base is frozen (its packed weights take no updates); add a [peft] "
                            "section to train LoRA adapters on it (QLoRA), or set model.quantization = \"none\"")
        if cfg.recipe == "vlm_finetune":
            problems.append(f"{q} is for the text recipes (llm_finetune, llm_dpo, llm_kd); vlm_finetune loads its "
                            'model in full: set model.quantization = "none"')
        if t.grad_method != "autograd":
            problems.append(f'{q} needs train.grad_method = "autograd" (torch.func cannot differentiate through '
                            "bitsandbytes' quantised matmuls)")
        if m.quantization == "int8" and (m.quantization_compute_dtype != "auto"
                                         or m.quantization_storage_dtype != "auto"):
            problems.append("model.quantization_compute_dtype and quantization_storage_dtype are 4-bit settings; "
                            'int8 multiplies in float16: leave them at "auto"')
        if d.backend == "deepspeed" and d.zero_stage == 3:
            compute = m.dtype if m.quantization_compute_dtype == "auto" else m.quantization_compute_dtype
            if m.quantization == "int8":
                problems.append(f"{q} cannot be partitioned by ZeRO-3 (its int8 weights and row scales are not "
                                'floating point); use "nf4"/"fp4" with ZeRO-3, or zero_stage 0-2')
            elif m.quantization_storage_dtype not in ("auto", compute):
                problems.append(f'model.quantization_storage_dtype = "{m.quantization_storage_dtype}": ZeRO-3 '
                                f'partitions a 4-bit base only when its storage dtype is the compute dtype ("{compute}"); '
                                'leave it at "auto"')
            if d.offload_params != "none":
                problems.append(f"{q} with distributed.offload_params: the packed weights cannot be offloaded by "
                                "ZeRO-3; offload the optimizer only")
    elif m.quantization_compute_dtype != "auto" or m.quantization_storage_dtype != "auto" or not m.double_quant:
        problems.append("model.quantization_compute_dtype, double_quant and quantization_storage_dtype describe a "
                        'quantised base; set model.quantization ("nf4", "fp4" or "int8") or leave them out')
    if o.name == "adamw8bit":
        if not has_bnb:
            problems.append("optim.name = \"adamw8bit\" needs bitsandbytes, which is not installed: "
                            "pip install 'automodel[quant]'")
        if o.fused:
            problems.append('optim.fused is torch\'s AdamW kernel; optim.name = "adamw8bit" has its own: leave it out')
        if d.backend == "deepspeed" and d.offload_optimizer != "none":
            problems.append('optim.name = "adamw8bit" with distributed.offload_optimizer: DeepSpeed\'s CPU Adam would '
                            "replace it; use one of them")
    elif o.paged:
        problems.append('optim.paged pages the states of optim.name = "adamw8bit"; set that, or leave paged out')
    if t.activation_offloading and t.grad_method != "autograd":
        problems.append('train.activation_offloading needs train.grad_method = "autograd" (torch.func refuses the '
                        "saved-tensor hooks that move activations)")
    return problems


def _distill_problems(cfg: TrainConfig) -> list[str]:
    kd, problems = cfg.distill, []
    if (cfg.recipe == "llm_kd") != (kd is not None):
        return ['recipe = "llm_kd" and a [distill] section go together (set distill.teacher to the teacher model)']
    if kd is not None:
        if not 0.0 <= kd.alpha <= 1.0:
            problems.append(f"distill.alpha must be in [0, 1] (got {kd.alpha})")
        if not 0.0 < kd.temperature < float("inf"):
            problems.append(f"distill.temperature must be a finite number > 0 (got {kd.temperature})")
        if not kd.teacher:
            problems.append("distill.teacher is empty; give a hub id or a local model directory")
    return problems


PAIRWISE = ("sigmoid", "ipo", "robust", "simpo", "orpo")


def _preference_problems(cfg: TrainConfig) -> list[str]:
    pref, problems = cfg.preference, []
    sources = [(n, i, src) for n in ("train", "validation") for i, src in enumerate(getattr(cfg.data, n))]
    if (cfg.recipe == "llm_dpo") != (pref is not None):
        return ['recipe = "llm_dpo" and a [preference] section go together (preference.loss picks the loss; '
                "docs/preference.md)"]
    if pref is None:
        if cfg.train.best_metric != "eval_loss":
            problems.append(f'train.best_metric = "{cfg.train.best_metric}" is a preference metric (recipe = '
                            '"llm_dpo"); follow "eval_loss"')
        for name, _, src in sources:
            if src.format in ("preference", "kto"):
                problems.append(f'data.{name}.format = "{src.format}" is for recipe = "llm_dpo" with a [preference] '
                                "section")
        return problems
    wanted = "kto" if pref.loss == "kto" else "preference"
    for name, i, src in sources:
        if src.format != wanted:
            key = f"data.{name}" + (f".{i}" if len(getattr(cfg.data, name)) > 1 else "")
            problems.append(f'{key}.format = "{src.format}": preference.loss = "{pref.loss}" trains on '
                            f'format = "{wanted}" rows (docs/preference.md)')
        if src.streaming and pref.precompute_reference:
            problems.append(f"data.{name}.streaming: preference.precompute_reference needs the pairs read in full "
                            "(one pass before training); set one of them to false")
    if cfg.data.packing:
        problems.append("data.packing: preference pairs are padded, not packed (a pair's two sequences share a "
                        "prompt, and each needs its own summed log-prob); set data.packing = false")
    if cfg.data.max_prompt_tokens < 0:
        problems.append(f"data.max_prompt_tokens must be >= 0 (got {cfg.data.max_prompt_tokens}); 0 keeps whole prompts")
    if not 0 < pref.beta < float("inf"):
        problems.append(f"preference.beta must be a finite number > 0 (got {pref.beta})")
    if not 0.0 <= pref.label_smoothing < 0.5:
        problems.append(f"preference.label_smoothing must be in [0, 0.5) (got {pref.label_smoothing})")
    if pref.label_smoothing and pref.loss not in ("robust", "simpo"):
        problems.append(f'preference.label_smoothing is the flip rate of loss = "robust" (and SimPO\'s smoothing); '
                        f'loss = "{pref.loss}" ignores it: leave it out or use "robust"')
    if pref.sft_weight < 0 or pref.orpo_lambda < 0 or pref.kto_desirable_weight < 0 or pref.kto_undesirable_weight < 0:
        problems.append("preference.sft_weight, orpo_lambda and kto_*_weight must be >= 0")
    if pref.sft_weight and pref.loss in ("orpo", "kto"):
        problems.append(f'preference.sft_weight: loss = "{pref.loss}" has no separate NLL term to add (ORPO\'s is '
                        "built in; weigh it with orpo_lambda)")
    reference_free = pref.loss in ("simpo", "orpo")
    if reference_free and (pref.reference or pref.precompute_reference):
        problems.append(f'preference.reference / precompute_reference: loss = "{pref.loss}" uses no reference '
                        "model; leave them out")
    if cfg.train.grad_method != "autograd":
        problems.append('train.grad_method = "grad_and_value": the preference losses run on "autograd" (the '
                        "reference pass and per-sequence log-probs are outside torch.func's transform)")
    if cfg.train.best_metric == "eval_rewards/accuracies" and pref.loss == "kto":
        problems.append('train.best_metric = "eval_rewards/accuracies" needs pairs; KTO\'s examples are unpaired: '
                        'follow "eval_loss"')
    if cfg.eval.generate_samples:
        problems.append("eval.generate_samples: preference evaluation reports the loss and reward accuracy of held-out "
                        "pairs, not exact match; set it to 0")
    return problems


def _vlm_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    sources = [(n, src) for n in ("train", "validation") for src in getattr(cfg.data, n)]
    vlm = cfg.recipe == "vlm_finetune"
    for name, src in sources:
        if (src.format == "vlm") != vlm:
            problems.append(f'data.{name}.format = "{src.format}" with recipe = "{cfg.recipe}": image conversations '
                            'use format = "vlm" with recipe = "vlm_finetune"')
    if vlm:
        if cfg.data.packing:
            problems.append("data.packing is not supported by vlm_finetune (images make samples unpackable)")
        if len(cfg.data.train) > 1 or len(cfg.data.validation) > 1:
            problems.append("vlm_finetune takes one [data.train] and at most one [data.validation] source")
        if cfg.data.validation_fraction:
            problems.append("data.validation_fraction is not supported by vlm_finetune; give [data.validation]")
        if cfg.checkpoint.export_merged:
            problems.append("checkpoint.export_merged is not supported by vlm_finetune yet; merge with peft")
    elif cfg.model.freeze:
        problems.append('model.freeze is for recipe = "vlm_finetune" (a text LLM has no parts to choose)')
    return problems


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a shell (and container) environment variable's name
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
    if s.cpus_per_task < 0 or s.signal_seconds < 0 or s.max_requeues < 0:
        problems.append("launch.slurm.cpus_per_task, signal_seconds and max_requeues must be >= 0")
    for line in s.sbatch:
        if not line.startswith("-") or "\n" in line:
            problems.append(f'launch.slurm.sbatch entry "{line}": one sbatch option per entry, e.g. '
                            '"--constraint=h100" (without "#SBATCH")')
    for key in s.env:
        if not _ENV_NAME.match(key):
            problems.append(f'launch.slurm.env key "{key}" is not a shell variable name')
    for name in ("job_name", "partition", "account", "qos", "mem"):
        if any(ch.isspace() for ch in getattr(s, name)):
            problems.append(f"launch.slurm.{name} must not contain spaces")
    return problems + _k8s_problems(launch.k8s)


# A Kubernetes resource quantity: "32", "500m", "200Gi", "1.5e3".
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[numkKMGTPE]|[KMGTPE]i)?$")
# kubectl's taint syntax: KEY[=VALUE]:EFFECT.
_TAINT = re.compile(r"^([A-Za-z0-9./_-]+)(=([A-Za-z0-9._-]*))?:(NoSchedule|PreferNoSchedule|NoExecute)$")


def _k8s_problems(k: Any) -> list[str]:
    problems = []
    if not 1 <= k.port <= 65535:
        problems.append(f"launch.k8s.port {k.port} is not a port (1-65535)")
    if k.termination_grace_seconds < 0 or k.backoff_limit < 0 or k.ttl_seconds_after_finished < 0:
        problems.append("launch.k8s.termination_grace_seconds, backoff_limit and ttl_seconds_after_finished must "
                        "be >= 0")
    for name in ("cpu", "memory", "shm_size", "volume_size"):
        value = getattr(k, name)
        if value and not _QUANTITY.match(value):
            problems.append(f'launch.k8s.{name} "{value}" is not a Kubernetes quantity; e.g. "32", "500m", "200Gi"')
    if not k.volume_claim and not k.volume_size:
        problems.append("launch.k8s.volume_size is empty: give the size of the claim to create, or an existing "
                        "launch.k8s.volume_claim")
    for taint in k.tolerations:
        if not _TAINT.match(taint):
            problems.append(f'launch.k8s.tolerations entry "{taint}" is not KEY[=VALUE]:EFFECT, e.g. '
                            '"nvidia.com/gpu:NoSchedule" (EFFECT: NoSchedule, PreferNoSchedule or NoExecute)')
    for table in ("env", "secret_env"):
        for key in getattr(k, table):
            if not _ENV_NAME.match(key):
                problems.append(f'launch.k8s.{table} key "{key}" is not an environment variable name')
    for key, ref in k.secret_env.items():
        secret, _, item = ref.partition("/")
        if not secret or not item or "/" in item:
            problems.append(f'launch.k8s.secret_env.{key} = "{ref}": give "secret-name/key", e.g. "hf-token/token"')
    if not k.workdir.startswith("/"):
        problems.append(f'launch.k8s.workdir "{k.workdir}" must be an absolute path in the container')
    return problems


