"""A user environment whose reset always raises (its backing service is down): every sample's rollout fails."""


class OfflineEnv:
    async def reset(self, row):
        raise ConnectionError("index service offline")

    async def step(self, calls):
        raise AssertionError("never reached")

    async def close(self):
        pass
