"""Where int8 loses accuracy: the SQNR of every quantized activation against the fp32 tensor of the same name.

The int8 QDQ model runs with graph optimizations disabled, so every ``DequantizeLinear`` of an activation is a
tensor we can read: the value the next node really receives after quantization (with the errors of every node
before it). The fp32 model runs on the same images with the matching tensors exposed. Per tensor only running
sums are kept (signal power, noise power, element count), so memory is one batch whatever the number of images.

- ``sqnr_db = 10 log10(sum f^2 / sum (q - f)^2)`` (infinite when the tensors are identical);
- ``added_db``: how much SQNR the node producing the tensor loses relative to the worst quantized tensor feeding
  it, i.e. the error that node itself adds (its weights, its output rounding and clipping) rather than inherits.
  A large ``added_db`` is a node worth keeping in fp32; a low ``sqnr_db`` with small ``added_db`` is a node that
  only passes on earlier damage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from quantize.core.errors import ConfigError, ModelError
from quantize.core.runtime import make_session

log = logging.getLogger(__name__)

Q_SUFFIXES = ("_QuantizeLinear_Input", "_QuantizeLinear_Output", "_DequantizeLinear_Output")


def expose(model: onnx.ModelProto, tensors: Iterable[str]) -> bytes:
    """The model serialized with ``tensors`` added as graph outputs (float, shape left open)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    return exposed.SerializeToString()


def _strip(name: str) -> str:
    for suffix in Q_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class TensorPair:
    """One quantized activation: its DequantizeLinear output in the int8 graph and its fp32 tensor."""
    fp32: str             # tensor name in the fp32 model
    int8: str             # DequantizeLinear output in the int8 model
    producer: str | None  # fp32 node writing the tensor (None for the graph input)
    op_type: str | None
    consumers: list[str]  # fp32 nodes reading it
    order: int            # position of the producer in the fp32 graph (-1: graph input)


def _fp32_tensors(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, onnx.NodeProto]], dict[str, list[str]]]:
    producers: dict[str, tuple[int, onnx.NodeProto]] = {}
    consumers: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        for out in node.output:
            producers[out] = (i, node)
        for inp in node.input:
            consumers.setdefault(inp, []).append(node.name)
    return producers, consumers


def match_activations(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> list[TensorPair]:
    """Every activation DequantizeLinear of ``int8`` (input from a QuantizeLinear, not a weight) with the fp32
    tensor it stands for, in fp32 graph order. The quantizer keeps tensor names, except that it renames a graph
    output (``logits`` -> ``logits_QuantizeLinear_Input``) and that a fused activation's output name is given to
    the node before it; both resolve to the fp32 name by stripping its suffixes."""
    producers, consumers = _fp32_tensors(fp32)
    graph_inputs = {i.name for i in fp32.graph.input}
    q_input = {n.output[0]: n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    for node in int8.graph.node:  # a Gather of a quantized input (graph.stem_channels) stands for its own output
        if node.op_type == "Gather" and node.input[0] in q_input:
            q_input[node.output[0]] = node.output[0]
    pairs: dict[str, TensorPair] = {}
    for node in int8.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in q_input:
            continue
        dq_out = node.output[0]
        candidates = [q_input[node.input[0]], _strip(q_input[node.input[0]]), _strip(dq_out)]
        name = next((c for c in candidates if c in producers or c in graph_inputs), None)
        if name is None or name in pairs:  # an unknown tensor, or a second DQ of the same tensor
            continue
        order, producer = producers.get(name, (-1, None))
        pairs[name] = TensorPair(name, dq_out, producer.name if producer is not None else None,
                                 producer.op_type if producer is not None else None, consumers.get(name, []), order)
    return sorted(pairs.values(), key=lambda p: (p.order, p.fp32))


@dataclass
class TensorError:
    tensor: str
    int8_tensor: str
    producer: str | None
    op_type: str | None
    consumers: list[str]
    order: int
    signal: float = 0.0   # sum of fp32 squares
    noise: float = 0.0    # sum of squared int8 - fp32 differences
    count: int = 0        # elements seen
    sqnr_db: float = math.inf
    added_db: float = 0.0  # SQNR lost at this tensor relative to its worst quantized input (>= 0 means added)
    inputs: list[str] = field(default_factory=list)  # quantized fp32 tensors feeding the producer

    def finish(self) -> None:
        if self.noise > 0:
            self.sqnr_db = 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf
        else:
            self.sqnr_db = math.inf

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        for key in ("sqnr_db", "added_db"):  # JSON has no infinity: null means "no error at all"
            if not math.isfinite(row[key]):
                row[key] = None
        return row


@dataclass
class Sensitivity:
    tensors: list[TensorError]        # graph order
    output_sqnr_db: float             # the model output (logits) against fp32
    num_images: int
    seconds: float

    def ranked(self) -> list[TensorError]:
        """Worst first: lowest SQNR, ties (and infinities) by the error the node adds."""
        return sorted(self.tensors, key=lambda t: (t.sqnr_db, -t.added_db, t.order))

    def by_added(self) -> list[TensorError]:
        """The nodes that add the most error themselves first."""
        return sorted((t for t in self.tensors if t.producer), key=lambda t: (-t.added_db, t.sqnr_db, t.order))

    def as_json(self) -> dict[str, Any]:
        return {"output_sqnr_db": self.output_sqnr_db if math.isfinite(self.output_sqnr_db) else None,
                "num_images": self.num_images, "seconds": self.seconds,
                "tensors": [t.as_json() for t in self.tensors]}


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _power(values: np.ndarray) -> float:
    flat = values.reshape(-1).astype(np.float64, copy=False)
    return float(np.dot(flat, flat))


def _fp32_channels(q: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``q`` with the channels the fp32 tensor has: ``graph.channel_padding`` appends zero channels (axis 1) to
    some tensors of the graph the int8 model is built from, which an fp32 model without that rewrite lacks."""
    if q.shape == shape:
        return q
    if (q.ndim == len(shape) > 1 and q.shape[0] == shape[0] and q.shape[2:] == shape[2:] and q.shape[1] > shape[1]
            and not q[:, shape[1]:].any()):
        return q[:, :shape[1]]
    raise ModelError(f"tensor {name}: fp32 shape {shape} but int8 shape {q.shape}")


def analyze(fp32_path: Path, int8_path: Path, batches: Iterable[np.ndarray], threads: int = 0) -> Sensitivity:
    """SQNR of every quantized activation of ``int8_path`` against ``fp32_path`` over ``batches`` (NCHW float32)."""
    fp32 = onnx.load(str(fp32_path))
    int8 = onnx.load(str(int8_path))
    pairs = match_activations(fp32, int8)
    if not pairs:
        raise ModelError(f"{int8_path} has no quantized activations (QuantizeLinear -> DequantizeLinear)")
    fp32_out, int8_out = fp32.graph.output[0].name, int8.graph.output[0].name
    f_names = [p.fp32 for p in pairs]
    q_names = [p.int8 for p in pairs]
    f_session = make_session(expose(fp32, f_names), threads=threads, level="disable")
    q_session = make_session(expose(int8, q_names), threads=threads, level="disable")
    producers, _ = _fp32_tensors(fp32)
    quantized = {p.fp32 for p in pairs}
    del fp32, int8
    errors = [TensorError(p.fp32, p.int8, p.producer, p.op_type, p.consumers, p.order) for p in pairs]
    for e in errors:  # quantized tensors feeding this tensor's producer, looking through unquantized ops
        e.inputs = _quantized_inputs(e.tensor, producers, quantized)
    f_feed, q_feed = f_session.get_inputs()[0].name, q_session.get_inputs()[0].name
    out_signal = out_noise = 0.0
    count = 0
    started = time.perf_counter()
    for batch in batches:
        f_values = f_session.run([fp32_out, *f_names], {f_feed: batch})
        q_values = q_session.run([int8_out, *q_names], {q_feed: batch})
        out_signal += _power(f_values[0])
        out_noise += _power(q_values[0] - f_values[0])
        for e, f, q in zip(errors, f_values[1:], q_values[1:]):
            q = _fp32_channels(q, f.shape, e.tensor)
            e.signal += _power(f)
            e.noise += _power(q - f)
            e.count += f.size
        del f_values, q_values
        count += len(batch)
    if count == 0:
        raise ConfigError("sensitivity analysis received no images")
    by_name = {e.tensor: e for e in errors}
    for e in errors:
        e.finish()
    for e in errors:
        feeding = [by_name[i].sqnr_db for i in e.inputs if i in by_name]
        worst_in = min(feeding) if feeding else math.inf
        if math.isinf(worst_in) and math.isinf(e.sqnr_db):
            e.added_db = 0.0
        else:
            e.added_db = worst_in - e.sqnr_db
    result = Sensitivity(errors, sqnr_db(out_signal, out_noise), count, time.perf_counter() - started)
    worst = result.ranked()[0]
    log.info("sensitivity: %d quantized tensors on %d images in %.1f s; output SQNR %.1f dB; worst %s (%s) %.1f dB",
             len(errors), count, result.seconds, result.output_sqnr_db, worst.tensor, worst.producer, worst.sqnr_db)
    return result


def _quantized_inputs(tensor: str, producers: dict[str, tuple[int, onnx.NodeProto]], quantized: set[str],
                      limit: int = 64) -> list[str]:
    """The nearest quantized tensors upstream of ``tensor``'s producer (through ops that were left unquantized)."""
    found: list[str] = []
    seen: set[str] = set()
    if tensor not in producers:
        return found
    stack = [i for i in producers[tensor][1].input]
    while stack and len(seen) < limit:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in quantized:
            found.append(name)
        elif name in producers:
            stack.extend(producers[name][1].input)
    return sorted(found)


def render_table(result: Sensitivity, top: int = 15) -> list[str]:
    """Markdown lines: the worst tensors by SQNR, and the nodes that add the most error themselves."""
    def fmt(value: float) -> str:
        return "inf" if value == math.inf else f"{value:.1f}"

    lines = [f"Output (logits) SQNR {fmt(result.output_sqnr_db)} dB over {result.num_images} images; "
             f"{len(result.tensors)} quantized activations.", "",
             "| rank | tensor | producer (op) | SQNR dB | added dB |", "|---|---|---|---|---|"]
    for rank, t in enumerate(result.ranked()[:top], 1):
        lines.append(f"| {rank} | `{t.tensor}` | `{t.producer}` ({t.op_type}) | {fmt(t.sqnr_db)} | "
                     f"{fmt(t.added_db)} |")
    lines += ["", "Nodes adding the most error themselves (SQNR lost between their quantized inputs and output):", "",
              "| rank | node (op) | added dB | output SQNR dB |", "|---|---|---|---|"]
    for rank, t in enumerate(result.by_added()[:top], 1):
        lines.append(f"| {rank} | `{t.producer}` ({t.op_type}) | {fmt(t.added_db)} | {fmt(t.sqnr_db)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m quantize.accuracy.sensitivity FP32.onnx INT8.onnx --data DIR [--images 32] [--out DIR]``: the sensitivity
    report of any fp32/int8 QDQ pair (e.g. one made by another tool), as sensitivity.{json,md,png}."""
    import argparse
    import sys

    from quantize.core.artifacts import write_json, write_text
    from quantize.data.samples import balanced_subset, iter_batches, list_samples
    from quantize.core.errors import QuantizeError
    from quantize.pipeline.plots import sqnr_bars
    from quantize.data.preprocess import Preprocess

    parser = argparse.ArgumentParser(prog="python -m quantize.accuracy.sensitivity", description=main.__doc__.split("\n")[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="ImageNet-style folder (synset folders or flat)")
    parser.add_argument("--images", type=int, default=32, help="class-balanced images to run (default 32)")
    parser.add_argument("--top", type=int, default=15, help="rows of the Markdown tables")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for sensitivity.{json,md,png}")
    parser.add_argument("--preprocess", metavar="ENTRY",
                        help="feed the images as zoo entry ENTRY is fed (default: the standard ImageNet transform)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in (args.fp32, args.int8) if not p.is_file()]
    if missing:
        print(f"error: no such model: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        p = Preprocess()
        if args.preprocess:
            from quantize.config import model_entry

            p = Preprocess.from_config(model_entry(args.preprocess).preprocess)
        samples = balanced_subset(list_samples(args.data), args.images)
        batches = (images for images, _ in iter_batches(samples, 8, p))
        result = analyze(args.fp32, args.int8, batches)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_json(args.out / "sensitivity.json", result.as_json())
    write_text(args.out / "sensitivity.md", "\n".join(render_table(result, args.top)) + "\n")
    sqnr_bars(args.out / "sensitivity.png", [t.tensor for t in result.tensors], [t.sqnr_db for t in result.tensors],
              f"{args.int8.name}: SQNR of each quantized activation vs fp32 ({result.num_images} images)")
    print((args.out / "sensitivity.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
