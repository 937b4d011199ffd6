"""Run model-written Python in a sandbox: a separate process with no network, a read-only filesystem except its
own scratch directory, an empty environment, resource limits, and nothing left running after the call.

Isolation is bubblewrap (Debian's `bubblewrap`): new network, PID, IPC and UTS namespaces, `/` bound read-only,
a private `/tmp` with the scratch directory bound at `/tmp/scratch`, `--die-with-parent`. When the caller is root,
the code runs as an unprivileged uid (`setpriv`), because Linux does not enforce `RLIMIT_NPROC` for root and a
fork bomb would pass. Limits are rlimits set before exec (CPU seconds, address space, file size, open files,
processes) plus a wall-clock timeout that kills the whole sandbox. stdout/stderr go to files capped by
`RLIMIT_FSIZE`, so unbounded output cannot fill the worker's memory. When the sandboxed program exits, its PID
namespace dies and takes every background process with it; on a timeout the outer bwrap is killed and
`--die-with-parent` does the same.

Without bubblewrap the sandbox refuses to run model code, unless `allow_unisolated` says to run it with the
rlimits and the unprivileged uid only (no network or filesystem isolation).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from envs.config import SandboxConfig

UNPRIVILEGED_UID = 65534  # `nobody`
SCRATCH = "/tmp/scratch"


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism here, and the config does not allow running without one."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    """The program's exit status; negative: killed by that signal; None: killed at the wall-clock limit."""
    timed_out: bool
    output_truncated: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def error(self) -> str | None:
        """Which limit or failure stopped the code (None: it ran cleanly)."""
        if self.timed_out:
            return "the code ran past its time limit and was stopped."
        if self.exit_code == -signal.SIGXCPU:
            return "the code used up its CPU-time limit and was stopped."
        if self.exit_code == -signal.SIGXFSZ or self.output_truncated:
            return "the output exceeded its size limit and was cut."
        if self.exit_code is not None and self.exit_code < 0:
            return f"the code was killed by {signal.Signals(-self.exit_code).name}."
        if self.exit_code != 0:
            tail = self.stderr.strip().splitlines()[-3:]
            return "\n".join(tail) if tail else f"exit status {self.exit_code}"
        return None

    def observation(self) -> str:
        """What the model sees: the output, then an error that says which limit was hit."""
        parts = [self.stdout.rstrip()] if self.stdout.strip() else []
        error = self.error()
        if error:
            parts.append(f"Error: {error}")
        return "\n".join(parts) if parts else "(no output)"


class PythonSandbox:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.bwrap = shutil.which("bwrap")
        self.drop_privileges = os.geteuid() == 0
        self.python = cfg.python or ("/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable)
        if self.bwrap is None and not cfg.allow_unisolated:
            raise SandboxUnavailable(
                "the python tool needs bubblewrap to isolate model code (no network, read-only filesystem): "
                "install it (`apt-get install bubblewrap`, done by `make setup` when run as root), or set "
                "env.sandbox.allow_unisolated=true to run model code with resource limits only"
            )

    def _command(self, scratch: str) -> list[str]:
        run = [self.python, "-I", "-B", f"{SCRATCH if self.bwrap else scratch}/main.py"]
        if self.drop_privileges:
            run = [
                "setpriv",
                f"--reuid={UNPRIVILEGED_UID}",
                f"--regid={UNPRIVILEGED_UID}",
                "--clear-groups",
                "--inh-caps=-all",
                *run,
            ]
        if self.bwrap is None:
            return run
        return [
            self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--bind", scratch, SCRATCH, "--chdir", SCRATCH,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", SCRATCH, "--",
            *run,
        ]  # fmt: skip

    def _limits(self) -> None:
        """Runs in the child between fork and exec: the rlimits every process of the sandbox inherits."""
        cfg = self.cfg
        # CPU: SIGXCPU at the soft limit (reported as such), SIGKILL a second later if it is caught
        resource.setrlimit(resource.RLIMIT_CPU, (cfg.cpu_seconds, cfg.cpu_seconds + 1))
        for limit, value in (
            (resource.RLIMIT_AS, cfg.memory_mb * 2**20),
            (resource.RLIMIT_FSIZE, max(cfg.max_output_bytes, cfg.max_file_mb * 2**20)),
            (resource.RLIMIT_NOFILE, 64),
            (resource.RLIMIT_NPROC, cfg.max_processes),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(limit, (value, value))

    async def run(self, code: str) -> SandboxResult:
        """Run `code` as a script; returns its (capped) output and how it ended. Never raises for what the code does."""
        scratch = tempfile.mkdtemp(prefix="tiderl-sandbox-")
        host = tempfile.mkdtemp(prefix="tiderl-sandbox-out-")  # outside the sandbox's view
        try:
            Path(scratch, "main.py").write_text(code)
            if self.drop_privileges:
                os.chown(scratch, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
            env = {"PATH": "/usr/bin:/bin", "HOME": scratch}  # used only without bwrap (bwrap clears it anyway)
            with open(Path(host, "stdout"), "wb") as out, open(Path(host, "stderr"), "wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(scratch), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                    cwd=scratch, env=env, preexec_fn=self._limits, start_new_session=True,
                )  # fmt: skip
                timed_out = False
                try:
                    await asyncio.wait_for(proc.wait(), self.cfg.wall_seconds)
                except TimeoutError:
                    timed_out = True
                finally:
                    _kill_group(proc.pid)
                    await proc.wait()
            stdout, cut_out = _read_capped(Path(host, "stdout"), self.cfg.max_output_bytes)
            stderr, cut_err = _read_capped(Path(host, "stderr"), self.cfg.max_output_bytes)
            code = proc.returncode
            if (
                self.bwrap is not None and code is not None and code > 128
            ):  # bwrap exits 128 + N for a child killed by N
                code = -(code - 128)
            return SandboxResult(stdout, stderr, None if timed_out else code, timed_out, cut_out or cut_err)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(host, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_capped(path: Path, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit
