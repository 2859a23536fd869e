"""A local pod runner for the tests: what a kubelet and the Job controller would do with the manifests of
`automodel launch --k8s`, without a cluster.

Each pod of an Indexed Job is its container's command run as a process, with exactly the env the manifest gives
(the completion index through its fieldRef, Secrets through secretKeyRef) plus what Kubernetes adds
(JOB_COMPLETION_INDEX, HOSTNAME). What differs from a cluster, and how:
- the image: its `python` is this interpreter, its files are this checkout (the workdir links examples/ to it);
- volumes: a container path is a directory under the runner's root (one per claim, shared by the pods and kept
  across restarts; ConfigMaps written out as files), and mounts inside the workdir are links;
- the network: pods share this host's, so the headless Service's names <pod hostname>.<subdomain> (checked against
  the Service's selector) resolve to 127.0.0.1, and the declared container port is mapped to a free one.
A failed pod is judged by the Job's podFailurePolicy rules (Ignore, Count against backoffLimit, FailJob) and
replaced, as the Job controller does; `evict` is a preemption: DisruptionTarget, SIGTERM, SIGKILL after the grace.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tests.helpers import REPO, env, free_port


def _matches_selector(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class LocalJob:
    def __init__(self, objects: list[dict[str, Any]], job_name: str, root: Path,
                 secrets: Optional[dict[str, dict[str, str]]] = None):
        by_kind: dict[str, dict[str, dict]] = {}
        for obj in objects:
            by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
        self.job = by_kind["Job"][job_name]
        self.name, self.root, self.secrets = job_name, root, secrets or {}
        spec = self.job["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
        self.completions, self.backoff_limit = spec["completions"], spec.get("backoffLimit", 6)
        self.rules = spec.get("podFailurePolicy", {}).get("rules", [])
        template = spec["template"]
        self.pod_spec, labels = template["spec"], template["metadata"]["labels"]
        assert self.pod_spec["restartPolicy"] == "Never"
        [self.container] = self.pod_spec["containers"]
        # DNS: a headless Service named after the pods' subdomain, selecting them, publishes <hostname>.<subdomain>.
        service = by_kind["Service"][self.pod_spec["subdomain"]]
        assert service["spec"]["clusterIP"] == "None" and _matches_selector(service["spec"]["selector"], labels)
        self.dns = {f"{job_name}-{i}.{service['metadata']['name']}": "127.0.0.1" for i in range(self.completions)}
        self.ports = {str(p["containerPort"]): str(free_port()) for p in self.container.get("ports", [])}
        self.mounts = self._mount(by_kind)
        self.procs: dict[int, subprocess.Popen] = {}
        self.evicted: set[int] = set()
        self.kill_at: list[tuple[subprocess.Popen, float]] = []  # evicted pods past their grace period are killed
        self.events: list[tuple[int, int, str]] = []  # (index, exit code, action)
        self.failures = 0

    def _mount(self, by_kind: dict) -> dict[str, Path]:
        """Container path -> host path, for the workdir and every volume mount."""
        volumes = {v["name"]: v for v in self.pod_spec["volumes"]}
        workdir = Path(self.container["workingDir"])
        host_workdir = self.root / "workdir"
        host_workdir.mkdir(parents=True, exist_ok=True)
        for name in ("examples", "configs_toml"):  # the image's copy of the repository
            if not (host_workdir / name).exists():
                (host_workdir / name).symlink_to(REPO / name)
        mounts = {str(workdir): host_workdir}
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                host = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
                host.mkdir(parents=True, exist_ok=True)
            elif "configMap" in volume:
                host = self.root / "configmaps" / volume["configMap"]["name"]
                host.mkdir(parents=True, exist_ok=True)
                for key, text in by_kind["ConfigMap"][volume["configMap"]["name"]]["data"].items():
                    (host / key).write_text(text)
            else:  # emptyDir at /dev/shm: the host's
                continue
            inside = Path(mount["mountPath"])
            if workdir in inside.parents:
                link = host_workdir / inside.relative_to(workdir)
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(host)
            mounts[mount["mountPath"]] = host
        return mounts

    def host_path(self, value: str) -> str:
        for inside in sorted(self.mounts, key=len, reverse=True):
            if value == inside or value.startswith(inside.rstrip("/") + "/"):
                return str(self.mounts[inside]) + value[len(inside):]
        return value

    def _env(self, index: int) -> dict[str, str]:
        out = {**env(), "JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{self.name}-{index}"}
        for item in self.container.get("env", []):
            if "value" in item:
                value = item["value"]
                value = self.dns.get(value, self.ports.get(value, self.host_path(value)))
            elif "fieldRef" in item["valueFrom"]:
                path = item["valueFrom"]["fieldRef"]["fieldPath"]
                assert path == "metadata.annotations['batch.kubernetes.io/job-completion-index']", path
                value = str(index)
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]  # a missing Secret: the pod would not start either
            out[item["name"]] = value
        return out

    def _start(self, index: int) -> None:
        command = [self.host_path(a) for a in self.container["command"]]
        assert command[0] == "python", command
        log = open(self.root / f"{self.name}-{index}.log", "a")
        self.procs[index] = subprocess.Popen([sys.executable, *command[1:]], env=self._env(index),
                                             cwd=self.mounts[self.container["workingDir"]], stdout=log,
                                             stderr=subprocess.STDOUT)
        log.close()

    def _action(self, index: int, code: int) -> str:
        for rule in self.rules:
            on_codes, on_conditions = rule.get("onExitCodes"), rule.get("onPodConditions", [])
            if on_codes and on_codes.get("containerName", self.container["name"]) == self.container["name"]:
                hit = code in on_codes["values"]
                if hit == (on_codes["operator"] == "In"):
                    return rule["action"]
            if any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True" for c in on_conditions) \
                    and index in self.evicted:
                return rule["action"]
        return "Count"

    def start(self) -> None:
        for index in range(self.completions):
            self._start(index)

    def evict(self, index: int) -> None:
        """A preemption or eviction: the pod gets DisruptionTarget and SIGTERM; SIGKILL after its grace period."""
        self.evicted.add(index)
        self.procs[index].send_signal(signal.SIGTERM)
        self.kill_at.append((self.procs[index], time.time() + self.pod_spec.get("terminationGracePeriodSeconds", 30)))

    def wait(self, timeout: float = 600) -> str:
        """Runs the Job to the end: "Complete" or "Failed"."""
        done: set[int] = set()
        deadline = time.time() + timeout
        while len(done) < self.completions:
            assert time.time() < deadline, f"job {self.name} still running: {self.events}"
            for proc, kill_at in self.kill_at:
                if proc.poll() is None and time.time() > kill_at:
                    proc.kill()
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or index in done:
                    continue
                if code == 0:
                    done.add(index)
                    self.events.append((index, 0, "Succeeded"))
                    continue
                action = self._action(index, code)
                self.evicted.discard(index)
                self.events.append((index, code, action))
                if action == "Count":
                    self.failures += 1
                if action == "FailJob" or self.failures > self.backoff_limit:
                    for other in self.procs.values():
                        if other.poll() is None:
                            other.kill()
                    return "Failed"
                self._start(index)  # the replacement pod, same index
            time.sleep(0.2)
        return "Complete"

    def log(self, index: int) -> str:
        return (self.root / f"{self.name}-{index}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
