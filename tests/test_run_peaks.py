"""`[filters] peaks` in `deeperfly run` (issue 14's multi-hypothesis peaks): detection keeps the detector's top-K candidate
peaks (pose2d_candidates.h5) only when a selection asks for them; "multiview" (`refinement.select_peaks` with the rig)
undoes left/right swaps injected into the front view; caching re-runs detection only for missing candidates, and a
selection scale only from triangulation on; a bad `peaks` value is a clear config error.

On the bundled example (`examples/data`: synthetic footage with its ground truth), with the bundled detector."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from conftest import EXAMPLE
from deeperfly_nb.results import PoseResult

CLI = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())"]
FRAMES = 16                                         # detection on 16 frames x 8 pathways: seconds on one CPU thread


def cli(*args, cwd):
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def config_dict(**filters) -> dict:
    "The example's config without videos, with these [filters]."
    d = tomllib.loads((EXAMPLE / "config.toml").read_text())
    d["pipeline"]["visualization"] = False
    d["filters"] = {**d.get("filters", {}), **filters}
    return d


def ran(report) -> list: return [s.stage for s in report.stages if s.status == "ran"]


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    """The example detected twice into one folder: first with peaks = "top1" (no candidates kept), then "multiview"
    (detection re-runs once to keep them): (output folder, [ran stages of each run], the first run's pose2d.h5)."""
    import torch
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("peaks") / "out"
    go = lambda **f: run_recording(EXAMPLE, out, Config.from_dict(config_dict(**f)), max_frames=FRAMES, progress=False)
    first = go()
    top1 = PoseResult.load(out / "pose2d.h5")
    second = go(peaks="multiview")
    return out, go, [ran(first), ran(second)], top1


def test_candidates_kept_only_when_asked(detected):
    from deeperfly_nb.run import CANDIDATES, load_candidates, stored_candidates
    out, go, (first, second), top1 = detected
    assert first == ["pose2d", "bundle_adjustment", "triangulation"]
    assert second == ["pose2d", "triangulation"]            # the same best peaks: bundle adjustment is reused
    p2d = PoseResult.load(out / "pose2d.h5")
    np.testing.assert_array_equal(p2d.pts2d, top1.pts2d)     # keeping candidates changes no detection
    np.testing.assert_array_equal(p2d.conf, top1.conf)
    assert stored_candidates(out) == 3
    cands, scores = load_candidates(out / CANDIDATES, p2d.view_names, 3, p2d.pts2d.shape[:3])
    seen = np.isfinite(p2d.pts2d).all(-1)
    assert seen.sum() > 1000
    gap = np.abs(cands[..., 0, :][seen] - p2d.pts2d[seen]).max()
    print(f"\ncandidate 0 vs the top-1 point over {seen.sum()} detections: max {gap:.2e} px")
    assert gap < 1e-6                                       # the subpixel decoder: candidate 0 is the top-1 point
    assert np.median(scores[seen][:, 0]) > 10 * np.median(scores[seen][:, 1])   # (ranked by the blurred map: best first)
    assert np.isfinite(cands[..., 1, :][seen]).mean() > 0.9  # second peaks exist (weaker ones)


def test_rerun_caching(detected):
    "peaks/top_k re-run detection only when candidates are missing; the selection's scales re-run from triangulation on."
    out, go, _, _ = detected
    assert ran(go(peaks="multiview")) == []                             # unchanged: all cached
    assert ran(go(peaks="viterbi")) == ["triangulation"]                # another selection over the same candidates
    assert ran(go(peaks="viterbi", top_k=2)) == ["triangulation"]       # fewer: the best 2 of the 3 kept
    assert ran(go(peaks="multiview", multiview_sigma_px=4.0)) == ["triangulation"]
    assert ran(go()) == ["triangulation"]                               # back to top-1: candidates unused, not re-detected
    assert ran(go(peaks="multiview", top_k=4)) == ["pose2d", "triangulation"]   # more than kept: detect once more
    from deeperfly_nb.run import stored_candidates
    assert stored_candidates(out) == 4


def _front_swaps(p2d: PoseResult, cands, scores, frac: float, seed: int):
    """Left/right swaps in the front view `f` (it sees both sides): in `frac` of the (frame, point)s its best peak becomes
    the mirror point's detection and the point's own peaks follow, weaker. Returns the new arrays and the points."""
    f = p2d.view_names.index("f")
    seen = np.isfinite(p2d.pts2d[f]).all(-1).any(0)
    pts = np.array([p for p in range(p2d.n_points) if seen[p] and seen[(p + 19) % 38]])
    swap = np.random.default_rng(seed).random((p2d.n_frames, len(pts))) < frac
    pts2d, conf, c, s = p2d.pts2d.copy(), p2d.conf.copy(), cands.copy(), scores.copy()
    for j, (p, q) in enumerate(zip(pts, (pts + 19) % 38)):
        t = np.flatnonzero(swap[:, j])
        c[f, t, p] = np.concatenate([cands[f, t, q, :1], cands[f, t, p, :-1]], 1)
        s[f, t, p] = np.concatenate([scores[f, t, p, :1], 0.7 * scores[f, t, p, :-1]], 1)
        pts2d[f, t, p], conf[f, t, p] = c[f, t, p, 0], s[f, t, p, 0]
    return pts2d, conf, c, s, f, pts


def test_multiview_selection_fixes_front_view_swaps(detected, tmp_path):
    "`deeperfly run` with [filters] peaks = \"multiview\": swap rate after <= 1/5 of the top-1 decoder's (ground truth)."
    from deeperfly_nb.run import CANDIDATES, load_candidates, save_candidates
    out = detected[0]
    p2d = PoseResult.load(out / "pose2d.h5")
    cands, scores = load_candidates(out / CANDIDATES, p2d.view_names, 3, p2d.pts2d.shape[:3])
    pts2d, conf, c, s, f, pts = _front_swaps(p2d, cands, scores, 0.25, seed=0)
    rec = tmp_path / "rec"; rec.mkdir()                     # the swapped 2D and its candidates, as a recording's 2D file
    PoseResult(pts2d, conf, p2d.cameras, p2d.skeleton, fps=p2d.fps).save(rec / "pose2d.h5")      # beside pose2d_candidates.h5: the 2D file search must skip that
    save_candidates(rec / CANDIDATES, c, s, p2d.view_names)
    truth = PoseResult.load(EXAMPLE / "ground_truth.h5").pts2d[f, :FRAMES]
    def swap_rate(q):
        d_self = np.linalg.norm(q[f][:, pts] - truth[:, pts], axis=-1)
        d_mirror = np.linalg.norm(q[f][:, pts] - truth[:, (pts + 19) % 38], axis=-1)
        return float(np.mean(d_mirror < d_self))
    rates = {}
    for peaks in ("top1", "multiview"):
        d = config_dict(peaks=peaks); d["pipeline"]["pose2d"] = False
        (tmp_path / f"{peaks}.toml").write_text(tomli_w.dumps(d))
        p = cli("-q", "run", "rec", "-c", f"{peaks}.toml", "-o", f"out_{peaks}", "--no-progress", cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        rates[peaks] = swap_rate(PoseResult.load(tmp_path / f"out_{peaks}" / "results.h5").pts2d)
    moved = PoseResult.load(tmp_path / "out_multiview" / "results.h5").meta["filters"]["dropped"]["peaks"]
    print(f"\nfront-view left/right swap rate over {len(pts)} points x {FRAMES} frames: top-1 {100 * rates['top1']:.1f}%, "
          f"multiview {100 * rates['multiview']:.1f}% ({moved} detections moved to another peak); the detector alone "
          f"{100 * swap_rate(p2d.pts2d):.1f}%")
    assert 0.15 < rates["top1"] < 0.35
    assert rates["multiview"] <= rates["top1"] / 5


def test_bad_peaks_and_missing_candidates(tmp_path):
    d = config_dict(peaks="best")
    (tmp_path / "bad.toml").write_text(tomli_w.dumps(d))
    p = cli("run", EXAMPLE, "-c", "bad.toml", "-o", "out", cwd=tmp_path)
    assert p.returncode == 2 and "filters.peaks" in p.stderr and "unknown peak selection 'best'" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()
    d = config_dict(peaks="viterbi", top_k=1)
    (tmp_path / "k1.toml").write_text(tomli_w.dumps(d))
    p = cli("run", EXAMPLE, "-c", "k1.toml", "-o", "out", cwd=tmp_path)
    assert p.returncode == 2 and "top_k must be >= 2" in p.stderr, p.stderr[-2000:]
    rec = tmp_path / "rec"; rec.mkdir()                     # 2D from a file without candidates beside it
    shutil.copy(EXAMPLE / "points2d.h5", rec / "points2d.h5")
    d = config_dict(peaks="multiview"); d["pipeline"]["pose2d"] = False
    (tmp_path / "file.toml").write_text(tomli_w.dumps(d))
    p = cli("run", "rec", "-c", "file.toml", "-o", "out2", cwd=tmp_path)
    assert p.returncode != 0 and "pose2d_candidates.h5" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
