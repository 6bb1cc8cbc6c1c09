"""A real one-node SLURM cluster on this machine (Debian's slurmctld, slurmd, munge), for
the tests and for trying the batch scripts locally: ``python tests/slurm_cluster.py up DIR``.

It runs its own munged (socket and key in DIR), slurmctld and slurmd on free ports with
state, spool and logs in DIR, so it leaves a system SLURM alone; ``down`` stops exactly
the daemons it started (by the pids it wrote). Needs root (slurmd runs jobs as any user)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged"]
SBIN = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]


class ClusterError(RuntimeError):
    pass


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_installed() -> None:
    """apt-get install the Debian packages when a binary is missing (root only)."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(f"SLURM binaries {missing} are missing and this is not root: "
                           f"apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0 and cmd[1] == "install":
            raise ClusterError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    still = [b for b in BINARIES if _which(b) is None]
    if still:
        raise ClusterError(f"after apt-get install, still missing: {still}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurmCluster:
    """``up()`` writes the config and starts the daemons; ``env`` is what a client needs
    (SLURM_CONF); ``down()`` stops them. Usable as a context manager."""

    def __init__(self, root: Path, cpus: Optional[int] = None):
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        # The node offers at least 4 CPUs so two 2-process jobs (a sweep's points) run
        # side by side on a 2-core machine; slurmd is told to accept the override.
        self.cpus = cpus or max(4, os.cpu_count() or 1)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        # The pids of the daemons this object started (the daemons' own pid files are
        # separate: slurmd deletes its file when it stops).
        self.pids: Dict[str, Path] = {n: self.root / f"{n}.started.pid" for n in ("munged", "slurmctld", "slurmd")}

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
            os.chmod(key, 0o600)
        ctld_port, d_port = _free_port(), _free_port()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=pretrain-local
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits until its credentials expire (default 120 s) before it starts again.
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/state/slurmctld.pid
SlurmdPidFile={r}/state/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# The scheduling loop every second (default 60): a requeued job starts as soon as its
# credential has expired instead of at the next minute's pass.
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _start(self, name: str, cmd) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        # Foreground daemons (munged -F, slurmctld/slurmd -D): the pid we get is theirs.
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids[name].write_text(str(p.pid))

    def up(self, timeout: float = 60) -> "LocalSlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterError("a local SLURM cluster needs root (slurmd starts jobs as their user)")
        self._write_config()
        m = self.root / "munge"
        self._start("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid.own'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") >= 1, timeout, "slurmctld")
        self._start("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "slurmd (node idle)")
        return self

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.strip()
        return out.startswith("idle") or out.startswith("mixed") or out.startswith("allocated")

    def _run(self, cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)

    def _wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, pid_file in self.pids.items():
                if pid_file.exists() and not _alive(int(pid_file.read_text())):
                    raise ClusterError(f"{name} exited while waiting for {what}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.exists():
                parts.append(f"== {f}\n{f.read_text()[-3000:]}")
        return "\n".join(parts)

    def down(self) -> None:
        ctld = self.pids["slurmctld"]
        if ctld.exists() and _alive(int(ctld.read_text())):
            # Jobs first (slurmd stopping would leave their steps running), then the daemons.
            self._run(["scancel", "--user", str(os.geteuid())], timeout=30)
            end = time.monotonic() + 30
            while self._run(["squeue", "-h"], timeout=30).stdout.strip() and time.monotonic() < end:
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            f = self.pids[name]
            if not f.exists():
                continue
            pid = int(f.read_text())
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
                end = time.monotonic() + 20
                while _alive(pid) and time.monotonic() < end:
                    time.sleep(0.2)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            f.unlink(missing_ok=True)

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child if it has exited
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that is not our child still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        sys.exit("usage: python tests/slurm_cluster.py up|down DIR")
    c = LocalSlurmCluster(Path(sys.argv[2]))
    if sys.argv[1] == "up":
        c.up()
        print(f"export SLURM_CONF={c.conf}")
    else:
        c.down()
