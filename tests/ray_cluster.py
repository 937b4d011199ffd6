"""A two-node Ray cluster on this machine, for the cluster tests (`cluster` fixture): Ray 2.60 in token-auth mode,
its own temp dirs and ports beside the test session's local Ray, the worker node (where `unshare` allows) in its own
mount namespace without the session's temp root, and a teardown that kills exactly its processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any RAY_* variable (the session's own `ray.init` exports RAY_AUTH_MODE=token),
    with the venv first on PATH so the job's `python` is this one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Cluster:
    address: str  # Jobs API (dashboard)
    gcs: str  # what a driver connects to (cluster.address)
    token: str
    token_file: Path
    nodes: list[subprocess.Popen]  # head, worker
    root: Path
    hidden: Path | None  # hidden from the worker node (None: unshare unusable here, the nodes share every path)

    def env(self, **extra: str) -> dict[str, str]:
        """A client that finds the token the way users' machines do (here RAY_AUTH_TOKEN_PATH), RAY_AUTH_MODE unset."""
        return _clean_env(RAY_AUTH_TOKEN_PATH=str(self.token_file), **extra)

    def tiderl(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "rl.launch.cli", *args]
        return subprocess.run(
            cmd, check=False, cwd=REPO, env=env or self.env(), capture_output=True, text=True, timeout=timeout
        )

    def api(self, path: str, **params) -> dict:
        """The dashboard's REST API directly (an oracle independent of tiderl)."""
        r = requests.get(
            self.address + path, params=params, headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        r.raise_for_status()
        return r.json()

    def alive_nodes(self) -> list[str]:
        rows = self.api("/api/v0/nodes", limit=100)["data"]["result"]["result"]
        return [n["node_id"] for n in rows if n["state"] == "ALIVE"]

    def job_actors(self, submission_id: str) -> list[dict]:
        return self.actors_of(self.api(f"/api/jobs/{submission_id}")["driver_info"]["id"])

    def driver_job(self, pid: int) -> str:
        """The Ray job id of the driver process `pid` (a driver started by hand, not submitted)."""
        for job in self.api("/api/jobs/"):
            if job["type"] == "DRIVER" and int(job["driver_info"]["pid"]) == pid:
                return job["driver_info"]["id"]
        raise LookupError(f"no driver with pid {pid} on the cluster")

    def actors_of(self, job_id: str) -> list[dict]:
        query = {"limit": 100, "filter_keys": "job_id", "filter_predicates": "=", "filter_values": job_id}
        return self.api("/api/v0/actors", **query)["data"]["result"]["result"]

    def released(self, job_id: str) -> bool:
        """Every actor of the job dead and its placement group removed: its CPUs are free for the next driver."""
        groups = [
            g
            for g in self.api("/api/v0/placement_groups", limit=100)["data"]["result"]["result"]
            if g["creator_job_id"] == job_id
        ]
        return all(a["state"] == "DEAD" for a in self.actors_of(job_id)) and all(
            g["state"] == "REMOVED" for g in groups
        )

    def wait_status(self, submission_id: str, wanted: set[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.api(f"/api/jobs/{submission_id}")["status"]
            if status in wanted or time.monotonic() > deadline:
                return status
            time.sleep(0.5)


def _start_node(args: list[str], env: dict[str, str], log: Path, hide: Path | None = None) -> subprocess.Popen:
    """`ray start --block` (in the foreground as the parent of the node's processes); its own session, so a
    Ctrl-C in the terminal does not reach it. With `hide`, in its own mount namespace with an empty tmpfs over
    `hide` (unshare and sh exec, so the pid is still `ray start`'s; the tmpfs goes with the node's last process)."""
    cmd = [str(BIN / "ray"), "start", "--block", *args]
    with log.open("w") as out:
        return subprocess.Popen(
            _hiding(hide, cmd) if hide else cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _hiding(path: Path, cmd: list[str]) -> list[str]:
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs tiderl-hidden "$0" && exec "$@"',
        str(path),
        *cmd,
    ]


def _can_hide(path: Path) -> bool:
    """Whether this user may mount in a mount namespace of its own (root, or CAP_SYS_ADMIN)."""
    return (
        bool(shutil.which("unshare"))
        and subprocess.run(_hiding(path, ["true"]), check=False, capture_output=True).returncode == 0
    )


def _kill_tree(procs: list[subprocess.Popen]) -> list[int]:
    """Stop each node: SIGTERM to every process under its `ray start` (Ray's workers and job drivers are
    descendants of its raylet, each in its own session, so a process group would miss them), then SIGKILL what
    is left. Returns the pids still alive afterwards (none expected)."""
    import psutil

    tree: list[psutil.Process] = []
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            tree += [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    for proc in procs:
        proc.wait(timeout=10)
    return [p.pid for p in alive]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    # short paths: Ray's unix sockets live under the temp dir (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="tiderl-ray-", dir="/tmp"))
    token = uuid.uuid4().hex + uuid.uuid4().hex
    token_file = root / "auth_token"
    token_file.write_text(token)
    gcs_port, dash_port, client_port, head_agent, worker_agent = (_free_port() for _ in range(5))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"]
    # head: RAY_AUTH_MODE unset, as a plain `ray start --head`; a token is available, so Ray turns token auth on
    head = _start_node(
        [
            "--head",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash_port),
            "--ray-client-server-port",
            str(client_port),
            "--dashboard-agent-listen-port",
            str(head_agent),
            "--temp-dir",
            str(root / "head"),
            *common,
        ],
        _clean_env(RAY_AUTH_TOKEN_PATH=str(token_file)),
        root / "head.log",
    )
    nodes = [head]
    hidden = (
        tmp_path_factory.getbasetemp() if _can_hide(tmp_path_factory.getbasetemp()) else None
    )  # every tmp_path and the cache_dir
    c = Cluster(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", token, token_file, nodes, root, hidden)
    try:
        _wait(lambda: _answers(c), 60, head, root / "head.log")
        # a worker node does not turn token mode on by itself in Ray 2.60 (it would be refused by the GCS).
        # Its own temp dir: two nodes sharing one would share runtime_resources/, and each node's agent re-extracts
        # the job's working_dir there, deleting the directory under the running driver.
        worker = _start_node(
            [
                "--address",
                f"127.0.0.1:{gcs_port}",
                "--dashboard-agent-listen-port",
                str(worker_agent),
                "--temp-dir",
                str(root / "worker"),
                *common,
            ],
            _clean_env(RAY_AUTH_TOKEN_PATH=str(token_file), RAY_AUTH_MODE="token"),
            root / "worker.log",
            hide=hidden,
        )
        nodes.append(worker)
        _wait(lambda: len(c.alive_nodes()) == 2, 60, worker, root / "worker.log")
        yield c
    finally:
        left = _kill_tree(nodes)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster still alive after teardown: {left}"


def _answers(c: Cluster) -> bool:
    try:
        return bool(c.alive_nodes())
    except requests.RequestException:
        return False


def _wait(ready, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Ray node did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
