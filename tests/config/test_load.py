"""Strict configs: errors that name the file and key and suggest a fix; overrides; round trips."""

import json
import subprocess
import sys

import attrs
import pytest

from automodel.config import (ConfigError, TrainConfig, all_key_paths, from_dict, load_config, parse_override,
                              save_config, to_toml)
from tests.helpers import REPO

MINIMAL = """
[model]
name_or_path = "some/model"
[data.train]
source = "train.jsonl"
format = "instruction"
[train]
max_steps = 10
"""


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, world_size=1)
    return str(info.value)


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path):
    path = write(tmp_path, MINIMAL + "[optim]\nweight_decy = 0.1\n")
    msg = error_of(path)
    assert str(path) in msg
    assert "unknown key `optim.weight_decy`" in msg
    assert "did you mean `optim.weight_decay`?" in msg


def test_unknown_key_suggests_the_section_where_it_lives(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL + "[optim]\nwarmup_steps = 10\n"))
    assert "did you mean `schedule.warmup_steps`?" in msg


def test_unknown_key_from_override_says_so(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL), ["train.max_step=5"])
    assert "command-line override" in msg and "did you mean `train.max_steps`?" in msg


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=abc", "`optim.lr`: expected float, got str 'abc'"),
    ("train.max_steps=1.5", "`train.max_steps`: expected int, got float 1.5"),
    ("train.max_steps=true", "`train.max_steps`: expected int, got boolean True"),
    ("model.trust_remote_code=1", "`model.trust_remote_code`: expected bool, got int 1"),
    ("schedule.kind=\"cosin\"", "`schedule.kind`: expected one of 'constant', 'linear', 'cosine', 'wsd' (got 'cosin')"),
    ("optim.betas=[0.9]", "`optim.betas`: expected an array of 2 numbers, got [0.9]"),
    ("model=3", "`model` is a section"),
])
def test_wrong_types_name_key_value_and_expected_type(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), [override])


def test_int_is_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["optim.lr=1"], world_size=1).optim.lr == 1.0


@pytest.mark.parametrize("overrides, expected", [
    (["train.global_batch_size=30", "train.micro_batch_size=4"],
     "train.global_batch_size (30) must be divisible by train.micro_batch_size (4) x ranks (1) = 4"),
    (["schedule.warmup_steps=20"], "schedule.warmup_steps (20) is larger than train.max_steps (10)"),
    (["train.epochs=2"], "set exactly one of train.max_steps and train.epochs"),
    (["schedule.min_lr=1.0"], "schedule.min_lr (1.0) is larger than optim.lr"),
    (["model.name_or_path=\"\""], "model.name_or_path is required"),
    (["eval.generate_samples=5"], "eval.generate_samples needs a [data.validation] set"),
    (["optim.lr=nan"], "optim.lr must be a finite number > 0 (got nan)"),
    (["optim.lr=inf"], "optim.lr must be a finite number > 0 (got inf)"),
    # Memory settings that contradict each other.
    (["train.activation_checkpointing=true", "train.grad_method=\"grad_and_value\"", "train.loss_chunk_tokens=0"],
     "train.activation_checkpointing needs train.grad_method = \"autograd\""),
    (["train.grad_method=\"grad_and_value\""], "cannot recompute loss chunks (torch.func refuses saved-tensor hooks); "
                                             "set train.loss_chunk_tokens = 0"),
    (["train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens must be >= 0 (got -1)"),
    (["optim.master_dtype=\"float32\""], "optim.master_dtype = \"float32\" is for bfloat16/float16 models"),
    (["model.dtype=\"bfloat16\"", "optim.master_dtype=\"same\"", "distributed.backend=\"deepspeed\""],
     "optim.master_dtype = \"same\" is for the functional backend"),
    (["optim.fused=true", "distributed.backend=\"deepspeed\""], "optim.fused is for the functional backend"),
    # Distillation.
    (["recipe=\"llm_kd\""], "recipe = \"llm_kd\" and a [distill] section go together"),
    (["distill.teacher=\"t\""], "recipe = \"llm_kd\" and a [distill] section go together"),
    (["recipe=\"llm_kd\"", "distill.teacher=\"t\"", "distill.alpha=1.5", "distill.temperature=0"],
     "distill.alpha must be in [0, 1] (got 1.5)"),
    (["recipe=\"llm_kd\"", "distill.teacher=\"t\"", "distill.temperature=0"],
     "distill.temperature must be a finite number > 0 (got 0.0)"),
])
def test_inconsistent_values_are_rejected_before_any_model_loads(tmp_path, overrides, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), overrides)


def test_divisibility_counts_ranks(tmp_path):
    path = write(tmp_path, MINIMAL)
    load_config(path, ["train.global_batch_size=8", "train.micro_batch_size=4"], world_size=1)
    with pytest.raises(ConfigError, match=r"x ranks \(4\) = 16"):
        load_config(path, ["train.global_batch_size=8", "train.micro_batch_size=4"], world_size=4)
    # The way out that keeps the global batch comes first, and it works; then the one that changes the recipe.
    with pytest.raises(ConfigError, match=r"set train.micro_batch_size = 2 \(keeps the global batch: 2 x 4 ranks x 2 "
                                          r"accumulation steps\), or train.global_batch_size = 12 \(changes the recipe"):
        load_config(path, ["train.global_batch_size=16", "train.micro_batch_size=3"], world_size=4)
    load_config(path, ["train.global_batch_size=16", "train.micro_batch_size=2"], world_size=4)
    with pytest.raises(ConfigError, match=r"or run on a number of ranks that divides 16"):
        load_config(path, ["train.global_batch_size=16", "train.micro_batch_size=2"], world_size=3)


def test_missing_required_key(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL.replace('source = "train.jsonl"\n', "")))
    assert "`data.train.source`: required key is missing" in msg


def test_bad_toml_names_the_file_and_line(tmp_path):
    msg = error_of(write(tmp_path, "[model]\nname_or_path = \n"))
    assert "run.toml: not valid TOML" in msg and "line 2" in msg


def test_overrides_use_toml_values_and_fall_back_to_strings():
    assert parse_override("optim.lr=3e-5") == (["optim", "lr"], 3e-5)
    assert parse_override("optim.betas=[0.8, 0.9]") == (["optim", "betas"], [0.8, 0.9])
    assert parse_override('model.name_or_path="./my-model"') == (["model", "name_or_path"], "./my-model")
    assert parse_override("model.name_or_path=./my-model") == (["model", "name_or_path"], "./my-model")
    assert parse_override("model.config={hidden_size = 64}") == (["model", "config"], {"hidden_size": 64})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("optim.lr")


def test_overrides_apply_in_order_and_create_sections(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "optim.lr=1e-4", "optim.lr=2e-4", "model.config.hidden_size=64", "data.validation.source=val.jsonl",
    ], world_size=1)
    assert cfg.optim.lr == 2e-4
    assert cfg.model.config == {"hidden_size": 64}
    assert cfg.data.validation[0].source == "val.jsonl" and cfg.data.validation[0].format == "squad"


def test_resolved_config_round_trips_through_toml(tmp_path):
    text = MINIMAL.replace("max_steps = 10", "epochs = 1.5")
    cfg = load_config(write(tmp_path, text), ["optim.betas=[0.8, 0.95]", "model.config.rope_theta=1e4"],
                      world_size=1)
    save_config(cfg, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml", world_size=1)
    assert again == cfg and isinstance(again.optim.betas, tuple)


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    from automodel.launcher.sweep import read_sweep_file

    configs = sorted((REPO / "configs_toml").glob("*.toml"))
    sweeps = [p for p in configs if p.name.startswith("sweep_")]  # sweep files, not run configs
    assert configs and sweeps
    for path in sweeps:
        assert read_sweep_file(str(path)).points
    for path in sorted(set(configs) - set(sweeps)):
        cfg = load_config(path, world_size=1)
        save_config(cfg, tmp_path / "again.toml")
        assert load_config(tmp_path / "again.toml", world_size=1) == cfg, path


def test_code_built_config_and_evolve():
    from automodel.config import DataConfig, DataSourceConfig, ModelConfig, TrainingConfig, validate

    cfg = TrainConfig(model=ModelConfig(name_or_path="m"), train=TrainingConfig(max_steps=3),
                      data=DataConfig(train=DataSourceConfig(source="x.jsonl")))
    assert validate(cfg) is cfg
    with pytest.raises(ConfigError, match="divisible"):
        validate(attrs.evolve(cfg, train=attrs.evolve(cfg.train, global_batch_size=5)))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.seed = 1


def test_key_paths_cover_the_public_sections():
    paths = set(all_key_paths())
    for key in ("recipe", "seed", "output_dir", "model.name_or_path", "model.dtype", "model.attn_implementation",
                "model.trust_remote_code", "model.init", "model.config", "tokenizer.name_or_path", "data.seq_len",
                "data.train.source", "data.train.format", "data.train.split", "data.train.limit",
                "data.train.columns", "data.validation.source", "optim.lr", "optim.weight_decay", "optim.betas",
                "optim.eps", "optim.clip_grad_norm", "schedule.kind", "schedule.warmup_steps", "schedule.min_lr",
                "train.global_batch_size", "train.micro_batch_size", "train.max_steps", "train.epochs",
                "train.eval_every", "train.log_every", "distributed.backend"):
        assert key in paths, key


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "automodel.cli", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_cli_config_show_prints_the_resolved_config(tmp_path):
    path = write(tmp_path, MINIMAL)
    proc = run_cli("config", "show", "--config", str(path), "optim.lr=3e-5")
    assert proc.returncode == 0, proc.stderr
    shown = write(tmp_path, proc.stdout, "shown.toml")
    cfg = load_config(shown, world_size=1)
    assert cfg.optim.lr == 3e-5 and cfg.schedule.kind == "cosine"  # defaults included
    assert cfg == from_dict(__import__("tomllib").loads(to_toml(cfg)), world_size=1)


@pytest.mark.slow
def test_cli_config_error_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, MINIMAL + "[optim]\nweight_decy = 0.1\n")
    for args in (("config", "show", "--config", str(path)), ("run", "--config", str(path))):
        proc = run_cli(*args)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and "did you mean `optim.weight_decay`?" in proc.stderr


MIXED = """
[model]
name_or_path = "some/model"
[[data.train]]
source = "code.jsonl"
format = "instruction"
weight = 3.0
[[data.train]]
source = "chat.jsonl"
format = "chat"
weight = 1.0
[[data.validation]]
source = "code_val.jsonl"
format = "instruction"
name = "code"
[[data.validation]]
source = "chat_val.jsonl"
format = "chat"
name = "chat"
[train]
max_steps = 10
"""


def test_several_weighted_sources_and_named_validation_sets(tmp_path):
    cfg = load_config(write(tmp_path, MIXED), ["data.train.1.limit=5"], world_size=1)
    assert [(s.source, s.format, s.weight) for s in cfg.data.train] == [("code.jsonl", "instruction", 3.0),
                                                                        ("chat.jsonl", "chat", 1.0)]
    assert cfg.data.train[1].limit == 5 and [s.name for s in cfg.data.validation] == ["code", "chat"]
    saved = write(tmp_path, to_toml(cfg), "saved.toml")
    assert "[[data.train]]" in saved.read_text() and load_config(saved, world_size=1) == cfg
    # One [data.train] table is a list of one, and an override without an index reaches it.
    single = load_config(write(tmp_path, MINIMAL), ["data.train.limit=7"], world_size=1)
    assert len(single.data.train) == 1 and single.data.train[0].limit == 7 and single.data.validation == []


def test_mixture_mistakes_are_named(tmp_path):
    path = write(tmp_path, MIXED)
    assert "`data.train` has 2 entries; name one by index, e.g. data.train.0.limit=..." in error_of(
        path, ["data.train.limit=5"])
    assert "give every source a weight, or none" in error_of(write(tmp_path, MIXED.replace("weight = 1.0\n", "")))
    assert "each needs its own name" in error_of(write(tmp_path, MIXED.replace('name = "chat"\n', "")))
    assert "data.train.1.weight must be a finite number > 0" in error_of(path, ["data.train.1.weight=0.0"])
    assert "unknown key `data.train.0.wieght`; did you mean `data.train.0.weight`?" in error_of(
        write(tmp_path, MIXED.replace("weight = 3.0", "wieght = 3.0")))


def test_cli_config_deepspeed_plans_for_the_ranks_the_config_launches(monkeypatch, capsys):
    """Outside a launcher the JSON is for launch.nodes x ranks per node (llm.toml: one node of 8 GPUs), not 1 rank."""
    import json

    from automodel.cli import main

    monkeypatch.chdir(REPO)
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert main(["config", "deepspeed", "--config", "configs_toml/llm.toml"]) == 0
    out = capsys.readouterr()
    ds = json.loads(out.out)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 1)
    assert "planning for 8 rank(s)" in out.err
    assert main(["config", "deepspeed", "--config", "configs_toml/llm.toml", "--world-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize("output_dir, expected", [
    ("", "output_dir is empty"), ("/", "output_dir = '/' is the filesystem root"),
    ("~", "output_dir = '~' is a home directory"), ("/tmp/../", "is the filesystem root"),
])
def test_an_output_dir_a_run_must_not_write_and_prune_in_is_refused(tmp_path, output_dir, expected):
    with pytest.raises(ConfigError, match=expected + ".*give it a directory of its own|" + expected):
        load_config(write(tmp_path, MINIMAL), [f"output_dir={json.dumps(output_dir)}"])


def test_a_config_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.toml: not valid TOML for a config: arrays or tables nested too deeply"):
        load_config(path)
