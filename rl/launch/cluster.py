"""Connect to Ray: an existing cluster when `cluster.address` is set or the job was submitted to one (Ray
sets RAY_ADDRESS for a submitted job's driver), otherwise a local instance on this machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from rl.config import ClusterConfig
from rollouts.actors import RAY_ENV


@contextmanager
def ray_session(cfg: ClusterConfig) -> Iterator[None]:
    """Use the Ray instance already initialized in this process (tests), or start/connect one and shut it down."""
    if ray.is_initialized():
        yield
        return
    os.environ.update(RAY_ENV)
    address = cluster_address(cfg)
    if address:
        # a submitted job already runs in its runtime environment (working dir, pip); only add our env vars
        ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env={"env_vars": RAY_ENV},
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()


def cluster_address(cfg: ClusterConfig) -> str | None:
    """The cluster to connect to: `cluster.address`, else Ray's own RAY_ADDRESS (set in a submitted job's driver;
    an http:// one names a Jobs API server, which `tiderl submit` uses, not a cluster to join)."""
    env = os.environ.get("RAY_ADDRESS", "")
    return cfg.address or (env if env and not env.startswith(("http://", "https://")) else None)
