"""What every recipe does, written once, in the order it happens (`run`, in four phases):

    set_up:  the recipe's parts (model, data, evaluation) -> the training data (batch plan or stream) -> the backend
             and resume (the newest checkpoint that passes its check) -> config.toml
    announce: the start-up lines (loggers/startup.py)
    train:   the evaluation at start -> the loop (checkpoints, evaluations, preemption) -> the final checkpoint
    finish:  the final evaluation -> the best checkpoint's weights -> the export -> the model card -> summary.json

A recipe is a function from a `Setup` (what is set up before it) to its `Parts` (what differs: the model and the
tokenizer or processor saved with it, how training samples become batches, the validation batches, exact match,
an optional teacher); `run(cfg, parts_of)` does the rest.
"""

import contextlib
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import attrs
import torch
from torch import nn

from automodel import checkpoint, data, distributed, models, optim
from automodel.loggers import quiet, trackers
from automodel import peft as peft_lora
from automodel.backends import Backend, build_backend, model_init_context
from automodel.backends.deepspeed_config import deepspeed_config
from automodel.config import (BatchShape, ConfigError, ModelConfig, PeftConfig, TrainConfig, read_toml, save_config,
                             to_dict, to_toml)
from automodel.loggers import RunLogger
from automodel.loggers.startup import StartupFacts, startup_lines
from automodel.loggers.plot import lr_curve
from automodel.training.teacher import Teacher
from automodel.training.early_stopping import EvalWatch
from automodel.training.evaluate import eval_loss
from automodel.training.forward import Batch, Objective, to_device
from automodel.training.loop import Loop, NonFiniteLoss, TrainResult, run_loop
from automodel.training.batches import TrainingData, training_data
from automodel.training.preemption import Preempted, StopRequest
from automodel.training.profile import StepProfiler
from automodel.training.state import TrainState
from automodel.training.throughput import Throughput, peak_flops

# (model in eval mode with the state's weights, generate() keyword arguments) -> (exact match, [(prediction, ref)])
ExactMatch = Callable[[nn.Module, dict], tuple[float, list[tuple[str, str]]]]


@attrs.frozen
class Setup:
    """What is set up before a recipe builds its parts."""

    cfg: TrainConfig
    ranks: distributed.RankInfo
    device: torch.device
    out: Path
    ds_config: Optional[dict]  # the DeepSpeed JSON; None on the functional backend

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    def build_model(self, build: Callable[[], nn.Module], pretrained: Optional[bool] = None,
                    trained: bool = True) -> nn.Module:
        """`build()` where the backend needs it (under ZeRO-3 a pretrained model loads already partitioned); a model
        to be `trained` gets activation checkpointing when the config asks (before LoRA and before any engine)."""
        pretrained = self.cfg.model.init == "pretrained" if pretrained is None else pretrained
        with model_init_context(self.cfg.distributed.backend, self.ds_config, pretrained=pretrained):
            model = build()
        if trained and self.cfg.train.activation_checkpointing:
            models.enable_activation_checkpointing(model)
        return model

    @property
    def zero3(self) -> bool:
        return self.ds_config is not None and self.ds_config["zero_optimization"]["stage"] == 3

    def build_causal_lm(self, model_cfg: ModelConfig, tokenizer: Any, trained: bool = True) -> nn.Module:
        """models.build_model through build_model. A quantised base built from config keeps its full-precision
        weights in <output_dir>/base (rank 0; the adapter's base, what merges use), never the rounded 4-bit ones."""
        base_dir = self.out / "base" if trained and self.is_main and model_cfg.init == "random" else None
        return self.build_model(lambda: models.build_model(model_cfg, tokenizer, self.cfg.seed, base_dir, self.zero3),
                                pretrained=model_cfg.init == "pretrained", trained=trained)

    def apply_lora(self, model: nn.Module, processing_class: Any,
                   exclude: Iterable[str] = ()) -> tuple[nn.Module, str]:
        """(the model with [peft]'s adapters, or itself without [peft]; the base an adapter names). A base built from
        config is saved to <output_dir>/base first, so the adapter has a base to load onto (a quantised one is there
        already, in full precision: only the tokenizer is added)."""
        cfg = self.cfg
        # Absolute for a local directory: the adapter (and the model card's code) must load from any working
        # directory; a hub id stays as it is.
        base = Path(cfg.model.name_or_path) if cfg.model.init == "pretrained" else self.out / "base"
        base_path = str(base.absolute()) if cfg.model.init == "random" or base.is_dir() else cfg.model.name_or_path
        peft_cfg: Optional[PeftConfig] = cfg.peft
        if peft_cfg is not None and cfg.model.init == "random" and self.is_main:
            if cfg.model.quantization != "none":
                processing_class.save_pretrained(self.out / "base")
            else:
                models.save_hf_model(model, processing_class, self.out / "base")
        if peft_cfg is not None and exclude:
            peft_cfg = attrs.evolve(peft_cfg, exclude_modules=[*peft_cfg.exclude_modules, *exclude])
        return peft_lora.apply(model, peft_cfg, cfg.seed, base_path), base_path


@attrs.frozen
class Parts:
    """What a recipe contributes."""

    model: nn.Module
    processing_class: Any  # the tokenizer (a VLM: the processor) saved beside the model, and the eval's decoder
    base_path: str  # what a LoRA adapter names as its base, and what `checkpoint.export_merged` merges onto
    num_train: int  # samples in the training order (0: streamed)
    collate: Optional[Callable[[list[int]], Batch]]  # training sample indices -> a host batch (None: streamed)
    # The validation sets by name ("" for a lone unnamed one; empty: no validation), each with its host batches and,
    # where asked for, greedy answers against references.
    validation: dict[str, "ValidationSet"]
    data_lines: list[str]  # what the log says about the data
    model_note: str = ""  # said after the parameter counts (e.g. what is frozen)
    flops: Optional[models.FlopModel] = None  # training FLOPs of a batch, for MFU
    mixture: Optional[data.Mixture] = None  # weighted draws over several training sources (None: each row once)
    # Streamed training data: the rank's stream opened at a checkpoint's position (None: from the start); its
    # next_step() gives a step's host micro-batches and the position after them.
    stream: Optional[Callable[[Optional[dict]], Any]] = None
    teacher: Optional[Teacher] = None
    objective: Optional[Objective] = None  # a loss of the recipe's own (preference); None: the cross-entropy
    unit: str = "samples"  # what a sample is, for the log (e.g. "pairs")


def optimizer_line(cfg: TrainConfig, state: TrainState, trainable: int, device: torch.device) -> str:
    """What updates the weights, and (where the state holds it) how many bytes of state per trainable parameter."""
    o = cfg.optim
    kind = {"adamw": "AdamW, float32 states", "adamw8bit": "AdamW, 8-bit states (bitsandbytes)",
            "muon": f"Muon on the hidden matrices (lr {o.muon_lr:g}), AdamW on the rest (lr {o.lr:g})",
            "adafactor": "Adafactor, factored second moment",
            "soap": f"SOAP, eigenbases refreshed every {o.soap_precondition_frequency} steps"}[o.name]
    if cfg.optim.name == "adamw8bit" and cfg.optim.paged:
        kind += ", paged" if device.type == "cuda" else " (optim.paged ignored: no paged memory off CUDA)"
    if state.opt_state is None:  # DeepSpeed's engine holds it
        return f"optimizer: {kind}"
    size = optim.state_bytes(state.opt_state)
    return f"optimizer: {kind}; {size / 2**20:,.2f} MiB of state, {size / max(trainable, 1):.2f} bytes per trainable " \
           "parameter"


@attrs.frozen
class ValidationSet:
    batches: Callable[[], Iterable[Batch]]
    exact_match: Optional[ExactMatch] = None


def run(cfg: TrainConfig, parts_of: Callable[[Setup], Parts]) -> TrainResult:
    started = time.perf_counter()
    ranks = distributed.rank_info()
    device = distributed.device_for(ranks)
    all_reduce = distributed.setup(ranks, device, group_on_one_rank=cfg.distributed.backend == "deepspeed")
    out = Path(cfg.output_dir)
    # From here to the export, SIGUSR1/SIGTERM (a cluster's time limit or preemption) only set a flag: before the
    # first step the run exits with status 75 (requeue: nothing new to save); during training it checkpoints at the
    # next step boundary and exits 75; after the last step it finishes its work. The run directory is locked.
    with StopRequest() as stop, run_directory(out, ranks.rank), contextlib.ExitStack() as context:
        debug_log = quiet_libraries(cfg, out, ranks.rank, context)
        job = set_up(cfg, parts_of, ranks, device, all_reduce, out)
        logger = open_logger(job)
        announce(job, logger, debug_log, stop)
        evaluations = Evaluations(job)
        state, last_row, watch = train(job, logger, stop, evaluations)
        return finish(job, logger, state, last_row, watch, evaluations, started)


@attrs.frozen
class Job:
    """Everything set up before the first step: the recipe's parts, the data, the backend, and the state to start
    from (resumed or new)."""

    cfg: TrainConfig
    setup: Setup
    parts: Parts
    data: TrainingData
    backend: Backend
    state: TrainState
    meta: dict  # what a checkpoint records of this run (checkpoint.save / restore)
    resumed_from: Optional[Path]
    changes: list[str]  # config changes accepted on resume
    watch: EvalWatch  # the evaluation record, continued from the checkpoint's
    continues: bool  # metrics and trackers continue those of the run that was here
    attention: tuple[str, str]  # the kernel and why
    compiled_layers: int
    quantized: str


def quiet_libraries(cfg: TrainConfig, out: Path, rank: int, context: contextlib.ExitStack) -> Optional[Path]:
    """Libraries' messages and progress bars go to logs/debug.log (returned) unless logging.verbose; a tracker's
    missing package fails here."""
    trackers.check_installed(cfg.logging.backends)
    if cfg.logging.verbose:
        return None
    return context.enter_context(quiet.libraries_to_file(
        out, rank, preload=[trackers.EXTRAS[b][0] for b in cfg.logging.backends]))


def set_up(cfg: TrainConfig, parts_of: Callable[[Setup], Parts], ranks: distributed.RankInfo, device: torch.device,
           all_reduce: Any, out: Path) -> Job:
    """The recipe's parts, the training data, the backend (weights, optimizer state, the step) and the state: the
    newest checkpoint that passes its check, refusing config changes to what is being trained."""
    # "auto" attention becomes the kernel this machine runs: the recipe builds with it, the log names it, and the
    # saved config keeps "auto" (a resume elsewhere picks that machine's kernel).
    attention = models.pick_attention(cfg.model.attn_implementation, device, cfg.model.dtype, cfg.data.packing)
    build_cfg = attrs.evolve(cfg, model=attrs.evolve(cfg.model, attn_implementation=attention[0]))
    use_deepspeed = cfg.distributed.backend == "deepspeed"
    setup = Setup(build_cfg, ranks, device, out, deepspeed_config(cfg, ranks.world_size) if use_deepspeed else None)
    models.check_model(cfg.model, cfg.recipe)  # seconds, before the data is tokenised
    parts = parts_of(setup)
    shape = BatchShape.of(cfg.train, ranks.world_size)
    train_data = training_data(cfg, shape, ranks.rank, parts.num_train, parts.collate, parts.mixture, parts.stream,
                               parts.unit)
    compiled = models.compile_layers(parts.model) if cfg.train.compile else 0
    quantized = models.quantize.describe(parts.model, cfg.model) if cfg.model.quantization != "none" else ""
    backend = build_backend(cfg, parts.model, setup.ds_config, train_data.max_steps, device, all_reduce, ranks.rank,
                            ranks.world_size, teacher=parts.teacher, objective=parts.objective)
    state, meta, resumed_from, changes, saved = resume(cfg, backend, out, ranks.rank, ranks.world_size, device)
    watch = EvalWatch(cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta,
                      metric=cfg.train.best_metric).resumed(saved.get("evals"))
    # Metrics and tracker runs continue those of the run that was here: a resumed one, or one killed before its
    # first checkpoint with the same config (a changed config, or train.resume = "never", is a new run).
    continues = state.step > 0 or (cfg.train.resume != "never" and same_config(out / "config.toml", cfg))
    if setup.is_main:  # the resolved config, and one per segment of the run (configs/step_N.toml)
        save_config(cfg, out / "config.toml")
        (out / "configs").mkdir(exist_ok=True)
        save_config(cfg, out / "configs" / f"step_{state.step:06d}.toml",
                    comment=f"from step {state.step} on {ranks.world_size} rank(s)"
                            + (f"; changed on resume: {'; '.join(changes)}" if changes else ""))
    return Job(cfg, setup, parts, train_data, backend, state, meta, resumed_from, changes, watch, continues,
               attention, compiled, quantized)


def open_logger(job: Job) -> RunLogger:
    cfg, out, max_steps = job.cfg, job.setup.out, job.data.max_steps
    return RunLogger(out, max_steps, cfg.logging.progress_bar, enabled=job.setup.is_main, start_step=job.state.step,
                     continues=job.continues, plot=cfg.logging.plot,
                     trackers=trackers.open_trackers(cfg.logging, out, to_dict(cfg), to_toml(cfg), job.continues,
                                                     job.state.step) if job.setup.is_main else (),
                     lr=lr_curve(lambda s: optim.lr_at(s, cfg.schedule, cfg.optim.lr, max_steps), max_steps))


def announce(job: Job, logger: RunLogger, debug_log: Optional[Path], stop: StopRequest) -> None:
    """The start-up lines; a signal that arrived during the set-up ends the run here (exit 75, nothing to save)."""
    for line in startup_lines(startup_facts(job, debug_log)):
        logger.info(line)
    if stop.agreed():
        early = Preempted(job.state.step, stop.received or "a signal on another rank", saved=False)
        logger.info(str(early))
        logger.close()
        raise early


def startup_facts(job: Job, debug_log: Optional[Path]) -> StartupFacts:
    cfg, parts, backend, state, device = job.cfg, job.parts, job.backend, job.state, job.setup.device
    return StartupFacts(
        model_class=type(parts.model).__name__, parameters=models.count_params(parts.model),
        trainable=backend.trainable_params, model_note=parts.model_note, dtype=cfg.model.dtype, device=str(device),
        world_size=job.setup.ranks.world_size, backend=backend.name, quantized=job.quantized,
        data_lines=parts.data_lines, training_line=job.data.line,
        activation_checkpointing=cfg.train.activation_checkpointing,
        activation_offloading=cfg.train.activation_offloading, loss=backend.loss_description,
        optimizer=optimizer_line(cfg, state, backend.trainable_params, device), attention=job.attention[0],
        attention_why=job.attention[1], compiled_layers=job.compiled_layers, resumed_from=job.resumed_from,
        step=state.step, changes=job.changes,
        stream_line=job.data.resumed_line(state.stream, cfg) if job.resumed_from is not None else None,
        debug_log=debug_log)


class Evaluations:
    """This process's evaluations of the validation sets (the first, when asked for at step 0, among them)."""

    def __init__(self, job: Job):
        self.job = job
        self.done: list[dict] = []
        self.first: Optional[dict] = None

    @property
    def on(self) -> bool:
        return bool(self.job.parts.validation)

    def __call__(self, state: TrainState) -> dict:
        job = self.job
        self.done.append(evaluation(job.backend, state, job.parts, job.cfg.eval.generate_samples > 0,
                                    job.setup.device))
        return self.done[-1]


def train(job: Job, logger: RunLogger, stop: StopRequest, evaluate: Evaluations) -> tuple[TrainState, dict, EvalWatch]:
    """The evaluation at start (when asked for), then the loop to the final checkpoint."""
    cfg, ranks, state = job.cfg, job.setup.ranks, job.state
    if evaluate.on and cfg.eval.at_start and state.step == 0:
        evaluate.first = evaluate(state)
        logger.row(evaluate.first)
    first, last = cfg.logging.profile_steps or (0, 0)
    max_skipped = None  # on_nonfinite = "skip": at most this many skipped steps (unset: 5% of the run, at least 1)
    if cfg.train.on_nonfinite == "skip":
        max_skipped = cfg.train.max_skipped_steps
        if max_skipped is None:
            max_skipped = max(1, math.ceil(0.05 * job.data.max_steps))
    loop = Loop(
        train_step=job.backend.step, batches=job.data.open(state.stream), max_steps=job.data.max_steps, logger=logger,
        throughput=Throughput(ranks.world_size, job.parts.flops, peak_flops(job.setup.device,
                                                                            cfg.logging.peak_tflops)),
        device=job.setup.device, log_every=cfg.train.log_every, epoch_samples=job.data.epoch_samples,
        eval_every=cfg.train.eval_every, evaluate=evaluate if evaluate.on else None,
        checkpoint_every=cfg.checkpoint.every, save_checkpoint=functools.partial(save_checkpoint, job, logger),
        stop=stop, keep_best=cfg.checkpoint.keep_best,
        profiler=StepProfiler(first, last, job.setup.out / "profile", ranks.rank, logger.info) if first else None,
        max_skipped=max_skipped, progress=job.data.progress)
    try:
        return run_loop(state, loop, job.watch)  # ends with the final checkpoint
    except (Preempted, NonFiniteLoss) as e:
        logger.info(str(e))
        logger.close()
        raise


def save_checkpoint(job: Job, logger: RunLogger, state: TrainState, watch: EvalWatch) -> None:
    cfg, ranks = job.cfg, job.setup.ranks
    path = checkpoint.save(job.backend.save, state, job.setup.out, ranks.rank, ranks.world_size,
                           cfg.checkpoint.keep_last, job.meta, job.backend.tensor_table(state), to_dict(cfg),
                           extra={"evals": watch.to_json()}, keep=watch.best_step if cfg.checkpoint.keep_best else None)
    logger.info(f"checkpoint: {path}")


def finish(job: Job, logger: RunLogger, state: TrainState, last_row: dict, watch: EvalWatch,
           evaluate: Evaluations, started: float) -> TrainResult:
    """The final evaluation, the best checkpoint's weights where kept, the export (and merge), the model card and
    summary.json."""
    cfg, parts, backend, out, device = job.cfg, job.parts, job.backend, job.setup.out, job.setup.device
    metrics = {"steps": state.step, "train_loss": last_row.get("loss"), "train_samples": state.data_position,
               "padding_fraction": last_row.get("run_padding")}
    if watch.should_stop:
        metrics["stopped_early"] = watch.reason()
        logger.info(watch.reason())
    export_state = state
    if evaluate.on:
        if evaluate.done and evaluate.done[-1]["step"] == state.step:  # evaluated at this step already (early stop)
            final_eval = evaluate.done[-1]
        else:
            final_eval = evaluate(state)
            logger.row(final_eval)
            if not watch.should_stop:
                watch = watch.observe_row(final_eval)
        reported = ("eval_loss", "exact_match", "eval_rewards/accuracies")
        metrics.update({k: final_eval[k] for k in reported if k in final_eval})
        metrics.update({f"{k}_at_start": evaluate.first[k] for k in reported
                        if evaluate.first is not None and k in evaluate.first})
        if cfg.checkpoint.keep_best and watch.best_step is not None:
            export_state = best_state(cfg, backend, state, watch, out, job.meta, metrics, evaluate.done,
                                      job.setup.ranks.rank, device)
            logger.info(f"best evaluation: step {watch.best_step}, {watch.metric} {watch.best_value:.4f}; it is "
                        "what final/ holds")

    # Every rank exports (under ZeRO-3 it gathers); with [peft] final/ is the adapter, which the merge needs.
    final_dir = out / "final" if cfg.checkpoint.save_final or cfg.checkpoint.export_merged else None
    if final_dir is not None:
        backend.export(export_state, parts.processing_class, final_dir)
    if cfg.checkpoint.export_merged and job.setup.is_main:
        peft_lora.merge(parts.base_path, str(final_dir), str(out / "final_merged"), models.DTYPES[cfg.model.dtype])
        how = (f" (the adapter merged into the full-precision base {parts.base_path}, not into the "
               f"{cfg.model.quantization} weights it trained on: the merge does not round)"
               if cfg.model.quantization != "none" else "")
        logger.info(f"merged model saved to {out / 'final_merged'}{how}")
    metrics["wall_s"] = time.perf_counter() - started
    if final_dir is not None and job.setup.is_main:  # README.md: the model card
        exported = [(final_dir, cfg.peft is not None)] + ([(out / "final_merged", False)]
                                                           if cfg.checkpoint.export_merged else [])
        for directory, adapter in exported:
            (directory / "README.md").write_text(models.model_card(
                cfg, to_toml(cfg), metrics, parts.data_lines, parts.base_path, adapter, directory))
    distributed.barrier()
    logger.info(summary_line(metrics, final_dir))
    logger.summary({**metrics, "final_dir": str(final_dir) if final_dir else None})
    logger.close()
    return TrainResult(output_dir=out, metrics=metrics, final_dir=final_dir)


@contextlib.contextmanager
def run_directory(out: Path, rank: int) -> Iterator[None]:
    """The output directory, created and locked by rank 0 for the run's life; every rank learns whether that
    worked (one line naming the problem: a file in the way, no permission, another run holding it)."""
    lock, problem = checkpoint.RunLock(out), None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except (FileExistsError, NotADirectoryError):
            problem = f"output_dir {out}: a file is in the way; give a directory"
        except PermissionError as e:
            problem = f"output_dir {out}: no permission to write there ({e.strerror}); give another output_dir"
        except ConfigError as e:
            problem = str(e)
    problems = [p for p in distributed.gather_objects(problem) if p]
    if problems:
        raise ConfigError(problems[0])
    try:
        yield
    finally:
        lock.release()


def evaluation(backend: Backend, state: TrainState, parts: Parts, generate: bool, device: torch.device) -> dict:
    """Token-weighted loss over the validation sets (eval_loss: all together; eval_loss/<name>: each, when there are
    several); with `generate`, exact match of greedy answers, pooled and per set likewise (every rank decodes the
    same prompts: under ZeRO-3 generation runs in step)."""
    row: dict = {"step": state.step}
    several = len(parts.validation) > 1
    loss_sum = tokens_sum = hits = answered = 0
    rates: list[float] = []
    examples: list = []
    with backend.model_for_generation(state) as module:
        for name, vset in parts.validation.items():
            batches = (to_device(b, device) for b in vset.batches())
            loss, tokens, stats = eval_loss(module, lambda batch: backend.loss_sum(state, batch), batches)
            loss_sum, tokens_sum = loss_sum + loss * tokens, tokens_sum + tokens
            if several:
                row[f"eval_loss/{name}"] = loss
            # A preference loss's statistics (eval_rewards/accuracies, ...), per set when there are several.
            row.update({f"eval_{k}" + (f"/{name}" if several else ""): v for k, v in stats.items()})
            if generate and vset.exact_match is not None:
                # Compiled layers run eagerly here: each decode step's cache shapes would recompile them.
                with torch.compiler.set_stance("force_eager"):
                    rate, pairs = vset.exact_match(module, backend.generate_kwargs)
                hits, answered = hits + rate * len(pairs), answered + len(pairs)
                rates.append(rate)
                examples += pairs[:3]
                if several:
                    row[f"exact_match/{name}"] = rate
    # One set: its loss as eval_loss computed it (no round trip through the weighted sum).
    row.update(eval_loss=loss_sum / max(tokens_sum, 1) if several else loss, eval_tokens=tokens_sum)
    if rates:  # pooled over the sets' answers; one set: its own rate
        row["exact_match"] = hits / max(answered, 1) if several else rates[0]
        row["examples"] = [{"prediction": p, "reference": r} for p, r in examples[:3]]
    return row


def same_config(path: Path, cfg: TrainConfig) -> bool:
    """Whether the config.toml a run left in its output_dir is this config (what it trains, and how)."""
    try:
        refused, accepted = checkpoint.fingerprint.compare(read_toml(path), to_dict(cfg))
    except (OSError, ValueError, ConfigError):  # none, or unreadable: another run
        return False
    return not refused and not accepted


def resume(cfg: TrainConfig, backend: Backend, out: Path, rank: int, world_size: int,
           device: torch.device) -> tuple[TrainState, dict, Optional[Path], list[str], dict]:
    """(state, checkpoint meta, the checkpoint resumed from or None, config changes accepted since it was written,
    its train_state.json) per train.resume: the newest checkpoint that passes its check (one that fails is reported
    and moved aside)."""
    meta = {"backend": backend.name, "global_batch_size": cfg.train.global_batch_size, "seed": cfg.seed,
            "world_size": world_size, "data": data.identity.training_identity(cfg.data)}
    log = print if rank == 0 else (lambda _: None)
    explicit = cfg.train.resume not in ("auto", "never")
    candidates = checkpoint.store.candidates(out, cfg.train.resume)
    path = checkpoint.choose(candidates, rank, world_size, explicit, log)
    if path is None and candidates:  # never a silent start from step 0 over a run that had checkpoints
        raise ConfigError(f"train.resume = \"auto\": none of the {len(candidates)} checkpoint(s) in "
                          f"{out / 'checkpoints'} passes its check (each is moved aside as *.broken, the reasons are "
                          "above); nothing was trained. To start afresh here: train.resume = \"never\" (metrics.jsonl "
                          "is kept beside the new one)")
    if path is None:
        return backend.state, meta, None, [], {}
    state, changes = checkpoint.restore(backend.load, backend.state, path, rank, device, meta, to_dict(cfg),
                                        tuple(cfg.train.resume_allow_changes), backend.tensor_table(backend.state))
    return state, meta, path, changes, checkpoint.store.read_train_state(path)


def best_state(cfg: TrainConfig, backend: Backend, state: TrainState, watch: EvalWatch, out: Path, meta: dict,
               metrics: dict, evals: list[dict], rank: int, device: torch.device) -> TrainState:
    """checkpoint.keep_best: the state of the best evaluation (loaded from its checkpoint unless it is `state`);
    `metrics` are updated to describe it (the last evaluation's loss stays as final_eval_loss)."""
    best = [e for e in evals if e["step"] == watch.best_step]
    best_loss = best[0]["eval_loss"] if best else watch.best_value if watch.metric == "eval_loss" else None
    metrics.update(best_step=watch.best_step, final_eval_loss=metrics.get("eval_loss"), eval_loss=best_loss)
    if watch.metric != "eval_loss":
        metrics[watch.metric] = watch.best_value
    if watch.best_step == state.step:
        return state
    metrics.pop("exact_match", None)
    if best and "exact_match" in best[0]:
        metrics["exact_match"] = best[0]["exact_match"]
    path = checkpoint.store.final_dir(out, watch.best_step)
    if not checkpoint.store.is_complete(path):
        raise ConfigError(f"checkpoint.keep_best: the best evaluation's checkpoint {path} is missing; final/ is not "
                          "written (was it deleted by hand?)")
    loaded, _ = checkpoint.restore(backend.load, state, path, rank, device, meta, to_dict(cfg),
                                   tuple(cfg.train.resume_allow_changes), backend.tensor_table(state))
    return loaded


def summary_line(metrics: dict, final_dir: Optional[Path]) -> str:
    """`done: 500 steps in 58.3s | train loss 0.0006 | eval loss 0.0006 (was 5.5386) | exact match 100.0% (was
    0.0%) | model saved to runs/quickstart/final`"""
    parts = [f"done: {metrics['steps']} steps in {metrics['wall_s']:.1f}s"
             + (" (stopped early)" if metrics.get("stopped_early") else "")]
    if metrics["train_loss"] is not None:  # None: resumed at the end, no step ran in this process
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    if "eval_loss" in metrics:
        was = f" (was {metrics['eval_loss_at_start']:.4f})" if "eval_loss_at_start" in metrics else ""
        parts.append(f"eval loss {metrics['eval_loss']:.4f}{was}")
    if metrics.get("best_step") is not None:
        parts.append(f"best eval at step {metrics['best_step']}")
    if "eval_rewards/accuracies" in metrics:  # a preference run
        start = metrics.get("eval_rewards/accuracies_at_start")
        was = f" (was {100 * start:.1f}%)" if start is not None else ""
        parts.append(f"reward accuracy {100 * metrics['eval_rewards/accuracies']:.1f}%{was}")
    if "exact_match" in metrics:
        start = metrics.get("exact_match_at_start")
        was = f" (was {100 * start:.1f}%)" if start is not None else ""
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%{was}")
    if final_dir is not None:
        parts.append(f"model saved to {final_dir}")
    return " | ".join(parts)
