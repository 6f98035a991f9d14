"""The pipeline's accuracy stages: equalize, balance, refine (weight scales, GPTQ, bias correction), budget,
sensitivity, speed.

Run by the pipeline through the :class:`StageHost` interface declared here (``stage``: a directory keyed by
everything the stage reads, ``record.json`` written last), so each is cached like the others and can be named in
``stages=``. The default recipe (``quant=u8s8_fidelity``) runs ``balance`` and ``refine``; the others run when asked:

- ``equalize`` (``quant.equalize``): an equalized fp32 copy that calibration and quantization read instead of the
  export;
- ``balance`` (``quant.balance``): a range-balanced fp32 copy (``accuracy/range_balance.py``), read the same way;
- ``refine`` (``quant.weight_scales=search``, ``quant.weight_rounding=gptq``, ``quant.bias_correction``): the
  quantized model with searched weight scales, GPTQ-rounded weights and corrected biases;
- ``budget`` (``quant.max_drop``): nodes kept in fp32 until the drop on a tuning subset fits;
- ``sensitivity`` (``analysis.sensitivity``): per-tensor SQNR of the final int8 model, a table and a PNG;
- ``speed`` (``analysis.speed``): int8 / fp32 latency, measured once per model pair and machine.

The fp32 model that evaluation compares against is always the export.
"""

from __future__ import annotations

import logging
import math
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import onnx

from quantize.accuracy.budget import TuneSet, rank_candidates, search
from quantize.core.artifacts import file_sha256, write_json
from quantize.data.samples import Sample, balanced_subset
from quantize.accuracy.equalize import equalize
from quantize.accuracy.range_balance import balance
from quantize.config import Config, EvalConfig
from quantize.core.errors import ConfigError
from quantize.data.preprocess import Preprocess
from quantize.pipeline.plots import sqnr_bars
from quantize.pipeline.records import (BalanceRecord, BudgetRecord, EqualizeRecord, ModelRecord, RefineRecord,
                                       SensitivityRecord, SpeedRecord, StageRecord)
from quantize.accuracy.refine import refine, transfer
from quantize.accuracy.sensitivity import analyze, render_table
from quantize.stages.speed import cpu_name, measure
from quantize.stages.static_quant import quantize_model

log = logging.getLogger(__name__)

# Bumped when a stage's algorithm changes what it writes, so cached results of an older version are not reused.
VERSIONS = {"equalize": 1, "balance": 1, "refine": 4, "budget": 4, "sensitivity": 2, "speed": 4}


class StageHost(Protocol):
    """What the accuracy stages need from the pipeline that runs them."""

    cfg: Config
    records: dict[str, StageRecord]
    preprocess: Preprocess

    def get(self, stage: str) -> StageRecord: ...

    def stage(self, stage: str, inputs: dict[str, Any], work: Callable[[Path], StageRecord]) -> StageRecord: ...

    def samples(self, section: EvalConfig, limit: int | None, seed: int, asked: str | None = None
                ) -> tuple[list[Sample], Path]: ...

    def images_key(self, samples: list[Sample], root: Path) -> str: ...

    def calibration_samples(self) -> tuple[list[Sample], Path, dict[str, Any]]: ...

    def batches(self, samples: list[Sample], root: Path, batch_size: int, desc: str | None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class AccuracyStages:
    def __init__(self, host: StageHost):
        self.host = host
        self.cfg = host.cfg
        self.records = host.records
        self.preprocess = host.preprocess

    # --- switches ---------------------------------------------------------------------------------------------
    def _refining(self) -> bool:
        q = self.cfg.quant
        return q.weight_rounding != "nearest" or bool(q.bias_correction) or q.weight_scales != "max"

    def _budgeted(self) -> bool:
        return self.cfg.quant.max_drop is not None

    # --- which models the stages read -------------------------------------------------------------------------
    def fp32_source(self) -> ModelRecord:
        """The fp32 record the graph rewrites read: the export, or its equalized or range-balanced copy."""
        q = self.cfg.quant
        if q.equalize and q.balance:
            raise ConfigError("quant.equalize and quant.balance both rescale the fp32 model's channels: choose one")
        if q.balance:
            return self.host.get("balance")
        return self.host.get("equalize" if q.equalize else "export")

    def final_int8(self) -> ModelRecord:
        """The int8 record evaluated and reported: after the budget, else after refinement, else as quantized."""
        if self._budgeted():
            return self.host.get("budget")
        if self._refining():
            return self.host.get("refine")
        return self.host.get("quantize")

    def quantizer_input(self) -> Path:
        """The fp32 graph the int8 model was quantized from, layer for layer: the optimize stage's, or with layers
        kept in fp32 the quantize stage's copy of what the quantizer read (padded, initializers copied)."""
        quantized = self.host.get("quantize")
        return Path(quantized.fp32_path or self.host.get("optimize").path)

    def reference_key(self) -> dict[str, str]:
        """Cache-key entry of ``quantizer_input`` when it is the quantize stage's copy (empty otherwise, so keys of
        runs without layers kept in fp32 stay as they were)."""
        quantized = self.host.get("quantize")
        return {"reference_of": quantized.key} if quantized.fp32_path else {}

    def quant_options(self, extra_excluded: list[str] | None = None) -> dict[str, Any]:
        q = self.cfg.quant
        return dict(fmt=q.format, activation_type=q.activation_type, weight_type=q.weight_type,
                    per_channel=q.per_channel, reduce_range=q.reduce_range, opset=q.opset,
                    op_types=list(q.op_types) if q.op_types else None,
                    nodes_to_exclude=list(q.nodes_to_exclude) + list(extra_excluded or []),
                    **({"float_stem": True} if q.float_stem else {}))  # keys cached before the option stay valid

    # --- images ----------------------------------------------------------------------------------------------
    def _calibration_subset(self, n: int | None) -> tuple[list[Sample], Path]:
        samples, root, _ = self.host.calibration_samples()
        if n is not None and n < len(samples):
            samples = balanced_subset(samples, n, seed=self.cfg.calib.seed)
        return samples, root

    def tune_samples(self) -> tuple[list[Sample], Path]:
        """The budget's tuning subset: class-balanced from the calibration images."""
        n = self.cfg.quant.tune_images
        if n < 1:
            raise ConfigError(f"quant.tune_images={n} must be >= 1")
        return self._calibration_subset(n)

    def eval_samples(self) -> tuple[list[Sample], Path]:
        """The evaluation images; with a budget, without the tuning subset (disjoint by file)."""
        e = self.cfg.eval
        samples, root = self.host.samples(e, e.limit, e.seed, asked="eval.limit")
        if not self._budgeted():
            return samples, root
        tuned = {s.path.resolve() for s in self.tune_samples()[0]}
        kept = [s for s in samples if s.path.resolve() not in tuned]
        if not kept:
            raise ConfigError(f"every evaluation image is in the budget's tuning subset (quant.tune_images="
                              f"{self.cfg.quant.tune_images}); lower it or evaluate on other images (eval.root)")
        if len(kept) < len(samples):
            log.info("evaluate: %d of %d images are in the budget's tuning subset and are left out",
                     len(samples) - len(kept), len(samples))
        return kept, root

    def _image_batches(self, samples: list[Sample], root: Path, desc: str | None = None, batch_size: int | None = None):
        size = batch_size or self.cfg.quant.batch_size
        return (images for images, _ in self.host.batches(samples, root, size, desc=desc))

    # --- stages ----------------------------------------------------------------------------------------------
    def equalize(self) -> EqualizeRecord:
        exported = self.host.get("export")
        samples, root = self._calibration_subset(None)
        inputs = {"model_sha256": exported.sha256, "images": self.host.images_key(samples, root),
                  "preprocess": self.preprocess.key(), "version": VERSIONS["equalize"]}

        def work(stage_dir: Path) -> EqualizeRecord:
            result = equalize(Path(exported.path), stage_dir / "model.onnx",
                              self._image_batches(samples, root, "equalize"), threads=self.cfg.threads)
            path = stage_dir / "model.onnx"
            return EqualizeRecord(path=str(path), sha256=file_sha256(path), opset=exported.opset, pairs=result.pairs,
                                  num_pairs=len(result.pairs), channels_scaled=sum(p["scaled"] for p in result.pairs),
                                  num_images=result.num_images, seconds=result.seconds)

        return self.host.stage("equalize", inputs, work)

    def balance(self) -> BalanceRecord:
        exported = self.host.get("export")
        q = self.cfg.quant
        samples, root = self._calibration_subset(q.balance_images)
        inputs = {"model_sha256": exported.sha256, "images": self.host.images_key(samples, root),
                  "strength": q.balance_strength, "preprocess": self.preprocess.key(), "version": VERSIONS["balance"]}

        def work(stage_dir: Path) -> BalanceRecord:
            path = stage_dir / "model.onnx"
            result = balance(Path(exported.path), path, self._image_batches(samples, root, "balance"),
                             strength=q.balance_strength, threads=self.cfg.threads)
            return BalanceRecord(path=str(path), sha256=file_sha256(path), opset=exported.opset, chains=result.chains,
                                 num_chains=len(result.chains), channels=sum(c["channels"] for c in result.chains),
                                 num_images=result.num_images, seconds=result.seconds)

        return self.host.stage("balance", inputs, work)

    def refine(self) -> RefineRecord:
        source = self.host.get("optimize")
        quantized = self.host.get("quantize")
        q = self.cfg.quant
        samples, root = self._calibration_subset(q.refine_images)
        corr_samples, _ = self._calibration_subset(min(q.bias_correction_images, q.refine_images or 1 << 30))
        inputs = {"fp32_sha256": source.sha256, "int8_sha256": quantized.sha256, **self.reference_key(),
                  "weight_rounding": q.weight_rounding, "bias_correction": bool(q.bias_correction),
                  "weight_scales": q.weight_scales,
                  "images": self.host.images_key(samples, root),
                  "correction_images": self.host.images_key(corr_samples, root) if q.bias_correction else None,
                  "preprocess": self.preprocess.key(), "version": VERSIONS["refine"]}

        def work(stage_dir: Path) -> RefineRecord:
            path = stage_dir / "model.int8.onnx"
            reference = self.quantizer_input()  # the rewritten fp32 graph the int8 model was quantized from
            details = refine(reference, Path(quantized.path), path,
                             lambda: self._image_batches(samples, root, "refine"), weight_rounding=q.weight_rounding,
                             bias_correction=bool(q.bias_correction), threads=self.cfg.threads,
                             correction_batches=lambda: self._image_batches(corr_samples, root, None),
                             weight_scales=q.weight_scales)
            return RefineRecord(path=str(path), sha256=file_sha256(path), opset=quantized.opset,
                                num_images=len(samples), correction_images=len(corr_samples), **details)

        return self.host.stage("refine", inputs, work)

    def budget(self) -> BudgetRecord:
        exported = self.host.get("export")
        source = self.host.get("optimize")
        calibrated = self.host.get("calibrate")
        start = self.host.get("refine" if self._refining() else "quantize")
        q, a = self.cfg.quant, self.cfg.analysis
        if q.max_trials < 0:
            raise ConfigError(f"quant.max_trials={q.max_trials} must be >= 0")
        samples, root = self.tune_samples()
        inputs = {"fp32_sha256": exported.sha256, "source_sha256": source.sha256, **self.reference_key(),
                  "ranges_sha256": calibrated.sha256, "start_sha256": start.sha256,
                  "options": self.quant_options(), "method": calibrated.method, "max_drop": q.max_drop,
                  "max_trials": q.max_trials, "images": self.host.images_key(samples, root),
                  "sensitivity_images": a.sensitivity_images, "preprocess": self.preprocess.key(),
                  "onnxruntime": metadata.version("onnxruntime"), "version": VERSIONS["budget"]}

        def work(stage_dir: Path) -> BudgetRecord:
            tune = TuneSet(Path(exported.path),
                           self.host.batches(samples, root, q.tune_batch_size, desc="budget: tuning set"),
                           threads=self.cfg.threads)
            ranking_images = samples[: a.sensitivity_images]
            reference = self.quantizer_input()
            sensitivity = analyze(reference, Path(start.path),
                                  self._image_batches(ranking_images, root, None, a.sensitivity_batch_size), threads=self.cfg.threads)
            fp32_model = onnx.load(str(reference))
            int8_nodes = [n.name for n in onnx.load(start.path).graph.node]
            ranking = rank_candidates(sensitivity, fp32_model, int8_nodes, already=q.nodes_to_exclude)
            del fp32_model
            refined = onnx.load(start.path) if self._refining() else None
            trials_dir = stage_dir / "trials"
            trials_dir.mkdir()
            written: dict[tuple[str, ...], Path] = {}

            def trial(excluded: list[str]):
                extra = [n for n in excluded if n not in set(q.nodes_to_exclude)]
                if not extra:
                    return tune.score(Path(start.path))
                path = trials_dir / f"trial{len(written) + 1}.int8.onnx"
                ranges = self.host.get("quantize").ranges_path or calibrated.path  # shared Concat ranges
                quantize_model(Path(source.path), Path(ranges), path, method=calibrated.method,
                               optimize_graph=False, **self.quant_options(extra))
                if refined is not None:  # carry GPTQ weights and corrected biases over to the nodes still int8
                    model = onnx.load(str(path))
                    transfer(refined, model)
                    onnx.save(model, str(path))
                written[tuple(excluded)] = path
                return tune.score(path)

            result = search(ranking, trial, float(q.max_drop), int(q.max_trials),
                            base_excluded=list(q.nodes_to_exclude))
            final = stage_dir / "model.int8.onnx"
            shutil.copyfile(written.get(tuple(result.best.excluded), Path(start.path)), final)
            shutil.rmtree(trials_dir)
            found = result.as_dict()
            found["ranking"] = found["ranking"][:30]
            return BudgetRecord(path=str(final), sha256=file_sha256(final), opset=start.opset, start_path=start.path,
                                start_sha256=start.sha256, tune_images=tune.num_images,
                                tune_fp32_top1=tune.fp32_top1, ranking_images=len(ranking_images), **found)

        return self.host.stage("budget", inputs, work)

    def sensitivity(self) -> SensitivityRecord:
        source = self.host.get("optimize")
        final = self.final_int8()
        a = self.cfg.analysis
        samples, root = self._calibration_subset(a.sensitivity_images)
        inputs = {"fp32_sha256": source.sha256, "int8_sha256": final.sha256, **self.reference_key(),
                  "images": self.host.images_key(samples, root),
                  "preprocess": self.preprocess.key(), "version": VERSIONS["sensitivity"]}

        def work(stage_dir: Path) -> SensitivityRecord:
            result = analyze(self.quantizer_input(), Path(final.path),
                             self._image_batches(samples, root, "sensitivity", a.sensitivity_batch_size),
                             threads=self.cfg.threads)
            data = result.as_json()
            write_json(stage_dir / "sensitivity.json", data)
            ranked = result.ranked()
            png = sqnr_bars(stage_dir / "sensitivity.png", [t.tensor for t in result.tensors],
                            [t.sqnr_db for t in result.tensors],
                            f"{self.cfg.model.name}: SQNR of each quantized activation vs fp32 "
                            f"({result.num_images} images; logits {_db(result.output_sqnr_db)} dB)")
            return SensitivityRecord(
                json=str(stage_dir / "sensitivity.json"), png=str(png), output_sqnr_db=data["output_sqnr_db"],
                num_images=result.num_images, num_tensors=len(result.tensors), seconds=result.seconds,
                reference=("equalized " if self.cfg.quant.equalize else "")
                + "fp32 model as the quantizer saw it (after the optimize stage)",
                worst=[t.as_json() for t in ranked[: a.sensitivity_top]],
                most_added=[t.as_json() for t in result.by_added()[: a.sensitivity_top]],
                table=render_table(result, a.sensitivity_top))

        return self.host.stage("sensitivity", inputs, work)

    def speed(self) -> SpeedRecord:
        exported = self.host.get("export")
        final = self.final_int8()
        a = self.cfg.analysis
        models = {"fp32": (exported.path, exported.sha256), "int8": (final.path, final.sha256)}  # path, sha256
        budget = self.records.get("budget")
        if budget is not None and budget.excluded:
            models["int8_all_quantized"] = (budget.start_path, budget.start_sha256)
        inputs = {"models": {name: sha256 for name, (_, sha256) in models.items()}, "batch_size": a.speed_batch_size,
                  "runs": a.speed_runs, "threads": self.cfg.threads, "cpu": cpu_name(),
                  "onnxruntime": metadata.version("onnxruntime"), "version": VERSIONS["speed"],
                  "image_size": self.preprocess.crop}

        def work(stage_dir: Path) -> SpeedRecord:
            latency = measure({name: Path(path) for name, (path, _) in models.items()}, batch_size=a.speed_batch_size,
                              threads=self.cfg.threads, runs=a.speed_runs, image_size=self.preprocess.crop)
            return SpeedRecord(**latency.as_dict(), int8_speedup=latency.speedup["int8"])

        return self.host.stage("speed", inputs, work)

    def analyses(self) -> None:
        """The optional analysis stages the config asks for (after evaluation)."""
        if self.cfg.analysis.sensitivity:
            self.host.get("sensitivity")
        if self.cfg.analysis.speed:
            self.host.get("speed")


def _db(value: float | None) -> str:
    return "inf" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.1f}"
