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
    _check_signature(source, inputs, list(model.graph.output), num_classes, check_batch.shape)
    for value in (inputs[0], model.graph.output[0]):
        if value.type.tensor_type.HasField("shape"):
            batch = value.type.tensor_type.shape.dim[0]
            batch.Clear()
            batch.dim_param = "batch"
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))
        try:
            session = make_session(tmp, threads=threads)
        except Exception as exc:  # ORT's own failure types
            raise ModelError(f"ONNX Runtime cannot load {source}: {_first_line(exc)}") from exc
        try:
            logits = session.run(None, {input_name(session): check_batch})[0]
        except Exception as exc:  # ORT's own failure types
            raise ModelError(f"{source} does not run on a batch of {len(check_batch)} images "
                             f"(it may hard-code batch size 1): {_first_line(exc)}") from exc
        if logits.shape != (len(check_batch), num_classes):
            raise ModelError(f"{source} returns shape {list(logits.shape)} for {len(check_batch)} images; "
                             f"expected [{len(check_batch)}, {num_classes}] class logits")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    log.info("imported %s (opset %d) without export", source, opset)
    return Exported(out_path, opset, None, time.perf_counter() - started)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """A value's declared shape (numbers, symbolic names or None), or None when it declares none."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _check_signature(source: Path, inputs: list, outputs: list, num_classes: int, batch_shape: tuple) -> None:
    """One float NCHW image input of the crop size, class logits out: anything else is one line saying what the
    model declares and what the pipeline feeds it."""
    if len(inputs) != 1:
        raise ModelError(f"{source} must take exactly one image input; it takes {len(inputs)} "
                         f"({', '.join(i.name for i in inputs) or 'none'})")
    value = inputs[0]
    if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        raise ModelError(f"{source} takes {kind} input '{value.name}'; the pipeline feeds float32 normalized NCHW "
                         "images: export the model with a float input")
    dims, (_, channels, height, width) = _dims(value), batch_shape
    if dims is not None:
        if len(dims) != 4:
            raise ModelError(f"{source} takes input '{value.name}' of shape {dims}; the pipeline feeds NCHW images "
                             f"[N, {channels}, {height}, {width}]")
        if dims[1] != channels and dims[3] == channels:
            raise ModelError(f"{source} takes NHWC input '{value.name}' {dims} (channels last); the pipeline feeds "
                             f"NCHW [N, {channels}, {height}, {width}]: export the model channels first, or add a "
                             "Transpose(perm=[0, 2, 3, 1]) at its input")
        if isinstance(dims[1], int) and dims[1] != channels:
            raise ModelError(f"{source} takes {dims[1]} channels in input '{value.name}' {dims}; the pipeline feeds "
                             f"{channels} (RGB, NCHW)")
        fixed = [d for d in dims[2:] if isinstance(d, int)]
        if len(fixed) == 2 and fixed != [height, width]:
            raise ModelError(f"{source} takes {fixed[0]}x{fixed[1]} images; the pipeline crops {height}x{width}: set "
                             f"data.preprocess.crop={fixed[0]} (and data.preprocess.resize to at least that)")
    if not outputs:
        raise ModelError(f"{source} has no output; a classifier returns [batch, {num_classes}] logits")
    out = _dims(outputs[0])
    if out is not None and len(out) != 2:
        raise ModelError(f"{source} declares output '{outputs[0].name}' with shape {out}; a classifier returns "
                         f"[batch, {num_classes}] logits: fix the output's declared shape (or leave it undeclared)")
    if out is not None and isinstance(out[1], int) and out[1] != num_classes:
        raise ModelError(f"{source} declares {out[1]} classes in output '{outputs[0].name}' {out}; expected "
                         f"{num_classes} (set model.num_classes={out[1]} if that is right)")
