"""Small pieces both processes share: request-id aware logging."""
