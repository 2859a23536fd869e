"""The `automodel` command.

    automodel run --config X.toml [KEY=VALUE ...]          train (same as python launch/run.py)
    automodel config show --config X.toml [KEY=VALUE ...]  the fully resolved config as TOML
    automodel config deepspeed --config X.toml [--world-size N] [KEY=VALUE ...]
                                                           the DeepSpeed JSON the run would use
    automodel config docs                                  every key with type, default and doc (Markdown)
    automodel merge --base B --adapter A --out O           merge a LoRA adapter into its base model
"""

import argparse
import sys
from typing import Optional, Sequence

from automodel.config import ConfigError, load_config, to_toml

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
    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _add_config_args(config_sub.add_parser("show", help="print the resolved config as TOML, defaults included"))
    ds = config_sub.add_parser("deepspeed", help="print the DeepSpeed JSON derived from the config")
    ds.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: from the environment)")
    _add_config_args(ds)
    config_sub.add_parser("docs", help="print the reference of every config key (Markdown)")
    merge = sub.add_parser("merge", help="merge a PEFT LoRA adapter into its base model (offline)")
    merge.add_argument("--base", required=True, help="base model: hub id or local directory")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + weights)")
    merge.add_argument("--out", required=True, help="output directory for the merged HF model")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def run_command(config: str, overrides: Sequence[str]) -> int:
    import automodel

    from automodel import distributed

    from automodel.training.preemption import EXIT_PREEMPTED, Preempted

    try:
        automodel.train(load_config(config, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted:
        return EXIT_PREEMPTED  # "try again": a batch script requeues on it
    finally:
        distributed.teardown()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_command(args.config, args.overrides)
    if args.command == "merge":
        from automodel.models import DTYPES
        from automodel.peft import merge

        try:
            out = merge(args.base, args.adapter, args.out, DTYPES[args.dtype])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"merged model saved to {out}")
        return 0
    if args.config_command == "docs":
        from automodel.config.docs import config_reference

        sys.stdout.write(config_reference())
        return 0
    try:
        if args.config_command == "deepspeed":
            import json

            from automodel.distributed import rank_info
            from automodel.distributed.deepspeed_config import deepspeed_config

            world = args.world_size or rank_info().world_size
            cfg = load_config(args.config, args.overrides, world_size=world)
            print(json.dumps(deepspeed_config(cfg, world), indent=2))
        else:
            sys.stdout.write(to_toml(load_config(args.config, args.overrides)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
