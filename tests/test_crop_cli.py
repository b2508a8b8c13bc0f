"""`deeperfly crop` and `deeperfly remap` through the real command line (issue 12, standalone commands): the
bundled example's 2D of one camera as the detector's predictions, a crop video with its bbox CSV, predictions
made "on the crops" (the truth mapped with the documented formula, independent of deeperfly's code) mapped
back exactly; bad options refused with nothing written."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
CLI = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())"]


def cli(*args, cwd):
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    p = cli("export", DATA / "points2d.h5", "det/pred.csv", cwd=d)
    assert p.returncode == 0, p.stderr
    return d / "det" / "pred_rm.csv"                       # view rm = camera_1.mp4


def test_crop_then_remap_is_exact(tmp_path, detections):
    p = cli("crop", detections, DATA / "camera_1.mp4", "--crop_ratio", "1.5", "--out-size", "64", "128", "-o", "crops", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "crops" / "camera_1_crop.mp4").stat().st_size > 0
    bbox = pd.read_csv(tmp_path / "crops" / "camera_1_bbox.csv", index_col=0)
    assert list(bbox.columns) == ["x", "y", "h", "w", "scale"] and len(bbox) == 64
    np.testing.assert_allclose(bbox.w / bbox.h, 128 / 64)                      # the crop's aspect
    raw = pd.read_csv(detections, header=[0, 1, 2], index_col=0)
    crop = raw.copy()
    for part in dict.fromkeys(raw.columns.get_level_values(1)):               # c = (p - corner + 0.5) * scale - 0.5
        for c, corner, size, n in (("x", bbox.x, bbox.w, 128), ("y", bbox.y, bbox.h, 64)):
            col = (raw.columns[0][0], part, c)
            crop[col] = (raw[col] - corner.to_numpy() + 0.5) * (n / size.to_numpy()) - 0.5
    crop.to_csv(tmp_path / "on_crops.csv")
    p = cli("remap", "on_crops.csv", "crops/camera_1_bbox.csv", "-o", "back.csv", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    back = pd.read_csv(tmp_path / "back.csv", header=[0, 1, 2], index_col=0)
    np.testing.assert_allclose(back.to_numpy(), raw.to_numpy(), atol=1e-6, rtol=0)   # NaN where unseen, likelihood kept


@pytest.mark.parametrize("opts, says", [(["--crop_ratio", "0.8"], "crop_ratio"),
                                        (["--crop_ratio", "2", "--crop_size", "300"], "crop_size")])
def test_crop_refuses_bad_sizing(tmp_path, detections, opts, says):
    p = cli("crop", detections, DATA / "camera_1.mp4", *opts, "-o", "crops", cwd=tmp_path)
    assert p.returncode == 2 and says in p.stderr, p.stderr
    assert not any((tmp_path / "crops").glob("*")) if (tmp_path / "crops").exists() else True
