"""Experiment trackers: where a job's metrics go besides `metrics.jsonl` (`logging.trackers`).

Each tracker receives the resolved config once, every step's metrics, the held-out evaluations, and each step's
kept samples as a table (`rl.loop.samples.table_rows`), through the tracker's own client:

- tensorboard: event files in `RUN_DIR/tensorboard` (scalars; the config and the sample tables as text);
- wandb: a W&B run in `RUN_DIR/wandb`, offline unless `WANDB_MODE` says otherwise (`wandb sync` uploads it later);
- trackio: a local trackio project (its SQLite files under `TRACKIO_DIR`, default `~/.cache/huggingface/trackio`;
  `trackio show` opens its dashboard);
- mlflow: an MLflow run in the file store `RUN_DIR/mlruns`, unless `MLFLOW_TRACKING_URI` names another store
  (`mlflow ui --backend-store-uri RUN_DIR/mlruns`).

Every tracker but tensorboard is an optional extra (`pip install -e '.[wandb]'`, ...); `check_trackers` names the
missing ones before anything starts. A resumed job opens a new tracker run that continues the step count. Trackers are
looked up by name in `TRACKERS` (add one with `@register_tracker`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is opened with."""

    run_dir: Path
    project: str
    """W&B and trackio project, MLflow experiment (`logging.project`)."""
    name: str
    """The run's name: its directory's."""
    config: dict[str, Any]
    """The resolved job config."""


class Tracker(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of the step's kept samples (one dict per row, the same keys in every row)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TrackerKind:
    open: Callable[[TrackerRun], Tracker]
    package: str | None
    """The module its client imports (None: a core dependency)."""
    extra: str | None
    """The pip extra that installs it."""


TRACKERS: dict[str, TrackerKind] = {}


def register_tracker(name: str, package: str | None = None, extra: str | None = None):
    def register(cls: Callable[[TrackerRun], Tracker]) -> Callable[[TrackerRun], Tracker]:
        TRACKERS[name] = TrackerKind(cls, package, extra)
        return cls

    return register


def check_trackers(names: list[str]) -> list[str]:
    """What is wrong with `logging.trackers`: unknown names and trackers whose client is not installed, each with
    what to do (an empty list when all can open)."""
    problems = []
    for name in names:
        kind = TRACKERS.get(name)
        if kind is None:
            problems.append(f"logging.trackers: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        elif kind.package is not None and importlib.util.find_spec(kind.package) is None:
            problems.append(
                f"logging.trackers: {name} is not installed; pip install -e '.[{kind.extra}]' "
                f"(or remove {name} from logging.trackers)"
            )
    return problems


def open_trackers(names: list[str], run: TrackerRun) -> list[Tracker]:
    return [TRACKERS[name].open(run) for name in names]


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"trainer.steps": "30", ...}`: the config as the flat string parameters MLflow keeps."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


@register_tracker("tensorboard")
class TensorBoardTracker:
    def __init__(self, run: TrackerRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir / "tensorboard"))
        self.writer.add_text("config", _code_block(yaml.safe_dump(run.config, sort_keys=False)), 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.writer.add_text("samples", _markdown_table(rows), step)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@register_tracker("wandb", package="wandb", extra="wandb")
class WandbTracker:
    def __init__(self, run: TrackerRun) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=run.project,
            name=run.name,
            dir=str(run.run_dir),
            config=run.config,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if rows:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


@register_tracker("trackio", package="trackio", extra="trackio")
class TrackioTracker:
    def __init__(self, run: TrackerRun) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=run.project, name=run.name, config=run.config, embed=False, auto_log_cpu=False, auto_log_gpu=False
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if rows:
            import pandas as pd

            self.run.log({"samples": self.trackio.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def close(self) -> None:
        self.run.finish()


@register_tracker("mlflow", package="mlflow", extra="mlflow")
class MlflowTracker:
    def __init__(self, run: TrackerRun) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # the run directory's own file store (MLflow 3 asks for this opt-in to it)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run.run_dir / "mlruns").resolve().as_uri()
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, value[:6000]) for key, value in flat_config(run.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(run.config, sort_keys=False), "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if rows:
            columns = {c: [row[c] for row in rows] for c in rows[0]}
            self.client.log_table(self.run_id, data=columns, artifact_file=f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # markdown: indented lines are code


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ⏎ ")[:400]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
