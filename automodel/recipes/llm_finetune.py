"""Supervised fine-tuning of a causal LM, read top to bottom (the steps every recipe shares are in skeleton.py).

Features:
- any `AutoModelForCausalLM` (hub id, local dir, or an architecture built from [model.config]);
- full fine-tuning, or LoRA through peft ([peft]): only adapter tensors are trained and saved;
- SQuAD, instruction, chat (chat templates, assistant-only loss) and plain-text data, cached once
  tokenised; optional packing with per-sample positions and block-diagonal attention;
- two backends behind one step interface: the functional step (in-place AdamW, explicit all-reduce over
  ranks, float32 masters for bf16 models) and DeepSpeed ZeRO 0-3 with CPU offload; exact loss normalisation over
  micro-batches and ranks, global-norm clipping, a pure LR schedule;
- memory: activation checkpointing, the loss from hidden states in chunks (no whole logits);
- atomic checkpoints every `checkpoint.every` steps and at the end; `train.resume = "auto"` continues
  from the newest complete one, reproducing the uninterrupted run step for step;
- token-weighted eval loss and greedy exact match on the validation set;
- preemption: on SIGUSR1/SIGTERM every rank stops at the same step boundary, checkpoints and exits with
  status 75; the same command resumes;
- console/tqdm progress, metrics.jsonl, TensorBoard/W&B/MLflow, plots/loss.png, the resolved config.toml,
  summary.json, and a final HF model directory (gathered from ZeRO-3 shards onto rank 0) with the chat template
  it trained with and a model card;
- early stopping on eval loss, and the best-eval checkpoint kept and exported.
"""

from automodel import data, models
from automodel.config import BatchShape, TrainConfig
from automodel.recipes.skeleton import Parts, Setup, ValidationSet, run as run_recipe
from automodel.training.evaluate import exact_match
from automodel.training.loop import TrainResult


def run(cfg: TrainConfig) -> TrainResult:
    return run_recipe(cfg, parts)


def parts(setup: Setup) -> Parts:
    cfg = setup.cfg
    # The tokenizer, then the data (tokenised and cached once; packed into seq_len rows if asked): a data problem is
    # reported before any weights load.
    tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.model)
    train_sets, val_sets = data.build_sources(cfg.data, tokenizer, seed=cfg.seed, rank=setup.ranks.rank, log=print)
    streamed = cfg.data.train[0].streaming  # then read as training goes (train_sets is empty): opened and checked
    stream_lines = data.stream.preflight(cfg.data, data.format_options(cfg.data, tokenizer)) if streamed else []
    if cfg.data.packing:  # each source on its own: a row holds samples of one source, so weights count rows
        train_sets = [data.pack(s, cfg.data.seq_len) for s in train_sets]
    train_set = data.chain(train_sets, "train") if train_sets else None
    weights = [src.weight for src in cfg.data.train]
    mixture = (data.Mixture.of([len(s) for s in train_sets], weights, cfg.seed)
               if weights[0] is not None and not streamed else None)
    template = data.trained_chat_template([*cfg.data.train, *cfg.data.validation], cfg.data, tokenizer)
    if template is not None:  # saved with the tokenizer (checkpoints, final/): prompts are built as in training
        tokenizer.chat_template = template

    # The model (under ZeRO-3 a pretrained model loads already partitioned); LoRA per [peft].
    model = setup.build_causal_lm(cfg.model, tokenizer)
    model, base_path = setup.apply_lora(model, tokenizer)
    pad = tokenizer.pad_token_id
    eval_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size

    def validation_set(val_set: data.TokenizedSet) -> ValidationSet:
        def batches():
            return (data.collate(val_set, idx, pad)
                    for idx in data.eval_batches(val_set, eval_size, cfg.eval.max_batches))

        def answers(module, generate_kwargs):
            return exact_match(module, tokenizer, val_set, cfg.eval.generate_samples, cfg.eval.max_new_tokens,
                               eval_size, setup.device, **generate_kwargs)

        return ValidationSet(batches, answers)

    def stream(position):  # this rank's part of the streamed sources, from a checkpoint's position or the start
        return data.stream.open_rank_stream(cfg.data, tokenizer, data.format_options(cfg.data, tokenizer),
                                            BatchShape.of(cfg.train, setup.ranks.world_size), cfg.seed,
                                            setup.ranks.rank, position)

    names = data.validation_names(cfg.data)
    return Parts(
        model=model, processing_class=tokenizer, base_path=base_path, num_train=len(train_set or ()), mixture=mixture,
        collate=(lambda idx: data.collate(train_set, idx, pad)) if train_set is not None else None,
        stream=stream if streamed else None,
        validation={name: validation_set(v) for name, v in zip(names, val_sets)},
        data_lines=(stream_lines or data.source_lines(train_sets, mixture)) + [s.summary() for s in val_sets],
        flops=models.flop_model(model),
    )
