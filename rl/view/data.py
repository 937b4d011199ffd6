"""What the viewer reads from a run directory, as JSON-ready dicts (the page's only source of data).

A run directory holds `config.yaml`, `metrics.jsonl` (a row per step), `eval.json` (held-out evaluations),
`weight_sync.json` and `trajectories/step_N.jsonl` (the step's samples, `rl.loop.samples`). A run still going appends
to them: a half-written last line of `metrics.jsonl` is skipped, and step files are replaced whole.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml

STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


class RunDirError(ValueError):
    """The directory is not a tiderl run directory."""


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(
            f"{run_dir}: not a tiderl run directory (no config.yaml); `tiderl train` writes one under runs/"
        )


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The run: its config, every step's metrics, the evaluations, and the steps whose samples were saved."""
    config_text = _read(run_dir / "config.yaml") or ""
    config = yaml.safe_load(config_text) or {}
    metrics = _jsonl(run_dir / "metrics.jsonl")
    evals = _json(run_dir / "eval.json") or {}
    total = int((config.get("trainer") or {}).get("steps", 0))
    last = metrics[-1]["step"] if metrics else 0
    return {
        "name": run_dir.resolve().name,
        "path": str(run_dir.resolve()),
        "config_text": config_text,
        "total_steps": total,
        "metrics": metrics,
        "eval": evals,
        "weight_sync": _json(run_dir / "weight_sync.json"),
        "steps": step_files(run_dir),
        "finished": "after" in evals or (total > 0 and last >= total and not config.get("eval", {}).get("enabled")),
        "read_at": time.time(),
    }


def step_files(run_dir: Path) -> list[dict[str, Any]]:
    """The steps with saved samples: `[{"step": 3, "version": mtime_ns}]` (the version changes when a resumed run
    writes the step again)."""
    out = []
    for path in (run_dir / "trajectories").glob("step_*.jsonl"):
        match = STEP_FILE.search(path.name)
        if match:
            out.append({"step": int(match.group(1)), "version": path.stat().st_mtime_ns})
    return sorted(out, key=lambda s: s["step"])


def step_samples(run_dir: Path, step: int) -> dict[str, Any]:
    """Step `step`'s samples (`rl.loop.samples` records); an empty list when the step saved none."""
    return {"step": step, "samples": _jsonl(run_dir / "trajectories" / f"step_{step:06d}.jsonl")}


def snapshot(run_dir: Path) -> dict[str, Any]:
    """Everything the page shows, for an exported file: the run and every step's samples."""
    run = run_summary(run_dir)
    return {"run": run, "steps": {str(s["step"]): step_samples(run_dir, s["step"]) for s in run["steps"]}}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _json(path: Path) -> Any:
    text = _read(path)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # being rewritten this moment: the next poll reads it
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (_read(path) or "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a file being appended to
            continue
    return rows


def to_json(value: Any) -> str:
    """JSON the browser parses: NaN and infinities (a metric can be NaN) become null."""
    return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
