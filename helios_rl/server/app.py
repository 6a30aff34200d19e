"""The FastAPI app: OpenAI-compatible completions and chat (streaming by SSE), health, metrics, admin.

Handlers never touch the engine: they validate, reserve a place (429 with ``Retry-After`` when the
bounded queue is full), hand a :class:`Submission` to the engine thread and await its events on an
asyncio queue. Every error is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``
whose ``param`` names the request field at fault; validation errors are 400, as OpenAI answers.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from helios_rl.engine import SamplingParams, ServingConfig
from helios_rl.server.engine_loop import Final, StreamEvent, Submission
from helios_rl.server.runtime import ServerRuntime
from helios_rl.server.schemas import (AdminState, AssistantMessage, ChatChoice, ChatCompletionRequest,
                                      ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse,
                                      ConfigOverride, ErrorResponse, Health, HeliosInfo, ModelCard, ModelList, Usage)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable"}
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 429, 503)}
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
#: temperature or top_p below this samples as greedy: both limits are argmax, and the engine's float32
#: softmax overflows (temperature) or cuts every token (top_p below float32's smallest number) there.
GREEDY_BELOW = 1e-4
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|[A-Z]\w*)$")


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if not errs:
        return error(400, "invalid request")
    e = errs[0]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return error(400, f"malformed JSON body: {detail}", None, "invalid_json")
    parts = [str(p) for p in e.get("loc", ()) if p != "body" and not (isinstance(p, str) and _TYPE_TAG.match(p))]
    param = ".".join(parts) or None
    if param is None and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return error(400, "the request body must be a JSON object", None, "invalid_body")
    return error(400, f"{param or 'body'}: {e.get('msg', 'invalid value')}", param, e.get("type"))


class _CountRequests:
    """ASGI middleware: ``helios_requests_total{endpoint, status}`` for every /v1 response (streams too),
    and a bound on concurrent /v1 connections (``max_connections``): beyond it a request gets 503 with
    ``Retry-After`` at once, before any work, so a flood of open streams cannot exhaust the server."""

    def __init__(self, app: Any, rt: ServerRuntime) -> None:
        self.app, self.rt = app, rt
        self.open = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        limit = self.rt.settings.max_connections
        if limit and self.open >= limit:
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.rt.metrics.requests.labels(endpoint, "503").inc()
            self.rt.metrics.connections_refused.inc()
            resp = error(503, f"too many open connections ({self.open}, limit {limit}); retry shortly", None,
                         "too_many_connections", headers={"Retry-After": "1"})
            await resp(scope, receive, send)
            return
        self.open += 1
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.open -= 1
            endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.rt.metrics.requests.labels(endpoint, str(status["code"])).inc()


def _set_schema(prop: dict | None, **values: Any) -> None:
    """Put ``values`` on the non-null branch of an OpenAPI property (``anyOf`` or plain)."""
    if not prop:
        return
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") not in (None, "null"):
            branch.update(values)


def create_app(rt: ServerRuntime) -> FastAPI:
    """The HTTP app over ``rt``; its lifespan starts the engine loop if needed and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = not rt.loop.alive
        if started:
            rt.start()
        yield
        if started:
            await asyncio.get_running_loop().run_in_executor(None, rt.stop)

    app = FastAPI(title="helios-rl server", version="1", lifespan=lifespan,
                  description="OpenAI-compatible early-exit LLM serving under a learned or heuristic controller.")
    app.state.runtime = rt
    app.add_middleware(_CountRequests, rt=rt)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")

    def admin_auth(request: Request) -> None:
        token = rt.settings.admin_token
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <admin token>'")

    # ------------------------------------------------------------------ OpenAI API
    if rt.faults is not None:  # tests and benchmarks only (ServerSettings.fault_injection)
        @app.post("/admin/faults", dependencies=[Depends(admin_auth)])
        async def arm_fault(spec: dict) -> Any:
            fut = rt.loop.call(lambda engine: rt.faults.arm(engine, spec))
            try:
                return await asyncio.wrap_future(fut)
            except ValueError as exc:
                return error(400, str(exc), "fault", "invalid_value")

        @app.get("/admin/faults", dependencies=[Depends(admin_auth)])
        async def fired_faults() -> Any:
            return {"fired": list(rt.faults.fired)}

    @app.post("/v1/requests/{request_id}/cancel", responses=ERRORS)
    async def cancel(request_id: str) -> Any:
        """Cancel an accepted request (its id is the response ``id`` / the stream's ``X-Request-Id``)."""
        fut = rt.loop.cancel(request_id)
        ok = await asyncio.wrap_future(fut)
        if not ok:
            return error(404, f"no request {request_id!r} is in progress", "request_id", "not_found")
        return {"id": request_id, "cancelled": True}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        now = int(time.time())
        return ModelList(data=[ModelCard(id=m, created=now) for m in rt.served_ids])

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest) -> Any:
        prompt: str | list[int] = body.prompt  # type: ignore[assignment]
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                return error(400, "prompt: one prompt per request (got a list of several)", "prompt")
            prompt = body.prompt[0]
        if body.echo:
            return error(400, "echo: not supported", "echo")
        if not prompt:
            return error(400, "prompt: must not be empty", "prompt")
        return await _generate(body, prompt, None, body.max_tokens or rt.settings.completion_default_max_tokens)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat(body: ChatCompletionRequest) -> Any:
        if body.logprobs:
            return error(400, "logprobs: not supported", "logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await _generate(body, None, messages,
                               body.max_tokens or body.max_completion_tokens or rt.settings.default_max_tokens)

    async def _generate(body: Any, prompt: str | list[int] | None, messages: list[dict] | None,
                        max_tokens: int) -> Any:
        chat_mode = messages is not None
        if body.model not in rt.served_ids:
            return error(404, f"model: the model {body.model!r} does not exist; served: {rt.served_ids}", "model",
                         "model_not_found")
        if max_tokens > rt.max_model_len:
            name = "max_completion_tokens" if chat_mode and body.max_completion_tokens and not body.max_tokens \
                else "max_tokens"
            return error(400, f"{name}: {max_tokens} is more than this server's context of {rt.max_model_len} "
                              f"tokens (max_model_len)", name, "context_length_exceeded")
        size = sum(len(m["content"]) for m in messages) if chat_mode else len(prompt)
        if size > rt.settings.max_prompt_chars:
            name = "messages" if chat_mode else "prompt"
            return error(400, f"{name}: {size} characters is more than {rt.settings.max_prompt_chars}", name)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or not all(stop):
            return error(400, "stop: up to 4 non-empty strings", "stop")
        if not rt.loop.alive:
            return error(503, "the engine is not running", None, "engine_unavailable")
        temperature = rt.settings.default_temperature if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:
            temperature, top_p = 0.0, 1.0  # the limit is argmax; the engine's float32 sampling breaks down there
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed,
                                stop=stop, ignore_eos=body.ignore_eos)
        ok, retry = rt.loop.try_admit()
        if not ok:
            return error(429, f"the server is at capacity ({rt.loop.outstanding} requests outstanding); retry after "
                              f"{retry} s", None, "rate_limit_exceeded", headers={"Retry-After": str(retry)})
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        rid = f"{'chatcmpl' if chat_mode else 'cmpl'}-{uuid.uuid4().hex}"
        rt.loop.submit(Submission(rid, params, lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev),
                                  prompt, messages, body.stream))
        try:
            first = await events.get()
        except asyncio.CancelledError:
            rt.loop.abort(rid)
            raise
        if first.kind == "rejected":
            code = "context_length_exceeded" if "context holds" in (first.error or "") else "invalid_value"
            return error(400, first.error or "rejected", first.param, code)
        if first.kind == "failed":
            return _failed(first)
        if first.kind == "unavailable":  # the engine cannot serve right now (it says why, and retries)
            return error(503, first.error or "engine unavailable", None, "engine_unavailable",
                         headers={"Retry-After": "5"})
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(events, rid, created, body.model, chat_mode, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        try:
            while True:
                ev = await events.get()
                if ev.kind == "final":
                    break
                if ev.kind == "failed":
                    return _failed(ev)
        except asyncio.CancelledError:
            rt.loop.abort(rid)
            raise
        return _response(ev.final, rid, created, body.model, chat_mode)

    async def _sse(events: asyncio.Queue, rid: str, created: int, model: str, chat_mode: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat_mode else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat_mode:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        done = False
        try:
            if chat_mode:
                yield chunk(None, None, role=True)
            while True:
                ev = await events.get()
                if ev.kind == "delta":
                    yield chunk(ev.text, None)
                elif ev.kind == "final":
                    done = True
                    yield chunk(None, ev.final.finish_reason)
                    if include_usage:
                        usage = _usage(ev.final).model_dump()
                        yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                elif ev.kind == "failed":
                    done = True
                    yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    return
        finally:
            if not done:  # the client went away: stop generating for it
                rt.loop.abort(rid)

    def _failed(ev: StreamEvent) -> JSONResponse:
        shutting = "shutting down" in (ev.error or "")
        return error(503 if shutting else 500, ev.error or "failed", None, "engine_error")

    # ------------------------------------------------------------------ operations
    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Any:
        st = rt.loop.state
        alive = rt.loop.alive and st.alive and st.unavailable is None
        reason = None if alive else (st.unavailable or "the engine thread is not running")
        body = Health(status="ok" if alive else "unavailable", model=st.model, depth=st.depth, engine_alive=alive,
                      outstanding=rt.loop.outstanding, reason=reason)
        return body if alive else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/config", response_model=AdminState, dependencies=[Depends(admin_auth)])
    async def get_config() -> AdminState:
        return _state()

    @app.post("/admin/config", response_model=AdminState, responses=ERRORS, dependencies=[Depends(admin_auth)])
    async def set_config(body: ConfigOverride) -> Any:
        thr = body.threshold
        if isinstance(thr, dict):
            if not all(k.isdigit() for k in thr):
                return error(400, "threshold: keys must be layer numbers", "threshold")
            thr = {int(k): v for k, v in thr.items()}
        if isinstance(thr, dict) or isinstance(thr, float):
            values = thr.values() if isinstance(thr, dict) else [thr]
            if not all(0.0 <= v <= 1.0 for v in values):
                return error(400, "threshold: must be in [0, 1]", "threshold")
        cfg = ServingConfig(model=body.model, depth=body.depth, max_batch=body.max_batch, threshold=thr,
                            exit_layers=None if body.exit_layers is None else tuple(body.exit_layers),
                            measure=body.measure, target=body.target)
        problem = rt.control.check(cfg) if any(v is not None for v in vars(cfg).values()) else None
        if problem is not None:
            rt.metrics.overrides.labels("rejected").inc()
            return error(400, problem, problem.split(":", 1)[0])
        try:
            await asyncio.wrap_future(rt.loop.override(cfg, body.pin))
        except ValueError as exc:
            rt.metrics.overrides.labels("rejected").inc()
            return error(400, str(exc), _config_param(str(exc)))
        except RuntimeError as exc:
            return error(503, str(exc), None, "engine_unavailable")
        rt.metrics.overrides.labels("applied").inc()
        return _state()

    @app.get("/admin/controller", dependencies=[Depends(admin_auth)])
    async def controller() -> dict:
        """Decision-time percentiles, fallback counts, the last decision, and the state in force."""
        return {**rt.control.stats(), "state": _state().model_dump(), "outstanding": rt.loop.outstanding}

    def _state() -> AdminState:
        st = rt.loop.state
        primary, fallback, shadow = rt.control.names
        return AdminState(config=st.config, effective_max_batch=st.max_batch, pinned=st.pinned, controller=primary,
                          fallback=fallback, shadow=shadow, models=rt.models, num_layers=rt.num_layers)

    def _openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                props = comps.get(name, {}).get("properties", {})
                _set_schema(props.get("model"), enum=rt.served_ids)
                for key in ("max_tokens", "max_completion_tokens"):
                    _set_schema(props.get(key), maximum=rt.max_model_len)
            props = comps.get("ConfigOverride", {}).get("properties", {})
            _set_schema(props.get("model"), enum=rt.models)
            _set_schema(props.get("depth"), maximum=max(rt.num_layers.values()))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = _openapi  # type: ignore[method-assign]
    return app


def _usage(f: Final) -> Usage:
    return Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                 total_tokens=f.prompt_tokens + f.completion_tokens)


def _response(f: Final, rid: str, created: int, model: str, chat_mode: bool) -> Any:
    info = HeliosInfo(models=f.models, depth=f.depth, exit_layers=f.exit_layers,
                      mean_exit_layer=sum(f.exit_layers) / len(f.exit_layers) if f.exit_layers else 0.0)
    common = dict(id=rid, created=created, model=model, system_fingerprint=f"{f.model}@{f.depth}", usage=_usage(f),
                  helios=info)
    if chat_mode:
        return ChatCompletionResponse(choices=[ChatChoice(message=AssistantMessage(content=f.text),
                                                          finish_reason=f.finish_reason)], **common)
    return CompletionResponse(choices=[CompletionChoice(text=f.text, finish_reason=f.finish_reason)], **common)


def _config_param(message: str) -> str | None:
    """Config field an engine ``apply`` error is about."""
    for key, param in (("depth", "depth"), ("max_batch", "max_batch"), ("measure", "measure"),
                       ("exit layer", "exit_layers"), ("threshold", "threshold"), ("memory budget", "depth"),
                       ("model", "model")):
        if key in message:
            return param
    return None
