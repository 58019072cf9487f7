"""Benchmarks of the serving stack: a load generator for the gateway, gRPC, an in-process engine and a peer
server, plus the suite behind `make bench`, a soak run, a ceiling search and profiling. See bench/README.md."""
