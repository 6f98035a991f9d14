"""``python -m quantize.models.zoo``: every zoo entry's parameters and compute, counted here, next to the published table.

Parameters must match within 1% and compute within 3%; compute is counted in the convention the source publishes
(``reference.flops_kind``: ``macs`` or ``flops``, see ``quantize.models.complexity``). Exits 1 when a row is off.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from quantize.config import ModelConfig, model_entry

CONF_MODELS = Path(__file__).resolve().parents[2] / "conf" / "model"
GENERIC = {"onnx", "torchvision"}  # bring-your-own entries: nothing to count until a model is named
PARAMS_TOLERANCE = 0.01
OPS_TOLERANCE = 0.03


@dataclass
class Row:
    name: str
    source: str
    params_m: float
    ref_params_m: float | None
    ops_m: float
    ref_ops_m: float | None
    kind: str

    @staticmethod
    def _off(ours: float, ref: float | None, tolerance: float) -> bool:
        """Off by more than ``tolerance`` and by more than the rounding of the published figure (Megvii
        publishes 1.4 M parameters for 1.366 M)."""
        if ref is None:
            return False
        decimals = len(repr(float(ref)).split(".")[1].rstrip("0"))
        return abs(ours - ref) > max(tolerance * ref, 0.5 * 10 ** -decimals)

    @property
    def ok(self) -> bool:
        return not (self._off(self.params_m, self.ref_params_m, PARAMS_TOLERANCE)
                    or self._off(self.ops_m, self.ref_ops_m, OPS_TOLERANCE))


def load_entry(path: Path) -> ModelConfig:
    """The entry of conf/model/<path stem>.yaml, composed as the pipeline composes it (with its preprocessing)."""
    return OmegaConf.to_object(model_entry(Path(path).stem))


def entries(names: list[str] | None = None) -> list[ModelConfig]:
    paths = sorted(p for p in CONF_MODELS.glob("*.yaml") if p.stem not in GENERIC)
    chosen = [load_entry(p) for p in paths if not names or p.stem in names]
    unknown = set(names or []) - {p.stem for p in paths}
    if unknown:
        raise SystemExit(f"error: unknown zoo entries {', '.join(sorted(unknown))}")
    return chosen


def measure(entry: ModelConfig) -> Row:
    from quantize.models.complexity import count_ops, count_parameters  # torch: only when a row is measured
    from quantize.models.registry import build_model

    model = build_model(entry.arch, pretrained=False, num_classes=entry.num_classes)
    ref = entry.reference
    return Row(entry.name, entry.source, count_parameters(model, ref.params_kind) / 1e6, ref.params_m,
               count_ops(model, ref.flops_kind) / 1e6, ref.flops_m, ref.flops_kind)


def _delta(ours: float, ref: float | None) -> str:
    return "—" if ref is None else f"{100 * (ours - ref) / ref:+.1f}%"


def render(rows: list[Row]) -> str:
    lines = ["| model | source | params (M) | table | Δ | compute (M) | table | Δ | counted as | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.source} | {r.params_m:.3f} | {r.ref_params_m if r.ref_params_m else '—'} | "
                     f"{_delta(r.params_m, r.ref_params_m)} | {r.ops_m:.2f} | {r.ref_ops_m if r.ref_ops_m else '—'}"
                     f" | {_delta(r.ops_m, r.ref_ops_m)} | {r.kind} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantize.models.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="zoo entries (default: all of conf/model/)")
    args = parser.parse_args(argv)
    rows = [measure(e) for e in entries(args.names)]
    print(render(rows))
    print(f"\nparams within {PARAMS_TOLERANCE:.0%}, compute within {OPS_TOLERANCE:.0%} of the table; macs = "
          "conv + fc multiply-accumulates, flops = macs + bias, BatchNorm (x2), activation and pooling element ops")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
