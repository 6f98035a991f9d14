"""The int8 model quantizes the image's own pixels, not the normalized input: exact at scale 1.

The network input is ``(pixel * scale - mean[c]) / std[c]`` of 8-bit pixels. Normalized, the three channels lie on
three grids of different steps and offsets (torchvision: 0.0171, 0.0175, 0.0174), which no single uint8 scale holds:
the int8 model's QuantizeLinear rounded every input value by up to about one pixel level. On ShuffleNetV2 x1.0 (real
weights) the fp32 model with only its input quantized that way agreed with itself on 98.9% of views; the input was
the largest single loss of the int8 model (EfficientNet-Lite0's [-1, 1] input sits on a 1/128 grid and loses
nothing). The pixels themselves are integers 0..255: quantized with scale 1 and zero point 0 they are exact.

So the graph maps its input back to pixels, ``p = x * gain[c] + offset[c]`` (``gain = std / scale``,
``offset = mean / scale``), in fp32, and the convolutions reading it take pixels, their weights divided by
``gain`` and their biases less ``sum(W * offset / gain)``. Their zero padding, which is ``offset[c]`` in pixels (not
an integer: 123.675 for torchvision's red), moves into the mapping: one fp32 depthwise 1x1 convolution with weights
``gain``, bias ``offset`` and the stem's pads, whose output is ``offset[c]`` where it pads. Exact in fp32. The int8
model keeps the mapping in fp32 and quantizes its output with scale 1 and zero point 0; only the padding ring is
rounded (to the nearest pixel level).

Cost (ShuffleNetV2 x1.0, the int8 model against itself without the mapping, 2 threads, interleaved, two sessions
of three runs): 0-13% at batch 1, 5-10% at batch 32, one fp32 pass over the input that ONNX Runtime runs slowly.
Written as ``Pad -> Mul -> Add``, or as a Pad and a per-channel QuantizeLinear (slower than the per-tensor one),
it cost as much or more. The agreement gain (+0.5 points on ShuffleNetV2 x1.0) did not pay for that in the
default recipe: ``quant.pixel_input`` is an option.

An input already on one pixel grid with a pixel level at zero (EfficientNet-Lite0's ``(pixel - 127) / 128``, or
raw pixels) needs no mapping: its range is pinned to the pixels' (-127/128 .. 1), a scale of one pixel level.

The rewrite names what the quantizer must know in the model's metadata (``PIXELS_KEY``: the tensors holding
pixels; ``RANGE_KEY``: the range they are quantized on, whatever the calibration images held; ``NODES_KEY``: the
mapping's nodes, kept in fp32): ``pixel_quantization`` reads them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from quantize.graph.onnx_graph import Graph, Report, attr, set_attr

PIXELS_KEY = "quantize.pixel_input.tensor"
NODES_KEY = "quantize.pixel_input.nodes"
RANGE_KEY = "quantize.pixel_input.range"
PIXEL_RANGE = (0.0, 255.0)
# Bumped when the rewritten graph changes (cache keys): 1 Pad -> Mul -> Add; 2 one depthwise 1x1 convolution.
VERSION = 2


def input_to_pixels(g: Graph, report: Report, gain: tuple[float, ...], offset: tuple[float, ...]) -> None:
    """Rewrite ``g`` so its first convolutions read pixels (see the module docstring); leaves a graph it cannot
    rewrite exactly as it is (reported as ``pixel_input_skipped``)."""
    plan = _plan(g, len(gain))
    if plan is None:
        report.add("pixel_input_skipped")
        return
    source, convs, pads = plan
    gain_c = np.asarray(gain, dtype=np.float64)
    offset_c = np.asarray(offset, dtype=np.float64)
    if np.all(gain_c == gain_c[0]) and np.all(offset_c == offset_c[0]) and offset_c[0] == np.round(offset_c[0]):
        # one grid for every channel, its zero a pixel level ((pixel - 127) / 128): exact as it is
        low, high = (PIXEL_RANGE[0] - offset_c[0]) / gain_c[0], (PIXEL_RANGE[1] - offset_c[0]) / gain_c[0]
        _record(g, source, [], (low, high))
        report.add("input_on_pixel_grid")
        return
    mapping = _mapping_conv(g, source, gain_c, offset_c, pads)
    for conv, channel_of in convs:
        if pads:
            set_attr(conv, "pads", [0] * len(pads))  # the mapping pads instead
        _fold_into_weights(g, conv, gain_c[channel_of], offset_c[channel_of])
    g.rename_uses(source, mapping.output[0])  # before the mapping joins the graph: it alone reads the input itself
    g.nodes.insert(0, mapping)
    _record(g, mapping.output[0], [mapping], PIXEL_RANGE)
    report.add("input_as_pixels")


def pixel_quantization(model: onnx.ModelProto) -> tuple[list[str], list[str], tuple[float, float]] | None:
    """Of a graph ``input_to_pixels`` rewrote: the tensors holding pixels (the mapped input, then its channel
    copies for the stem), the fp32 mapping's nodes, and the range to quantize them on; else None."""
    meta = {p.key: p.value for p in model.metadata_props}
    if PIXELS_KEY not in meta:
        return None
    low, high = (float(v) for v in meta[RANGE_KEY].split(","))
    return meta[PIXELS_KEY].split(","), [n for n in meta.get(NODES_KEY, "").split(",") if n], (low, high)


def _record(g: Graph, tensor: str, nodes: list[onnx.NodeProto], bounds: tuple[float, float]) -> None:
    copies = [n.output[0] for n in g.nodes if n.op_type == "Gather" and n.input[0] == tensor]
    _set_metadata(g.model, PIXELS_KEY, ",".join([tensor, *copies]))
    _set_metadata(g.model, NODES_KEY, ",".join(n.name for n in nodes))
    _set_metadata(g.model, RANGE_KEY, f"{float(bounds[0])!r},{float(bounds[1])!r}")


def _plan(g: Graph, channels: int):
    """(input name, [(conv, input channel of each weight column)], the convolutions' common pads), or None when
    the input is not read by convolutions alone (directly or through a constant channel Gather)."""
    if len(g.inputs) != 1 or g.opset < 11:
        return None
    source = g.inputs[0].name
    users = g.consumers()
    convs: list[tuple[onnx.NodeProto, np.ndarray]] = []
    for reader in users.get(source, []):
        if reader.op_type == "Conv" and reader.input[0] == source:
            convs.append((reader, np.arange(channels)))
            continue
        indices = g.inits.get(reader.input[1]) if reader.op_type == "Gather" and len(reader.input) > 1 else None
        if (indices is None or attr(reader, "axis", 0) != 1 or indices.ndim != 1 or reader.input[0] != source
                or reader.output[0] in g.output_names or np.any(indices < 0) or np.any(indices >= channels)):
            return None
        after = users.get(reader.output[0], [])
        if not after or any(c.op_type != "Conv" or c.input[0] != reader.output[0] for c in after):
            return None
        convs.extend((c, indices.astype(np.int64)) for c in after)
    if not convs:
        return None
    all_pads = set()
    for conv, channel_of in convs:
        weight = g.inits.get(conv.input[1])
        if (weight is None or weight.ndim != 4 or weight.shape[1] != len(channel_of) or attr(conv, "group", 1) != 1
                or attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in g.inits)):
            return None
        all_pads.add(tuple(attr(conv, "pads", [0, 0, 0, 0])))
    if len(all_pads) != 1:
        return None
    pads = all_pads.pop()
    return source, convs, pads if any(pads) else ()


def _fold_into_weights(g: Graph, conv: onnx.NodeProto, gain: np.ndarray, offset: np.ndarray) -> None:
    weight = g.inits[conv.input[1]].astype(np.float64)
    bias = g.inits[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else \
        np.zeros(weight.shape[0])
    new_weight = weight / gain[None, :, None, None]
    new_bias = bias - (weight * (offset / gain)[None, :, None, None]).sum(axis=(1, 2, 3))
    dtype = g.inits[conv.input[1]].dtype
    weight_name = g.fresh(conv.input[1])
    g.set_init(weight_name, new_weight.astype(dtype))
    bias_name = g.fresh(conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.name}_bias")
    g.set_init(bias_name, new_bias.astype(dtype))
    conv.input[1] = weight_name
    if len(conv.input) > 2:
        conv.input[2] = bias_name
    else:
        conv.input.append(bias_name)


def _mapping_conv(g: Graph, source: str, gain: np.ndarray, offset: np.ndarray, pads: tuple[int, ...]
                  ) -> onnx.NodeProto:
    """``pixel = input * gain[c] + offset[c]`` with the padding ``pads`` (zero input: ``offset[c]``), as one fp32
    depthwise 1x1 convolution."""
    weight, bias = g.fresh(f"{source}_pixel_gain"), g.fresh(f"{source}_pixel_offset")
    g.set_init(weight, gain.astype(np.float32).reshape(-1, 1, 1, 1))
    g.set_init(bias, offset.astype(np.float32))
    out = g.fresh("pixel_input")
    return helper.make_node("Conv", [source, weight, bias], [out], name=f"{out}_Conv", group=len(gain),
                            kernel_shape=[1, 1], pads=list(pads) if pads else [0, 0, 0, 0])


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
