"""HTTP handlers: parse and validate the OpenAI body, make one streaming gRPC call per prompt, write JSON or SSE.

Every handler reads the first gRPC message before it answers, so an error the service finds in the request
(too long for the context window, a bad value) is a proper HTTP status, not an event inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TypeVar

import grpc
from aiohttp import web
from pydantic import BaseModel, ValidationError

from common.logs import request_id_var
from common.bounds import max_body_bytes_for
from gateway import anthropic, responses, sse
from gateway.backend import NoReplica, Stream
from gateway.errors import ApiError, BadRequest, NotFound, PayloadTooLarge, Upstream, from_rpc_error, no_replica
from gateway.openapi import openapi_document
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.state import BACKEND, CONFIG, LIMITER, METRICS, RESPONSES, UNKNOWN_FIELDS
from gateway.store import StoredResponse
from gateway.translate import (
    ChatAccumulator,
    ChatChunkEncoder,
    CompletionAccumulator,
    CompletionChunkEncoder,
    Translated,
    add_usage,
    chat_to_proto,
    completion_to_proto,
)
from generate.v1 import generate_pb2 as pb

log = logging.getLogger("gateway.requests")

M = TypeVar("M", bound=BaseModel)

UNPARSABLE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
# Unknown field names are logged once each, up to this many per process (the set is keyed by client input).
MAX_UNKNOWN_FIELDS_LOGGED = 256


class UnsupportedMediaType(ApiError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


# ---------------------------------------------------------------------------------------------- parsing


async def read_json(request: web.Request) -> dict:
    if "Content-Type" in request.headers and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type!r}", should_retry=False
        )
    info = request.app[BACKEND].known_model_info()
    if info is not None and request.content_length is not None and info.context_length:
        bound = max_body_bytes_for(info.context_length)
        if request.content_length > bound:
            # Refused before the body is read: reading and parsing megabytes would hold this process (and every
            # stream it is writing) for a noticeable time, for a prompt that cannot fit anyway.
            raise PayloadTooLarge(
                f"the request body ({request.content_length} bytes) is larger than any prompt for this model's context "
                f"window of {info.context_length} tokens can be ({bound} bytes at most)")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        raise PayloadTooLarge(f"the request body is larger than this server's limit of {limit} bytes") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, invalid UTF-8, or nesting deeper than the parser allows
        raise BadRequest(UNPARSABLE) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def parse(model: type[M], body: dict, app: web.Application) -> M:
    try:
        parsed = model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e, body) from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    seen = app[UNKNOWN_FIELDS]
    if len(seen) < MAX_UNKNOWN_FIELDS_LOGGED:
        # Client input: bounded in number and length, and quoted so it cannot forge log lines.
        unknown = list(dict.fromkeys(f[:64] for f in parsed.unknown_fields() if f[:64] not in seen))
        unknown = unknown[: MAX_UNKNOWN_FIELDS_LOGGED - len(seen)]
        if unknown:
            seen.update(unknown)
            log.warning(
                "ignoring request fields this API does not know (logged once each, the first %d): %s",
                MAX_UNKNOWN_FIELDS_LOGGED, ", ".join(ascii(f) for f in unknown),
            )
    return parsed


def _validation_error(error: ValidationError, body: dict) -> BadRequest:
    errors = error.errors(include_url=False)
    # Our own refusals (value errors) say more than a union's "not a string" about its other branch.
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    param = _param_path(first["loc"], body)
    if first["type"] == "missing":
        return BadRequest(f"Missing required parameter: '{param}'.", param=param)
    message = first["msg"].removeprefix("Value error, ")
    return BadRequest(f"Invalid value for '{param}': {message}.", param=param)


def _param_path(loc: tuple, body: object) -> str:
    """The loc of a pydantic error as OpenAI names a parameter ("messages[0].content"), following only the steps
    that exist in the body (pydantic adds union-member tags such as 'str' to the loc)."""
    path = ""
    current = body
    for step in loc:
        if isinstance(current, dict) and isinstance(step, str) and (step in current or not path or step == loc[-1]):
            path = f"{path}.{step}" if path else step
            current = current.get(step)
        elif isinstance(current, list) and isinstance(step, int):
            path += f"[{step}]"
            current = current[step] if step < len(current) else None
    return path or str(loc[0])


# ---------------------------------------------------------------------------------------------- generation


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    chat = parse(ChatCompletionRequest, await read_json(request), request.app)
    translated = chat_to_proto(chat, request_id_var.get())
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    choices = translated.n * len(translated.requests)
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    if chat.stream:
        encoder = ChatChunkEncoder(completion_id, created, chat.model, include_usage)
        return await _generate(request, translated, encoder, None, started)
    accumulator = ChatAccumulator(choices, logprobs=bool(chat.logprobs))
    body = await _generate(request, translated, None, accumulator, started)
    return web.json_response(accumulator.response(completion_id, created, chat.model, body), dumps=_dumps)


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API: read as the chat request it means, answered in Anthropic's shapes."""
    started = time.perf_counter()
    req = parse(anthropic.MessagesRequest, await read_json(request), request.app)
    chat = parse(ChatCompletionRequest, anthropic.to_chat(req), request.app)
    translated = chat_to_proto(chat, request_id_var.get())
    message = anthropic.message_id()
    if req.stream:
        return await _generate(request, translated, anthropic.MessageStreamEncoder(message, req.model), None, started)
    accumulator = anthropic.MessageAccumulator()
    usage = await _generate(request, translated, None, accumulator, started)
    return web.json_response(accumulator.response(message, req.model, usage), dumps=_dumps)


async def create_response(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API: read as the chat request it means (after the stored conversation of
    previous_response_id), answered as a response object or its typed events; stored unless store is false."""
    started = time.perf_counter()
    req = parse(responses.CreateResponse, await read_json(request), request.app)
    owner = _owner(request)
    store = request.app[RESPONSES]
    history: list[dict] = []
    if req.previous_response_id:
        previous = await store.get(req.previous_response_id, owner)
        if previous is None:
            raise NotFound(f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history = previous.conversation
    items = responses.input_items(req)
    try:
        chat = parse(ChatCompletionRequest, responses.to_chat(req, items, history), request.app)
        translated = chat_to_proto(chat, request_id_var.get())
    except BadRequest as e:
        e.param = responses.responses_param(e.param)  # the chat field it checked, as this API names it
        raise
    translated.param_alias.update(responses.PARAM_ALIAS)
    builder = responses.ResponseBuilder(responses.new_id("resp"), req)
    if req.stream:
        reply = await _generate(request, translated, responses.ResponseStreamEncoder(builder), None, started)
    else:
        usage = await _generate(request, translated, None, builder, started)
        builder.finish(usage)
        reply = web.json_response(builder.final, dumps=_dumps)
    if req.store is not False and builder.status in ("completed", "incomplete"):
        conversation = history + responses.items_to_messages(items) + builder.output_messages()
        await store.put(StoredResponse(builder.id, owner, builder.created_at, builder.final, items, conversation))
    return reply


async def get_response(request: web.Request) -> web.Response:
    return web.json_response((await _stored(request)).response, dumps=_dumps)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not await request.app[RESPONSES].delete(response_id, _owner(request)):
        raise _no_response(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    stored = await _stored(request)
    query = request.query
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be a whole number from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc", param="order")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise BadRequest(f"no input item with id {after!r} in this response", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return web.json_response({
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit,
    }, dumps=_dumps)


async def _stored(request: web.Request) -> StoredResponse:
    response_id = request.match_info["response_id"]
    stored = await request.app[RESPONSES].get(response_id, _owner(request))
    if stored is None:
        raise _no_response(response_id)
    return stored


def _no_response(response_id: str) -> NotFound:
    # A response another key made is not found either: whose it is stays that key's business.
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _owner(request: web.Request) -> str:
    caller = request.get("caller")
    return caller.owner if caller is not None else ""


async def count_message_tokens(request: web.Request) -> web.Response:
    req = parse(anthropic.CountTokensRequest, await read_json(request), request.app)
    chat = parse(ChatCompletionRequest, anthropic.to_chat(req), request.app)
    translated = chat_to_proto(chat, request_id_var.get())
    try:
        counted = await request.app[BACKEND].count_tokens(translated.request)
    except grpc.aio.AioRpcError as e:
        request.app[METRICS].grpc_errors.labels(e.code().name).inc()
        raise from_rpc_error(e, translated.param_alias) from None
    except NoReplica:
        raise no_replica() from None
    return web.json_response({"input_tokens": counted.prompt_tokens})


async def completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    completion = parse(CompletionRequest, await read_json(request), request.app)
    translated = completion_to_proto(completion, request_id_var.get())
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = translated.n * len(translated.requests)
    echo = [r.input.text for r in translated.requests] if completion.echo else None
    logprobs = completion.logprobs is not None
    if completion.stream:
        include_usage = bool(completion.stream_options and completion.stream_options.include_usage)
        encoder = CompletionChunkEncoder(completion_id, created, completion.model, include_usage, choices, logprobs, echo)
        return await _generate(request, translated, encoder, None, started)
    accumulator = CompletionAccumulator(choices, logprobs, echo, translated.n)
    usage = await _generate(request, translated, None, accumulator, started)
    return web.json_response(accumulator.response(completion_id, created, completion.model, usage), dumps=_dumps)


async def _generate(request: web.Request, translated: Translated, encoder, accumulator, started: float):
    """Run the gRPC calls of one HTTP request. With an encoder, write an SSE stream and return the response;
    with an accumulator, feed it every message and return the summed usage."""
    streams: list[Stream] = []
    tally = _Tally()
    try:
        # Every call's first message (or error) comes before the HTTP status is chosen.
        for message in translated.requests:
            streams.append(await _start(request, message, translated))
        offsets = [i * translated.n for i in range(len(streams))]
        messages = tally.count(_merge(request, streams, offsets))
        if encoder is None:
            async for offset, message in messages:
                accumulator.add(message, offset)
            return tally.usage
        return await _stream(request, messages, encoder, translated.n, started, tally)
    finally:
        for stream in streams:
            stream.close()  # aborts the generation if we stopped early; releases the replica
        # Whatever the ending (finished, client gone, failed mid-stream): what was generated is charged.
        _count_tokens(request, tally)


class _Tally:
    """The usage of one HTTP request's calls, and the tokens they streamed, for a call that ends before its usage."""

    def __init__(self) -> None:
        self.usage: pb.Usage | None = None
        self.streamed = 0

    async def count(self, messages):
        async for offset, message in messages:
            self.streamed += sum(len(c.token_ids) for c in message.choices)
            if message.HasField("usage"):
                self.usage = add_usage(self.usage, message.usage)
            yield offset, message

    def charged(self) -> tuple[int, int]:
        """(prompt, completion) tokens: the usage once every call has reported it, else what was streamed."""
        if self.usage is not None:
            return self.usage.prompt_tokens, max(self.usage.completion_tokens, self.streamed)
        return 0, self.streamed


async def _start(request: web.Request, message: pb.GenerateRequest, translated: Translated) -> Stream:
    app = request.app
    backend = app[BACKEND]
    try:
        stream = await backend.generate(
            message, translated.routing_key, backend.metadata(request_id_var.get()), app[CONFIG].request_timeout_s
        )
    except grpc.aio.AioRpcError as e:
        app[METRICS].grpc_errors.labels(e.code().name).inc()
        raise from_rpc_error(e, translated.param_alias) from None
    except NoReplica:
        raise no_replica() from None
    app[METRICS].routed.labels(stream.replica.target).inc()
    if stream.first is grpc.aio.EOF:
        raise Upstream(502, "the generation service ended the call without an answer", code="bad_gateway")
    return stream


async def _read(request: web.Request, stream: Stream):
    try:
        return await stream.read()
    except grpc.aio.AioRpcError as e:
        request.app[METRICS].grpc_errors.labels(e.code().name).inc()
        raise from_rpc_error(e) from None


async def _merge(request: web.Request, streams: list[Stream], offsets: list[int]):
    """(choice offset, message) from every call, in arrival order. One call, the common case, needs no tasks."""
    if len(streams) == 1:
        message = streams[0].first
        while message is not grpc.aio.EOF:
            yield 0, message
            message = await _read(request, streams[0])
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream, offset) -> None:
        try:
            message = stream.first
            while message is not grpc.aio.EOF:
                await queue.put((offset, message))
                message = await _read(request, stream)
            await queue.put((offset, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # whatever it is, the consumer must hear of it, or it would wait forever
            await queue.put((offset, e))

    tasks = [asyncio.create_task(pump(s, o)) for s, o in zip(streams, offsets)]
    try:
        live = len(tasks)
        while live:
            offset, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield offset, item
    finally:
        for task in tasks:
            task.cancel()


async def _stream(request: web.Request, messages, encoder, n: int, started: float, tally: _Tally) -> web.StreamResponse:
    metrics = request.app[METRICS]
    response = web.StreamResponse(headers=sse.HEADERS)
    await response.prepare(request)
    request["ttfb"] = time.perf_counter() - started
    metrics.ttfb.labels(request.match_info.route.name).observe(request["ttfb"])
    metrics.open_streams.inc()
    try:
        payloads = encoder.start(n)
        try:
            async for offset, message in messages:
                payloads += encoder.encode(message, offset)
                await response.write(encoder.frame(payloads))
                payloads = []
        except ApiError as e:
            # The stream is under way: report the failure in-band, then end the stream as usual.
            log.warning("stream failed after it started: %s", e.message)
            await response.write(encoder.failed(e))
            return response
        except Exception:
            # A bug here: the client still hears the stream ended in failure, the log gets the traceback.
            log.exception("stream failed after it started")
            await response.write(encoder.failed(Upstream(500, "the gateway failed on this request", code="internal_error")))
            return response
        await response.write(encoder.end(tally.usage))
    except ConnectionResetError:
        log.info("client went away mid-stream; cancelling the generation")
    finally:
        metrics.open_streams.dec()
    return response


def _count_tokens(request: web.Request, tally: _Tally) -> None:
    prompt, completion = tally.charged()
    if not prompt and not completion:
        return
    key = request.get("key_label", "-")
    metrics = request.app[METRICS]
    metrics.prompt_tokens.labels(key).inc(prompt)
    metrics.completion_tokens.labels(key).inc(completion)
    if tally.usage is not None:
        metrics.cached_tokens.labels(key).inc(tally.usage.cached_tokens)
    request["usage"] = tally.usage or pb.Usage(completion_tokens=completion)
    caller = request.get("caller")
    if caller is not None:
        request.app[LIMITER].charge(caller.label, caller.limits, prompt + completion)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- models & health


def _model_card(info: pb.GetModelInfoResponse) -> dict:
    return {
        "id": info.model,
        "object": "model",
        "created": info.created,
        "owned_by": "chatserve",
        "max_model_len": info.context_length,
        "engine": info.engine,
    }


async def _model_info(request: web.Request) -> pb.GetModelInfoResponse:
    try:
        return await request.app[BACKEND].model_info()
    except grpc.aio.AioRpcError as e:
        request.app[METRICS].grpc_errors.labels(e.code().name).inc()
        raise from_rpc_error(e) from None
    except NoReplica:
        raise no_replica() from None


async def list_models(request: web.Request) -> web.Response:
    info = await _model_info(request)
    return web.json_response({"object": "list", "data": [_model_card(info)]})


async def get_model(request: web.Request) -> web.Response:
    info = await _model_info(request)
    model_id = request.match_info["model_id"]
    if model_id != info.model:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return web.json_response(_model_card(info))


async def health(request: web.Request) -> web.Response:
    """Ready only while at least one replica of the generation service reports SERVING."""
    if request.app[BACKEND].healthy():
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable"}, status=503)


async def live(request: web.Request) -> web.Response:
    """The gateway process is up (for liveness probes, which must not depend on the service)."""
    return web.json_response({"status": "ok"})


async def openapi(request: web.Request) -> web.Response:
    try:
        models: tuple[str, ...] = ((await request.app[BACKEND].model_info()).model,)
    except (grpc.aio.AioRpcError, NoReplica):  # the document stays available while the service is down
        models = ()
    return web.json_response(openapi_document(models))


PLAYGROUND = Path(__file__).with_name("playground")
_PLAYGROUND_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
# The page loads nothing from elsewhere and runs no inline script.
_PLAYGROUND_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


async def playground(request: web.Request) -> web.Response:
    return web.Response(body=(PLAYGROUND / "index.html").read_bytes(), content_type="text/html", charset="utf-8",
                        headers=_PLAYGROUND_HEADERS)


async def playground_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _PLAYGROUND_FILES:  # a fixed list: nothing else of the package can be fetched
        raise NotFound(f"no playground file {name!r}")
    return web.Response(body=(PLAYGROUND / name).read_bytes(), content_type=_PLAYGROUND_FILES[name], charset="utf-8",
                        headers=_PLAYGROUND_HEADERS)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions, name="chat")
    app.router.add_post("/v1/completions", completions, name="completions")
    app.router.add_post("/v1/messages", messages, name="messages")
    app.router.add_post("/v1/messages/count_tokens", count_message_tokens, name="count_tokens")
    app.router.add_post("/v1/responses", create_response, name="responses")
    app.router.add_get("/v1/responses/{response_id}", get_response, name="response")
    app.router.add_delete("/v1/responses/{response_id}", delete_response, name="response_delete")
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items, name="response_input_items")
    app.router.add_get("/v1/models", list_models, name="models")
    app.router.add_get("/v1/models/{model_id}", get_model, name="model")
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/livez", live, name="livez")
    app.router.add_get("/openapi.json", openapi, name="openapi")
    if app[CONFIG].playground:
        app.router.add_get("/", playground, name="playground")
        app.router.add_get("/playground/{name}", playground_asset, name="playground_asset")
