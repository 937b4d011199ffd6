"""`tiderl serve TARGET`: chat with a policy through the OpenAI-compatible endpoint the rollout workers serve.

TARGET is a run directory (its latest checkpoint's policy, or `--step`'s, served as the run's workers ran it: its
`quant:` section makes the targeted weights INT4) or a policy directory (a Hugging Face checkpoint, `tiderl export`'s
INT4 output included), served with the job config's defaults and the given overrides. One rollout worker is built
in this process, and its endpoint (`rollouts.endpoint`) opens a generation phase that never closes and takes any
client: each API key (or `X-Episode-Id`) is a conversation whose next turn continues in its cache slot.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from rl.config import JobConfig, apply_override, validate_config
from rl.loop.checkpoint import checkpoint_dir, latest_checkpoint


def resolve(target: Path, overrides: list[str], step: int | None) -> tuple[Path, JobConfig, str]:
    """(policy directory, config, served model name) of a run directory or a policy directory."""
    if (target / "config.yaml").is_file():
        raw = yaml.safe_load((target / "config.yaml").read_text())
        checkpoint = checkpoint_dir(target) / f"step_{step:06d}" if step is not None else latest_checkpoint(target)
        if checkpoint is None or not (checkpoint / "policy").is_dir():
            which = f"for step {step} " if step is not None else ""
            raise FileNotFoundError(f"no checkpoint {which}with a policy in {checkpoint_dir(target)}")
        policy, name = checkpoint / "policy", f"{target.resolve().name}-{checkpoint.name}"
    elif (target / "config.json").is_file():
        if step is not None:
            raise ValueError(f"--step picks a checkpoint of a run directory; {target} is a policy directory")
        raw, policy, name = {"model": {"path": str(target)}}, target, target.resolve().name
    else:
        raise FileNotFoundError(
            f"{target} is neither a run directory (config.yaml) nor a policy directory (config.json)"
        )
    for item in overrides:
        apply_override(raw, item)
    return policy, validate_config(raw, str(target)), name


def serve(target: Path, overrides: list[str], step: int | None, host: str, port: int, greedy: bool) -> None:
    """Serve until interrupted; prints the base URL once the port accepts connections."""
    import torch

    from rollouts.endpoint import Endpoint
    from rollouts.sampling import SamplingParams
    from rollouts.worker import RolloutWorker

    policy, cfg, name = resolve(
        target, [*overrides, f"rollout.endpoint.host={host}", f"rollout.endpoint.port={port}"], step
    )
    worker = RolloutWorker(str(policy), cfg.worker_spec(), 0)
    endpoint = worker.agents.endpoint if worker.agents is not None else None
    if endpoint is None:
        endpoint = Endpoint(worker.engine, worker.renderer, cfg.rollout, name)
        endpoint.start()
    endpoint.model_name = name
    r = cfg.rollout
    sampling = SamplingParams(r.temperature, greedy, r.top_p, r.top_k)
    seed = int(torch.randint(0, 2**62, (1,)))

    async def open_phase() -> None:
        endpoint.open_phase(sampling, 0, seed, episodes=None)

    endpoint.call(open_phase)
    how = "greedy" if greedy else f"temperature {r.temperature}"
    print(f"serving {name} ({how}) at {endpoint.base_url} (Ctrl-C stops)", flush=True)
    try:
        while endpoint.thread is not None and endpoint.thread.is_alive():
            time.sleep(0.5)
    finally:
        endpoint.stop()
