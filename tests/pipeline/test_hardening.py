"""What release jobs meet: interrupted runs, concurrent runs, unwritable or full disks. One clear line, no
traceback, no corrupt artifact, and a rerun that resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_tiny_imagenet

TINY = ["+model=shufflenet_v2_x0_5", "model.pretrained=false", "export.check_images=2", "eval.batch_size=4"]


def cli(*args, cwd=REPO, wait=True, code=None):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "quantize", *args]
    # A shell starting a background job without job control sets SIGINT to ignored, and a child inherits that;
    # the run must see Ctrl-C as a user's terminal would deliver it.
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("calibrate", "evaluate"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def artifacts_are_whole(work_dir: Path) -> None:
    """Every stage directory with a record holds the files its record names; no temporary file is left."""
    for record_path in work_dir.rglob("record.json"):
        record = json.loads(record_path.read_text())
        if "path" in record:
            assert Path(record["path"]).is_file()
    leftovers = [p for p in work_dir.rglob("*.tmp") if (p.parent / "record.json").exists()]
    assert not leftovers, leftovers


@pytest.fixture
def dataset(tmp_path):
    # enough calibration images at batch size 1 that a signal lands while calibration runs
    return write_tiny_imagenet(tmp_path / "val", classes=tuple(range(0, 1000, 25)), per_class=1)


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)],
                         ids=["kill-9", "ctrl-c"])
def test_a_run_killed_mid_stage_resumes_from_the_last_finished_stage(tmp_path, dataset, sig, code):
    args = [*TINY, f"data.root={dataset}", f"work_dir={tmp_path / 'work'}", "calib.batch_size=1",
            "calib.num_images=40"]
    run1 = tmp_path / "run1"
    process = cli(*args, f"hydra.run.dir={run1}", wait=False)
    wait_for(run1 / "__main__.log", "calibrate: running")
    # at once: on a loaded machine a sleep here can outlast the rest of the run (then there is nothing to stop)
    assert process.poll() is None, "the run ended before the signal could be sent"
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    if sig == signal.SIGINT:
        assert "rerun the same command to resume" in one_error_line(err)
    artifacts_are_whole(tmp_path / "work")

    returncode, _, err = cli(*args, f"hydra.run.dir={tmp_path / 'run2'}")
    assert returncode == 0, err
    log = (tmp_path / "run2" / "__main__.log").read_text()
    assert "export: reused" in log and "calibrate: running" in log
    report = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report["calib"]["num_images"] == 40 and report["eval"]["num_images"] == 40
    artifacts_are_whole(tmp_path / "work")


def test_two_runs_on_one_work_dir_compute_each_stage_once(tmp_path, dataset):
    args = [*TINY, f"data.root={dataset}", f"work_dir={tmp_path / 'work'}", "calib.num_images=8"]
    first = cli(*args, f"hydra.run.dir={tmp_path / 'a'}", wait=False)
    second = cli(*args, f"hydra.run.dir={tmp_path / 'b'}", wait=False)
    for process in (first, second):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    logs = (tmp_path / "a" / "__main__.log").read_text() + (tmp_path / "b" / "__main__.log").read_text()
    for stage in ("export", "calibrate", "quantize", "evaluate"):
        assert logs.count(f"{stage}: running") == 1 and logs.count(f"{stage}: reused") == 1, logs
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in "ab"]
    assert reports[0]["int8"] == reports[1]["int8"]
    assert reports[0]["onnx"]["int8_sha256"] == reports[1]["onnx"]["int8_sha256"]


def test_unwritable_work_dir_is_one_line(tmp_path, dataset):
    unwritable = Path("/sys/quantize-cannot-write-here")  # not writable even for root
    returncode, _, err = cli(*TINY, f"data.root={dataset}", f"work_dir={unwritable}",
                             f"hydra.run.dir={tmp_path / 'run'}")
    assert returncode == 1
    assert str(unwritable) in one_error_line(err)


def test_disk_full_while_writing_leaves_no_partial_stage_and_resumes(tmp_path, dataset):
    args = [*TINY, f"data.root={dataset}", f"work_dir={tmp_path / 'work'}", "calib.num_images=4"]
    disk_full = (
        "import errno, sys\n"
        "import quantize.pipeline.runner as pipeline\n"
        "def full(calibration, path):\n"
        "    path.write_bytes(b'{')\n"  # a partial write, then the disk fills
        "    raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
        "pipeline.save_ranges = full\n"
        "from quantize.__main__ import main\n"
        "sys.argv = ['quantize', *sys.argv[1:]]\n"
        "main()\n"
    )
    returncode, _, err = cli(*args, f"hydra.run.dir={tmp_path / 'run1'}", code=disk_full)
    assert returncode == 1
    assert "No space left on device" in one_error_line(err)
    calibrate_dirs = list((tmp_path / "work" / "shufflenet_v2_x0_5").glob("calibrate-*"))
    assert calibrate_dirs and not any((d / "record.json").exists() for d in calibrate_dirs)

    returncode, _, err = cli(*args, f"hydra.run.dir={tmp_path / 'run2'}")
    assert returncode == 0, err
    assert json.loads((tmp_path / "run2" / "report.json").read_text())["calib"]["num_images"] == 4
