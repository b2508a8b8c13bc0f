"""`deeperfly run` with `[pipeline] refinement = true` (issue 14): the refinement stage comes after triangulation, writes
results.h5 (the triangulated result goes to triangulated.h5), is cached, and editing [refinement] re-runs only it (and the
3D video); `inspect` reports what refinement changed."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from conftest import tiny_recording
from deeperfly_nb.results import PoseResult

CLI = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())"]


def run(*args, cwd):
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def finished(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text())["finished_utc"] for p in (out / ".deeperfly").glob("*.json")
            if p.stem not in ("digests", "weights", "recording")}


def test_refinement_stage_is_cached_and_reported(tmp_path):
    d = tiny_recording(tmp_path, n_frames=12)
    d["pipeline"].update(pose2d=False, refinement=True)              # the recording's exact 2D (points2d.h5) with its noise
    (tmp_path / "config.toml").write_text(tomli_w.dumps(d))
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    for f in ("triangulated.h5", "results.h5", "refinement.h5"): assert (out / f).is_file(), f
    tri, ref = PoseResult.load(out / "triangulated.h5"), PoseResult.load(out / "results.h5")
    rec = ref.meta["refinement"]
    assert np.nanmedian(np.array(rec["bone_cv_after"], float)) < np.nanmedian(np.array(rec["bone_cv_before"], float))
    assert ref.provenance["config"]["refinement"]["smooth_order"] == 3 and "refinement" not in tri.provenance["config"]
    first = finished(out)
    d["refinement"] = {"smooth_weight": 1.0}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(d))
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    now = finished(out)
    assert now["triangulation"] == first["triangulation"] and now["bundle_adjustment"] == first["bundle_adjustment"]
    assert now["refinement"] != first["refinement"]
    assert PoseResult.load(out / "results.h5").provenance["config"]["refinement"]["smooth_weight"] == 1.0
    p = run("inspect", "out/results.h5", cwd=tmp_path)
    assert p.returncode == 0 and "refinement: bone-length CV median" in p.stdout, p.stdout[-2000:]
    thorax = [f"{s}{l}_body_coxa" for s in "lr" for l in "fmh"]
    d["refinement"] = {"rigid_groups": [thorax], "max_nfev": 30}      # a rigid thorax: only refinement re-runs
    (tmp_path / "config.toml").write_text(tomli_w.dumps(d))
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rigid = finished(out)
    assert rigid["triangulation"] == first["triangulation"] and rigid["refinement"] != now["refinement"]
    res = PoseResult.load(out / "results.h5")
    assert res.provenance["config"]["refinement"]["rigid_groups"] == [thorax]
    X = res.pts3d[:, res.skeleton.index(thorax)]
    span = np.linalg.norm(X[:, :, None] - X[:, None], axis=-1)[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]]
    assert np.nanmedian(np.nanstd(span, 0) / np.nanmean(span, 0)) < 0.01   # the thorax keeps its shape (the truth is rigid)
    p = run("inspect", "out/results.h5", cwd=tmp_path)
    assert p.returncode == 0 and "rigid groups: distance CV median" in p.stdout and "over 15 point pairs" in p.stdout, p.stdout[-2000:]
    before = (out / "results.h5").stat().st_mtime_ns
    d["refinement"] = {"rigid_groups": [thorax[:5] + ["rh_body_coxx"]], "max_nfev": 30}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(d))
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 2 and "refinement.rigid_groups[0][5]: 'rh_body_coxx' is not a point of skeleton" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and (out / "results.h5").stat().st_mtime_ns == before


def test_refinement_options_with_the_stage_off_are_named(tmp_path):
    """A [refinement] table that sets options while [pipeline] refinement = false would be silently unused: the run
    says so (and still runs); with the stage off and no options, nothing is said."""
    d = tiny_recording(tmp_path, n_frames=8)
    d["pipeline"].update(pose2d=False, refinement=False, visualization=False)
    (tmp_path / "config.toml").write_text(tomli_w.dumps(d))
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0 and "[refinement] sets options" not in p.stderr, p.stderr[-3000:]
    d["refinement"] = {"reweight_passes": 3, "smooth_weight": 1.0}
    (tmp_path / "config.toml").write_text(tomli_w.dumps(d))
    p = run("run", "rec", "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[refinement] sets options, but the refinement stage is off ([pipeline] refinement = false" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "out" / "refinement.h5").exists()


def _ran(rep) -> list: return [s.stage for s in rep.stages if s.status == "ran"]


def test_refinement_turned_off_and_on_again(tmp_path):
    """Turning [pipeline] refinement off and on again: the run without it removes the refined run's triangulated.h5 and
    refinement.h5 (stale beside its results.h5), and the refined run after it finds no file it did not write."""
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=8)
    d["pipeline"].update(pose2d=False, visualization=False)
    rec, out = tmp_path / "rec", tmp_path / "out"
    for refine in (True, False, True):
        d["pipeline"]["refinement"] = refine
        assert "triangulation" in _ran(run_recording(rec, out, Config.from_dict(d), progress=False)), refine
        assert (out / "triangulated.h5").exists() == (out / "refinement.h5").exists() == refine   # no stale 3D beside results.h5
    assert PoseResult.load(out / "results.h5").meta.get("refinement") is not None


def test_filters_and_kalman_are_wired_and_fingerprinted(tmp_path, torch_one_thread):
    "[filters] (2D, before triangulation) re-run triangulation and refinement only; [refinement] kalman re-runs refinement only."
    from deeperfly_nb.config import Config
    from deeperfly_nb.pipeline import load_points2d
    from deeperfly_nb.refinement import kalman_smooth_3d
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=24)
    d["pipeline"].update(pose2d=False, refinement=False)
    rec, out = tmp_path / "rec", tmp_path / "out"
    go = lambda: run_recording(rec, out, Config.from_dict(d), progress=False)
    assert _ran(go()) == ["bundle_adjustment", "triangulation"]
    d["pipeline"]["refinement"] = True                                # the triangulated 3D moves to triangulated.h5
    assert _ran(go()) == ["triangulation", "refinement"]
    base = PoseResult.load(out / "results.h5")
    conf0 = load_points2d(rec).conf                                   # the recording's own 2D file
    cut = float(np.nanquantile(conf0, 0.3))                           # drops about 30% of the detections
    with np.errstate(invalid="ignore"): low = ~(conf0 >= cut)         # (a NaN confidence counts as low)
    d["filters"] = {"min_confidence": cut, "median_window": 5, "median_threshold_px": 15.0}
    assert _ran(go()) == ["triangulation", "refinement"]              # bundle adjustment reads the unfiltered 2D
    tri = PoseResult.load(out / "triangulated.h5")
    assert np.isnan(tri.pts2d[low]).all() and low.sum() > 0
    dropped = tri.meta["filters"]["dropped"]
    assert dropped["min_confidence"] == int((low & np.isfinite(load_points2d(rec).pts2d).all(-1)).sum()), dropped
    assert tri.provenance["config"]["filters"]["median_window"] == 5
    assert _ran(go()) == []                                           # cached
    filtered = PoseResult.load(out / "results.h5")
    d["refinement"] = {"kalman": "velocity"}
    assert _ran(go()) == ["refinement"]
    smoothed = PoseResult.load(out / "results.h5")
    jerk = lambda X: np.nanmedian(np.abs(np.diff(X, 2, axis=0)))
    assert jerk(smoothed.pts3d) < jerk(filtered.pts3d), (jerk(smoothed.pts3d), jerk(filtered.pts3d))
    d["refinement"] = {"kalman": "velocity", "least_squares": False}  # the smoother alone, on the triangulated 3D
    assert _ran(go()) == ["refinement"]
    only = PoseResult.load(out / "results.h5")
    np.testing.assert_allclose(only.pts3d, kalman_smooth_3d(PoseResult.load(out / "triangulated.h5").pts3d, "velocity"), equal_nan=True)
    assert only.meta["refinement"]["filled_frac"] >= 0 and len(only.meta["refinement"]["bone_cv_after"]) == len(base.skeleton.bones)
    assert not np.array_equal(base.pts3d, filtered.pts3d, equal_nan=True)
