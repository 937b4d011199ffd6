"""`tiderl submit / status / logs / stop` against a real two-node Ray cluster started on this machine, a job's
driver killed while writing a checkpoint and resumed, and the submission planning (paths, run directory,
entrypoint, auth token) without a cluster.

The cluster is Ray 2.60 in token-auth mode, as a head started with default settings becomes when a token exists
(here: RAY_AUTH_TOKEN_PATH, so the test never touches ~/.ray). It runs beside the test session's own local Ray
(`ray_local`): its own temp dirs and ports, and teardown kills exactly its processes (`ray stop` would kill every
Ray of the user). Where `unshare` can make a mount namespace (root), the worker node runs in its own, with an
empty tmpfs over the session's temp root: it sees neither the drivers' run directories nor their policy cache,
as a node without a shared filesystem."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from rl.config import load_config
from rl.launch.jobs import JobsError, cluster_path, local_token, plan_submission, resolve_address
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_OVERRIDES = [*TINY_OVERRIDES, "eval.enabled=false"]


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


def _submitted_id(out: str) -> str:
    match = re.search(r"^submitted job (\S+)$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def _assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------ on the cluster


def test_submit_runs_the_job_on_the_cluster(cluster: Cluster, cache_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = cluster.tiderl(
        "submit",
        "configs/calculator.yaml",
        *JOB_OVERRIDES,
        f"warm_start.cache_dir={cache_dir}",
        "--address",
        cluster.address,
        "--run-dir",
        str(run_dir),
        "--follow",
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    job = _submitted_id(out)
    assert f"run directory (on the cluster): {run_dir}" in out
    assert f"tiderl logs {job} --follow --address {cluster.address}" in out
    printed_run_dir = re.compile(r"run directory:\s+" + re.escape(str(run_dir)))  # the driver's console may wrap it
    assert printed_run_dir.search(out)  # streamed from the job's driver
    assert f"job {job}: SUCCEEDED" in result.stderr + out

    status = cluster.tiderl("status", job, "--address", cluster.address)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^status:\s+SUCCEEDED$", status.stdout, re.MULTILINE), status.stdout
    assert (
        f"run directory: {run_dir}" in status.stdout
        and "python -m rl.launch.cli train configs/calculator.yaml" in status.stdout
    )

    logs = cluster.tiderl("logs", job, "--address", cluster.address)
    assert logs.returncode == 0, logs.stderr
    assert "Connected to Ray cluster" in logs.stdout  # the driver joined this cluster, not a local Ray of its own
    assert printed_run_dir.search(logs.stdout)

    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert any((run_dir / "checkpoints").iterdir())

    actors = cluster.job_actors(job)
    names = {a["class_name"] for a in actors}
    assert any("Learner" in n for n in names) and any("Rollout" in n for n in names), names
    assert {a["node_id"] for a in actors} <= set(cluster.alive_nodes())

    table = cluster.tiderl("status", "--address", cluster.address)
    assert table.returncode == 0 and job in table.stdout and "SUCCEEDED" in table.stdout, table.stdout


def test_stop_ends_a_running_job(cluster: Cluster, cache_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "long"
    result = cluster.tiderl(
        "submit",
        "configs/calculator.yaml",
        *JOB_OVERRIDES,
        "trainer.steps=500",
        f"warm_start.cache_dir={cache_dir}",
        "--address",
        cluster.address,
        "--run-dir",
        str(run_dir),
        "--job-id",
        "long-job",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert _submitted_id(result.stdout) == "long-job"
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):  # training, not just starting
        assert time.monotonic() < deadline and cluster.wait_status("long-job", set(), timeout=0) in {
            "PENDING",
            "RUNNING",
        }
        time.sleep(0.5)

    stopped = cluster.tiderl("stop", "long-job", "--address", cluster.address)
    assert stopped.returncode == 0, stopped.stderr
    assert "job long-job stopped: STOPPED" in stopped.stdout
    assert cluster.api("/api/jobs/long-job")["status"] == "STOPPED"
    again = cluster.tiderl("stop", "long-job", "--address", cluster.address)
    assert "had already ended: STOPPED" in again.stdout


def test_follow_exits_nonzero_when_the_job_fails(cluster: Cluster):
    result = cluster.tiderl(
        "submit",
        "configs/calculator.yaml",
        *JOB_OVERRIDES,
        "--address",
        cluster.address,
        "--resume",
        "/nonexistent/run",
        "--follow",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--resume /nonexistent/run: no such run directory" in result.stdout  # the job's own error, streamed
    assert "FAILED" in result.stderr


def test_bad_job_id_and_unreachable_address_are_clear_errors(cluster: Cluster):
    for command in ("status", "logs", "stop"):
        _assert_clean_error(
            cluster.tiderl(command, "no-such-job", "--address", cluster.address), "no job 'no-such-job'"
        )
    dead = f"http://127.0.0.1:{_free_port()}"
    for command in (["status"], ["logs", "x"], ["submit", "configs/calculator.yaml"]):
        _assert_clean_error(cluster.tiderl(*command, "--address", dead), f"cannot reach the Ray Jobs API at {dead}")
    _assert_clean_error(cluster.tiderl("status"), "no cluster address")
    # the address may come from the environment, as for `ray job`
    assert cluster.tiderl("status", env=cluster.env(RAY_API_SERVER_ADDRESS=cluster.address)).returncode == 0


def test_token_auth(cluster: Cluster, tmp_path: Path):
    # what Ray 2.60's own client does: with RAY_AUTH_MODE unset it sends no token, even when one is at hand
    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from ray.job_submission import JobSubmissionClient as C; C({cluster.address!r}).list_jobs()",
        ],
        check=False,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode != 0 and "Missing authentication token" in plain.stderr
    # tiderl sends the token it finds (RAY_AUTH_TOKEN_PATH here; RAY_AUTH_TOKEN; ~/.ray/auth_token)
    assert cluster.tiderl("status", "--address", cluster.address).returncode == 0
    by_value = cluster.tiderl("status", "--address", cluster.address, env=_clean_env(RAY_AUTH_TOKEN=cluster.token))
    assert by_value.returncode == 0, by_value.stderr
    # RAY_AUTH_MODE=token: Ray's client sends the token itself
    assert (
        cluster.tiderl("status", "--address", cluster.address, env=cluster.env(RAY_AUTH_MODE="token")).returncode == 0
    )

    fix = "copy the head node's ~/.ray/auth_token"
    disabled = cluster.tiderl("status", "--address", cluster.address, env=cluster.env(RAY_AUTH_MODE="disabled"))
    _assert_clean_error(disabled, "requires an authentication token", "RAY_AUTH_MODE=disabled is set here")
    assert fix in disabled.stderr.lower() and "RAY_AUTH_TOKEN_PATH" in disabled.stderr
    nothing = cluster.tiderl("status", "--address", cluster.address, env=_clean_env(HOME=str(tmp_path)))
    _assert_clean_error(nothing, "requires an authentication token", "no token was found here")
    wrong = cluster.tiderl("logs", "x", "--address", cluster.address, env=_clean_env(RAY_AUTH_TOKEN="not-the-token"))
    _assert_clean_error(wrong, "rejected the authentication token from RAY_AUTH_TOKEN")


# ------------------------------------------------------------------------------------------ a driver on this machine

# one checkpoint per step, actors spread over both nodes (1 learner + 1 rollout worker: one bundle per node)
DRIVER_OVERRIDES = [
    *JOB_OVERRIDES,
    "trainer.steps=5",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=10",
    "cluster.placement_strategy=STRICT_SPREAD",
]
CHECKPOINT_PARTS = {"policy", "learner_state.pt", "rollout_workers.pt", "pending_rollouts.pt", "controller_state.json"}


@contextmanager
def _driver(
    cluster: Cluster, cache_dir: Path, run: Path, log: Path, *, resume: bool = False
) -> Iterator[subprocess.Popen]:
    """`tiderl train` run here, connected to the cluster as its driver, in its own process group: killed whole
    when the test ends first."""
    cmd = [
        sys.executable,
        "-m",
        "rl.launch.cli",
        "train",
        "configs/calculator.yaml",
        *DRIVER_OVERRIDES,
        f"warm_start.cache_dir={cache_dir}",
        f"cluster.address={cluster.gcs}",
        "--resume" if resume else "--run-dir",
        str(run),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=cluster.env(RAY_AUTH_MODE="token"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, (
        f"the driver {'ran past the time limit' if code is None else f'exited with {code}'}:\n{log.read_text()[-4000:]}"
    )


@pytest.fixture(scope="module")
def straight_run(cluster: Cluster, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The 5-step job run to its end without interruption; (its run directory, its Ray job id)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    with _driver(cluster, cache_dir, run, run.parent / "driver.log") as proc:
        _finish(proc, run.parent / "driver.log")
    return run, cluster.driver_job(proc.pid)


def test_a_node_without_the_drivers_files_runs_actors_from_the_shipped_policy(
    cluster: Cluster, cache_dir: Path, straight_run
):
    if cluster.hidden is None:
        pytest.skip("unshare cannot make a mount namespace here: the worker node sees every path the driver does")
    run, job = straight_run
    is_head = {
        n["node_id"]: n["is_head_node"] for n in cluster.api("/api/v0/nodes", limit=10)["data"]["result"]["result"]
    }
    placed = {a["class_name"]: is_head[a["node_id"]] for a in cluster.actors_of(job)}
    assert placed.keys() == {"Learner", "RolloutWorker"} and sorted(placed.values()) == [False, True], (
        placed
    )  # one on each node
    # the worker node's own view of the filesystem (its mount namespace, through /proc): no run directory, no
    # policy cache, only the policy files it unpacked from the object store
    view = Path(f"/proc/{cluster.nodes[1].pid}/root")
    assert run.is_dir() and not (view / run.relative_to("/")).exists() and (cache_dir / "policies").is_dir()
    shipped = list((view / cache_dir.relative_to("/") / "shipped").iterdir())
    assert [p.name for p in (view / cache_dir.relative_to("/")).iterdir()] == ["shipped"]
    assert len(shipped) == 1 and (shipped[0] / "model.safetensors").is_file() and (shipped[0] / "config.json").is_file()
    # every checkpoint, written by the driver alone, whole
    steps = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in steps] == [f"step_{i:06d}" for i in range(1, 6)]
    assert all({c.name for c in p.iterdir()} == CHECKPOINT_PARTS for p in steps)


def test_a_driver_killed_while_writing_a_checkpoint_resumes_to_the_uninterrupted_result(
    cluster: Cluster, cache_dir: Path, straight_run, tmp_path: Path
):
    import torch

    from rl.loop.checkpoint import latest_checkpoint
    from tests.test_faults import _final_state

    run, log = tmp_path / "run", tmp_path / "driver.log"
    with _driver(cluster, cache_dir, run, log) as proc:
        writing, deadline = None, time.monotonic() + 180
        while writing is None:  # SIGKILL the moment checkpoint 3 (or, window missed, 4) is being written
            for step in (3, 4):
                if (run / "checkpoints" / f".tmp_step_{step:06d}").exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    writing = step
                    break
            else:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    f"no checkpoint 3 or 4 seen being written\n{log.read_text()[-4000:]}"
                )
                time.sleep(0.005)
    checkpoints = run / "checkpoints"
    assert (checkpoints / f".tmp_step_{writing:06d}").is_dir() and not (checkpoints / f"step_{writing:06d}").exists()
    previous = latest_checkpoint(run)
    assert previous == checkpoints / f"step_{writing - 1:06d}"
    assert {p.name for p in previous.iterdir()} == CHECKPOINT_PARTS and json.loads(
        (previous / "controller_state.json").read_text()
    )["step"] == writing - 1

    job = cluster.driver_job(proc.pid)  # the cluster notices the dead driver and frees its actors and CPUs
    deadline = time.monotonic() + 60
    while not cluster.released(job):
        assert time.monotonic() < deadline, cluster.actors_of(job)
        time.sleep(0.2)

    log = tmp_path / "resumed.log"
    with _driver(cluster, cache_dir, run, log, resume=True) as resumed:
        _finish(resumed, log)
    assert f"resumingfrom{previous}" in "".join(log.read_text().split())  # the console may wrap the path anywhere
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not list(checkpoints.glob(".tmp_step_*"))  # the next save cleared the half-written one
    (pa, oa, ca), (pb, ob, cb) = _final_state(straight_run[0], 5), _final_state(run, 5)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)  # bit for bit
    assert (
        len(oa) > 10 and oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    )  # AdamW moments and steps
    assert ca == cb and ca["data_cursor"]["position"] == 20


# ------------------------------------------------------------------------------------------ planning (no cluster)


def _plan(tmp_path: Path, *overrides: str, config: str = "job.yaml", **kwargs):
    path = tmp_path / "wd" / config
    return plan_submission(
        path, list(overrides), load_config(path, list(overrides)), working_dir=tmp_path / "wd", **kwargs
    )


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    (wd / "job.yaml").write_text("model: {}\n")
    (wd / "data" / "train.jsonl").write_text("{}\n")
    (wd / "reward.py").write_text("def score(*a): return 1.0\n")
    (tmp_path / "outside.jsonl").write_text("{}\n")
    monkeypatch.chdir(wd)
    return wd


def test_plan_builds_the_entrypoint_and_runtime_env(workdir: Path, tmp_path: Path):
    plan = _plan(
        tmp_path, "trainer.steps=3", "cluster.env_vars={HF_HOME: /data/hf}", "cluster.pip=[bm25s]", submission_id="j1"
    )
    assert plan.submission_id == "j1" and plan.run_dir == "~/tiderl-runs/j1"
    assert plan.entrypoint == (
        "python -m rl.launch.cli train job.yaml trainer.steps=3 'cluster.env_vars={HF_HOME: /data/hf}' "
        "'cluster.pip=[bm25s]' "
        '--run-dir "$HOME"/tiderl-runs/j1'
    )
    env = plan.runtime_env
    assert env["working_dir"] == str(workdir) and env["env_vars"] == {"HF_HOME": "/data/hf"} and env["pip"] == ["bm25s"]
    assert {".venv", ".git", "runs", ".oracles", "__pycache__", "*.egg-info"} <= set(env["excludes"])
    assert "pip" not in _plan(tmp_path).runtime_env and "env_vars" not in _plan(tmp_path).runtime_env
    resumed = _plan(tmp_path, resume="/runs/a")
    assert resumed.entrypoint.endswith("--resume /runs/a") and resumed.run_dir == "/runs/a"
    assert re.fullmatch(r"job-\d{8}-\d{6}-[0-9a-f]{4}", _plan(tmp_path).submission_id)


def test_plan_rewrites_local_paths_relative_to_the_working_dir(workdir: Path, tmp_path: Path):
    plan = _plan(
        tmp_path,
        f"data.train_files=[{workdir / 'data' / 'train.jsonl'}]",
        "data.task=null",
        "eval.enabled=false",
        f"reward.functions=[{{name: '{workdir / 'reward.py'}:score', weight: 0.5}}]",
        "algorithm.ptx_coef=0.1",
        "algorithm.ptx_files=[/mnt/shared/ptx.jsonl]",  # not here: a path on the cluster, passed on as written
    )
    cfg = _as_on_the_cluster(plan, workdir)
    assert cfg.data.train_files == ["data/train.jsonl"]
    assert (cfg.reward.functions[0].name, cfg.reward.functions[0].weight) == ("reward.py:score", 0.5)
    assert cfg.algorithm.ptx_files == ["/mnt/shared/ptx.jsonl"]
    assert plan.notes == [
        "algorithm.ptx_files[0]: /mnt/shared/ptx.jsonl is not on this machine; the job uses it on the cluster as "
        "written"
    ]
    # already relative to the working dir: no override added
    plain = _plan(tmp_path, "data.train_files=[data/train.jsonl]", "data.task=null", "eval.enabled=false")
    assert plain.entrypoint.count("train_files") == 1


def _as_on_the_cluster(plan, workdir: Path):
    """The config the job's driver loads: the entrypoint's config and overrides, read from the working dir."""
    args = shlex.split(plan.entrypoint)
    assert args[:4] == ["python", "-m", "rl.launch.cli", "train"] and args[-2] in ("--run-dir", "--resume")
    return load_config(workdir / args[4], args[5:-2])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.eval_files=[{outside}]", "data.eval_files[0]: {outside} is outside the working directory"),
        ("env.name={outside_py}:Env", "env.name: {outside_py} is outside the working directory"),
        ("data.eval_files=[data/missing.jsonl]", "data.eval_files[0]: data/missing.jsonl does not exist"),
        (
            "data.eval_files=[runs/x.jsonl]",
            "data.eval_files[0]: runs/x.jsonl is inside the working directory but is excluded",
        ),
        ("data.eval_files=[secret/x.jsonl]", "secret/x.jsonl is inside the working directory but is ignored by"),
        ("cluster.env_vars={{TOKENIZERS_PARALLELISM: 'true'}}", "cluster.env_vars sets TOKENIZERS_PARALLELISM"),
    ],
)
def test_plan_errors_name_the_field_and_the_fix(workdir: Path, tmp_path: Path, override: str, message: str):
    for rel in ("runs/x.jsonl", "secret/x.jsonl"):
        (workdir / rel).parent.mkdir(exist_ok=True)
        (workdir / rel).write_text("{}\n")
    (workdir / ".gitignore").write_text("secret/\n")
    (tmp_path / "env.py").write_text("")
    fill = {"outside": tmp_path / "outside.jsonl", "outside_py": tmp_path / "env.py"}
    with pytest.raises(JobsError) as e:
        _plan(tmp_path, override.format(**fill))
    assert message.format(**fill) in str(e.value)
    if "outside" in message:
        assert "move it into the working directory, or point --working-dir" in str(e.value)


def test_config_outside_the_working_dir_and_relative_run_dirs(workdir: Path, tmp_path: Path):
    (tmp_path / "job.yaml").write_text("model: {}\n")
    with pytest.raises(JobsError, match="the config file: .* is outside the working directory"):
        plan_submission(tmp_path / "job.yaml", [], load_config(tmp_path / "job.yaml"), working_dir=workdir)
    with pytest.raises(JobsError, match="--run-dir runs/x is relative"):
        _plan(tmp_path, run_dir="runs/x")
    with pytest.raises(JobsError, match="drop --run-dir"):
        _plan(tmp_path, run_dir="/a", resume="/b")
    assert cluster_path("~/runs/my run", "--run-dir") == "\"$HOME\"/'runs/my run'"
    assert cluster_path("/abs/dir", "--run-dir") == "/abs/dir"


def test_address_and_token_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(JobsError, match="no cluster address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: not the Jobs API
    with pytest.raises(JobsError):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "10.0.0.2:8265")
    assert resolve_address(None) == "http://10.0.0.2:8265"
    assert resolve_address("http://head:8265/") == "http://head:8265"

    assert local_token() == (None, "~/.ray/auth_token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert local_token() == ("home-token", "~/.ray/auth_token")
    (tmp_path / "tok").write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert local_token()[0] == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert local_token() == ("env-token", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN_PATH is set to .*missing"):
        local_token()
