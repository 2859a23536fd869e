"""automodel launch --k8s: the manifests, validated against the official Kubernetes schemas (strict: an unknown field
fails), their names, the errors made before anything is written, the per-node launcher, and a 2-"node" run through
the local pod runner (k8s_pods.py) that is evicted, exits 75, is restarted by the podFailurePolicy and resumes
exactly. No Kubernetes API server runs here; docs/k8s.md says what that leaves untested."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from automodel.cli import main
from automodel.config import ConfigError
from automodel.launcher.k8s import dns_label
from automodel.launcher.node import exit_code, node_from_env
from tests.helpers import REPO, env, launch_run, train_losses
from tests.launcher.k8s_pods import LocalJob

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in [dev])")

QUICK = "configs_toml/quickstart.toml"
IMAGE = 'launch.k8s.image="registry.example.com/automodel:0.1"'
# The oldest release whose Job API has everything the manifests use (podFailurePolicy GA), and the newest shipped.
VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def k8s(capsys, *argv) -> tuple[int, str, str]:
    code = main(["launch", "--config", QUICK, "--k8s", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def objects_of(capsys, *argv) -> list[dict]:
    code, out, err = k8s(capsys, IMAGE, *argv)
    assert code == 0, err
    return list(yaml.safe_load_all(out))


def validate(objects: list[dict]) -> None:
    for obj in objects:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_manifests_of_a_two_node_gpu_run_are_valid_kubernetes(capsys):
    objects = objects_of(
        capsys, "--nodes", "2", "--gpus-per-node", "8", "train.global_batch_size=64", "train.micro_batch_size=4",
        'launch.k8s.cpu="64"', 'launch.k8s.memory="400Gi"', 'launch.k8s.namespace="ml"',
        'launch.k8s.secret_env={HF_TOKEN="hf-token/token"}', 'launch.k8s.env={NCCL_DEBUG="WARN"}',
        'launch.k8s.tolerations=["nvidia.com/gpu:NoSchedule", "pool=h100:NoExecute"]',
        'launch.k8s.node_selector={"nvidia.com/gpu.product"="NVIDIA-H100-80GB-HBM3"}',
        'launch.k8s.image_pull_secrets=["regcred"]', 'launch.k8s.priority_class="training"',
        'launch.k8s.service_account="trainer"', 'launch.k8s.storage_class="fast"')
    validate(objects)
    assert [o["kind"] for o in objects] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    claim, config_map, service, job = objects
    assert all(o["metadata"]["namespace"] == "ml" for o in objects)
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}},
                             "storageClassName": "fast"}
    # The frozen config, overrides applied, is what every pod reads.
    frozen = config_map["data"]["config.toml"]
    assert "global_batch_size = 64" in frozen and 'output_dir = "runs/quickstart"' in frozen
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 4 and spec["ttlSecondsAfterFinished"] == 604800
    assert spec["podFailurePolicy"]["rules"][0] == {
        "action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}}
    assert spec["podFailurePolicy"]["rules"][1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # Rendezvous: pod 0's stable name through the headless Service that selects the pods.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == spec["template"]["metadata"]["labels"] == {"automodel/job": "quickstart"}
    assert pod["subdomain"] == service["metadata"]["name"] == "quickstart"
    [container] = pod["containers"]
    envs = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert envs["MASTER_ADDR"] == "quickstart-0.quickstart" and envs["MASTER_PORT"] == "29500"
    assert envs["NNODES"] == "2" and envs["NPROC_PER_NODE"] == "8" and envs["NCCL_DEBUG"] == "WARN"
    assert envs["NODE_RANK"] == {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/"
                                                          "job-completion-index']"}}
    assert envs["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}  # by reference only
    assert envs["HF_HOME"] == "/workspace/runs/quickstart/.cache/huggingface"
    assert container["command"] == ["python", "-m", "automodel", "node", "--config", "/etc/automodel/config.toml"]
    assert container["resources"] == {"requests": {"cpu": "64", "memory": "400Gi"},
                                      "limits": {"cpu": "64", "memory": "400Gi", "nvidia.com/gpu": 8}}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"output": "/workspace/runs/quickstart", "config": "/etc/automodel", "shm": "/dev/shm"}
    assert pod["volumes"][0] == {"name": "output", "persistentVolumeClaim": {"claimName": "quickstart-output"}}
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 300
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                  {"key": "pool", "operator": "Equal", "value": "h100", "effect": "NoExecute"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "training"


def test_strict_validation_catches_an_unknown_field(capsys):
    job = objects_of(capsys, "--gpus-per-node", "1")[-1]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def test_an_existing_claim_and_a_cpu_run(capsys):
    objects = objects_of(capsys, "--gpus-per-node", "0", "--nproc-per-node", "2", 'launch.k8s.volume_claim="shared"',
                         'launch.k8s.shm_size=""', "output_dir=\"/data/runs/q\"")
    validate(objects)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]  # no claim is created
    pod = objects[-1]["spec"]["template"]["spec"]
    assert "resources" not in pod["containers"][0]  # nothing asked: schedulable anywhere
    assert pod["volumes"] == [{"name": "output", "persistentVolumeClaim": {"claimName": "shared"}},
                              {"name": "config", "configMap": {"name": "q-config"}}]
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} == {"/data/runs/q", "/etc/automodel"}


def test_a_sweep_is_one_job_per_task_with_valid_unique_names(capsys):
    long_name = 'launch.k8s.name="Fine_Tune.Qwen2.5-0.5B-Instruct on the long chat set, third try"'
    objects = objects_of(capsys, "--nodes", "4", "--gpus-per-node", "8", "train.global_batch_size=64",
                         "train.micro_batch_size=2", long_name, "--sweep", "optim.lr=1e-3,3e-3,1e-2",
                         "--sweep", "optim.weight_decay=0.0,0.1")
    validate(objects)
    jobs = [o for o in objects if o["kind"] == "Job"]
    names = [j["metadata"]["name"] for j in jobs]
    assert len(names) == len(set(names)) == 6
    for job in jobs:
        name = job["metadata"]["name"]
        assert LABEL.match(name) and len(f"{name}-3") <= 63, name  # the last pod's hostname is a label too
        assert job["spec"]["template"]["spec"]["subdomain"] == name
    sweeps = {j["metadata"]["labels"]["automodel/sweep"] for j in jobs}  # `kubectl get jobs -l automodel/sweep=...`
    assert len(sweeps) == 1 and LABEL.match(sweeps.pop())
    commands = [j["spec"]["template"]["spec"]["containers"][0]["command"][6:] for j in jobs]
    assert commands[0] == ["optim.lr=1e-3", "optim.weight_decay=0.0",
                           'output_dir="runs/quickstart/lr-1e-3_weight_decay-0.0"']
    assert len({tuple(c) for c in commands}) == 6
    assert sum(o["kind"] == "ConfigMap" for o in objects) == 1  # one frozen config; each Job adds its overrides


def test_dns_labels():
    assert dns_label("Quickstart_LoRA.v2") == "quickstart-lora-v2"
    assert dns_label("7b-run") == "run-7b-run"  # a Service name starts with a letter
    assert dns_label("___") == "run"
    a, b = dns_label("x" * 70 + "a"), dns_label("x" * 70 + "b")
    assert a != b and len(a) == len(b) == 63 and LABEL.match(a)


def test_errors_before_anything_is_written(capsys, tmp_path):
    out = tmp_path / "manifests"

    def launch(*argv):
        return k8s(capsys, "--gpus-per-node", "1", *argv)

    code, _, err = launch("--out", str(out))
    assert code == 2 and "launch.k8s.image" in err and "Dockerfile" in err
    code, _, err = launch(IMAGE, 'launch.k8s.tolerations=["nvidia.com/gpu"]', "--out", str(out))
    assert code == 2 and "KEY[=VALUE]:EFFECT" in err
    code, _, err = launch(IMAGE, 'launch.k8s.secret_env={HF_TOKEN="hf-token"}', "--out", str(out))
    assert code == 2 and '"secret-name/key"' in err
    code, _, err = launch(IMAGE, 'launch.k8s.memory="200GB"', "--out", str(out))
    assert code == 2 and "not a Kubernetes quantity" in err
    code, _, err = launch(IMAGE, "launch.k8s.imagee=1", "--out", str(out))
    assert code == 2 and "launch.k8s.image" in err  # the suggestion
    code, _, err = launch(IMAGE, "--slurm")
    assert code == 2 and "not both" in err
    assert not out.exists()
    assert main(["launch", "--config", QUICK, "--out", str(out)]) == 2 and "--out goes with --k8s" in \
        capsys.readouterr().err


def test_out_writes_one_file_to_apply(capsys, tmp_path):
    code, out, err = k8s(capsys, IMAGE, "--gpus-per-node", "1", "--out", str(tmp_path / "k"))
    assert code == 0, err
    path = tmp_path / "k" / "quickstart.yaml"
    assert out.strip() == f"kubectl apply -f {path}"
    assert [o["kind"] for o in yaml.safe_load_all(path.read_text())] == ["PersistentVolumeClaim", "ConfigMap",
                                                                        "Service", "Job"]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed here (the schemas are checked "
                    "by kubernetes-validate above)")
def test_kubectl_client_dry_run(capsys, tmp_path):
    k8s(capsys, IMAGE, "--gpus-per-node", "1", "--out", str(tmp_path))
    done = subprocess.run(["kubectl", "apply", "--dry-run=client", "--validate=false", "-f",
                           str(tmp_path / "quickstart.yaml")], capture_output=True, text=True, timeout=120)
    if "couldn't get current server API group list" in done.stderr:
        pytest.skip("kubectl's client dry-run still asks an API server for its resource types; none is reachable")
    assert done.returncode == 0, done.stderr


def test_node_environment_and_status():
    base = {"NNODES": "2", "MASTER_ADDR": "run-0.run", "MASTER_PORT": "29500", "NPROC_PER_NODE": "4"}
    assert node_from_env({**base, "JOB_COMPLETION_INDEX": "1"}) == (2, 1, 4, "run-0.run", "29500")
    assert node_from_env({**base, "NODE_RANK": "0", "JOB_COMPLETION_INDEX": "1"})[1] == 0
    with pytest.raises(ConfigError, match="NODE_RANK"):
        node_from_env(base)
    with pytest.raises(ConfigError, match="not a node"):
        node_from_env({**base, "NODE_RANK": "2"})
    # Every rank checkpointed (75), or some finished first: the node says 75; any other failure wins.
    assert exit_code([0, 0]) == 0 and exit_code([75, 75]) == 75 and exit_code([0, 75]) == 75
    assert exit_code([75, 1, -9]) == 1
    # The failure seen first, not the rank it got terminated (which died of SIGTERM, maybe after saying the same);
    # a rank killed by a signal as the shell writes it.
    assert exit_code([-15, 2], first_failure=2) == 2 and exit_code([-9, 0]) == 137


def test_a_node_whose_ranks_fail_says_so(tmp_path):
    """A node's ranks stop on a config error (status 2; the first to fail gets the other terminated, which may then
    not have said anything yet); the node exits with it, not 0 or 75."""
    # (Not this process's own: an earlier run in it may have set MASTER_ADDR and MASTER_PORT.)
    clean = {k: v for k, v in env().items() if k not in ("NNODES", "NODE_RANK", "JOB_COMPLETION_INDEX",
                                                         "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT")}
    node_env = {**clean, "NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
    done = subprocess.run([sys.executable, "-m", "automodel", "node", "--config", QUICK, "train.max_steps=-1",
                           f"output_dir={tmp_path}"], cwd=REPO, env=node_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "automodel node 0/1: ranks 0-1 of 2" in done.stderr and "error: " in done.stderr
    missing = subprocess.run([sys.executable, "-m", "automodel", "node", "--config", QUICK], cwd=REPO,
                             env={**clean, "NNODES": "2"}, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "MASTER_ADDR, MASTER_PORT, NODE_RANK (or JOB_COMPLETION_INDEX) not set" in \
        missing.stderr


TRAIN = ["schedule.warmup_steps=0", "train.log_every=1", "eval.generate_samples=0", "data.validation.limit=16",
         'logging.progress_bar="off"', "train.global_batch_size=16", "train.micro_batch_size=8",
         "train.max_steps=60"]


@pytest.mark.slow
def test_two_pod_run_is_evicted_exits_75_restarts_and_resumes_exactly(capsys, tmp_path):
    code, _, err = k8s(capsys, IMAGE, "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1", *TRAIN,
                       "launch.k8s.termination_grace_seconds=120", "--out", str(tmp_path / "manifests"))
    assert code == 0, err
    objects = list(yaml.safe_load_all((tmp_path / "manifests" / "quickstart.yaml").read_text()))
    validate(objects)
    job = LocalJob(objects, "quickstart", tmp_path / "cluster")
    run_dir = job.mounts["/workspace/runs/quickstart"]
    job.start()
    try:
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in job.procs.values()), job.log(0)
            time.sleep(0.2)
        job.evict(1)  # one node drained: its pod's ranks tell the others, and every rank checkpoints
        # Meanwhile the uninterrupted reference: the same 2 ranks on one machine, without pods.
        whole = tmp_path / "whole"
        ref = launch_run("torchrun", [*TRAIN, f"output_dir={whole}"], config=QUICK)
        assert ref.returncode == 0, ref.stderr[-3000:]
        assert job.wait() == "Complete", (job.events, job.log(0)[-3000:], job.log(1)[-3000:])
    finally:
        job.stop()
    # Both pods stopped with 75, were replaced without counting a failure, and finished.
    assert sorted(job.events) == [(0, 0, "Succeeded"), (0, 75, "Ignore"), (1, 0, "Succeeded"), (1, 75, "Ignore")]
    assert job.failures == 0
    log0, log1 = job.log(0), job.log(1)
    assert "automodel node 1/2: ranks 1-1 of 2" in log1
    # Rank 0 (which logs) was told by pod 1's rank, and both pods' ranks stopped at the same step.
    stopped = int(re.search(r"stopped at step (\d+) on a signal on another rank", log0).group(1))
    assert 3 <= stopped < 60
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()
    assert f"at step {stopped}" in log0.split(f"stopped at step {stopped}")[1]  # the new pods resumed there
    assert train_losses(run_dir) == train_losses(whole) and len(train_losses(whole)) == 60
    assert json.loads((run_dir / "summary.json").read_text())["eval_loss"] == \
        json.loads((whole / "summary.json").read_text())["eval_loss"]


@pytest.mark.slow
def test_a_real_failure_counts_against_the_backoff_limit_and_fails_the_job(capsys, tmp_path):
    """Not a preemption: both pods exit 2 (a config error), each failure counts (launch.k8s.backoff_limit = 1 is a
    backoffLimit of 2 for 2 pods), the replacements fail the same way, and the Job fails."""
    code, _, err = k8s(capsys, IMAGE, "--nodes", "2", "--gpus-per-node", "0", *TRAIN, "launch.k8s.backoff_limit=1",
                       "--out", str(tmp_path / "manifests"))
    assert code == 0, err
    objects = list(yaml.safe_load_all((tmp_path / "manifests" / "quickstart.yaml").read_text()))
    # The frozen config is broken after the fact (as an edited ConfigMap would be): every rank stops with status 2.
    objects[1]["data"]["config.toml"] = objects[1]["data"]["config.toml"].replace("max_steps = 60", "max_steps = -1")
    job = LocalJob(objects, "quickstart", tmp_path / "cluster")
    job.start()
    try:
        assert job.wait(timeout=300) == "Failed"
    finally:
        job.stop()
    assert job.failures == 3 and all(code == 2 and action == "Count" for _, code, action in job.events[:3])
    assert "train.max_steps" in job.log(0)
