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
            if p.stem not in ("digests", "weights")}


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
