"""Interop (issue 16): round trips through each ecosystem's own reader (pynwb / ndx-pose, sleap-io, pandas, aniposelib,
movement), camera projections, nwbinspector on the exported bundled example, the same 3D from foreign 2D files, and the
bad inputs that must be refused by file name."""
import warnings
from pathlib import Path

import numpy as np
import pytest

from deeperfly_nb.cameras import CameraGroup, ring_camera
from deeperfly_nb.core import InputError
from deeperfly_nb.results import PoseResult
from deeperfly_nb.pipeline import triangulate_points2d
from deeperfly_nb.triangulation import triangulate
from deeperfly_nb import interop as I

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "points2d.h5"


def same(a, b, eps=1e-9):
    "Equal to `eps`, NaN exactly where NaN."
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN in different places"
    np.testing.assert_allclose(a, b, rtol=0, atol=eps)


@pytest.fixture(scope="module")
def example():
    "The bundled example's 2D, triangulated (3D and reprojection error), with one strongly distorted camera in the rig."
    r = PoseResult.load(EXAMPLE)
    cams = r.cameras.replace({"lf": r.cameras["lf"].replace(dist=np.array([-0.3, 0.12, 0.002, -0.001, -0.02]))})
    return triangulate_points2d(cams, r.skeleton, r.pts2d, r.conf, fps=r.fps, meta={"example": True})


@pytest.fixture(scope="module")
def out(tmp_path_factory, example):
    "The example exported once to every format."
    d = tmp_path_factory.mktemp("interop")
    pytest.importorskip("pandas"); pytest.importorskip("pynwb"); pytest.importorskip("ndx_pose"); pytest.importorskip("sleap_io")
    for name in ("res.nwb", "res.slp", "pred.csv", "pose-3d.csv", "calibration.toml"):
        I.export_result(example, d / name)
    return d


def test_example_has_unseen_points(example):
    "The round trips below mean something: the example holds NaN (unseen) points and varied confidences."
    assert np.isnan(example.pts2d).any() and np.isfinite(example.pts2d).any()
    assert len(np.unique(example.conf)) > 100 and example.pts3d is not None


def test_nwb_roundtrip_through_pynwb(example, out):
    pynwb = pytest.importorskip("pynwb")
    with pynwb.NWBHDF5IO(str(out / "res.nwb"), "r") as io:           # pynwb / ndx-pose read it on their own
        m = io.read().processing["behavior"]["deeperfly_pose"]
        assert type(m).__name__ == "MultiCameraPoseEstimation"
        for v, view in enumerate(example.view_names):
            pe = m.pose_estimations[view]
            for n in (0, 23, 37):
                s = pe.pose_estimation_series[example.skeleton.point_names[n]]
                same(s.data[:], example.pts2d[v, :, n]); same(s.confidence[:], example.conf[v, :, n])
            cam = pe.device
            K = cam.intrinsic_matrix[:]
            same([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], example.cameras[view].intr)
            same(cam.distortion_coefficients[:], example.cameras[view].dist)
        same(m.pose_estimation_series["rf_claw"].data[:], example.pts3d[:, example.skeleton.index(["rf_claw"])[0]])
    back = I.read_nwb(out / "res.nwb")
    assert back == example                                            # every array bit for bit, cameras, skeleton, meta
    same(back.cameras.project(example.pts3d), example.cameras.project(example.pts3d), eps=1e-6)


def test_nwbinspector_finds_no_error_or_violation(out, capsys):
    nwbinspector = pytest.importorskip("nwbinspector")
    msgs = list(nwbinspector.inspect_nwbfile(nwbfile_path=str(out / "res.nwb")))
    with capsys.disabled():
        print(f"\nnwbinspector on the exported bundled example: {len(msgs)} message(s)")
        from collections import Counter
        for (imp, check), n in sorted(Counter((x.importance.name, x.check_function_name) for x in msgs).items()):
            print(f"  {n:3d} x {imp}: {check}")
    bad = {nwbinspector.Importance.CRITICAL, nwbinspector.Importance.ERROR, nwbinspector.Importance.PYNWB_VALIDATION,
           nwbinspector.Importance.BEST_PRACTICE_VIOLATION}             # the 3D unit among them: NWB's n.a., not a made-up one
    assert [x.message for x in msgs if x.importance in bad] == []


def test_sleap_roundtrip_through_sleap_io(example, out):
    sio = pytest.importorskip("sleap_io")
    labels = sio.load_slp(str(out / "res.slp"))
    assert [Path(v.filename).stem for v in labels.videos] == example.view_names
    vidx = {id(v): k for k, v in enumerate(labels.videos)}
    seen = 0
    for lf in labels.labeled_frames:
        a = lf.instances[0].numpy(scores=True)
        v, t = vidx[id(lf.video)], lf.frame_idx
        same(a[:, :2], example.pts2d[v, t]); same(a[:, 2], example.conf[v, t]); seen += 1
    assert seen == sum(np.isfinite(example.pts2d[v, t]).any() for v in range(7) for t in range(example.n_frames))
    p, c, info = I.read_points2d(out / "res.slp", example.skeleton, example.view_names)
    same(p, example.pts2d, 0); same(c, example.conf, 0)


def test_dlc_csv_and_h5_roundtrip_through_pandas(example, out):
    pd = pytest.importorskip("pandas")
    for v, view in enumerate(example.view_names):
        df = pd.read_csv(out / f"pred_{view}.csv", header=[0, 1, 2], index_col=0)
        assert list(df.columns.names) == ["scorer", "bodyparts", "coords"]
        a = df.to_numpy().reshape(example.n_frames, example.n_points, 3)
        same(a[..., :2], example.pts2d[v]); same(a[..., 2], example.conf[v])
    p, c, info = I.read_points2d(sorted(out.glob("pred_*.csv")), example.skeleton, example.view_names)
    same(p, example.pts2d, 0); same(c, example.conf, 0)
    pytest.importorskip("tables")
    files = I.export_result(example, out / "pred.h5", format="dlc-h5")
    same(pd.read_hdf(files[2]).to_numpy().reshape(example.n_frames, -1, 3)[..., :2], example.pts2d[2])
    p, c, _ = I.read_points2d({v: f for v, f in zip(example.view_names, files)}, example.skeleton, example.view_names)
    same(p, example.pts2d, 0); same(c, example.conf, 0)


def test_anipose_calibration_through_aniposelib(example, out):
    ac = pytest.importorskip("aniposelib.cameras")
    ani = ac.CameraGroup.load(str(out / "calibration.toml"))
    X = example.pts3d[np.isfinite(example.pts3d).all(-1)]
    px = ani.project(X)
    same(np.stack([px[ani.get_names().index(n)] for n in example.view_names]), example.cameras.project(X), eps=1e-6)
    back = I.read_anipose_calibration(out / "calibration.toml", example.view_names)
    same(back.project(X), example.cameras.project(X), eps=1e-6)


def test_anipose_calibration_keeps_rig_order_past_ten_cameras(tmp_path):
    "aniposelib sorts cam_10 before cam_2; deeperfly keeps the rig's order."
    ac = pytest.importorskip("aniposelib.cameras")
    rig = CameraGroup([ring_camera(f"v{i}", 27 * i, focal_px=1200, image_size=(480, 640), distance=40) for i in range(13)])
    I.write_anipose_calibration(rig, tmp_path / "calibration.toml")
    assert ac.CameraGroup.load(str(tmp_path / "calibration.toml")).get_names()[2] == "v10"
    back = I.read_anipose_calibration(tmp_path / "calibration.toml")
    assert back.names == rig.names
    X = np.random.default_rng(3).normal(size=(40, 3))
    same(back.project(X), rig.project(X), eps=1e-6)


def test_anipose_3d_through_pandas_and_movement(example, out):
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(out / "pose-3d.csv")
    for n in (0, 19, 37):
        name = example.skeleton.point_names[n]
        same(df[[f"{name}_x", f"{name}_y", f"{name}_z"]].to_numpy(), example.pts3d[:, n])
    p3, info = I.read_anipose_3d(out / "pose-3d.csv", example.skeleton)
    same(p3, example.pts3d, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        same(info["error"], np.nanmean(example.reproj_error, 0))
    pytest.importorskip("movement")
    same(I.read_movement_file(out / "pose-3d.csv", "Anipose", example.skeleton)[0], example.pts3d)


def test_movement_roundtrip(example, tmp_path):
    pytest.importorskip("movement"); xr = pytest.importorskip("xarray")
    two, three = I.to_movement(example)
    assert two.position.dims == ("view", "time", "space", "keypoints", "individuals")
    same(two.position.sel(view="f", space="y").to_numpy()[..., 0], example.pts2d[3, ..., 1])
    same(three.position.sel(space="z").to_numpy()[..., 0], example.pts3d[..., 2])
    files = I.export_result(example, tmp_path / "res.nc")
    p, c = I.from_movement(xr.load_dataset(files[0]), example.skeleton, example.view_names)
    same(p, example.pts2d, 0); same(c, example.conf, 0)
    same(I.from_movement(xr.load_dataset(files[1]), example.skeleton)[0], example.pts3d, 0)


def test_same_3d_from_foreign_2d(example, out):
    "End to end: the 3D triangulated from the exported DeepLabCut CSVs and SLEAP file equals the 3D from deeperfly's own 2D."
    ref = triangulate(example.cameras, example.pts2d, example.conf)
    for src in (sorted(out.glob("pred_*.csv")), out / "res.slp", out / "res.nwb"):
        p, c, _ = I.read_points2d(src, example.skeleton, example.view_names)
        same(triangulate(example.cameras, p, c), ref, eps=1e-6)


def test_name_map_and_unmapped_names_reported(example, tmp_path):
    pytest.importorskip("pandas")
    names = [f"kp{n}" for n in range(example.n_points)]
    I.dlc_frame(example.pts2d[0], example.conf[0], names[:-1] + ["tail"]).to_csv(tmp_path / "x_rh.csv")
    with pytest.warns(UserWarning, match=r"x_rh.csv: keypoint\(s\) \['tail'\] are no point"):
        p, c, info = I.read_dlc_predictions(tmp_path / "x_rh.csv", example.skeleton, dict(zip(names, example.skeleton.point_names)))
    assert info["unmapped"] == ["tail"] and info["missing"] == [example.skeleton.point_names[-1]]
    same(p[:, :-1], example.pts2d[0, :, :-1], 0)
    assert np.isnan(p[:, -1]).all() and (c[:, -1] == 0).all()


# --- bad input (issue 16, item 5): each refused with the file's name and what was expected ---

def test_bad_dlc_keypoints_do_not_map(example, tmp_path):
    pytest.importorskip("pandas")
    I.dlc_frame(example.pts2d[0], example.conf[0], [f"joint{n}" for n in range(example.n_points)]).to_csv(tmp_path / "cam_rh.csv")
    with pytest.raises(InputError, match=r"cam_rh.csv: none of its keypoints \['joint0'.*give a name map"):
        I.read_points2d([tmp_path / "cam_rh.csv"], example.skeleton, example.view_names)


def test_bad_nwb_without_pose(tmp_path):
    pynwb = pytest.importorskip("pynwb"); pytest.importorskip("ndx_pose")
    from datetime import datetime, timezone
    with pynwb.NWBHDF5IO(str(tmp_path / "plain.nwb"), "w") as io:
        io.write(pynwb.NWBFile(session_description="no pose", identifier="x", session_start_time=datetime.now(timezone.utc)))
    for read in (lambda: I.read_nwb(tmp_path / "plain.nwb"), lambda: I.read_points2d(tmp_path / "plain.nwb", None, ["a"])):
        with pytest.raises(InputError, match=r"plain.nwb: no ndx-pose data .*expected an NWB file with pose estimates"): read()


def test_bad_slp_without_instances(example, tmp_path):
    sio = pytest.importorskip("sleap_io")
    sk, vid = sio.Skeleton(nodes=["a", "b"], name="s"), sio.Video(filename="rh.mp4", open_backend=False)
    sio.save_slp(sio.Labels([sio.LabeledFrame(video=vid, frame_idx=0, instances=[])], videos=[vid], skeletons=[sk]), str(tmp_path / "empty.slp"))
    with pytest.raises(InputError, match=r"empty.slp: the SLEAP file has no instances"):
        I.read_points2d(tmp_path / "empty.slp", example.skeleton, example.view_names)


def test_bad_calibration_missing_a_camera(example, out, tmp_path):
    import tomllib, tomli_w
    d = tomllib.loads((out / "calibration.toml").read_text())
    del d["cam_6"]                                                    # the rig's 'lh'
    (tmp_path / "calibration.toml").write_text(tomli_w.dumps(d))
    with pytest.raises(InputError, match=r"calibration.toml: the calibration has no camera \['lh'\].*expected every camera of the rig"):
        I.load_foreign(tmp_path / "calibration.toml", cameras=example.cameras)


def test_bad_mismatched_frame_counts(example, out, tmp_path):
    pytest.importorskip("pandas")
    files = {v: out / f"pred_{v}.csv" for v in example.view_names}
    I.dlc_frame(example.pts2d[1, :50], example.conf[1, :50], example.skeleton.point_names).to_csv(tmp_path / "pred_rm.csv")
    files["rm"] = tmp_path / "pred_rm.csv"
    with pytest.raises(InputError, match=r"different frame counts: .*pred_rh.csv \(rh\): 64, .*pred_rm.csv \(rm\): 50.*expected the same"):
        I.read_points2d(files, example.skeleton, example.view_names)


def test_bad_view_file_names(example, tmp_path):
    with pytest.raises(InputError, match=r"session1.csv: its name matches no view"):
        I.read_points2d([tmp_path / "session1.csv"], example.skeleton, example.view_names)
