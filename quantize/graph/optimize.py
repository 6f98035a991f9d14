"""fp32-exact graph rewrites applied before calibration and quantization.

The TorchScript exporter leaves work in the graph that ONNX Runtime's int8 path handles badly:

- shape arithmetic (``Shape -> Gather -> Div -> Cast -> Unsqueeze -> Concat -> Reshape``, ``Slice`` bounds computed
  from ``Shape``) that exists only because the batch is dynamic. It keeps every data-movement op in float between
  DequantizeLinear/QuantizeLinear pairs and stops layout optimizations. All of it is folded to constants here; a
  dimension that really is the dynamic batch becomes ``0`` (copy the input dimension) or ``-1`` in Reshape.
- ``Constant`` nodes, which the quantizer takes for activations (a ``Pad`` value got its own QuantizeLinear);
  they become initializers. ``Identity`` nodes on weights (the exporter deduplicates equal biases, for example
  the all-zero biases of a randomly initialised network, through Identity) stop ONNX Runtime from fusing
  DequantizeLinear -> Conv -> QuantizeLinear; they are removed.
- an explicit zero ``Pad`` before a ``Conv`` (TensorFlow "same" padding), which has no int8 kernel fused with the
  convolution: it is folded into the convolution's own ``pads``.
- the ShuffleNet channel shuffle followed by the split of the next unit (Reshape -> Transpose(5-D) -> Reshape -> two
  Slices): a fixed permutation of channels, which ONNX Runtime can only run in the channels-first layout, so every
  unit of the int8 model went channels-last -> first -> last through Transposes around it. ``channel_shuffle`` tracks
  where every channel comes from through the Concats, shuffles and Slices, and has each reader take its channels
  straight from the tensors that computed them: one Split per such tensor and one Concat per reader, in an order
  a convolution absorbs by permuting its weights (a depthwise convolution passes the order on to the convolutions
  after it). Split and Concat on channels run channels-last, so the int8 model keeps one layout end to end.
- grouped pointwise convolutions (ShuffleNetV1, groups = 3), which ONNX Runtime's int8 kernels run as small per-group
  GEMMs and which cannot absorb a channel order: one dense convolution with a block-diagonal weight
  (``grouped_conv``), so the V1 channel shuffle folds into its weights like V2's.
- average pools counting padding (ShuffleNetV1 shortcuts), slow as ``QLinearAveragePool``: depthwise convolutions
  with weights 1 / window (``avgpool_conv``).
- channels selected with a stride (Megvii's even/odd split), which left the dataflow pass Concats of single
  channels: the producing convolution computes its channels in the order its readers take them
  (``channel_order``).
- a spatial mean exported as ``ReduceMean`` (torchvision's ShuffleNetV2), which has no int8 kernel:
  ``GlobalAveragePool`` (``global_pool``).
- depthwise convolutions of a channel count that is not a multiple of 16, which ONNX Runtime's int8 kernels run
  at about half speed: zero channels up to the next multiple (``channel_padding``).
- the 3-channel stem convolution, whose int8 im2col is slow on 3-byte pixels: it reads a 4th, zero-weighted copy
  of an input channel (``stem_channels``; the int8 model quantizes the input before that copy).
- when the caller passes the input's normalization (``pixels``): the normalized input, which no uint8 scale holds
  exactly, mapped back to 8-bit pixel values in fp32, the first convolutions taking pixels (``pixel_input``).

Every rewrite keeps the fp32 function exactly (tests compare the rewritten and original models' outputs).
Tensor names of activations that survive are kept, so ranges computed on the rewritten graph name the same tensors.
"""

from __future__ import annotations

import logging

import onnx

from quantize.graph.avgpool_conv import avgpools_to_depthwise_convs
from quantize.graph.channel_order import reorder_conv_outputs
from quantize.graph.channel_padding import pad_depthwise_channels
from quantize.graph.channel_shuffle import rewrite_channel_dataflow, rewrite_channel_shuffles
from quantize.graph.constant_folding import fold_constants
from quantize.graph.global_pool import spatial_means_to_global_pools
from quantize.graph.grouped_conv import densify_grouped_convs
from quantize.graph.onnx_graph import Graph, Report, constants_to_initializers, remove_dead, remove_identities
from quantize.graph.pad_folding import fold_pads_into_convs
from quantize.graph.pixel_input import input_to_pixels
from quantize.graph.stem_channels import widen_stem_convs

log = logging.getLogger(__name__)

# Bumped whenever a rewrite changes which tensors exist or what they hold: calibration ranges computed on the
# graph of one version name the tensors of that version.
# 2: grouped convolutions densified, average pools as depthwise convolutions, conv outputs reordered for their
#    readers, stem convolutions widened to 4 input channels.
# 3: spatial means as global average pools.
# 4: depthwise convolutions padded with zero channels to a multiple of 16.
# 5: ... but not through a MaxPool (the stem stays as wide as it is).
VERSION = 5

# The rewrites added for issue #17, by name, so a benchmark can build the graph without them (``skip``).
ZOO_REWRITES = ("grouped_conv", "avgpool_conv", "channel_order", "stem_channels", "global_pool", "channel_padding")
# Those that add arithmetic for the int8 kernels' sake (block-diagonal weights, zero channels, a 4th input channel, a
# pool as a convolution): an fp32 graph is left without them when the speed benchmarks compare int8 with the fp32
# graph the other, layout-only rewrites give (``exact_fp32``).
INT8_KERNEL_REWRITES = ("grouped_conv", "avgpool_conv", "stem_channels", "channel_padding")


def optimize(model: onnx.ModelProto, shuffle: bool = True, skip: tuple[str, ...] | list[str] = (),
             pixels: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> tuple[onnx.ModelProto, Report]:
    """The rewritten model (a copy) and what was done. ``skip`` names rewrites of ``ZOO_REWRITES`` to leave out
    (benchmarks compare against the graph without them; the pipeline never skips). ``pixels``: the input's
    ``(gain, offset)`` per channel, ``pixel = input * gain + offset`` (``Preprocess.pixel_mapping``), for
    ``pixel_input``; None leaves the input as it is."""
    unknown = set(skip) - set(ZOO_REWRITES)
    if unknown:
        raise ValueError(f"unknown rewrites {sorted(unknown)}; skippable: {', '.join(ZOO_REWRITES)}")
    g = Graph(model)
    report = Report()
    constants_to_initializers(g, report)
    remove_identities(g, report)
    fold_constants(g, report)
    fold_pads_into_convs(g, report)
    if "grouped_conv" not in skip:
        densify_grouped_convs(g, report)  # first: the channel shuffle after it then folds into dense weights
    if "avgpool_conv" not in skip:
        avgpools_to_depthwise_convs(g, report)
    if "global_pool" not in skip:
        spatial_means_to_global_pools(g, report)
    if shuffle:
        rewrite_channel_shuffles(g, report)
        remove_dead(g)
        if "channel_order" not in skip:
            reorder_conv_outputs(g, report)
        rewrite_channel_dataflow(g, report)
    if "channel_padding" not in skip:
        pad_depthwise_channels(g, report)  # after the dataflow pass: pads the convolutions it leaves in place
    if "stem_channels" not in skip:
        widen_stem_convs(g, report)  # after the dataflow pass, which leaves its repeated channel alone anyway
    if pixels is not None:
        input_to_pixels(g, report, *pixels)  # last: it folds into the stem as the other rewrites leave it
    remove_dead(g)
    out = g.to_model()
    onnx.checker.check_model(out)
    return out, report


def exact_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 model with the rewrites that only remove work or change the layout (shape arithmetic folded, the
    channel shuffle as Splits and Concats, ...): what fp32 inference gets from this module without int8. The speed
    benchmarks time it beside the exported model, so a figure can say how much of int8's lead the rewrites give."""
    return optimize(model, skip=INT8_KERNEL_REWRITES)[0]
