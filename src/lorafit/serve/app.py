"""`lorafit serve`'s HTTP side: OpenAI's completions, chat completions and models endpoints on FastAPI, and vLLM's
runtime adapter loading, in front of one ``Engine``.

Every error is OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for a bad
request; the server stays up. Streaming answers are server-sent events (``data: {...}``), ending with
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AdapterError, ConfigError, DataError
from ..generate import has_chat_template, render, stop_token_ids
from .engine import Engine, Row

MAX_BODY = 1 << 20  # bytes of a request body
MAX_STOP = 4  # stop strings per request, as OpenAI


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)


class LoadRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadRequest(BaseModel):
    lora_name: str = Field(min_length=1)


@dataclass
class Served:
    """What the server serves: the engine, the base model's name, the adapters' names and where they came from."""

    engine: Engine
    tokenizer: Any
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder
    adapter_root: Optional[Path] = None
    api_key: Optional[str] = None
    context: int = 2048  # the model's context length, in tokens
    vocab: int = 0  # token ids a prompt may hold: 0 <= id < vocab (0: the tokenizer's length)
    default_max_tokens: int = 256
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(served: Served) -> FastAPI:
    """The server's FastAPI application in front of ``served.engine``."""
    app = FastAPI(title="lorafit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    _guard_and_errors(app, served)
    _answers(app, served)
    _adapters(app, served)
    return app


def _guard_and_errors(app: FastAPI, served: Served) -> None:
    """The API key and body-size checks, and every error as OpenAI's JSON."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if served.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key: send 'Authorization: Bearer KEY'",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if request.method == "POST" and (length is None or not length.isdigit()):  # a chunked body: size unknown
            return JSONResponse(error_body("send the request body with a Content-Length header",
                                           "invalid_request_error", code="length_required"), status_code=411)
        if length is not None and int(length) > MAX_BODY:
            return JSONResponse(error_body(f"the request body is {int(length):,} bytes; the limit is {MAX_BODY:,}",
                                           "invalid_request_error", code="request_too_large"), status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON", "invalid_request_error"),
                                status_code=400)
        param = ".".join(where) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid')}", "invalid_request_error",
                                       param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)


def _answers(app: FastAPI, served: Served) -> None:
    """/health, /v1/models, /v1/completions and /v1/chat/completions."""
    stops = stop_token_ids(served.engine.model, served.tokenizer)

    @app.get("/health")
    async def health():
        engine = served.engine
        state = {"rows": len(engine.rows), "waiting": len(engine.pending), "steps": engine.steps,
                 "peak_batch": engine.peak, "failed_steps": engine.failures}
        if not engine.thread.is_alive():
            return JSONResponse({"status": "engine stopped", **state}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/v1/models")
    async def models():
        entries = [{"id": served.base_name, "object": "model", "created": served.created, "owned_by": "lorafit",
                    "root": served.base_name, "parent": None}]
        entries += [{"id": name, "object": "model", "created": served.created, "owned_by": "lorafit",
                     "root": folder, "parent": served.base_name} for name, folder in served.adapters.items()]
        return {"object": "list", "data": entries}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = _adapter(served, body.model)
        prompts = _prompts(served, body.prompt)
        return await _answer(served, request, body, adapter, prompts, stops, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        adapter = _adapter(served, body.model)
        if not has_chat_template(served.tokenizer):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions, or start the "
                           "server with --chat-template FILE", param="messages")
        try:  # as `lorafit generate --messages` renders a conversation
            ids = render(served.tokenizer, messages=body.messages)
        except (DataError, ConfigError) as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        return await _answer(served, request, body, adapter, [_check_length(served, list(ids))], stops, chat=True)


def _adapters(app: FastAPI, served: Served) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, inside --adapter-root only."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadRequest):
        if served.adapter_root is None:
            raise ApiError(403, "loading adapters at runtime is off; start the server with --adapter-root DIR",
                           code="adapter_loading_disabled")
        if body.lora_name in served.adapters or body.lora_name == served.base_name:
            raise ApiError(400, f"the name {body.lora_name!r} is already served; unload it first or pick another",
                           param="lora_name")
        folder = inside_root(served.adapter_root, body.lora_path)
        try:
            await asyncio.to_thread(served.engine.call, lambda: served.engine.load_adapter(body.lora_name, folder))
        except TimeoutError:
            raise ApiError(503, "the engine is busy; try again", type_="server_error") from None
        except (AdapterError, ConfigError, DataError, OSError, ValueError) as e:
            raise ApiError(400, f"cannot load {body.lora_path!r}: {e}", param="lora_path") from None
        served.adapters[body.lora_name] = str(folder)
        return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadRequest):
        if served.adapter_root is None:
            raise ApiError(403, "unloading adapters at runtime is off; start the server with --adapter-root DIR",
                           code="adapter_loading_disabled")
        if body.lora_name not in served.adapters:
            raise ApiError(404, f"no adapter named {body.lora_name!r} is served", param="lora_name",
                           code="model_not_found")
        try:
            await asyncio.to_thread(served.engine.call, lambda: served.engine.unload_adapter(body.lora_name))
        except TimeoutError:
            raise ApiError(503, "the engine is busy; try again", type_="server_error") from None
        except ConfigError as e:
            raise ApiError(409, str(e), param="lora_name") from None
        del served.adapters[body.lora_name]
        return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "unloaded"}


def inside_root(root: Path, path: str) -> Path:
    """``path`` (absolute, or relative to ``root``) after resolving '..' and symlinks; it must be a folder inside
    ``root``."""
    real_root = root.resolve()
    try:
        folder = (real_root / path).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a loop of links
        raise ApiError(400, f"lora_path {path!r} is not a usable path ({e})", param="lora_path") from None
    if folder != real_root and real_root not in folder.parents:
        raise ApiError(403, f"{path!r} is outside --adapter-root; load adapters from inside it", param="lora_path",
                       code="path_outside_root")
    if not folder.is_dir():
        raise ApiError(404, f"no adapter folder at {path!r} under --adapter-root", param="lora_path",
                       code="adapter_not_found")
    return folder


def _adapter(served: Served, model: str) -> Optional[str]:
    if model == served.base_name:
        return None
    if model in served.adapters:
        return model
    names = ", ".join([served.base_name, *served.adapters])
    raise ApiError(404, f"the model {model!r} does not exist; this server serves {names}", param="model",
                   code="model_not_found")


def _check_length(served: Served, ids: list[int]) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt has no tokens", param="prompt")
    if len(ids) >= served.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {served.context} tokens",
                       param="prompt", code="context_length_exceeded")
    return ids


def _prompts(served: Served, prompt) -> list[list[int]]:
    """The token ids of each prompt (a string, a list of strings, token ids, or a list of token-id lists)."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items or len(items) > served.engine.max_batch:
        raise ApiError(400, f"prompt: expected 1 to {served.engine.max_batch} prompts, got {len(items)}",
                       param="prompt")
    vocab = served.vocab or len(served.tokenizer)
    for p in items:
        if isinstance(p, list) and any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
    # text as `lorafit generate --raw` tokenizes a prompt (special tokens included)
    return [_check_length(served, list(p) if isinstance(p, list) else render(served.tokenizer, prompt=p, raw=True))
            for p in items]


async def _answer(served: Served, request: Request, body: _Sampling, adapter: Optional[str],
                  prompts: list[list[int]], stops: list[int], *, chat: bool):
    loop = asyncio.get_running_loop()
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop: up to {MAX_STOP} non-empty strings", param="stop")
    want = body.max_completion_tokens or body.max_tokens
    queues: list[asyncio.Queue] = []
    rows: list[Row] = []
    for ids in prompts:
        room = served.context - len(ids)
        queue: asyncio.Queue = asyncio.Queue()
        row = Row(prompt=ids, adapter=adapter, max_tokens=min(want or served.default_max_tokens, room),
                  temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop_ids=frozenset(stops),
                  stop=stop, emit=_to_queue(loop, queue))
        queues.append(queue)
        rows.append(row)
    for row in rows:
        served.engine.submit(row)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    usage_of = lambda: {"prompt_tokens": sum(len(p) for p in prompts),  # noqa: E731
                        "completion_tokens": sum(len(r.tokens) for r in rows),
                        "total_tokens": sum(len(p) for p in prompts) + sum(len(r.tokens) for r in rows)}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(rows, queues, ident, created, body.model, chat, include_usage, usage_of),
                                 media_type="text/event-stream")
    texts, finishes = [], []
    try:
        for queue in queues:
            text, finish = await _collect(queue, request)
            texts.append(text)
            finishes.append(finish)
    finally:
        for row in rows:
            row.cancelled.set()  # a client gone: the engine frees its rows at the next step
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
                   for i, (t, f) in enumerate(zip(texts, finishes))]
    else:
        choices = [{"index": i, "text": (served.tokenizer.decode(prompts[i]) if getattr(body, "echo", False) else "")
                    + t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(zip(texts, finishes))]
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": choices, "usage": usage_of()}


def _to_queue(loop, queue: asyncio.Queue):
    """A row's ``emit``, called on the engine's thread: hands (text, finish) to the request's queue (nothing once
    the server's loop has closed, at shutdown)."""
    def emit(text: str, finish) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (text, finish))
        except RuntimeError:
            pass
    return emit


async def _collect(queue: asyncio.Queue, request: Request) -> tuple[str, str]:
    parts = []
    while True:
        try:
            text, finish = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None
            continue
        if finish == "error":
            raise ApiError(500, f"the model failed on this request: {text}", type_="server_error")
        parts.append(text)
        if finish is not None:
            return "".join(parts), _openai_finish(finish)


def _openai_finish(finish: str) -> str:
    return finish if finish in ("stop", "length") else "stop"


async def _stream(rows, queues, ident, created, model, chat, include_usage, usage_of):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: Optional[str], finish: Optional[str], first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        body = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for i, queue in enumerate(queues):
            if chat:
                yield chunk(i, None, None, first=True)
            while True:
                text, finish = await queue.get()
                if finish == "error":  # OpenAI's streams carry an error as an event of its own
                    error = error_body(f"the model failed on this request: {text}", "server_error")
                    yield f"data: {json.dumps(error)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if text:
                    yield chunk(i, text, None)
                if finish is not None:
                    yield chunk(i, None, _openai_finish(finish))
                    break
        if include_usage:
            yield f"data: {json.dumps({'id': ident, 'object': obj, 'created': created, 'model': model, 'choices': [], 'usage': usage_of()})}\n\n"  # noqa: E501
        yield "data: [DONE]\n\n"
    finally:  # the client went away (Starlette cancels this generator) or the answer ended
        for row in rows:
            row.cancelled.set()


def api_key_from(flag: Optional[str]) -> Optional[str]:
    return flag or os.environ.get("LORAFIT_API_KEY") or None
