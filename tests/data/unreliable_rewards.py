"""Reward functions that misbehave on every 10th call: one raises, one sleeps past its timeout."""

import itertools
import threading
import time

_lock = threading.Lock()
_calls = {"flaky": itertools.count(), "sleepy": itertools.count()}


def _tenth(name):
    with _lock:
        return next(_calls[name]) % 10 == 0


def flaky(data_source, solution_str, ground_truth, extra_info=None):
    if _tenth("flaky"):
        raise RuntimeError("grader crashed")
    return 0.0


def sleepy(data_source, solution_str, ground_truth, extra_info=None):
    if _tenth("sleepy"):
        time.sleep(5)
    return 0.0
