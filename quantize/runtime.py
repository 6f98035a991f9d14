"""ONNX Runtime sessions, created one way for every stage."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .errors import ModelError


def make_session(model: str | Path | bytes, threads: int = 0, basic_optimizations_only: bool = False
                 ) -> ort.InferenceSession:
    """A CPU session; ``threads=0`` lets ONNX Runtime use every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if basic_optimizations_only:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        where = "in-memory model" if isinstance(model, bytes) else str(model)
        raise ModelError(f"ONNX Runtime cannot load {where}: {str(exc).splitlines()[0]}") from exc


def input_name(session: ort.InferenceSession) -> str:
    return session.get_inputs()[0].name
