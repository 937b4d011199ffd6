"""Run model-written Python in a sandbox: a separate process with no network, a read-only filesystem except its
own scratch directory, an empty environment, resource limits, and nothing left running after the call.

Isolation is bubblewrap (Debian's `bubblewrap`): new network, PID, IPC and UTS namespaces and an empty, read-only
root that holds only what the interpreter needs (`/usr` and the `/bin`, `/lib*`, `/sbin` links into it, the two
files of `/etc` the dynamic linker and `time` read, the interpreter's own prefix when it lives outside `/usr`, e.g.
a configured venv), a private `/tmp` with the scratch directory bound at `/tmp/scratch`, `/dev/null`-style devices
and the sandbox's own `/proc`; the host's home directories, the project checkout, the rest of `/etc` and other
users' files do not exist inside. `--die-with-parent` ties it to the worker. When the caller is root,
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
import functools
import os
import resource
import shutil
import signal
import subprocess
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
        self._view = filesystem_view(self.python) if self.bwrap is not None else []

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
            # /tmp first: an interpreter that lives under /tmp (a venv there) is bound inside it by the view
            self.bwrap, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", *self._view,
            "--bind", scratch, SCRATCH, "--remount-ro", "/", "--chdir", SCRATCH,
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


# What any interpreter needs of the host: the system tree, and of /etc only the linker's cache and the time zone.
SYSTEM_DIRS = ("/usr",)
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")


def filesystem_view(python: str) -> list[str]:
    """bwrap arguments that build the sandbox's whole filesystem: the system tree read-only, `/bin`, `/lib*` and
    `/sbin` as the host has them (links into /usr on merged-/usr systems), the few /etc files above, and the
    directories the interpreter runs from when they lie outside /usr (a venv and the Python it was made from:
    `sys.prefix`, `sys.base_prefix`, read from the interpreter itself), each read-only at its own path."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        args += ["--ro-bind", path, path]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--perms", "0755", "--dir", "/etc"]  # bwrap would make it 0700, unlistable for the sandbox's uid
    for path in SYSTEM_FILES:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    made = {"/", "/etc"}
    for path in _interpreter_dirs(python):
        for parent in reversed(Path(path).parents):  # listable parents, as above
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
    return args


@functools.cache
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """Directories outside the system tree that `python` needs: where the path and its link target sit, and its
    prefixes. Nothing for the system interpreter."""
    found = subprocess.run(
        [python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix); print(sys.base_exec_prefix)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    candidates = [*found, str(Path(python).parent), str(Path(python).resolve().parent)]
    needed: list[str] = []
    for path in sorted({os.path.normpath(p) for p in candidates}):
        inside_system = any(path == d or path.startswith(d + "/") for d in (*SYSTEM_DIRS, "/bin", "/sbin"))
        if not inside_system and not any(path.startswith(d + "/") for d in needed):
            needed.append(path)
    return tuple(needed)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_capped(path: Path, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit
