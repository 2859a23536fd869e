"""The configuration schema: frozen attrs sections, the single source of defaults.

Every field carries a one-line doc in its metadata; `docs/config.md` is generated from it
(`automodel config docs`), so the documentation cannot drift from the code.
"""


from typing import Any, Literal, Optional

import attrs


def field(default: Any = attrs.NOTHING, doc: str = "", factory: Any = None, converter: Any = None) -> Any:
    """An attrs field with a one-line doc. Sections are keyword-only, so defaults may come in any order."""
    extra = {"converter": converter} if converter is not None else {}
    if factory is not None:
        return attrs.field(factory=factory, metadata={"doc": doc}, **extra)
    return attrs.field(default=default, metadata={"doc": doc}, **extra)


Dtype = Literal["float32", "bfloat16", "float16"]


@attrs.frozen(kw_only=True)
class ModelConfig:
    """The model to fine-tune."""

    name_or_path: str = field("", "Hugging Face hub id or local directory; may be empty with init = \"random\".")
    init: Literal["pretrained", "random"] = field(
        "pretrained", "\"pretrained\" loads weights from name_or_path; \"random\" builds the architecture from config."
    )
    dtype: Dtype = field("float32", "Dtype of the model weights (and of the forward pass).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = field(
        "auto", "Attention kernel passed to transformers. \"auto\": flash-attention 3 (Hopper) or 2 where installed "
        "(bfloat16/float16 on CUDA), else flex_attention for packed rows on CUDA, else sdpa. flex_attention trains on "
        "CUDA only. The start-up log says which ran."
    )
    trust_remote_code: bool = field(False, "Allow model code from the hub repository to run. Off unless you trust it.")
    config: dict[str, Any] = field(
        doc="HF config fields applied on top of the model's config; with init = \"random\", "
        "`model_type` (e.g. \"llama\") plus any fields define the architecture.",
        factory=dict,
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = field(
        "none", "Load the base's linear layers quantised by bitsandbytes (QLoRA): \"nf4\" or \"fp4\" (4-bit), "
        "\"int8\" (LLM.int8()); the output head, embeddings and norms stay in model.dtype. Needs [peft] (the "
        "quantised weights are frozen; LoRA trains on them) and `pip install 'automodel[quant]'` (docs/lora.md)."
    )
    quantization_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", "4-bit: the dtype the quantised layers dequantise to and multiply in; \"auto\" is model.dtype."
    )
    double_quant: bool = field(
        True, "4-bit: quantise the per-block scales too (QLoRA's double quantisation: about 0.4 bits per weight less)."
    )
    quantization_storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = field(
        "auto", "4-bit: the dtype the packed weights are stored in. DeepSpeed ZeRO-3 partitions them only when it is "
        "the compute dtype; \"auto\" is that under ZeRO-3, else uint8."
    )
    freeze: list[Literal["vision", "embeddings", "language"]] = field(
        doc="vlm_finetune: parts kept frozen, any of \"vision\" (the vision tower), \"embeddings\" (input "
        "embeddings), \"language\" (the language model and its head); the projector between them trains.",
        factory=list,
    )


@attrs.frozen(kw_only=True)
class PeftConfig:
    """LoRA through the peft library. Leave the [peft] section out for full fine-tuning."""

    method: Literal["lora"] = field("lora", "The adapter method.")
    rank: int = field(8, "LoRA rank r.")
    alpha: float = field(16.0, "LoRA alpha; updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = field(0.0, "Dropout on the LoRA branch's input.")
    target_modules: list[str] = field(
        doc="Glob patterns over module names (full, e.g. \"model.layers.*.self_attn.q_proj\", or last part, e.g. "
        "\"*_proj\"), or \"all-linear\" for every linear layer except the output head.",
        factory=lambda: ["all-linear"],
    )
    exclude_modules: list[str] = field(doc="Glob patterns of modules to leave out of target_modules.", factory=list)
    use_rslora: bool = field(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = field(False, "Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] = field(
        doc="Modules trained in full alongside the adapters and saved with them (e.g. [\"lm_head\"]).", factory=list
    )


@attrs.frozen(kw_only=True)
class TokenizerConfig:
    """The tokenizer; defaults to the model's own."""

    name_or_path: str = field("", "Hub id or local directory; empty means model.name_or_path.")


@attrs.frozen(kw_only=True)
class DataSourceConfig:
    """One dataset: where it comes from and how its rows become prompt and response."""

    source: str = field(doc="Hub dataset id, or a local file (.json, .jsonl, .csv, .parquet, .txt) or directory.")
    format: Literal["squad", "instruction", "chat", "text", "vlm", "preference", "kto"] = field(
        "squad", "How a row becomes tokens: squad (context, question, answers), instruction (instruction, input, "
        "output), chat (OpenAI messages or ShareGPT conversations, with an optional system column, and tools: a "
        "tools column with assistant tool_calls and tool turns, or ShareGPT's function_call/observation), text (documents, concatenated and chunked), vlm (image + text "
        "conversations: OpenAI content lists, <image> placeholders with an images list, or image/question/answer "
        "columns); llm_dpo: preference (prompt/chosen/rejected as text or messages, ShareGPT conversations + "
        "chosen/rejected turns, or chosen_messages/rejected_messages) or kto (prompt/completion or messages, plus a "
        "boolean label); docs/preference.md."
    )
    split: str = field("train", "Split to read; datasets slicing such as \"train[:90%]\" works.")
    limit: Optional[int] = field(None, "Use only the first `limit` rows (after split); unset means all.")
    columns: dict[str, str] = field(
        doc="Maps the format's fields to your column names, e.g. { output = \"answer\" }.", factory=dict
    )
    weight: Optional[float] = field(
        None, "Training sources: this source's share of the samples drawn, relative to the others' weights (a source "
        "whose share exceeds its size repeats, one below it is subsampled, each epoch afresh); unset on every source "
        "means proportional to size."
    )
    name: str = field(
        "", "What the log calls the source; a validation set's metrics are eval_loss/<name> (needed when there are "
        "several). Empty: the file or dataset name."
    )
    streaming: bool = field(
        False, "Training sources: read the source as training goes (tokenised and packed on the fly, never in full; "
        "memory stays flat in its size), each rank its own share, in order or within data.shuffle_window; needs "
        "train.max_steps; resume is exact. Set on every training source or none."
    )


def _sources(value: Any) -> list:
    """One source, several, or none (None) as a list: `DataConfig(train=DataSourceConfig(...))` reads as in TOML."""
    if value is None:
        return []
    return [value] if isinstance(value, DataSourceConfig) else list(value)


# What data.role_map may map a ShareGPT speaker to ("tool_call": an assistant turn whose value is a function call).
CHAT_ROLES = ("system", "user", "assistant", "tool", "tool_call")


@attrs.frozen(kw_only=True)
class DataConfig:
    """Datasets, tokenisation and sequence length."""

    seq_len: int = field(512, "Maximum tokens per sample (prompt + response + special tokens).")
    truncate: Literal["drop", "right"] = field(
        "drop", "Samples longer than seq_len: \"drop\" them, or cut tokens from the \"right\"; counts are reported."
    )
    prompt_template: Literal["plain", "alpaca"] = field(
        "plain", "Instruction format only: how instruction and input become the prompt."
    )
    chat_template: str = field(
        "", "Chat format: empty uses the tokenizer's own template; \"chatml\" a built-in one; anything else is a "
        "Jinja template (text, not code)."
    )
    role_map: dict[str, str] = field(
        doc="Chat format, ShareGPT turns: maps `from` values to roles (system, user, assistant, tool, or tool_call: an "
        "assistant's function call, its value JSON), over the built-in human/gpt/system/function_call/observation, "
        "e.g. { bot = \"assistant\" }.", factory=dict
    )
    train_on: Literal["assistant", "last_turn", "all"] = field(
        "assistant", "Chat format: which tokens the loss covers: every assistant turn, the last one, or all."
    )
    packing: bool = field(
        False, "Pack several training samples into each seq_len row (per-sample positions, no attention across "
        "samples)."
    )
    on_bad_row: Literal["error", "skip"] = field(
        "error", "A row that does not fit its format: stop with its file, row and field, or skip and count it."
    )
    validation_fraction: float = field(
        0.0, "Without [data.validation]: hold out this fraction of each training source's rows (seeded) as validation; "
        "with several sources, each held-out part is a validation set of its own (eval_loss/<label>)."
    )
    shuffle_window: int = field(
        0, "Streamed sources: read rows in windows of this many (per rank) and train on each window's samples in a "
        "seeded random order, afresh each pass; 0 keeps the file's order. Memory grows with it (tokenised samples of "
        "one window), resume stays exact."
    )
    num_proc: int = field(
        0, "Processes that tokenise a split (rank 0, once: the result is cached); 0 means the cores this process may "
        "use, at most 16. The result is the same for any number."
    )
    cache_dir: str = field(
        "", "Where tokenised datasets are cached; empty means $AUTOMODEL_CACHE or ~/.cache/automodel."
    )
    max_prompt_tokens: int = field(
        0, "preference/kto: keep at most this many prompt tokens, cutting from the left (the prompt's end stays); 0 "
        "keeps the whole prompt. data.seq_len then cuts prompt + completion from the right; a pair whose prompt "
        "alone fills seq_len is dropped. Counts are logged."
    )
    crop_images: bool = field(
        False, "vlm: crop each image to its content (trims uniform margins of scanned or rendered pages)."
    )
    train: list[DataSourceConfig] = field(
        doc="The training data (required): one [data.train] table, or several [[data.train]] tables mixed by their "
        "`weight`.", factory=list, converter=_sources
    )
    validation: list[DataSourceConfig] = field(
        doc="Held-out sets for eval loss and exact match (optional): one [data.validation] table, or several "
        "[[data.validation]] tables, each with a `name`.", factory=list, converter=_sources
    )


@attrs.frozen(kw_only=True)
class OptimConfig:
    """The optimizer: AdamW (32-bit or 8-bit states), Muon, Adafactor or SOAP (docs/optimizers.md)."""

    name: Literal["adamw", "adamw8bit", "muon", "adafactor", "soap"] = field(
        "adamw", "\"adamw\": AdamW with float32 moments; \"adamw8bit\": bitsandbytes' 8-bit AdamW (moments "
        "quantised blockwise to 8 bits: 2 bytes of state per trainable parameter instead of 8; tensors under 4,096 "
        "elements keep float32 moments), on both backends; needs `pip install 'automodel[quant]'`. \"muon\": Muon "
        "(torch.optim.Muon's arithmetic) on the hidden layers' 2-D weights at optim.muon_lr, AdamW at optim.lr on "
        "the embeddings, head, norms and biases. \"adafactor\": torch.optim.Adafactor's (factored second moment, "
        "relative step min(optim.lr, 1/sqrt(t)) times each tensor's RMS). \"soap\": Adam in the eigenbasis of "
        "Shampoo's preconditioner (optim.betas, optim.eps; the authors' algorithm; they use betas [0.95, 0.95]). "
        "muon, adafactor and soap need each weight whole: the functional backend (any number of ranks), or DeepSpeed "
        "at distributed.zero_stage = 0 with model.dtype = \"float32\"."
    )
    muon_lr: float = field(0.02, "muon: peak learning rate of the Muon matrices (the schedule scales it as it "
                                 "scales optim.lr); 0.02 is the value of Muon's authors and torch's docs.")
    muon_momentum: float = field(0.95, "muon: momentum of the Muon matrices (Nesterov).")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = field(
        "original", "muon: \"original\" scales each matrix's rate by sqrt(max(1, rows/cols)) (Keller Jordan's); "
        "\"match_rms_adamw\" by 0.2 * sqrt(max(rows, cols)) (Moonshot's), so that AdamW's lr and weight decay carry "
        "over: then set optim.muon_lr = optim.lr."
    )
    soap_precondition_frequency: int = field(10, "soap: steps between refreshes of the preconditioner's eigenbases.")
    soap_max_precondition_dim: int = field(
        10000, "soap: a weight dimension larger than this (a big vocabulary's) is not rotated; each rotated dimension "
        "of size n keeps 2 n^2 floats of state."
    )
    paged: bool = field(
        False, "adamw8bit on CUDA: page the optimizer states (bitsandbytes' paged memory: evicted to host memory "
        "when the GPU runs short, instead of running out). Ignored on CPU."
    )
    lr: float = field(1e-5, "Peak learning rate.")
    weight_decay: float = field(0.0, "Decoupled weight decay, applied to matrices only (not to biases or norms).")
    betas: tuple[float, float] = field((0.9, 0.999), "Adam betas.")
    eps: float = field(1e-8, "Adam epsilon.")
    clip_grad_norm: float = field(1.0, "Clip gradients to this global L2 norm; 0 turns clipping off.")
    master_dtype: Literal["auto", "float32", "same"] = field(
        "auto", "Functional backend, bfloat16/float16 models: \"float32\" keeps float32 master weights (and "
        "gradients accumulate and all-reduce in float32) while forward and backward run in model.dtype; \"same\" "
        "keeps and updates the weights in model.dtype (small updates round away); \"auto\" is \"float32\" for "
        "low-precision models. DeepSpeed always keeps float32 masters."
    )
    fused: bool = field(
        False, "Functional backend: torch's fused AdamW kernel (faster on GPU; not bit-identical to the foreach "
        "arithmetic). DeepSpeed's AdamW is fused on CUDA regardless."
    )


@attrs.frozen(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then the chosen shape down to min_lr."""

    kind: Literal["constant", "linear", "cosine", "wsd"] = field(
        "cosine", "constant, linear decay, cosine decay, or wsd (warmup-stable-decay)."
    )
    warmup_steps: int = field(0, "Steps of linear warmup from 0 to optim.lr.")
    warmup_ratio: float = field(
        0.0, "Warmup as a share of the run's steps, rounded up (0.03: the first 3%), instead of warmup_steps (which "
        "must then be 0); it scales with the run, so a smoke test with a small train.max_steps keeps its schedule."
    )
    min_lr: float = field(0.0, "Learning rate the decay heads to (linear, cosine, wsd); reached one step after the last.")
    decay_fraction: float = field(0.1, "wsd only: fraction of the steps spent in the final linear decay.")


@attrs.frozen(kw_only=True)
class TrainingConfig:
    """Batching, length of training, evaluation cadence."""

    global_batch_size: int = field(32, "Samples per optimizer step, over all ranks and accumulation steps.")
    micro_batch_size: int = field(4, "Samples per forward/backward on one rank; accumulation = global / (micro * ranks).")
    max_steps: Optional[int] = field(None, "Optimizer steps to run; give this or epochs.")
    epochs: Optional[float] = field(None, "Passes over the training set (may be fractional); give this or max_steps.")
    eval_every: int = field(0, "Evaluate every N steps (and always at the end); 0 means only at the end.")
    log_every: int = field(10, "Log a line and a metrics.jsonl row every N steps.")
    grad_method: Literal["autograd", "grad_and_value"] = field(
        "autograd", "autograd: the module's forward + torch.autograd.grad (module speed); grad_and_value: torch.func "
        "(no recompute: needs loss_chunk_tokens = 0 and no activation checkpointing)."
    )
    activation_checkpointing: bool = field(
        False, "Recompute each decoder layer in the backward instead of keeping its activations (about a third more "
        "compute; the saved activations shrink to one hidden state per layer and token)."
    )
    activation_offloading: bool = field(
        False, "Keep the tensors the backward needs in host memory (pinned on CUDA) and bring each back when the "
        "backward reaches it (torch.autograd.graph.save_on_cpu). With activation_checkpointing only the layers' "
        "inputs are kept, so only they move. Losses and weights are bit-identical to the run without it."
    )
    loss_chunk_tokens: int = field(
        256, "Compute the loss from the final hidden states and the output head this many tokens at a time, each "
        "chunk's logits recomputed in the backward, so the (tokens x vocab) logits never exist at once; 0 computes "
        "whole logits."
    )
    fused_loss: bool = field(
        True, "With loss_chunk_tokens > 0: compute each chunk's gradients in the loss's forward pass instead of "
        "recomputing its logits in the backward (three head matmuls a chunk instead of four; the head weight's "
        "gradient is held until the backward). For a Linear or LoRA-adapted Linear head, with the cross-entropy or "
        "distillation (not the preference losses); elsewhere the start-up line says the recomputing path runs. "
        "false: always recompute."
    )
    compile: bool = field(
        False, "torch.compile each decoder layer (functional backend, grad_method \"autograd\"): the first step "
        "compiles (tens of seconds; once per distinct layer type), later steps run fused kernels. Losses match the "
        "eager run to float tolerance."
    )
    resume: str = field(
        "auto", "\"auto\": continue from the newest complete checkpoint in output_dir that passes its check (files, "
        "digests); \"never\": start afresh; or the path of a checkpoint directory."
    )
    resume_allow_changes: list[str] = field(
        doc="Optimizer and schedule keys (or whole sections, e.g. \"optim\") a resumed run may change from the "
        "checkpoint's config, e.g. [\"optim.lr\"]. Changes to what is being trained are always refused; length, "
        "cadence and memory settings may always change (docs/reliability.md).",
        factory=list,
    )
    on_nonfinite: Literal["stop", "skip"] = field(
        "stop", "A step whose loss or gradient norm is not finite: \"stop\" the run (no checkpoint is written after "
        "it; the newest stays the last good one), or \"skip\" its update and count it (functional backend; "
        "one device sync per step)."
    )
    max_skipped_steps: Optional[int] = field(
        None, "With on_nonfinite = \"skip\": stop as \"stop\" does once more steps than this were skipped in one "
        "process (a run that skips most of its steps is not training); unset: 5% of the run's steps, at least 1."
    )
    early_stopping_patience: int = field(
        0, "End the run after this many evaluations in a row without an improvement of train.best_metric of at "
        "least early_stopping_min_delta (checkpointed; summary.json says why); 0 turns it off. Needs validation data "
        "and train.eval_every."
    )
    early_stopping_min_delta: float = field(
        0.0, "The smallest improvement on the best so far (of train.best_metric) that counts."
    )
    best_metric: Literal["eval_loss", "eval_rewards/accuracies"] = field(
        "eval_loss", "What early stopping and checkpoint.keep_best follow: eval_loss (lower is better), or with "
        "recipe = \"llm_dpo\" and a paired loss the held-out reward accuracy (higher is better)."
    )


@attrs.frozen(kw_only=True)
class EvalConfig:
    """Held-out evaluation."""

    micro_batch_size: int = field(0, "Samples per eval forward; 0 means train.micro_batch_size.")
    max_batches: int = field(0, "Evaluate loss on at most this many micro-batches; 0 means the whole validation set.")
    generate_samples: int = field(
        0, "Greedy-decode this many validation prompts and report exact match of the answer; 0 turns it off."
    )
    max_new_tokens: int = field(32, "Token budget per generated answer.")
    at_start: bool = field(False, "Also evaluate before the first step, to show where training started.")


@attrs.frozen(kw_only=True)
class DistributedConfig:
    """How the step runs across ranks."""

    backend: Literal["functional", "deepspeed"] = field(
        "functional", "functional: our step (training/step.py), in-place AdamW, explicit all-reduce; deepspeed: a "
        "DeepSpeed engine."
    )
    zero_stage: Literal[0, 1, 2, 3] = field(
        3, "DeepSpeed ZeRO stage: 0 = plain data parallel, 1 = shard optimizer state, 2 = + gradients, 3 = + weights."
    )
    bucket_mb: float = field(
        25.0, "Functional backend, several ranks: gradients all-reduce in float32 buckets of this many MB, each launched "
        "from the backward as soon as its gradients exist (overlapping communication with compute); 0 sends one flat "
        "all-reduce after the backward."
    )
    offload_optimizer: Literal["none", "cpu"] = field(
        "none", "DeepSpeed: keep optimizer state (and the update) in CPU memory; stages 1-3."
    )
    offload_params: Literal["none", "cpu"] = field("none", "DeepSpeed: keep partitioned weights in CPU memory; stage 3.")
    deepspeed_overrides: dict[str, Any] = field(
        doc="Merged into the generated DeepSpeed JSON (see `automodel config deepspeed`); top-level keys are "
        "checked, batch-size keys are refused (they come from [train]).",
        factory=dict,
    )


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    """Resumable checkpoints and the final model."""

    every: int = field(0, "Save a resumable checkpoint every N steps; 0 means only at the end of the run.")
    keep_last: int = field(2, "How many complete checkpoints to keep (older ones are deleted).")
    save_final: bool = field(
        True, "Write the trained model (safetensors + config + tokenizer), or with [peft] the adapter, to "
        "<output_dir>/final."
    )
    export_merged: bool = field(
        False, "With [peft]: also write the base model with the adapter merged in to <output_dir>/final_merged "
        "(the adapter is then written to final/ as well)."
    )
    keep_best: bool = field(
        False, "Checkpoint at each evaluation that improves train.best_metric (eval_loss) and keep that checkpoint "
        "besides the keep_last newest; final/ (and final_merged/) is then the best-eval model, and summary.json names its step."
    )


@attrs.frozen(kw_only=True)
class LoggingConfig:
    """Console, progress bar, metrics.jsonl, experiment trackers, loss plots and profiles (rank 0 writes)."""

    progress_bar: Literal["auto", "on", "off"] = field("auto", "tqdm bar: auto shows it only on a terminal.")
    peak_tflops: float = field(
        0.0, "Accelerator peak TFLOP/s for MFU; 0 uses a built-in table of known GPUs (no MFU on CPU)."
    )
    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        doc="Experiment trackers that get the same scalars as metrics.jsonl (always written) and the resolved config: "
        "\"tensorboard\" (<output_dir>/tensorboard), \"wandb\", \"mlflow\"; each is an extra, e.g. "
        "`pip install 'automodel[wandb]'` (docs/tracking.md).",
        factory=list,
    )
    run_name: str = field("", "The run's name in the trackers; empty means the name of output_dir.")
    wandb_project: str = field("automodel", "W&B project.")
    wandb_mode: Literal["", "online", "offline"] = field(
        "", "W&B mode; empty leaves it to W&B (WANDB_MODE, else online). \"offline\" writes <output_dir>/wandb only "
        "(upload later with `wandb sync`)."
    )
    mlflow_tracking_uri: str = field(
        "", "MLflow tracking URI; empty means MLFLOW_TRACKING_URI, else a SQLite store at <output_dir>/mlflow.db."
    )
    mlflow_experiment: str = field("automodel", "MLflow experiment name.")
    plot: bool = field(
        True, "Draw <output_dir>/plots/loss.png (train and eval loss, lr) at each evaluation and at the end."
    )
    profile_steps: list[int] = field(
        doc="[first, last]: a torch.profiler trace of these steps in <output_dir>/profile/ (TensorBoard or "
        "Perfetto); empty profiles nothing.",
        factory=list,
    )
    verbose: bool = field(
        False, "Show third-party progress bars and warnings on the console; by default they go to "
        "<output_dir>/logs/debug.log."
    )


@attrs.frozen(kw_only=True)
class SlurmConfig:
    """The sbatch script `automodel launch --slurm` writes (one task per GPU, started by srun)."""

    job_name: str = field("", "#SBATCH --job-name; empty means the name of output_dir.")
    partition: str = field("", "#SBATCH --partition; empty leaves it to the cluster's default.")
    account: str = field("", "#SBATCH --account; empty leaves it out.")
    qos: str = field("", "#SBATCH --qos; empty leaves it out.")
    time: str = field("04:00:00", "#SBATCH --time: the wall-clock limit of one job (or of each requeued start).")
    cpus_per_task: int = field(
        0, "#SBATCH --cpus-per-task: CPU cores per rank (data loading, tokenisation). 0: the partition's CPUs per node "
        "shared among the node's ranks (asked of sinfo), or 8 where sinfo does not answer.")
    mem: str = field("", "#SBATCH --mem per node, e.g. \"200G\" (\"0\": all of it); empty leaves it out.")
    exclusive: bool = field(False, "#SBATCH --exclusive: nodes are not shared with other jobs.")
    signal_seconds: int = field(
        300, "Slurm sends SIGUSR1 this many seconds before the time limit (--signal=USR1@N): the run checkpoints "
        "at the next step and is requeued. 0 leaves the signal out."
    )
    requeue: bool = field(True, "#SBATCH --requeue: a preempted or signalled job goes back in the queue and resumes.")
    max_requeues: int = field(20, "Stop requeueing after this many restarts (SLURM_RESTART_COUNT), to bound a loop.")
    python: str = field(
        "", "Interpreter the tasks run; empty means the one running `automodel launch` (with a container image: "
        "\"python\")."
    )
    container_image: str = field("", "pyxis: srun --container-image (e.g. \"nvcr.io#nvidia/pytorch:25.01-py3\").")
    container_mounts: list[str] = field(
        doc="pyxis: srun --container-mounts entries, \"SRC:DST\"; the submit directory is mounted at the same path.",
        factory=list,
    )
    setup: list[str] = field(
        doc="Shell lines run before training, e.g. [\"module load cuda/12.4\", \"source .venv/bin/activate\"].",
        factory=list,
    )
    sbatch: list[str] = field(
        doc="Extra sbatch options, one per line without \"#SBATCH\", e.g. [\"--constraint=h100\", \"--mail-type=END\"].",
        factory=list,
    )
    env: dict[str, str] = field(doc="Environment variables exported before training, e.g. {NCCL_DEBUG = \"WARN\"}.",
                                factory=dict)


@attrs.frozen(kw_only=True)
class K8sConfig:
    """The manifests `automodel launch --k8s` writes: an Indexed Job (one pod per node) and a headless Service for the
    rendezvous, a ConfigMap with the frozen config, and a PersistentVolumeClaim for output_dir (docs/k8s.md)."""

    image: str = field("", "Container image with automodel installed (required for --k8s), e.g. "
                           "\"registry.example.com/automodel:0.1\"; docs/k8s.md has a Dockerfile.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = field("IfNotPresent", "The container's "
                                                                          "imagePullPolicy.")
    image_pull_secrets: list[str] = field(doc="Names of Secrets holding registry credentials (imagePullSecrets).",
                                          factory=list)
    name: str = field("", "Name of the Job (and Service, ConfigMap, claim); empty means output_dir's name. Made a "
                          "valid DNS-1123 label; a sweep's tasks append their overrides.")
    namespace: str = field("", "metadata.namespace of every object; empty leaves it to kubectl's current namespace.")
    workdir: str = field("/workspace", "The container's working directory: relative paths in the config "
                                       "(output_dir, data files) are relative to it.")
    python: str = field("python", "The interpreter in the image that runs `-m automodel node`.")
    port: int = field(29500, "Rendezvous port on the first pod (MASTER_PORT).")
    cpu: str = field("", "CPU request and limit of each pod (one per node), e.g. \"32\"; empty sets none.")
    memory: str = field("", "Memory request and limit of each pod, e.g. \"200Gi\"; empty sets none.")
    gpu_resource: str = field("nvidia.com/gpu", "The extended resource each pod asks gpus_per_node of.")
    shm_size: str = field("16Gi", "Size of the memory-backed /dev/shm (data workers, NCCL); empty keeps the "
                                  "container runtime's 64 MB.")
    volume_claim: str = field("", "An existing PersistentVolumeClaim to mount at output_dir; empty creates "
                                  "<name>-output (volume_size, storage_class, volume_access_mode).")
    volume_size: str = field("100Gi", "Storage request of the claim that is created.")
    storage_class: str = field("", "storageClassName of the claim that is created; empty means the cluster's default.")
    volume_access_mode: Literal["ReadWriteMany", "ReadWriteOnce"] = field(
        "ReadWriteMany", "Access mode of the claim that is created; several nodes need ReadWriteMany (checkpoints are "
        "written by every rank and read back by all).")
    hf_home: str = field("", "HF_HOME in the pods; empty means <output_dir>/.cache/huggingface, on the volume, so "
                             "restarted pods do not download the model again.")
    env: dict[str, str] = field(doc="Environment variables set in the container, e.g. {NCCL_DEBUG = \"WARN\"}.",
                                factory=dict)
    secret_env: dict[str, str] = field(
        doc="Environment variables read from Secrets, NAME = \"secret-name/key\", e.g. {HF_TOKEN = "
        "\"hf-token/token\"}; the value never appears in the manifests.", factory=dict)
    node_selector: dict[str, str] = field(doc="The pods' nodeSelector, e.g. {\"nvidia.com/gpu.product\" = "
                                              "\"NVIDIA-H100-80GB-HBM3\"}.", factory=dict)
    tolerations: list[str] = field(doc="Taints the pods tolerate, in kubectl's taint syntax KEY[=VALUE]:EFFECT, e.g. "
                                       "[\"nvidia.com/gpu:NoSchedule\"].", factory=list)
    service_account: str = field("", "The pods' serviceAccountName; empty means the namespace's default.")
    priority_class: str = field("", "The pods' priorityClassName (what a scheduler may preempt for); empty: none.")
    termination_grace_seconds: int = field(
        300, "terminationGracePeriodSeconds: after SIGTERM (eviction, preemption) the ranks stop at the next step and "
        "checkpoint; Kubernetes kills the pod after this many seconds (its default, 30, is short for a large model).")
    backoff_limit: int = field(
        2, "Failures (not preemptions: exit 75 and evictions are not counted) retried before the Job fails; the "
        "Job's backoffLimit is this times the nodes, since one failure ends every node's pod.")
    ttl_seconds_after_finished: int = field(
        604800, "ttlSecondsAfterFinished: a finished Job and its pods are deleted after this long (7 days); 0 keeps "
        "them. The claim and its files are kept either way.")


@attrs.frozen(kw_only=True)
class LaunchConfig:
    """Defaults for `automodel launch`; its flags override them."""

    nodes: int = field(1, "Nodes to run on (--nodes).")
    gpus_per_node: int = field(8, "GPUs per node, one rank each (--gpus-per-node); 0 runs on CPU with gloo.")
    nproc_per_node: int = field(0, "Ranks per node (--nproc-per-node); 0 means gpus_per_node, or 1 on CPU.")
    slurm: SlurmConfig = field(factory=SlurmConfig, doc="")
    k8s: K8sConfig = field(factory=K8sConfig, doc="")


@attrs.frozen(kw_only=True)
class DistillConfig:
    """recipe = "llm_kd": knowledge distillation from a frozen teacher that shares the student's tokenizer."""

    teacher: str = field(doc="The teacher: a hub id or local directory of any AutoModelForCausalLM with the student's "
                             "vocabulary (e.g. a fine-tuned run's final/).")
    alpha: float = field(0.5, "Weight of the distillation term: loss = (1 - alpha) CE + alpha T^2 KL(teacher || "
                              "student), both over the trained tokens; 0 is plain fine-tuning.")
    temperature: float = field(2.0, "Softmax temperature T of both distributions in the KL term.")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", "Dtype the teacher runs in (no gradients); \"auto\" is model.dtype.")


@attrs.frozen(kw_only=True)
class PreferenceConfig:
    """recipe = "llm_dpo": preference tuning on chosen/rejected pairs (or KTO's labelled completions); the names,
    definitions and defaults are TRL's (DPOTrainer, KTOTrainer, ORPO/CPO), docs/preference.md."""

    loss: Literal["sigmoid", "ipo", "robust", "simpo", "orpo", "kto"] = field(
        "sigmoid", "sigmoid: DPO; ipo: IPO (length-averaged log-ratios); robust: DPO with label_smoothing as the "
        "chance a label is flipped (rDPO); simpo and orpo: reference-free (SimPO; ORPO's odds ratio added to the chosen "
        "completion's NLL); kto: KTO on unpaired completions (format = \"kto\")."
    )
    beta: float = field(0.1, "beta: how far the policy may move from the reference (DPO, robust, KTO), IPO's tau, "
                             "SimPO's reward scale (its paper uses 2.0-2.5); ORPO's weight is orpo_lambda.")
    label_smoothing: float = field(0.0, "robust: the probability that a pair's preference is flipped, in [0, 0.5); "
                                          "simpo: the conservative smoothing of TRL's CPO.")
    simpo_gamma: float = field(0.5, "simpo: the target reward margin gamma (gamma / beta is subtracted from the "
                                    "length-averaged log-ratio).")
    orpo_lambda: float = field(0.1, "orpo: the odds-ratio term's weight (TRL's ORPOConfig.beta).")
    kto_desirable_weight: float = field(1.0, "kto: the weight of desirable completions' losses.")
    kto_undesirable_weight: float = field(1.0, "kto: the weight of undesirable completions' losses.")
    sft_weight: float = field(0.0, "Adds sft_weight x the chosen completions' mean token NLL (RPO; TRL's "
                                   "loss_type [\"sigmoid\", \"sft\"] with loss_weights [1, sft_weight]; CPO's "
                                   "cpo_alpha with simpo); 0 leaves it out. Not for orpo (its NLL is always in) or kto.")
    reference: str = field(
        "", "The reference model: empty is the initial policy (a frozen copy; with [peft] the base with the adapter "
        "switched off, no second copy); or a hub id or local directory with the policy's vocabulary. Not used by simpo "
        "and orpo."
    )
    reference_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", "Dtype the reference runs in (no gradients); \"auto\" is model.dtype.")
    precompute_reference: bool = field(
        False, "Compute every pair's reference log-probs in one pass before training, store them in "
        "<output_dir>/reference/ and free the reference model; a resumed run reuses them."
    )


@attrs.frozen(kw_only=True)
class TrainConfig:
    """A whole fine-tuning run."""

    recipe: Literal["llm_finetune", "vlm_finetune", "llm_kd", "llm_dpo"] = field(
        "llm_finetune", "Which recipe runs the config: text LLMs, image-text-to-text models (docs/vlm.md), "
        "knowledge distillation of a text LLM from a teacher (docs/distill.md), or preference tuning (DPO and its "
        "family, docs/preference.md)."
    )
    seed: int = field(42, "Seeds model init, data order and dropout.")
    output_dir: str = field("runs/default", "Where config.toml, metrics.jsonl and final/ are written.")
    model: ModelConfig = field(factory=ModelConfig, doc="")
    peft: Optional[PeftConfig] = field(None, "LoRA; absent means full fine-tuning.")
    distill: Optional[DistillConfig] = field(None, "recipe = \"llm_kd\": the teacher and the loss's mix.")
    preference: Optional[PreferenceConfig] = field(None, "recipe = \"llm_dpo\": the preference loss and its "
                                                         "reference model.")
    tokenizer: TokenizerConfig = field(factory=TokenizerConfig, doc="")
    data: DataConfig = field(factory=DataConfig, doc="")
    optim: OptimConfig = field(factory=OptimConfig, doc="")
    schedule: ScheduleConfig = field(factory=ScheduleConfig, doc="")
    train: TrainingConfig = field(factory=TrainingConfig, doc="")
    eval: EvalConfig = field(factory=EvalConfig, doc="")
    distributed: DistributedConfig = field(factory=DistributedConfig, doc="")
    checkpoint: CheckpointConfig = field(factory=CheckpointConfig, doc="")
    logging: LoggingConfig = field(factory=LoggingConfig, doc="")
    launch: LaunchConfig = field(factory=LaunchConfig, doc="")
