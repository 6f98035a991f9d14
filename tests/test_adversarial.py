"""Adversarial inputs (issue #15): what a hostile new user tries, by class of fault.

1. a cached result is reused only for the same inputs (image bytes, labels, root), in the stage cache and the crop
   cache;
2. nothing outside the given roots is read, written, moved or linked;
3. every count asked for is honoured or refused, and every skipped image is counted and named;
4. every error is one line naming the offending value, never a traceback.

Everything is driven through the two command lines (``python -m quantize``, ``python -m data_prep``), run in this
process for speed (``quantize.__main__.main`` / ``data_prep.__main__.main``, exactly what ``-m`` runs) and in a
subprocess where the real process matters. The pipeline runs a tiny random-init ONNX classifier exported once per
session (``+model=onnx``), so no test pays for PyTorch export, and most stages are shared through a copied
work_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SYNSETS, write_tiny_imagenet
from PIL import Image

MODEL_NAME = "onnx_tiny"  # +model=onnx names the model onnx_<file stem>


# --------------------------------------------------------------------------------------------------- helpers

@dataclass
class Result:
    code: int
    out: str
    err: str
    run_dir: Path

    @property
    def report(self) -> dict:
        return json.loads((self.run_dir / "report.json").read_text())

    @property
    def log(self) -> str:
        logs = list(self.run_dir.glob("*.log"))
        return logs[0].read_text() if logs else ""

    def error_line(self) -> str:
        """The one line a failed run printed: exit code 1 or 2, one non-empty stderr line, no traceback."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code in (1, 2), (self.code, self.err[-3000:])
        assert "Traceback" not in self.err + self.out, self.err[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: "), self.err[-3000:]
        return lines[0]


def quantize(tmp_path: Path, *args: str, run_dir: Path | None = None, subprocess_: bool = False) -> Result:
    """``python -m quantize ARGS`` with its own run directory; in this process unless ``subprocess_``."""
    run_dir = run_dir or _fresh(tmp_path / "run")
    argv = [*args, f"hydra.run.dir={run_dir}"]
    env_full_error = os.environ.pop("HYDRA_FULL_ERROR", None)
    try:
        if subprocess_:
            done = subprocess.run([sys.executable, "-m", "quantize", *argv], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=600, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
            return Result(done.returncode, done.stdout, done.stderr, run_dir)
        return _in_process("quantize.__main__", ["quantize", *argv], tmp_path, run_dir)
    finally:
        if env_full_error is not None:
            os.environ["HYDRA_FULL_ERROR"] = env_full_error


def data_prep(tmp_path: Path, *args: str) -> Result:
    """``python -m data_prep ARGS`` in this process."""
    return _in_process("data_prep.__main__", ["data_prep", *map(str, args)], tmp_path, tmp_path)


def _in_process(module: str, argv: list[str], cwd: Path, run_dir: Path) -> Result:
    import contextlib
    import importlib
    import io
    import logging

    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = argv
        root.handlers[:] = []  # as in a fresh process: the command's own logging setup decides where lines go
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                returned = main(argv[1:]) if module.startswith("data_prep") else main()
                code = returned or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                for handler in root.handlers:
                    if handler not in saved_handlers:
                        handler.close()
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return Result(code, out.getvalue(), err.getvalue(), run_dir)


def _fresh(path: Path) -> Path:
    n = 0
    while (candidate := path.with_name(f"{path.name}{n}")).exists():
        n += 1
    return candidate


def jpeg(path: Path, seed: int, size=(48, 40), quality: int = 90) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", quality=quality)
    return path


def replace_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """Other photo bytes under the same name, the same size and the same mtime: only the content tells."""
    stat = path.stat()
    other = path.with_name(path.name + ".other")
    for quality in (60, 40, 20, 10, 5):
        jpeg(other, seed, size=Image.open(path).size, quality=quality)
        if other.stat().st_size <= stat.st_size:
            break
    data = other.read_bytes()
    other.unlink()
    assert len(data) <= stat.st_size
    path.write_bytes(data + b"\0" * (stat.st_size - len(data)))  # decoders stop at the JPEG end marker
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def stage_dirs(work_dir: Path) -> list[Path]:
    return [p for p in work_dir.rglob("*") if p.is_dir() and (p / "record.json").exists()]


# --------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A random-init ShuffleNetV2 x0.5 as ONNX (NCHW, dynamic batch, 1000 logits), exported once per session."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), opset_version=11, dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def model_args(tiny_onnx: Path, *extra: str) -> list[str]:
    return ["+model=onnx", f"model.path={tiny_onnx}", "calib=minmax", "calib.list=null", "calib.num_images=4",
            "calib.batch_size=4", "export.check_images=2", "eval.batch_size=8", *extra]


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory, tiny_onnx):
    """A calibration folder and a work_dir holding the export, calibration and int8 model for it: a test copies
    the work_dir and evaluates its own folder, so only the evaluation runs."""
    base = tmp_path_factory.mktemp("calibrated")
    calib = write_tiny_imagenet(base / "calib", classes=(1, 2), per_class=2, seed=7)
    evaluation = write_tiny_imagenet(base / "eval", seed=8)
    result = quantize(base, *model_args(tiny_onnx, f"calib.root={calib}", f"data.root={evaluation}",
                                        f"work_dir={base / 'work'}"))
    assert result.code == 0, result.err[-3000:]
    return calib, base / "work"


@pytest.fixture
def evaluate(tmp_path, tiny_onnx, calibrated):
    """``evaluate(root, *extra)``: a run evaluating ``root`` on the shared calibration, in this test's work_dir."""
    calib, shared_work = calibrated
    work = tmp_path / "work"
    shutil.copytree(shared_work, work)

    def run(root: Path, *extra: str, work_dir: Path = work, expect_ok: bool = True) -> Result:
        result = quantize(tmp_path, *model_args(tiny_onnx, f"calib.root={calib}", f"data.root={root}",
                                                f"work_dir={work_dir}", *extra))
        if not expect_ok:
            return result
        assert result.code == 0, result.err[-3000:]
        assert result.report["stages"]["calibrate"]["cached"]  # the shared calibration, not a new one
        return result

    run.calibrated_work = shared_work
    return run


# ====================================================================== 1. a cached result needs the same inputs

def _overwrite_one(root: Path) -> None:
    image = sorted(root.rglob("*.JPEG"))[2]
    jpeg(image, seed=99, size=(70, 50))


def _same_size_same_mtime(root: Path) -> None:
    for image in sorted(root.rglob("*.JPEG"))[:3]:
        replace_keeping_size_and_mtime(image, seed=1234)


def _swap_photos(root: Path) -> None:
    a, b = min(root.rglob("*.JPEG")), max(root.rglob("*.JPEG"))  # different classes
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _other_copy_same_names(root: Path) -> None:
    shutil.rmtree(root)
    write_tiny_imagenet(root, seed=4321)  # same synset folders and file names, other photos


def _swap_labels(root: Path) -> None:
    labels = root / "val_label.txt"
    lines = labels.read_text().splitlines()
    names = [line.split()[0] for line in lines]
    classes = [line.split()[1] for line in lines]
    labels.write_text("".join(f"{n} {c}\n" for n, c in zip(names, reversed(classes))))


CHANGES = {
    "other-copy-same-names": (False, _other_copy_same_names),
    "one-photo-overwritten": (False, _overwrite_one),
    "same-size-same-mtime": (False, _same_size_same_mtime),
    "photos-swapped-between-names": (False, _swap_photos),
    "labels-file-changed": (True, _swap_labels),
}


@pytest.mark.parametrize("change", CHANGES)
def test_evaluation_is_redone_when_the_images_or_labels_change(tmp_path, evaluate, change):
    flat, mutate = CHANGES[change]
    root = write_tiny_imagenet(tmp_path / "val", flat=flat, seed=3)
    before = evaluate(root)
    assert not before.report["stages"]["evaluate"]["cached"]
    mutate(root)
    after = evaluate(root)
    assert not after.report["stages"]["evaluate"]["cached"], "reused the evaluation of other images"
    assert not after.report["eval"]["fp32_reused"], "reused fp32 predictions of other images"
    # and what it reports is what a work_dir that never saw the old images computes
    truth = evaluate(root, work_dir=_fresh_copy(evaluate.calibrated_work, tmp_path / "fresh"))
    for key in ("fp32", "int8", "agreement_top1"):
        assert after.report[key] == truth.report[key]


def _fresh_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_same_bytes_touched_or_moved_reuse_or_name_the_new_root(tmp_path, evaluate):
    root = write_tiny_imagenet(tmp_path / "val", seed=3)
    first = evaluate(root)
    for image in root.rglob("*.JPEG"):  # same bytes, new times: still the same inputs
        os.utime(image, ns=(1, 10**18))
    touched = evaluate(root)
    assert touched.report["stages"]["evaluate"]["cached"]
    moved = tmp_path / "moved"
    root.rename(moved)  # same bytes elsewhere: the report must name where they are now
    elsewhere = evaluate(moved)
    assert elsewhere.report["eval"]["root"] == str(moved)
    assert elsewhere.report["fp32"] == first.report["fp32"]


def test_calibration_is_redone_when_its_images_change_in_place(tmp_path, tiny_onnx):
    """A narrowed stage list recomputes what it names, under the key of its inputs: a second calibrate-<key>
    folder appears only if the key saw the new bytes."""
    root = write_tiny_imagenet(tmp_path / "val", classes=(1, 2), per_class=2, seed=11)
    args = model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}", "stages=[export,calibrate]")
    assert quantize(tmp_path, *args).code == 0
    def keys():
        return sorted(p.name for p in (tmp_path / "work").rglob("calibrate-*") if p.is_dir())

    assert len(keys()) == 1
    _same_size_same_mtime(root)
    again = quantize(tmp_path, *args)
    assert again.code == 0, again.err[-3000:]
    assert len(keys()) == 2


CROP_CHANGES = {
    "same-size-same-mtime": _same_size_same_mtime,
    "photos-swapped-between-names": _swap_photos,
    "one-photo-overwritten": _overwrite_one,
}


@pytest.mark.parametrize("change", CROP_CHANGES)
def test_crop_cache_and_verify_detect_replaced_images(tmp_path, change):
    root = write_tiny_imagenet(tmp_path / "val", seed=5)
    args = ["cache", "--root", root, "--out", tmp_path / "crops", "--resize", "40", "--crop", "32"]
    assert data_prep(tmp_path, *args).code == 0
    assert data_prep(tmp_path, *args, "--verify").code == 0
    CROP_CHANGES[change](root)
    line = data_prep(tmp_path, *args, "--verify").error_line()
    assert "stale" in line and "image" in line
    rebuilt = data_prep(tmp_path, *args)  # without --verify: rebuilt from the new images, then valid
    assert rebuilt.code == 0 and "rebuilding" in rebuilt.out
    assert data_prep(tmp_path, *args, "--verify").code == 0


def test_a_run_never_reads_old_crops_of_replaced_images(tmp_path, evaluate):
    root = write_tiny_imagenet(tmp_path / "val", seed=6)
    crops = tmp_path / "crops"
    assert data_prep(tmp_path, "cache", "--root", root, "--out", crops).code == 0
    assert "reading preprocessed crops" in evaluate(root, f"data.cache_dir={crops}").log
    _same_size_same_mtime(root)
    stale = evaluate(root, f"data.cache_dir={crops}", expect_ok=False)
    line = stale.error_line()
    assert "stale" in line and str(crops) in line


# ====================================================================== 2. nothing outside the given roots

@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid image beside, not inside, the dataset root."""
    return jpeg(tmp_path / "beyond" / "secret.JPEG", seed=77)


def _flat_with_entry(root: Path, entry: str) -> Path:
    write_tiny_imagenet(root, flat=True)
    with open(root / "val_label.txt", "a") as f:
        f.write(f"{entry} 3\n")
    return root


ESCAPING_ENTRIES = {
    "dot-dot": lambda outside: "../beyond/secret.JPEG",
    "absolute": lambda outside: str(outside),
    "dot-dot-inside-a-path": lambda outside: "sub/../../beyond/secret.JPEG",
    "dot-slash-dot-dot": lambda outside: "./../beyond/secret.JPEG",
}


@pytest.mark.parametrize("entry", ESCAPING_ENTRIES)
def test_labels_entries_outside_the_root_stop_the_run(tmp_path, tiny_onnx, outside, entry):
    name = ESCAPING_ENTRIES[entry](outside)
    root = _flat_with_entry(tmp_path / "val", name)
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}"))
    line = result.error_line()
    assert name in line and "outside" in line
    assert not stage_dirs(tmp_path / "work")  # refused before any work


@pytest.mark.parametrize("entry", ESCAPING_ENTRIES)
def test_calibration_lists_outside_the_root_stop_the_run(tmp_path, tiny_onnx, outside, entry):
    name = ESCAPING_ENTRIES[entry](outside)
    root = write_tiny_imagenet(tmp_path / "val", flat=True)
    image_list = tmp_path / "list.txt"
    image_list.write_text(f"ILSVRC2012_val_00000001.JPEG 3\n{name} 3\n")
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"calib.list={image_list}",
                                            f"work_dir={tmp_path / 'work'}"))
    line = result.error_line()
    assert name in line and "outside" in line and str(image_list) in line
    cache = data_prep(tmp_path, "cache", "--root", root, "--list", image_list, "--out", tmp_path / "crops")
    line = cache.error_line()
    assert name in line and "outside" in line
    assert not (tmp_path / "crops").exists() or not any((tmp_path / "crops").iterdir())


def _link_image_in_folder(root: Path, outside: Path) -> str:
    link = root / SYNSETS[3] / "ILSVRC2012_val_00000077.JPEG"
    link.symlink_to(outside)
    return link.name


def _link_synset_folder(root: Path, outside: Path) -> str:
    (root / SYNSETS[500]).symlink_to(outside.parent, target_is_directory=True)
    return SYNSETS[500]


def _link_flat_entry(root: Path, outside: Path) -> str:
    (root / "ILSVRC2012_val_00000077.JPEG").symlink_to(outside)
    with open(root / "val_label.txt", "a") as f:
        f.write("ILSVRC2012_val_00000077.JPEG 3\n")
    return "ILSVRC2012_val_00000077.JPEG"


def _link_relative_escape(root: Path, outside: Path) -> str:
    link = root / SYNSETS[3] / "ILSVRC2012_val_00000078.JPEG"
    link.symlink_to(os.path.relpath(outside, link.parent))
    return link.name


def _link_labels_file(root: Path, outside: Path) -> str:
    """The labels file found in the root is a link to a file elsewhere (its lines would be echoed in errors)."""
    (outside.parent / "passwords.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "val_label.txt").unlink()
    (root / "val_label.txt").symlink_to(outside.parent / "passwords.txt")
    return "val_label.txt"


SYMLINKS = {
    "labels-file-link": (True, _link_labels_file),
    "image-link-in-synset-folder": (False, _link_image_in_folder),
    "synset-folder-link": (False, _link_synset_folder),
    "flat-labelled-link": (True, _link_flat_entry),
    "relative-link-climbing-out": (False, _link_relative_escape),
}


@pytest.mark.parametrize("kind", SYMLINKS)
def test_symlinks_leaving_the_root_are_refused(tmp_path, tiny_onnx, outside, kind):
    flat, make = SYMLINKS[kind]
    root = write_tiny_imagenet(tmp_path / "val", flat=flat)
    name = make(root, outside)
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}"))
    line = result.error_line()
    assert name in line and "outside" in line and "root:x" not in line
    assert not stage_dirs(tmp_path / "work")
    cache = data_prep(tmp_path, "cache", "--root", root, "--out", tmp_path / "crops")
    assert name in cache.error_line()


def test_a_symlink_inside_the_root_is_an_ordinary_image(tmp_path):
    root = write_tiny_imagenet(tmp_path / "val")
    target = min(root.rglob("*.JPEG"))
    (root / SYNSETS[3] / "ILSVRC2012_val_00000077.JPEG").symlink_to(target)
    built = data_prep(tmp_path, "cache", "--root", root, "--out", tmp_path / "crops", "--resize", "40",
                      "--crop", "32")
    assert built.code == 0, built.err
    assert "7 images" in built.out


SORT_ESCAPES = {**ESCAPING_ENTRIES, "labelled-link": None}


@pytest.mark.parametrize("entry", SORT_ESCAPES)
def test_sort_val_move_never_takes_a_file_from_outside_the_root(tmp_path, outside, entry):
    root = write_tiny_imagenet(tmp_path / "val", flat=True)
    if entry == "labelled-link":
        name = _link_flat_entry(root, outside)
    else:
        name = ESCAPING_ENTRIES[entry](outside)
        with open(root / "val_label.txt", "a") as f:
            f.write(f"{name} 3\n")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    result = data_prep(tmp_path, "sort-val", "--root", root, "--move")
    assert name in result.error_line()
    assert outside.is_file() and not outside.is_symlink()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # nothing changed


def test_a_stage_folder_linked_out_of_the_work_dir_is_neither_read_nor_written(tmp_path, evaluate):
    root = write_tiny_imagenet(tmp_path / "val", seed=3)
    stage = next((tmp_path / "work").rglob("calibrate-*"))
    elsewhere = tmp_path / "elsewhere"
    shutil.move(stage, elsewhere)
    stage.symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in elsewhere.iterdir())
    line = evaluate(root, expect_ok=False).error_line()
    assert stage.name in line and "symlink" in line and "work_dir" in line
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_crop_cache_files_leading_outside_the_cache_are_refused(tmp_path):
    root = write_tiny_imagenet(tmp_path / "val")
    args = ["cache", "--root", root, "--out", tmp_path / "crops", "--resize", "40", "--crop", "32"]
    assert data_prep(tmp_path, *args).code == 0
    crops = next((tmp_path / "crops").glob("*/crops.npy"))
    elsewhere = tmp_path / "elsewhere.npy"
    shutil.move(crops, elsewhere)
    crops.symlink_to(elsewhere)  # same bytes, but not inside the cache any more
    line = data_prep(tmp_path, *args, "--verify").error_line()
    assert "crops.npy" in line and "outside" in line


# ====================================================================== 3. counts honoured or refused

MEANINGLESS = {
    "calib.num_images=0": "calib.num_images",
    "calib.num_images=-3": "calib.num_images",
    "eval.limit=0": "eval.limit",
    "eval.limit=-1": "eval.limit",
    "calib.num_bins=1": "calib.num_bins",
    "calib.num_bins=0": "calib.num_bins",
    "calib.batch_size=0": "calib.batch_size",
    "eval.batch_size=-1": "eval.batch_size",
    "stages=[]": "stages",
    "data.workers=0": "data.workers",
    "threads=-2": "threads",
    "export.check_images=0": "export.check_images",
    "calib.percentile=0": "calib.percentile",
    "calib.percentile=100.5": "calib.percentile",
    "analysis.speed_runs=0": "analysis.speed_runs",
    "quant.max_trials=0": "quant.max_trials",
    "calib.seed=-1": "calib.seed",
    "eval.seed=-2": "eval.seed",
}


@pytest.mark.parametrize("override", MEANINGLESS)
def test_meaningless_counts_fail_at_start_up(tmp_path, tiny_onnx, override):
    root = write_tiny_imagenet(tmp_path / "val")
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}"),
                      override)
    line = result.error_line()
    assert MEANINGLESS[override] in line, line
    assert not stage_dirs(tmp_path / "work")  # refused before any stage ran


def test_a_limit_beyond_the_images_is_refused(tmp_path, tiny_onnx):
    root = write_tiny_imagenet(tmp_path / "val")  # 6 images
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}",
                                            "eval.limit=7"))
    line = result.error_line()
    assert "eval.limit=7" in line and "6" in line


NOT_PLAIN_DECIMAL = ["+5", "\u00a05", "\u0665", "5.0", "0x5", "1_0", "\uff15", "-0", "1e2", "5L", "\u00b2", "05\u200b"]


@pytest.mark.parametrize("token", NOT_PLAIN_DECIMAL, ids=[t.encode("unicode_escape").decode() for t in
                                                          NOT_PLAIN_DECIMAL])
def test_labels_are_plain_decimal_class_numbers(tmp_path, token):
    root = write_tiny_imagenet(tmp_path / "val", flat=True)
    lines = (root / "val_label.txt").read_text().splitlines()
    lines[1] = f"{lines[1].split()[0]} {token}"
    (root / "val_label.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    line = data_prep(tmp_path, "cache", "--root", root, "--out", tmp_path / "crops").error_line()
    assert "line 2" in line and "val_label.txt" in line
    assert not (tmp_path / "crops").exists()


def test_plain_decimal_labels_are_accepted(tmp_path):
    root = write_tiny_imagenet(tmp_path / "val", flat=True, classes=(0, 7, 999))
    built = data_prep(tmp_path, "cache", "--root", root, "--out", tmp_path / "crops", "--resize", "40",
                      "--crop", "32")
    assert built.code == 0 and "6 images" in built.out, built.err


def _other_format(root: Path, fmt: str, suffix: str) -> str:
    path = root / SYNSETS[3] / f"extra{suffix}"
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(path, fmt)
    return path.name


def _nested(root: Path) -> str:
    jpeg(root / SYNSETS[3] / "more" / "nested.JPEG", seed=1)
    return "nested.JPEG"


def _dangling(root: Path) -> str:
    (root / SYNSETS[250] / "gone.JPEG").symlink_to(root / "no-such-file.JPEG")
    return "gone.JPEG"


def _loose_in_root(root: Path) -> str:
    jpeg(root / "loose.JPEG", seed=2)
    return "loose.JPEG"


def _unlabelled_flat(root: Path) -> str:
    jpeg(root / "unlabelled.JPEG", seed=2)
    return "unlabelled.JPEG"


SKIPS = {
    "webp": (False, lambda root: _other_format(root, "WEBP", ".webp")),
    "bmp": (False, lambda root: _other_format(root, "BMP", ".bmp")),
    "tiff": (False, lambda root: _other_format(root, "TIFF", ".tif")),
    "nested-folder": (False, _nested),
    "dangling-link": (False, _dangling),
    "image-beside-the-synset-folders": (False, _loose_in_root),
    "unlabelled-flat-image": (True, _unlabelled_flat),
}


@pytest.mark.parametrize("kind", SKIPS)
def test_every_skipped_image_is_counted_and_named(tmp_path, kind):
    flat, make = SKIPS[kind]
    root = write_tiny_imagenet(tmp_path / "val", flat=flat)
    name = make(root)
    built = data_prep(tmp_path, "cache", "--root", root, "--out", tmp_path / "crops", "--resize", "40",
                      "--crop", "32")
    assert built.code == 0, built.err
    assert "6 images" in built.out
    said = built.out + built.err
    assert "skipped 1 " in said and name in said, said


def test_report_counts_skipped_images_and_reads_a_synsets_file(tmp_path, evaluate):
    """One full run: skipped files of every kind in report.json and the log; data.synsets=FILE is a file."""
    root = write_tiny_imagenet(tmp_path / "val", seed=9)
    names = [make(root) for flat, make in SKIPS.values() if not flat]
    synsets = tmp_path / "synsets copy.txt"
    shutil.copy(REPO / "quantize" / "resources" / "imagenet_synsets.txt", synsets)
    result = evaluate(root, f"data.synsets={synsets}")
    skipped = result.report["eval"]["skipped"]
    assert skipped["count"] == len(names)
    assert result.report["eval"]["num_images"] == 6
    for name in names:
        assert name in result.log
        assert any(name in entry for entry in skipped["files"])


# ====================================================================== 4. one line, never a traceback

def _onnx_model(path: Path, input_shape, output_shape, elem=None) -> Path:
    import onnx
    from onnx import TensorProto, helper

    elem = elem or TensorProto.FLOAT
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m"], ["u"], axes=[1]),
             helper.make_node("Tile", ["u", "reps"], ["y"])]
    reps = onnx.numpy_helper.from_array(np.array([1, 1000], dtype=np.int64), "reps")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], [reps])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    return path


def _two_inputs(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 224, 224]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 224, 224])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    return path


BAD_MODELS = {
    "nhwc-input": (lambda p: _onnx_model(p, [1, 224, 224, 3], [1, 1000]), "NHWC"),
    "empty-output-shape": (lambda p: _onnx_model(p, [1, 3, 224, 224], []), "shape"),
    "rank-3-output": (lambda p: _onnx_model(p, [1, 3, 224, 224], [1, 1000, 1]), "shape"),
    "two-inputs": (_two_inputs, "input"),
    "not-onnx": (lambda p: (p.write_bytes(b"\x00garbage" * 100), p)[1], "not a valid ONNX model"),
    "empty-file": (lambda p: (p.write_bytes(b""), p)[1], "not a valid ONNX model"),
    "three-channel-last-unknown-batch": (lambda p: _onnx_model(p, ["N", 224, 224, 3], ["N", 1000]), "NHWC"),
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_files_are_one_line(tmp_path, kind):
    make, words = BAD_MODELS[kind]
    path = make(tmp_path / "user model.onnx")
    root = write_tiny_imagenet(tmp_path / "val")
    result = quantize(tmp_path, "+model=onnx", f"model.path={path}", f"data.root={root}",
                      f"work_dir={tmp_path / 'work'}", "export.check_images=2")
    line = result.error_line()
    assert words in line and str(path) in line, line


UNWRITABLE_RUN = {  # what is overridden, with what, and whether the run is a real process
    "run-dir-under-a-file": ("hydra.run.dir", lambda t: _a_file(t) / "run", False),
    "run-dir-in-proc": ("hydra.run.dir", lambda t: Path("/proc/quantize-cannot/run"), True),
    "work-dir-under-a-file": ("work_dir", lambda t: _a_file(t) / "work", False),
}


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("kind", UNWRITABLE_RUN)
def test_unwritable_locations_are_one_line(tmp_path, tiny_onnx, kind):
    key, where, real_process = UNWRITABLE_RUN[kind]
    root = write_tiny_imagenet(tmp_path / "val")
    path = where(tmp_path)
    args = model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}")
    if key == "work_dir":
        result = quantize(tmp_path, *args, f"work_dir={path}")
    else:
        result = quantize(tmp_path, *args, run_dir=path, subprocess_=real_process)
    line = result.error_line()
    assert str(path.parent) in line and key in line, line


UNWRITABLE_PREP = {
    "cache-out-is-a-file": lambda t, root: ["cache", "--root", root, "--out", _a_file(t)],
    "cache-out-under-a-file": lambda t, root: ["cache", "--root", root, "--out", _a_file(t) / "crops"],
    "cache-out-in-proc": lambda t, root: ["cache", "--root", root, "--out", "/proc/quantize-cannot"],
    "sort-val-out-is-a-file": lambda t, root: ["sort-val", "--root", root, "--out", _a_file(t)],
    "labels-out-under-a-file": lambda t, root: ["labels", "--ground-truth", _ground_truth(t),
                                                "--out", _a_file(t) / "val_label.txt"],
}


def _ground_truth(tmp_path: Path) -> Path:
    path = tmp_path / "val_synsets.txt"
    path.write_text("".join(f"{SYNSETS[i % 1000]}\n" for i in range(1000)))
    return path


@pytest.mark.parametrize("kind", UNWRITABLE_PREP)
def test_data_prep_unwritable_outputs_are_one_line(tmp_path, kind):
    root = write_tiny_imagenet(tmp_path / "val", flat=True)
    result = data_prep(tmp_path, *UNWRITABLE_PREP[kind](tmp_path, root))
    assert "a-file" in result.error_line() or "/proc/" in result.error_line()


BAD_SYNSETS = {
    "missing": lambda t: t / "nope.txt",
    "999-lines": lambda t: _write(t / "short.txt", "".join(f"{s}\n" for s in SYNSETS[:999])),
    "a-directory": lambda t: t,
    "not-utf8": lambda t: _write_bytes(t / "latin.txt", b"\xff\xfe\x00" * 10),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", BAD_SYNSETS)
def test_bad_synsets_files_are_one_line(tmp_path, tiny_onnx, kind):
    root = write_tiny_imagenet(tmp_path / "val")
    synsets = BAD_SYNSETS[kind](tmp_path)
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}",
                                            f"data.synsets={synsets}"))
    line = result.error_line()
    assert f"synsets file {synsets}" in line, line


BAD_OVERRIDES = {
    "calib.num_images=abc": "calib.num_images",
    "nosuchkey=1": "nosuchkey",
    "calib.num_images=[1": "calib.num_images",
    "calib.method=median": "median",
    "quant.weight_type=int4": "int4",
}


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_bad_overrides_are_one_line(tmp_path, tiny_onnx, override):
    root = write_tiny_imagenet(tmp_path / "val")
    result = quantize(tmp_path, *model_args(tiny_onnx, f"data.root={root}", f"work_dir={tmp_path / 'work'}"),
                      override)
    assert BAD_OVERRIDES[override] in result.error_line()
    assert not stage_dirs(tmp_path / "work")


BAD_PREP_ARGS = {
    "limit-not-a-number": ["cache", "--root", "{root}", "--out", "{tmp}/c", "--limit", "abc"],
    "limit-zero": ["cache", "--root", "{root}", "--out", "{tmp}/c", "--limit", "0"],
    "workers-zero": ["cache", "--root", "{root}", "--out", "{tmp}/c", "--workers", "0"],
    "missing-root": ["cache", "--out", "{tmp}/c"],
    "unknown-command": ["frobnicate"],
    "calib-set-n-negative": ["calib-set", "--ground-truth", "{gt}", "--n", "-1"],
    "seed-negative": ["cache", "--root", "{root}", "--out", "{tmp}/c", "--limit", "3", "--seed", "-1"],
    "limit-beyond-the-images": ["cache", "--root", "{root}", "--out", "{tmp}/c", "--limit", "7"],
}


@pytest.mark.parametrize("kind", BAD_PREP_ARGS)
def test_data_prep_argument_errors_are_one_line(tmp_path, kind):
    root = write_tiny_imagenet(tmp_path / "val")
    gt = _ground_truth(tmp_path)
    argv = [a.format(root=root, tmp=tmp_path, gt=gt) for a in BAD_PREP_ARGS[kind]]
    result = data_prep(tmp_path, *argv)
    result.error_line()
    assert not (tmp_path / "c").exists()
