"""Each tracker (`logging.trackers`), offline, through a real tiny job: what it logged is read back with its own files
or client and compared with metrics.jsonl, the resolved config and the kept samples. One job logs to every tracker
whose package is installed; a tracker's test is skipped, naming the extra, when its package is not."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
import yaml

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
INSTALLED = [name for name, package in TRACKER_PACKAGES.items() if importlib.util.find_spec(package) is not None]
PROJECT = "tiderl-test"


@pytest.fixture(scope="module")
def tracked_run(make_cfg, tmp_path_factory) -> Path:
    """A 2-step tiny job (in process) logging to every installed tracker; trackio writes under the run's parent."""
    from rl.loop.controller import train

    root = tmp_path_factory.mktemp("trackers")
    saved = {k: os.environ.get(k) for k in ("TRACKIO_DIR", "WANDB_MODE", "MLFLOW_TRACKING_URI")}
    os.environ["TRACKIO_DIR"] = str(root / "trackio")  # read when trackio is imported, which the job does first
    os.environ.pop("WANDB_MODE", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cfg = make_cfg(
            "cluster.backend=in_process",
            "eval.enabled=false",
            "logging.samples_per_step=3",
            f"logging.trackers=[{', '.join(INSTALLED)}]",
            f"logging.project={PROJECT}",
        )
        train(cfg, root / "run")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root / "run"


def _needs(name: str) -> None:
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed: pip install -e '.[{name}]'")


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r.pop("step"): {k: v for k, v in r.items() if k != "wall_time"} for r in rows}


def _kept(run_dir: Path, step: int) -> list[str]:
    lines = (run_dir / "trajectories" / f"step_{step:06d}.jsonl").read_text().splitlines()
    return [r["sample_id"] for r in map(json.loads, lines) if "tokens" in r]


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_tensorboard(tracked_run: Path) -> None:
    _needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = _metrics(tracked_run)
    assert set(events.Tags()["scalars"]) == {k for row in metrics.values() for k in row}
    for key in ("reward_mean", "mismatch_abs_logp", "time_step_s"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({step: row[key] for step, row in metrics.items()}, rel=1e-6)
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    config = texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in config.splitlines())) == _config(tracked_run)
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in texts["samples/text_summary"]}
    for step in metrics:
        assert all(f"| {sample_id} |" in samples[step] for sample_id in _kept(tracked_run, step))


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (`run-ID.wandb`): a 7-byte header, then LevelDB-log-framed protobuf
    `Record`s in 32 KiB blocks (the format `wandb sync` reads; the SDK no longer ships a Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline(tracked_run: Path) -> None:
    _needs("wandb")
    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == PROJECT and run.display_name == tracked_run.name
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert config == _config(tracked_run)
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for step, row in _metrics(tracked_run).items():
        assert {k: history[step][k] for k in row} == pytest.approx(row)
        table = json.loads((run_file.parent / "files" / history[step]["samples/path"]).read_text())
        assert [row[0] for row in table["data"]] == _kept(tracked_run, step)
        assert table["columns"][:3] == ["sample_id", "group_id", "reward"]


def test_trackio_local(tracked_run: Path) -> None:
    _needs("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(PROJECT, tracked_run.name)
    assert SQLiteStorage.get_run_config(PROJECT, tracked_run.name)["trainer"] == _config(tracked_run)["trainer"]
    metrics = _metrics(tracked_run)
    for step, row in metrics.items():
        logged = {k: v for entry in logs if entry["step"] == step for k, v in entry.items()}
        assert {k: logged[k] for k in row} == pytest.approx(row)
        table = logged["samples"]["_value"]
        assert [r["sample_id"] for r in table] == _kept(tracked_run, step)


def test_mlflow_file_store(tracked_run: Path) -> None:
    _needs("mlflow")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    assert run.info.run_name == tracked_run.name and run.info.status == "FINISHED"
    assert run.data.params["trainer.steps"] == str(_config(tracked_run)["trainer"]["steps"])
    metrics = _metrics(tracked_run)
    for key in ("reward_mean", "mismatch_abs_logp", "loss"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({step: row[key] for step, row in metrics.items()})
    out = Path(client.download_artifacts(run.info.run_id, "", str(tracked_run.parent / "mlflow-download")))
    assert yaml.safe_load((out / "config.yaml").read_text()) == _config(tracked_run)
    for step in metrics:
        table = json.loads((out / "samples" / f"step_{step:06d}.json").read_text())
        assert [row[0] for row in table["data"]] == _kept(tracked_run, step)
