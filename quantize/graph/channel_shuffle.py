"""Channel shuffles (ShuffleNet) as constant channel permutations.

A chain of Reshape/Transpose ops that starts and ends with the same NCHW shape and only moves channels is a fixed
permutation ``out[:, c] = x[:, perm[c]]``. It is recognised by running the chain on an index tensor, whatever
formulation the exporter chose, and replaced:

- a Slice (or Split) of the permuted tensor along channels becomes one ``Gather`` of ``x`` with the matching part
  of ``perm``;
- a 1x1-or-larger, non-grouped Conv reading the permuted tensor reads ``x`` instead, with its weight's input
  channels permuted the same way;
- any other reader gets ``Gather(x, perm)``.

Gathers on channels still force ONNX Runtime's int8 graph back to channels-first around them, so a second pass,
``rewrite_channel_dataflow``, follows every channel through Concat/Gather/Slice/Split back to the tensor that
computed it, cuts each such tensor once with a Split at every boundary a reader needs, and gives each reader a
Concat of those chunks: in its logical order, or, for a convolution, grouped by source in channel order with the
convolution's weights permuted to match (a depthwise convolution permutes its own weights and passes the order on
to the convolutions that read it). For ShuffleNetV2 that is one Split and one Concat per unit, no Transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from quantize.graph.onnx_graph import Graph, Report, attr


def _chain_from(start: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]], g: Graph
                ) -> list[onnx.NodeProto] | None:
    """Reshape/Transpose nodes from ``start`` on, each the only reader of the previous one's output."""
    chain = [start]
    node = start
    while True:
        readers = users.get(node.output[0], [])
        if node.output[0] in g.output_names or len(readers) != 1 or readers[0].op_type not in ("Reshape", "Transpose"):
            return chain
        node = readers[0]
        chain.append(node)


def _simulate(chain: list[onnx.NodeProto], shape: list[int], g: Graph) -> list[np.ndarray]:
    """The index tensor after each node of the chain (batch 1)."""
    x = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    results = []
    for node in chain:
        if node.op_type == "Reshape":
            target = g.inits.get(node.input[1])
            if target is None:
                raise ValueError("non-constant Reshape")
            target = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(target)]
            x = x.reshape(target)
        else:
            x = np.transpose(x, attr(node, "perm"))
        results.append(x)
    return results


def _as_channel_permutation(result: np.ndarray, shape: list[int]) -> np.ndarray | None:
    if list(result.shape) != list(shape):
        return None
    _, channels, height, width = shape
    plane = height * width
    perm = result[0, :, 0, 0] // plane
    expected = perm[:, None, None] * plane + np.arange(plane).reshape(height, width)
    if not np.array_equal(result[0], expected) or sorted(perm.tolist()) != list(range(channels)):
        return None
    return perm


def rewrite_channel_shuffles(g: Graph, report: Report) -> None:
    shapes = g.shapes()
    users = g.consumers()
    removed: set[int] = set()
    added: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []  # (insert before, nodes)
    for node in list(g.nodes):
        if node.op_type != "Reshape" or id(node) in removed:
            continue
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            continue
        chain = _chain_from(node, users, g)
        try:
            results = _simulate(chain, [1] + shape[1:], g)
        except ValueError:
            continue
        # the longest prefix of the chain that is a channel permutation
        best = None
        for length in range(len(chain), 1, -1):
            perm = _as_channel_permutation(results[length - 1], [1] + shape[1:])
            if perm is not None:
                best = (length, perm)
                break
        if best is None:
            continue
        length, perm = best
        if np.array_equal(perm, np.arange(len(perm))):
            continue
        source = node.input[0]
        last = chain[length - 1]
        permuted = last.output[0]
        if permuted in g.output_names:
            continue
        new_nodes: list[onnx.NodeProto] = []
        perm_name = g.fresh(f"{permuted}_perm")
        for reader in users.get(permuted, []):
            rewritten = _rewrite_reader(reader, permuted, source, perm, g, report)
            if rewritten is None:
                if perm_name not in g.inits:
                    g.set_init(perm_name, perm.astype(np.int64))
                gathered = g.fresh(permuted)
                new_nodes.append(helper.make_node("Gather", [source, perm_name], [gathered], axis=1,
                                                  name=gathered + "_Gather"))
                for i, name in enumerate(reader.input):
                    if name == permuted:
                        reader.input[i] = gathered
                report.add("shuffle_gather_full")
            else:
                removed.add(id(reader))
                new_nodes.extend(rewritten)
        for n in chain[:length]:
            removed.add(id(n))
        added.append((last, new_nodes))
        report.add("channel_shuffle_rewritten")
    if not added:
        return
    position = {id(n): i for i, n in enumerate(g.nodes)}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    for anchor, nodes in added:
        inserts.setdefault(position[id(anchor)], []).extend(nodes)
    out = []
    for i, n in enumerate(g.nodes):
        if id(n) not in removed:
            out.append(n)
        out.extend(inserts.get(i, []))
    g.nodes = _toposort(out, g)


def _rewrite_reader(reader: onnx.NodeProto, permuted: str, source: str, perm: np.ndarray, g: Graph,
                    report: Report) -> list[onnx.NodeProto] | None:
    """Replacement nodes for one reader of the permuted tensor (reading ``source`` instead), or None."""
    channels = len(perm)
    if reader.op_type == "Slice" and reader.input[0] == permuted:
        bounds = [g.inits.get(n) if n else None for n in reader.input[1:]]
        if any(b is None for b in bounds[:2]) or (len(bounds) > 2 and reader.input[3] and bounds[2] is None):
            return None
        starts, ends = bounds[0].reshape(-1), bounds[1].reshape(-1)
        axes = bounds[2].reshape(-1) if len(bounds) > 2 and bounds[2] is not None else np.arange(len(starts))
        steps = bounds[3].reshape(-1) if len(bounds) > 3 and bounds[3] is not None else np.ones(len(starts), int)
        if len(starts) != 1 or int(axes[0]) not in (1, -3) or int(steps[0]) != 1:
            return None
        start, end = (int(np.clip(v if v >= 0 else v + channels, 0, channels)) for v in (starts[0], ends[0]))
        return [_gather(reader.output[0], source, perm[start:end], g, report)]
    if reader.op_type == "Split" and reader.input[0] == permuted and attr(reader, "axis", 0) in (1, -3):
        sizes = attr(reader, "split")
        if sizes is None and len(reader.input) > 1 and reader.input[1]:
            sizes = g.inits.get(reader.input[1])
        if sizes is None:
            if channels % len(reader.output):
                return None
            sizes = [channels // len(reader.output)] * len(reader.output)
        offsets = np.concatenate([[0], np.cumsum([int(s) for s in sizes])])
        return [_gather(out, source, perm[offsets[i]:offsets[i + 1]], g, report)
                for i, out in enumerate(reader.output) if out]
    if reader.op_type == "Conv" and reader.input[0] == permuted and attr(reader, "group", 1) == 1:
        weight = g.inits.get(reader.input[1])
        if weight is None or weight.shape[1] != channels:
            return None
        folded = np.empty_like(weight)
        folded[:, perm] = weight  # out = conv(x[perm], W) = conv(x, W') with W'[:, perm[c]] = W[:, c]
        name = g.fresh(reader.input[1])
        g.set_init(name, folded)
        conv = onnx.NodeProto()
        conv.CopyFrom(reader)
        conv.input[0] = source
        conv.input[1] = name
        report.add("shuffle_folded_into_conv")
        return [conv]
    return None


def _gather(output: str, source: str, indices: np.ndarray, g: Graph, report: Report) -> onnx.NodeProto:
    name = g.fresh(f"{output}_indices")
    g.set_init(name, indices.astype(np.int64))
    report.add("shuffle_split_as_gather")
    return helper.make_node("Gather", [source, name], [output], axis=1, name=output + "_Gather")


def _toposort(nodes: list[onnx.NodeProto], g: Graph) -> list[onnx.NodeProto]:
    available = set(g.inits) | {i.name for i in g.inputs} | {""}
    pending = list(nodes)
    ordered = []
    while pending:
        progressed = []
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                progressed.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if not progressed:
            raise ValueError("graph rewrite produced a cycle or a dangling input")
        ordered.extend(progressed)
        pending = rest
    return ordered


# --- channel dataflow: Concat / Gather / Slice / Split along channels as Splits and Concats of source chunks ----

_MOVES = ("Concat", "Gather", "Slice", "Split")


def _channel_axis_ok(axis: int | None, rank: int = 4) -> bool:
    return axis is not None and axis % rank == 1


def _movement_provenance(node: onnx.NodeProto, g: Graph, prov: dict[str, list[tuple[str, int]]],
                         channels: dict[str, int]) -> list[list[tuple[str, int]]] | None:
    """The channel provenance of each output of a channel-moving node, or None when it is not one. A move that
    repeats a channel (``stem_channels``' Gather) is not followed: no convolution absorbs a repeated channel."""
    result = _provenance(node, g, prov, channels)
    if result is None or any(len(set(part)) != len(part) for part in result):
        return None
    return result


def _provenance(node: onnx.NodeProto, g: Graph, prov: dict[str, list[tuple[str, int]]],
                channels: dict[str, int]) -> list[list[tuple[str, int]]] | None:

    def source(name: str) -> list[tuple[str, int]] | None:
        if name in prov:
            return prov[name]
        count = channels.get(name)
        return None if count is None else [(name, c) for c in range(count)]

    if node.op_type == "Concat" and _channel_axis_ok(attr(node, "axis")):
        parts = [source(n) for n in node.input]
        if any(p is None for p in parts):
            return None
        return [[item for part in parts for item in part]]
    data = source(node.input[0]) if node.input else None
    if data is None:
        return None
    if node.op_type == "Gather" and _channel_axis_ok(attr(node, "axis", 0)):
        indices = g.inits.get(node.input[1])
        if indices is None or indices.ndim != 1:
            return None
        return [[data[int(i)] for i in indices]]
    if node.op_type == "Slice" and len(node.input) >= 4:
        bounds = [g.inits.get(n) for n in node.input[1:4]]
        steps = g.inits.get(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
        if any(b is None for b in bounds) or steps is None or bounds[0].size != 1:
            return None
        step = int(steps.reshape(-1)[0])
        if not _channel_axis_ok(int(bounds[2].reshape(-1)[0])) or step < 1:
            return None
        n = len(data)
        start, end = (int(np.clip(v if v >= 0 else v + n, 0, n)) for v in (bounds[0].item(), bounds[1].item()))
        return [data[start:end:step]]  # a strided slice (x[:, 0::2], Megvii's shuffle) is a channel selection too
    if node.op_type == "Split" and _channel_axis_ok(attr(node, "axis", 0)):
        sizes = attr(node, "split")
        if sizes is None and len(node.input) > 1 and node.input[1]:
            sizes = g.inits.get(node.input[1])
        if sizes is None:
            if len(data) % len(node.output):
                return None
            sizes = [len(data) // len(node.output)] * len(node.output)
        offsets = np.concatenate([[0], np.cumsum([int(s) for s in sizes])])
        return [data[offsets[i]:offsets[i + 1]] for i in range(len(node.output))]
    return None


def channel_runs(order: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """Maximal (source, start, stop) runs of consecutive channels of one source."""
    runs: list[list] = []
    for src, ch in order:
        if runs and runs[-1][0] == src and runs[-1][2] == ch:
            runs[-1][2] += 1
        else:
            runs.append([src, ch, ch + 1])
    return [tuple(r) for r in runs]


@dataclass
class ChannelReads:
    """Where every channel read through channel moves (Concat/Gather/Slice/Split on axis 1) comes from.

    ``provenance[t]`` lists, for each channel of the moved tensor ``t``, the (source tensor, channel) that computed
    it; ``reads`` lists each reader of a moved tensor as (node, input index, channel order it will read, kind), with
    kind ``absorb`` (a convolution that takes any channel order in its weights), ``absorb_dw`` (a depthwise
    convolution that passes the order on to the convolutions after it) or ``logical``; a moved graph output is
    (None, its name, order, ``logical``). Absorbing readers read their channels grouped by source, in channel order.
    """
    channels: dict[str, int]
    provenance: dict[str, list[tuple[str, int]]]
    moves: set[int]
    reads: list[tuple[onnx.NodeProto | None, int | str, list[tuple[str, int]], str]]
    users: dict[str, list[onnx.NodeProto]]
    rank: dict[str, int]


def channel_reads(g: Graph) -> ChannelReads:
    shapes = g.shapes()
    channels = {name: dims[1] for name, dims in shapes.items()
                if len(dims) == 4 and isinstance(dims[1], int)}
    users = g.consumers()
    prov: dict[str, list[tuple[str, int]]] = {}
    moves: set[int] = set()
    for node in g.nodes:
        if node.op_type in _MOVES:
            result = _movement_provenance(node, g, prov, channels)
            if result is not None:
                for out, p in zip(node.output, result):
                    prov[out] = p
                moves.add(id(node))
    rank = {}
    for i, node in enumerate(g.nodes):
        for out in node.output:
            rank[out] = i
    for inp in g.inputs:
        rank[inp.name] = -1
    plans = []
    for node in g.nodes:
        if id(node) in moves:
            continue
        for i, name in enumerate(node.input):
            if name not in prov:
                continue
            order = prov[name]
            kind = "logical"
            if i == 0 and node.op_type == "Conv" and node.input[1] in g.inits:
                group = attr(node, "group", 1)
                if group == 1:
                    kind = "absorb"
                elif _absorbing_depthwise(node, len(order), g, users):
                    kind = "absorb_dw"
            if kind != "logical":
                order = sorted(order, key=lambda item: (rank.get(item[0], 0), item[0], item[1]))
            plans.append((node, i, order, kind))
    for name in g.output_names:
        if name in prov:
            plans.append((None, name, prov[name], "logical"))
    return ChannelReads(channels, prov, moves, plans, users, rank)


def rewrite_channel_dataflow(g: Graph, report: Report) -> None:
    """Readers of channel-moved tensors read Concats of chunks of the tensors that computed them, cut once per
    source by a Split; convolutions absorb any channel order in their weights, so they read chunks grouped by
    source in channel order (the fewest cuts)."""
    reads = channel_reads(g)
    if not reads.provenance:
        return
    channels, prov, plans, users, rank = reads.channels, reads.provenance, reads.reads, reads.users, reads.rank

    # Cut every source once at all run boundaries.
    cuts: dict[str, set[int]] = {}
    for _, _, order, _ in plans:
        for src, start, stop in channel_runs(order):
            cuts.setdefault(src, {0, channels[src]}).update((start, stop))
    chunks: dict[tuple[str, int], str] = {}  # (source, start) -> chunk tensor
    chunk_end: dict[tuple[str, int], int] = {}
    new_nodes: list[tuple[str, onnx.NodeProto]] = []  # (tensor after which to place, node)
    for src, points in cuts.items():
        bounds = sorted(points)
        if len(bounds) == 2:
            chunks[(src, 0)] = src
            chunk_end[(src, 0)] = bounds[1]
            continue
        names = [g.fresh(f"{src}_chunk") for _ in bounds[:-1]]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if g.opset >= 13:
            sizes_name = g.fresh(f"{src}_split")
            g.set_init(sizes_name, np.array(sizes, dtype=np.int64))
            split = helper.make_node("Split", [src, sizes_name], names, axis=1, name=names[0] + "_Split")
        else:
            split = helper.make_node("Split", [src], names, axis=1, split=sizes, name=names[0] + "_Split")
        new_nodes.append((src, split))
        report.add("channel_split")
        for a, b, name in zip(bounds, bounds[1:], names):
            chunks[(src, a)] = name
            chunk_end[(src, a)] = b

    built: dict[tuple, str] = {}

    def build(order: list[tuple[str, int]], name: str | None = None) -> str:
        pieces = []
        for src, start, stop in channel_runs(order):
            at = start
            while at < stop:
                pieces.append(chunks[(src, at)])
                at = chunk_end[(src, at)]
        key = tuple(pieces)
        if name is None and key in built:
            return built[key]
        if len(pieces) == 1 and name is None:
            built[key] = pieces[0]
            return pieces[0]
        out = name or g.fresh("channels")
        new_nodes.append((max(pieces, key=lambda p: rank.get(p, -1)) if False else pieces[-1],
                          helper.make_node("Concat", pieces, [out], axis=1, name=out + "_Concat")))
        report.add("channel_concat")
        if name is None:
            built[key] = out
        return out

    for node, i, order, kind in plans:
        if node is None:  # a moved tensor that is a graph output keeps its name
            producer = next(n for n in g.nodes if i in n.output)
            producer.output[list(producer.output).index(i)] = g.fresh(i)
            build(order, name=i)
            continue
        logical = prov[node.input[i]]
        node.input[i] = build(order)
        if kind == "logical":
            continue
        position = {item: p for p, item in enumerate(order)}
        new_index = np.array([position[item] for item in logical])  # logical channel j sits at new_index[j]
        if kind == "absorb":
            _permute_input_channels(node, new_index, g)
            report.add("channel_order_absorbed_by_conv")
        else:
            _permute_depthwise(node, new_index, g)
            for reader in users.get(node.output[0], []):
                _permute_input_channels(reader, new_index, g)
            report.add("channel_order_absorbed_by_depthwise")
    g.nodes = _toposort(g.nodes + [n for _, n in new_nodes], g)


def _absorbing_depthwise(node: onnx.NodeProto, channels: int, g: Graph,
                         users: dict[str, list[onnx.NodeProto]]) -> bool:
    weight = g.inits.get(node.input[1])
    if weight is None or attr(node, "group", 1) != channels or weight.shape[0] != channels or weight.shape[1] != 1:
        return False
    if node.output[0] in g.output_names or (len(node.input) > 2 and node.input[2] and node.input[2] not in g.inits):
        return False
    readers = users.get(node.output[0], [])
    return bool(readers) and all(r.op_type == "Conv" and r.input[0] == node.output[0] and attr(r, "group", 1) == 1
                                 and r.input[1] in g.inits and node.output[0] not in r.input[1:] for r in readers)


def _permute_input_channels(conv: onnx.NodeProto, new_index: np.ndarray, g: Graph) -> None:
    weight = g.inits[conv.input[1]]
    permuted = np.empty_like(weight)
    permuted[:, new_index] = weight
    name = g.fresh(conv.input[1])
    g.set_init(name, permuted)
    conv.input[1] = name


def _permute_depthwise(conv: onnx.NodeProto, new_index: np.ndarray, g: Graph) -> None:
    weight = g.inits[conv.input[1]]
    permuted = np.empty_like(weight)
    permuted[new_index] = weight
    name = g.fresh(conv.input[1])
    g.set_init(name, permuted)
    conv.input[1] = name
    if len(conv.input) > 2 and conv.input[2]:
        bias = g.inits[conv.input[2]]
        permuted_bias = np.empty_like(bias)
        permuted_bias[new_index] = bias
        bias_name = g.fresh(conv.input[2])
        g.set_init(bias_name, permuted_bias)
        conv.input[2] = bias_name
