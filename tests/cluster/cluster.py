"""A real two-node Ray cluster on loopback, as `ray start` brings one up on two machines.

The head and a worker node each get their own temp dir; token authentication is on for the nodes,
the drivers and the job client (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). The worker node declares the
custom resource `trialnode` that the tests' trials require, so trials run there and nowhere else, and
it runs in its own mount namespace with a read-only tmpfs over the folder that holds the driver's
search folders: a trial writing there fails, as a write on another machine would miss the driver.
Every process a node starts stays in that node's session, and `stop` kills them by process id.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRIAL_RESOURCE = "trialnode"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_requirement() -> str | None:
    """Why this machine cannot run the cluster tests, or None (checked, never assumed)."""
    if sys.platform != "linux":
        return "the cluster tests need Linux mount namespaces (unshare --mount)"
    try:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "the cluster tests need `unshare` (util-linux)"
    if probe.returncode != 0:
        return f"`unshare --mount` with a tmpfs mount is not permitted here: {probe.stderr.strip()[:200]}"
    return None


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (a node's `ray start` and all it spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class Node:
    """One `ray start --block`, its session id being its pid (start_new_session)."""

    name: str
    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid)

    def started(self) -> bool:
        """`ray start` said its node is up (read from its log: no `ray list` process per poll)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        return "Ray runtime started." in self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the node, by process id."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM (Ray drains for up to 30 s: not waited for), then SIGKILL, each by process id."""
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.kill(signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.pids(), f"{self.name}: Ray processes left running: {self.pids()}"


@dataclass
class Cluster:
    """A head and a worker node; `env` is what a driver or job client needs to reach it."""

    root: Path
    driver_root: Path           # search folders of the drivers live here; the worker node cannot write it
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    head: Node | None = None
    worker: Node | None = None
    # the nodes' temp dirs: short, since Ray's unix socket paths in them must fit in 107 bytes
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="arc-", dir="/tmp")))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        bin_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # `python`: ours
        return {**os.environ, "PYTHONPATH": path, "PATH": bin_path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "RAY_ADDRESS": self.address, "OMP_NUM_THREADS": "1",
                # the head declares a lost node dead after 3 missed 1 s health checks (default 5 of 3 s)
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3", **extra}

    def _start(self, name: str, args: list[str], namespace_setup: str | None = None) -> Node:
        """`ray start --block ARGS`; with `namespace_setup`, run in a private mount namespace after that shell."""
        temp = self.temp / name
        log = self.root / f"{name}.log"
        command = [*RAY, "start", "--block", "--temp-dir", str(temp), "--object-store-memory", str(200 * 2**20),
                   "--include-log-monitor", "false", "--disable-usage-stats", *args]
        if namespace_setup is not None:
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f"{namespace_setup} && exec {' '.join(map(shlex.quote, command))}"]
        proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.root, start_new_session=True)
        return Node(name, proc, log)

    def start(self) -> Cluster:
        """The head, then the worker node."""
        self.head = self._start("head", [
            "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port), "--dashboard-host",
            "127.0.0.1", "--dashboard-port", str(self.dashboard_port), "--num-cpus", "1", "--num-gpus", "0",
            "--ray-client-server-port", str(free_port()),  # not the fixed 10001
            # each node's agent on its own port, not Ray's fixed 52365: the job server submits through the head's
            # agent, and a second cluster on the machine (or the worker node) holding 52365 left it without one
            # ("No available agent to submit job")
            "--dashboard-agent-listen-port", str(free_port())])
        self.wait(self.head.started, 180, "the head node")
        self.start_worker()
        return self

    def start_worker(self) -> None:
        """The worker node: its own mount namespace, the drivers' folder read-only and empty there."""
        alive = self.nodes()
        self.worker = self._start(
            "worker", ["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                       "--num-gpus", "0", "--resources", f'{{"{TRIAL_RESOURCE}": 2}}',
                       "--dashboard-agent-listen-port", str(free_port())],
            namespace_setup=f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(self.driver_root))}")
        self.wait(self.worker.started, 120, "the worker node")
        self.wait(lambda: self.nodes() > alive, 120, "the worker node to join")

    def kill_worker(self) -> None:
        """`kill -9` of every process of the worker node (a machine lost), until the head sees it dead."""
        lost, self.worker = self.worker, None
        lost.kill()
        lost.proc.wait(timeout=30)
        self.wait(lambda: self.nodes() == 1, 120, "the head to see the worker node dead")
        lost.stop()  # anything the kill left is gone, or this fails

    def worker_node_id(self) -> str:
        return next(n["node_id"] for n in self.list("nodes", "state=ALIVE") if not n["is_head_node"])

    def list(self, kind: str, *filters: str) -> list[dict]:
        """`ray list KIND --detail` as JSON, through the dashboard and the token."""
        args = [x for f in filters for x in ("--filter", f)]
        result = subprocess.run([*RAY, "list", kind, "--address", self.dashboard, "--detail", "--format", "json",
                                 "--limit", "10000", *args], capture_output=True, text=True, env=self.env(),
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"ray list {kind} failed: {result.stderr[-2000:]}")
        if result.stdout.startswith("No resource"):
            return []
        return json.loads(result.stdout)

    def nodes(self) -> int:
        """Alive nodes, as `ray list nodes` sees them (through the token)."""
        for node in (self.head, self.worker):
            if node is not None and node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited ({node.proc.returncode}):\n{node.log.read_text()[-3000:]}")
        try:
            return len(self.list("nodes", "state=ALIVE"))
        except (RuntimeError, json.JSONDecodeError, subprocess.TimeoutExpired):  # not up yet, or a busy machine
            return 0

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self) -> None:
        for node in (self.worker, self.head):
            if node is not None:
                node.stop()
        shutil.rmtree(self.temp, ignore_errors=True)


def cluster_search_args(cluster: Cluster, space: Path, out: Path, trials: int) -> list[str]:
    """`autorank search` on the cluster: trials need the worker node's custom resource, two at a time."""
    return ["search", "--config", str(space), "--model", "small_cnn", "--data", "digits", "--out", str(out),
            "--trials", str(trials), "--no-progress", "--executor", "ray", "--ray-address", cluster.address,
            "--trial-resources", f"cpu=1,{TRIAL_RESOURCE}=1", "--max-concurrent", "2"]


def run(cluster: Cluster, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`autorank ARGS` as a client of the cluster (its token, its address)."""
    return subprocess.run([sys.executable, "-m", "autorank", *args], capture_output=True, text=True,
                          env=cluster.env(), timeout=timeout, cwd=cluster.root)
