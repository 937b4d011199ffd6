"""Agent functions for tests/test_agents.py, written with the `openai` package as a user would. One entry point,
`run`, dispatches on `row.extra_info["mode"]`, so one rollout worker serves every case; each keeps what it saw of
the endpoint in RECORDS[row.index] (the test reads them back from this module)."""

import asyncio

import httpx
import openai

RECORDS: dict = {}
"""What each sample's agent saw, by sample id (`"{row}-{k}"`: the tail of the key its client carries)."""
TOOL = {
    "type": "function",
    "function": {"name": "calc", "description": "Evaluate.", "parameters": {"type": "object", "properties": {}}},
}


async def ask(client, messages, **kwargs):
    """One chat request; the reply with the tokens the endpoint says it used (vLLM's return_token_ids)."""
    response = await client.chat.completions.create(
        model="policy",
        messages=messages,
        logprobs=True,
        max_tokens=8,
        extra_body={"return_token_ids": True},
        **kwargs,
    )
    choice = response.choices[0]
    logprobs = [t.logprob for t in choice.logprobs.content]
    return response, choice, logprobs


def sample_of(client) -> str:
    return client.api_key.split("-", 2)[2]


def _turn(response, choice, logprobs):
    return {
        "prompt": response.prompt_token_ids,
        "tokens": choice.token_ids,
        "logprobs": logprobs,
        "fingerprint": response.system_fingerprint,
        "finish": choice.finish_reason,
    }


async def tool_loop(client, row):
    """Three requests, each the last one's messages + the reply + a tool result or a user turn."""
    messages = list(row.messages)
    turns = []
    for follow_up in (
        {"role": "tool", "tool_call_id": "c0", "content": "42"},
        {"role": "user", "content": "go on"},
        None,
    ):
        response, choice, logprobs = await ask(client, messages, tools=[TOOL])
        turns.append(_turn(response, choice, logprobs))
        messages.append(choice.message.model_dump(exclude_none=True))
        if follow_up is not None:
            messages.append(follow_up)
    RECORDS[sample_of(client)] = turns
    return 0.5


async def rewrite(client, row):
    """Two requests on one history, then a summarized history (a rewrite) and one more on it."""
    first = list(row.messages)
    turns = []
    response, choice, logprobs = await ask(client, first)
    turns.append(_turn(response, choice, logprobs))
    second = first + [choice.message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
    response, choice, logprobs = await ask(client, second)
    turns.append(_turn(response, choice, logprobs))
    summary = [{"role": "user", "content": "Summary so far: 7. Continue."}]
    response, choice, logprobs = await ask(client, summary)
    turns.append(_turn(response, choice, logprobs))
    third = summary + [choice.message.model_dump(exclude_none=True), {"role": "user", "content": "and?"}]
    response, choice, logprobs = await ask(client, third)
    turns.append(_turn(response, choice, logprobs))
    RECORDS[sample_of(client)] = turns
    return {"answer": 1.0, "format": 0.25}


async def malformed(client, row):
    """Requests a server must refuse, each answered with OpenAI's error body, then a good one."""
    url, key = str(client.base_url).rstrip("/"), client.api_key
    seen = {}
    async with httpx.AsyncClient(trust_env=False, headers={"Authorization": f"Bearer {key}"}) as http:
        for name, body in {
            "not_json": b"{not json",
            "no_messages": b'{"model": "m"}',
            "bad_role": b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}',
            "image_part": b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "bad_max_tokens": b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}',
        }.items():
            r = await http.post(f"{url}/chat/completions", content=body)
            seen[name] = (r.status_code, r.json())
        r = await http.post(
            f"{url}/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer someone-else"},
        )
        seen["unknown_key"] = (r.status_code, r.json())
        r = await http.get(f"{url}/nowhere")
        seen["no_route"] = (r.status_code, r.json())
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
    except openai.BadRequestError as e:  # the SDK reads the error body as it reads OpenAI's
        seen["sdk_n2"] = (e.status_code, {"error": e.body})
    models = await client.models.list()
    seen["models"] = [m.id for m in models.data]
    response, choice, logprobs = await ask(client, list(row.messages))
    seen["after"] = _turn(response, choice, logprobs)
    RECORDS[sample_of(client)] = seen
    return 1.0


async def raises(client, row):
    await ask(client, list(row.messages))
    raise RuntimeError(f"agent bug on row {row.index}")


async def bad_return(client, row):
    await ask(client, list(row.messages))
    return "yes"


IN_TOOL = {"now": 0, "most": 0}
"""Agents waiting on their tool at once (now, and the most over a run): how far the episodes overlap."""


async def slow_tools(client, row):
    """Two requests around a slow tool (`extra_info["sleep"]` seconds, as a sandbox or a web call would take). With
    `extra_info["gather"]` = n, the tool also waits (up to 120 s) until n agents are in it at once: only episodes
    that run concurrently get there."""
    messages = list(row.messages)
    _, choice, _ = await ask(client, messages)
    IN_TOOL["now"] += 1
    IN_TOOL["most"] = max(IN_TOOL["most"], IN_TOOL["now"])
    deadline = asyncio.get_running_loop().time() + 120
    while IN_TOOL["most"] < row.extra_info.get("gather", 0) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(row.extra_info["sleep"])
    IN_TOOL["now"] -= 1
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "content": "done"}]
    await ask(client, messages)
    return 1.0


MODES = {f.__name__: f for f in (tool_loop, rewrite, malformed, raises, bad_return, slow_tools)}


async def run(client, row):
    return await MODES[row.extra_info["mode"]](client, row)


def sync_run(client, row):
    return 1.0


async def one_argument(client):
    return 1.0


async def varied(client, row):
    """The task's prompt, one reply; rewarded by the reply's length, so a group's samples differ and the job trains."""
    response = await client.chat.completions.create(model="policy", messages=list(row.messages))
    return float(len(response.choices[0].message.content or "") + response.usage.completion_tokens)
