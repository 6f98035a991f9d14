"""make bench-cost: the repeated calibration folder and a failing pipeline run reported in one line."""

import pytest

from conftest import write_tiny_imagenet
from quantize.bench import cost
from quantize.core.errors import QuantizeError
from quantize.data.samples import list_samples


def test_photos_are_repeated_into_their_synset_folders(tmp_path):
    root = write_tiny_imagenet(tmp_path / "val", classes=(3, 250), per_class=2)
    out = tmp_path / "repeated"
    assert cost.repeated_folder(root, 10, out) == 10
    samples = list_samples(out)
    assert len(samples) == 10 and len({s.path for s in samples}) == 10
    assert sorted({s.label for s in samples}) == [3, 250]
    originals = {p.read_bytes() for p in root.glob("*/*")}
    assert {s.path.read_bytes() for s in samples} == originals
    with pytest.raises(QuantizeError, match="no images"):
        cost.repeated_folder(tmp_path / "repeated" / "missing", 3, tmp_path / "x")


def test_a_failing_pipeline_names_its_log(tmp_path):
    with pytest.raises(QuantizeError, match="failed: .*log"):
        cost.pipeline(["+model=no_such_model"], tmp_path / "run.log", rss_cap_gb=4, timeout=120)
    assert "no_such_model" in (tmp_path / "run.log").read_text()


def test_stage_seconds_are_read_from_the_pipeline_log():
    log = ("[2026-11-30 09:58:57,811][quantize.pipeline.runner][INFO] - calibrate: running -> artifacts/x\n"
           "[2026-11-30 09:59:34,990][quantize.pipeline.runner][INFO] - calibrate: done in 37.2 s\n"
           "[2026-11-30 09:59:36,100][quantize.pipeline.runner][INFO] - quantize: done in 1.3 s\n")
    assert cost.STAGE_DONE.findall(log) == [("calibrate", "37.2"), ("quantize", "1.3")]
