"""The OpenAPI 3.1 description of what the gateway accepts and answers (`GET /openapi.json`).

Request bodies come from the same pydantic models that validate requests, so the document cannot drift from the
code; response bodies are described here, and the test suite fuzzes the running gateway against both.
"""

from __future__ import annotations

import functools
from typing import Any

from gateway.anthropic import CountTokensRequest, MessagesRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.responses import CreateResponse

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": {"type": "integer", "minimum": 0}},
        },
    },
}

_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", None]}

_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}

_CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"const": "assistant"},
                            # null when the model only called tools
                            "content": {"type": ["string", "null"]},
                            "tool_calls": {"type": "array", "items": _TOOL_CALL},
                        },
                    },
                    "logprobs": {"type": ["object", "null"]},
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": {"$ref": "#/components/schemas/Usage"},
    },
}

_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "text_completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "text", "finish_reason"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "text": {"type": "string"},
                    "logprobs": {"type": ["object", "null"]},
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": {"$ref": "#/components/schemas/Usage"},
    },
}

# One server-sent event: `data` holds a JSON chunk (or an in-band error), and the last one is "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
# An event whose `event:` line names its type (Responses API, Anthropic's Messages API).
_TYPED_SSE_EVENT = {"type": "object", "required": ["event", "data"],
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}

_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}


# Anthropic's Messages API (gateway/anthropic.py): its message object and error shape.
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "model": {"type": "string"},
        "content": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
                    {"type": "object", "required": ["type", "id", "name", "input"],
                     "properties": {"type": {"const": "tool_use"}, "id": {"type": "string"},
                                    "name": {"type": "string"}, "input": {"type": "object"}}},
                ]
            },
        },
        "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        "stop_sequence": {"type": ["string", "null"]},
        "usage": {
            "type": "object",
            "required": ["input_tokens", "output_tokens"],
            "properties": {name: {"type": "integer", "minimum": 0} for name in (
                "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")},
        },
    },
}


_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
        "model": {"type": "string"},
        "previous_response_id": {"type": ["string", "null"]},
        "incomplete_details": {"type": ["object", "null"]},
        "error": {"type": ["object", "null"]},
        "output": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "object", "required": ["type", "id", "role", "content"],
                     "properties": {"type": {"const": "message"}, "id": {"type": "string"}, "role": {"const": "assistant"},
                                    "content": {"type": "array", "items": {"type": "object"}}}},
                    {"type": "object", "required": ["type", "id", "call_id", "name", "arguments"],
                     "properties": {"type": {"const": "function_call"}, "id": {"type": "string"},
                                    "call_id": {"type": "string"}, "name": {"type": "string"},
                                    "arguments": {"type": "string"}}},
                ]
            },
        },
        "usage": {
            "type": ["object", "null"],
            "properties": {name: {"type": "integer", "minimum": 0} for name in ("input_tokens", "output_tokens", "total_tokens")},
        },
    },
}
_ITEM_LIST = {
    "type": "object",
    "required": ["object", "data", "has_more"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}},
                   "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
                   "has_more": {"type": "boolean"}},
}
_RESPONSE_ID = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _responses_paths() -> dict:
    return {
        "/v1/responses": {
            "post": {
                "summary": "Create a response (OpenAI's Responses API)",
                "requestBody": {"required": True, "content": _json("CreateResponse")},
                "responses": {
                    "200": {"description": "the response object, or with `stream: true` its typed events",
                            "content": {**_json("Response"), "text/event-stream": {"schema": _TYPED_SSE_EVENT}}},
                    **_errors(*_GENERATION_ERRORS),
                },
            }
        },
        "/v1/responses/{response_id}": {
            "get": {"summary": "A stored response", "parameters": _RESPONSE_ID,
                    "responses": {"200": {"description": "the response", "content": _json("Response")}, **_errors(401, 404)}},
            "delete": {"summary": "Delete a stored response", "parameters": _RESPONSE_ID,
                       "responses": {"200": {"description": "deleted"}, **_errors(401, 404)}},
        },
        "/v1/responses/{response_id}/input_items": {
            "get": {
                "summary": "The input items of a stored response",
                "parameters": [*_RESPONSE_ID,
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                               {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                               {"name": "after", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "a page of items", "content": _json("ResponseItemList")},
                              **_errors(400, 401, 404)},
            }
        },
    }


def _anthropic(summary: str, request: str, response: str, stream: bool) -> dict:
    ok = {**_json(response), **({"text/event-stream": {"schema": _TYPED_SSE_EVENT}} if stream else {})}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {"description": "Anthropic's message object (or its event stream with `stream: true`)", "content": ok},
                **{str(code): {"description": "an error in Anthropic's shape", "content": _json("AnthropicError")}
                   for code in _GENERATION_ERRORS},
            },
        }
    }


def _json(schema_ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}


def _errors(*codes: int) -> dict:
    return {str(code): {"description": "an error in OpenAI's shape", "content": _json("Error")} for code in codes}


_GENERATION_ERRORS = (400, 401, 404, 413, 415, 429, 500, 502, 503, 504)


def _generation(summary: str, request: str, response: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": "the completion, or with `stream: true` a server-sent event stream of chunks",
                    "content": {**_json(response), "text/event-stream": {"schema": _SSE_EVENT}},
                },
                **_errors(*_GENERATION_ERRORS),
            },
        }
    }


@functools.cache
def openapi_document(models: tuple[str, ...] = ()) -> dict[str, Any]:
    """The document; with the served model ids known, `model` lists them as the only valid values."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest, MessagesRequest, CountTokensRequest, CreateResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        if models:
            schema["properties"]["model"] = {"type": "string", "enum": list(models), "title": "Model"}
        schemas[model.__name__] = schema
    schemas.update(
        Error=_ERROR, Usage=_USAGE, ChatCompletion=_CHAT_COMPLETION, Completion=_COMPLETION, Model=_MODEL,
        Message=_MESSAGE, AnthropicError=_ANTHROPIC_ERROR, Response=_RESPONSE, ResponseItemList=_ITEM_LIST,
        MessageTokenCount={"type": "object", "required": ["input_tokens"],
                           "properties": {"input_tokens": {"type": "integer", "minimum": 0}}},
        ModelList={
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
        },
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "chatserve OpenAI-compatible API", "version": "1"},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": _generation("Create a chat completion", "ChatCompletionRequest", "ChatCompletion"),
            "/v1/completions": _generation("Create a text completion", "CompletionRequest", "Completion"),
            "/v1/messages": _anthropic("Create a message (Anthropic's Messages API)", "MessagesRequest", "Message", True),
            "/v1/messages/count_tokens": _anthropic(
                "Count a message's input tokens (Anthropic's Messages API)", "CountTokensRequest", "MessageTokenCount", False
            ),
            **_responses_paths(),
            "/v1/models": {
                "get": {
                    "summary": "List the served models",
                    "responses": {"200": {"description": "the models", "content": _json("ModelList")}, **_errors(401, 503)},
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "Describe one model",
                    "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "the model", "content": _json("Model")}, **_errors(401, 404, 503)},
                }
            },
        },
    }
