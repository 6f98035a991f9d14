"""ONNX Runtime sessions, created one way for every stage."""

from __future__ import annotations

import platform
from pathlib import Path

import onnxruntime as ort

from quantize.core.errors import ModelError


LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(model: str | Path | bytes, threads: int = 0,
                 level: str | None = None, optimized_model_path: str | Path | None = None,
                 memory_pattern: bool = True, spinning: bool = True,
                 profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session; ``threads=0`` lets ONNX Runtime use every core. ``level`` is the graph optimization level
    (default: all; ``"disable"`` runs the graph exactly as written, QDQ emulated in float, which is what makes
    DequantizeLinear outputs readable); ``optimized_model_path`` saves the graph ONNX Runtime actually runs. ``memory_pattern=False``
    stops ONNX Runtime from planning one block for all intermediates on top of what its arena already holds after
    the first run (with both, the second run doubles the resident memory). ``spinning=False`` makes idle
    intra-op threads sleep instead of spinning: cheaper when other threads of the process want the cores.
    ``profile_prefix`` turns on ONNX Runtime's profiler (``end_profiling()`` returns the trace's path)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_mem_pattern = memory_pattern
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if level is not None:
        options.graph_optimization_level = LEVELS[level]
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        where = "in-memory model" if isinstance(model, bytes) else str(model)
        raise ModelError(f"ONNX Runtime cannot load {where}: {str(exc).splitlines()[0]}") from exc


def input_name(session: ort.InferenceSession) -> str:
    return session.get_inputs()[0].name


def cpu_name() -> str:
    """The CPU model, recorded beside every timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
