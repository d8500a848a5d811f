"""The Kubeflow Pipelines v2 pipeline of the hardening step: build, compile, run locally."""

from pipeline.harden_pipeline import GpuPlacement, build_pipeline, compile_pipeline, run_local

__all__ = ["GpuPlacement", "build_pipeline", "compile_pipeline", "run_local"]
