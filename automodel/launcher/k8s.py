"""Kubernetes manifests for a multi-node run that needs no operator: per run (or sweep task) an Indexed Job with one
pod per node and a headless Service that gives pod 0 a stable DNS name for the rendezvous; per launch a ConfigMap
holding the frozen config and a PersistentVolumeClaim mounted at output_dir.

Each pod runs `python -m automodel node` (automodel/launcher/node.py), which starts the node's ranks with their
RANK/WORLD_SIZE, and passes a SIGTERM (eviction, preemption) on to them: they checkpoint and the pod exits 75, and the
Job's podFailurePolicy recreates the pods without counting a failure; the new pods resume from the checkpoint.
"""

import hashlib
import re
from pathlib import PurePosixPath
from typing import Any, Sequence

import attrs

from automodel.config import ConfigError
from automodel.config.schema import K8sConfig
from automodel.exit_status import EXIT_PREEMPTED
from automodel.launcher import Topology

CONFIG_DIR = "/etc/automodel"  # where the ConfigMap is mounted
CONTAINER = "trainer"
JOB_LABEL = "automodel/job"
SWEEP_LABEL = "automodel/sweep"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
DNS_LABEL_MAX = 63


@attrs.frozen
class K8sRun:
    base_name: str                           # names the ConfigMap, the claim and (with a suffix) each Job
    config_toml: str                         # the frozen config every pod reads
    output_dir: str                          # the config's output_dir: where the volume is mounted
    topo: Topology
    k8s: K8sConfig
    tasks: tuple[tuple[str, ...], ...] = ((),)  # one Job per override set (a single run: one empty set)
    task_dirs: tuple[str, ...] = ()          # each sweep task's directory name (names its Job)
    source: str = ""


def dns_label(text: str, limit: int = DNS_LABEL_MAX) -> str:
    """A valid DNS-1035 label (lower-case letters, digits and '-', starting with a letter, at most `limit`
    characters) made from text; a name that had to be shortened ends in a hash of the whole text, so two long names
    that share a beginning stay distinct."""
    clean = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", text.lower())).strip("-")
    if not clean or not clean[0].isalpha():
        clean = f"run-{clean}".rstrip("-")
    return clean if len(clean) <= limit else _with_digest(clean, text, limit)


def _with_digest(name: str, text: str, limit: int) -> str:
    """`name` cut to end in a hash of `text`, within `limit` characters."""
    return f"{name[:limit - 7].rstrip('-')}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def job_names(run: K8sRun) -> list[str]:
    """One name per task, unique, short enough that each pod's hostname (<job>-<index>) is a valid label too."""
    limit = DNS_LABEL_MAX - 1 - len(str(run.topo.nodes - 1))
    if not run.task_dirs:
        return [dns_label(run.base_name, limit)]
    names: list[str] = []
    for i, d in enumerate(run.task_dirs):
        name = dns_label(f"{run.base_name}-{d}", limit)
        if name in names:  # two directories that differ only in case or punctuation
            name = _with_digest(name, f"{i}:{d}", limit)
        names.append(name)
    return names


def mount_path(run: K8sRun) -> str:
    out = PurePosixPath(run.output_dir)
    return str(out if out.is_absolute() else PurePosixPath(run.k8s.workdir) / out)


def _metadata(name: str, k: K8sConfig, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if k.namespace:
        meta["namespace"] = k.namespace
    meta["labels"] = {"app.kubernetes.io/name": "automodel", **labels}
    return meta


def _toleration(taint: str) -> dict[str, str]:
    key_value, _, effect = taint.rpartition(":")
    key, eq, value = key_value.partition("=")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def _env(run: K8sRun, job: str) -> list[dict[str, Any]]:
    k, t = run.k8s, run.topo
    hf_home = k.hf_home or f"{mount_path(run)}/.cache/huggingface"
    env: list[dict[str, Any]] = [
        {"name": "NNODES", "value": str(t.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(t.nproc_per_node)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}},
        # The headless Service publishes each pod as <hostname>.<subdomain>; pod 0 holds the rendezvous.
        {"name": "MASTER_ADDR", "value": f"{job}-0.{job}"},
        {"name": "MASTER_PORT", "value": str(k.port)},
        {"name": "HF_HOME", "value": hf_home},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": key, "value": value} for key, value in k.env.items()]
    for key, ref in k.secret_env.items():
        secret, _, item = ref.partition("/")
        env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": item}}})
    return env


def _resources(run: K8sRun) -> dict[str, Any]:
    k, t = run.k8s, run.topo
    amounts = {name: value for name, value in (("cpu", k.cpu), ("memory", k.memory)) if value}
    limits: dict[str, Any] = dict(amounts)
    if t.gpus_per_node:
        limits[k.gpu_resource] = t.gpus_per_node
    resources: dict[str, Any] = {}
    if amounts:
        resources["requests"] = dict(amounts)
    if limits:
        resources["limits"] = limits
    return resources


def _job(run: K8sRun, name: str, overrides: Sequence[str], claim: str, config_map: str) -> dict[str, Any]:
    k, t = run.k8s, run.topo
    labels = {JOB_LABEL: name}
    if run.task_dirs:
        labels[SWEEP_LABEL] = dns_label(run.base_name)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "workingDir": k.workdir,
        "command": [k.python, "-m", "automodel", "node", "--config", f"{CONFIG_DIR}/config.toml", *overrides],
        "env": _env(run, name),
        "ports": [{"name": "rendezvous", "containerPort": k.port}],
        "volumeMounts": [
            {"name": "output", "mountPath": mount_path(run)},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    resources = _resources(run)
    if resources:
        container["resources"] = resources
    volumes: list[dict[str, Any]] = [
        {"name": "output", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "config", "configMap": {"name": config_map}},
    ]
    if k.shm_size:
        container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}})
    pod: dict[str, Any] = {
        "subdomain": name,
        "restartPolicy": "Never",  # the Job makes new pods; podFailurePolicy needs Never
        "terminationGracePeriodSeconds": k.termination_grace_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    optional = {
        "serviceAccountName": k.service_account,
        "priorityClassName": k.priority_class,
        "nodeSelector": dict(k.node_selector),
        "tolerations": [_toleration(x) for x in k.tolerations],
        "imagePullSecrets": [{"name": x} for x in k.image_pull_secrets],
    }
    pod.update({key: value for key, value in optional.items() if value})
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": t.nodes,
        "parallelism": t.nodes,
        # One real failure ends every node's pod (the others lose their peer), so each counts once per node.
        "backoffLimit": k.backoff_limit * t.nodes,
        "podFailurePolicy": {"rules": [
            # The ranks stopped on SIGTERM/SIGUSR1 and wrote a checkpoint: new pods resume from it.
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [EXIT_PREEMPTED]}},
            # Evicted or preempted before the container could say so (a node drained or lost).
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if k.ttl_seconds_after_finished:
        spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(name, k, labels), "spec": spec}


def _service(run: K8sRun, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(name, run.k8s, {JOB_LABEL: name}),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            # The rendezvous name must resolve while the pods start, before anything is "ready".
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": run.k8s.port, "targetPort": run.k8s.port}],
        },
    }


def manifests(run: K8sRun) -> list[dict[str, Any]]:
    """Every object of the launch, in the order to apply them: claim, ConfigMap, then a Service and a Job per task."""
    k = run.k8s
    if not k.image:
        raise ConfigError("--k8s needs launch.k8s.image: an image with automodel installed (docs/k8s.md has a "
                          "Dockerfile), e.g. launch.k8s.image=\"registry.example.com/automodel:0.1\"")
    base = dns_label(run.base_name)
    config_map, claim = dns_label(f"{base}-config"), k.volume_claim or dns_label(f"{base}-output")
    objects: list[dict[str, Any]] = []
    if not k.volume_claim:
        storage: dict[str, Any] = {
            "accessModes": [k.volume_access_mode],
            "resources": {"requests": {"storage": k.volume_size}},
        }
        if k.storage_class:
            storage["storageClassName"] = k.storage_class
        objects.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": _metadata(claim, k, {}), "spec": storage})
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(config_map, k, {}),
                    "data": {"config.toml": run.config_toml}})
    for name, overrides in zip(job_names(run), run.tasks):
        objects += [_service(run, name), _job(run, name, overrides, claim, config_map)]
    return objects


def render(run: K8sRun) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):  # the config reads as TOML in the manifest: a literal block, not one escaped line
        pass

    def string(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)

    Dumper.add_representer(str, string)
    header = (f"# Written by `automodel launch --k8s`{' from ' + run.source if run.source else ''}.\n"
              f"# {run.topo.nodes} pod(s), one per node, x {run.topo.nproc_per_node} rank(s) = "
              f"{run.topo.world_size} rank(s); apply with: kubectl apply -f <this file>\n")
    return header + yaml.dump_all(manifests(run), Dumper=Dumper, sort_keys=False, width=120)
