"""What a job reads and where it runs, checked before anything starts (`rl.launch.preflight` runs these): the model
directories (a config transformers loads), the prompt and PTX files (they exist, with the columns tiderl reads),
and the resources every actor asks for against the nodes (a local Ray instance: this machine)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from rl.config import JobConfig
from rl.launch.preflight import Problem, _where

# ------------------------------------------------------------------------------------------ models and data


def check_models(cfg: JobConfig, local: bool = True) -> list[Problem]:
    """`model.path` and each `reward.models[].path`: a directory with a config transformers loads (or the GGUF)."""
    problems: list[Problem] = []
    targets = [("model.path", cfg.model.path, cfg.model.gguf_file)]
    targets += [(f"reward.models[{i}].path", m.path, None) for i, m in enumerate(cfg.reward.models)]
    for key, path, gguf in targets:
        if path is None:
            continue
        p = Path(path).expanduser()
        if not p.exists():
            if local:
                problems.append(
                    Problem(
                        key,
                        path,
                        f"no such directory (looked for {p.resolve()}): give a Hugging "
                        "Face model directory (config.json, weights, tokenizer); Hub ids are not "
                        "downloaded, fetch one first (`hf download ID --local-dir DIR`)",
                    )
                )
            continue
        if not p.is_dir():
            problems.append(
                Problem(
                    key,
                    path,
                    "is a file: give the directory that holds config.json (and, for a "
                    "GGUF model, set model.gguf_file to the file's name in it)",
                )
            )
        elif gguf is not None:
            if not (p / gguf).is_file():
                ggufs = sorted(x.name for x in p.glob("*.gguf"))
                problems.append(
                    Problem("model.gguf_file", gguf, f"not in {path} (GGUF files there: {', '.join(ggufs) or 'none'})")
                )
        elif not (p / "config.json").is_file():
            problems.append(
                Problem(
                    key,
                    path,
                    "holds no config.json: give a Hugging Face model directory (what "
                    "save_pretrained writes), or set model.gguf_file for a GGUF file in it",
                )
            )
        else:
            problem = _config_problem(p / "config.json")
            if problem:
                problems.append(Problem(key, path, problem))
    return problems


def _config_problem(config: Path) -> str | None:
    """Why transformers could not load this config.json (None: it can). It must be a JSON object whose `model_type`
    transformers knows; read from transformers' own table of model types without importing transformers (which
    imports torch: seconds)."""
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        return f"its config.json is not valid JSON ({e}): give the directory save_pretrained wrote"
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        return "its config.json has no `model_type`: it is not a transformers model config"
    known = _known_model_types()
    if known is not None and data["model_type"] not in known:
        version = importlib.metadata.version("transformers")
        return (
            f"its config.json says model_type {data['model_type']!r}, which transformers {version} does not know: a "
            "model of a newer transformers, or one that needs trust_remote_code (not supported)"
        )
    return None


def _known_model_types() -> set[str] | None:
    """transformers' model types: its `models/auto/auto_mappings.py` table (a plain dict, loaded as a file) and its
    model packages; None if this transformers lays them out otherwise."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0]) / "models"
    mappings = importlib.util.spec_from_file_location(
        "_tiderl_transformers_mappings", root / "auto" / "auto_mappings.py"
    )
    if mappings is None or mappings.loader is None:
        return None
    module = importlib.util.module_from_spec(mappings)
    try:
        mappings.loader.exec_module(module)
    except (OSError, ImportError, SyntaxError):
        return None
    names = set(getattr(module, "CONFIG_MAPPING_NAMES", {}))
    if not names:
        return None
    return names | {d.name for d in root.iterdir() if d.is_dir()}


VERL_COLUMNS = ("prompt", "reward_model.ground_truth")


def check_data(cfg: JobConfig) -> list[Problem]:
    """Prompt files: exist, in a format `datasets` reads, with verl's columns; PTX files: JSONL of messages or text."""
    problems: list[Problem] = []
    for section, key in (("data", "train_files"), ("data", "eval_files")):
        for i, file in enumerate(getattr(getattr(cfg, section), key)):
            where = f"{section}.{key}[{i}]"
            p = Path(file).expanduser()
            if not p.exists():
                problems.append(Problem(where, file, f"does not exist (looked for {p.resolve()})"))
                continue
            try:
                columns = _columns(p)
            except (OSError, ValueError) as e:
                problems.append(Problem(where, file, f"cannot be read: {_where(e)}"))
                continue
            if columns is None:
                problems.append(
                    Problem(
                        where,
                        file,
                        "unsupported format: use .jsonl, .json, .parquet or a saved "
                        "dataset directory (datasets' save_to_disk)",
                    )
                )
                continue
            missing = [c for c in VERL_COLUMNS if c not in columns]
            if missing:
                problems.append(
                    Problem(
                        where,
                        file,
                        f"lacks {', '.join(missing)} (it has {', '.join(sorted(columns))}"
                        "): prompts need verl's layout, `prompt` (chat messages or a string) and "
                        "`reward_model: {ground_truth: ...}`; `data_source`, `extra_info` optional",
                    )
                )
    for i, file in enumerate(cfg.algorithm.ptx_files if cfg.algorithm.ptx_coef > 0 else []):
        p = Path(file).expanduser()
        if not p.is_file():
            problems.append(Problem(f"algorithm.ptx_files[{i}]", file, f"does not exist (looked for {p.resolve()})"))
            continue
        first = _first_json_line(p)
        if not isinstance(first, dict) or not ({"messages", "text"} & set(first)):
            problems.append(
                Problem(
                    f"algorithm.ptx_files[{i}]",
                    file,
                    'each line must be a JSON object with `messages` (chat messages) or `text`, e.g. {"text": "..."}',
                )
            )
    return problems


def _columns(path: Path) -> set[str] | None:
    """Column names, nested struct fields as `parent.child`; None for a format `datasets` does not read here."""
    if path.is_dir():
        info = path / "dataset_info.json"
        if not info.is_file():
            return None
        return _flatten(json.loads(info.read_text()).get("features") or {})
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        out = set(schema.names)
        for field in schema:
            if hasattr(field.type, "num_fields"):  # a struct: its children count as parent.child
                out |= {f"{field.name}.{field.type.field(j).name}" for j in range(field.type.num_fields)}
        return out
    if path.suffix in (".jsonl", ".json"):
        first = _first_json_line(path)
        if isinstance(first, list):
            first = first[0] if first else {}
        if not isinstance(first, dict):
            raise ValueError("its first record is not a JSON object")
        return _flatten(first)
    return None


def _flatten(mapping: dict[str, Any]) -> set[str]:
    out = set(mapping)
    for k, v in mapping.items():
        if isinstance(v, dict):
            out |= {f"{k}.{child}" for child in v}
    return out


def _first_json_line(path: Path) -> Any:
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return json.loads(path.read_text())  # a JSON array over several lines
    return None


# ------------------------------------------------------------------------------------------ resources


def check_resources(cfg: JobConfig, nodes: list[dict[str, float]] | None) -> list[Problem]:
    """Each actor's bundle fits some node, and all bundles the machine (a local Ray instance) or the cluster
    (`nodes`, as Ray reports them); a job joining a running cluster by `cluster.address` is checked on placement."""
    if cfg.cluster.backend != "ray":
        return []
    where = "the Ray cluster"
    if nodes is None:
        if cfg.cluster.address or _joins_cluster():
            return []
        nodes = [{"CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1), "GPU": float(local_gpus())}]
        where = f"this machine (a local Ray instance: {nodes[0]['CPU']:g} CPUs, {nodes[0]['GPU']:g} GPUs)"
    from rl.launch.placement import PlacementError, check_fits, job_bundles

    bundles = job_bundles(cfg)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    for b in bundles:
        try:
            check_fits([b], nodes, {k: float("inf") for k in total})
        except PlacementError as e:
            return [Problem(b.setting, _fmt(b.resources), f"{e} [{where}]")]
    try:
        check_fits(bundles, nodes, total)
    except PlacementError as e:
        return [
            Problem(
                "resources", _fmt({k: sum(b.resources.get(k, 0) for b in bundles) for k in total}), f"{e} [{where}]"
            )
        ]
    return []


def _joins_cluster() -> bool:
    """Whether `tiderl train` will join a running cluster (a submitted job's driver: Ray sets RAY_ADDRESS)."""
    address = os.environ.get("RAY_ADDRESS", "")
    return bool(address) and not address.startswith(("http://", "https://"))


def local_gpus() -> int:
    """GPUs a local Ray instance would see (Ray's own count: CUDA_VISIBLE_DEVICES, else the driver's devices)."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager as gpus

        visible = gpus.get_current_process_visible_accelerator_ids()
        return len(visible) if visible is not None else gpus.get_current_node_num_accelerators()
    except Exception:  # no driver, no library: Ray would see none either
        return 0


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if v) or "nothing"


def driver_modules() -> list[str]:
    """Import names of tiderl's own dependencies (pyproject's `dependencies`): what a job's driver imports."""
    try:
        requirements = importlib.metadata.requires("tiderl") or []
    except importlib.metadata.PackageNotFoundError:  # not installed (a bare checkout): the core of them
        requirements = ["torch", "ray", "transformers", "typer", "pydantic", "pyyaml"]
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements if "extra ==" not in r]
    return sorted({IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names})


IMPORT_NAMES = {"pyyaml": "yaml"}  # distributions whose import name is not their name with - as _
