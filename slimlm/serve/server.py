"""`slimlm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one `Backend`.

Routes: POST /v1/chat/completions, POST /v1/completions (`stream: true` as server-sent events, `data: [DONE]` last,
usage in the last chunk with `stream_options.include_usage`), GET /v1/models, GET /health. Sampling fields are
OpenAI's (`temperature`, `top_p`, `max_tokens`, `stop`, `seed`) plus llama-server's `top_k` and `min_p`, with
llama.cpp's defaults; each answer carries llama-server's `timings` (prompt and decode ms, tok/s, draft counts).

One worker thread owns the model and runs one request at a time, in arrival order: concurrent requests queue and
their outputs never mix (a 135M model on 2 cores gains nothing from batching; a full queue answers 503). A client
that disconnects mid-stream stops its generation at the next token. Bad requests (malformed JSON, unknown fields,
negative `max_tokens`, `n > 1`, a prompt longer than the context) are answered 4xx with OpenAI's error body, and
the server keeps serving. GGUF files run in llama.cpp through llama-cpp-python's bindings inside this server (not
its own server), so both engines answer the same API.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimlm.errors import SlimlmError
from slimlm.serve.backends import Backend, Generation, generate
from slimlm.serve.sampling import SamplingSettings
from slimlm.serve.settings import DEFAULT_HOST, DEFAULT_PORT, MAX_QUEUE

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat answers run to the end of the turn


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def settings(self, default_max_tokens: int) -> SamplingSettings:
        if self.n != 1:
            raise RequestError(f"n={self.n}: this server generates one choice per request", "n")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported (only 0)", "presence_penalty")
        defaults = SamplingSettings()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty", "stop")
        return SamplingSettings(
            temp=defaults.temp if self.temperature is None else self.temperature,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            min_p=defaults.min_p if self.min_p is None else self.min_p,
            max_tokens=self.max_tokens or default_max_tokens,
            seed=-1 if self.seed is None else self.seed,
            stop=stop,
        )


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class RequestError(Exception):
    """A request the server cannot answer as asked: 400 with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class Job:
    """One request in the worker's queue; events come back on `events` (from the worker thread, thread-safely)."""

    prompt: object  # a list of messages (chat) or a text (completion)
    settings: SamplingSettings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """The one thread that touches the model: jobs run one at a time, in arrival order."""

    def __init__(self, backend: Backend, max_queue: int = MAX_QUEUE):
        self.backend = backend
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="slimlm-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy ({self.jobs.maxsize} requests waiting)", status=503) from None

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                prompt_ids = (
                    self.backend.render_chat(job.prompt)
                    if isinstance(job.prompt, list)
                    else self.backend.encode(job.prompt)
                )
                answer = generate(self.backend, prompt_ids, job.settings)
            except SlimlmError as err:
                job.send("error", err)
                continue
            job.send("started", answer)
            try:
                for piece in answer:
                    if job.cancelled.is_set():
                        break
                    job.send("piece", piece)
            except Exception as err:  # a failure inside the engine: this request fails, the server goes on
                job.send("error", err)
                continue
            job.send("done", answer)


def _timings(answer: Generation) -> dict:
    """llama-server's `timings` object: what the answer cost."""
    decode_ms = answer.decode_s * 1000
    out = {
        "prompt_n": answer.prompt_tokens,
        "prompt_ms": None if answer.ttft_s is None else answer.ttft_s * 1000,
        "predicted_n": answer.completion_tokens,
        "predicted_ms": decode_ms,
        "predicted_per_second": answer.decode_tokens_per_s,
    }
    if answer.speculative:
        out.update(draft_n=answer.speculative["drafted"], draft_n_accepted=answer.speculative["accepted"])
    return out


def create_app(backend: Backend, model_id: str, api_key: str | None = None, max_queue: int = MAX_QUEUE):
    """The FastAPI application serving `backend` as `model_id`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    worker: Worker | None = None

    @asynccontextmanager
    async def lifespan(app):
        nonlocal worker
        worker = Worker(backend, max_queue)
        yield
        worker.stop()

    app = FastAPI(title="slimlm", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = []
        for item in err.errors():
            if item.get("type") == "json_invalid":
                reason = item.get("ctx", {}).get("error", "")
                message = f"the request body is not valid JSON ({reason} at character {item['loc'][-1]})"
                return JSONResponse(error_body(message), status_code=400)
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        first = err.errors()[0].get("loc", ()) if err.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return JSONResponse(error_body("; ".join(problems), param=param), status_code=400)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        kind = "server_busy" if err.status == 503 else "invalid_request_error"
        return JSONResponse(error_body(err.message, kind, err.param), status_code=err.status)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if (
            api_key
            and request.url.path.startswith("/v1/")
            and request.headers.get("authorization") != f"Bearer {api_key}"
        ):
            return JSONResponse(
                error_body("missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"),
                status_code=401,
            )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        meta = {
            "engine": backend.engine,
            "context_length": backend.context_length,
            "chat_template": bool(backend.chat_template),
        }
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "slimlm", "meta": meta}],
        }

    async def start(prompt: object, settings: SamplingSettings) -> tuple[Job, Generation]:
        job = Job(prompt, settings, asyncio.get_running_loop())
        worker.submit(job)
        try:
            kind, value = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if kind == "error":
            raise RequestError(
                getattr(value, "problem", str(value)), "messages" if isinstance(prompt, list) else "prompt"
            )
        return job, value

    async def pieces(job: Job) -> AsyncIterator[tuple[str, object]]:
        try:
            while True:
                kind, value = await job.events.get()
                yield kind, value
                if kind in ("done", "error"):
                    return
        finally:
            job.cancelled.set()  # the client went away (or the answer ended): stop generating

    def stream(job: Job, answer: Generation, chunk, usage: bool) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            first = chunk(None, None, True)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            async for kind, value in pieces(job):
                if kind == "piece":
                    yield f"data: {json.dumps(chunk(value, None, False))}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps(error_body(str(value), 'server_error'))}\n\n"
                    break
                else:
                    yield f"data: {json.dumps(chunk(None, answer.finish_reason, False) | {'timings': _timings(answer)})}\n\n"
                    if usage:
                        yield f"data: {json.dumps(chunk(None, None, False) | {'choices': [], 'usage': answer.usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def collect(job: Job) -> Generation:
        answer = None
        async for kind, value in pieces(job):
            if kind == "error":
                raise RequestError(f"generation failed: {value}", status=500)
            if kind == "done":
                answer = value
        return answer

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        settings = body.settings(body.max_completion_tokens or -1)
        if not backend.chat_template:
            raise RequestError(f"{model_id} has no chat template: it is a plain-completion model", "messages")
        job, answer = await start([m.plain() for m in body.messages], settings)
        ident, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": ident, "created": now, "model": model_id}
        if body.stream:

            def chunk(text, finish, opening):
                delta = {"role": "assistant", "content": ""} if opening else ({} if text is None else {"content": text})
                return base | {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

            return stream(job, answer, chunk, bool(body.stream_options and body.stream_options.include_usage))
        answer = await collect(job)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer.text},
            "finish_reason": answer.finish_reason,
        }
        return base | {
            "object": "chat.completion",
            "choices": [choice],
            "usage": answer.usage(),
            "timings": _timings(answer),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        settings = body.settings(COMPLETIONS_MAX_TOKENS)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError(f"{len(prompts)} prompts in one request: this server answers one per request", "prompt")
        job, answer = await start(prompts[0], settings)
        ident, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": ident, "created": now, "model": model_id, "object": "text_completion"}
        if body.stream:

            def chunk(text, finish, opening):
                if opening:
                    return None
                return base | {"choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

            return stream(job, answer, chunk, bool(body.stream_options and body.stream_options.include_usage))
        answer = await collect(job)
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        return base | {"choices": [choice], "usage": answer.usage(), "timings": _timings(answer)}

    return app


def port_holder(host: str, port: int) -> str | None:
    """Who listens on `port` (pid and command), read from the OS; None if the port is free to bind."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
            return None
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise SlimlmError(
                    f"cannot listen on {host}:{port} ({err.strerror})", "pass another --host or --port"
                ) from None
    import psutil

    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return "a process of another user (its pid is not visible to you)"
                process = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(process.cmdline())[:120] or process.name()})"
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return "another process (not visible to you)"


def serve(
    backend: Backend, model_id: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None
) -> None:
    """Run the server until Ctrl-C; refuses a port another process holds, naming it."""
    import uvicorn

    holder = port_holder(host, port)
    if holder is not None:
        raise SlimlmError(
            f"port {port} on {host} is already in use by {holder}",
            f"stop that process or pass another --port (e.g. --port {port + 1})",
        )
    uvicorn.run(create_app(backend, model_id, api_key), host=host, port=port, log_level="warning")
