"""Agent functions as environments: each sample runs the user's `run(client, row)` (`envs.agent`) against this
worker's OpenAI-compatible endpoint (`rollouts.endpoint`), and becomes a `Trajectory` of the tokens the endpoint
recorded for it.

Per sample the runner makes an `openai.AsyncOpenAI` client whose API key names the sample's episode (the endpoint
attributes each request by it), awaits the agent under `rollout.endpoint.episode_timeout_s`, and takes what it
returns as the reward (`Sample.env_reward`; a dict's components in `Sample.env_reward_parts`). An agent that raises,
times out or returns something that is not a reward fails its own sample only (status `error`, with why: the scorer
leaves it out and counts it); the others go on. At most `max_concurrent_episodes` agents run at once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from envs.agent import AgentFn, agent_reward
from envs.base import PromptRow
from rollouts.endpoint import Endpoint
from rollouts.records import Sample, Trajectory
from rollouts.sampling import SamplingParams
from rollouts.stitching import EpisodeLog


class AgentRunner:
    def __init__(self, endpoint: Endpoint, agent: AgentFn, name: str) -> None:
        self.endpoint, self.agent, self.name = endpoint, agent, name
        self.failures = 0
        """Samples whose agent raised, timed out or returned no reward (over this runner's life)."""

    def run(
        self,
        rows: list[PromptRow],
        samples_per_prompt: int,
        group_ids: list[int],
        version: int,
        sampling: SamplingParams,
        base_seed: int,
    ) -> list[Trajectory]:
        """Every sample of every row to its end; blocks until the last agent returns."""
        samples = [
            Sample(f"{row.index}-{k}", gid, row)
            for row, gid in zip(rows, group_ids, strict=True)
            for k in range(samples_per_prompt)
        ]
        return self.endpoint.call(lambda: self._run(samples, version, sampling, base_seed))

    async def _run(
        self, samples: list[Sample], version: int, sampling: SamplingParams, base_seed: int
    ) -> list[Trajectory]:
        import httpx
        import openai

        endpoint = self.endpoint
        nonce = uuid.uuid4().hex[:12]
        keys = [f"tiderl-{nonce}-{s.sample_id}" for s in samples]
        logs = {key: EpisodeLog(endpoint.renderer) for key in keys}
        cfg = endpoint.cfg
        phase = endpoint.open_phase(sampling, version, base_seed, logs, slots=len(samples))
        concurrency = min(cfg.max_concurrent_episodes, len(samples))
        # one connection pool for every agent of the call: a client of its own per sample would build an SSL
        # context and a pool each (~10 ms); trust_env off, so a proxy setting never routes loopback traffic
        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=cfg.request_timeout_s + 10,
            trust_env=False,
        )
        gate = asyncio.Semaphore(concurrency)

        async def episode(key: str, sample: Sample) -> Trajectory:
            client = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=key, http_client=http, max_retries=0)
            async with gate:
                error = await self._episode(client, sample)
            if error is not None:
                self.failures += 1
            return logs[key].trajectory(sample, error)

        try:
            return list(await asyncio.gather(*(episode(k, s) for k, s in zip(keys, samples, strict=True))))
        finally:
            endpoint.close_phase(phase)
            await http.aclose()

    async def _episode(self, client: Any, sample: Sample) -> str | None:
        """Run the agent on one sample; None when it returned a reward (recorded on the sample), else why not."""
        where = f"agent {self.name} on sample {sample.sample_id}"
        try:
            value = await asyncio.wait_for(self.agent(client, sample.row), self.endpoint.cfg.episode_timeout_s)
            reward, parts = agent_reward(value, where)
        except TimeoutError:
            return f"{where} ran past rollout.endpoint.episode_timeout_s={self.endpoint.cfg.episode_timeout_s}"
        except Exception as e:  # the one place a failing agent is isolated: its sample fails, counted, never raised
            return f"{where} raised {type(e).__name__}: {str(e)[:300]}"
        sample.env_reward = reward
        sample.env_reward_parts = parts
        return None
