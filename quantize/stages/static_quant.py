"""Quantize stage: ONNX Runtime static quantization from precomputed ranges, with the result validated."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import version_converter
from onnxruntime.quantization import QuantFormat as OrtQuantFormat, QuantType as OrtQuantType, quantize_static

from quantize.graph import optimize as graph_opt
from quantize.graph.pixel_input import pixel_quantization
from quantize.graph.stem_channels import (fills_blocks, move_input_quantization, narrow_float_stems, pad_float_stem,
                                          pooled_stem)
from quantize.core.artifacts import atomic_path
from quantize.stages.calibrate import METHODS, activation_tensors
from quantize.stages.fp32_nodes import hold_quantization, own_initializers, read_through_cast, with_pools
from quantize.config import CalibMethod, QuantFormat, QuantType, choice
from quantize.core.errors import ConfigError, ModelError, examples
from quantize.core.runtime import make_session

log = logging.getLogger(__name__)

FORMATS = {"qdq": OrtQuantFormat.QDQ, "qoperator": OrtQuantFormat.QOperator}
TYPES = {"uint8": OrtQuantType.QUInt8, "int8": OrtQuantType.QInt8}
PER_CHANNEL_QDQ_OPSET = 13  # DequantizeLinear's axis attribute exists from opset 13


@dataclass
class Quantized:
    path: Path
    opset: int
    seconds: float
    fp32_path: Path | None = None  # the graph the quantizer read, when it differs from the one given (``fp32_out``)
    float_stem: str | None = None  # the stem ``float_stem`` kept in fp32


def model_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def int8_opset(fp32_opset: int, fmt: str, per_channel: bool, requested: int | None) -> int:
    """Opset of the int8 model: ORT writes per-channel QDQ with an ``axis`` that opset < 13 lacks, without warning,
    so such a model is raised to 13; everything else keeps the fp32 model's opset unless asked otherwise."""
    needed = PER_CHANNEL_QDQ_OPSET if (fmt == "qdq" and per_channel) else fp32_opset
    if requested is None:
        return max(fp32_opset, needed)
    if requested < needed:
        raise ConfigError(f"quant.opset={requested} cannot hold per-channel QDQ weights (needs >= {needed})")
    return requested


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer logs advice through the root logger on every call; keep it out of our logs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_model(fp32_path: Path, ranges_path: Path, out_path: Path, *, method: str, fmt: str = "qdq",
                   activation_type: str = "uint8", weight_type: str = "int8", per_channel: bool = True,
                   reduce_range: bool = False, opset: int | None = None, op_types: list[str] | None = None,
                   nodes_to_exclude: list[str] | None = None, float_stem: bool = False,
                   optimize_graph: bool = True, extra_options: dict | None = None,
                   fp32_out: Path | None = None) -> Quantized:
    """Quantize ``fp32_path`` with the ranges of ``ranges_path`` (from ``calibrate`` with the same
    ``optimize_graph``): the graph is first rewritten by ``graph_opt.optimize`` (fp32-exact), so that ONNX Runtime
    fuses every quantized op into an integer kernel. ``float_stem``: a stem convolution followed by a MaxPool stays
    in fp32 with its activation and pool (``stem_channels.pooled_stem``), padded to 16-channel blocks. With layers
    kept in fp32 the quantizer reads another graph than ``fp32_path`` (``with_float_layers``: padded, initializers
    copied): ``fp32_out`` receives it then, the fp32 reference that matches the int8 model layer for layer."""
    fmt = choice(QuantFormat, fmt, "quant.format").value
    activation_type = choice(QuantType, activation_type, "quant.activation_type").value
    weight_type = choice(QuantType, weight_type, "quant.weight_type").value
    method = choice(CalibMethod, method, "calib.method").value
    started = time.perf_counter()
    reference = kept_stem = None
    model = onnx.load(str(fp32_path))
    if optimize_graph:
        model, _ = graph_opt.optimize(model)
    _check_ranges_cover(model, ranges_path)
    pixels = pixel_quantization(model)
    source_opset = model_opset(model)
    target_opset = int8_opset(source_opset, fmt, per_channel, opset)
    if target_opset != source_opset:
        model = version_converter.convert_version(model, target_opset)
    with tempfile.TemporaryDirectory(prefix="quantize.") as scratch, atomic_path(out_path) as tmp_out:
        prepared = Path(scratch) / "fp32.onnx"
        onnx.save(model, str(prepared))
        del model
        if pixels is not None:
            tensors, mapping, bounds = pixels
            ranges_path = _pin_ranges(ranges_path, tensors, bounds, Path(scratch) / "ranges.json")
            nodes_to_exclude = [*(nodes_to_exclude or []), *mapping]
        if float_stem or nodes_to_exclude:
            fp32_graph, nodes_to_exclude, kept_stem = with_float_layers(onnx.load(str(prepared)),
                                                                        nodes_to_exclude or [], float_stem)
            if nodes_to_exclude:  # else the graph is the one prepared already
                onnx.save(fp32_graph, str(prepared))
                if fp32_out is not None:
                    with atomic_path(fp32_out) as tmp_ref:
                        onnx.save(fp32_graph, str(tmp_ref))
                    reference = fp32_out
        with _quiet_root_logger():
            quantize_static(
                str(prepared), str(tmp_out), calibration_data_reader=None,
                quant_format=FORMATS[fmt], per_channel=per_channel, reduce_range=reduce_range,
                activation_type=TYPES[activation_type], weight_type=TYPES[weight_type],
                op_types_to_quantize=list(op_types) if op_types else None,
                nodes_to_exclude=list(nodes_to_exclude or []),
                calibrate_method=METHODS[method], calibration_cache_path=str(ranges_path),
                extra_options=dict(extra_options or {}),
            )
        _finish(Path(tmp_out), list(nodes_to_exclude or []))
        validate_model(tmp_out, what="int8 model")
    seconds = time.perf_counter() - started
    log.info("quantized %s -> %s (%s, %s activations, %s%s weights, opset %d) in %.1f s", fp32_path.name,
             out_path.name, fmt.upper(), activation_type, weight_type, " per-channel" if per_channel else "",
             target_opset, seconds)
    return Quantized(out_path, target_opset, seconds, reference, kept_stem)


def with_float_layers(model: onnx.ModelProto, names: list[str], float_stem: bool = False
                      ) -> tuple[onnx.ModelProto, list[str], str | None]:
    """The graph ONNX Runtime's quantizer reads when the nodes ``names`` (and with ``float_stem`` the stem before a
    MaxPool: ``stem_channels.pooled_stem``) stay in fp32, every node kept, and the stem ``float_stem`` added: the
    MaxPools after them are kept too, on initializers of their own, a stem reading 3 channels again and, when it is
    kept, padded to 16-channel blocks."""
    stem, added_stem = pooled_stem(model), None
    names = list(names)
    if float_stem and stem is not None and stem not in names:
        if fills_blocks(model, stem):
            log.info("kept in fp32 (quant.float_stem): the stem %s with its pool", stem)
            names.append(stem)
            added_stem = stem
        else:
            log.info("quant.float_stem: the stem %s stays int8: its channels cannot be padded to a multiple of 16 "
                     "(a reader of its pool is not a convolution), and in fp32 it would be slower", stem)
    if not names:
        return model, [], None
    extended = with_pools(model, names)
    if len(extended) > len(names):
        log.info("also kept in fp32, after layers kept in fp32: %s", examples(extended[len(names):]))
    model = own_initializers(model, extended)
    narrow_float_stems(model, extended)
    if stem in extended:
        model, added = pad_float_stem(model, stem)
        if added:
            log.info("the fp32 stem padded with %d zero channels", added)
    return model, extended, added_stem


def _pin_ranges(ranges_path: Path, tensors: list[str], bounds: tuple[float, float], out_path: Path) -> Path:
    """A copy of the calibration ranges with ``tensors`` on ``bounds`` (8-bit pixels are quantized on their own
    grid, whatever the calibration images held: ``graph.pixel_input``)."""
    data = json.loads(Path(ranges_path).read_text())
    for tensor in tensors:
        data["data"][tensor] = {**data["data"].get(tensor, {}), "lowest": bounds[0], "highest": bounds[1]}
    out_path.write_text(json.dumps(data))
    return out_path


def _finish(path: Path, fp32_nodes: list[str]) -> None:
    """The quantizer's output rewritten in place: the widened stem's Gather of the network input copies bytes, not
    floats (``stem_channels``); the nodes kept in fp32 are written so that ONNX Runtime does not quantize them after
    all (``fp32_nodes``)."""
    model = onnx.load(str(path))
    moved = move_input_quantization(model)
    cast = read_through_cast(model, fp32_nodes) if fp32_nodes else []
    held = hold_quantization(model, fp32_nodes) if fp32_nodes else []
    if cast or held:
        log.info("kept in fp32: %d layer(s) read their input through Cast (%s), %d node(s) hold the quantizers off "
                 "(%s)", len(cast), examples(cast) or "-", len(held), examples(held) or "-")
    if moved or cast or held:
        onnx.save(model, str(path))


def _check_ranges_cover(model: onnx.ModelProto, ranges_path: Path) -> None:
    """Every activation of the graph to quantize needs a range: ranges computed on another graph (an older graph
    rewrite, or ``optimize_graph`` off on one side) would leave tensors unquantized or stop ONNX Runtime's
    quantizer with a KeyError."""
    try:
        names = set(json.loads(Path(ranges_path).read_text())["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not our format: let ONNX Runtime's reader report it
    missing = [t for t in activation_tensors(model) if t not in names]
    if missing:
        raise ModelError(f"the calibration ranges do not cover {len(missing)} activations of the graph to quantize "
                         f"({examples(missing)}); they were computed on another graph (calibrate and quantize must "
                         f"both apply graph_opt version {graph_opt.VERSION}): rerun the calibrate stage")


def validate_model(path: Path, what: str) -> None:
    """Fail unless the model passes onnx.checker and loads in ONNX Runtime."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{what} is invalid ({str(exc).splitlines()[0]}); nothing was written") from exc
    make_session(path)
