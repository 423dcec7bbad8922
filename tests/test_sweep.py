"""A sweep ends with one comparison of its runs (training/sweep.py, a Hydra callback) in folders whose names
hold no '=' or ','; with run_dir= set, Hydra's train.log lands in run_dir with the rest of the run."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from training.config import default_if_null, path_safe

REPO = Path(__file__).resolve().parents[1]


def test_path_safe_names():
    assert path_safe("loss.ce_chunks=4,model.dropout=0.1") == "loss.ce_chunks-4_model.dropout-0.1"
    assert path_safe("data.paths=[a/b.txt,c d]") == "data.paths-_a_b.txt_c_d_"
    assert default_if_null(None, "x") == "x" and default_if_null("r", "x") == "r"


def test_sweep_writes_one_table_and_plot_and_safe_folders(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "model.kernels=torch", "trainer.max_steps=1",
           "trainer.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1",
           f"hydra.sweep.dir={sweep}", "model.dropout=0.0,0.1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all("=" not in j and "," not in j for j in jobs), jobs
    assert jobs[0].startswith("0_") and "model.dropout-0.0" in jobs[0]
    table = (sweep / "sweep_summary.md").read_text()
    assert "| run | model.dropout |" in table and "final val/loss" in table and table in proc.stdout
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["model.dropout"] for r in rows] == ["0.0", "0.1"]
    assert all(r["status"] == "finished" and float(r["final val/loss"]) > 0 and float(r["throughput/s"]) > 0
               for r in rows)
    assert (sweep / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert all((sweep / j / "train.log").is_file() for j in jobs)


def test_train_log_goes_to_run_dir(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3", job_name="train"):
        mine = hydra_compose("train", [f"run_dir={tmp_path / 'mine'}"], return_hydra_config=True)
        default = hydra_compose("train", ["experiment=smoke"], return_hydra_config=True)
    assert mine.hydra.run.dir == str(tmp_path / "mine")  # Hydra's output dir, where train.log goes
    assert default.hydra.run.dir.startswith("runs/smoke/")
