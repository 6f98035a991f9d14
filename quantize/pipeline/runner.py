"""Runs the stages a config asks for; a stage whose inputs are unchanged reuses its artifact.

Each stage writes into ``<work_dir>/<model>/<stage>-<key>/``, where the key hashes everything the stage reads
(config values, input file hashes, image lists). ``record.json`` is written last, so a stage directory without it
is an interrupted run and is redone. Only this module and ``__main__`` know about the config tree.
"""

from __future__ import annotations

import fcntl
import logging
import platform
import re
import shutil
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from quantize.pipeline.accuracy_stages import AccuracyStages
from quantize.core.artifacts import atomic_path, file_sha256, key_of, read_json, write_json
from quantize.stages.calibrate import METHOD_VERSIONS, calibrate, save_ranges
from quantize.accuracy.shared_ranges import share_concat_ranges
from quantize.config import ALL_STAGES, STAGES, CalibConfig, Config, EvalConfig
from quantize.data.crop_cache import open_cache
from quantize.core.digests import DigestStore
from quantize.data.samples import (Sample, SampleList, balanced_subset, iter_batches, list_samples, load_synsets,
                                   samples_digest)
from quantize.pipeline.checks import check_config
from quantize.core.errors import ConfigError
from quantize.core.inference import DEFAULT as DEFAULT_RUNTIME, get_runtime
from quantize.stages.evaluate import FULL_VAL, evaluate
from quantize.stages.export import Exported, export_onnx, import_onnx
from quantize.graph.optimize import VERSION as GRAPH_OPT_VERSION, optimize as optimize_graph
from quantize.graph.pixel_input import VERSION as PIXEL_INPUT_VERSION
from quantize.data.image_list import match_image_list, read_image_list
from quantize.data.preprocess import Preprocess
from quantize.pipeline.records import (RECORDS, CalibrateRecord, EvaluateRecord, ExportRecord, OptimizeRecord,
                                       QuantizeRecord, StageRecord)
from quantize.pipeline.report import write_report
from quantize.stages.static_quant import quantize_model

log = logging.getLogger(__name__)

PACKAGES = ["quantize", "torch", "torchvision", "onnx", "onnxruntime", "openvino", "numpy", "hydra-core", "omegaconf",
            "pillow"]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _project_path(path: str) -> Path:
    """A path as given when it exists (or is absolute), else relative to the project root (calib_lists/...)."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    return PROJECT_ROOT / given


@contextmanager
def stage_lock(path: Path, stage: str) -> Iterator[None]:
    """One run at a time per stage and inputs: a second run on the same work_dir waits, then reuses the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another run is computing the same stage; waiting for it (%s)", stage, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_complete(cfg: DictConfig) -> None:
    """A value left as ??? (e.g. model.name for +model=torchvision) is one line, not a resolver traceback."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
        named = re.search(r"Missing mandatory value: ([\w.]+)", str(exc))
        key = named.group(1) if named else exc.full_key
        if "." not in key and "." in (exc.full_key or ""):  # a relative interpolation names its sibling only
            key = f"{exc.full_key.rsplit('.', 1)[0]}.{key}"
        raise ConfigError(f"set {key}=... (required by this config)") from None


def _export_record(exported: Exported, **variant: Any) -> ExportRecord:
    return ExportRecord(path=str(exported.path), opset=exported.opset, max_abs_diff=exported.max_abs_diff,
                        seconds=exported.seconds, sha256=file_sha256(exported.path), **variant)


PREDICTIONS = "top5.npy"


def _load_predictions(directory: Path, num_images: int) -> np.ndarray | None:
    """The fp32 model's saved top-5 on the evaluation images, or None when there is no complete, readable copy."""
    if not (directory / "record.json").exists():
        return None
    try:
        if read_json(directory / "record.json").get("sha256") != file_sha256(directory / PREDICTIONS):
            raise ValueError(f"{PREDICTIONS} differs from the sha256 in record.json")
        top = np.load(directory / PREDICTIONS, allow_pickle=False)
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("evaluate: ignoring unreadable fp32 predictions in %s (%s)", directory, exc)
        return None
    if top.ndim != 2 or len(top) != num_images:
        log.warning("evaluate: ignoring fp32 predictions in %s: shape %s for %d images", directory, top.shape,
                    num_images)
        return None
    return top


def _save_predictions(directory: Path, top: np.ndarray, fp32_sha256: str) -> None:
    """Written so that a reader sees all or nothing: the array first, then the record naming it."""
    with atomic_path(directory / PREDICTIONS) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, top)
    write_json(directory / "record.json", {"fp32_sha256": fp32_sha256, "num_images": len(top),
                                           "file": PREDICTIONS, "sha256": file_sha256(directory / PREDICTIONS)})


class Pipeline:
    """The stage graph: which stage feeds which, each cached under a key of everything it reads.

    The core stages (export, optimize, calibrate, quantize, evaluate) are methods here; the accuracy stages live in
    :class:`AccuracyStages`, which reads this pipeline through the :class:`StageHost` interface it declares."""

    def __init__(self, cfg: DictConfig | Config, run_dir: Path):
        if not isinstance(cfg, Config):
            _require_complete(cfg)
            cfg = OmegaConf.to_object(cfg)
        check_config(cfg)  # a value no run can honour fails here, before any work
        self.cfg: Config = cfg
        self.run_dir = Path(run_dir)
        unknown = [s for s in cfg.stages if s not in ALL_STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(ALL_STAGES)}")
        self.stages = list(cfg.stages)
        # A narrowed stage list means "recompute these"; the full list reuses whatever is cached.
        self.force = set(self.stages) if set(self.stages) != set(STAGES) else set()
        self.model_dir = Path(cfg.work_dir) / cfg.model.name
        # The model's own eval transform, checked now: a bad setting stops the run before any stage (one line).
        self.preprocess = Preprocess.from_config(cfg.model.preprocess)
        self.records: dict[str, StageRecord] = {}
        self._sample_cache: dict[tuple, list[Sample]] = {}
        self._listings: dict[tuple, SampleList] = {}
        self._warned: set[tuple] = set()
        self.synsets = load_synsets(cfg.data.synsets) if cfg.data.synsets else None
        # digests of the images' bytes, remembered across runs: stage keys cover what the images hold, not their names
        self.digests = DigestStore(Path(cfg.work_dir) / "image-digests.json")
        self.accuracy = AccuracyStages(self)
        # Asking for a runtime that is not installed fails now, with the install command, not after the export.
        self.runtime = get_runtime(cfg.eval.runtime)

    def get(self, stage: str) -> StageRecord:
        """The record of ``stage`` in this run, running (or reusing) the stage first if needed."""
        if stage not in self.records:
            owner = self if stage in ("export", "optimize", "calibrate", "quantize", "evaluate") else self.accuracy
            getattr(owner, stage)()
        return self.records[stage]

    # --- data -------------------------------------------------------------------------------------------------
    def _root(self, section: CalibConfig | EvalConfig) -> tuple[Path, str | None]:
        root = section.root or self.cfg.data.root
        if root is None:
            raise ConfigError("no dataset given: set data.root=PATH (ImageNet val, synset folders or flat + labels)")
        return Path(root).expanduser().resolve(), section.labels or self.cfg.data.labels

    def _listing(self, section: CalibConfig | EvalConfig) -> tuple[SampleList, Path]:
        """Every image of a section's folder (and every file skipped there), listed once per run."""
        root, labels = self._root(section)
        if (root, labels) not in self._listings:
            self._listings[root, labels] = list_samples(root, labels_file=labels, synsets=self.synsets)
        return self._listings[root, labels], root

    def samples(self, section: CalibConfig | EvalConfig, limit: int | None, seed: int, asked: str | None = None
                ) -> tuple[list[Sample], Path]:
        """A class-balanced subset of ``limit`` images of the section's folder (all of them for None). ``asked``
        names the key the user set: eval.limit beyond the images there is refused, other counts are warned."""
        everything, root = self._listing(section)
        if limit is not None and limit > len(everything) and asked is not None:
            self._too_few(asked, limit, len(everything), root)
        key = (*self._root(section), limit, seed)
        if key not in self._sample_cache:
            self._sample_cache[key] = balanced_subset(everything, limit, seed=seed) if limit else list(everything)
        return self._sample_cache[key], root

    def _too_few(self, asked: str, wanted: int, available: int, where: Any) -> None:
        if asked == "eval.limit":
            raise ConfigError(f"eval.limit={wanted} asks for more images than the {available} in {where}; set "
                              f"eval.limit={available} or less, or eval.limit=null to evaluate them all")
        if (asked, where) not in self._warned:
            self._warned.add((asked, where))
            log.warning("%s=%d but only %d images are in %s: using all %d", asked, wanted, available, where,
                        available)

    def images_key(self, samples: list[Sample], root: Path) -> str:
        """What a stage reading these images depends on: the root, the names, labels and bytes of the images."""
        return samples_digest(samples, root, self.digests)

    def skipped_files(self, section: CalibConfig | EvalConfig) -> dict[str, Any]:
        """The files of a section's folder that were skipped, and why (for the report)."""
        listing, _ = self._listing(section)
        return listing.skipped_summary()

    def calibration_samples(self) -> tuple[list[Sample], Path, dict[str, Any]]:
        """The committed list when the calibration folder holds its images, else a class-balanced selection."""
        c = self.cfg.calib
        if c.list:
            list_path = _project_path(c.list)
            entries = read_image_list(list_path, self.synsets)
            everything, root = self.samples(c, None, c.seed)
            present = {s.path.name for s in everything}
            found = sum(name in present for name, _ in entries)
            if found:
                listed = match_image_list(everything, entries, source=f"calib.list {list_path}")
                if c.num_images < len(listed):
                    listed = balanced_subset(listed, c.num_images, seed=c.seed)
                elif c.num_images > len(listed):
                    self._too_few("calib.num_images", c.num_images, len(listed), f"calib.list={c.list}")
                return listed, root, {"list": str(list_path), "list_sha256": file_sha256(list_path)}
            log.info("calibrate: none of the %d images of calib.list=%s are in %s (not ImageNet val); selecting "
                     "%d images class-balanced from the folder instead", len(entries), c.list, root, c.num_images)
        samples, root = self.samples(c, c.num_images, c.seed, asked="calib.num_images")
        return samples, root, {"list": None, "list_sha256": None}

    def batches(self, samples: list[Sample], root: Path, batch_size: int, desc: str | None):
        """Decoded batches, read from a matching preprocessed cache in data.cache_dir when there is one."""
        if self.cfg.data.cache_dir:
            cache = open_cache(samples, root, self.preprocess, Path(self.cfg.data.cache_dir), digests=self.digests)
            if cache is not None:
                log.info("%s: reading preprocessed crops from %s", desc or "data", cache.path)
                return cache.iter_batches(batch_size, desc=desc)
        return iter_batches(samples, batch_size, self.preprocess, workers=self.cfg.data.workers, desc=desc)

    # --- stage plumbing ---------------------------------------------------------------------------------------
    def stage(self, stage: str, inputs: dict[str, Any], work: Callable[[Path], StageRecord]) -> StageRecord:
        key = key_of(inputs)
        stage_dir = self.model_dir / f"{stage}-{key}"
        with stage_lock(self.model_dir / f".{stage}-{key}.lock", stage):
            record = self._run_or_reuse(stage, stage_dir, key, inputs, work)
        record.dir = str(stage_dir)
        self.records[stage] = record
        return record

    def _run_or_reuse(self, stage: str, stage_dir: Path, key: str, inputs: dict[str, Any],
                      work: Callable[[Path], StageRecord]) -> StageRecord:
        record_path = stage_dir / "record.json"
        if stage_dir.is_symlink():  # read, written and maybe deleted below: never through a link out of work_dir
            raise ConfigError(f"{stage_dir} is a symlink (to {stage_dir.resolve()}); stages read and write only "
                              f"inside work_dir={self.cfg.work_dir}: remove the link")
        if record_path.exists() and stage not in self.force:
            try:
                record = RECORDS[stage].from_json(read_json(record_path))
            except TypeError as exc:  # written by a version that recorded less: computed again, like a new version
                log.warning("%s: %s lacks what this version records (%s); computing the stage again", stage,
                            record_path, exc)
            else:
                log.info("%s: reused %s (inputs unchanged)", stage, stage_dir)
                record.cached = True
                return record
        if stage in STAGES and stage not in self.stages:  # the others run whenever the config asks for them
            raise ConfigError(f"stage '{stage}' is not in stages= and nothing is cached for these inputs; "
                              f"add it: stages=[{','.join(s for s in STAGES if s in self.stages or s == stage)}]")
        log.info("%s: running -> %s", stage, stage_dir)
        started = time.perf_counter()
        if stage_dir.exists():  # an interrupted or forced earlier run: start clean
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        record = work(stage_dir)
        record.key, record.inputs, record.stage_seconds = key, inputs, time.perf_counter() - started
        write_json(record_path, record.to_json())  # last: its presence marks the stage complete
        log.info("%s: done in %.1f s", stage, record.stage_seconds)
        return record

    # --- stages -----------------------------------------------------------------------------------------------
    def export(self) -> ExportRecord:
        m = self.cfg.model
        if m.arch == "onnx":
            return self._import_onnx()
        checkpoint = Path(m.checkpoint).expanduser() if m.checkpoint else None
        if checkpoint is not None and not checkpoint.is_file():
            raise ConfigError(f"model.checkpoint={m.checkpoint} does not exist")
        inputs = {"arch": m.arch, "pretrained": m.pretrained, "weights_url": m.weights_url,
                  "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None,
                  "num_classes": m.num_classes, "opset": self.cfg.export.opset,
                  "tolerance": self.cfg.export.tolerance, "check_images": self.cfg.export.check_images,
                  "preprocess": self.preprocess.key(),  # the check images, and what the network is built to take
                  "check_images_key": self.images_key(*self._check_samples()),  # the recorded difference's images
                  "torch": metadata.version("torch")}

        def work(stage_dir: Path) -> ExportRecord:
            from quantize.models.complexity import count_ops, count_parameters  # torch is only needed here (~470 MiB resident)
            from quantize.models.registry import build_model

            model = build_model(m.arch, pretrained=m.pretrained, weights_url=m.weights_url,
                                checkpoint=str(checkpoint) if checkpoint else None, num_classes=m.num_classes)
            exported = export_onnx(model, stage_dir / "model.onnx", self._check_batch(),
                                   opset=self.cfg.export.opset, tolerance=self.cfg.export.tolerance,
                                   threads=self.cfg.threads)
            ref = m.reference
            return _export_record(exported, params_m=count_parameters(model, ref.params_kind) / 1e6,
                                  ops_m=count_ops(model, ref.flops_kind) / 1e6, ops_kind=ref.flops_kind)

        return self.stage("export", inputs, work)

    def _import_onnx(self) -> ExportRecord:
        source = Path(self.cfg.model.path).expanduser()
        if not source.is_file():
            raise ConfigError(f"model.path={self.cfg.model.path} does not exist")
        inputs = {"onnx_sha256": file_sha256(source), "num_classes": self.cfg.model.num_classes,
                  "check_images": self.cfg.export.check_images, "preprocess": self.preprocess.key(),
                  "check_images_key": self.images_key(*self._check_samples())}

        def work(stage_dir: Path) -> ExportRecord:
            imported = import_onnx(source, stage_dir / "model.onnx", self._check_batch(),
                                   num_classes=self.cfg.model.num_classes, threads=self.cfg.threads)
            return _export_record(imported, source=str(source))

        return self.stage("export", inputs, work)

    def _check_batch(self):
        """A few real images (from the calibration folder) to compare the ONNX model against its source."""
        samples, root = self._check_samples()
        return next(iter(self.batches(samples, root, len(samples), desc=None)))[0]

    def _check_samples(self) -> tuple[list[Sample], Path]:
        return self.samples(self.cfg.calib, self.cfg.export.check_images, self.cfg.calib.seed,
                            asked="export.check_images")

    def optimize(self) -> OptimizeRecord:
        """The fp32 graph after the exact rewrites of ``quantize.graph``: what calibration, quantization and the
        accuracy methods all read."""
        source = self.accuracy.fp32_source()  # the export, or its equalized copy (quant.equalize)
        pixels = self.preprocess.pixel_mapping() if self.cfg.quant.pixel_input else None
        inputs = {"model_sha256": source.sha256, "graph_opt": GRAPH_OPT_VERSION,
                  # only when on: graphs optimized before the option existed keep their key
                  **({"pixel_input": [list(pixels[0]), list(pixels[1])], "pixel_input_version": PIXEL_INPUT_VERSION}
                     if pixels else {})}

        def work(stage_dir: Path) -> OptimizeRecord:
            started = time.perf_counter()
            model, report = optimize_graph(onnx.load(source.path), pixels=pixels)
            path = stage_dir / "model.onnx"
            with atomic_path(path) as tmp:
                onnx.save(model, str(tmp))
            rewrites = report.as_dict()
            log.info("optimize: %s", ", ".join(f"{k} {v}" for k, v in rewrites.items()) or "nothing to rewrite")
            return OptimizeRecord(path=str(path), sha256=file_sha256(path), opset=source.opset, rewrites=rewrites,
                                  seconds=time.perf_counter() - started)

        return self.stage("optimize", inputs, work)

    def calibrate(self) -> CalibrateRecord:
        exported = self.get("optimize")
        c = self.cfg.calib
        samples, root, image_list = self.calibration_samples()
        inputs = {"model_sha256": exported.sha256, "method": c.method, "num_images": c.num_images,
                  # only versions past 1 enter the key: cached calibrations of methods that never changed stay valid
                  **({"method_version": METHOD_VERSIONS[c.method]} if METHOD_VERSIONS.get(c.method, 1) > 1 else {}),
                  "percentile": c.percentile if c.method == "percentile" else None,
                  "num_bins": c.num_bins if c.method != "minmax" else None, "seed": c.seed,
                  "images": self.images_key(samples, root), "preprocess": self.preprocess.key()}

        def work(stage_dir: Path) -> CalibrateRecord:
            images = (batch for batch, _ in self.batches(samples, root, c.batch_size, desc="calibrate"))
            result = calibrate(Path(exported.path), images, method=c.method, percentile=c.percentile,
                               num_bins=c.num_bins, threads=self.cfg.threads, optimize_graph=False)
            ranges_path = stage_dir / "ranges.json"
            save_ranges(result, ranges_path)
            return CalibrateRecord(path=str(ranges_path), sha256=file_sha256(ranges_path), method=result.method,
                                   num_images=result.num_images, num_tensors=len(result.ranges),
                                   seconds=result.seconds, peak_rss_mb=result.peak_rss_mb, root=str(root),
                                   measured_tensors=result.measured, **image_list)

        record = self.stage("calibrate", inputs, work)
        record.skipped, record.num_images_requested = self.skipped_files(c), c.num_images
        return record

    def quantize(self) -> QuantizeRecord:
        exported = self.get("optimize")
        calibrated = self.get("calibrate")
        options = self.accuracy.quant_options()
        shared = bool(self.cfg.quant.shared_concat_ranges)
        inputs = {"model_sha256": exported.sha256, "ranges_sha256": calibrated.sha256,
                  "method": calibrated.method, **options, "onnxruntime": metadata.version("onnxruntime"),
                  # only when on: quantizations cached before the option existed keep their key
                  **({"shared_concat_ranges": True} if shared else {}),
                  # excluded nodes read initializers of their own, and their input through Cast (fp32_nodes);
                  # 6: an excluded stem before a MaxPool is padded to 16-channel blocks; 7: the graph the quantizer
                  # read is kept beside the int8 model (fp32_path), the reference of the later stages; 8: the stem
                  # quant.float_stem kept is recorded
                  **({"excluded_fp32_nodes": 8} if options["nodes_to_exclude"] or options.get("float_stem") else {})}

        def work(stage_dir: Path) -> QuantizeRecord:
            started = time.perf_counter()
            ranges, shared_ranges = Path(calibrated.path), None
            if shared:
                ranges = stage_dir / "ranges.shared.json"
                shared_ranges = share_concat_ranges(onnx.load(exported.path), Path(calibrated.path), ranges)
            result = quantize_model(Path(exported.path), ranges, stage_dir / "model.int8.onnx",
                                    method=calibrated.method, optimize_graph=False, **options,
                                    fp32_out=stage_dir / "quantizer_input.onnx")
            return QuantizeRecord(path=str(result.path), opset=result.opset, seconds=time.perf_counter() - started,
                                  fp32_path=str(result.fp32_path) if result.fp32_path else None,
                                  float_stem=result.float_stem,
                                  sha256=file_sha256(result.path), ranges_path=str(ranges) if shared else None,
                                  shared_ranges=shared_ranges)

        return self.stage("quantize", inputs, work)

    def evaluate(self) -> EvaluateRecord:
        exported = self.get("export")
        quantized = self.accuracy.final_int8()  # after refine/budget when those are configured
        e = self.cfg.eval
        samples, root = self.accuracy.eval_samples()  # without the budget's tuning images
        images = self.images_key(samples, root)
        runtime = self.runtime
        inputs = {"fp32_sha256": exported.sha256, "int8_sha256": quantized.sha256,
                  "images": images, "limit": e.limit, "seed": e.seed, "preprocess": self.preprocess.key(),
                  # another runtime's figures are other figures; ONNX Runtime's keys predate the choice
                  **({} if runtime.name == DEFAULT_RUNTIME else {"runtime": runtime.key()})}
        # The fp32 predictions are kept per runtime and version ({"onnxruntime": "1.32.0"}, {"openvino": ...}).
        reference = self.model_dir / "fp32-predictions-{}".format(key_of({
            "fp32_sha256": exported.sha256, "images": images, "preprocess": self.preprocess.key(),
            **runtime.key()}))

        def work(stage_dir: Path) -> EvaluateRecord:
            known = None if "evaluate" in self.force else _load_predictions(reference, len(samples))
            models = {"int8": Path(quantized.path)}
            if known is None:
                models = {"fp32": Path(exported.path), **models}
            else:
                log.info("evaluate: fp32 predictions on these images reused from %s; running int8 only", reference)
            result = evaluate(models, self.batches(samples, root, e.batch_size, desc="evaluate"),
                              threads=self.cfg.threads, known={"fp32": known} if known is not None else None,
                              runtime=runtime.name)
            if known is None:
                _save_predictions(reference, result.predictions["fp32"], exported.sha256)
            return EvaluateRecord(num_images=result.num_images, root=str(root), runtime=result.runtime,
                                  fp32={"top1": result.top1["fp32"], "top5": result.top5["fp32"]},
                                  int8={"top1": result.top1["int8"], "top5": result.top5["int8"]},
                                  agreement_top1=result.agreement_top1, seconds=result.seconds,
                                  fp32_predictions=str(reference), fp32_reused=known is not None,
                                  images_per_second=result.images_per_second,
                                  stage_images_per_second=result.stage_images_per_second, threads=result.threads,
                                  minutes_for_50000=FULL_VAL / result.images_per_second / 60)

        record = self.stage("evaluate", inputs, work)
        record.skipped, record.limit = self.skipped_files(e), e.limit
        return record

    def run(self) -> dict[str, Any] | None:
        # the images first: a missing folder, a bad labels file or a link out of the root costs no model work
        self._check_samples()
        self.calibration_samples()
        if {"evaluate", "report"} & set(self.stages):
            self.accuracy.eval_samples()
        for stage in ALL_STAGES[:-1]:
            if stage in self.stages:
                self.get(stage)
        if "report" not in self.stages:
            return None
        for stage in STAGES[:-1]:
            self.get(stage)
        self.accuracy.analyses()  # sensitivity and speed, when configured
        return write_report(self.run_dir, self.cfg, self.records, package_versions())
