"""The OpenAI-compatible endpoint of a rollout worker: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, served
by the worker's own engine (continuous batching, INT4 where configured).

One thread per worker runs an asyncio loop with the HTTP server (starlette + uvicorn), the engine pump and the
agents (`rollouts.agents`). Generation happens in *phases*: a phase opens a batch of the engine (`Engine.batcher`)
with one sampling setup and policy version, the one a training step or an evaluation asks for, and names the
episodes it serves by their client key (the API key, or the `X-Episode-Id` header); a request with another key is
refused, so no request is ever attributed by guessing. Every request is stitched into its episode's training
sequences (`rollouts.stitching`): the exact prompt token ids, the sampled ids, their logprobs and the policy version.
`tiderl serve` opens one phase that never closes and takes any key (each its own conversation log, for the cache).

The pump steps the batch between HTTP events, as the in-process agent loop does: a step is a few milliseconds of
compute on the loop's thread, and requests that arrive meanwhile join the running batch at the next step. Requests
beyond `rollout.endpoint.max_concurrent_requests` wait their turn; a request that takes longer than
`request_timeout_s` gets a timeout error; a malformed one gets OpenAI's error body; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rollouts.agent_loop import _mix_seed
from rollouts.config import EndpointConfig, RolloutConfig
from rollouts.engine import Batcher, Engine, Generation, Request, WaveBatcher
from rollouts.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    chat_response,
    completion_response,
    normalize_messages,
    parse,
    stream_events,
    visible_content,
)
from rollouts.sampling import SamplingParams
from rollouts.stitching import EpisodeLog, Turn
from rollouts.tool_parsers import TOOL_CALL_PARSERS

log = logging.getLogger("tiderl")
T = TypeVar("T")
SERVE_LOGS = 256
"""Conversation logs `tiderl serve` keeps (one per client key, the least recently used dropped)."""


@dataclass
class Phase:
    """An open batch of the engine and the episodes it serves."""

    batcher: Batcher | WaveBatcher
    version: int
    base_seed: int
    episodes: dict[str, EpisodeLog] | None
    """Client key -> its episode's log; None: any key is served (`tiderl serve`), each with a log of its own."""
    honour_seed: bool = False
    """Whether a request's `seed` picks its sampling stream (serving); in training each episode has its own."""
    pending: set[asyncio.Future] = field(default_factory=set)
    error: str | None = None
    """Set when the engine failed on this batch: later requests are refused with it."""


class Endpoint:
    """See the module docstring. `start()` binds the port and starts the thread; `call(fn)` runs a coroutine
    function on the endpoint's loop from any other thread and returns its result."""

    def __init__(
        self, engine: Engine, renderer: Any, rollout: RolloutConfig, model_name: str, max_turns: int | None = None
    ) -> None:
        self.engine, self.renderer, self.rollout = engine, renderer, rollout
        self.cfg: EndpointConfig = rollout.endpoint
        self.model_name = model_name
        self.max_turns = max_turns
        self.parse_tool_calls = TOOL_CALL_PARSERS[rollout.tool_call_format]
        self.phase: Phase | None = None
        self.serve_logs: OrderedDict[str, EpisodeLog] = OrderedDict()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.thread: threading.Thread | None = None
        self._server: Any = None
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self.served = {"requests": 0, "errors": 0, "timeouts": 0}

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/v1"

    def start(self) -> str:
        """Bind the port (a free one when `port` is 0) and start serving in a daemon thread; returns the base URL."""
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as e:
            raise OSError(f"rollout.endpoint: cannot listen on {self.cfg.host}:{self.cfg.port}: {e}") from e
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off", timeout_keep_alive=60)
        self._server = uvicorn.Server(config)
        ready = threading.Event()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent_requests)
            pump = asyncio.create_task(self._pump())

            async def announce() -> None:  # the port accepts connections once the server has started
                while not self._server.started:
                    await asyncio.sleep(0.005)
                ready.set()

            watcher = asyncio.create_task(announce())
            try:
                await self._server.serve(sockets=[sock])
            finally:
                pump.cancel()
                watcher.cancel()
                ready.set()  # a server that failed to start must not leave start() waiting

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), name="tiderl-endpoint", daemon=True)
        self.thread.start()
        if not ready.wait(timeout=120) or not self._server.started:
            raise RuntimeError(f"rollout.endpoint: the server on {self.cfg.host}:{self.port} did not start")
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """`await fn()` on the endpoint's loop; blocks the calling thread until it is done."""
        assert self.loop is not None, "start() the endpoint first"
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result()

    # phases (called on the endpoint's loop)

    def open_phase(
        self,
        sampling: SamplingParams,
        version: int,
        base_seed: int,
        episodes: dict[str, EpisodeLog] | None,
        slots: int | None = None,
    ) -> Phase:
        if self.phase is not None:
            raise RuntimeError("a generation phase is already open on this endpoint")
        slots = min(slots or self.cfg.max_concurrent_requests, self.cfg.max_concurrent_requests)
        batcher = self.engine.batcher(sampling, slots, self.rollout.max_tokens_per_sample)
        self.phase = Phase(batcher, version, base_seed, episodes, honour_seed=episodes is None)
        return self.phase

    def close_phase(self, phase: Phase) -> None:
        """End `phase`: requests still waiting on it get an error (their agents are done or gone)."""
        for fut in phase.pending:
            if not fut.done():
                fut.set_exception(APIError("the generation phase ended", 503, "server_error", code="phase_closed"))
        if self.phase is phase:
            self.phase = None

    async def _pump(self) -> None:
        """Step the open batch while it has work; sleep until a request arrives otherwise. An engine failure fails
        the phase's requests (their agents' samples), never the loop."""
        assert self._wake is not None
        while True:
            phase = self.phase
            if phase is not None and phase.error is None and phase.batcher.busy:
                try:
                    phase.batcher.step()
                except Exception as e:  # the engine broke on this batch: its requests get the error
                    log.exception("rollout engine failed in the endpoint's batch")
                    phase.error = f"the rollout engine failed: {type(e).__name__}: {e}"
                    for fut in phase.pending:
                        if not fut.done():
                            fut.set_exception(APIError(phase.error, 500, "server_error"))
                await asyncio.sleep(0)  # let the server read requests and agents run between two decode steps
            else:
                self._wake.clear()
                await self._wake.wait()

    # HTTP

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
            ],
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    async def _models(self, request: HTTPRequest) -> Response:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "tiderl"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"phase_open": self.phase is not None} | self.served)

    async def _chat(self, request: HTTPRequest) -> Response:
        return await self._serve(request, self._chat_reply)

    async def _completions(self, request: HTTPRequest) -> Response:
        return await self._serve(request, self._completion_reply)

    async def _serve(
        self, request: HTTPRequest, handler: Callable[[HTTPRequest, bytes], Awaitable[dict[str, Any] | list[str]]]
    ) -> Response:
        """Run a handler; any refusal becomes OpenAI's error body, anything unexpected a 500 with its message."""
        self.served["requests"] += 1
        try:
            body = await asyncio.wait_for(handler(request, await request.body()), self.cfg.request_timeout_s)
        except APIError as e:
            self.served["errors"] += 1
            return JSONResponse(e.body(), status_code=e.status)
        except TimeoutError:
            self.served["timeouts"] += 1
            e = APIError(
                f"the request took longer than rollout.endpoint.request_timeout_s={self.cfg.request_timeout_s}",
                504,
                "timeout",
                code="request_timeout",
            )
            return JSONResponse(e.body(), status_code=504)
        except Exception as e:  # a bug of ours on one request must not take the worker's endpoint down
            self.served["errors"] += 1
            log.exception("endpoint request failed")
            body = APIError(f"{type(e).__name__}: {e}", 500, "server_error").body()
            return JSONResponse(body, status_code=500)
        if isinstance(body, list):
            return StreamingResponse(iter(body), media_type="text/event-stream")
        return JSONResponse(body)

    def _episode(self, request: HTTPRequest) -> tuple[Phase, str, EpisodeLog]:
        """The open phase, the client's key and its episode's log; a key the phase does not serve is refused."""
        phase = self.phase
        if phase is None:
            raise APIError("no generation is open on this worker right now", 503, "server_error", code="no_phase")
        key = request.headers.get("x-episode-id") or _bearer(request.headers.get("authorization", ""))
        if phase.episodes is not None:
            episode = phase.episodes.get(key)
            if episode is None:
                raise APIError(
                    "unknown episode key: each agent's client carries the key of its own episode (api_key or the "
                    "X-Episode-Id header)",
                    401,
                    "invalid_request_error",
                    code="invalid_api_key",
                )
            return phase, key, episode
        episode = self.serve_logs.get(key) or EpisodeLog(self.renderer, keep_all=False)
        self.serve_logs[key] = episode
        self.serve_logs.move_to_end(key)
        if len(self.serve_logs) > SERVE_LOGS:
            self.serve_logs.popitem(last=False)
        return phase, key, episode

    async def _chat_reply(self, request: HTTPRequest, raw: bytes) -> dict[str, Any] | list[str]:
        body: ChatRequest = parse(ChatRequest, raw)
        phase, key, episode = self._episode(request)
        messages = normalize_messages(body.messages)
        turn = episode.chat_turn(messages, body.tools if body.tool_choice != "none" else None)
        budget = body.max_completion_tokens or body.max_tokens
        reply = await self._generate(phase, key, episode, turn, budget, body.seed, texts=body.logprobs)
        response = chat_response(reply, body.model or self.model_name, body.logprobs, body.return_token_ids)
        return stream_events(response) if body.stream else response

    async def _completion_reply(self, request: HTTPRequest, raw: bytes) -> dict[str, Any] | list[str]:
        body: CompletionRequest = parse(CompletionRequest, raw)
        if body.stream:
            raise APIError("stream is supported on /v1/chat/completions only", param="stream")
        phase, key, episode = self._episode(request)
        turn = episode.text_turn(body.prompt)  # type: ignore[arg-type]  # lists of prompts are refused by parse
        reply = await self._generate(
            phase, key, episode, turn, body.max_tokens or 16, body.seed, chat=False, texts=body.logprobs is not None
        )
        return completion_response(reply, body.model or self.model_name, body.logprobs, body.return_token_ids)

    async def _generate(
        self,
        phase: Phase,
        key: str,
        episode: EpisodeLog,
        turn: Turn,
        max_tokens: int | None,
        seed: int | None,
        chat: bool = True,
        texts: bool = False,
    ) -> Reply:
        """Sample one reply for `turn` within the episode's limits, and record it (`texts`: decode each token, for
        logprobs in the response)."""
        try:
            if self.max_turns is not None and episode.requests >= self.max_turns:
                episode.refuse("max_turns")
                raise APIError(
                    f"this episode made its env.max_turns={self.max_turns} requests", code="max_turns_exceeded"
                )
            limits = {
                "max_new_tokens_per_turn": min(
                    max_tokens or self.rollout.max_new_tokens_per_turn, self.rollout.max_new_tokens_per_turn
                ),
                "max_tokens_per_sample": self.rollout.max_tokens_per_sample - len(turn.prompt),
            }
            limiter = min(limits, key=limits.__getitem__)
            if limits[limiter] < 1:
                episode.refuse("max_tokens_per_sample")
                raise APIError(
                    f"the prompt ({len(turn.prompt)} tokens) leaves no room under rollout.max_tokens_per_sample="
                    f"{self.rollout.max_tokens_per_sample}",
                    param="messages",
                    code="context_length_exceeded",
                )
            if not phase.honour_seed or seed is None:
                seed = _mix_seed(phase.base_seed, zlib.crc32(key.encode()), episode.submitted)
            episode.submitted += 1
            assert self._slots is not None and self._wake is not None
            async with self._slots:
                generation = await self._submit(
                    phase, Request(turn.prompt, limits[limiter], seed, [], (key, turn.sequence.index))
                )
        except BaseException:
            episode.release(turn)
            raise
        reply = self._reply(turn.prompt, generation, phase.version, chat, texts)
        cut = (
            None if generation.stop_reason == "stop" else ("repeat" if generation.stop_reason == "repeat" else limiter)
        )
        episode.record(turn, reply, cut)
        return reply

    async def _submit(self, phase: Phase, request: Request) -> Generation:
        if phase.error is not None:
            raise APIError(phase.error, 500, "server_error")
        fut: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        phase.pending.add(fut)
        try:
            phase.batcher.submit(request, lambda g: fut.done() or fut.set_result(g))
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        assert self._wake is not None
        self._wake.set()
        try:
            return await fut
        finally:
            phase.pending.discard(fut)

    def _reply(self, prompt: list[int], generation: Generation, version: int, chat: bool, texts: bool) -> Reply:
        ids = generation.token_ids
        text = self.renderer.decode(ids)
        tokenizer = self.renderer.tokenizer
        token_texts = [tokenizer.decode([t], skip_special_tokens=False) for t in ids] if texts else []
        content: str | None = text
        tool_calls: list[dict[str, Any]] = []
        finish = "stop" if generation.stop_reason == "stop" else "length"
        if chat and finish == "stop":
            calls, errors = self.parse_tool_calls(text)
            if calls and not errors:  # a malformed call leaves the raw text for the agent to read
                content = visible_content(text, self.rollout.tool_call_format) or None
                tool_calls = [
                    {
                        "id": f"call_{uuid.uuid4().hex[:16]}",
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    }
                    for i, c in enumerate(calls)
                ]
                finish = "tool_calls"
        return Reply(text, content, tool_calls, finish, list(prompt), ids, generation.logprobs, token_texts, version)  # type: ignore[arg-type]


def _bearer(header: str) -> str:
    return header[7:].strip() if header.lower().startswith("bearer ") else header.strip()


async def _not_found(request: HTTPRequest, exc: Exception) -> Response:
    body = APIError(
        f"no route {request.url.path}: this endpoint serves /v1/chat/completions, /v1/completions and /v1/models",
        404,
        code="not_found",
    ).body()
    return JSONResponse(body, status_code=404)


async def _not_allowed(request: HTTPRequest, exc: Exception) -> Response:
    body = APIError(f"{request.method} is not allowed on {request.url.path}", 405, code="method_not_allowed").body()
    return JSONResponse(body, status_code=405)
