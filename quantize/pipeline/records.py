"""What each pipeline stage records: one dataclass per stage, saved as the stage directory's ``record.json``.

A record's saved fields are the JSON keys of ``record.json``. Fields with a default are ones an older record may
lack or that only some runs fill; a field marked :func:`variant` is left out of the file when it is None (an
imported ONNX model has no ``params_m``), and one marked :func:`run_only` describes this run (reused or not, where
the stage directory is, what the data folder skipped) and is never saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from quantize.stages.speed import Latency

Record = TypeVar("Record", bound="StageRecord")


def variant() -> Any:
    """A field only some variants of a stage have: None when absent, and then left out of ``record.json``."""
    return field(default=None, metadata={"variant": True})


def run_only(default: Any = None) -> Any:
    """A field about this run, not about the stage's result: never written to ``record.json``."""
    return field(default=default, metadata={"saved": False})


@dataclass(kw_only=True)
class StageRecord:
    """The bookkeeping every stage has; the pipeline fills it in around the stage's own fields."""

    key: str = ""                        # hash of ``inputs``: the stage directory is ``<stage>-<key>``
    inputs: dict[str, Any] = field(default_factory=dict)
    stage_seconds: float | None = None   # wall time of the stage's work when it ran
    cached: bool = run_only(False)       # reused from an earlier run
    dir: str = run_only("")

    def to_json(self) -> dict[str, Any]:
        """The contents of ``record.json``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)
                and not (f.metadata.get("variant") and getattr(self, f.name) is None)}

    @classmethod
    def from_json(cls: type[Record], data: dict[str, Any]) -> Record:
        """A record read from ``record.json``; keys this version does not know are ignored."""
        saved = {f.name for f in fields(cls) if f.metadata.get("saved", True)}
        return cls(**{name: value for name, value in data.items() if name in saved})


@dataclass(kw_only=True)
class ModelRecord(StageRecord):
    """A stage whose result is an ONNX model."""

    path: str
    sha256: str
    opset: int | None


@dataclass(kw_only=True)
class ExportRecord(ModelRecord):
    max_abs_diff: float | None           # ONNX Runtime vs PyTorch logits; None for an imported ONNX model
    seconds: float
    params_m: float | None = variant()   # these three: exported from PyTorch only
    ops_m: float | None = variant()
    ops_kind: str | None = variant()
    source: str | None = variant()       # the imported ONNX file (model.arch=onnx)


@dataclass(kw_only=True)
class OptimizeRecord(ModelRecord):
    rewrites: dict[str, int]
    seconds: float


@dataclass(kw_only=True)
class CalibrateRecord(StageRecord):
    path: str                            # ranges.json
    sha256: str
    method: str
    num_images: int
    seconds: float
    peak_rss_mb: float | None
    root: str
    num_tensors: int
    measured_tensors: int
    list: str | None = None              # the committed calibration list read, if any
    list_sha256: str | None = None
    num_images_requested: int | None = run_only()
    skipped: dict[str, Any] | None = run_only()  # files of the calibration folder that were not read, and why


@dataclass(kw_only=True)
class QuantizeRecord(ModelRecord):
    seconds: float
    fp32_path: str | None = variant()  # the graph the quantizer read, when layers stay in fp32 (else optimize's)
    float_stem: str | None = variant()  # the stem quant.float_stem kept in fp32
    ranges_path: str | None = variant()  # these two: with quant.shared_concat_ranges only
    shared_ranges: dict[str, Any] | None = variant()


@dataclass(kw_only=True)
class EvaluateRecord(StageRecord):
    num_images: int
    root: str
    fp32: dict[str, float]               # top1, top5 (percent)
    int8: dict[str, float]
    agreement_top1: float
    seconds: float
    images_per_second: float
    threads: dict[str, int]              # workers and threads per session
    fp32_predictions: str                # where the fp32 model's top-5 are kept for later int8 variants
    runtime: dict[str, str] | None = None  # name and version; records from before the choice were ONNX Runtime's
    stage_images_per_second: dict[str, float] | None = None
    minutes_for_50000: float | None = None
    fp32_reused: bool | None = None
    limit: int | None = run_only()
    skipped: dict[str, Any] | None = run_only()


@dataclass(kw_only=True)
class EqualizeRecord(ModelRecord):
    pairs: list[dict[str, Any]]
    num_pairs: int
    channels_scaled: int
    num_images: int
    seconds: float


@dataclass(kw_only=True)
class BalanceRecord(ModelRecord):
    chains: list[dict[str, Any]]
    num_chains: int
    channels: int
    num_images: int
    seconds: float


@dataclass(kw_only=True)
class RefineRecord(ModelRecord):
    num_images: int
    correction_images: int
    weight_scales: dict[str, Any] | None = variant()    # each: what the method measured, when it ran
    weight_rounding: dict[str, Any] | None = variant()
    bias_correction: dict[str, Any] | None = variant()


@dataclass(kw_only=True)
class BudgetRecord(ModelRecord):
    start_path: str                      # the int8 model the search started from (every node quantized)
    start_sha256: str
    tune_images: int
    tune_fp32_top1: float
    max_drop: float
    max_trials: int
    met: bool
    excluded: list[str]                  # nodes kept in fp32 beyond quant.nodes_to_exclude
    baseline: dict[str, Any]             # the trials (number, excluded, candidate, score, kept, seconds)
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    ranking: list[str]                   # the first 30 candidates, most damaging first
    ranking_images: int


@dataclass(kw_only=True)
class SensitivityRecord(StageRecord):
    json: str
    png: str
    output_sqnr_db: float | None
    num_images: int
    num_tensors: int
    reference: str
    worst: list[dict[str, Any]]
    most_added: list[dict[str, Any]]
    table: list[str]
    seconds: float


@dataclass(kw_only=True)
class SpeedRecord(StageRecord, Latency):
    """The latency measurement's own fields, and the int8 model's speedup over fp32 on its own."""

    int8_speedup: float


RECORDS: dict[str, type[StageRecord]] = {
    "export": ExportRecord, "optimize": OptimizeRecord, "calibrate": CalibrateRecord, "quantize": QuantizeRecord,
    "evaluate": EvaluateRecord, "equalize": EqualizeRecord, "balance": BalanceRecord, "refine": RefineRecord,
    "budget": BudgetRecord, "sensitivity": SensitivityRecord, "speed": SpeedRecord,
}
