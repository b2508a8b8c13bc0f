"""The reviewer driven through its Python API on a synthetic recording with known 3D: simulated drags, unseen marks,
restores and undo; the sidecar on disk, the re-triangulated 3D and every view's reprojection are checked against the
recording's ground truth (exact projections of the true 3D through the true rig), not against the reviewer's own code."""
import math, os, shutil, warnings
from pathlib import Path
import h5py
import numpy as np
import pytest
from deeperfly_nb.core import InputError
from deeperfly_nb.results import PoseResult
from deeperfly_nb.corrections import (CORRECTIONS, Corrections, Correction, read_corrections, write_corrections,
                                      apply_corrections, corrections_to_labels)

pytest.importorskip("anywidget", reason="the reviewer needs anywidget and ipywidgets (pip install anywidget ipywidgets)")
from deeperfly_nb.review import Reviewer, worst_frames


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    "A 6-frame synthetic recording and an output folder whose results.h5 is triangulated through the TRUE rig."
    from deeperfly_nb.synth_footage import synth_recording
    from deeperfly_nb.pipeline import load_points2d, triangulate_points2d
    root = tmp_path_factory.mktemp("review")
    rec = synth_recording(root / "rec", n_frames=6, seed=3)
    gt = PoseResult.load(rec / "ground_truth.h5")
    with h5py.File(rec / "ground_truth.h5") as f: true2d = f["render/pts2d_all"][()]
    det = load_points2d(rec / "points2d.h5")
    assert list(det.view_names) == gt.view_names
    res = triangulate_points2d(gt.cameras, gt.skeleton, det.pts2d, det.conf, meta={"recording": str(rec)})
    (root / "out").mkdir()
    res.save(root / "out" / "results.h5")
    return {"rec": rec, "out": root / "out", "truth3d": gt.pts3d, "true2d": true2d, "det": det, "result": res, "root": root}


@pytest.fixture
def out(recording, tmp_path):
    "A fresh copy of the output folder (no sidecar yet)."
    dst = tmp_path / "out"
    shutil.copytree(recording["out"], dst)
    return dst


def seen_by(result, t, n):
    "Views that detect point n in frame t."
    return list(np.flatnonzero(np.isfinite(result.pts2d[:, t, n]).all(-1)))


def test_moving_to_the_truth_gives_the_true_3d_and_reprojection(recording, out):
    rv = Reviewer(out, author="tester")
    r, truth3d, true2d = rv.result, recording["truth3d"], recording["true2d"]
    t, n = 3, int(np.argmax([len(seen_by(r, 3, k)) for k in range(r.n_points)]))
    views = seen_by(r, t, n)
    assert len(views) >= 2
    err0 = np.linalg.norm(r.pts3d[t, n] - truth3d[t, n])
    assert err0 > 1e-4, "the simulated detections are noisy, so the 3D is off the truth before correcting"
    for v in views: rv.move(r.view_names[v], t, n, *true2d[v, t, n])
    # exact projections through the true rig triangulate to the true point, and reproject onto themselves in EVERY view
    np.testing.assert_allclose(rv.result.pts3d[t, n], truth3d[t, n], atol=1e-6)
    np.testing.assert_allclose(rv.result.reproj_error[views, t, n], 0, atol=1e-4)
    rep = rv.frame_state(t)["reproj"]
    for v in range(r.n_views): np.testing.assert_allclose(rep[v][n], true2d[v, t, n], atol=6e-3)   # shown to 0.01 px
    # other frames and points are untouched
    np.testing.assert_array_equal(rv.result.pts3d[t - 1], recording["result"].pts3d[t - 1])
    # the sidecar on disk holds exactly these moves, with their author and the detector's values they replace
    cs = read_corrections(out / CORRECTIONS, r.view_names, r.skeleton.point_names, r.n_frames)
    assert sorted((c.view, c.frame, c.point) for c in cs) == sorted((r.view_names[v], t, r.skeleton.point_names[n]) for v in views)
    for c in cs:
        v = r.view_names.index(c.view)
        np.testing.assert_allclose([c.x, c.y], true2d[v, t, n])
        np.testing.assert_allclose(c.detected[:2], recording["det"].pts2d[v, t, n])
        assert c.author == "tester" and c.time.endswith("Z")


def test_a_wrong_drag_raises_the_error_and_undo_restores_everything(recording, out):
    rv = Reviewer(out)
    r0, t = recording["result"], 2
    n = int(np.argmax([len(seen_by(r0, t, k)) for k in range(r0.n_points)]))
    v = seen_by(r0, t, n)[0]
    x, y = r0.pts2d[v, t, n]
    rv.goto(t)
    assert rv.canvas.state["flags"][v][n] == 0 and rv.canvas.frame == t
    rv.canvas.drag = {"view": r0.view_names[v], "point": n, "frame": t, "x": x + 60, "y": y, "seq": 1}   # as the browser does
    assert rv.corrections.get(r0.view_names[v], t, r0.skeleton.point_names[n]).x == pytest.approx(x + 60)
    e3d = np.linalg.norm(rv.result.pts3d[t, n] - recording["truth3d"][t, n])
    assert e3d > 5 * np.linalg.norm(r0.pts3d[t, n] - recording["truth3d"][t, n])
    assert np.nanmax(rv.result.reproj_error[:, t, n]) > 10
    assert rv.canvas.state["flags"][v][n] == 1
    rv.mark_unseen(r0.view_names[v], t, n)
    assert np.isnan(rv.result.pts2d[v, t, n]).all() and rv.result.conf[v, t, n] == 0
    assert np.isnan(rv.result.reproj_error[v, t, n])
    rv.undo()                                            # back to the drag, not to the detection
    assert rv.result.pts2d[v, t, n].tolist() == pytest.approx([x + 60, y]) and rv.result.conf[v, t, n] == 1
    assert np.linalg.norm(rv.result.pts3d[t, n] - recording["truth3d"][t, n]) == pytest.approx(e3d)
    rv.undo()
    np.testing.assert_array_equal(rv.result.pts3d[t], r0.pts3d[t])
    np.testing.assert_array_equal(rv.result.pts2d, r0.pts2d)
    assert len(read_corrections(out / CORRECTIONS, r0.view_names, r0.skeleton.point_names, r0.n_frames)) == 0
    with pytest.raises(InputError, match="nothing to undo"): rv.undo()


def test_restore_and_reopen(recording, out):
    rv = Reviewer(out)
    r0 = recording["result"]
    rv.move("rh", 1, 29, 100, 200); rv.move("lh", 4, 10, 10, 20); rv.mark_unseen("rf", 4, 25)
    rv.restore("rh", 1, 29)
    np.testing.assert_array_equal(rv.result.pts2d[0, 1, 29], r0.pts2d[0, 1, 29])
    again = Reviewer(out)                        # a new session reads the sidecar and re-triangulates its frames
    assert len(again.corrections) == 2
    np.testing.assert_array_equal(again.result.pts3d, rv.result.pts3d)
    np.testing.assert_array_equal(again.result.pts2d, rv.result.pts2d)
    # what `deeperfly run` will do (apply the sidecar over the detections, triangulate) gives the reviewer's 3D
    from deeperfly_nb.triangulation import triangulate
    cs = read_corrections(out / CORRECTIONS, r0.view_names, r0.skeleton.point_names, r0.n_frames)
    p, c = apply_corrections(recording["det"].pts2d, recording["det"].conf, cs)
    np.testing.assert_allclose(triangulate(r0.cameras, p, c), again.result.pts3d, atol=1e-9)


def test_worst_frames_finds_a_corrupted_detection(recording, out):
    rv = Reviewer(out)
    r0, t = rv.result, 5                                  # the cleanest frame of this recording's simulated detections
    before = [f for f, _, _ in worst_frames(r0, 6)]
    assert before[0] != t
    n = int(np.argmax([len(seen_by(r0, t, k)) for k in range(r0.n_points)]))
    v = seen_by(r0, t, n)[0]
    x, y = r0.pts2d[v, t, n]
    rv.move(v, t, n, x + 400 if x < 480 else x - 400, y)
    frame, _, why = worst_frames(rv.result, 3)[0]
    assert frame == t and "reprojection" in why and r0.skeleton.point_names[n] in why
    assert rv.worst.options[0][1] == t                   # the list in the widget follows the change


def test_bad_corrections_are_refused(recording, out):
    rv = Reviewer(out)
    with pytest.raises(InputError, match="outside the 960x480 image"): rv.move("rh", 1, 29, 2000, 10)
    with pytest.raises(InputError, match="frame outside"): rv.move("rh", 6, 29, 10, 10)
    with pytest.raises(InputError, match="unknown view"): rv.move("xx", 1, 29, 10, 10)
    with pytest.raises(InputError, match="view 'rh' reports no 'lf_body_coxa' in any frame"): rv.move("rh", 1, 0, 10, 10)
    rv.canvas.drag = {"view": "rh", "point": 29, "frame": 1, "x": -50.0, "y": 10.0, "seq": 1}
    assert "outside" in rv.status.value and len(rv.corrections) == 0


def test_a_sidecar_of_another_recording_or_skeleton_is_refused(recording, out, tmp_path):
    r0 = recording["result"]
    n = int(np.flatnonzero(np.isfinite(r0.pts2d[0, 1]).all(-1))[0])          # a point view rh detects in frame 1
    rv = Reviewer(out); rv.move("rh", 1, n, 100, 200)
    # the same rig and length but other detections: another recording's sidecar copied here
    other = tmp_path / "other"; other.mkdir()
    p = r0.pts2d + 0.5                                   # every detection half a pixel off
    PoseResult(p, r0.conf, r0.cameras, r0.skeleton, pts3d=r0.pts3d, meta={**r0.meta, "recording": str(tmp_path / "fly2")}).save(other / "results.h5")
    shutil.copy(out / CORRECTIONS, other / CORRECTIONS)
    with pytest.raises(InputError, match="other detections .* a sidecar of another recording"): Reviewer(other)
    # the same recording, its detector run again: the corrections still hold, over the new detections
    again = tmp_path / "again"; again.mkdir()
    for name in ("pose2d.h5", "results.h5"):                                # its new detections (and a result of them)
        PoseResult(p, r0.conf, r0.cameras, r0.skeleton, pts3d=r0.pts3d, meta=r0.meta).save(again / name)
    shutil.copy(out / CORRECTIONS, again / CORRECTIONS)
    rv2 = Reviewer(again)
    assert len(rv2.corrections) == 1 and rv2.result.pts2d[0, 1, n].tolist() == [100, 200]
    assert rv2.corrections.get("rh", 1, r0.skeleton.point_names[n]).detected[:2] == tuple(p[0, 1, n])   # remembers the new detection
    rv2.close()
    # another length
    short = tmp_path / "short"; short.mkdir()
    PoseResult(r0.pts2d[:, :5], r0.conf[:, :5], r0.cameras, r0.skeleton, meta=r0.meta).save(short / "results.h5")
    shutil.copy(out / CORRECTIONS, short / CORRECTIONS)
    with pytest.raises(InputError, match="another recording or skeleton: it is for 6 frames"): Reviewer(short)
    # another skeleton
    cs = read_corrections(out / CORRECTIONS, r0.view_names, r0.skeleton.point_names, r0.n_frames)
    cs.point_names = [f"p{i}" for i in range(r0.n_points)]
    cs.items = {}
    write_corrections(out / CORRECTIONS, cs)
    with pytest.raises(InputError, match="another recording or skeleton: its skeleton"): Reviewer(out)


def test_a_read_only_output_folder_keeps_everything_in_memory(recording, out, tmp_path, monkeypatch):
    rv = Reviewer(out)
    rv.move("rh", 1, 29, 100, 200)
    os.chmod(out, 0o555)
    try:
        if os.geteuid() == 0:                    # root writes anyway: make the folder refuse as a read-only one would
            import tempfile
            real = tempfile.mkstemp
            def refuse(*a, dir=None, **kw):
                if dir is not None and Path(dir) == out: raise PermissionError(13, "Permission denied", str(out))
                return real(*a, dir=dir, **kw)
            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        with pytest.warns(UserWarning, match="read-only.*kept in memory"): rv.move("lh", 2, 10, 50, 60)
        assert "NOT SAVED" in rv.status.value
        assert len(rv.corrections) == 2 and rv.result.pts2d[6, 2, 10].tolist() == [50, 60]
        assert len(read_corrections(out / CORRECTIONS, rv.result.view_names, rv.result.skeleton.point_names, 6)) == 1
        saved = rv.save(tmp_path / "elsewhere.h5")
        assert saved is not None and "NOT SAVED" not in rv.status.value
        assert len(read_corrections(saved, rv.result.view_names, rv.result.skeleton.point_names, 6)) == 2
        with pytest.raises(InputError, match="corrections.h5 exists"): rv.save(out / CORRECTIONS)   # not the sidecar in use now
        assert len(read_corrections(out / CORRECTIONS, rv.result.view_names, rv.result.skeleton.point_names, 6)) == 1
    finally: os.chmod(out, 0o755)


def test_corrections_become_training_labels(recording, out, tmp_path):
    from deeperfly_nb.labels import load_labels
    rv = Reviewer(out)
    true2d = recording["true2d"]
    rv.move("rm", 2, 20, *true2d[1, 2, 20]); rv.mark_unseen("rm", 2, 21); rv.move("lf", 5, 3, *true2d[4, 5, 3])
    r0, det = recording["result"], recording["det"]
    cs = read_corrections(out / CORRECTIONS, r0.view_names, r0.skeleton.point_names, r0.n_frames)
    pats = {v: f"camera_{i}.mp4" for i, v in enumerate(r0.view_names)}
    corrections_to_labels(cs, det.pts2d, det.conf, r0.skeleton, recording["rec"], pats, tmp_path / "labels.h5")
    ls = load_labels(tmp_path / "labels.h5")
    assert ls.frame_ids == ["frame 2", "frame 5"]
    np.testing.assert_allclose(ls.pts2d[1, 0, 20], true2d[1, 2, 20])
    assert np.isnan(ls.pts2d[1, 0, 21]).all()
    assert np.isnan(ls.pts2d[0]).all()                   # view rh carries no correction: not labelled
    img = ls.frames.read("lf", [1])[0]
    assert img.shape == (480, 960, 3) and img.std() > 1  # frame 5 of the lf footage, decoded
    # the same from the sidecar alone, as `deeperfly train out/corrections.h5` gets it
    from deeperfly_nb.corrections import is_corrections_file, labels_from_sidecar
    assert is_corrections_file(out / CORRECTIONS) and not is_corrections_file(out / "results.h5")
    ls2 = labels_from_sidecar(out / CORRECTIONS)
    np.testing.assert_array_equal(ls2.pts2d, ls.pts2d)
    n_full = int(np.isfinite(ls2.pts2d).all(-1).sum())
    PoseResult(det.pts2d + 0.5, det.conf, r0.cameras, r0.skeleton, meta=r0.meta).save(out / "pose2d.h5")   # the detector run again
    rerun = labels_from_sidecar(out / CORRECTIONS)       # its other points were never reviewed: only the 2 moved points are labels
    assert int(np.isfinite(rerun.pts2d).all(-1).sum()) == 2 < n_full, n_full
    (out / "pose2d.h5").unlink()
    np.testing.assert_array_equal(ls2.frames.read("lf", [1])[0], img)
    from deeperfly_nb.config import Config                   # and `train_from_labels` reads it like any label file
    from deeperfly_nb.training import read_label_files
    ls3, = read_label_files([out / CORRECTIONS], Config.default())
    np.testing.assert_array_equal(ls3.pts2d, ls.pts2d)


def test_correcting_corrupted_points_restores_the_uncorrupted_3d(recording, tmp_path):
    """Issue 18's feedback loop up to `deeperfly run`: a few points corrupted in one view, corrected in the reviewer; the sidecar,
    applied over the corrupted detections and triangulated as the run does, gives back the uncorrupted 3D and its error."""
    from deeperfly_nb.corrections import detections_key
    from deeperfly_nb.pipeline import triangulate_points2d
    from deeperfly_nb.triangulation import triangulate
    det, r0, truth = recording["det"], recording["result"], recording["truth3d"]
    v = r0.view_names.index("rf")
    bad = [(t, n) for t in (1, 2, 3) for n in np.flatnonzero(np.isfinite(det.pts2d[v, t]).all(-1))[:3]]
    p = det.pts2d.copy()
    for t, n in bad: p[v, t, n] += (45, -30)
    out = tmp_path / "corrupted"; out.mkdir()
    corrupted = triangulate_points2d(r0.cameras, r0.skeleton, p, det.conf, meta=r0.meta)
    corrupted.save(out / "results.h5")
    ts, ns = np.array(bad).T
    err = lambda X: np.median(np.linalg.norm(X[ts, ns] - truth[ts, ns], axis=-1))      # 3D error of the corrupted points
    assert err(corrupted.pts3d) > 3 * err(r0.pts3d)
    rv = Reviewer(out)
    for t, n in bad: rv.move("rf", t, n, *det.pts2d[v, t, n])
    np.testing.assert_allclose(rv.result.pts3d, r0.pts3d, atol=1e-9)
    cs = read_corrections(out / CORRECTIONS, r0.view_names, r0.skeleton.point_names, r0.n_frames, detections_key=detections_key(p, det.conf))
    fixed, conf = apply_corrections(p, det.conf, cs)
    X = triangulate(r0.cameras, fixed, conf)
    np.testing.assert_allclose(X, r0.pts3d, atol=1e-9)
    assert err(X) == pytest.approx(err(r0.pts3d), rel=1e-9)


def test_lazy_frames_match_the_reader_in_any_order(recording):
    "ViewFrames' open decoders give exactly the frames a fresh seek gives, for forward steps, jumps back and repeats."
    from deeperfly_nb.io import VideoReader
    from deeperfly_nb.review import ViewFrames
    vf = ViewFrames(VideoReader(recording["rec"] / "camera_2.mp4"), ahead=2, decoders=2)
    ref = VideoReader(recording["rec"] / "camera_2.mp4")
    for t in [0, 1, 2, 5, 3, 3, 0, 4, 5, 1]:
        np.testing.assert_array_equal(vf[t], ref[t])
    assert len(vf._cursors) <= 2
    vf.close()
    with pytest.raises(IndexError, match="out of range"): vf[6]


def test_a_detection_run_since_the_result_is_not_reviewed_under_it(recording, out):
    "A run stopped after re-detecting (pose2d.h5 newer than results.h5): the reviewer keeps to the result's own 2D, and says so."
    from deeperfly_nb.corrections import detections_key
    res = PoseResult.load(out / "results.h5")
    res.meta["pose2d_key"] = detections_key(res.pts2d, res.conf)            # as `deeperfly run` records what it triangulated
    res.save(out / "results.h5")
    PoseResult(res.pts2d, res.conf, res.cameras, res.skeleton).save(out / "pose2d.h5")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rv = Reviewer(out); rv.close()
    assert not [w for w in seen if "pose2d.h5" in str(w.message)]        # the detections it was made from: used, unremarked
    newer = res.pts2d + 3.0                                                # another model's detections, not triangulated yet
    PoseResult(newer, res.conf, res.cameras, res.skeleton).save(out / "pose2d.h5")
    with pytest.warns(UserWarning, match="pose2d.h5 holds detections .*results.h5 was not made from"):
        rv = Reviewer(out)
    np.testing.assert_array_equal(rv.det_pts2d, res.pts2d)                 # not the newer 2D beside the older 3D
    rv.close()


def test_without_a_snapshot_the_reviewer_triangulates_as_the_result_records(recording, out):
    "A results.h5 moved away from its run's folder still records the run's config: the reviewer's 3D uses its options."
    from deeperfly_nb.config import Config
    res = PoseResult.load(out / "results.h5")
    used = Config.default().to_dict(); used["triangulation"] = {**used["triangulation"], "method": "ransac", "min_confidence": 0.2}
    res.provenance["config"] = used
    res.save(out / "results.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # no fallback to plain DLT, so nothing to say
        rv = Reviewer(out)
    assert (rv.tri_kwargs["method"], rv.tri_kwargs["min_confidence"]) == ("ransac", 0.2)
    rv.close()


def test_a_lifted_result_keeps_its_3d_and_measures_it_against_the_corrected_2d(recording, tmp_path):
    "One camera: nothing to triangulate; the reprojection error the reviewer shows is the kept 3D's against the moved point."
    from deeperfly_nb.cameras import CameraGroup
    from deeperfly_nb.triangulation import reprojection_error
    r0 = recording["result"]
    cam = CameraGroup([r0.cameras[r0.view_names[0]]])
    one = PoseResult(r0.pts2d[:1], r0.conf[:1], cam, r0.skeleton, pts3d=r0.pts3d,
                     reproj_error=reprojection_error(cam, r0.pts3d, r0.pts2d[:1]), meta={"recording": str(recording["rec"])})
    (tmp_path / "lifted").mkdir(); one.save(tmp_path / "lifted" / "results.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rv = Reviewer(tmp_path / "lifted", triangulate_kwargs={"method": "dlt"})
    n = int(np.flatnonzero(np.isfinite(r0.pts2d[0, 1]).all(-1))[0])
    rv.move(r0.view_names[0], 1, n, 10.0, 10.0)
    truth_px = cam.project(r0.pts3d[1, n])[0]                                # where the kept 3D projects
    assert rv.result.pts3d[1, n].tolist() == r0.pts3d[1, n].tolist()
    assert abs(rv.result.reproj_error[0, 1, n] - np.linalg.norm(truth_px - [10.0, 10.0])) < 1e-6
    rv.close()


def test_footage_changed_since_the_run_is_said(tmp_path):
    "A camera file swapped after the run: the reviewer says which file changed, rather than draw the points on other frames."
    from conftest import tiny_recording
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    tiny_recording(tmp_path, n_frames=3)
    cfg = Config.from_dict({**Config.load(tmp_path / "config.toml").to_dict(), "pipeline": {"visualization": False}})
    run_recording(tmp_path / "rec", tmp_path / "out", cfg, progress=False)
    rv = Reviewer(tmp_path / "out"); assert rv.footage_note == ""; rv.close()         # as the run read it: nothing to say
    a, b = tmp_path / "rec" / "camera_0.mp4", tmp_path / "rec" / "camera_1.mp4"
    data = a.read_bytes(); a.write_bytes(b.read_bytes()); b.write_bytes(data)           # two cameras' files swapped
    with pytest.warns(UserWarning, match="changed since the run read it"):
        rv = Reviewer(tmp_path / "out")
    assert "camera_0.mp4" in rv.footage_note and "camera_1.mp4" in rv.footage_note, rv.footage_note
    rv.close()


def test_footage_of_another_size_is_refused(recording, out):
    "Frames given by hand must be the cameras' size: stretched, every point would be drawn in the wrong place."
    r0 = recording["result"]
    H, W = r0.cameras[r0.view_names[0]].image_size
    half = {v: np.zeros((r0.n_frames, H // 2, W // 2, 3), np.uint8) for v in r0.view_names}
    with pytest.raises(InputError, match=f"rh: frames {W // 2}x{H // 2}, camera {W}x{H}"):
        Reviewer(out, footage=half)
    rv = Reviewer(out, footage={v: np.zeros((r0.n_frames, H, W, 3), np.uint8) for v in r0.view_names}); rv.close()
