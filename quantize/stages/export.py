"""Export stage: PyTorch -> ONNX (TorchScript exporter, dynamic batch), checked and compared with PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from quantize.core.artifacts import atomic_path
from quantize.core.errors import ModelError
from quantize.core.runtime import input_name, make_session

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Exported:
    path: Path
    opset: int
    max_abs_diff: float | None  # None for an imported ONNX model (no PyTorch side)
    seconds: float


def export_onnx(model: "torch.nn.Module", out_path: Path, check_batch: np.ndarray, opset: int = 11,
                tolerance: float = 1e-3, threads: int = 0) -> Exported:
    """Export ``model`` to ``out_path`` and compare ONNX Runtime's logits with PyTorch's on ``check_batch``
    (real preprocessed images). The dynamo exporter cannot emit opset 11, hence ``dynamo=False``."""
    import torch  # here, not at the top: stages that only read ONNX files do not pay torch's ~470 MiB

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


def import_onnx(source: Path, out_path: Path, check_batch: np.ndarray, num_classes: int = 1000,
                threads: int = 0) -> Exported:
    """Take a user's ONNX classifier instead of exporting one: validate it, give it a dynamic batch axis, and
    check that it maps the real images of ``check_batch`` to ``num_classes`` logits."""
    started = time.perf_counter()
    if not source.is_file():
        raise ModelError(f"model.path={source} does not exist")
    try:
        model = onnx.load(str(source))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... for files it cannot use
        raise ModelError(f"{source} is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4 \
            or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(f"{source} must take exactly one float NCHW image input; it takes "
                         f"{', '.join(i.name for i in inputs) or 'none'}")
    for value in (inputs[0], model.graph.output[0]):
        batch = value.type.tensor_type.shape.dim[0]
        batch.Clear()
        batch.dim_param = "batch"
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))
        session = make_session(tmp, threads=threads)
        try:
            logits = session.run(None, {input_name(session): check_batch})[0]
        except Exception as exc:  # ORT's own failure types
            raise ModelError(f"{source} does not run on a batch of {len(check_batch)} images "
                             f"(it may hard-code batch size 1): {str(exc).splitlines()[0]}") from exc
        if logits.shape != (len(check_batch), num_classes):
            raise ModelError(f"{source} returns shape {list(logits.shape)} for {len(check_batch)} images; "
                             f"expected [{len(check_batch)}, {num_classes}] class logits")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    log.info("imported %s (opset %d) without export", source, opset)
    return Exported(out_path, opset, None, time.perf_counter() - started)
