"""A real single-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd as root.

Every daemon runs in the foreground as a child of the test process, with its state, spool, logs,
munge key and socket in one temporary directory and its own ports, so nothing of the machine's
own Slurm or munge configuration is read or changed. :meth:`SlurmCluster.stop` cancels the
cluster's jobs and stops the daemons by pid (SIGTERM, then SIGKILL), leaving nothing running.

Debian's ``slurm-wlm`` and ``munge`` packages provide the binaries (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers.distributed import free_port

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing_binaries() -> list[str]:
    """The Slurm/munge programs that are not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (apt-get install slurm-wlm munge)")
    return found


class SlurmCluster:
    """Start with :meth:`start`, use :meth:`sbatch` / :meth:`job` / :meth:`wait`, end with
    :meth:`stop` (or use it as a context manager)."""

    def __init__(self, root: Path, *, cpus: int = 2) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o700)
        key, sock = munge / "munge.key", munge / "munge.sock"
        subprocess.run(
            [_which("mungekey"), "--create", "--force", f"--keyfile={key}"],
            check=True,
            timeout=30,
            capture_output=True,
        )
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={munge / 'munged.log'}",
            ],  # fmt: skip
        )
        self._wait_for(sock.exists, timeout_s, "munged socket")
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(self._config(host, sock))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", host])

        self.wait_for_idle_node(timeout_s)
        return self

    def node_idle(self) -> bool:
        """Whether the node is idle: no job on it and no job still completing."""
        out = self._run(["sinfo", "--noheader", "--format=%t"], check=False).stdout
        return out.strip() == "idle"

    def wait_for_idle_node(self, timeout_s: float) -> None:
        self._wait_for(self.node_idle, timeout_s, "an idle Slurm node")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (by pid)."""
        if self.conf.exists() and any(p.poll() is None for _, p in self._daemons):
            self._run(["scancel", "--full", "--user", "root"], check=False)
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self._daemons):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._daemons.clear()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for _, proc in self._daemons]

    # -- jobs ------------------------------------------------------------------------------------

    def sbatch(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path) -> int:
        """Submit; returns the job id."""
        out = self._run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ...)."""
        out = self._run(["scontrol", "--oneliner", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def scontrol(self, *args: str) -> None:
        self._run(["scontrol", *args])

    def scancel(self, job_id: int) -> None:
        self._run(["scancel", str(job_id)])

    def wait(self, job_id: int, until, timeout_s: float, what: str) -> dict[str, str]:
        """Poll until ``until(job_dict)`` holds; a timeout names ``what`` and the job state."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id}: no {what} after {timeout_s} s (state {info.get('JobState')}, "
                    f"restarts {info.get('Restarts')})\n{self.logs()}"
                )
            time.sleep(1)

    def logs(self) -> str:
        """The tail of the daemons' logs (for failure messages)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    # -- internals -------------------------------------------------------------------------------

    def _config(self, host: str, munge_socket: Path) -> str:
        r = self.root
        return f"""\
ClusterName=megatron-edl-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (kept by the child)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self._daemons.append((name, proc))

    def _run(self, cmd, *, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
        full_env = {**self.env, **(env or {})}
        proc = subprocess.run(
            cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    out = (self.root / "log" / f"{name}.out").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{out[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"no {what} after {timeout_s} s\n{self.logs()}")
            time.sleep(0.5)
