"""A real two-node Slurm for the tests, on this one host: Debian's slurmctld, two slurmd (`slurmd -N`, each on its
own port; the nodes are named after loopback addresses, 127.0.0.1 and 127.0.0.2, so the first host of an allocation
is a rendezvous address that resolves) and munge, installed when missing (as root, about a minute), a slurm.conf
in a temporary directory (SLURM_CONF points the clients at it), started for the test session and shut down after
it. Both nodes say they have all of this host's CPUs (SlurmdParameters=config_overrides lets them). `start` returns
the reason instead when Slurm cannot run here."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Union

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _install() -> str:
    """'' when Slurm's binaries are on PATH (installing them if we may), else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get: apt-get install " + " ".join(PACKAGES) + ")"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = _run(install, env=env, timeout=900)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"], env=env, timeout=900)
        done = _run(install, env=env, timeout=900)
    if done.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}"
    return ""


MUNGE_PID = Path("/run/munge/munged.pid")


def _start_munge(root: Path) -> str:
    if _run(["bash", "-c", "munge -n | unmunge"]).returncode == 0:
        return ""  # already running: not ours to stop
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    started = _run(["runuser", "-u", "munge", "--", "munged"])
    if started.returncode != 0:
        started = _run(["munged", "--force"])
    for _ in range(50):
        if _run(["bash", "-c", "munge -n | unmunge"]).returncode == 0:
            (root / "munged.ours").touch()
            return ""
        time.sleep(0.1)
    return f"munged did not start: {started.stderr.strip()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


NODES = ("127.0.0.1", "127.0.0.2")


def write_conf(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for d in ("state", "log", *(f"spool/{n}" for n in NODES)):
        (root / d).mkdir(parents=True, exist_ok=True)
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} Port={_free_port()} CPUs={os.cpu_count()} RealMemory=10000 "
                      "State=UNKNOWN" for n in NODES)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=automodeltest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
AuthType=auth/munge
# Requeued jobs wait this long before starting again (default 120 s).
AuthInfo=cred_expire=10
SlurmUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=600
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start(root: Path) -> Union[dict, str]:
    """Starts the cluster; returns the environment for its clients (SLURM_CONF), or the reason it cannot run."""
    why = _install() or _start_munge(root)
    if why:
        return why
    conf = write_conf(root)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [["slurmctld", "-c", "-f", str(conf)], *(["slurmd", "-f", str(conf), "-N", n] for n in NODES)]
    for daemon in daemons:
        done = _run(daemon, env=env)
        if done.returncode != 0:
            stop(root, env)
            return f"{' '.join(daemon[:1] + daemon[3:])} did not start: {done.stderr.strip()[-500:]}"
    deadline = time.time() + 60
    while time.time() < deadline:
        states = _run(["sinfo", "-h", "-N", "-o", "%t"], env=env).stdout.split()
        if states == ["idle"] * len(NODES):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    logs = "".join(p.read_text()[-500:] for p in sorted((root / "log").glob("slurmd.*.log")))
    stop(root, env)
    return f"the Slurm nodes did not become idle within 60 s (sinfo: {states!r}); slurmd logs: {logs}"


def stop(root: Path, env: dict) -> None:
    _run(["scancel", "--full", "--user", "root"], env={**os.environ, **env})
    pid_files = [*(root / f"slurmd.{n}.pid" for n in NODES), root / "slurmctld.pid"]
    if (root / "munged.ours").exists():
        pid_files.append(MUNGE_PID)
    for pid_file in pid_files:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(1)
