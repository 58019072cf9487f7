"""The gRPC generation service: `python -m service` serves the `generate.v1.Generate` API over an engine."""
