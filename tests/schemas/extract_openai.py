"""Cut the component schemas the tests validate against out of OpenAI's published OpenAPI description.

    python tests/schemas/extract_openai.py /path/to/openai-openapi/openapi.json COMMIT

Writes tests/schemas/openai.json: every schema reachable from ROOTS, as published (repository openai/openai-openapi,
MIT license, the commit named in the file), so the tests check responses against OpenAI's own definitions offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The operations the gateway serves, as OpenAI describes them (for fuzzing the gateway with OpenAI's own requests).
OPERATIONS = {"/chat/completions": "post", "/completions": "post", "/models": "get", "/models/{model}": "get",
              "/responses": "post"}
ROOTS = [
    "CreateChatCompletionRequest",
    "CreateCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateResponse",
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
]
OUT = Path(__file__).with_name("openai.json")


def refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)


def main() -> None:
    source, commit = sys.argv[1], sys.argv[2]
    document = json.loads(Path(source).read_text())
    schemas = document["components"]["schemas"]
    paths = {path: {method: document["paths"][path][method]} for path, method in OPERATIONS.items()}
    keep: dict[str, object] = {}
    todo = list(ROOTS)
    found_in_paths: set[str] = set()
    refs(paths, found_in_paths)
    todo += sorted(found_in_paths)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        found: set[str] = set()
        refs(schemas[name], found)
        todo += sorted(found - keep.keys())
    OUT.write_text(json.dumps({
        "source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json (MIT License, Copyright (c) OpenAI)",
        "paths": paths,
        "components": {"responses": document["components"]["responses"], "schemas": dict(sorted(keep.items()))},
    }, indent=1, sort_keys=False) + "\n")
    print(f"{len(keep)} schemas -> {OUT}")


if __name__ == "__main__":
    main()
