"""`tiderl submit / status / logs / stop` against a real two-node Ray cluster started on this machine, a job's
driver killed while writing a checkpoint and resumed (planning a submission without a cluster:
test_submission_plan.py).

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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.ray_cluster import Cluster, _clean_env, _free_port

pytest_plugins = ("tests.ray_cluster",)  # the `cluster` fixture

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_OVERRIDES = [*TINY_OVERRIDES, "eval.enabled=false"]


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


def test_submit_refuses_what_the_cluster_cannot_run(cluster: Cluster, tmp_path: Path):
    before = {j["submission_id"] for j in cluster.api("/api/jobs/")}
    # an actor bigger than every node, against the nodes as the dashboard reports them (each has 2 CPUs)
    big = cluster.tiderl("submit", "configs/calculator.yaml", "rollout.cpus_per_worker=3", "--address", cluster.address)
    _assert_clean_error(big, "a rollout actor needs 3 CPU", "largest node: 2 CPU", "[the Ray cluster]")
    # the job's `python` lacks our packages: a head whose PATH finds the system interpreter (here through
    # cluster.env_vars, which reach the job's driver as the head's own PATH would)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to("/usr/bin/python3")
    result = cluster.tiderl(
        "submit",
        "configs/calculator.yaml",
        *JOB_OVERRIDES,
        f"cluster.env_vars={{PATH: '{bare}:/usr/bin:/bin'}}",
        "--address",
        cluster.address,
    )
    _assert_clean_error(result, f"the cluster's `python` ({bare}/python", "lacks ", "typer", "nothing was submitted")
    assert "source .venv/bin/activate" in result.stderr and "cluster.pip" in result.stderr
    # no `python` on the PATH at all (Debian's /usr/bin holds only python3)
    none = cluster.tiderl(
        "submit", "configs/calculator.yaml", *JOB_OVERRIDES, "cluster.env_vars={PATH: '/usr/bin:/bin'}",
        "--address", cluster.address,
    )  # fmt: skip
    _assert_clean_error(none, "the cluster has no `python` that runs a job", "FAILED", "python: not found")
    new = {j["submission_id"] for j in cluster.api("/api/jobs/")} - before
    assert all(j.endswith("-python-check") for j in new), new  # nothing submitted (a check job may linger)
    assert "python-check" not in cluster.tiderl("status", "--address", cluster.address).stdout  # not the user's


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
