"""The OpenAI-compatible HTTP gateway: `python -m gateway` serves /v1 over the gRPC Generate service."""
