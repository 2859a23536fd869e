"""automodel launch: the deepspeed command, the sbatch script (shellcheck-clean in every variant), sweeps and the
checks made before anything is written. The real-Slurm runs are in test_slurm.py."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from automodel.cli import main
from automodel.config import ConfigError
from automodel.launcher.sweep import grid_from_flags, read_sweep_file, run_dirs, split_values, status_table
from tests.helpers import REPO

QUICK = "configs_toml/quickstart.toml"
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def launch(capsys, *argv):
    code = main(["launch", "--config", QUICK, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def script_of(capsys, tmp_path, *argv) -> str:
    code, out, err = launch(capsys, "--slurm", "--dry-run", f"output_dir={tmp_path / 'run'}", *argv)
    assert code == 0, err
    return out


def shellcheck(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "check.sbatch"
    path.write_text(text)
    return subprocess.run([SHELLCHECK, "--shell=bash", str(path)], capture_output=True, text=True)


def test_deepspeed_command_for_gpus_and_cpu_processes(capsys):
    code, out, _ = launch(capsys, "--gpus-per-node", "8", "--dry-run", "optim.lr=1e-3", "train.global_batch_size=64",
                          "train.micro_batch_size=8")
    assert code == 0
    assert out.split()[1:] == ["--num_gpus", "8", "launch/run.py", "--config", QUICK, "optim.lr=1e-3",
                               "train.global_batch_size=64", "train.micro_batch_size=8"]
    assert out.split()[0].endswith("deepspeed")
    code, out, _ = launch(capsys, "--gpus-per-node", "0", "--nproc-per-node", "2", "--dry-run")
    assert out.split()[1:3] == ["--num_gpus", "2"]


def test_errors_before_anything_is_written(capsys, tmp_path):
    out_dir = tmp_path / "run"
    # quickstart: global batch 64, micro 32 -> 3 ranks cannot split it; the message says what to set.
    code, _, err = launch(capsys, "--gpus-per-node", "3", "--slurm", f"output_dir={out_dir}")
    assert code == 2 and "ranks (3)" in err and "train.global_batch_size" in err
    code, _, err = launch(capsys, "--gpus-per-node", "2", "--nproc-per-node", "4")
    assert code == 2 and "one rank per GPU" in err
    code, _, err = launch(capsys, "--gpus-per-node", "1", "--nodes", "2", "--dry-run")
    assert code == 2 and "--slurm" in err
    code, _, err = launch(capsys, "--gpus-per-node", "1", "--slurm", "--sweep", "output_dir=a,b")
    assert code == 2 and "do not sweep output_dir" in err
    # A bad point names itself; nothing of the sweep is written.
    code, _, err = launch(capsys, "--gpus-per-node", "1", "--slurm", "--sweep", "optim.lr=1e-3,-1",
                          f"output_dir={out_dir}")
    assert code == 2 and "sweep point optim.lr=-1" in err and "optim.lr must be a finite number > 0" in err
    code, _, err = launch(capsys, "--gpus-per-node", "1", "--slurm", "--sweep", "optim.lrr=1e-3,2e-3",
                          f"output_dir={out_dir}")
    assert code == 2 and "optim.lr" in err  # the suggestion
    code, _, err = launch(capsys, "--gpus-per-node", "1", "--slurm", "launch.slurm.time=4h", f"output_dir={out_dir}")
    assert code == 2 and "launch.slurm.time" in err
    code, _, err = launch(capsys, "--gpus-per-node", "1", "--slurm", "launch.slurm.sbatch=[\"#SBATCH -N 2\"]",
                          f"output_dir={out_dir}")
    assert code == 2 and "without \"#SBATCH\"" in err
    assert not out_dir.exists()


def test_single_node_gpu_script(capsys, tmp_path):
    script = script_of(capsys, tmp_path, "--gpus-per-node", "4", "train.global_batch_size=128",
                       "launch.slurm.partition=gpu", "launch.slurm.account=proj", "launch.slurm.qos=high",
                       'launch.slurm.mem="0"', "launch.slurm.time=2-00:00:00", "launch.slurm.exclusive=true",
                       'launch.slurm.sbatch=["--constraint=h100", "--mail-type=END"]',
                       'launch.slurm.env={NCCL_DEBUG = "WARN", HF_HOME = "/scratch/my hf"}',
                       'launch.slurm.setup=["source .venv/bin/activate"]')
    run = tmp_path / "run"
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=run", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8", "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
        "#SBATCH --qos=high", "#SBATCH --mem=0", "#SBATCH --exclusive", f"#SBATCH --output={run}/slurm/%j.out",
        f"#SBATCH --error={run}/slurm/%j.err", "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue", "#SBATCH --constraint=h100", "#SBATCH --mail-type=END",
    ]
    assert "export HF_HOME='/scratch/my hf'" in script and "source .venv/bin/activate" in script
    assert f"srun --kill-on-bad-exit=1 --ntasks-per-node=4 {sys.executable} launch/run.py --config " \
           f"{run}/slurm/config.toml || status=$?" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "-lt 20 ]" in script
    assert f"cd {REPO}" in script
    result = shellcheck(script, tmp_path)
    assert result.returncode == 0, result.stdout


def test_multi_node_container_and_no_requeue_scripts_are_shellcheck_clean(capsys, tmp_path):
    script = script_of(capsys, tmp_path, "--gpus-per-node", "8", "--nodes", "4", "train.global_batch_size=256",
                       "train.micro_batch_size=8", 'launch.slurm.container_image=nvcr.io#nvidia/pytorch:25.01-py3',
                       'launch.slurm.container_mounts=["/data:/data"]', "launch.slurm.signal_seconds=0",
                       "launch.slurm.requeue=false")
    assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=8" in script
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert f"'--container-image=nvcr.io#nvidia/pytorch:25.01-py3' --container-mounts=/data:/data,{REPO}:{REPO} " \
           f"--container-workdir={REPO} python launch/run.py" in script
    assert "--signal" not in script and "--requeue" not in script and "scontrol requeue" not in script
    result = shellcheck(script, tmp_path)
    assert result.returncode == 0, result.stdout


def test_sweep_grid_becomes_one_array_with_named_run_dirs(capsys, tmp_path):
    script = script_of(capsys, tmp_path, "--gpus-per-node", "0", "--nproc-per-node", "2", "--sweep",
                       "optim.lr=1e-3,3e-3", "--sweep", 'model.config.hidden_size=64,128', "--max-parallel", "3")
    assert "#SBATCH --array=0-3%3" in script and "%A_%a.out" in script
    run = tmp_path / "run"
    assert f"  3) overrides=(optim.lr=3e-3 model.config.hidden_size=128 'output_dir=\"{run}/lr-3e-3_hidden_size-128\"')" \
        in script
    assert '"${overrides[@]}"' in script and "--gpus-per-node" not in script.split("#SBATCH --job")[1].split("\n\n")[0]
    result = shellcheck(script, tmp_path)
    assert result.returncode == 0, result.stdout


def test_writes_script_frozen_config_and_sweep_json(capsys, tmp_path):
    out_dir = tmp_path / "sw"
    code, out, err = launch(capsys, "--gpus-per-node", "1", "--slurm", f"output_dir={out_dir}", "optim.lr=2e-3",
                            "--sweep", "seed=1,2")
    assert code == 0, err
    assert out.strip().endswith(f"sbatch {out_dir}/slurm/job.sbatch")
    doc = json.loads((out_dir / "sweep.json").read_text())
    assert [t["overrides"] for t in doc["tasks"]] == [["seed=1"], ["seed=2"]]
    assert [t["run_dir"] for t in doc["tasks"]] == [str(out_dir / "seed-1"), str(out_dir / "seed-2")]
    # The frozen config holds the launch overrides; the sweep's go on the command line.
    from automodel.config import load_config

    frozen = load_config(out_dir / "slurm" / "config.toml")
    assert frozen.optim.lr == 2e-3 and frozen.seed == 0 and frozen.output_dir == str(out_dir)
    assert (out_dir / "slurm" / "job.sbatch").stat().st_mode & 0o111
    assert status_table(out_dir).splitlines()[1].split()[:3] == ["0", "pending", "-"]


def test_sweep_values_grid_and_file(tmp_path):
    assert split_values("1e-5, 3e-5") == ["1e-5", "3e-5"]
    assert split_values('[1,2],[3,4],"a,b"') == ["[1,2]", "[3,4]", '"a,b"']
    assert grid_from_flags(["a.x=1,2", "b.y=p,q"]) == [("a.x=1", "b.y=p"), ("a.x=1", "b.y=q"),
                                                       ("a.x=2", "b.y=p"), ("a.x=2", "b.y=q")]
    with pytest.raises(ConfigError, match="repeated"):
        grid_from_flags(["a.x=1,1"])
    with pytest.raises(ConfigError, match="given twice"):
        grid_from_flags(["a.x=1", "a.x=2"])
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('max_parallel = 2\n[grid]\n"optim.lr" = [1e-4, 3e-4]\n'
                     '[[runs]]\n"optim.lr" = 1e-3\n"peft.rank" = 16\n"model.name_or_path" = "a b"\n')
    plan = read_sweep_file(str(sweep))
    assert plan.max_parallel == 2
    assert plan.points == (("optim.lr=0.0001",), ("optim.lr=0.0003",),
                           ("optim.lr=0.001", "peft.rank=16", 'model.name_or_path="a b"'))
    names = [d.name for d in run_dirs(Path("r"), plan.points + (("optim.lr=0.0001",),))]
    assert names == ["lr-0.0001_0", "lr-0.0003", "lr-0.001_rank-16_name_or_path-a-b", "lr-0.0001_3"]
    sweep.write_text("[[runs]]\noptim.lr = 1e-3\n")
    with pytest.raises(ConfigError, match="quote dotted keys"):
        read_sweep_file(str(sweep))
    sweep.write_text("[grids]\n")
    with pytest.raises(ConfigError, match="unknown key"):
        read_sweep_file(str(sweep))


def test_shipped_sweep_file_loads_for_its_config(capsys, tmp_path):
    code, out, err = launch_file(capsys, tmp_path)
    assert code == 0, err
    assert "#SBATCH --array=0-3%2" in out


def launch_file(capsys, tmp_path):
    code = main(["launch", "--config", "configs_toml/llm_lora_cpu.toml", "--slurm", "--dry-run",
                 "--sweep-file", "configs_toml/sweep_lora_cpu.toml", f"output_dir={tmp_path}"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_local_sweep_prints_one_deepspeed_command_per_point(capsys, tmp_path):
    code, out, err = launch(capsys, "--gpus-per-node", "0", "--nproc-per-node", "2", "--dry-run",
                            f"output_dir={tmp_path}", "--sweep", "seed=1,2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert shlex.split(lines[1])[1:] == ["--num_gpus", "2", "launch/run.py", "--config", QUICK, f"output_dir={tmp_path}",
                                    "seed=2", f"output_dir=\"{tmp_path}/seed-2\""]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
