"""`deeperfly run` applies the review's corrections sidecar (`OUT/corrections.h5`) after the 2D stage: bundle adjustment
and later stages re-run on the corrected 2D (their fingerprints follow its content), detection never does."""
from dataclasses import replace

import numpy as np
import pytest

from conftest import tiny_recording
from deeperfly_nb.config import Config
from deeperfly_nb.core import InputError
from deeperfly_nb.corrections import CORRECTIONS, Correction, Corrections, write_corrections
from deeperfly_nb.results import PoseResult
from deeperfly_nb.run import run_recording


def ran(rep) -> list: return [s.stage for s in rep.stages if s.status == "ran"]


def test_corrections_rerun_only_downstream_stages(tmp_path, torch_one_thread):
    d = tiny_recording(tmp_path, n_frames=6)
    d["pipeline"]["visualization"] = False
    config, rec, out = Config.from_dict(d), tmp_path / "rec", tmp_path / "out"
    assert ran(run_recording(rec, out, config, progress=False)) == ["pose2d", "bundle_adjustment", "triangulation"]
    before = PoseResult.load(out / "results.h5")
    raw = PoseResult.load(out / "pose2d.h5")
    views, points = list(config.view_names), list(config.skeleton().point_names)
    cs = Corrections(views, points, raw.n_frames, "fly38")
    cs.add(Correction("rf", 2, points[3], 123.25, 45.5))
    cs.add(Correction("lh", 4, points[7], float("nan"), float("nan")))      # marked unseen
    write_corrections(out / CORRECTIONS, cs)
    rep = run_recording(rec, out, config, progress=False)
    assert ran(rep) == ["bundle_adjustment", "triangulation"], rep         # detection is reused
    assert {s.stage: s.status for s in rep.stages}["corrections"] == "applied"
    after = PoseResult.load(out / "results.h5")
    v, n = views.index("rf"), 3
    np.testing.assert_array_equal(after.pts2d[v, 2, n], [123.25, 45.5]); assert after.conf[v, 2, n] == 1.0
    assert np.isnan(after.pts2d[views.index("lh"), 4, 7]).all() and after.conf[views.index("lh"), 4, 7] == 0.0
    untouched = np.ones(raw.conf.shape, bool); untouched[v, 2, n] = untouched[views.index("lh"), 4, 7] = False
    np.testing.assert_array_equal(after.pts2d[untouched], raw.pts2d[untouched])
    np.testing.assert_array_equal(PoseResult.load(out / "pose2d.h5").pts2d, raw.pts2d, "the detections file stays as detected")
    assert ran(run_recording(rec, out, config, progress=False)) == []        # the same corrections: cached
    detected = (out / "pose2d.h5").read_bytes()
    with pytest.raises(InputError, match=r"it is for 6 frames, this recording has 3 \(this run's --max-frames 3\): run without"):
        run_recording(rec, out, config, progress=False, max_frames=3)             # refused before detection replaces anything
    assert (out / "pose2d.h5").read_bytes() == detected
    (out / CORRECTIONS).unlink()
    assert ran(run_recording(rec, out, config, progress=False)) == ["bundle_adjustment", "triangulation"]
    np.testing.assert_array_equal(PoseResult.load(out / "results.h5").pts3d, before.pts3d)


def test_a_sidecar_of_another_recording_is_refused(tmp_path, torch_one_thread):
    d = tiny_recording(tmp_path, n_frames=6)
    d["pipeline"].update(visualization=False, pose2d=False)                  # the recording's 2D file: no detection
    config, out = Config.from_dict(d), tmp_path / "out"
    out.mkdir()
    write_corrections(out / CORRECTIONS, Corrections(list(config.view_names), list(config.skeleton().point_names), 50, "fly38"))
    with pytest.raises(InputError, match="corrections.h5 belongs to another recording or skeleton: it is for 50 frames"):
        run_recording(tmp_path / "rec", out, config, progress=False)
    # the same rig and length, made over another recording's detections (a sidecar copied from its folder): refused
    views, points = list(config.view_names), list(config.skeleton().point_names)
    other = Corrections(views, points, 6, "fly38", "0" * 32, recording=str(tmp_path / "other_rec"))
    other.add(Correction("rf", 2, points[3], 123.25, 45.5))
    write_corrections(out / CORRECTIONS, other)
    with pytest.raises(InputError, match=r"of recording .*other_rec, and these are of .*rec: a sidecar of another recording\?"):
        run_recording(tmp_path / "rec", out, config, progress=False)
    # made over earlier detections of this very recording: applied over the ones it has now
    write_corrections(out / CORRECTIONS, replace(other, recording=str(tmp_path / "rec")))
    run_recording(tmp_path / "rec", out, config, progress=False)
    np.testing.assert_array_equal(PoseResult.load(out / "results.h5").pts2d[views.index("rf"), 2, 3], [123.25, 45.5])


def test_the_reviewer_restores_corrupted_points_of_the_bundled_example(tmp_path, torch_one_thread):
    """Issue 18's loop end to end on the bundled example: a few points of one view corrupted in the recording's 2D, moved
    back in the `Reviewer`, then `deeperfly run` again: only the stages after the 2D re-run and the 3D error against the
    truth is the uncorrupted run's."""
    import shutil
    from deeperfly_nb.review import Reviewer
    from deeperfly_nb.results import ground_truth_error
    from deeperfly_nb.testing import repo_root
    ex = repo_root() / "examples" / "data"
    d = Config.default().to_dict(); d["pipeline"].update(pose2d=False, visualization=False)
    config, truth = Config.from_dict(d), PoseResult.load(ex / "ground_truth.h5")
    clean, bad = tmp_path / "clean", tmp_path / "bad"
    for rec in (clean, bad):
        rec.mkdir()
        for f in ex.glob("camera_*.mp4"): (rec / f.name).symlink_to(f)
    shutil.copy(ex / "points2d.h5", clean / "points2d.h5")
    det = PoseResult.load(ex / "points2d.h5")
    v = det.view_names.index("rf")
    hits = [(t, n) for t in (5, 17, 40) for n in np.flatnonzero(np.isfinite(det.pts2d[v, t]).all(-1))[:2]]
    pts = det.pts2d.copy()
    for t, n in hits: pts[v, t, n] += (60.0, -40.0)
    PoseResult(pts, det.conf, det.cameras, det.skeleton, fps=det.fps, meta=det.meta).save(bad / "points2d.h5")
    err = lambda out: ground_truth_error(PoseResult.load(out / "results.h5"), truth.pts3d)["overall"]["median"]
    run_recording(clean, tmp_path / "out_clean", config, progress=False)
    run_recording(bad, tmp_path / "out_bad", config, progress=False)
    e_clean, e_bad = err(tmp_path / "out_clean"), err(tmp_path / "out_bad")
    ts, ns = np.array(hits).T
    X_clean = PoseResult.load(tmp_path / "out_clean" / "results.h5").pts3d
    moved = lambda out: np.linalg.norm(PoseResult.load(out / "results.h5").pts3d[ts, ns] - X_clean[ts, ns], axis=-1).max()
    assert e_bad > e_clean and moved(tmp_path / "out_bad") > 0.02, (e_bad, e_clean, moved(tmp_path / "out_bad"))
    print(f"median 3D error: clean {e_clean:.6f}, corrupted {e_bad:.6f}; corrupted points off by up to {moved(tmp_path / 'out_bad'):.4f}")
    rv = Reviewer(tmp_path / "out_bad")
    for t, n in hits: rv.move("rf", t, int(n), *det.pts2d[v, t, n])
    rep = run_recording(bad, tmp_path / "out_bad", config, progress=False)
    assert ran(rep) == ["bundle_adjustment", "triangulation"], rep
    np.testing.assert_allclose(err(tmp_path / "out_bad"), e_clean, rtol=1e-3)   # moved points get confidence 1: not bit-equal
    # the moved points are back where the clean run put them, within the pull of their confidence 1 (the clean run's
    # detections had their own) in the confidence-weighted triangulation: a few thousandths, the corruption moved them 0.37
    assert moved(tmp_path / "out_bad") < 3e-3
    np.testing.assert_allclose(PoseResult.load(tmp_path / "out_bad" / "results.h5").pts3d, X_clean, atol=3e-3)
