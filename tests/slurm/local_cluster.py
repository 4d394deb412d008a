"""A throwaway one-node Slurm cluster with accounting (slurmdbd + MariaDB) for tests/slurm.

Needs root and the packages from `.ci/install-slurm.sh`. Every file lives under one folder, and `start` links
/etc/slurm/slurm.conf to the config there (`stop` restores what was there before): `SLURM_CONF` alone is not enough,
because snakemake-executor-plugin-slurm-jobstep drops every SLURM_* variable before it calls `srun` inside a job.

    python tests/slurm/local_cluster.py start|stop|status [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "hdlocal"
PARTITION = "debug"
ACCOUNT = "hd-test"
DEFAULT_DIR = Path(os.environ.get("HD_SLURM_DIR", "/tmp/hybrid-distill-slurm"))
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")  # the compiled-in path every Slurm client falls back to
REQUIRED_PROGRAMS = (
    "munged", "munge", "unmunge", "mariadbd", "mariadb", "mariadb-admin", "mariadb-install-db",
    "slurmdbd", "slurmctld", "slurmd", "sinfo", "sacctmgr", "sacct", "sbatch", "runuser",
)
# Daemons in start order; `stop` walks it backwards. munged appears only when this module started it.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
READY_NODE_STATES = {"idle", "mix", "mixed", "alloc", "allocated"}


class ClusterError(RuntimeError):
    """The local cluster could not be started or stopped; the message says which step failed."""


def missing_requirements() -> list[str]:
    """What stops this machine from running the cluster at all: not root, or programs not installed."""
    problems = [] if os.geteuid() == 0 else ["not running as root"]
    missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if missing:
        problems.append(f"programs not found: {', '.join(missing)} (run .ci/install-slurm.sh)")
    return problems


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_memory_mb() -> int:
    """Total memory less a margin, so that slurmd never reports less than the config claims."""
    with open("/proc/meminfo") as meminfo:
        total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    total_mb = total_kb // 1024
    return max(256, total_mb - max(256, total_mb // 20))


def _process_alive(pid: int, name: str) -> bool:
    """True if `pid` runs and is `name` (a stale pid file may point at an unrelated process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state = stat[stat.rindex(")") + 2]
    return state != "Z" and comm == name[:15]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"--- {path}: (no log)"
    return f"--- {path} (last {lines} lines):\n" + "\n".join(text[-lines:])


@dataclass
class LocalCluster:
    root: Path = DEFAULT_DIR

    def __post_init__(self):
        self.root = Path(self.root).absolute()
        self.etc, self.run_dir, self.log_dir = self.root / "etc", self.root / "run", self.root / "log"
        self.mysql_dir = self.root / "mysql"
        self.conf = self.etc / "slurm.conf"
        self.settings_file = self.etc / "cluster.json"
        self.system_conf_backup = self.etc / "system-slurm.conf.backup"

    @property
    def env(self) -> dict[str, str]:
        """The variables a client (sbatch, sacct, Snakemake and its children) needs to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def pid_file(self, daemon: str) -> Path:
        return self.mysql_dir / "mariadbd.pid" if daemon == "mariadbd" else self.run_dir / f"{daemon}.pid"

    def pid(self, daemon: str) -> int | None:
        """The PID of a running daemon of this cluster, or None."""
        try:
            pid = int(self.pid_file(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _process_alive(pid, daemon) else None

    def status(self) -> dict[str, int | None]:
        return {daemon: self.pid(daemon) for daemon in DAEMONS}

    # ---- start -------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 90) -> bool:
        """Bring every daemon up (reusing running ones) and wait for the node; True if anything was started."""
        problems = missing_requirements()
        if problems:
            raise ClusterError("; ".join(problems))
        for folder in reversed(self.root.parents):
            if folder.exists() and not folder.stat().st_mode & 0o001:
                raise ClusterError(f"{folder} is not searchable by others, so the mysql user cannot reach "
                                   f"{self.mysql_dir}; pick another --dir (or HD_SLURM_DIR)")
        running = {daemon for daemon, pid in self.status().items() if pid}
        if not running - {"munged"}:
            self._write_configs()
        elif not self.conf.exists():
            raise ClusterError(f"daemons run but {self.conf} is missing; run `stop --dir {self.root}` first")
        owned_system_conf = self.owns_system_conf()
        started: list[str] = []
        try:
            self._bring_up(running, started, time.monotonic() + timeout_s)
        except BaseException:
            # Leave the machine as it was: stop only what this call started.
            self.stop(only=started)
            if not owned_system_conf:
                self._restore_system_conf()
            raise
        return bool(started)

    def _bring_up(self, running: set[str], started: list[str], deadline: float):
        self._install_system_conf()
        if self._start_munge():
            started.append("munged")
        if "mariadbd" not in running:
            self._start_mariadb(deadline)
            started.append("mariadbd")
        if "slurmdbd" not in running:
            self._run_daemon("slurmdbd")
            started.append("slurmdbd")
        self._wait_for(deadline, "slurmdbd to answer sacctmgr", self._dbd_answers)
        self._register_accounting()
        for daemon in ("slurmctld", "slurmd"):
            if daemon not in running:
                self._run_daemon(daemon)
                started.append(daemon)
        self._wait_for(deadline, f"node {socket.gethostname().split('.')[0]} to be idle", self._node_ready)

    def owns_system_conf(self) -> bool:
        return SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == self.conf

    def _install_system_conf(self):
        """Point /etc/slurm/slurm.conf at this cluster's config, keeping any existing file to restore on stop."""
        if self.owns_system_conf():
            return
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            if self.system_conf_backup.exists() or self.system_conf_backup.is_symlink():
                raise ClusterError(f"{SYSTEM_CONF} belongs to something else and {self.system_conf_backup} "
                                   "already holds a backup; restore one of them by hand")
            shutil.move(SYSTEM_CONF, self.system_conf_backup)
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)

    def _restore_system_conf(self):
        if self.owns_system_conf():
            SYSTEM_CONF.unlink()
        if self.system_conf_backup.exists() or self.system_conf_backup.is_symlink():
            if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
                raise ClusterError(f"cannot restore {self.system_conf_backup}: {SYSTEM_CONF} was replaced meanwhile")
            shutil.move(self.system_conf_backup, SYSTEM_CONF)

    def _settings(self) -> dict:
        if self.settings_file.exists():
            return json.loads(self.settings_file.read_text())
        settings = {"db_password": secrets.token_hex(16)}
        self.etc.mkdir(parents=True, exist_ok=True)
        self.settings_file.write_text(json.dumps(settings))
        self.settings_file.chmod(0o600)
        return settings

    def _write_configs(self):
        for folder in (self.root, self.etc, self.run_dir, self.log_dir, self.root / "state", self.root / "spool"):
            folder.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # mariadbd runs as `mysql` and must reach its datadir
        settings = self._settings()
        settings["ports"] = {name: _free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadbd")}
        self.settings_file.write_text(json.dumps(settings))
        host, ports = socket.gethostname().split(".")[0], settings["ports"]
        self.conf.write_text(f"""\
# Written by tests/slurm/local_cluster.py; rewritten on every cold start.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
PropagateResourceLimits=NONE
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
ReturnToService=2
MinJobAge=60
MailProg=/bin/true
KillWait=5
InactiveLimit=0
Waittime=0
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.pid_file('slurmctld')}
SlurmdPidFile={self.pid_file('slurmd')}
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={len(os.sched_getaffinity(0))} RealMemory={_node_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        dbd_conf = self.etc / "slurmdbd.conf"  # slurmdbd reads it next to $SLURM_CONF
        dbd_conf.touch(mode=0o600)
        dbd_conf.chmod(0o600)
        dbd_conf.write_text(f"""\
AuthType=auth/munge
DbdHost={host}
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={self.pid_file('slurmdbd')}
LogFile={self.log_dir}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadbd']}
StorageUser=slurm
StoragePass={settings['db_password']}
StorageLoc=slurm_acct_db
""")

    def _start_munge(self) -> bool:
        if self._munge_works():
            return False
        munge_user = pwd.getpwnam("munge")
        socket_dir = Path("/run/munge")
        socket_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(socket_dir, munge_user.pw_uid, munge_user.pw_gid)
        self._check(["runuser", "-u", "munge", "--", "munged"], "munged")
        system_pid_file = socket_dir / "munged.pid"
        for _ in range(50):
            if self._munge_works() and system_pid_file.exists():
                self.run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(system_pid_file, self.pid_file("munged"))
                return True
            time.sleep(0.1)
        raise ClusterError("munged started but `munge -n | unmunge` still fails\n"
                           + _tail(Path("/var/log/munge/munged.log")))

    @staticmethod
    def _munge_works() -> bool:
        credential = subprocess.run(["munge", "-n"], capture_output=True)
        if credential.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=credential.stdout, capture_output=True).returncode == 0

    def _mariadb_client(self, *args: str) -> list[str]:
        return [args[0], "--no-defaults", f"--socket={self.mysql_dir / 'mysqld.sock'}", "--user=root", *args[1:]]

    def _start_mariadb(self, deadline: float):
        mysql_user = pwd.getpwnam("mysql")
        datadir = self.mysql_dir / "data"
        self.mysql_dir.mkdir(exist_ok=True)
        os.chown(self.mysql_dir, mysql_user.pw_uid, mysql_user.pw_gid)
        log = self.log_dir / "mariadb.log"
        if not (datadir / "mysql").is_dir():
            self._check(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                         "--auth-root-authentication-method=socket", "--skip-test-db"], "mariadb-install-db")
        port = json.loads(self.settings_file.read_text())["ports"]["mariadbd"]
        with open(log, "ab") as log_stream:
            # setsid --fork detaches mariadbd from this process, like the Slurm daemons that fork themselves.
            subprocess.run(
                ["setsid", "--fork", "mariadbd", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                 f"--socket={self.mysql_dir / 'mysqld.sock'}", f"--pid-file={self.pid_file('mariadbd')}",
                 f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                 f"--log-error={log}", "--innodb-lock-wait-timeout=900"],
                stdin=subprocess.DEVNULL, stdout=log_stream, stderr=log_stream, check=True,
            )
        ping = self._mariadb_client("mariadb-admin", "ping")
        self._wait_for(deadline, "MariaDB to answer",
                       lambda: subprocess.run(ping, capture_output=True).returncode == 0 and self.pid("mariadbd"))
        password = json.loads(self.settings_file.read_text())["db_password"]
        grants = "".join(
            f"CREATE USER IF NOT EXISTS 'slurm'@'{host}' IDENTIFIED BY '{password}';"
            f"ALTER USER 'slurm'@'{host}' IDENTIFIED BY '{password}';"
            f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{host}';"
            for host in ("localhost", "127.0.0.1")
        )
        self._check(self._mariadb_client("mariadb", "-e", grants), "creating the MariaDB user slurm")

    def _run_daemon(self, daemon: str):
        """Start a Slurm daemon; each forks into the background and writes its own pid file."""
        self._check([daemon], daemon)
        for _ in range(50):
            if self.pid(daemon):
                return
            time.sleep(0.1)
        raise ClusterError(f"{daemon} exited right after starting\n" + _tail(self.log_dir / f"{daemon}.log"))

    def _dbd_answers(self) -> bool:
        return self._sacctmgr("-n", "list", "cluster", "format=cluster").returncode == 0

    def _register_accounting(self):
        """Register the cluster, the test account and root's association, each only if missing."""
        def listed(*query: str) -> bool:
            return bool(self._sacctmgr("-n", "-P", "list", *query).stdout.strip())

        steps = [
            (("cluster", CLUSTER_NAME, "format=cluster"), ("add", "cluster", CLUSTER_NAME)),
            (("account", ACCOUNT, "format=account"),
             ("add", "account", ACCOUNT, f"cluster={CLUSTER_NAME}", "description=hybrid-distill tests",
              "organization=hybrid-distill")),
            (("assoc", f"cluster={CLUSTER_NAME}", f"account={ACCOUNT}", "user=root", "format=user"),
             ("add", "user", "root", f"account={ACCOUNT}", f"cluster={CLUSTER_NAME}")),
        ]
        for query, command in steps:
            if not listed(*query):
                result = self._sacctmgr("-i", *command)
                if result.returncode != 0 or not listed(*query):
                    raise ClusterError(f"`sacctmgr -i {' '.join(command)}` failed: {result.stdout}{result.stderr}")

    def _sacctmgr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sacctmgr", *args], capture_output=True, text=True, env=self._client_env(), timeout=30)

    def _node_ready(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%t"], capture_output=True, text=True,
                                env=self._client_env(), timeout=30)
        states = result.stdout.split()
        return result.returncode == 0 and bool(states) and all(s.rstrip("*~#") in READY_NODE_STATES for s in states)

    def _wait_for(self, deadline: float, what: str, ready):
        while not ready():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.5)

    def _check(self, command: list[str], step: str):
        result = subprocess.run(command, capture_output=True, text=True, env=self._client_env(),
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise ClusterError(f"{step} failed (exit {result.returncode}): {output}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        """Daemon states, sinfo's reasons and the tail of every daemon log, for error messages."""
        parts = [", ".join(f"{daemon}={pid or 'not running'}" for daemon, pid in self.status().items())]
        if self.conf.exists() and shutil.which("sinfo"):
            reasons = subprocess.run(["sinfo", "-N", "-o", "%N %t %E"], capture_output=True, text=True,
                                     env=self._client_env(), timeout=30)
            parts.append(f"--- sinfo: {reasons.stdout.strip()} {reasons.stderr.strip()}")
        logs = ("slurmctld.log", "slurmd.log", "slurmdbd.log", "mariadb.log")
        parts += [_tail(self.log_dir / name) for name in logs]
        return "\n".join(parts)

    # ---- stop --------------------------------------------------------------------------------------------

    def stop(self, grace_s: float = 20, only: list[str] | None = None):
        """Stop the daemons of this cluster (all, or `only` these) by the PIDs in their pid files, newest first."""
        for daemon in reversed(DAEMONS):
            if only is not None and daemon not in only:
                continue
            pid = self.pid(daemon)
            if pid:
                os.kill(pid, signal.SIGTERM)
                stop_by = time.monotonic() + grace_s
                while _process_alive(pid, daemon) and time.monotonic() < stop_by:
                    time.sleep(0.1)
                if _process_alive(pid, daemon):
                    os.kill(pid, signal.SIGKILL)
            if daemon == "munged":  # only our record; munged removes its own pid file
                self.pid_file(daemon).unlink(missing_ok=True)
        if only is None:
            self._restore_system_conf()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"cluster folder (default {DEFAULT_DIR})")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for the node (start)")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    if args.action == "start":
        began = time.monotonic()
        try:
            started = cluster.start(args.timeout)
        except ClusterError as error:
            print(f"local Slurm did not start: {error}", file=sys.stderr)
            return 1
        verb = "started" if started else "already running"
        print(f"# {verb} in {time.monotonic() - began:.1f} s: partition {PARTITION}, account {ACCOUNT}; "
              f"{SYSTEM_CONF} -> {cluster.conf}")
        print(f"export SLURM_CONF={cluster.conf}  # optional: clients also read {SYSTEM_CONF}")
    elif args.action == "stop":
        try:
            cluster.stop()
        except ClusterError as error:
            print(f"local Slurm stop: {error}", file=sys.stderr)
            return 1
        print(f"# stopped the cluster in {cluster.root}")
    else:
        states = cluster.status()
        for daemon, pid in states.items():
            note = " (started by this cluster)" if daemon == "munged" and pid else ""
            print(f"{daemon:10} {pid or 'not running'}{note}")
        print(f"{SYSTEM_CONF} -> {'this cluster' if cluster.owns_system_conf() else 'not this cluster'}")
        return 0 if all(pid for daemon, pid in states.items() if daemon != "munged") else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
