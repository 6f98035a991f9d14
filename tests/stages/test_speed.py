"""The latency helper behind the speed stage."""

import time

import numpy as np
import pytest

from quantize.stages import speed
from quantize.stages.speed import measure

from accuracy_models import conv_net, save


def test_measure_reports_every_model_against_the_reference(tmp_path):
    small = save(conv_net(channels=4), tmp_path / "small.onnx")
    large = save(conv_net(channels=64, depthwise=False), tmp_path / "large.onnx")
    result = measure({"fp32": large, "int8": small}, runs=6, blocks=2, warmup=1, image_size=16)
    assert result.runs == 6 and set(result.ms) == set(result.ms_min) == {"fp32", "int8"}
    assert result.speedup["fp32"] == pytest.approx(1.0) and result.speedup_fastest["fp32"] == pytest.approx(1.0)
    assert all(result.ms_min[n] <= result.ms[n] for n in result.ms)
    assert result.speedup["int8"] == pytest.approx(result.ms["fp32"] / result.ms["int8"])
    assert result.cpu


def test_measure_rejects_an_unknown_reference(tmp_path):
    model = save(conv_net(), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="reference"):
        measure({"int8": model}, reference="fp32")


def test_the_first_two_runs_of_a_fresh_model_are_never_timed(monkeypatch):
    """A fresh ONNX Runtime session allocates its memory plan on its second run, which is slow at large batches."""
    class SlowStart:
        def __init__(self):
            self.calls = 0

        def run(self, batch):
            self.calls += 1
            if self.calls <= 2:
                time.sleep(0.05)

    class Engine:
        def load(self, path, threads=0, batch=None):
            return SlowStart()

    monkeypatch.setattr(speed, "get_runtime", lambda name: Engine())
    times = speed.time_blocks({"a": "a.onnx", "b": "b.onnx"}, np.zeros((2, 3, 8, 8), np.float32), runs=6, warmup=0,
                              blocks=3)
    assert all(len(t) == 6 for t in times.values())
    assert max(max(t) for t in times.values()) < 0.025
