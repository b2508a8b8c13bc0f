"""`deeperfly run` on a cropzoom config (issue 12, "In the plan"): one config runs detector -> boxes -> pose model, caches
each stage (the detector's points in detector.h5, the boxes in crops/*_bbox.csv, the pose points in pose2d.h5), and
writes the pose points in the raw views' pixels; changing the crop re-runs the crops and the pose model, not the detector."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch

from conftest import tiny_recording
from test_cropzoom_plan import FINDER_HW, cropzoom_tables
from deeperfly_nb.config import Config
from deeperfly_nb.detector import HourglassNet, save_checkpoint
from deeperfly_nb.results import PoseResult

CLI = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())"]


def run(*args, cwd):
    p = subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return p


def stages(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text())["finished_utc"] for p in (out / ".deeperfly").glob("*.json")
            if p.stem not in ("digests", "weights", "recording")}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("cz")
    d = cropzoom_tables(tiny_recording(root, n_frames=4))
    torch.manual_seed(3)
    save_checkpoint(root / "finder.pt", HourglassNet(n_stacks=1, n_blocks=1, n_features=8, n_out_channels=19, n_stem_features=8), {"input_size": FINDER_HW})
    d["pipeline"]["visualization"] = False
    (root / "config.toml").write_text(tomli_w.dumps(d))
    return root, d


def test_cropzoom_run_caches_each_stage(project):
    root, d = project
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    out = root / "out"
    assert (out / "detector.h5").is_file() and (out / "pose2d.h5").is_file() and (out / "results.h5").is_file()
    bbox = sorted(f.name for f in (out / "crops").glob("*_bbox.csv"))
    assert bbox == sorted(f"{pw['name']}_bbox.csv" for pw in d["pose2d"]["pathways"] if pw.get("crop_from")), bbox
    t = pd.read_csv(out / "crops" / "rh_bbox.csv", index_col=0)
    assert list(t.columns) == ["x", "y", "h", "w", "scale"] and len(t) == 4 and np.allclose(t.h, 200)   # crop_size 200
    res = PoseResult.load(out / "pose2d.h5")                       # pose points in raw pixels: inside (or near) each box
    x = res.pts2d[0, :, :, 0]
    assert np.all((x >= t.x.to_numpy()[:, None] - 1) & (x <= (t.x + t.w).to_numpy()[:, None] + 1) | np.isnan(x))
    first = stages(out)
    assert {"detector", "pose2d", "triangulation"} <= set(first)
    # again: everything reused
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=root)
    assert p.returncode == 0 and stages(out) == first, p.stdout
    assert "detector" in p.stdout and "reused" in p.stdout
    # a different crop: the detector is reused, the crops and the pose model run again
    d2 = json.loads(json.dumps(d)); d2["pose2d"]["preprocessors"][0]["crop_size"] = 240; d2["pose2d"]["preprocessors"][1]["crop_size"] = 240
    (root / "config2.toml").write_text(tomli_w.dumps(d2))
    p = run("run", "rec", "-c", "config2.toml", "-o", "out", "--no-progress", cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    now = stages(out)
    assert now["detector"] == first["detector"] and now["pose2d"] != first["pose2d"]
    assert np.allclose(pd.read_csv(out / "crops" / "rh_bbox.csv", index_col=0).h, 240)
    # the inspect report draws the boxes over time
    p = run("inspect", "out/results.h5", "--plot", "out/report.html", cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Crop boxes over time (cropzoom)" in (out / "report.html").read_text()
    # a plan without cropzoom run into the same folder: its report draws none of the crops an earlier run left
    plain = Config.default().to_dict()
    plain["pose2d"]["models"][0]["weights"] = str(root / "w.pt"); plain["pipeline"]["visualization"] = False
    (root / "plain.toml").write_text(tomli_w.dumps(plain))
    assert run("run", "rec", "-c", "plain.toml", "-o", "out", "--no-progress", cwd=root).returncode == 0
    assert (out / "crops" / "rh_bbox.csv").is_file()
    p = run("inspect", "out/results.h5", "--plot", "out/report.html", cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Crop boxes over time" not in (out / "report.html").read_text()
