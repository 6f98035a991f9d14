"""Scale-out through Hydra's launchers: local joblib workers and submitit's local executor (the cluster path with
only the executor changed), each aggregated into one table; the SLURM config."""

import json
import os
import subprocess
import sys
import time

import yaml
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from omegaconf import OmegaConf

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


def test_submitit_multirun_runs_each_job_in_its_own_process_and_ends_in_one_table(tmp_path):
    """hydra/launcher=local: submitit starts every job as a subprocess (its job id is that process's pid), waits for
    the results it pickles, and the sweep callback aggregates their reports, as it does for a SLURM array."""
    data = write_tiny_imagenet(tmp_path / "val")
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    started = time.perf_counter()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "quantize", "-m", "hydra/launcher=local", "+model=shufflenet_v2_x0_5",
         "model.pretrained=false", "calib=minmax,percentile", f"data.root={data}", "calib.num_images=4",
         "export.check_images=2", "threads=1", f"work_dir={tmp_path / 'work'}", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert "Submitit 'local' sweep output dir" in out + err
    rows = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["calib"] for r in rows) == ["minmax", "percentile 99.999"]
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| model | calib |")
    # two jobs, two processes other than the launcher, each leaving submitit's result file
    job_ids = [yaml.safe_load((sweep / "shufflenet_v2_x0_5" / str(n) / ".hydra" / "hydra.yaml").read_text())
               ["hydra"]["job"]["id"] for n in (0, 1)]
    assert len(set(job_ids)) == 2 and str(launcher.pid) not in job_ids
    for job in job_ids:
        assert int(job) > 0 and (sweep / ".submitit" / job / f"{job}_0_result.pkl").is_file()
    logs = "".join(p.read_text() for p in sweep.rglob("*.log"))
    assert logs.count("export: running") == 1  # the jobs shared one export through the stage lock
    print(f"submitit local sweep of 2 jobs: {time.perf_counter() - started:.0f} s")


def test_the_slurm_config_differs_from_the_local_one_only_in_the_executor():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        configs = {name: OmegaConf.to_container(compose("config", overrides=[
            "+model=shufflenet_v2_x0_5", f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher)
            for name in ("local", "slurm")}
    local, slurm = configs["local"], configs["slurm"]
    assert local.pop("_target_").endswith("LocalLauncher") and slurm.pop("_target_").endswith("SlurmLauncher")
    assert {key: slurm[key] for key in local} == local  # every shared setting, resources included, is the same
    slurm_only = set(OmegaConf.structured(SlurmQueueConf).keys()) - set(OmegaConf.structured(BaseQueueConf).keys())
    assert set(slurm) - set(local) <= slurm_only  # the rest are options of the SLURM executor
    assert local["timeout_min"] == 240 and local["cpus_per_task"] == 8 and local["mem_gb"] == 16


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
