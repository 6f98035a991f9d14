"""Stage records: typed in memory, today's keys in record.json, and records of earlier runs still readable."""

import pytest

from quantize.pipeline.records import RECORDS, CalibrateRecord, ExportRecord, QuantizeRecord, SpeedRecord

from conftest import compose_config
from test_pipeline import tiny_overrides

EXPORTED = {"path": "/w/export-1/model.onnx", "sha256": "ab" * 32, "opset": 11, "max_abs_diff": 2e-6,
            "seconds": 1.5, "params_m": 1.4, "ops_m": 41.0, "ops_kind": "macs",
            "key": "0123456789abcdef", "inputs": {"arch": "torchvision/shufflenet_v2_x0_5"}, "stage_seconds": 2.0}


def test_record_json_keeps_its_keys_and_leaves_out_what_describes_the_run():
    record = ExportRecord.from_json(EXPORTED)
    assert record.path == EXPORTED["path"] and record.params_m == 1.4 and record.source is None
    record.cached, record.dir = True, "/w/export-1"
    assert record.to_json() == EXPORTED  # no "source" (not an import), no "cached" or "dir"


def test_fields_only_some_runs_have_are_left_out_when_absent():
    plain = QuantizeRecord(path="m.int8.onnx", sha256="cd" * 32, opset=13, seconds=0.5)
    assert "ranges_path" not in plain.to_json() and "shared_ranges" not in plain.to_json()
    shared = QuantizeRecord(path="m.int8.onnx", sha256="cd" * 32, opset=13, seconds=0.5,
                            ranges_path="ranges.shared.json", shared_ranges={"groups": 2, "tensors": 5})
    assert shared.to_json()["shared_ranges"] == {"groups": 2, "tensors": 5}


def test_a_none_that_the_record_holds_is_saved():
    calib = CalibrateRecord(path="ranges.json", sha256="ef" * 32, method="minmax", num_images=4, num_tensors=9,
                            seconds=0.1, peak_rss_mb=300.0, root="/val", measured_tensors=7, list=None,
                            list_sha256=None, skipped={"count": 0}, num_images_requested=4)
    saved = calib.to_json()
    assert saved["list"] is None and saved["list_sha256"] is None
    assert "skipped" not in saved and "num_images_requested" not in saved


def test_records_of_earlier_versions_load():
    old = {key: value for key, value in EXPORTED.items() if key not in ("params_m", "ops_m", "ops_kind")}
    assert ExportRecord.from_json({**old, "a_key_of_an_older_version": 1}).to_json() == old
    with pytest.raises(TypeError, match="sha256"):
        ExportRecord.from_json({key: value for key, value in EXPORTED.items() if key != "sha256"})


def test_the_speed_record_is_the_measurement_plus_the_int8_speedup():
    latency = {"batch_size": 1, "threads": 0, "runs": 3, "ms": {"fp32": 2.0, "int8": 1.0},
               "ms_min": {"fp32": 1.9, "int8": 0.9}, "speedup": {"fp32": 1.0, "int8": 2.0},
               "speedup_fastest": {"fp32": 1.0, "int8": 2.1}, "reference": "fp32", "cpu": "x86"}
    record = SpeedRecord(**latency, int8_speedup=2.0)
    assert record.to_json() == {**latency, "int8_speedup": 2.0, "key": "", "inputs": {}, "stage_seconds": None}


def test_every_stage_has_a_record_type():
    from quantize.config import ALL_STAGES

    assert set(RECORDS) == set(ALL_STAGES) - {"report"}


def test_a_record_json_lacking_what_this_version_records_is_computed_again(tmp_path):
    from quantize.pipeline.runner import Pipeline

    pipeline = Pipeline(compose_config(tiny_overrides(tmp_path / "val", tmp_path / "work")), tmp_path / "run")
    runs = []

    def work(stage_dir):
        runs.append(stage_dir)
        return QuantizeRecord(path=str(stage_dir / "model.int8.onnx"), sha256="cd" * 32, opset=13, seconds=0.1)

    first = pipeline.stage("quantize", {"model_sha256": "x"}, work)
    assert not first.cached and first.dir == str(runs[0]) and first.key and first.stage_seconds >= 0
    again = pipeline.stage("quantize", {"model_sha256": "x"}, work)
    assert again.cached and len(runs) == 1 and again.to_json() == first.to_json()
    (runs[0] / "record.json").write_text('{"path": "model.int8.onnx"}')  # what an older version might have written
    redone = pipeline.stage("quantize", {"model_sha256": "x"}, work)
    assert not redone.cached and len(runs) == 2
