"""What the generation service and the gateway agree on about gRPC statuses besides the code."""

# The google.rpc.ErrorInfo domain with which the service marks a status whose message was written for callers: the
# gateway passes such messages on, and replaces any other (made by grpc itself, a proxy or a foreign server).
CLIENT_FACING_DOMAIN = "chatserve.generate.v1"
