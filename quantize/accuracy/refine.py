"""Post-quantization refinement of an int8 QDQ model: weight-scale search, GPTQ weight rounding, bias correction.

All change only initializer values (int8 weights and int32 biases; the search also the per-channel weight scales and
with them the bias scales) and keep every activation scale and zero point, so the refined model has the quantizer's
exact graph and ONNX Runtime fuses it the same way. Because of that a refinement can be carried over to another
quantization of the same fp32 model with the same ranges (the accuracy budget's trials, which keep some nodes in
fp32): :func:`transfer` copies every integer initializer, with its scale when the search changed it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.core.artifacts import atomic_path
from quantize.accuracy.bias_correction import correct_biases
from quantize.config import WeightRounding, WeightScales, choice
from quantize.accuracy.weight_rounding import round_weights
from quantize.accuracy.weight_scales import search_weight_scales

log = logging.getLogger(__name__)

def refine(fp32_path: Path, int8_path: Path, out_path: Path, batches: Callable[[], Iterable[np.ndarray]],
           weight_rounding: str = "nearest", bias_correction: bool = False, threads: int = 0,
           correction_batches: Callable[[], Iterable[np.ndarray]] | None = None,
           weight_scales: str = "max") -> dict[str, Any]:
    """Write the refined int8 model to ``out_path``; returns what each method measured. ``fp32_path`` must be the
    model ``int8_path`` was quantized from; ``batches()`` yields calibration images anew on each call (GPTQ), and
    ``correction_batches()`` the images for bias correction (default: the same). The weight-scale search runs
    first (GPTQ rounds on the scales it chose)."""
    weight_rounding = choice(WeightRounding, weight_rounding, "quant.weight_rounding").value
    weight_scales = choice(WeightScales, weight_scales, "quant.weight_scales").value
    fp32 = onnx.load(str(fp32_path))
    int8 = onnx.load(str(int8_path))
    details: dict[str, Any] = {}
    if weight_scales == "search":
        details["weight_scales"] = asdict(search_weight_scales(fp32, int8))
    if weight_rounding == "gptq":
        rounding = round_weights(fp32, int8, batches(), threads=threads)
        details["weight_rounding"] = {k: v for k, v in asdict(rounding).items() if k != "per_layer"}
        details["weight_rounding"]["per_layer"] = rounding.per_layer
    if bias_correction:
        correction = correct_biases(fp32, int8, correction_batches or batches, threads=threads)
        details["bias_correction"] = asdict(correction)
    with atomic_path(out_path) as tmp:
        onnx.save(int8, str(tmp))
    return details


def _dq_scales(model: onnx.ModelProto) -> dict[str, str]:
    """Integer initializer -> the scale initializer its DequantizeLinear uses."""
    return {n.input[0]: n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}


def transfer(refined: onnx.ModelProto, target: onnx.ModelProto) -> int:
    """Copy refined int8/int32 initializers into ``target`` (in place) wherever the same initializer exists there
    with the same shape and type; a scale the weight-scale search changed is copied with its integers (both models
    come from the same fp32 graph and ranges, so the activation scales a bias scale includes are the same). Returns
    how many integer initializers were copied."""
    src = {i.name: i for i in refined.graph.initializer}
    dst = {i.name: i for i in target.graph.initializer}
    src_scales, dst_scales = _dq_scales(refined), _dq_scales(target)
    readers: dict[str, int] = {}
    for node in target.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    copied = 0
    for name, scale in dst_scales.items():
        if name not in src or name not in dst or src_scales.get(name) != scale:
            continue
        a, b = numpy_helper.to_array(src[name]), numpy_helper.to_array(dst[name])
        if a.dtype != b.dtype or a.shape != b.shape or a.dtype not in (np.int8, np.uint8, np.int32):
            continue
        if scale not in src or scale not in dst:
            continue
        sa, sb = numpy_helper.to_array(src[scale]), numpy_helper.to_array(dst[scale])
        if sa.shape != sb.shape or sa.dtype != sb.dtype:
            continue
        if not np.array_equal(sa, sb):
            if readers.get(scale, 0) != 1:  # a scale shared with other tensors stays as quantized
                continue
            dst[scale].CopyFrom(src[scale])
        if not np.array_equal(a, b) or not np.array_equal(sa, sb):
            dst[name].CopyFrom(src[name])
            copied += 1
    return copied
