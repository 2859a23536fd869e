"""Supervised fine-tuning of an image-text-to-text model, read top to bottom (the steps every recipe shares are in
skeleton.py).

Features:
- any `AutoModelForImageTextToText` with its `AutoProcessor` (hub id, local dir, or an architecture built
  from [model.config], e.g. LLaVA = SigLIP vision tower + Llama);
- data as image + text conversations (OpenAI content lists, `<image>` placeholders with an images list, or
  image/question/answer columns); images as RGB, optionally cropped to their content;
- the processor's chat template renders each conversation; loss on the assistant turns only (prompts,
  padding and image tokens masked);
- `[model] freeze` keeps the vision tower, the input embeddings or the language model fixed; with [peft],
  LoRA goes on the language model and the vision tower is left out;
- both backends (functional, DeepSpeed ZeRO 0-3), checkpoints, resume, preemption, memory settings, as in
  llm_finetune. Every sample holds an image, so every rank runs the vision tower on every micro-batch: ZeRO-3's
  gathers cannot diverge between ranks;
- eval loss on the validation set, and exact match of greedy answers (`eval.generate_samples`, equal up to
  white space); final/ holds the model and its processor (Auto classes reload both).
"""

from automodel import data, models
from automodel.config import TrainConfig
from automodel.data.vlm import VlmCollator, load_samples
from automodel.models import vlm as vlm_models
from automodel.recipes.skeleton import Parts, Setup, ValidationSet, run as run_recipe
from automodel.training.evaluate import exact_match_of_prompts
from automodel.training.loop import TrainResult


def run(cfg: TrainConfig) -> TrainResult:
    return run_recipe(cfg, parts)


def parts(setup: Setup) -> Parts:
    cfg = setup.cfg
    # Conversations with images, read and checked before any weights load; the collator renders, tokenises and
    # masks them batch by batch.
    processor = vlm_models.build_processor(cfg.tokenizer, cfg.model)
    train_samples, skipped = load_samples(cfg.data.train[0], cfg.data.on_bad_row)
    val_samples = load_samples(cfg.data.validation[0], cfg.data.on_bad_row)[0] if cfg.data.validation else None
    collate = VlmCollator(processor, cfg.data.crop_images, cfg.data.seq_len, models.DTYPES[cfg.model.dtype])

    # The model (partitioned at load under ZeRO-3), frozen parts, LoRA off the vision tower.
    model = setup.build_model(lambda: vlm_models.build_vlm(cfg.model, processor, cfg.seed))
    frozen = vlm_models.freeze(model, cfg.model.freeze)
    model, base_path = setup.apply_lora(model, processor, exclude=vlm_models.lora_exclusions(model))
    eval_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size

    def val_batches():
        return (collate([val_samples[i] for i in idx])
                for idx in data.eval_batches(val_samples, eval_size, cfg.eval.max_batches))

    def answers(module, generate_kwargs):
        prompts = (collate.prompt(s) for s in val_samples[:cfg.eval.generate_samples])
        return exact_match_of_prompts(module, processor.tokenizer, prompts, cfg.eval.max_new_tokens, setup.device,
                                      **generate_kwargs)

    images = sum(len(s.images) for s in train_samples)
    validation = f"; validation: {len(val_samples):,}" if val_samples else ""
    return Parts(
        model=model, processing_class=processor, base_path=base_path, num_train=len(train_samples),
        collate=lambda idx: collate([train_samples[i] for i in idx]),
        validation={"": ValidationSet(val_batches, answers)} if val_samples else {},
        data_lines=[f"train: {len(train_samples):,} conversations ({skipped} rows skipped), {images:,} images"
                    f"{validation}"],
        model_note=f"frozen: {frozen or 'nothing'}",
    )
