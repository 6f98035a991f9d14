"""Scale-out through Hydra's launchers: a local joblib multirun aggregated into one table; the SLURM config."""

import json
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir

from quantize.config import register_configs
from quantize.jobs.sweep import main as sweep_main

from conftest import REPO, write_tiny_imagenet


def test_joblib_multirun_with_two_workers_ends_in_one_table(tmp_path):
    data = write_tiny_imagenet(tmp_path / "val")
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [sys.executable, "-m", "quantize", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "+model=shufflenet_v2_x0_5", "model.pretrained=false", "calib=minmax,percentile", f"data.root={data}",
         "calib.num_images=4", "export.check_images=2", f"work_dir={tmp_path / 'work'}",
         f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["calib"] for r in rows) == ["minmax", "percentile 99.999"]
    assert all(r["quant"] == "QDQ U8S8 per-channel" and r["images"] == "6" for r in rows)
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| model | calib |")
    # both jobs shared one export: the second waited for it or reused it
    logs = "".join(p.read_text() for p in sweep.rglob("*.log"))
    assert logs.count("export: running") == 1

    (sweep / "summary.md").unlink()
    assert sweep_main([str(sweep)]) == 0 and (sweep / "summary.md").exists()


def test_slurm_launcher_config_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for launcher in ("slurm", "submitit_slurm"):
            cfg = compose("config", overrides=["+model=shufflenet_v2_x0_5", f"hydra/launcher={launcher}",
                                               "hydra.launcher.partition=cpu"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
            assert cfg.hydra.launcher.partition == "cpu"
        assert cfg.hydra.callbacks.aggregate_reports._target_ == "quantize.jobs.sweep.AggregateReports"


def test_sweep_command_without_reports_is_one_line(tmp_path, capsys):
    assert sweep_main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: no report.json under {tmp_path}"
