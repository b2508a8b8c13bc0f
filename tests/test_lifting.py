"Tests of deeperfly_nb.lifting: LiftPose3D's workflow (bad input, masking, resume, checkpoints, augmentation, libraries)."
import json
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from deeperfly_nb import lifting as L
from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.results import PoseResult
from deeperfly_nb.skeleton import fly38, bone_lengths, skeleton_from_dict
from deeperfly_nb.synth import walking_fly, default_rig, observe, default_visibility
from deeperfly_nb.triangulation import triangulate

FLY = fly38()
ROOTS, TARGETS = L.fly_roots(FLY)
CAM = default_rig()["rm"]
SMALL = {"epochs": 3, "linear_size": 64}


def in_cam(X, cam=CAM): return X @ cam.rmat.T + cam.tvec


@pytest.fixture(scope="module")
def data():
    lib = {f"r{s}": walking_fly(150, seed=s) for s in range(12)}
    held = walking_fly(150, seed=99)
    return ({k: CAM.project(v) for k, v in lib.items()}, {k: in_cam(v) for k, v in lib.items()},
            CAM.project(held), in_cam(held))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, torch_one_thread):
    l2, l3, h2, h3 = data
    out = tmp_path_factory.mktemp("lifter")
    return L.train(l2, h2, l3, h3, ROOTS, TARGETS, training_kwargs=SMALL, output_folder=out, skeleton=FLY)


def test_lifter_beats_baselines_on_held_out(trained, data):
    "A small lifter beats the mean pose and the nearest neighbour of its own library on a held-out recording."
    l2, l3, h2, h3 = data
    rts = h3[:, list(ROOTS)]
    err = lambda p: L.lift_errors(h3, p, ROOTS, TARGETS)["euclid"]
    lifted = err(L.lift(trained, h2, roots_3d=rts))
    mean = err(L.mean_pose_baseline(trained.stats, len(h2), rts))
    nn = err(L.nearest_neighbour_baseline(trained.stats, np.concatenate(list(l2.values())), np.concatenate(list(l3.values())), h2, rts))
    assert lifted < 0.7 * mean, (lifted, mean, nn)          # in-distribution the nearest neighbour is strong (see the bench for real data)


def test_files_log_and_best_checkpoint(trained):
    "Everything train writes is there (no temporaries left), and ckpt_best is the epoch with the lowest validation error."
    names = sorted(p.name for p in trained.folder.iterdir())
    assert names == ["ckpt_best.pth", "ckpt_last.pth", "lifter.json", "test_data.npz", "train_log.csv"], names
    log = L.read_log(trained.folder)
    assert list(log["epoch"]) == [1, 2, 3]
    best = torch.load(trained.folder / "ckpt_best.pth", weights_only=True)["epoch"]
    assert best == int(log["epoch"][np.argmin(log["err_val"])])
    rec = json.loads((trained.folder / "lifter.json").read_text())
    assert rec["skeleton"]["name"] == "fly38" and rec["stats"]["roots"] == list(ROOTS) and rec["stats_digest"] == trained.stats.digest


def test_lift_matches_reference_path(trained, data):
    "`lift` (fused layers, float32 torch normalisation) equals normalise -> network -> denormalise_3d."
    _, _, h2, h3 = data
    rts = h3[:40, list(ROOTS)]
    fast = L.lift(trained, h2[:40], roots_3d=rts)
    ref = L.lift(trained, L.normalise(h2[:40], trained.stats), roots_3d=rts)
    ok = np.isfinite(ref)
    assert (np.isfinite(fast) == ok).all() and ok.sum() == 40 * 30 * 3
    np.testing.assert_allclose(fast[ok], ref[ok], atol=1e-4)
    np.testing.assert_allclose(L.lift(L.load_lifter(trained.folder), h2[:40], roots_3d=rts), fast, atol=1e-6)


def test_conf_below_threshold_is_unseen(trained, data):
    _, _, h2, _ = data
    p = h2[:5].copy(); conf = np.ones(p.shape[:2]); conf[:, 7] = 0.1
    p_nan = p.copy(); p_nan[:, 7] = np.nan
    np.testing.assert_allclose(L.lift(trained, p, conf, min_confidence=0.5), L.lift(trained, p_nan), atol=1e-6)


def test_test_and_load_test_results(trained, data):
    "test() on the data given to train, and on new dict data; load_test_results returns the same structure."
    e = L.test(trained.folder)
    gt, pred = L.load_test_results(trained.folder)
    np.testing.assert_allclose(gt, data[3])
    assert e["euclid"] == pytest.approx(L.lift_errors(gt, pred, ROOTS, TARGETS)["euclid"])
    L.test(trained.folder, {"a": data[2][:10]}, {"a": data[3][:10]})
    gt, pred = L.load_test_results(trained.folder)
    assert list(gt) == ["a"] and pred["a"].shape == (10, 38, 3)


def test_resume_continues(data, tmp_path, torch_one_thread):
    l2, l3, _, _ = data
    kw = dict(output_folder=tmp_path, skeleton=FLY)
    L.train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={**SMALL, "epochs": 1}, **kw)
    step1, first = torch.load(tmp_path / "ckpt_last.pth", weights_only=True)["step"], L.read_log(tmp_path)
    L.train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={**SMALL, "epochs": 2, "resume": True}, **kw)
    log = L.read_log(tmp_path)
    assert list(log["epoch"]) == [1, 2] and log["seconds"][0] == first["seconds"][0]     # epoch 1 is the first run's, not redone
    assert torch.load(tmp_path / "ckpt_last.pth", weights_only=True)["step"] == 2 * step1 > 0
    other = {k: v * 1.1 for k, v in l3.items()}
    with pytest.raises(InputError, match="cannot resume .*statistics"):
        L.train(l2, None, other, None, ROOTS, TARGETS, training_kwargs={**SMALL, "epochs": 3, "resume": True}, **kw)


def test_masked_keypoints_do_not_train(tmp_path, torch_one_thread):
    """Targets masked by train_keypts (here overwritten with garbage 50 units off) and NaN targets stay out of
    the statistics and the loss: the lifter still places those joints."""
    l2, l3, keep = {}, {}, {}
    for s in range(12):
        X = walking_fly(150, seed=s)
        b, m = in_cam(X), np.ones(X.shape[:2], bool)
        sel = np.arange(len(X)) % 2 == 1
        b[sel, 4] += 50.0; m[sel, 4] = False                      # lf claw: masked and garbage
        b[np.arange(len(X)) % 3 == 0, 9] = np.nan                 # lm claw: sometimes unknown
        l2[f"r{s}"], l3[f"r{s}"], keep[f"r{s}"] = CAM.project(X), b, m
    lf = L.train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={"epochs": 3, "linear_size": 64}, train_keypts=keep,
                 output_folder=tmp_path)
    assert np.isfinite(L.read_log(tmp_path)["loss_train"]).all()
    held = walking_fly(150, seed=99)
    h2, h3 = CAM.project(held), in_cam(held)
    e = L.lift_errors(h3, L.lift(lf, h2, roots_3d=h3[:, list(ROOTS)]), ROOTS, TARGETS)["euclid_per_joint"]
    assert e[3] < 0.3 and e[7] < 0.3, e                           # lf claw and lm claw are the 4th and 8th targets


def test_bad_input_messages(trained, data, tmp_path):
    "Issue 13 item 5: each bad input is a clear error naming the array or file."
    l2, l3, h2, h3 = data
    kw = dict(training_kwargs={"epochs": 1, "linear_size": 16}, output_folder=tmp_path)
    with pytest.raises(InputError, match=r"train_2d\['r0'\] has 30 joints but train_3d\['r0'\] has 38"):
        L.train({k: v[:, :30] for k, v in l2.items()}, None, l3, None, ROOTS, TARGETS, **kw)
    nan3 = dict(l3); nan3["r3"] = l3["r3"].copy(); nan3["r3"][[4, 9]] = np.nan
    with pytest.raises(InputError, match=r"train_3d\['r3'\]: 2 pose\(s\) are all NaN \(first: \[4, 9\]\)"):
        L.train(l2, None, nan3, None, ROOTS, TARGETS, **kw)
    with pytest.raises(InputError, match="test_2d: 1 pose"):
        t2 = h2.copy(); t2[0] = np.nan; L.train(l2, t2, l3, h3, ROOTS, TARGETS, **kw)
    with pytest.raises(InputError, match=r"roots: joint 38 is not in the skeleton \(joints 0..37\)"):
        L.train(l2, None, l3, None, [0, 38], [[1], [2]], **kw)
    with pytest.raises(InputError, match="'l_thorax' is not a point of the skeleton 'fly38'"):
        L.train(l2, None, l3, None, ["l_thorax"], [[1]], skeleton=FLY, **kw)
    with pytest.raises(InputError, match=r"target sets overlap: joint 3 is in target_sets\[0\] and target_sets\[1\]"):
        L.train(l2, None, l3, None, [0, 5], [[1, 2, 3], [3, 6]], **kw)
    other = L.normalise(h2, L.fit_stats(h2, h3, ROOTS, TARGETS))
    with pytest.raises(InputError, match="pts2d was normalised with statistics .* but lifter .* uses"):
        L.lift(trained, other)
    half = skeleton_from_dict({"name": "half", "points": list(FLY.point_names[:19]), "bones": [[0, 1]]})
    with pytest.raises(InputError, match="was trained for skeleton 'fly38' \\(38 points\\), not for skeleton 'half' \\(19 points\\)"):
        L.load_lifter(trained.folder, skeleton=half)
    with pytest.raises(InputError, match="pts2d has 19 joints but lifter .* was trained for 38"):
        L.lift(trained, h2[:, :19])
    with pytest.raises(InputError, match="nothing does not exist: give a folder that lifting.train wrote"):
        L.load_lifter(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty is not a lifter folder: lifter.json is missing"):
        L.load_lifter(tmp_path / "empty")
    with pytest.raises(ConfigError, match="lifting.epoch is not a lifting option"):
        L.train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={"epoch": 2}, output_folder=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_unavailable_is_a_config_error(data, tmp_path):
    l2, l3, _, _ = data
    with pytest.raises(ConfigError, match="lifting.device is 'cuda' but CUDA is not available"):
        L.train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={"device": "cuda"}, output_folder=tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(trained, data):
    lc = L.load_lifter(trained.folder, device="cuda")
    np.testing.assert_allclose(L.lift(lc, data[2][:100]), L.lift(trained, data[2][:100]), atol=1e-3)


def test_augmentations():
    X = walking_fly(40, seed=3)
    rng = np.random.default_rng(1)
    p2, p3 = L.apply_augmentation([L.project_to_cam(CAM)], None, X, rng)
    np.testing.assert_allclose(p2, CAM.project(X)); np.testing.assert_allclose(p3, in_cam(X))
    cam10 = CAM.replace(rmat=CAM.rmat @ Rotation.from_euler("z", 10, degrees=True).as_matrix().T)
    q2, q3 = L.apply_augmentation([L.random_project(CAM, [[10, 10], [0, 0], [0, 0]])], None, X, rng)
    np.testing.assert_allclose(q2, cam10.project(X), atol=1e-6); np.testing.assert_allclose(q3, in_cam(X, cam10), atol=1e-9)
    # random angles stay inside their ranges: the implied camera rotation is at most the combined range
    r2, r3 = L.apply_augmentation([L.random_project(CAM, [[-5, 5], [-3, 3], [0, 0]])], None, X, rng)
    ang = [np.degrees(np.arccos(np.clip((np.trace(np.linalg.lstsq(in_cam(X[i]) - in_cam(X[i]).mean(0), r3[i] - r3[i].mean(0), rcond=None)[0]) - 1) / 2, -1, 1)))
           for i in range(len(X))]
    assert 0 < max(ang) <= np.hypot(5, 3) + 1e-6 and np.ptp(ang) > 0.5
    _, y3 = L.apply_augmentation([L.perturb_pose(FLY, 0.25)], None, X, rng)
    ratio = bone_lengths(FLY, y3) / bone_lengths(FLY, X)
    assert 0.75 - 1e-9 <= ratio.min() < 0.8 and 1.2 < ratio.max() <= 1.25 + 1e-9
    np.testing.assert_allclose(y3[:, list(ROOTS)], X[:, list(ROOTS)])
    n2, _ = L.apply_augmentation([L.add_noise(3.0)], p2, p3, rng)
    assert abs(np.std(n2 - p2) - 3.0) < 0.1
    # combined: perturb, project, noise -- the 2D are the noisy projections of the perturbed 3D
    c2, c3 = L.apply_augmentation([L.perturb_pose(FLY, 0.1), L.project_to_cam(CAM), L.add_noise(0.0)], None, X, np.random.default_rng(5))
    _, z3 = L.apply_augmentation([L.perturb_pose(FLY, 0.1)], None, X, np.random.default_rng(5))
    np.testing.assert_allclose(c2, CAM.project(z3)); np.testing.assert_allclose(c3, in_cam(z3))
    with pytest.raises(InputError, match="put a projection"):
        L.check_augmentation([L.project_to_cam(CAM), L.perturb_pose(FLY)], True)
    with pytest.raises(InputError, match="train_2d is None"):
        L.check_augmentation([L.add_noise(1.0)], False)


def test_library_from_results():
    rig = default_rig()
    truth = walking_fly(30, seed=4)
    obs = observe(rig, truth, default_visibility(), noise_px=0.5, seed=4)
    X = triangulate(rig, obs.pts2d, obs.conf); X[3] = np.nan
    res = PoseResult(obs.pts2d, obs.conf, rig, FLY, pts3d=X)
    l2, l3 = L.library_from_results({"exp": res}, camera="lm")
    assert l3["exp"].shape == (29, 38, 3)                                      # the all-NaN frame is dropped
    keep = np.delete(np.arange(30), 3)
    np.testing.assert_allclose(l3["exp"], in_cam(X[keep], rig["lm"]))
    np.testing.assert_allclose(l2["exp"], rig["lm"].project(X[keep]))
    d2, _ = L.library_from_results([res], camera="lm", detections=True)
    np.testing.assert_array_equal(d2["0"], obs.pts2d[5][keep])
    c2, c3 = L.library_from_results([res], camera=CAM)
    np.testing.assert_allclose(c3["0"], in_cam(X[keep]))
    w2, w3 = L.library_from_results(res)
    assert w2 is None; np.testing.assert_allclose(w3["0"], X[keep])
    with pytest.raises(InputError, match="has no view 'rx'"):
        L.library_from_results([res], camera="rx")
    with pytest.raises(InputError, match="has no 3D points"):
        L.library_from_results([PoseResult(obs.pts2d, obs.conf, rig, FLY)])
    m2, m3 = L.library_from_results({"exp": res}, camera="lm", mirror=True)
    assert sorted(m3) == ["exp", "exp_mirror"] and m3["exp_mirror"].shape == (29, 38, 3)
    lf, rf = FLY.point_names.index("lf_claw"), FLY.point_names.index("rf_claw")
    flipped = X[keep][:, lf] * np.array([1.0, -1.0, 1.0])                     # the synthetic fly's plane is y = 0
    assert np.abs(m3["exp_mirror"][:, rf] - in_cam(flipped, rig["lm"])).max() < 0.03
    np.testing.assert_allclose(m2["exp_mirror"], rig["lm"].project(L.mirror_poses(X, FLY)[keep]))
    with pytest.raises(InputError, match="mirror image has no detections"):
        L.library_from_results([res], camera="lm", detections=True, mirror=True)


def test_figures(trained, data):
    gt, pred = data[3], L.lift(trained, data[2])
    assert len(L.training_log_figure(trained.folder).data) >= 3
    assert len(L.error_figure(gt, pred, ROOTS, TARGETS, FLY).data) == 24
    assert len(L.movie_figure(pred[:12], FLY, trailing=5, trailing_keypts=[4, 9]).frames) == 12
    assert len(L.pose_figure(gt, pred, 0, FLY).data) == 4


def test_deeperfly_lift_cli_writes_world_3d(trained, data, tmp_path):
    "Issue 13: `deeperfly lift RESULT -m LIFTER --view rm` writes results.h5 whose 3D, in world coordinates, is near the truth."
    from deeperfly_nb.cli import main
    held = walking_fly(150, seed=99)
    rig = default_rig()
    pts2d = np.stack([c.project(held) for c in rig])                      # every view's exact 2D; only rm is lifted
    PoseResult(pts2d, np.ones(pts2d.shape[:3]), rig, FLY).save(tmp_path / "pose2d.h5")
    assert main(["lift", str(tmp_path / "pose2d.h5"), "-m", str(trained.folder), "--view", "rm", "-o", str(tmp_path / "out")]) == 0
    res = PoseResult.load(tmp_path / "out" / "results.h5")
    assert res.meta["lifting"]["view"] == "rm" and res.pts3d.shape == held.shape
    tgt = [j for t in TARGETS for j in t]
    err = np.nanmedian(np.linalg.norm(res.pts3d[:, tgt] - held[:, tgt], axis=-1))
    mean_pose = np.nanmedian(np.linalg.norm(held[:, tgt].mean(0) - held[:, tgt], axis=-1))
    assert err < mean_pose, (err, mean_pose)                                 # world frame, not the camera's
    assert main(["lift", str(tmp_path / "pose2d.h5"), "-m", str(trained.folder), "--view", "rn", "-o", str(tmp_path / "o2")]) == 2
    before = (tmp_path / "out" / "results.h5").read_bytes()             # a second lift into the same folder: refused, file intact
    assert main(["lift", str(tmp_path / "pose2d.h5"), "-m", str(trained.folder), "--view", "rf", "-o", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "results.h5").read_bytes() == before
    assert main(["lift", str(tmp_path / "pose2d.h5"), "-m", str(trained.folder), "--view", "rf", "-o", str(tmp_path / "out"), "--overwrite"]) == 0
    assert PoseResult.load(tmp_path / "out" / "results.h5").meta["lifting"]["view"] == "rf"


def test_mirror_poses_reflects_in_the_sagittal_plane():
    "The synthetic fly's sagittal plane is y = 0: its mirror image is y negated with l/r swapped, in any rigid frame."
    X = walking_fly(200, seed=5)
    names = list(FLY.point_names)
    partner = [names.index({"l": "r", "r": "l"}[n[0]] + n[1:]) for n in names]
    expected = X[:, partner] * np.array([1.0, -1.0, 1.0])
    assert np.abs(L.mirror_poses(X, FLY) - expected).max() < 0.02       # the plane is fitted, to ~0.5% of a leg
    assert np.abs(L.mirror_poses(in_cam(X), FLY) - in_cam(expected)).max() < 0.02
    np.testing.assert_allclose(L.mirror_poses(L.mirror_poses(X, FLY), FLY), X, atol=1e-9)


def test_mirror_poses_bad_input():
    X = walking_fly(5, seed=5)
    with pytest.raises(InputError, match="pts3d"): L.mirror_poses(X[:, :30], FLY)
    lone = skeleton_from_dict({"name": "lone", "points": ["head", "tail"], "bones": [["head", "tail"]]})
    with pytest.raises(InputError, match="no left/right point pairs"): L.mirror_poses(np.zeros((2, 2, 3)), lone)
    with pytest.raises(InputError, match="no frame has both"): L.mirror_poses(np.full_like(X, np.nan), FLY)


def test_movie_mp4_frames_colours_and_errors(tmp_path):
    "The MP4 has a frame per pose at the asked size; truth grey, prediction crimson, trails blue; bad input named."
    from deeperfly_nb.io import open_reader
    X = in_cam(walking_fly(8, seed=2))
    pred = X + 0.05
    path = L.movie_mp4(pred, tmp_path / "m.mp4", FLY, gt=X, trailing=5, trailing_keypts=["lf_claw"], size_px=(200, 300), up=(0, -1, 0))
    with open_reader(path) as r:
        assert (len(r), r.frame_size) == (8, (200, 300))
        last = r[7].astype(int)
    near = lambda rgb: (np.abs(last - np.array(rgb)).sum(-1) < 60).sum()
    blue = (last[..., 2] - last[..., 0] > 50) & (last[..., 2] - last[..., 1] > 30)
    assert near((220, 20, 60)) > 100 and near((150, 150, 150)) > 100 and blue.sum() > 10, (near((220, 20, 60)), near((150, 150, 150)), blue.sum())
    path2 = L.movie_mp4(pred, tmp_path / "alone.mp4", FLY, size_px=(200, 300))
    with open_reader(path2) as r: alone = r[7].astype(int)
    assert (np.abs(alone - 150).sum(-1) < 60).sum() < near((150, 150, 150)) / 10          # no truth, (almost) no grey
    cam = L.movie_camera(X, (200, 300), up=(0, -1, 0))
    px = cam.project(X.reshape(-1, 3))
    assert (px >= 0).all() and (px[:, 0] < 300).all() and (px[:, 1] < 200).all()                      # every point is in the frame
    with pytest.raises(InputError, match="gt"): L.movie_mp4(pred, tmp_path / "x.mp4", FLY, gt=X[:5])
    with pytest.raises(InputError, match="skeleton"): L.movie_mp4(pred[:, :30], tmp_path / "x.mp4", FLY)
    with pytest.raises(InputError, match=r"\.mp4|video"): L.movie_mp4(pred, tmp_path / "x.txt", FLY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.mp4", "m.mp4"]
