"""Ray Jobs for `tiderl submit / status / logs / stop`: the same job config that `tiderl train` runs here, sent
to a Ray cluster through the Ray Jobs API (`ray.job_submission.JobSubmissionClient`).

A submission uploads the working directory (Ray's `working_dir`), so every local file the config names (reward
or environment code, prompt data, PTX examples, a local model) must lie inside it; paths are rewritten relative to
it and passed as overrides. On the cluster the job's driver runs `python -m rl.launch.cli train ...`; Ray sets
RAY_ADDRESS for it, so `rl.launch.cluster.ray_session` joins the cluster instead of starting a local Ray.

Ray 2.60 protects the Jobs API with a token when the cluster runs in token mode, but its client sends the token
only when RAY_AUTH_MODE=token is exported. tiderl sends the token it finds here (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) when RAY_AUTH_MODE is unset, and turns every refusal into an error that
says what to do (`JobsError`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl.config import JobConfig

# Never worth uploading: environments, VCS data, local runs, test oracles, caches. `cluster.excludes` adds more.
DEFAULT_EXCLUDES = [".venv", ".git", "runs", ".oracles", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
CHECK = "-python-check"  # the submission id's suffix of `tiderl submit`'s check of the cluster's python


class JobsError(RuntimeError):
    """A jobs command cannot go on; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Submission:
    """Everything `JobsClient.submit` sends: built and checked locally before the cluster is contacted."""

    submission_id: str
    entrypoint: str  # shell command the job's driver runs, from the working dir
    runtime_env: dict[str, Any]  # working_dir, excludes, env_vars, pip
    run_dir: str  # on the cluster, as the user should read it (may start with ~)
    metadata: dict[str, str]  # shown by `tiderl status`
    notes: list[str] = field(default_factory=list)  # things the user should know (paths left for the cluster)


# ---------------------------------------------------------------------------------------------------- address


def resolve_address(address: str | None) -> str:
    """The Jobs API (dashboard) URL: --address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS.

    RAY_ADDRESS usually names the GCS (HEAD:6379), which the Jobs API does not speak, so it counts only when it is
    an http(s) URL, as `ray job submit` does."""
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS")):
        if candidate:
            return _with_scheme(candidate)
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        return env.rstrip("/")
    raise JobsError(
        "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard of the head node, which `ray start "
        "--head` prints), or set RAY_API_SERVER_ADDRESS"
    )


def _with_scheme(address: str) -> str:
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


# ---------------------------------------------------------------------------------------------------- auth


def local_token() -> tuple[str | None, str]:
    """The cluster token found on this machine and where it came from, in Ray's own order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        path, source = Path(token_path).expanduser(), f"RAY_AUTH_TOKEN_PATH ({token_path})"
        if not path.is_file() or not path.read_text().strip():
            raise JobsError(
                f"RAY_AUTH_TOKEN_PATH is set to {token_path}, which is missing or empty: point it at the file holding "
                f"the cluster's token"
            )
    else:
        path, source = Path.home() / ".ray" / "auth_token", "~/.ray/auth_token"
        if not path.is_file():
            return None, source
    return path.read_text().strip() or None, source


def auth_headers() -> dict[str, str]:
    """Headers that authenticate us to a token-mode cluster.

    RAY_AUTH_MODE set: Ray's client handles it (token: it sends its token; disabled: nothing is sent). Unset: send
    the token found here, if any, which a cluster without auth ignores."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return {}
    token, _ = local_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_message(address: str, ray_message: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE")
    token, source = (None, "") if mode == "disabled" else local_token()
    fixes = (
        "Copy the head node's ~/.ray/auth_token to ~/.ray/auth_token here, or set RAY_AUTH_TOKEN (the token) or "
        "RAY_AUTH_TOKEN_PATH (a file holding it); or start the cluster with RAY_AUTH_MODE=disabled (then anyone who "
        "can reach it can run code on it)."
    )
    if "Authentication failed" in ray_message or "Invalid" in ray_message:
        return (
            f"the Ray cluster at {address} rejected the authentication token from {source}: "
            f"it is not this cluster's token. {fixes}"
        )
    if mode == "disabled":
        why = "RAY_AUTH_MODE=disabled is set here, so no token was sent"
    elif mode is not None and mode != "token":
        why = f"RAY_AUTH_MODE={mode} is set here, so no token was sent"
    elif token is None:
        why = "no token was found here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
    else:
        why = f"the token from {source} was not sent"
    return f"the Ray cluster at {address} requires an authentication token (token auth is on), and {why}. {fixes}"


# ---------------------------------------------------------------------------------------------------- submission


def plan_submission(
    config: Path,
    overrides: list[str],
    cfg: JobConfig,
    *,
    working_dir: Path,
    run_dir: str | None = None,
    resume: str | None = None,
    submission_id: str | None = None,
) -> Submission:
    """Check what the job needs from this machine and build the submission, before any request is sent."""
    from rollouts.actors import RAY_ENV

    working_dir = Path(os.path.abspath(working_dir))
    if not working_dir.is_dir():
        raise JobsError(f"--working-dir {working_dir} is not a directory")
    if resume is not None and run_dir is not None and resume != run_dir:
        raise JobsError("--resume already names the run directory; drop --run-dir")
    clash = sorted(set(cfg.cluster.env_vars) & set(RAY_ENV))
    if clash:
        raise JobsError(
            f"cluster.env_vars sets {', '.join(clash)}, which every tiderl job sets itself (rollouts/actors.py); Ray "
            f"refuses "
            "a job whose submission and driver set the same variable: remove it from cluster.env_vars"
        )
    excludes = DEFAULT_EXCLUDES + list(cfg.cluster.excludes)
    notes: list[str] = []
    placer = _Placer(working_dir, Path.cwd(), excludes, notes)
    config_rel = placer.place("the config file", str(config), required=True)
    extra = relocation_overrides(cfg, placer)
    submission_id = submission_id or new_submission_id(config.stem)
    target = resume if resume is not None else run_dir or f"~/tiderl-runs/{submission_id}"
    flag = "--resume" if resume is not None else "--run-dir"
    command = [
        "python",
        "-m",
        "rl.launch.cli",
        "train",
        shlex.quote(config_rel),
        *map(shlex.quote, [*overrides, *extra]),
    ]
    entrypoint = " ".join([*command, flag, cluster_path(target, flag)])
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": excludes}
    if cfg.cluster.env_vars:
        runtime_env["env_vars"] = dict(cfg.cluster.env_vars)
    if cfg.cluster.pip:
        runtime_env["pip"] = list(cfg.cluster.pip)
    metadata = {"tiderl_config": config_rel, "tiderl_run_dir": target}
    return Submission(submission_id, entrypoint, runtime_env, target, metadata, notes)


def new_submission_id(config_stem: str) -> str:
    """`<config>-<time>-<random>`: readable in `tiderl status` and as the default run directory's name."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", config_stem).strip("-") or "job"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def cluster_path(path: str, flag: str) -> str:
    """A run directory for the driver's shell: `~` expands on the cluster (its $HOME), not here.

    A relative path would land in the job's copy of the working dir, which Ray deletes with the job."""
    for home in ("~/", "$HOME/"):
        if path.startswith(home):
            return '"$HOME"/' + shlex.quote(path[len(home) :])
    if path in ("~", "$HOME"):
        return '"$HOME"'
    if not path.startswith("/"):
        raise JobsError(
            f"{flag} {path} is relative: on the cluster it would land in the job's temporary copy of the working dir, "
            "which Ray deletes; give an absolute path or one under ~/ (quote it, '~/runs/x', so it expands on the "
            "cluster)"
        )
    return shlex.quote(path)


def relocation_overrides(cfg: JobConfig, placer: _Placer) -> list[str]:
    """Overrides that point every local file the config names at its place in the uploaded working dir.

    Lists are overridden whole (overrides cannot index into a list); nothing is emitted for a field whose paths
    already read the same from the working dir."""
    raw = cfg.model_dump(mode="json")
    changed: dict[str, Any] = {}

    def paths(section: str, key: str) -> None:
        old = raw[section][key]
        new = [placer.place(f"{section}.{key}[{i}]", p, required=True) for i, p in enumerate(old)]
        if new != old:
            changed[f"{section}.{key}"] = new

    paths("data", "train_files")
    paths("data", "eval_files")
    paths("algorithm", "ptx_files")
    if _is_file_ref(cfg.env.name):
        new_env = placer.place_ref("env.name", cfg.env.name)
        if new_env != cfg.env.name:
            changed["env.name"] = new_env
    functions = raw["reward"]["functions"]
    for i, function in enumerate(functions):
        if _is_file_ref(function["name"]):
            function["name"] = placer.place_ref(f"reward.functions[{i}].name", function["name"])
    if [f.name for f in cfg.reward.functions] != [f["name"] for f in functions]:
        changed["reward.functions"] = functions
    if cfg.model.path:
        # a model directory that is not here may be a path on the cluster or a Hub id: passed on as written
        new_path = placer.place("model.path", cfg.model.path, required=False)
        if new_path != cfg.model.path:
            changed["model.path"] = new_path
    models = raw["reward"]["models"]
    for i, model in enumerate(models):
        model["path"] = placer.place(f"reward.models[{i}].path", model["path"], required=False)
    if [m.path for m in cfg.reward.models] != [m["path"] for m in models]:
        changed["reward.models"] = models
    return [f"{key}={_flow(value)}" for key, value in changed.items()]


def _is_file_ref(name: str) -> bool:
    return ":" in name and name.rsplit(":", 1)[0].endswith(".py")


def _flow(value: Any) -> str:
    """One-line YAML for an override value (YAML, not JSON: PyYAML reads JSON's 1e-05 as a string)."""
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()


class _Placer:
    """Where a local path the config names will be on the cluster: relative to the uploaded working dir.

    Relative paths are read from the current directory here (as `tiderl train` does) and from the working dir on
    the cluster, so both are checked."""

    def __init__(self, working_dir: Path, cwd: Path, excludes: list[str], notes: list[str]) -> None:
        self.working_dir, self.cwd, self.excludes, self.notes = working_dir, cwd, excludes, notes

    def place(self, name: str, value: str, *, required: bool) -> str:
        path = Path(os.path.expanduser(value))
        local = Path(os.path.normpath(path if path.is_absolute() else self.cwd / path))
        if not local.exists():
            if required and not path.is_absolute():
                raise JobsError(f"{name}: {value} does not exist (looked for {local})")
            self.notes.append(f"{name}: {value} is not on this machine; the job uses it on the cluster as written")
            return value
        try:
            rel = local.relative_to(self.working_dir)
        except ValueError:
            raise JobsError(
                f"{name}: {local} is outside the working directory {self.working_dir}, which is all the cluster gets: "
                "move it into the working directory, or point --working-dir at a directory that holds both"
            ) from None
        reason = _left_out_by(rel, self.working_dir, self.excludes)
        if reason:
            raise JobsError(f"{name}: {rel} is inside the working directory but {reason}, so the job would not find it")
        return rel.as_posix()

    def place_ref(self, name: str, ref: str) -> str:
        file, attr = ref.rsplit(":", 1)
        return f"{self.place(name, file, required=True)}:{attr}"


def _left_out_by(rel: Path, working_dir: Path, excludes: list[str]) -> str | None:
    """Why Ray would leave `rel` out of the uploaded working dir, or None. Mirrors Ray's own walk (its default
    excludes, ours, and every .gitignore/.rayignore on the way down); uses Ray's matchers so the rules are the
    same ones (Ray 2.60's packaging module)."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    ray_defaults = ray_constants.get_runtime_env_default_excludes()
    matchers: list[tuple[Callable[[Path], bool], str]] = [
        (packaging._get_excludes(working_dir, ray_defaults), f"Ray leaves out {', '.join(ray_defaults)}"),
        (
            packaging._get_excludes(working_dir, excludes),
            f"is excluded from the upload ({', '.join(excludes)}; cluster.excludes adds to these)",
        ),
    ]
    use_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    node = working_dir
    for part in ("", *rel.parts):
        node = node / part if part else node
        if node.is_dir():
            for ignore_file in (".gitignore", ".rayignore") if use_gitignore else (".rayignore",):
                match = packaging._get_ignore_file(node, ignore_file)
                if match is not None:
                    matchers.append((match, f"is ignored by {node / ignore_file}"))
        for match, reason in matchers:
            if node != working_dir and match(node):
                return reason
    return None


# ---------------------------------------------------------------------------------------------------- client


def _quiet_ray_logging() -> None:
    """Ray's client logs each packaging step at INFO, and warns that it skips .git/.venv, which we exclude anyway;
    keep real warnings (a package near Ray's size limit) and errors."""
    import logging

    logging.getLogger("ray.dashboard.modules").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


class JobsClient:
    """The Jobs API of one cluster; every failure becomes a JobsError that names the address or the job."""

    def __init__(self, address: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address = address
        _quiet_ray_logging()
        with self._errors():
            self._client = JobSubmissionClient(address, headers=auth_headers() or None)

    def submit(self, submission: Submission) -> str:
        with self._errors():
            return self._client.submit_job(
                entrypoint=submission.entrypoint,
                submission_id=submission.submission_id,
                runtime_env=submission.runtime_env,
                metadata=submission.metadata,
            )

    def nodes(self) -> list[dict[str, float]]:
        """Resources of each live node, as the dashboard reports them (no actor, no job started)."""
        import requests

        with self._errors():
            r = requests.get(
                f"{self.address}/api/v0/nodes", params={"limit": 10000}, headers=auth_headers(), timeout=30
            )
            r.raise_for_status()
        rows = r.json()["data"]["result"]["result"]
        return [dict(n.get("resources_total") or {}) for n in rows if n.get("state") == "ALIVE"]

    def check_python(self, submission: Submission, modules: list[str], timeout_s: float = 60.0) -> None:
        """Run the job's `python` on the cluster (a probe job with the job's env_vars and pip, nothing uploaded) and
        refuse the submission when it is missing or lacks `modules`, naming the interpreter and the fix."""
        probe = submission.submission_id + CHECK
        script = (
            "import importlib.util as u, json, sys; "
            f"m = [n for n in {modules!r} if u.find_spec(n) is None]; "
            "print('TIDERL_PYTHON ' + json.dumps({'python': sys.executable, 'missing': m}))"
        )
        env = {k: v for k, v in submission.runtime_env.items() if k in ("env_vars", "pip")}
        with self._errors():
            self._client.submit_job(
                entrypoint=f"python -c {shlex.quote(script)}",
                submission_id=probe,
                runtime_env=env or None,
            )
        try:
            status = self.wait(probe, timeout_s + (600.0 if "pip" in env else 0.0))
            text = self.logs(probe)
        except JobsError:  # never started: the cluster cannot start a process with this runtime environment
            status, text = str(self.details(probe).status), ""
            self.stop(probe, 30.0)
        finally:
            self._forget(probe)
        found = re.search(r"^TIDERL_PYTHON (.*)$", text, re.MULTILINE)
        how = (
            "Start Ray on the head node from the venv tiderl is installed in (`source .venv/bin/activate` before "
            "`ray start --head`, docs/cluster.md), or install tiderl's dependencies into that interpreter (`pip "
            "install -e .` from this repository), or add what is missing to cluster.pip"
        )
        if found is None:
            said = [x for x in text.splitlines() if x.strip() and "job_manager" not in x and "entrypoint" not in x]
            tail = " | ".join(said[-3:]) or "no output"
            raise JobsError(
                f"the cluster has no `python` that runs a job (the head node's PATH for its Ray processes, with "
                f"cluster.env_vars and cluster.pip): a check job running `python` was {status}: {tail}. {how}"
            )
        report = json.loads(found.group(1))
        if report["missing"]:
            raise JobsError(
                f"the cluster's `python` ({report['python']}, the first python on the PATH of the head node's Ray "
                f"processes) lacks {', '.join(report['missing'])}: the job's driver would fail there on import, so "
                f"nothing was submitted. {how}"
            )

    def _forget(self, job_id: str) -> None:
        """Delete a finished check job; again if Ray's supervisor writes its final status after the delete (it
        recreates the record then). `list` skips any that lingers."""
        for _ in range(3):
            try:
                with self._errors(job_id):
                    self._client.delete_job(job_id)
                time.sleep(1.0)
                self.details(job_id)
            except JobsError:  # gone
                return

    def details(self, job_id: str):
        """The job's JobDetails (status, times, entrypoint, message, metadata)."""
        with self._errors(job_id):
            return self._client.get_job_info(job_id)

    def list(self) -> list:
        """Submitted jobs, oldest first (the drivers' own ray.init jobs and submit's checks are left out)."""
        with self._errors():
            jobs = [j for j in self._client.list_jobs() if j.submission_id and not j.submission_id.endswith(CHECK)]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self._client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Stream the job's logs until it ends; returns its final status."""
        self.details(job_id)  # an unknown id fails here, with a clear message, not in the websocket handshake

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        with self._errors(job_id):
            asyncio.run(tail())
        return self.wait(job_id, timeout_s=60.0)

    def wait(self, job_id: str, timeout_s: float) -> str:
        """Poll until the job reaches a terminal status; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = str(self.details(job_id).status)
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise JobsError(f"job {job_id} is still {status} after {timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self, job_id: str, timeout_s: float) -> tuple[bool, str]:
        """Ask Ray to stop the job and wait for it to end; returns (whether it was still running, final status)."""
        with self._errors(job_id):
            was_running = self._client.stop_job(job_id)
        return was_running, self.wait(job_id, timeout_s)

    @contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            raise JobsError(_auth_message(self.address, str(e))) from None
        except (ConnectionError, requests.RequestException, aiohttp.ClientError, TimeoutError) as e:
            raise JobsError(
                f"cannot reach the Ray Jobs API at {self.address} ({type(e).__name__}): is the cluster up, and is this "
                "its dashboard address (http://HEAD:8265 by default, not the GCS port 6379)?"
            ) from None
        except RuntimeError as e:
            text = str(e)
            if job_id is not None and "404" in text and "does not exist" in text:
                raise JobsError(
                    f"no job {job_id!r} on the cluster at {self.address}; `tiderl status --address {self.address}` "
                    f"lists its jobs"
                ) from None
            if "Version check returned 404" in text:
                raise JobsError(f"{self.address} answers HTTP but is not a Ray dashboard (no Jobs API there)") from None
            raise JobsError(f"the Ray Jobs API at {self.address} refused the request: {text}") from None
