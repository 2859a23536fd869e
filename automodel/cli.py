"""The `automodel` command.

    automodel run --config X.toml [KEY=VALUE ...]          train (same as python launch/run.py)
    automodel config show --config X.toml [KEY=VALUE ...]  the fully resolved config as TOML
    automodel config deepspeed --config X.toml [--world-size N] [KEY=VALUE ...]
                                                           the DeepSpeed JSON the run would use
    automodel config docs                                  every key with type, default and doc (Markdown)
    automodel merge --base B --adapter A --out O           merge a LoRA adapter into its base model
    automodel launch --config X.toml --gpus-per-node G [--nodes N] [--slurm] [--sweep K=A,B ...] [KEY=VALUE ...]
                                                           print and run the deepspeed command, or write an
                                                           sbatch script (job array for sweeps)
    automodel sweep status RUN_DIR                         each sweep task's state and final metrics
    automodel plot RUN_DIR [RUN_DIR ...] [--out F]         loss curves of runs (or of every task of a sweep)
    automodel chat MODEL_DIR [--max-new-tokens N ...]      talk to a trained model (or LoRA adapter)
    automodel generate MODEL_DIR --prompt TEXT             one answer, printed as it is generated
"""

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from automodel.config import ConfigError, load_config, to_toml
from automodel.exit_status import EXIT_CONFIG_ERROR, EXIT_PREEMPTED

OVERRIDES_HELP = ("dotted overrides with TOML values, e.g. optim.lr=3e-5 train.max_steps=20 "
                  "'model.name_or_path=\"./my-model\"' (a value that is not valid TOML is taken as a string)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automodel", description="Fine-tune Hugging Face LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train with a config")
    _add_config_args(run)
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    node = sub.add_parser("node", help="start this node's ranks of a multi-node run (a Kubernetes pod's command)",
                          description="Starts NPROC_PER_NODE ranks of `run` with RANK/WORLD_SIZE from NNODES, NODE_RANK "
                          "(or JOB_COMPLETION_INDEX), MASTER_ADDR and MASTER_PORT, passes SIGTERM/SIGUSR1 on to them, "
                          "and exits 75 when they stopped at a checkpoint (docs/k8s.md).")
    _add_config_args(node)
    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _add_config_args(config_sub.add_parser("show", help="print the resolved config as TOML, defaults included"))
    ds = config_sub.add_parser("deepspeed", help="print the DeepSpeed JSON derived from the config")
    ds.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: the launcher's, else launch.nodes x ranks per node)")
    _add_config_args(ds)
    config_sub.add_parser("docs", help="print the reference of every config key (Markdown)")
    merge = sub.add_parser("merge", help="merge a PEFT LoRA adapter into its base model (offline)")
    merge.add_argument("--base", required=True, help="base model: hub id or local directory")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + weights)")
    merge.add_argument("--out", required=True, help="output directory for the merged HF model")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _add_verbose(merge)
    _add_launch_parser(sub)
    sweep = sub.add_parser("sweep", help="inspect sweeps")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True)
    status = sweep_sub.add_parser("status", help="state and final metrics of each task of a sweep")
    status.add_argument("run_dir", help="the sweep's output_dir (holds sweep.json)")
    plot = sub.add_parser("plot", help="draw the loss curves of runs or sweeps into one PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="a run's output_dir (metrics.jsonl) or a sweep's (sweep.json: every task, labelled by its "
                      "overrides)")
    plot.add_argument("--out", default=None, help="the PNG to write (default: loss.png in the current directory, or "
                      "RUN_DIR/plots/loss.png for a single run)")
    plot.add_argument("--title", default=None)
    _add_verbose(plot)
    for name, text in (("chat", "a terminal chat with a saved model or adapter"),
                       ("generate", "generate one answer to --prompt")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model_dir", metavar="MODEL_DIR", help="a run's final/ (or final_merged/), any saved causal "
                       "LM directory, or a LoRA adapter directory")
        _add_generation_args(p)
        _add_verbose(p)
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the user's message (or, with --raw, the text to continue)")
            p.add_argument("--raw", action="store_true", help="continue --prompt as plain text, without the chat "
                           "template")
    return parser


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show the libraries' warnings, log lines and progress bars")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling")
    p.add_argument("--system", default="", help="a system message that starts every conversation")
    p.add_argument("--chat-template", default="", help="\"chatml\" or a Jinja template, for a tokenizer without one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _add_launch_parser(sub) -> None:
    launch = sub.add_parser(
        "launch", help="print and run the deepspeed command, or write an sbatch script (--slurm)",
        description="Without --slurm: print the one-node deepspeed command and run it. With --slurm: write "
        "<output_dir>/slurm/job.sbatch (one srun task per rank; a job array with --sweep) and print the sbatch "
        "command. Flags override the config's [launch] section.")
    _add_config_args(launch)
    launch.add_argument("--nodes", type=int, default=None, help="nodes (default: launch.nodes)")
    launch.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node, one rank each; 0 runs CPU processes (default: launch.gpus_per_node)")
    launch.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks per node with --gpus-per-node 0 (default: launch.nproc_per_node or 1)")
    launch.add_argument("--slurm", action="store_true", help="write an sbatch script instead of running")
    launch.add_argument("--k8s", action="store_true",
                        help="print Kubernetes manifests (an Indexed Job per run, one pod per node; docs/k8s.md)")
    launch.add_argument("--out", default=None, metavar="DIR", help="with --k8s: write the manifests under DIR")
    launch.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep a key over values; several --sweep flags make a grid (repeatable)")
    launch.add_argument("--sweep-file", default=None, help="TOML sweep: [grid] and/or [[runs]] (see docs/slurm.md)")
    launch.add_argument("--max-parallel", type=int, default=None,
                        help="at most M array tasks at once (--array=0-K%%M)")
    launch.add_argument("--submit", action="store_true", help="with --slurm: also run sbatch")
    launch.add_argument("--dry-run", action="store_true", help="print the command or script; write and run nothing")


def run_command(config: str, overrides: Sequence[str]) -> int:
    from automodel.exit_status import catch_signals_early

    catch_signals_early()  # a cluster's signal during the seconds of imports below is acted on, not fatal
    import automodel
    from automodel import distributed, storage
    from automodel.training.loop import NonFiniteLoss
    from automodel.training.preemption import Preempted

    cfg = None
    try:
        cfg = load_config(config, overrides)
        automodel.train(cfg)
    except ConfigError as e:
        distributed.teardown()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except NonFiniteLoss as e:  # the run's checkpoints are the last good ones; retrying as it is would fail again
        distributed.teardown()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted:
        # "Try again": the batch script requeues on it. The checkpoint is complete on every rank; during the
        # interpreter's shutdown a SIGTERM would kill with 143 (srun sends one to the other ranks as soon as the
        # first one exits 75).
        _exit_now(EXIT_PREEMPTED)
    except Exception as e:  # a full, read-only or forbidden place to write: one line (anything else: the traceback)
        line = storage.explain(e, cfg and Path(cfg.output_dir), cfg and cfg.data.cache_dir)
        distributed.teardown()
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1 if storage.REFUSALS[storage.errno_of(e)][1] else EXIT_CONFIG_ERROR
    except BaseException:
        distributed.teardown()
        raise
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """Ends a rank whose run is complete, skipping the interpreter's shutdown.

    DeepSpeed's tensor hooks keep its engine, and through it the gloo process groups and their worker threads,
    alive until the interpreter tears everything down; a worker caught there aborts the process ("terminate called
    without an active exception", exit 250 under the deepspeed launcher, seen in CI after a 2-rank ZeRO-3 run had
    trained, exported and passed its final barrier). Every file the run wrote is closed by now, and its work runs
    on this thread: nothing is lost.
    """
    from automodel import distributed

    distributed.teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come before, between or after flags (`launch --sweep a=1,2 optim.lr=3e-5 --slurm`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "run":
        return run_command(args.config, args.overrides)
    if args.command == "node":
        from automodel.launcher.node import run_node

        try:
            return run_node(args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    if args.command in ("launch", "sweep"):
        return _launch_or_sweep(args)
    if args.command in ("chat", "generate", "plot", "merge"):
        from automodel.loggers.quiet import libraries_silenced

        try:  # the libraries' warnings and bars would interleave with the command's output (--verbose keeps them)
            # (plot loads no model: neither DeepSpeed, whose import-time lines the others set aside, nor the libraries
            # whose progress bars they turn off are imported for it)
            quiet = (libraries_silenced(preload=(), bars=()) if args.command == "plot" else libraries_silenced())
            with contextlib.nullcontext() if args.verbose else quiet:
                return {"plot": _plot, "merge": _merge}.get(args.command, _talk)(args)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    if args.config_command == "docs":
        from automodel.config.docs import config_reference

        sys.stdout.write(config_reference())
        return 0
    try:
        if args.config_command == "deepspeed":
            import json

            from automodel.backends.deepspeed_config import deepspeed_config
            from automodel.distributed import rank_info

            world = args.world_size or rank_info().world_size
            if not args.world_size and world == 1:  # not under a launcher: plan for the ranks [launch] asks for
                from automodel.launcher import topology

                topo = topology(load_config(args.config, args.overrides).launch)
                world = topo.world_size
                print(f"planning for {world} rank(s): launch.nodes ({topo.nodes}) x {topo.nproc_per_node} per node "
                      "(--world-size N plans for another count)", file=sys.stderr)
            cfg = load_config(args.config, args.overrides, world_size=world)
            print(json.dumps(deepspeed_config(cfg, world), indent=2))
        else:
            sys.stdout.write(to_toml(load_config(args.config, args.overrides)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


def _merge(args: argparse.Namespace) -> int:
    from automodel.models import DTYPES
    from automodel.peft import merge

    out = merge(args.base, args.adapter, args.out, DTYPES[args.dtype])
    print(f"merged model saved to {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from automodel.loggers.plot import plot_runs, runs_of

    runs = runs_of(args.run_dirs)
    single = len(args.run_dirs) == 1 and not (Path(args.run_dirs[0]) / "sweep.json").is_file()
    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) / "plots" / "loss.png" if single
                                           else Path("loss.png"))
    print(f"plotted {len(runs)} run(s) to {plot_runs(runs, out, args.title)}")
    return 0


def _talk(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from automodel import chat

    bad = [f"{flag} must be {rule} (got {value})" for flag, value, ok, rule in (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 decodes greedily)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: off)"),
        ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0, "> 0")) if not ok]
    if bad:
        raise ConfigError("; ".join(bad))
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the conversation (--verbose too)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = chat.load(args.model_dir, args.dtype, device, args.chat_template)
    settings = chat.GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, top_k=args.top_k,
                                       repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.command == "chat":
        return chat.chat(model, tokenizer, settings, system=args.system, name=args.model_dir)
    if not args.raw:
        chat.require_template(tokenizer, args.model_dir, "--raw to continue the prompt as plain text")
    messages = None if args.raw else ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    chat.reply(model, tokenizer, messages, settings, sys.stdout, prompt=args.prompt)
    return 0


def _launch_or_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from automodel.launcher.main import LaunchArgs, launch
    from automodel.launcher.sweep import status_table

    try:
        if args.command == "sweep":
            sys.stdout.write(status_table(Path(args.run_dir)))
            return 0
        return launch(LaunchArgs(
            config=args.config, overrides=tuple(args.overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            nproc_per_node=args.nproc_per_node, slurm=args.slurm, k8s=args.k8s, out=args.out, sweep=tuple(args.sweep),
            sweep_file=args.sweep_file, max_parallel=args.max_parallel, submit=args.submit, dry_run=args.dry_run,
        ))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
