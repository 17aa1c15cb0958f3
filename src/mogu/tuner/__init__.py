"""The core tuner: config, routers, the routed layer, the model wrapper, generation and checkpoint I/O.

It imports nothing above it (train, eval, serve, cli); import-linter enforces this in CI.
"""
