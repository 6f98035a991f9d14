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
an integer: 123.675 for torchvision's red), moves into an explicit ``Pad`` of ``x`` before the mapping:
``x -> Pad(0) -> Mul(gain) -> Add(offset) -> Conv(pads 0)``. Exact in fp32. In the int8 model the mapping stays in
fp32 (a few elementwise operations on the input) and only the padding ring is rounded (to the nearest pixel level).

An input already on one pixel grid with a pixel level at zero (EfficientNet-Lite0's ``(pixel - 127) / 128``, or
raw pixels) needs no mapping, which would cost time (~2-4% of ShuffleNetV2 x1.0's int8 time at batch 1): its
range is pinned to the pixels' (-127/128 .. 1), a scale of one pixel level.

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
    nodes: list[onnx.NodeProto] = []
    tensor = source
    if pads and np.any(offset_c != 0):  # a zero offset pads pixels with 0, which the convolution's own pads do
        tensor = _append(g, nodes, "Pad", tensor, [_int64(g, f"{source}_pads", _pad_input(pads))], mode="constant")
        for conv, _ in convs:
            set_attr(conv, "pads", [0] * len(pads))
    if np.any(gain_c != 1):
        tensor = _append(g, nodes, "Mul", tensor, [_channels(g, f"{source}_pixel_gain", gain_c)])
    if np.any(offset_c != 0):
        tensor = _append(g, nodes, "Add", tensor, [_channels(g, f"{source}_pixel_offset", offset_c)])
    for conv, channel_of in convs:
        _fold_into_weights(g, conv, gain_c[channel_of], offset_c[channel_of])
    if nodes:
        g.rename_uses(source, tensor)  # before the mapping joins the graph: it alone reads the input itself
        g.nodes[0:0] = nodes
    _record(g, tensor, nodes, PIXEL_RANGE)
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


def _append(g: Graph, nodes: list[onnx.NodeProto], op: str, tensor: str, constants: list[str], **attrs
            ) -> str:
    out = g.fresh(f"pixel_input_{op.lower()}")
    nodes.append(helper.make_node(op, [tensor, *constants], [out], name=f"{out}_{op}", **attrs))
    return out


def _pad_input(conv_pads: tuple[int, ...]) -> np.ndarray:
    """ONNX Pad's amounts (every axis' begins, then ends) from a 2-D convolution's ``pads`` (t, l, b, r)."""
    top, left, bottom, right = conv_pads
    return np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64)


def _int64(g: Graph, base: str, value: np.ndarray) -> str:
    name = g.fresh(base)
    g.set_init(name, value)
    return name


def _channels(g: Graph, base: str, per_channel: np.ndarray) -> str:
    name = g.fresh(base)
    g.set_init(name, per_channel.astype(np.float32).reshape(1, -1, 1, 1))
    return name


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
