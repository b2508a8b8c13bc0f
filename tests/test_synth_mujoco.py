"""MuJoCo renderer of the NeuroMechFly body (deeperfly_nb.synth_mujoco): the camera model against deeperfly's projection,
keypoints on the rendered fly, left-right mirroring, determinism, the recording written and read back, bad input
(missing assets, joint angles for another model, a camera that sees nothing of the fly), and deeperfly's own gait driving
the body through inverse kinematics (known angles recovered, the generator's gait fitted, bad targets, the truth written).

Needs the `mujoco` package and the NeuroMechFly assets; a fresh machine fetches the assets once from the package index
(`python -m deeperfly_nb.synth_mujoco fetch-assets`); without either, the tests that render skip and say why."""
import json
import pickle
import numpy as np
import pytest

from deeperfly_nb import synth
from deeperfly_nb.cameras import CameraGroup
from deeperfly_nb.core import InputError, ModelError
from deeperfly_nb.skeleton import FLY_LEG_JOINTS, fly38
from deeperfly_nb.synth_footage import load_ground_truth, resize_cameras
from deeperfly_nb import synth_mujoco as sm

SK = fly38()
QUIET = dict(noise_std=0, shot_noise=0, blur_px=0, jpeg_quality=None)


@pytest.fixture(scope="module")
def assets():
    try: sm.import_mujoco()
    except ModelError as e: pytest.skip(str(e))
    try: return sm.fetch_assets()
    except (ModelError, OSError) as e: pytest.skip(f"NeuroMechFly assets absent and not fetchable here: {e}")


@pytest.fixture(scope="module")
def walk(assets):
    return sm.load_joint_angles()


# --- bad input that needs no renderer ---------------------------------------------------------------

def test_missing_assets_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(sm.ASSETS_ENV, str(tmp_path / "nothing-here"))
    st = sm.assets_status()
    assert st["present"] is False and sm.FETCH_COMMAND in st["message"] and "nothing-here" in st["message"]
    with pytest.raises(ModelError, match="fetch-assets"): sm.require_assets()
    with pytest.raises(ModelError, match="fetch-assets"): sm.load_joint_angles()


def test_tampered_assets_are_reported(assets, tmp_path):
    import shutil
    copy = tmp_path / "a"
    shutil.copytree(assets, copy)
    assert sm.assets_status(copy, verify=True)["present"]
    (copy / sm.NMF_KINEMATICS).write_bytes(b"changed")
    st = sm.assets_status(copy, verify=True)
    assert not st["present"] and "changed" in st["message"]


def test_wrong_wheel_is_refused(tmp_path):
    fake = tmp_path / f"flygym-{sm.FLYGYM_VERSION}-py3-none-any.whl"
    fake.write_bytes(b"not a wheel")
    with pytest.raises(ModelError, match="sha256"): sm.fetch_assets(tmp_path / "dest", wheel=fake)
    assert not (tmp_path / "dest").exists()


def test_joint_angle_files_refused_clearly(tmp_path):
    class Evil:
        def __reduce__(self): return (print, ("pwned",))
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"meta": {"timestep": 1e-3}, "joint_LFTibia": Evil()}))
    with pytest.raises(InputError, match="refusing"): sm.load_joint_angles(p)
    q = tmp_path / "ragged.pkl"
    q.write_bytes(pickle.dumps({"meta": {"timestep": 1e-3}, "joint_LFTibia": [0.0, 1.0], "joint_LFFemur": [0.0]}))
    with pytest.raises(InputError, match="ragged.pkl"): sm.load_joint_angles(q)
    with pytest.raises(InputError, match="no such"): sm.load_joint_angles(tmp_path / "absent.pkl")


# --- geometry ---------------------------------------------------------------------------------------

def test_mujoco_image_matches_deeperfly_projection(assets):
    "Spheres at known points land where Camera.project puts them, with fx != fy and an off-centre principal point."
    base = synth.default_rig()
    P = np.array([[0, 0, 0], [1.0, 0.5, 0.3], [-1.2, -0.3, -0.4], [0.3, -1.0, 0.5], [0.9, -0.6, -0.8]])
    for cam in (base[1].replace(intr=np.array([22388.0, 24627.0, 470.3, 250.7])),
                base[5].replace(intr=np.array([20000.0, 19000.0, 500.9, 230.2]))):
        m, d = sm.marker_scene(P, 0.05, cam.image_size)
        gv = sm.GLView(m, *cam.image_size)
        try: rgb, depth = gv.render(d, cam)
        finally: gv.close()
        uv = cam.project(P)
        found = np.array([sm.sphere_centroid(rgb[..., 0], u, v) for u, v in uv])
        assert np.abs(found - uv).max() < 0.1, np.abs(found - uv).max()
        z = P @ cam.rmat[2] + cam.tvec[2]                              # depth of each centre along the optical axis
        at = depth[np.round(uv[:, 1]).astype(int), np.round(uv[:, 0]).astype(int)]
        np.testing.assert_allclose(at, z - 0.05, atol=2e-3)            # the sphere's front, 0.05 before its centre


def test_distorted_camera_matches_projection(assets):
    "With lens distortion (render then remap), the sphere still lands on Camera.project's distorted pixel."
    cam = synth.default_rig()[3].replace(dist=np.array([-80.0, 0.0, 0.0, 0.0, 0.0]))   # strong barrel at this narrow view
    P = np.array([[0.0, 1.9, 0.8], [0.0, -1.5, -0.7]])
    m, d = sm.marker_scene(P, 0.05, cam.image_size)
    gv = sm.GLView(m, *cam.image_size)
    try: rgb, depth = gv.render(d, cam)
    finally: gv.close()
    rgb, depth = sm.remap_distorted(rgb, depth, sm.distortion_maps(cam))
    uv = cam.project(P)
    pinhole = cam.replace(dist=np.zeros(5)).project(P)
    assert np.abs(uv - pinhole).max() > 5                              # the distortion moves them visibly
    found = np.array([sm.sphere_centroid(rgb[..., 0], u, v) for u, v in uv])
    assert np.abs(found - uv).max() < 0.3, np.abs(found - uv).max()


def test_keypoints_sit_on_the_rendered_fly(assets, walk):
    "Where a keypoint is called visible, the depth buffer there is the fly's surface, within the margin of the joint."
    cams = resize_cameras(synth.default_rig(), 0.35)
    fly = sm.build_fly(sm.MjLook(), 0, assets, synth.BALL_RADIUS / sm.DEFAULT_UNITS_PER_MM, (168, 336))
    qadr = fly.check_names(walk.names)
    names, A = sm.walk_angles(walk, 2, 100.0, sm.WalkParams(start_s=0.3))
    fly.set_ball_top(-3.0)                                             # ball out of the way
    frames, vis, X = sm.render_views(fly, cams, qadr, A, np.zeros(2), sm.MjLook(**QUIET), seed=0)
    upm = sm.DEFAULT_UNITS_PER_MM
    n_checked = 0
    for v, cam in enumerate(cams):
        gv = sm.GLView(fly.model, *cam.image_size)
        try:
            fly.pose(qadr, A[0]); _, depth = gv.render(fly.data, cam, upm)
        finally: gv.close()
        uv = cam.project(X[0])
        z = (X[0] @ cam.rmat[2] + cam.tvec[2]) / upm
        for n in np.flatnonzero(vis[v, 0]):
            x, y = np.round(uv[n]).astype(int)
            win = depth[y - 2:y + 3, x - 2:x + 3]
            assert np.isfinite(win).any(), (cam.name, SK.point_names[n])
            assert np.nanmin(np.where(np.isfinite(win), np.abs(win - z[n]), np.nan)) < 0.25, (cam.name, SK.point_names[n])
            n_checked += 1
    assert n_checked > 7 * 38 * 0.4                                      # a good share of the points are seen
    assert 0.3 < vis.mean() < 0.9                                         # and some are hidden


def test_bone_lengths_are_rigid(assets, walk):
    fly = sm.build_fly(sm.MjLook(), 0, assets)
    qadr = fly.check_names(walk.names)
    _, A = sm.walk_angles(walk, 20, 100.0, sm.WalkParams(speed=1.3, perturb_rad=0.1, seed=2))
    X = []
    for a in A: fly.pose(qadr, a); X.append(fly.keypoints_mm())
    X = np.array(X)
    L = np.linalg.norm(X[:, SK.bone_array[:, 0]] - X[:, SK.bone_array[:, 1]], axis=-1)
    leg = [i for i, (a, b) in enumerate(SK.bones) if SK.point_names[a].split("_")[0] in ("lf", "lm", "lh", "rf", "rm", "rh")]
    assert L[:, leg].std(0).max() < 1e-9                                 # joints on rigid segments keep their distances
    assert X[:, :, 0].std(0).max() > 0.05                                 # while the legs move
    femur = [SK.point_names.index(f"{l}_coxa_femur") for l in ("lf", "lm", "lh")]
    tibia = [SK.point_names.index(f"{l}_femur_tibia") for l in ("lf", "lm", "lh")]
    np.testing.assert_allclose(np.linalg.norm(X[0, femur] - X[0, tibia], axis=-1), [0.705, 0.784, 0.836], atol=0.01)  # MJCF's femurs, mm


def test_mirrored_walk_is_the_mirror_image(assets, walk):
    "Swapping sides and reversing the x/z-axis joints gives the y-mirrored keypoints (left and right swapped)."
    fly = sm.build_fly(sm.MjLook(), 0, assets)
    _, A = sm.walk_angles(walk, 4, 100.0)
    names_m, A_m = sm.walk_angles(walk, 4, 100.0, sm.WalkParams(mirror=True), fly.mirror_sign(walk.names))
    swap = [SK.point_names.index(("r" if p[0] == "l" else "l") + p[1:]) for p in SK.point_names]
    for t in range(4):
        fly.pose(fly.check_names(walk.names), A[t]); X = fly.keypoints_mm()
        fly.pose(fly.check_names(names_m), A_m[t]); Xm = fly.keypoints_mm()
        np.testing.assert_allclose(Xm[swap] * [1, -1, 1], X, atol=2e-3)


# --- rendering a recording --------------------------------------------------------------------------

def test_same_seed_same_frames_other_seed_other_look(assets, walk):
    cams = resize_cameras(synth.default_rig().subset(["rm", "lm"]), 0.2)
    a = sm.render_fly(cams, 2, seed=4, joint_angles=walk)
    b = sm.render_fly(cams, 2, seed=4, joint_angles=walk)
    c = sm.render_fly(cams, 2, seed=5, joint_angles=walk)
    assert a.frames.shape == (2, 2, 96, 192) and a.frames.dtype == np.uint8
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.pts3d, b.pts3d)
    assert np.abs(a.frames.astype(int) - c.frames).mean() > 2
    assert a.meta["look"] != c.meta["look"] and a.meta["walk"] != c.meta["walk"]
    rgb = sm.render_fly(cams, 1, seed=4, joint_angles=walk, rgb=True)
    assert rgb.frames.shape == (2, 1, 96, 192, 3)


def test_ground_truth_is_the_projection_of_the_truth(assets, walk):
    cams = resize_cameras(synth.default_rig().subset(["rh", "f", "lm"]), 0.25)
    rec = sm.render_fly(cams, 2, seed=1, joint_angles=walk)
    np.testing.assert_allclose(rec.pts2d, cams.project(rec.pts3d))
    body = np.linalg.norm(rec.pts3d[:, SK.point_names.index("l_antenna")] - rec.pts3d[:, SK.point_names.index("l_stripe_3")], axis=-1)
    assert ((body > 1.8 * sm.DEFAULT_UNITS_PER_MM) & (body < 2.8 * sm.DEFAULT_UNITS_PER_MM)).all(), body   # a ~2.5 mm fly's antenna to A6
    upm2 = sm.render_fly(cams, 2, seed=1, joint_angles=walk, units_per_mm=0.45)
    np.testing.assert_allclose(upm2.pts3d, rec.pts3d * 0.5, atol=1e-9)      # the scale is exactly units_per_mm


def test_recording_written_and_read_back(assets, tmp_path):
    out = sm.synth_recording_mujoco(tmp_path / "rec", n_frames=2, seed=2, scale=0.2, images=True)
    names = {p.name for p in out.iterdir()}
    assert {f"camera_{v}.mp4" for v in range(7)} <= names and {"ground_truth.h5", "points2d.h5", "config.toml"} <= names
    assert "camera_3_img_1.jpg" in names
    res, extra = load_ground_truth(out)
    assert res.pts3d.shape == (2, 38, 3) and extra["pts2d_all"].shape == (7, 2, 38, 2)
    np.testing.assert_allclose(extra["pts2d_all"], res.cameras.project(res.pts3d))
    np.testing.assert_array_equal(extra["reported"], synth.default_visibility(synth.DEFAULT_VIEWS, SK))   # DeepFly3D's rule, as synth_footage
    assert json.loads(json.dumps(res.meta))["model"].startswith("NeuroMechFly")


def test_other_model_joint_angles_refused(assets, tmp_path):
    other = tmp_path / "mouse.npz"
    np.savez(other, names=np.array(["hip_flexion", "knee"]), angles=np.zeros((5, 2)), dt_s=0.01)
    cams = resize_cameras(synth.default_rig().subset(["f"]), 0.2)
    with pytest.raises(InputError, match="mouse.npz.*not NeuroMechFly's.*hip_flexion"): sm.render_fly(cams, 1, joint_angles=other)


def test_camera_seeing_nothing_is_refused(assets, walk):
    cams = resize_cameras(synth.default_rig().subset(["rm", "lm"]), 0.2)
    away = cams["lm"].replace(name="away", tvec=cams["lm"].tvec + np.array([0.0, 40.0, 0.0]))
    with pytest.raises(InputError, match="'away'"): sm.render_fly(CameraGroup([cams["rm"], away]), 1, joint_angles=walk)
    turned = cams["rm"].replace(name="turned", rmat=np.diag([-1.0, 1.0, -1.0]) @ cams["rm"].rmat, tvec=cams["rm"].tvec * [-1, 1, -1])
    with pytest.raises(InputError, match="'turned'"): sm.render_fly(CameraGroup([turned]), 1, joint_angles=walk)


def test_ball_touches_the_stance_claws_for_any_walk(assets, walk):
    "Whatever the replay (speed, start, mirror, perturbation), the ball ends up under the fly with claws on it."
    fly = sm.build_fly(sm.MjLook(), 0, assets)
    claws = [SK.point_names.index(f"{s}{l}_claw") for s in "lr" for l in "fmh"]
    for seed in range(2004, 2016):                                      # 2011's replay once defeated the root bracket
        w = sm.sample_walk(seed)
        names, A = sm.walk_angles(walk, 3, 100.0, w, fly.mirror_sign(walk.names))
        qadr = fly.check_names(names)
        top, turn = sm.place_ball(fly, qadr, A, 100.0, np.random.default_rng(seed))
        assert -1.6 < top < 0.0 and turn.shape == (3,)                  # below the thorax (at 0.3 mm), within leg reach
        fly.pose(qadr, A[1]); X = fly.keypoints_mm()[claws]
        gaps = np.linalg.norm(X - [0, 0, top - fly.ball_radius_mm], axis=-1) - fly.ball_radius_mm
        assert np.sort(gaps)[0] < 0.15                                  # some claw is on (or in) the ball in a middle frame


# --- deeperfly's own gait through inverse kinematics ----------------------------------------------------

@pytest.fixture(scope="module")
def ikfly(assets):
    return sm.build_fly(sm.MjLook(), 0, assets)


def _pose_points(fly, names, A):
    qadr, X = fly.check_names(names), []
    for a in A: fly.pose(qadr, a); X.append(fly.keypoints_mm())
    return np.array(X)


def test_ik_recovers_known_angles(ikfly, walk):
    """The body posed with random angles anywhere in the middle 80% of each joint's limits; its own keypoints as targets;
    the fit starts from the recorded mean pose (then from the previous, unrelated pose). Angles and points come back to
    1e-4 rad and 1e-5 mm: far below anything visible (1 px is about 0.005 mm at the rig's 960x480), and above the solver's
    stopping tolerances (measured: at most 9e-7 rad and 8e-8 mm over 24 poses)."""
    names = ikfly.leg_joint_names()
    assert len(names) == 42 and names == walk.names                  # 7 DOFs per leg, read from the MJCF: the recorded ones
    lo, hi = sm.joint_limits(ikfly, names, walk)
    true = lo + (hi - lo) * np.random.default_rng(11).uniform(0.1, 0.9, (6, len(names)))
    P = _pose_points(ikfly, names, true)
    fit = sm.fit_joint_angles(ikfly, P, joint_angles=walk)
    assert np.abs(fit.angles - true).max() < 1e-4, np.abs(fit.angles - true).max()
    assert np.abs(fit.pts3d_mm - P).max() < 1e-5
    assert np.abs(_pose_points(ikfly, names, fit.angles) - P).max() < 1e-5      # re-posed independently of the fit's own report


def test_targets_keep_the_generators_leg_shapes(ikfly):
    "targets_in_model only scales, turns (sway) and shifts: each leg's segments keep the generator's lengths times one scale."
    W = synth.walking_fly(20, 100.0, seed=3, sway=1.0)
    T, info = sm.targets_in_model(W, ikfly)
    s = info["scale"]
    for leg in synth.FLY_LEGS:
        idx = SK.index([f"{leg}_{j}" for j in FLY_LEG_JOINTS])
        seg = np.linalg.norm(np.diff(T[:, idx], axis=1), axis=-1)
        np.testing.assert_allclose(seg, s * np.linalg.norm(np.diff(W[:, idx], axis=1), axis=-1), rtol=1e-9)
        np.testing.assert_allclose(seg[:, 0], s * synth.LEG_GEOMETRY[leg[1]]["lengths"][0], rtol=1e-9)   # the generator's coxa
    ikfly.pose(np.zeros(0, int), np.zeros(0)); rest = ikfly.keypoints_mm()
    bc = SK.index([f"{l}_body_coxa" for l in synth.FLY_LEGS])
    np.testing.assert_allclose(T[:, bc], np.broadcast_to(rest[bc], T[:, bc].shape), atol=1e-9)   # legs hang on the model's coxae
    base = np.array([np.multiply(synth.LEG_GEOMETRY[l[1]]["base"], [1, 1 if l[0] == "l" else -1, 1]) for l in synth.FLY_LEGS])
    a, b = base - base.mean(0), rest[bc] - rest[bc].mean(0)            # the generator's coxae without sway, the model's
    assert abs(s - (a * b).sum() / (a * a).sum()) < 0.01 * s            # the least-squares scale, up to the sway's mean


def test_generator_gait_fits_the_body(ikfly, walk):
    """walking_fly's gait fitted: median keypoint residual < 0.08 mm (3.3% of a leg), every residual < 0.2 mm. Measured
    over stride 4-16 Hz, duty 0.5-0.7, two seeds: median 0.065-0.067 mm (2.7%), max 0.151 mm. It cannot reach 0: the
    generator's tarsi are ~0.7x NeuroMechFly's relative to the femur, so ~0.15-0.2 mm of length is spread along each leg."""
    names, A, fit = sm.gait_angles(ikfly, 30, 100.0, sm.GaitParams(stride_hz=11.0, duty=0.55, seed=5), joint_angles=walk)
    lo, hi = sm.joint_limits(ikfly, names, walk)
    assert A.shape == (30, 42) and (A >= lo - 1e-9).all() and (A <= hi + 1e-9).all()
    P = _pose_points(ikfly, names, A)
    legs = SK.index([f"{l}_{j}" for l in synth.FLY_LEGS for j in FLY_LEG_JOINTS[1:]])
    r = np.linalg.norm(P[:, legs] - fit.targets_mm[:, legs], axis=-1)       # recomputed from the angles, not the fit's report
    assert np.median(r) < 0.08 and r.max() < 0.2, (np.median(r), r.max())
    assert np.median(r / np.repeat(fit.leg_length_mm, 4)[None]) < 0.033
    claws = SK.index([f"{l}_claw" for l in synth.FLY_LEGS])
    assert np.ptp(P[:, claws, 0], axis=0).min() > 0.3                    # the claws really stride (generator: ~0.6 mm)
    thc = [i for i, n in enumerate(names) if "Coxa" in n]               # ThC yaw/pitch/roll: slow in the generator's gait
    assert np.abs(np.diff(A[:, thc], axis=0)).max() < 0.5                # warm-started: no flip to another yaw/pitch/roll branch (~pi);
                                                                          # measured 0.27 rad here, 0.35 at 16 Hz (tarsi do swing fast)


def test_ik_bad_targets(ikfly, walk):
    "Wrong shape and a missing body-coxa are errors; other missing targets are left out; out-of-reach ones stop at the limits."
    names = ikfly.leg_joint_names()
    with pytest.raises(InputError, match=r"targets_mm must be \(T, 38, 3\)"): sm.fit_joint_angles(ikfly, np.zeros((3, 30, 3)), joint_angles=walk)
    W = synth.walking_fly(4, 100.0, seed=1)
    W[2, SK.index(["rm_body_coxa"])[0]] = np.nan
    with pytest.raises(InputError, match=r"body-coxa.*frames \[2\]"): sm.targets_in_model(W, ikfly)
    P = _pose_points(ikfly, names, walk.angles[[0, 40, 80]])
    Q = P.copy()
    Q[1, SK.index(["lf_claw"])[0]] = np.nan                              # one missing point: fitted without it
    rh = SK.index([f"rh_{j}" for j in FLY_LEG_JOINTS[1:]])
    Q[2, rh] = np.inf                                                     # a whole leg missing: it keeps the previous angles
    fit = sm.fit_joint_angles(ikfly, Q, joint_angles=walk)
    assert np.isnan(fit.residual_mm[1, 0, 3]) and np.nanmax(fit.residual_mm[:2]) < 1e-5
    rhj = [i for i, n in enumerate(names) if "RH" in n]
    np.testing.assert_allclose(fit.angles[2, rhj], fit.angles[1, rhj])
    assert np.isnan(fit.residual_mm[2, 5]).all() and np.nanmax(fit.residual_mm[2]) < 1e-5
    far = P[:1].copy(); far[0, :, 2] -= 5.0                               # 5 mm below reach
    fit = sm.fit_joint_angles(ikfly, far, joint_angles=walk)
    lo, hi = sm.joint_limits(ikfly, names, walk)
    assert (fit.angles >= lo - 1e-9).all() and (fit.angles <= hi + 1e-9).all() and np.nanmedian(fit.residual_mm) > 1.0


def test_gait_recording_truth_is_the_body(assets, walk, tmp_path):
    "render_fly(gait=...) films the fitted body and writes its keypoints (not the generator's) as the truth."
    cams = resize_cameras(synth.default_rig().subset(["rm", "lf"]), 0.2)
    g = sm.GaitParams(stride_hz=9.0, seed=6)
    rec = sm.render_fly(cams, 3, seed=6, joint_angles=walk, gait=g, noise_std=0)
    fly = sm.build_fly(sm.MjLook(), 0, assets)
    names, A, fit = sm.gait_angles(fly, 3, 100.0, g, joint_angles=walk)
    upm = rec.meta["units_per_mm"]
    np.testing.assert_allclose(rec.pts3d, _pose_points(fly, names, A) * upm, atol=1e-9)
    legs = SK.index([f"{l}_{j}" for l in synth.FLY_LEGS for j in FLY_LEG_JOINTS[1:]])
    assert np.abs(rec.pts3d[:, legs] - fit.targets_mm[:, legs] * upm).max() > 0.02     # not the generator's targets
    assert rec.meta["gait"]["stride_hz"] == 9.0 and rec.meta["ik"]["median_mm"] < 0.08 and "walk" not in rec.meta
    out = sm.synth_recording_mujoco(tmp_path / "g", n_frames=2, seed=3, scale=0.15, points2d=False, gait=True)
    res, _ = load_ground_truth(out)
    assert res.pts3d.shape == (2, 38, 3) and 4.8 <= res.meta["gait"]["stride_hz"] <= 12.8
