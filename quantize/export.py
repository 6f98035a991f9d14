"""Export stage: PyTorch -> ONNX (TorchScript exporter, dynamic batch), checked and compared with PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .artifacts import atomic_path
from .errors import ModelError
from .runtime import input_name, make_session

log = logging.getLogger(__name__)


@dataclass
class Exported:
    path: Path
    opset: int
    max_abs_diff: float
    seconds: float


def export_onnx(model: torch.nn.Module, out_path: Path, check_batch: np.ndarray, opset: int = 11,
                tolerance: float = 1e-3, threads: int = 0) -> Exported:
    """Export ``model`` to ``out_path`` and compare ONNX Runtime's logits with PyTorch's on ``check_batch``
    (real preprocessed images). The dynamo exporter cannot emit opset 11, hence ``dynamo=False``."""
    started = time.perf_counter()
    model = model.eval()
    example = torch.from_numpy(np.ascontiguousarray(check_batch[:1]))
    with atomic_path(out_path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(tmp), opset_version=opset, dynamo=False,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ModelError(f"ONNX export at opset {opset} failed: {str(exc).splitlines()[0]}") from exc
        session = make_session(tmp, threads=threads)
        onnx_logits = session.run(None, {input_name(session): check_batch})[0]
    with torch.inference_mode():
        torch_logits = model(torch.from_numpy(np.ascontiguousarray(check_batch))).numpy()
    max_abs_diff = float(np.abs(onnx_logits - torch_logits).max())
    seconds = time.perf_counter() - started
    if not max_abs_diff <= tolerance:
        out_path.unlink(missing_ok=True)
        raise ModelError(f"exported model disagrees with PyTorch: max abs logit difference {max_abs_diff:.3g} "
                         f"> export.tolerance={tolerance:g}")
    log.info("exported %s at opset %d in %.1f s; ORT vs PyTorch max abs diff %.2e on %d images",
             out_path.name, opset, seconds, max_abs_diff, len(check_batch))
    return Exported(out_path, opset, max_abs_diff, seconds)
