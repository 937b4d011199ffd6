"""The python tool's sandbox contains hostile code: each call returns an error observation within its limit, the
caller survives, and nothing (process, file) is left behind."""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envs.config import SandboxConfig
from envs.sandbox import PythonSandbox, SandboxResult, SandboxUnavailable

# `make setup` installs bubblewrap (as root); where it could not, these tests say so rather than fail on setup.
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap not installed (apt-get install bubblewrap)"
)

LIMITS = SandboxConfig(cpu_seconds=1, wall_seconds=3.0, memory_mb=256, max_processes=16, max_output_bytes=2048)


def run(code: str, cfg: SandboxConfig = LIMITS) -> tuple[SandboxResult, float]:
    start = time.monotonic()
    result = asyncio.run(PythonSandbox(cfg).run(code))
    return result, time.monotonic() - start


def sandbox_processes() -> list[str]:
    """Processes of the sandbox user (tests run as root, so any is a leftover)."""
    done = subprocess.run(["pgrep", "-u", "65534", "-a"], capture_output=True, text=True)
    return done.stdout.splitlines()


def leftover_dirs() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("tiderl-sandbox-*"))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = leftover_dirs()
    yield
    assert sandbox_processes() == []
    assert leftover_dirs() == before


@needs_bwrap
def test_plain_code_runs_and_prints() -> None:
    result, _ = run("import math\nprint(math.factorial(20))")
    assert result.ok and result.observation() == "2432902008176640000"


@needs_bwrap
def test_infinite_loop_stops_at_the_cpu_limit() -> None:
    result, seconds = run("while True:\n    pass")
    assert not result.ok and "CPU-time limit" in result.observation()
    assert seconds < LIMITS.wall_seconds


@needs_bwrap
def test_sleeping_forever_stops_at_the_wall_clock_limit() -> None:
    result, seconds = run("import time\ntime.sleep(1000)")
    assert result.timed_out and "time limit" in result.observation()
    assert LIMITS.wall_seconds <= seconds < LIMITS.wall_seconds + 2


@needs_bwrap
def test_fork_bomb_is_contained() -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result, seconds = run(code)
    assert not result.ok and seconds < LIMITS.wall_seconds + 2
    assert run("print('after')")[0].observation() == "after"  # the machine still forks for the next call


@needs_bwrap
def test_memory_bomb_fails_with_memory_error() -> None:
    result, _ = run("x = bytearray(2 * 1024**3)\nprint(len(x))")
    assert not result.ok and "MemoryError" in result.observation()


@needs_bwrap
def test_unbounded_output_is_cut() -> None:
    result, seconds = run("while True:\n    print('x' * 1000)")
    assert result.output_truncated and len(result.stdout) == LIMITS.max_output_bytes
    assert "size limit" in result.observation() and seconds < LIMITS.wall_seconds


@needs_bwrap
def test_no_network_even_to_a_local_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        result, _ = run(code)
        assert not result.ok and "connected" not in result.stdout
        assert "Connection refused" in result.observation() or "unreachable" in result.observation()
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever arrived


@needs_bwrap
def test_killing_its_parent_fails_and_the_caller_survives() -> None:
    code = "import os, signal\nfor pid in (os.getppid(), 1):\n    os.kill(pid, signal.SIGKILL)\nprint('killed')"
    result, _ = run(code)
    assert not result.ok and "PermissionError" in result.observation()
    assert run("print('still here')")[0].observation() == "still here"


@needs_bwrap
def test_secrets_in_the_environment_are_not_inherited(monkeypatch) -> None:
    monkeypatch.setenv("TIDERL_TEST_SECRET", "hunter2")
    code = (
        "import os, glob\nprint(dict(os.environ))\nfor p in glob.glob('/proc/*/environ'):\n"
        "    try:\n        print(open(p).read())\n    except OSError:\n        pass"
    )
    result, _ = run(code)
    assert result.ok and "hunter2" not in result.stdout and "TIDERL_TEST_SECRET" not in result.stdout


@needs_bwrap
def test_writes_only_inside_its_scratch_directory(tmp_path: Path) -> None:
    in_root = Path(f"/tiderl-escaped-{os.getpid()}.txt")  # the sandbox's own root: read-only
    in_var = Path("/var/tmp") / f"tiderl-escaped-{os.getpid()}.txt"  # world-writable on the host, absent inside
    in_tmp = tmp_path / "escaped.txt"  # the host's /tmp is not even visible (the sandbox has its own)
    code = "open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n"
    code += (
        f"for path in ({str(in_root)!r}, {str(in_var)!r}, {str(in_tmp)!r}):\n"
        "    try:\n        open(path, 'w').write('x')\n    except OSError as e:\n        print(e.strerror)"
    )
    result, _ = run(code)
    missing = "No such file or directory"
    assert result.ok and result.stdout.split("\n")[:4] == ["ok", "Read-only file system", missing, missing]
    assert not in_root.exists() and not in_var.exists() and not in_tmp.exists()
    assert run("import os\nprint(os.listdir('.'))")[0].observation() == "['main.py']"  # a fresh scratch per call


@needs_bwrap
def test_background_processes_die_with_the_call() -> None:
    code = "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint('spawned')"
    result, seconds = run(code)
    assert result.observation() == "spawned" and seconds < 2
    # the autouse fixture asserts no process of the sandbox user is left


def test_refuses_without_isolation_unless_allowed(monkeypatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        PythonSandbox(LIMITS)
    unisolated = LIMITS.model_copy(update={"allow_unisolated": True})
    result, _ = run("import os\nprint(os.getuid())", unisolated)
    assert result.observation() == ("65534" if os.geteuid() == 0 else str(os.geteuid()))


@pytest.fixture
def host_files() -> Iterator[dict[str, Path]]:
    """World-readable files where model code must not look: the project checkout, /root and /home (made here, as
    root, when the test may write there)."""
    made: list[Path] = []
    files = {"checkout": Path(__file__).resolve().parents[1] / "pyproject.toml"}
    for place in ("/root", "/home"):
        path = Path(place) / f"tiderl-sandbox-probe-{os.getpid()}.txt"
        try:
            path.write_text("host secret")
            path.chmod(0o644)
        except OSError:
            continue
        made.append(path)
        files[place] = path
    yield files
    for path in made:
        path.unlink()


@needs_bwrap
def test_world_readable_host_files_do_not_exist_inside(host_files: dict[str, Path]) -> None:
    assert set(host_files) == {"checkout", "/root", "/home"} or os.geteuid() != 0  # CI and this machine run as root
    code = (
        f"for path in {[str(p) for p in host_files.values()]!r}:\n"
        "    try:\n        print(open(path).read())\n    except OSError as e:\n        print(e.strerror)"
    )
    result, _ = run(code)
    # absent, not merely unreadable: the sandbox's uid could read each of them if the path were there
    assert result.ok and result.stdout.splitlines() == ["No such file or directory"] * len(host_files)
    assert all(p.read_text() for p in host_files.values())


@needs_bwrap
def test_listing_the_root_shows_only_what_the_interpreter_needs() -> None:
    code = (
        "import os\nprint(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/etc')))\nprint(os.path.exists('/home'))"
    )
    result, _ = run(code)
    top, etc, home = result.stdout.splitlines()
    assert result.ok and set(ast.literal_eval(top)) <= {
        "bin",
        "dev",
        "etc",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "sbin",
        "tmp",
        "usr",
    }
    assert ast.literal_eval(etc) == ["ld.so.cache", "localtime"] and home == "False"
    assert "work" not in top and "root" not in top


@needs_bwrap
def test_a_venv_interpreter_sees_its_site_packages_but_not_the_rest_of_the_checkout() -> None:
    """The venv lives inside the checkout; configured as the sandbox's interpreter it is bound (it and the Python it
    was made from), its neighbours are not."""
    venv_python = Path(sys.executable)
    checkout = Path(__file__).resolve().parents[1]
    code = (
        "import sys, os\nimport typer\nprint(typer.__name__)\n"
        f"print(os.path.exists({str(checkout / 'pyproject.toml')!r}), os.path.exists({str(checkout / 'rl')!r}))"
    )
    result, _ = run(code, LIMITS.model_copy(update={"python": str(venv_python)}))
    assert result.ok, result.stderr
    assert result.stdout.splitlines() == ["typer", "False False"]
