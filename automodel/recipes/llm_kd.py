"""Knowledge distillation of a causal LM from a frozen teacher, read top to bottom (llm_finetune's parts plus a
teacher; the steps every recipe shares are in skeleton.py).

Features:
- everything llm_finetune has (data formats, packing, LoRA students, both backends, checkpoints, resume,
  preemption, exact match), with the loss of [distill] over the trained tokens:
  (1 - alpha) CE + alpha T^2 KL(teacher || student) at temperature T, normalised exactly as the cross-entropy is
  (token sums over the global batch's N label tokens); alpha = 0 is llm_finetune's step, bit for bit;
- the teacher: any AutoModelForCausalLM with the student's vocabulary (a hub id or a run's final/), frozen, in eval
  mode, without gradients, in `distill.teacher_dtype`; under DeepSpeed ZeRO-3 partitioned like the student;
- the chunked loss applies to both: student and teacher logits exist a chunk of trained positions at a time.
"""

import attrs

from automodel import models
from automodel.backends import build_teacher
from automodel.config import ConfigError, TrainConfig
from automodel.recipes import llm_finetune
from automodel.recipes.skeleton import Parts, Setup, run as run_recipe
from automodel.training.loop import TrainResult


def run(cfg: TrainConfig) -> TrainResult:
    return run_recipe(cfg, parts)


def parts(setup: Setup) -> Parts:
    cfg, kd = setup.cfg, setup.cfg.distill
    student = llm_finetune.parts(setup)
    dtype = cfg.model.dtype if kd.teacher_dtype == "auto" else kd.teacher_dtype
    # The teacher loads in full (model.quantization quantises the student's base only).
    teacher_cfg = attrs.evolve(cfg.model, name_or_path=kd.teacher, init="pretrained", dtype=dtype, config={},
                               quantization="none")
    try:
        teacher = setup.build_model(lambda: models.build_model(teacher_cfg, student.processing_class, cfg.seed), pretrained=True,
                                  trained=False)
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    student_vocab = models.vocab_size(student.model)
    if models.vocab_size(teacher) != student_vocab:
        raise ConfigError(f"distill.teacher `{kd.teacher}` has a {models.vocab_size(teacher):,}-token output "
                          f"vocabulary, the student {student_vocab:,}: distillation compares them token by token, so "
                          "they must share the tokenizer")
    return attrs.evolve(
        student, teacher=build_teacher(teacher, cfg, setup.ds_config, setup.device),
        model_note=f"teacher: {type(teacher).__name__} from {kd.teacher}, {models.count_params(teacher):,} "
                   f"parameters, {dtype}; alpha {kd.alpha}, temperature {kd.temperature}",
    )
