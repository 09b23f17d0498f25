"""A single-node SLURM on loopback for the test suite: munged, slurmctld and slurmd started directly.

No systemd and no accounting database: the daemons run in the foreground as children of
the test, with a private munge socket and key and a minimal slurm.conf (select/cons_tres,
one declared `gpu` gres so GPU-requesting rules schedule on a CPU-only machine). They are
stopped by PID on exit, so nothing is left behind.

The config goes to /etc/slurm/slurm.conf (removed again on exit) and not only to a private
path: snakemake-executor-plugin-slurm-jobstep strips every SLURM_* variable, SLURM_CONF
included, before its inner `srun`, which then only finds the default location. A machine
that already has /etc/slurm/slurm.conf is left alone and the test skips.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
CONF_DIR = Path("/etc/slurm")

SLURM_CONF = """\
ClusterName=evspec-test
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge.socket
SlurmUser=root
SlurmdUser=root
SlurmctldPort={port}
SlurmdPort={port_d}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def available() -> str | None:
    """None when a test cluster can start here, else the reason it cannot."""
    missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        return f"not installed: {missing} (.ci/run installs slurmctld slurmd slurm-client munge)"
    if (CONF_DIR / "slurm.conf").exists():
        return f"{CONF_DIR / 'slurm.conf'} exists: a real SLURM is configured here, the test will not touch it"
    if os.geteuid() != 0:
        return "the daemons must be started as root"
    return None


@dataclass
class Cluster:
    env: dict[str, str]  # the environment for client commands (sbatch, squeue, snakemake)
    state: Path  # logs (slurmctld.log lists every finished job) and spool

    @property
    def finished_jobs(self) -> set[str]:
        return set(re.findall(r"_job_complete: JobId=(\d+) done", (self.state / "slurmctld.log").read_text()))


@contextlib.contextmanager
def slurm_cluster(state: Path, port: int = 16817) -> Iterator[Cluster]:
    """Start the three daemons; yield what clients need to reach them."""
    for sub in ("ctld", "spool"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    key = state / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    memory_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    conf = CONF_DIR / "slurm.conf"
    conf.write_text(SLURM_CONF.format(state=state, port=port, port_d=port + 1, cpus=os.cpu_count(), memory_mb=memory_mb))
    (CONF_DIR / "gres.conf").write_text("NodeName=localhost Name=gpu Count=1 File=/dev/null\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    processes: list[subprocess.Popen] = []
    log = open(state / "daemons.out", "w")
    try:
        munge = ["munged", "-F", "--force", f"--socket={state}/munge.socket", f"--key-file={key}",
                 f"--pid-file={state}/munged.pid", f"--log-file={state}/munged.log", f"--seed-file={state}/munged.seed"]  # fmt: skip
        processes.append(subprocess.Popen(munge, stdout=log, stderr=log))
        _wait_for(lambda: (state / "munge.socket").exists(), "munged socket", state)
        processes.append(subprocess.Popen(["slurmctld", "-D", "-c", "-i", "-f", str(conf)], env=env, stdout=log, stderr=log))
        processes.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(conf)], env=env, stdout=log,
                                          stderr=log))  # fmt: skip
        _wait_for(lambda: _node_ready(env), "an idle node in sinfo", state)
        yield Cluster(env, state)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        for name in ("slurm.conf", "gres.conf"):
            (CONF_DIR / name).unlink(missing_ok=True)


def _node_ready(env: dict[str, str]) -> bool:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10)
    return result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc")


def _wait_for(condition, what: str, state: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in state.glob("*.log") if p.is_file())
    raise RuntimeError(f"SLURM test cluster: no {what} after {timeout_s} s\n{logs}")
