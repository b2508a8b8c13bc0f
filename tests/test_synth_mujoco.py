"""MuJoCo renderer of the NeuroMechFly body (deeperfly_nb.synth_mujoco): the camera model against deeperfly's projection,
keypoints on the rendered fly, left-right mirroring, determinism, the recording written and read back, bad input
(missing assets, joint angles for another model, a camera that sees nothing of the fly), and deeperfly's own gait driving
the body through inverse kinematics (known angles recovered, the generator's gait fitted, bad targets, the truth written),
and a real fly's leg posture (bad files, other joints, re-posing only its joints by the walk's share, a known posture fitted).

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



def test_module_command_says_its_usage():
    import subprocess, sys
    r = subprocess.run([sys.executable, "-m", "deeperfly_nb.synth_mujoco", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and sm.FETCH_COMMAND in r.stderr and "fetch" in r.stderr

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
    """Where a keypoint is called visible, the depth buffer there is the fly's surface, within the margin of the joint; the
    truth is `label_points_mm` (the mid and hind body-coxa points on the thorax's side, not at the hinges)."""
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
    fly.pose(qadr, A[1])
    np.testing.assert_allclose(X[1], fly.label_points_mm() * upm)          # the truth: the points as DeepFly3D labels them
    bc = SK.index(["rm_body_coxa", "lh_body_coxa"])
    assert (np.linalg.norm(X[1, bc] / upm - fly.keypoints_mm()[bc], axis=1) > 0.15).all()   # not the mid and hind coxae's hinges


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
    before = {p.name: p.read_bytes() for p in out.iterdir()}                # a second render into it: refused, nothing replaced
    with pytest.raises(InputError, match=r"camera_0.mp4 exists \(and 23 more of the files to write\); give --overwrite"):
        sm.synth_recording_mujoco(out, n_frames=1, seed=3, scale=0.2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_synth_renders_neuromechfly(assets, tmp_path):
    "`deeperfly synth --renderer mujoco` writes the same files as the default renderer, with NeuroMechFly's body in them."
    import subprocess, sys
    cmd = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())", "synth", str(tmp_path / "rec"),
           "--renderer", "mujoco", "--frames", "2", "--seed", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "camera_6.mp4" in r.stdout and "ground_truth.h5" in r.stdout, r.stdout + r.stderr
    res, extra = load_ground_truth(tmp_path / "rec")
    assert res.meta["model"].startswith("NeuroMechFly") and res.meta["renderer"].startswith("mujoco") and res.pts3d.shape == (2, 38, 3)
    assert res.meta["seed"] == 4 and extra["pts2d_all"].shape == (7, 2, 38, 2)


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



# --- a real fly's leg posture ---------------------------------------------------------------------------

def test_posture_files_refused_clearly(tmp_path):
    with pytest.raises(InputError, match="no such posture file"): sm.load_posture(tmp_path / "absent.json")
    bad = {"list.json": "[1, 2]", "text.json": "not json", "short.json": '{"names": ["a", "b"], "offset_rad": [0.1]}',
           "nan.json": '{"names": ["a"], "offset_rad": [NaN]}', "nonames.json": '{"offset_rad": [0.1]}'}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=name.replace(".", r"\.")): sm.load_posture(tmp_path / name)


def test_posture_for_other_joints_or_with_gait_refused(assets, walk, tmp_path):
    cams = resize_cameras(synth.default_rig().subset(["rm"]), 0.2)
    mouse = sm.save_posture(sm.LegPosture(("hip_flexion", "knee"), np.zeros(2), "a mouse"), tmp_path / "mouse.json")
    with pytest.raises(InputError, match="'a mouse' is for other joints.*hip_flexion"): sm.render_fly(cams, 1, posture=mouse)
    ours = sm.LegPosture(walk.names, np.zeros(len(walk.names)), "zeros")
    with pytest.raises(InputError, match="posture or gait"): sm.render_fly(cams, 1, posture=ours, gait=True)


def test_posture_re_poses_only_its_joints_by_the_walks_share(assets, walk):
    cams = resize_cameras(synth.default_rig().subset(["rf"]), 0.2)
    off = np.zeros(len(walk.names)); off[walk.names.index("joint_RFTibia")] = 0.4
    bent = sm.LegPosture(walk.names, off, "right front tibia")
    def claws(scale, posture):
        rec = sm.render_fly(cams, 2, seed=1, walk=sm.WalkParams(posture_scale=scale), posture=posture, **QUIET)
        return rec.pts3d[:, [SK.point_names.index(n) for n in ("rf_claw", "lf_claw", "rf_femur_tibia")]]
    plain, half, full = claws(1.0, None), claws(0.5, bent), claws(1.0, bent)
    moved = lambda X: np.linalg.norm(X - plain, axis=-1)                  # (T, 3) world units
    assert moved(half)[:, 1:].max() == 0 and moved(full)[:, 1:].max() == 0  # the other legs and the joint above stay
    assert 0.05 < moved(half)[:, 0].min() and moved(full)[:, 0].min() > 1.8 * moved(half)[:, 0].max()

def _walk_points(fly, walk, offset, frames):
    qadr, out = fly.check_names(walk.names), []
    for a in walk.angles[frames]: fly.pose(qadr, a + offset); out.append(fly.label_points_mm())
    return np.array(out)                                                 # (T, N, 3) mm in the model's frame


def test_fit_posture_finds_a_posture_seen_from_any_rig(assets, walk):
    """A known posture (the walk with its legs lowered), reconstructed in another rig's frame, scale and handedness and
    with missing points, is matched by the fitted one within 0.01 mm per leg point (the model's frame, no body frame)."""
    fly = sm.build_fly(sm.MjLook(), 0, assets)
    frames = np.linspace(0, len(walk.angles) - 1, 40).astype(int)
    true = np.zeros(len(walk.names))
    for leg in ("LF", "RF", "LM", "RM", "LH", "RH"): true[walk.names.index(f"joint_{leg}Femur")] = 0.3     # femora turned down
    true[walk.names.index("joint_RHCoxa_yaw")] = -0.2
    real = _walk_points(fly, walk, true, frames)
    R = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]) * [1, -1, 1]                 # another rig: axes permuted, mirrored
    seen = 0.7 * real @ R.T + [3.0, -1.0, 2.0]
    seen[::5, SK.point_names.index("l_antenna")] = np.nan                         # points it does not fit on, sometimes missing
    fitted = sm.fit_posture(seen, walk, ridge=0.0, assets=assets, source="lowered legs")
    legs = [SK.point_names.index(f"{s}{l}_{j}") for s in "lr" for l in "fmh" for j in ("coxa_femur", "femur_tibia", "tibia_tarsus", "claw")]
    gap = lambda off: np.abs(np.median(_walk_points(fly, walk, off, frames)[:, legs], 0) - np.median(real[:, legs], 0)).max()
    assert gap(np.zeros_like(true)) > 0.1 and gap(fitted.offset_rad) < 0.01
    assert fitted.misfit_spans[1] < 0.1 * fitted.misfit_spans[0] and fitted.source == "lowered legs"
    with pytest.raises(InputError, match="NaN in every frame"):
        sm.fit_posture(np.where(np.arange(38)[None, :, None] == SK.point_names.index("lm_body_coxa"), np.nan, seen), walk, assets=assets)
    with pytest.raises(InputError, match=r"\(T, 38, 3\)"): sm.fit_posture(seen[:, :20], walk, assets=assets)

# --- deeperfly's own gait through inverse kinematics ----------------------------------------------------

@pytest.fixture(scope="module")
def ikfly(assets):
    return sm.build_fly(sm.MjLook(), 0, assets)


def _pose_points(fly, names, A, labelled:bool=False):
    "(T, 38, 3) the body's points posed with A, mm: its joints (`keypoints_mm`), or as labelled (`label_points_mm`)."
    qadr, X = fly.check_names(names), []
    for a in A: fly.pose(qadr, a); X.append(fly.label_points_mm() if labelled else fly.keypoints_mm())
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
    "render_fly(gait=...) films the fitted body and writes its points as labelled (not the generator's) as the truth."
    cams = resize_cameras(synth.default_rig().subset(["rm", "lf"]), 0.2)
    g = sm.GaitParams(stride_hz=9.0, seed=6)
    rec = sm.render_fly(cams, 3, seed=6, joint_angles=walk, gait=g, noise_std=0)
    fly = sm.build_fly(rec.look, 0, assets)                                 # the same abdomen (the look shapes it)
    names, A, fit = sm.gait_angles(fly, 3, 100.0, g, joint_angles=walk)
    upm = rec.meta["units_per_mm"]
    np.testing.assert_allclose(rec.pts3d, _pose_points(fly, names, A, labelled=True) * upm, atol=1e-9)
    legs = SK.index([f"{l}_{j}" for l in synth.FLY_LEGS for j in FLY_LEG_JOINTS[1:]])
    assert np.abs(rec.pts3d[:, legs] - fit.targets_mm[:, legs] * upm).max() > 0.02     # not the generator's targets
    assert rec.meta["gait"]["stride_hz"] == 9.0 and rec.meta["ik"]["median_mm"] < 0.08 and "walk" not in rec.meta
    out = sm.synth_recording_mujoco(tmp_path / "g", n_frames=2, seed=3, scale=0.15, points2d=False, gait=True)
    res, _ = load_ground_truth(out)
    assert res.pts3d.shape == (2, 38, 3) and 4.8 <= res.meta["gait"]["stride_hz"] <= 12.8


# --- the free arena, folded wings, pigment (issue 19) -------------------------------------------------

def _fly_only_depth(fly, cam, upm):
    "Depth of the fly alone (the floor's geom group hidden) through cam: finite exactly on the fly's pixels."
    gv = sm.GLView(fly.model, *cam.image_size)
    gv.opt.geomgroup[2] = 0
    try: return gv.render(fly.data, cam, upm)[1]
    finally: gv.close()


def test_arena_seen_keypoints_lie_on_the_fly(assets, walk):
    """In the arena, every keypoint called visible has the fly itself (a render with the floor hidden) within a pixel and is
    not behind its surface there (0.25 mm); 90%+ have the fly's surface at their depth within 2 px (the others: tarsi thinner
    than a pixel, in front of other parts of the fly). The body walks and turns between frames."""
    cams = synth.arena_rig(image_size=(200, 200), field=6.0).subset(["top", "ring0"])   # zoomed: the fly ~80 px long
    upm = sm.DEFAULT_UNITS_PER_MM
    fly = sm.build_fly(sm.MjLook(), 0, assets, max_size=(200, 200), scene="arena")
    names, A = sm.walk_angles(walk, 3, 100.0, sm.WalkParams(start_s=0.2))
    qadr = fly.check_names(names)
    tilt, lift = sm.stance_level(fly, qadr, A)
    path = [(np.array([0.8 * t - 0.8, 0.3 * t, lift[t]]), 0.6 * t, tilt) for t in range(3)]
    frames, vis, X = sm.render_views(fly, cams, qadr, A, np.zeros(3), sm.MjLook(**QUIET), units_per_mm=upm, body_path=path)
    on_limb = []
    for t in range(3):
        fly.place_body(*path[t]); fly.pose(qadr, A[t])
        np.testing.assert_allclose(fly.label_points_mm() * upm, X[t], atol=1e-12)   # the truth: the points as labelled
        for v, cam in enumerate(cams):
            depth, uv = _fly_only_depth(fly, cam, upm), cam.project(X[t])
            z = (X[t] @ cam.rmat[2] + cam.tvec[2]) / upm
            for n in np.flatnonzero(vis[v, t]):
                x, y = np.round(uv[n]).astype(int)
                assert np.isfinite(depth[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]).any(), (t, cam.name, SK.point_names[n])   # the fly is there
                win = depth[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3]
                fly_win = np.where(np.isfinite(win), win, np.nan)
                assert np.nanmax(fly_win) > z[n] - 0.25, (t, cam.name, SK.point_names[n])       # not behind the fly's surface there
                on_limb.append(np.nanmin(np.abs(fly_win - z[n])) < 0.25)                      # at the point's depth (as on the ball)
    assert len(on_limb) > 3 * 2 * 38 * 0.35, len(on_limb)
    assert np.mean(on_limb) > 0.9, np.mean(on_limb)             # the rest: sub-pixel tarsi in front of other parts of the fly
    top = vis[0].mean()
    assert 0.3 < top < 0.9, top                                                  # the top view hides the points under the body
    assert not vis[0][:, SK.index(["lf_body_coxa", "rf_body_coxa"])].any()   # e.g. the front coxae's hinges (the mid and hind
                                                                    # body-coxa points are on the thorax's side wall, its silhouette)
    c = X[:, SK.index([f"{l}_body_coxa" for l in synth.FLY_LEGS])].mean(1)
    np.testing.assert_allclose(np.diff(c[:, :2], axis=0), np.diff(X[:, :, :2].mean(1), axis=0), atol=0.15)  # the whole fly moves
    assert np.linalg.norm(c[-1, :2] - c[0, :2]) > 1.5                            # 1.6 mm apart (x 0.9 units/mm)


def test_arena_recording_walks_the_path_with_claws_on_the_floor(assets, walk):
    """render_arena_mujoco (the generator's gait on a flat floor, through IK): the fly moves along the path at its legs'
    speed, turns, shows in the top view where its truth says; no claw ever sinks into the floor, the lowest touches it in
    every frame and the stance claws stay near it (measured: median 0.04 mm, 75th percentile 0.05 mm above it)."""
    rig = synth.arena_rig(image_size=(160, 160)).subset(["top"])
    rec = sm.render_arena_mujoco(n_frames=16, seed=2, cameras=rig, joint_angles=walk, **QUIET)
    assert rec.meta["scene"] == "arena" and rec.frames.shape == (1, 16, 160, 160) and "gait" in rec.meta
    np.testing.assert_allclose(rec.pts2d, rig.project(rec.pts3d))
    bc = SK.index([f"{l}_body_coxa" for l in synth.FLY_LEGS])
    c = rec.pts3d[:, bc].mean(1)                                                # (T, 3) the thorax's centre
    step = np.linalg.norm(np.diff(c[:, :2], axis=0), axis=-1) * rec.fps         # units/s
    assert 0.7 * rec.meta["speed_units_s"] < np.median(step) < 1.3 * rec.meta["speed_units_s"], (np.median(step), rec.meta["speed_units_s"])
    assert rec.meta["speed_units_s"] > 3.0                                      # a walking fly: several mm/s
    axis = rec.pts3d[:, SK.index(["l_antenna"])[0], :2] - rec.pts3d[:, SK.index(["l_stripe_3"])[0], :2]
    assert np.ptp(np.unwrap(np.arctan2(axis[:, 1], axis[:, 0]))) > 0.05         # it turns
    upm = rec.meta["units_per_mm"]
    claws = (rec.pts3d[:, SK.index([f"{l}_claw" for l in synth.FLY_LEGS]), 2] - synth.ARENA_FLOOR_Z) / upm   # (T, 6) mm above the floor
    assert claws.min() > -1e-9 and np.abs(claws.min(1)).max() < 1e-9            # never below; the lowest on it, every frame
    stance = claws <= np.median(claws, axis=0)
    assert np.median(claws[stance]) < 0.08 and np.percentile(claws[stance], 75) < 0.1, (np.median(claws[stance]), np.percentile(claws[stance], 75))
    import cv2
    img = rec.frames[0].astype(np.float32)
    truth = rec.pts2d[0].mean(1)                                                # the keypoints' centre (the fly is ~20 px long here)
    yy, xx = np.mgrid[0:160, 0:160]
    for t in range(3):                                                          # frame t against frame 15 - t: the fly has moved on
        s = 15 - t
        assert np.hypot(*(truth[t] - truth[s])) > 16
        changed = cv2.morphologyEx((np.abs(img[t] - img[s]) > 25).astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
        for a, b in ((t, s), (s, t)):                                          # the changed pixels nearer where the fly is in a
            near = changed & (np.hypot(xx - truth[a, 0], yy - truth[a, 1]) < np.hypot(xx - truth[b, 0], yy - truth[b, 1]))
            assert near.sum() > 20 and np.hypot(xx[near].mean() - truth[a, 0], yy[near].mean() - truth[a, 1]) < 5, (a, near.sum())   # 4.0 with a fuller abdomen


def test_arena_recorded_walk_stance_claws_near_the_floor(assets, walk):
    """The recorded walk (its claws stood on a ball) after `stance_level`: no claw below the floor, the lowest on it, the
    stance claws hovering (measured over two replays: median 0.18-0.23 mm, 75th percentile 0.27-0.35 mm above it)."""
    fly = sm.build_fly(sm.MjLook(), 0, assets, scene="arena")
    cl = SK.index([f"{l}_claw" for l in synth.FLY_LEGS])
    for seed in (2, 5):
        names, A = sm.walk_angles(walk, 16, 25.0, sm.sample_walk(seed), fly.mirror_sign(walk.names))
        qadr = fly.check_names(names)
        tilt, lift = sm.stance_level(fly, qadr, A)
        P = []
        for t in range(16): fly.place_body(np.array([1.0, -2.0, lift[t]]), 0.7 * t, tilt); fly.pose(qadr, A[t]); P.append(fly.keypoints_mm()[cl])
        h = np.array(P)[..., 2] - fly.floor_mm
        assert h.min() > -1e-9 and np.abs(h.min(1)).max() < 1e-9
        stance = h <= np.median(h, axis=0)
        assert np.median(h[stance]) < 0.3 and np.percentile(h[stance], 75) < 0.45, (seed, np.median(h[stance]), np.percentile(h[stance], 75))


def test_arena_recording_written_like_render_arena(assets, tmp_path):
    out = sm.synth_recording_mujoco(tmp_path / "a", n_frames=2, seed=1, scene="arena", scale=0.5, gait=sm.GaitParams(seed=1))
    res, extra = load_ground_truth(out)
    assert res.pts3d.shape == (2, 38, 3) and extra["visible"].shape == (4, 2, 38) and res.meta["scene"] == "arena"
    assert res.fps == 25.0 and res.cameras.names == synth.arena_rig().names
    assert extra["reported"].all()                                              # every view reports every point, as render_arena
    with pytest.raises(InputError, match="scene"): sm.synth_recording_mujoco(tmp_path / "b", 1, scene="moon")


def _world_mesh(fly, body):
    "Mesh vertices of the body's anatomical geoms (not the pigment decals), world frame of the current pose."
    from scipy.spatial.transform import Rotation
    m, d = fly.model, fly.data
    b, pts = m.body(body).id, []
    for g in np.flatnonzero(m.geom_bodyid == b):
        k = m.geom_dataid[g]
        if k < 0 or m.geom(g).name.endswith("_band"): continue
        v = m.mesh_vert[m.mesh_vertadr[k]: m.mesh_vertadr[k] + m.mesh_vertnum[k]]
        q = m.geom_quat[g]
        pts.append(Rotation.from_quat([q[1], q[2], q[3], q[0]]).apply(v) + m.geom_pos[g])
    return np.concatenate(pts) @ d.xmat[b].reshape(3, 3).T + d.xpos[b]


def test_wings_fold_over_the_abdomen(assets):
    """Folded: each wing lies over the abdomen: within its width + 0.15 mm (measured 0.04-0.10 beyond; the model's own
    spread wings 0.29 beyond), across the dorsal midline, pointing backward within 15 deg, never more than 0.01 mm into the
    abdomen and resting on it (median 0.28-0.35 mm above the abdomen's surface under it: the rigid wing clears the
    abdomen's front hump and the abdomen tapers down behind it; over seed 5's fuller abdomen, 1.26x, 0.47 mm)."""
    for seed, look in ((0, sm.MjLook()), (5, sm.sample_mj_look(5, abdomen_scale=1.0)), (5, sm.sample_mj_look(5))):
        fly = sm.build_fly(look, seed, assets, scene="arena")
        fly.pose(np.zeros(0, int), np.zeros(0))
        ab = np.concatenate([_world_mesh(fly, b) for b in sm.ABDOMEN_BODIES])
        half_width = np.abs(ab[:, 1]).max()
        for side in "LR":
            W = _world_mesh(fly, f"{side}Wing")
            hinge = fly.data.xpos[fly.model.body(f"{side}Wing").id]
            tip = W[np.argmax(np.linalg.norm(W - hinge, axis=1))]
            d = (tip - hinge) / np.linalg.norm(tip - hinge)
            assert np.degrees(np.arccos(-d[0])) < 15, (seed, side, d)
            assert np.abs(W[:, 1]).max() < half_width + 0.15, (seed, side, np.abs(W[:, 1]).max(), half_width)
            assert W[:, 1].min() < -0.05 and W[:, 1].max() > 0.05, (seed, side)                 # across the midline
            over = [w for w in W[np.linalg.norm(W - hinge, axis=1) > 0.3][::7]]
            gaps = []
            for w in over:
                near = ab[np.hypot(ab[:, 0] - w[0], ab[:, 1] - w[1]) < 0.03]
                if len(near): gaps.append(w[2] - near[:, 2].max())
            gaps = np.array(gaps)
            assert len(gaps) > 100 and gaps.min() > -0.01, (seed, side, gaps.min())
            assert np.median(gaps) < (0.4 if look.abdomen_scale == 1 else 0.55), (seed, side, look.abdomen_scale, np.median(gaps))


def test_pigment_bands_darken_the_abdomen(assets):
    """Seen from above (wings clear, no noise), the dorsal midline of the abdomen crosses at least 3 dark bands (3+ image
    rows each), 40+ gray levels darker than its pale parts (measured: ~100); under the default translucent wings still 3,
    15+ levels darker (measured: ~28); without pigment, none (shading alone: dips of 1-2 rows)."""
    from deeperfly_nb.cameras import look_at
    def profile(**kw):
        look = sm.MjLook(**QUIET, **kw)
        fly = sm.build_fly(look, 0, assets, max_size=(240, 240), scene="arena")
        fly.pose(np.zeros(0, int), np.zeros(0))
        ab = np.concatenate([_world_mesh(fly, b) for b in sm.ABDOMEN_BODIES])
        c = ab.mean(0)
        cam = look_at("top", c + [0, 0, 40], target=c, up=(1, 0, 0), focal_px=8000, image_size=(240, 240))
        img, _, _ = sm.render_views(fly, CameraGroup([cam]), np.zeros(0, int), np.zeros((1, 0)), np.zeros(1), look, units_per_mm=1.0)
        strip = ab[np.abs(ab[:, 1]) < 0.15]                                     # along the dorsal midline, +-0.15 mm
        xbin = np.round(strip[:, 0] / 0.02).astype(int)
        top = np.array([strip[xbin == b, 2].max() for b in xbin])
        strip = strip[strip[:, 2] > top - 0.05]                                 # its upper surface
        uv = np.round(cam.project(strip)).astype(int)
        uv = uv[((uv >= 0) & (uv < 240)).all(1)]
        g = img[0, 0].astype(float)
        prof = np.array([np.median(g[r, uv[uv[:, 1] == r, 0]]) for r in np.unique(uv[:, 1])])
        return prof
    def bands(prof, margin):
        "(dark runs of 3+ rows, their mean depth below the pale level) along the abdomen, its tip's last 10% left out (shading)."
        prof = prof[: int(0.9 * len(prof))]
        pale = np.percentile(prof, 80)
        dark = np.r_[0, (prof < pale - margin).astype(int), 0]
        starts, ends = np.flatnonzero(np.diff(dark) == 1), np.flatnonzero(np.diff(dark) == -1)
        long = [(a, b) for a, b in zip(starts, ends) if b - a >= 3]
        return len(long), (pale - np.mean(np.concatenate([prof[a:b] for a, b in long]))) if long else 0.0
    runs, contrast = bands(profile(wing_alpha=0.0), 40)
    assert runs >= 3, (runs, contrast)
    runs, contrast = bands(profile(), 15)
    assert runs >= 3, (runs, contrast)
    runs, _ = bands(profile(wing_alpha=0.0, band_gray=sm.BODY_GRAY), 40)
    assert runs == 0, runs
