"""Tooling that needs torch, transformers or optimum (the ``export`` extra): exporting reward
models and the pieces the training script shares with the exporter. Nothing in the runtime
or the front ends imports this package except ``args-local export``, lazily."""
