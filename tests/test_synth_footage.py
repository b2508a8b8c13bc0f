"""Synthetic rendering (deeperfly_nb.synth_footage): determinism, occlusion by depth order, keypoints on the drawn
joints, the written recording read back, bad input, speed (printed), a coarse realism check, and the free arena
(truth on the drawn fly, the fly crossing the frame)."""
import time
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from deeperfly_nb import synth
from deeperfly_nb.core import InputError
from deeperfly_nb.skeleton import Skeleton, fly38
from deeperfly_nb.synth_footage import (Look, crop_cameras, load_ground_truth, perturb_rig_in_frame, render_arena, render_frames,
                                 render_recording, resize_cameras, sample_look, synth_recording)
from conftest import SHARED_DATA

RIG = synth.default_rig()
SK = fly38()
QUIET = dict(noise_std=0, shot_noise=0, blur_px=0, flicker=0, vary=0)


def test_same_seed_same_frames_other_seed_other_frames():
    cams = resize_cameras(RIG, 0.25)
    X = synth.walking_fly(3, seed=1)
    a, va = render_frames(cams, X, seed=5)
    b, vb = render_frames(cams, X, seed=5, n_workers=1)
    c, vc = render_frames(cams, X, seed=6)
    assert a.shape == (7, 3, 120, 240) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(va, vb)
    assert np.abs(a.astype(int) - c).mean() > 2          # another look and other noise
    np.testing.assert_array_equal(va, vc)                 # the same geometry: the same visibility


def test_point_behind_the_thorax_is_occluded_only_from_the_far_side():
    X = synth.walking_fly(1, seed=0, sway=0.0)
    ant = SK.point_names.index("l_antenna")
    X[0, ant] = [0.08, 0.45, 0.0]                         # just beyond the thorax's left flank (half-width 0.30)
    cams = resize_cameras(RIG.subset(["rm", "lm"]), 0.5)  # rm looks at the right side, lm at the left side
    _, vis = render_frames(cams, X, seed=0, ball=False, holder=False)
    assert list(vis[:, 0, ant]) == [False, True]
    left_stripes = SK.index([f"l_stripe_{i}" for i in (1, 2, 3)])
    right_stripes = SK.index([f"r_stripe_{i}" for i in (1, 2, 3)])
    assert not vis[0, 0, left_stripes].any() and vis[0, 0, right_stripes].all()
    assert vis[1, 0, left_stripes].all() and not vis[1, 0, right_stripes].any()


def test_points_outside_the_frame_or_unknown_are_not_visible():
    X = synth.walking_fly(2, seed=0).copy()
    X[0, 4] = [0.0, 0.0, 30.0]                            # far above every frame
    X[1, 4] = np.nan
    _, vis = render_frames(resize_cameras(RIG, 0.25), X, seed=0, holder=False)
    assert not vis[:, :, 4].any()


def test_visible_leg_keypoints_lie_on_bright_pixels_of_the_drawn_fly():
    X = synth.walking_fly(1, seed=11)
    frames, vis = render_frames(RIG, X, seed=11, ball=False, holder=False, **QUIET)
    uv = RIG.project(X)[:, 0]                             # (V, N, 2)
    legs = [i for i, n in enumerate(SK.point_names) if n[1] in "fmh" and n[2] == "_"]
    ix = np.round(uv[..., 0]).astype(int).clip(0, 959)
    iy = np.round(uv[..., 1]).astype(int).clip(0, 479)
    vals = frames[np.arange(7)[:, None], 0, iy, ix]       # (V, N)
    sel = vis[:, 0][:, legs]
    assert sel.sum() > 100
    assert frames[:, 0, :4, :4].max() == 0                # black background without the props
    assert (vals[:, legs][sel] > 40).all(), vals[:, legs][sel].min()


def test_crop_renders_the_same_pixels_as_the_full_frame():
    one, X = RIG.subset(["lf"]), synth.walking_fly(1, seed=2)
    full, vfull = render_frames(one, X, seed=0, holder=False, **QUIET)
    crop, vcrop = render_frames(crop_cameras(one, (200, 100, 400, 300)), X, seed=0, holder=False, **QUIET)
    assert (full[0, 0, 100:400, 200:600] != crop[0, 0]).mean() < 0.005
    uv = one.project(X) - [200, 100]
    inside = ((uv >= -0.5) & (uv <= [399.5, 299.5])).all(-1)
    np.testing.assert_array_equal(vcrop, vfull & inside)


def test_rig_turns_by_the_asked_angle_and_keeps_the_fly_in_frame():
    X = synth.walking_fly(32, seed=4)
    rig = perturb_rig_in_frame(RIG, X, rot_deg=0.3, seed=4, margin_px=8)
    ang = [np.rad2deg(Rotation.from_matrix(a.rmat @ b.rmat.T).magnitude()) for a, b in zip(rig, RIG)]
    np.testing.assert_allclose(ang, 0.3, atol=1e-9)
    uv = rig.project(X)
    assert (uv >= 7.5).all() and (uv[..., 0] <= 951.5).all() and (uv[..., 1] <= 471.5).all()


def test_ground_truth_and_videos_round_trip(tmp_path):
    from deeperfly_nb.io import open_reader
    folder = synth_recording(tmp_path / "example", n_frames=3, seed=2, scale=0.25, gait_seed=9, skip_frames=5)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"camera_{c}.mp4" for c in range(7)] + ["config.toml", "ground_truth.h5", "points2d.h5"])
    gt, extra = load_ground_truth(folder / "ground_truth.h5")
    walk = synth.walking_fly(8, seed=9)[5:]               # the gait seed and the skipped frames
    np.testing.assert_array_equal(gt.pts3d, walk)
    np.testing.assert_allclose(extra["pts2d_all"], gt.cameras.project(walk), atol=1e-9)
    reported = synth.default_visibility()
    np.testing.assert_array_equal(extra["reported"], reported)
    finite = np.isfinite(gt.pts2d).all(-1)
    np.testing.assert_array_equal(finite, np.broadcast_to(reported[:, None], finite.shape))
    np.testing.assert_array_equal(gt.pts2d[finite], extra["pts2d_all"][finite])
    np.testing.assert_array_equal(gt.conf, finite.astype(float))
    assert extra["visible"].shape == (7, 3, 38) and extra["visible"].dtype == bool
    assert gt.fps == 100.0 and gt.meta["seed"] == 2 and gt.meta["gait_seed"] == 9 and "look" in gt.meta
    again = render_recording(n_frames=3, seed=2, scale=0.25, gait_seed=9, skip_frames=5)
    np.testing.assert_array_equal(extra["visible"], again.visible)
    assert gt.cameras == again.cameras
    for c in (0, 3, 6):
        with open_reader(folder / f"camera_{c}.mp4") as r:
            assert (r.count(), r.frame_size, r.fps) == (3, (120, 240), 100.0)
            back = r[:]
        assert np.abs(back[..., 0].astype(float).mean() - again.frames[c].mean()) < 2


def test_bad_input_is_named():
    X = synth.walking_fly(1)
    with pytest.raises(InputError, match="lacks"):
        render_frames(RIG, np.zeros((1, 3, 3)), Skeleton("three", ("a", "b", "c"), (), (), ()))
    with pytest.raises(InputError, match="image_size"):
        render_frames(RIG.replace({"f": RIG["f"].replace(image_size=None)}), X)
    with pytest.raises(InputError, match="unknown look setting"):
        render_frames(RIG, X, nosie_std=1)
    with pytest.raises(InputError, match="pts3d"):
        render_frames(RIG, X[..., :2])
    with pytest.raises(InputError, match="use a smaller rot_deg"):
        perturb_rig_in_frame(RIG, X, rot_deg=5.0, max_tries=10)


def test_speed_is_reported():
    X = synth.walking_fly(4, seed=3)
    for scale in (1.0, 0.25):
        cams = RIG if scale == 1 else resize_cameras(RIG, scale)
        w, c = time.perf_counter(), time.process_time()
        render_frames(cams, X, seed=3)
        w, c = time.perf_counter() - w, time.process_time() - c
        print(f"render {cams[0].image_size[1]}x{cams[0].image_size[0]}, 7 views x 4 frames: {w:.2f} s wall, {c:.2f} s cpu")


def test_intensities_resemble_the_real_sample():
    sample = SHARED_DATA / "deepfly3d_sample"
    if not (sample / "camera_0_img_0.jpg").exists():
        pytest.skip(f"real DeepFly3D sample not found at {sample}")
    import cv2
    real = np.stack([cv2.imread(str(sample / f"camera_{c}_img_0.jpg"))[..., 0] for c in range(7)])
    syn, _ = render_frames(RIG, synth.walking_fly(1, seed=8), seed=8)
    assert abs((real < 10).mean() - (syn < 10).mean()) < 0.15          # the black background
    for q in (50, 90):
        assert abs(np.percentile(real, q) - np.percentile(syn, q)) < 40, q


TOP = synth.arena_rig().subset(["top"])


def test_arena_truth_lies_on_the_drawn_fly():
    rec = render_arena(n_frames=5, seed=13, cameras=TOP, **QUIET)
    np.testing.assert_allclose(rec.pts2d, TOP.project(rec.pts3d), atol=1e-9)
    floor_only, _ = render_frames(TOP, rec.pts3d + [500.0, 0, 0], seed=13, look=rec.look, native_scale=1.0)
    from scipy.ndimage import maximum_filter
    changed = maximum_filter(np.abs(rec.frames.astype(int) - floor_only), size=(1, 1, 3, 3))   # (1, T, H, W)
    ix = np.round(rec.pts2d[0, ..., 0]).astype(int).clip(0, 255)
    iy = np.round(rec.pts2d[0, ..., 1]).astype(int).clip(0, 255)
    under = changed[0, np.arange(5)[:, None], iy, ix]                                       # (T, N)
    vis = rec.visible[0]
    legs = np.array([n[1] in "fmh" and n[2] == "_" for n in SK.point_names])
    assert vis[:, legs].sum() > 60                        # thin legs seen from above are mostly visible
    assert (under[vis] > 8).all(), under[vis].min()       # within a pixel of every visible keypoint the fly is drawn
    far = rec.pts2d[0] + [6.0, 0]                         # 6 px beside the truth: floor (or another part) there, often
    fx, fy = np.round(far[..., 0]).astype(int).clip(0, 255), np.round(far[..., 1]).astype(int).clip(0, 255)
    assert (changed[0, np.arange(5)[:, None], fy, fx][vis & legs] <= 8).mean() > 0.2


def test_arena_fly_walks_across_the_frame_and_the_truth_follows_it():
    rec = render_arena(n_frames=40, seed=21, cameras=TOP)          # the sampled look: noise, blur, flicker
    centre = np.nanmean(rec.truth_pts2d()[0], axis=1)              # (T, 2) the fly's keypoints' centre in the top view
    assert np.linalg.norm(centre - centre[0], axis=-1).max() > 60  # it crosses a good part of the 256-px frame
    import cv2
    body = [i for i, n in enumerate(SK.point_names) if n.endswith("body_coxa") or "stripe" in n]
    body_xy = rec.pts2d[0][:, body].mean(1)                        # (T, 2) thorax and abdomen: the bright bulk of the fly
    inner = [t for t in range(40) if ((body_xy[t] > 15) & (body_xy[t] < 240)).all()]
    assert len(inner) > 20
    for t in inner[::2]:                                           # the brightest blob of each frame is the fly's body
        img = cv2.GaussianBlur(rec.frames[0, t].astype(np.float32), (0, 0), 3.0)
        y, x = np.unravel_index(np.argmax(img), img.shape)
        assert np.hypot(x - body_xy[t, 0], y - body_xy[t, 1]) < 8, (t, (x, y), body_xy[t])
    again = render_arena(n_frames=40, seed=21, cameras=TOP)
    np.testing.assert_array_equal(again.frames, rec.frames)        # reproducible from the seed


def test_arena_truth_drops_points_that_leave_the_frame():
    narrow = synth.arena_rig(field=6.0).subset(["top"])            # a 6-unit field: the fly walks out of it
    rec = render_arena(n_frames=30, seed=3, cameras=narrow, radius=6.0)
    inside = ((rec.pts2d >= -0.5) & (rec.pts2d <= 255.5)).all(-1)
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(np.isfinite(rec.truth_pts2d()).all(-1), inside)
    assert not rec.visible[~inside].any()
