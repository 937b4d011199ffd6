"""The test runner that executes inside the sandbox for the `code_tests` reward (`rewards.code_tests`).

Never imported by tiderl: its source becomes the sandbox's `main.py`, followed by one call `_main(SPEC)` with the
model's code and the tests. Only the standard library, and Python 3.8+ syntax, because it runs under the sandbox's
interpreter (`/usr/bin/python3` by default), not ours.

One sandbox per sample, one forked child per test: forking the already-started interpreter costs a few
milliseconds where a fresh sandbox and interpreter cost ~80 ms, and every test still starts from the same clean
state (the model's code runs anew in each child, so a test cannot see what an earlier one changed). The parent
waits for each child with the per-test timeout and kills its whole process group when it overruns, so a hang in C
code, a blocked signal or a swallowed exception cannot outlive its test.

What travels back: one JSON line per test on the parent's stdout, which no child can write to (each child points
fd 1 at its own file before the model's code runs). The expected outputs never enter the sandbox; the host compares.
A child reports through a verdict file stamped with a per-test random token, so a program that exits early
(`sys.exit(0)`, `os._exit(0)`) before the tests run has no verdict and fails. This is a guard against accidents and
easy reward hacks, not a security boundary: code that reads the harness's memory can forge a verdict (what it can do
to the machine is bounded by the sandbox).
"""

import builtins
import errno
import json
import os
import select
import signal
import sys
import time
import traceback

_DETAIL_CHARS = 400


def _main(spec_json):
    spec = json.loads(spec_json)
    try:
        code = compile(spec["code"], "solution.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        detail = "the code does not compile: " + _describe(e)
        for i in range(len(spec["tests"])):
            _report({"index": i, "status": "error", "detail": detail})
        return
    for i, test in enumerate(spec["tests"]):
        result = _run_test(code, test, i, spec["timeout_s"], spec["output_cap"])
        _report(result)
        if spec["stop_at_first_failure"] and result["status"] != "ran":
            break  # a later test cannot change an all-or-nothing score that is already 0


def _report(result):
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _run_test(code, test, index, timeout_s, output_cap):
    token = os.urandom(16).hex()
    out_path, verdict_path = "out_%d" % index, "verdict_%d" % index
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    pid = _fork(start + timeout_s)
    if pid is None:
        return {"index": index, "status": "error", "detail": "the sandbox could not start a process for the test"}
    if pid == 0:
        _child(code, test, index, token, output_cap)  # never returns
    try:
        os.setpgid(pid, pid)  # also done in the child: whichever runs first, the group exists before a kill
    except OSError:
        pass
    timed_out = not _wait(pid, start + timeout_s)
    _kill_group(pid)  # on a timeout the test; otherwise what it left running in the background
    _, status = os.waitpid(pid, 0)
    seconds = round(time.monotonic() - start, 4)
    result = {"index": index, "seconds": seconds}
    if timed_out:
        result.update(status="timeout", detail="ran past the per-test timeout of %gs" % timeout_s)
        return result
    if os.WIFSIGNALED(status):
        try:
            name = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            name = "signal %d" % os.WTERMSIG(status)
        reasons = {
            "SIGXCPU": "used up its CPU-time limit",
            "SIGXFSZ": "wrote more output than allowed",
            "SIGSEGV": "crashed (segmentation fault)",
        }
        result.update(status="signal", detail=reasons.get(name, "was killed by " + name))
        return result
    verdict = _read_verdict(verdict_path, token)
    if verdict is None:
        result.update(status="error", detail="the code exited (status %d) before the test ran" % _exit_code(status))
        return result
    result.update(verdict)
    if test["capture"]:
        result["stdout"], result["stdout_truncated"] = _read_capped(out_path, output_cap)
    return result


def _fork(deadline):
    """fork, retried while the sandbox user's process limit is full (a fork bomb in a sandbox running beside this
    one holds it until its test is killed); None when it stays full until the test's deadline."""
    while True:
        try:
            return os.fork()
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def _wait(pid, deadline):
    """True when the child exited before the deadline (it is left to be reaped)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: poll instead
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.005)
        return False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                ready, _, _ = select.select([pidfd], [], [], remaining)
            except InterruptedError:
                continue
            return bool(ready)
    finally:
        os.close(pidfd)


def _kill_group(pid):
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except OSError:
            pass


def _exit_code(status):
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


def _child(code, test, index, token, output_cap):
    """Run the model's code and one test; write the verdict; exit. Never returns."""
    try:
        os.setpgid(0, 0)
        _redirect(0, test.get("stdin") or "", "in_%d" % index)
        fd = os.open("out_%d" % index, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.close(fd)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
        sys.argv = ["solution.py"]
    except BaseException:
        os._exit(70)
    verdict = {"status": "ran"}
    # Programs read stdin and run as __main__; function and assert tests import the code as a module (as verl's
    # prime_code does for function calls), so an `if __name__ == "__main__":` demo that reads input does not run.
    namespace = {"__name__": "__main__" if test["kind"] == "stdio" else "solution", "__builtins__": builtins}
    try:
        try:
            exec(code, namespace)
        except SystemExit as e:
            if test["kind"] != "stdio":
                raise
            if e.code not in (None, 0):
                verdict = {"status": "error", "detail": "the program exited with status %r" % (e.code,)}
        if test["kind"] == "call":
            value = _call(namespace, test["fn_name"], test["args"])
            try:
                text = json.dumps(value)
            except (TypeError, ValueError) as e:
                verdict = {"status": "error", "detail": "returned %s, which is not JSON: %s" % (type(value), e)}
            else:
                if len(text) > output_cap:
                    verdict = {"status": "error", "detail": "returned a value over %d characters" % output_cap}
                else:
                    verdict["value"] = text
        if test.get("asserts"):
            exec(compile(test["asserts"], "test.py", "exec"), namespace)
    except SystemExit as e:
        verdict = {"status": "error", "detail": "the code exited (status %r) before the test finished" % (e.code,)}
    except AssertionError as e:
        verdict = {"status": "wrong_answer", "detail": _assertion(e, test.get("asserts") or "")}
    except BaseException as e:
        verdict = {"status": "error", "detail": _describe(e)}
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    verdict["token"] = token
    with open("verdict_%d" % index, "w") as f:
        f.write(json.dumps(verdict))
    os._exit(0)


def _redirect(fd, text, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    src = os.open(path, os.O_RDONLY)
    os.dup2(src, fd)
    os.close(src)


def _call(namespace, fn_name, args):
    """The named function, or that method of a `Solution` instance (LeetCode style), as verl's wrappers look it up."""
    if fn_name in namespace and callable(namespace[fn_name]):
        return namespace[fn_name](*args)
    if isinstance(namespace.get("Solution"), type):
        return getattr(namespace["Solution"](), fn_name)(*args)
    raise NameError("the code defines no function %r" % fn_name)


def _describe(e):
    """`Type: message` and where in the model's code it was raised."""
    if isinstance(e, OSError) and e.errno == errno.EFBIG:  # Python ignores SIGXFSZ: the write fails instead
        return "wrote more output than allowed"
    text = "%s: %s" % (type(e).__name__, e)
    where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "solution.py"]
    if where:
        text += " (solution.py line %d)" % where[-1].lineno
    return text[:_DETAIL_CHARS]


def _assertion(e, source):
    """The failing assert's line of the test (or, raised in the model's code, that line number)."""
    frames = traceback.extract_tb(e.__traceback__)
    lines = source.splitlines()
    in_test = [f for f in frames if f.filename == "test.py" and 0 < f.lineno <= len(lines)]
    if not in_test or frames[-1].filename != "test.py":
        return _describe(e)
    text = lines[in_test[-1].lineno - 1].strip()
    return (text + (" (%s)" % e if str(e) else ""))[:_DETAIL_CHARS]


def _read_verdict(path, token):
    try:
        with open(path) as f:
            verdict = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(verdict, dict) or verdict.pop("token", None) != token:
        return None
    return verdict


def _read_capped(path, cap):
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError:
        return "", False
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap
