"""The shipped verifiers example (examples/verifiers_calculator.py) behind an adapter that also keeps verifiers' own
output of each sample, so tests/test_verifiers_env.py can compare what verifiers saw with what the endpoint
recorded. Keyed by sample id (the client's API key ends with it)."""

from pathlib import Path

from envs.registry import ENVS
from envs.verifiers_env import VerifiersAgent

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "verifiers_calculator.py"
ENV = ENVS.get(f"{EXAMPLE}:ENV")
OUTPUTS: dict[str, dict] = {}


class RecordingAgent(VerifiersAgent):
    async def rollout(self, client, row):
        output = await super().rollout(client, row)
        OUTPUTS[client.api_key.split("-", 2)[2]] = output  # key: tiderl-<nonce>-<sample id>
        return output


run = RecordingAgent(ENV)
