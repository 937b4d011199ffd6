"""OpenAI's wire format for the rollout endpoint (`rollouts.endpoint`): requests validated into typed records, errors
as OpenAI's error body, chat messages brought to the one form the chat template and the stitching compare, and the
response bodies.

Hand-written rather than taken from vLLM or SGLang: their protocol modules are tied to their engines and servers.
The subset served is what agents written with the `openai` package send: chat completions with `tools` and
`tool_calls`, plain completions, `logprobs`, `seed`, `stream` (the finished reply as server-sent events), and
vLLM's `return_token_ids` extension (the prompt's and the reply's token ids in the response). Sampling follows the
server (the job's `rollout.temperature`, top-p, top-k: the distribution the learner recomputes logprobs under), so a
request's `temperature` / `top_p` are accepted and not applied; what cannot be honoured faithfully (`n` > 1, `stop`
strings, a forced `tool_choice`, non-text content) is refused with an error naming the parameter.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rollouts.tool_parsers import K2_SECTION_BEGIN, K2_SECTION_END

ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """A request the endpoint refuses: becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self, message: str, status: int = 400, type: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's many optional fields that change nothing here

    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None
    return_token_ids: bool = False
    """vLLM's extension: the response carries `prompt_token_ids` and the choice's `token_ids`."""
    temperature: float | None = None
    top_p: float | None = None


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The request body as `model`, or an APIError naming the first bad field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(f"{param}: {first['msg']}", param=param) from None
    _refuse_unsupported(request)
    return request


def _refuse_unsupported(request: _Request) -> None:
    if request.n != 1:
        raise APIError("n must be 1: each request samples one reply", param="n")
    if request.stop:
        raise APIError(
            "stop sequences are not supported: the policy ends its turn with its end-of-turn token", param="stop"
        )
    if isinstance(request, ChatRequest):
        if request.tool_choice not in (None, "auto", "none"):
            raise APIError(
                "tool_choice must be 'auto' or 'none': the policy decides whether to call a tool",
                400,
                param="tool_choice",
            )
        if request.top_logprobs:
            raise APIError(
                "top_logprobs are not returned; logprobs=true gives each sampled token's", param="top_logprobs"
            )
    if isinstance(request, CompletionRequest):
        if isinstance(request.prompt, list) and request.prompt and isinstance(request.prompt[0], (str, list)):
            raise APIError("one prompt per request (a string or a list of token ids)", param="prompt")
        if request.echo:
            raise APIError("echo is not supported", param="echo")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them and the stitching compares them: role (developer -> system), text
    content (content parts joined, null -> ""), tool calls as `{"function": {"name", "arguments": dict}}`, and the
    fields a template reads (`tool_call_id`, `name`). Raises APIError naming the message that is malformed."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise APIError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}", param=f"messages[{i}].role"
            )
        item: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _text(message, i)}
        calls = message.get("tool_calls") or []
        if calls:
            if role != "assistant":
                raise APIError(
                    f"messages[{i}]: only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls"
                )
            item["tool_calls"] = [_tool_call(call, i, j) for j, call in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                item[key] = message[key]
        out.append(item)
    return out


def _text(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _tool_call(call: Any, i: int, j: int) -> dict[str, Any]:
    where = f"messages[{i}].tool_calls[{j}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(f"{where} needs function.name", param=where)
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise APIError(f"{where}.function.arguments is not valid JSON: {e.msg}", param=where) from None
    out: dict[str, Any] = {"function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def canonical(message: dict[str, Any]) -> str:
    """What two normalized messages must share to be the same turn: role, content and tool calls (ids and
    other fields aside: the template does not render them)."""
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    return json.dumps([message["role"], message["content"], calls], sort_keys=True)


_HERMES_CALL = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)
_K2_SECTION = re.compile(re.escape(K2_SECTION_BEGIN) + r".*?" + re.escape(K2_SECTION_END), re.DOTALL)


def visible_content(text: str, tool_call_format: str) -> str:
    """The reply's text without its tool-call markup (the calls travel as `tool_calls`)."""
    pattern = _K2_SECTION if tool_call_format == "kimi_k2" else _HERMES_CALL
    return pattern.sub("", text).strip()


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class Reply:
    """One sampled reply, as the endpoint answers it."""

    text: str
    """Decoded reply, markup kept, end-of-turn token dropped."""
    content: str | None
    tool_calls: list[dict[str, Any]]
    """OpenAI's `{"id", "type": "function", "function": {"name", "arguments": str}}`."""
    finish_reason: FinishReason
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    token_texts: list[str]
    version: int

    def message(self) -> dict[str, Any]:
        """The assistant message, normalized (what the next request must repeat to continue this sequence)."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c["id"],
                    "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])},
                }
                for c in self.tool_calls
            ]
        return out


def chat_response(reply: Reply, model: str, with_logprobs: bool, with_ids: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
    if with_logprobs:
        choice["logprobs"] = {"content": _token_logprobs(reply)}
    return _envelope("chat.completion", "chatcmpl", reply, model, choice, with_ids)


def completion_response(reply: Reply, model: str, logprobs: int | None, with_ids: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {
            "tokens": reply.token_texts,
            "token_logprobs": reply.logprobs,
            "top_logprobs": None,
            "text_offset": None,
        }
    return _envelope("text_completion", "cmpl", reply, model, choice, with_ids)


def _envelope(
    kind: str, prefix: str, reply: Reply, model: str, choice: dict[str, Any], with_ids: bool
) -> dict[str, Any]:
    if with_ids:
        choice["token_ids"] = reply.token_ids
    body: dict[str, Any] = {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"tiderl-policy-v{reply.version}",  # the policy version that sampled the reply
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(reply.prompt_ids),
            "completion_tokens": len(reply.token_ids),
            "total_tokens": len(reply.prompt_ids) + len(reply.token_ids),
        },
    }
    if with_ids:
        body["prompt_token_ids"] = reply.prompt_ids
    return body


def _token_logprobs(reply: Reply) -> list[dict[str, Any]]:
    return [
        {"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
        for text, lp in zip(reply.token_texts, reply.logprobs, strict=True)
    ]


def stream_events(body: dict[str, Any]) -> list[str]:
    """A finished chat reply as server-sent `chat.completion.chunk` events: the role, the content, the tool calls,
    the finish reason, then `[DONE]`. The reply is sampled whole first (the engine's batch step, not a stream), so
    a streaming client gets it in one piece."""
    choice = body["choices"][0]
    message = choice["message"]
    base = {k: body[k] for k in ("id", "created", "model", "system_fingerprint")} | {"object": "chat.completion.chunk"}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if message["content"]:
        deltas.append({"content": message["content"]})
    if message.get("tool_calls"):
        deltas.append({"tool_calls": [{"index": i} | call for i, call in enumerate(message["tool_calls"])]})
    chunks = [base | {"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append(
        base
        | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}], "usage": body["usage"]}
    )
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
