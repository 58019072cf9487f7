"""Validation against OpenAI's own published schemas (tests/schemas/openai.json, cut from openai/openai-openapi)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "openai.json"
URI = "urn:openai-openapi"


def _nullable(node: object) -> object:
    """The published document still marks optional-null values OpenAPI 3.0's way (`nullable: true`), which JSON
    Schema ignores; read it as OpenAI means it: the value may also be null."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        elif "type" not in node:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _registry() -> Registry:
    document = _nullable(json.loads(SCHEMAS.read_text()))
    return Registry().with_resource(URI, Resource.from_contents(document, default_specification=DRAFT202012))


def problems(instance: object, name: str) -> list[str]:
    """Where `instance` breaks OpenAI's schema `name` (empty: it validates)."""
    validator = Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]


def assert_valid(instance: object, name: str) -> None:
    found = problems(instance, name)
    assert not found, f"not a valid {name} by OpenAI's schema:\n" + "\n".join(found[:10])


def openai_document() -> dict:
    """OpenAI's own description of the operations the gateway serves, as an OpenAPI document (for fuzzing)."""
    cut = _nullable(json.loads(SCHEMAS.read_text()))
    return {"openapi": "3.1.0", "info": {"title": "OpenAI API (the operations chatserve serves)", "version": "cut"},
            "paths": cut["paths"], "components": cut["components"]}
