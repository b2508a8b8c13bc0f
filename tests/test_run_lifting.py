"""`deeperfly run` with a `[lifting]` table (issue 13): one camera's 2D is lifted to 3D by a trained lifter instead of
bundle-adjusted and triangulated, cached like every stage; the lifter's files enter the fingerprint by content.

A tiny lifter is trained here (seconds) on synthetic walking flies seen by camera `rm` of the synthetic rig; the
recording is a held-out synthetic fly's exact 2D in that camera (`pose2d.h5`, `[pipeline] pose2d = false`), so the
lifted 3D is compared with the synthetic ground truth."""
import shutil
import numpy as np
import pytest

from deeperfly_nb import lifting as L
from deeperfly_nb.cameras import CameraGroup
from deeperfly_nb.config import Config
from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.results import PoseResult
from deeperfly_nb.run import run_recording
from deeperfly_nb.skeleton import fly38
from deeperfly_nb.synth import default_rig, walking_fly

FLY = fly38()
ROOTS, TARGETS = L.fly_roots(FLY)
RIG = default_rig()
CAM = RIG["rm"]
TGT = [j for t in TARGETS for j in t]


def in_cam(X): return X @ CAM.rmat.T + CAM.tvec


@pytest.fixture(scope="module")
def lifter(tmp_path_factory, torch_one_thread):
    "A small lifter's folder, trained on 8 synthetic recordings seen by camera rm."
    lib = {f"r{s}": walking_fly(150, seed=s) for s in range(8)}
    val = walking_fly(60, seed=97)
    folder = tmp_path_factory.mktemp("lifter")
    L.train({k: CAM.project(v) for k, v in lib.items()}, CAM.project(val), {k: in_cam(v) for k, v in lib.items()}, in_cam(val),
            ROOTS, TARGETS, training_kwargs={"epochs": 8, "linear_size": 128}, output_folder=folder, skeleton=FLY)
    return folder


@pytest.fixture
def recording(tmp_path):
    "(recording folder, 3D truth): a held-out fly's exact 2D in camera rm, as the recording's pose2d.h5."
    truth = walking_fly(100, seed=99)
    pts2d = CAM.project(truth)[None]
    rec = tmp_path / "rec"; rec.mkdir()
    PoseResult(pts2d, np.ones(pts2d.shape[:3]), CameraGroup([CAM]), FLY, fps=100.0).save(rec / "pose2d.h5")
    return rec, truth


def config(model, tables=None, **lifting) -> Config:
    "A single-camera config (camera rm) that lifts with the lifter in `model`; `tables`: more {table: {key: value}}."
    d = {"skeleton": {"name": "fly38"}, "cameras": {"rm": RIG.to_dict()["rm"]}, "pipeline": {"pose2d": False},
         "lifting": {"model": str(model), **lifting}}
    for k, v in (tables or {}).items(): d[k] = {**d.get(k, {}), **v}
    return Config.from_dict(d)


def median_error(X, truth): return float(np.nanmedian(np.linalg.norm(X[:, TGT] - truth[:, TGT], axis=-1)))


def ran(rep) -> list: return [s.stage for s in rep.stages if s.status == "ran"]


def test_run_lifts_a_single_camera_near_the_truth(lifter, recording, tmp_path):
    rec, truth = recording
    rep = run_recording(rec, tmp_path / "out", config(lifter), progress=False)
    assert ran(rep) == ["lifting"], rep
    assert {s.stage: s.status for s in rep.stages}["bundle_adjustment"] == "disabled"
    assert not (tmp_path / "out" / "cameras.toml").exists()
    res = PoseResult.load(tmp_path / "out" / "results.h5")
    assert res.meta["lifting"]["view"] == "rm" and res.pts3d.shape == truth.shape
    err = median_error(res.pts3d, truth)
    mean_pose = float(np.nanmedian(np.linalg.norm(truth[:, TGT].mean(0) - truth[:, TGT], axis=-1)))   # the truth's own mean pose
    assert err < 0.5 * mean_pose, (err, mean_pose)                    # lifted in the world frame, near the truth
    assert np.isfinite(res.reproj_error).any()


def test_run_and_the_lift_command_agree(lifter, recording, tmp_path):
    "`deeperfly lift` and the run's lifting stage share `run.lift_view`: the same 3D."
    from deeperfly_nb.cli import main
    rec, _ = recording
    run_recording(rec, tmp_path / "out", config(lifter), progress=False)
    assert main(["lift", str(rec / "pose2d.h5"), "-m", str(lifter), "-o", str(tmp_path / "cli")]) == 0
    a, b = PoseResult.load(tmp_path / "out" / "results.h5"), PoseResult.load(tmp_path / "cli" / "results.h5")
    np.testing.assert_array_equal(a.pts3d, b.pts3d)


def test_lifting_is_cached_and_fingerprinted(lifter, recording, tmp_path):
    rec, truth = recording
    out, model = tmp_path / "out", tmp_path / "lifter"
    shutil.copytree(lifter, model)
    assert ran(run_recording(rec, out, config(model), progress=False)) == ["lifting"]
    first = PoseResult.load(out / "results.h5")
    assert ran(run_recording(rec, out, config(model), progress=False)) == []                    # reused
    assert ran(run_recording(rec, out, config(model, min_confidence=0.5), progress=False)) == ["lifting"]
    shutil.copy(model / "ckpt_last.pth", model / "ckpt_best.pth")     # the lifter's weights change in place
    assert ran(run_recording(rec, out, config(model, min_confidence=0.5), progress=False)) == ["lifting"]
    rep = run_recording(rec, out, config(model, {"pipeline": {"refinement": True}, "refinement": {"least_squares": False, "kalman": "velocity"}},
                                         min_confidence=0.5), progress=False)
    assert ran(rep) == ["lifting", "refinement"]                     # lifted 3D now goes to triangulated.h5, smoothed after
    assert (out / "triangulated.h5").is_file() and np.isfinite(first.pts3d).any()
    assert ran(run_recording(rec, out, config(model, {"pipeline": {"refinement": True}, "refinement": {"least_squares": False, "kalman": "acceleration"}},
                                             min_confidence=0.5), progress=False)) == ["refinement"]


def test_bad_lifting_input_is_named(lifter, recording, tmp_path):
    rec, _ = recording
    with pytest.raises(InputError, match=r"\[lifting\] model = .*nowhere.*no such folder"):
        run_recording(rec, tmp_path / "out", config(tmp_path / "nowhere"), progress=False)
    assert not (tmp_path / "out").exists()                      # said before detection, which wrote nothing
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is not a lifter's folder: lifter.json, ckpt_best.pth missing"):
        run_recording(rec, tmp_path / "out", config(tmp_path / "empty"), progress=False)
    with pytest.raises(ConfigError, match="lifting.min_confidance: unknown key"):
        config(lifter, min_confidance=0.5)
    with pytest.raises(ConfigError, match=r"lifting.view: 'rn' is not a camera; cameras are rm"):
        config(lifter, view="rn")


def test_train_lifter_command_makes_the_lifter_lift_uses(tmp_path, torch_one_thread, caplog, capsys):
    "`deeperfly train-lifter` on multi-camera results (3D of 4 flies), then `deeperfly lift` on a held-out fly: near its truth."
    from deeperfly_nb.cli import main
    files = []
    for s in range(4):
        X = walking_fly(150, seed=s)
        files.append(str(tmp_path / f"r{s}.h5"))
        PoseResult(RIG.project(X), np.ones((len(RIG), 150, FLY.n_points)), RIG, FLY, pts3d=X, fps=100.0).save(files[-1])
    assert main(["-q", "train-lifter", *files, "-o", str(tmp_path / "lifter"), "--view", "rm", "--epochs", "8"]) == 0
    truth = walking_fly(60, seed=99)
    PoseResult(RIG.project(truth), np.ones((len(RIG), 60, FLY.n_points)), RIG, FLY, fps=100.0).save(tmp_path / "held.h5")
    assert main(["-q", "lift", str(tmp_path / "held.h5"), "-m", str(tmp_path / "lifter"), "-o", str(tmp_path / "out")]) == 0
    lifted = PoseResult.load(tmp_path / "out" / "results.h5")
    assert lifted.meta["lifting"]["view"] == "rm"                        # the view it was trained for, not the first (rh)
    err = median_error(lifted.pts3d, truth)
    mean_pose = float(np.nanmedian(np.linalg.norm(truth[:, TGT].mean(0) - truth[:, TGT], axis=-1)))
    assert err < 0.5 * mean_pose, (err, mean_pose)
    assert main(["lift", str(tmp_path / "held.h5"), "-m", str(tmp_path / "lifter"), "--view", "rh", "-o", str(tmp_path / "rh")]) == 0
    assert "lifting view 'rh' with a lifter trained for view 'rm'" in caplog.text, caplog.text
    assert main(["train-lifter", str(tmp_path / "held.h5"), "-o", str(tmp_path / "l2")]) == 2    # 2D only: refused, nothing written
    assert not (tmp_path / "l2").exists()
    before = (tmp_path / "lifter" / "ckpt_best.pth").read_bytes()
    assert main(["train-lifter", *files, "-o", str(tmp_path / "lifter"), "--epochs", "2"]) == 2    # a trained lifter: refused
    err = capsys.readouterr().err
    assert (tmp_path / "lifter" / "ckpt_best.pth").read_bytes() == before and "already holds a trained lifter: resume it (resume=True, or --resume)" in err, err
    assert main(["-q", "train-lifter", *files, "-o", str(tmp_path / "lifter"), "--view", "rm", "--epochs", "10", "--resume"]) == 0
    assert list(L.read_log(tmp_path / "lifter")["epoch"]) == list(range(1, 11))                   # 8 epochs, then 2 more
    assert main(["train-lifter", *files, "-o", str(tmp_path / "lifter"), "--resume", "--epochs", "10"]) == 2   # nothing to train
    assert "already trained for 10 epochs: give epochs (--epochs) above 10" in capsys.readouterr().err


def test_a_lifter_for_another_camera_is_refused(lifter, recording, tmp_path):
    "A lifter records the camera it learnt through; 2D of a camera with another focal length would lift to 3D of another scale."
    import json
    rec, _ = recording
    other = tmp_path / "lifter"; shutil.copytree(lifter, other)
    meta = json.loads((other / "lifter.json").read_text())
    meta["camera"] = {"focal_px": (CAM.focal * 2).tolist(), "image_size": list(CAM.image_size)}   # learnt through another lens
    (other / "lifter.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="learnt 2D through a focal length of .* camera 'rm' has"):
        run_recording(rec, tmp_path / "out", config(other), progress=False)
    assert not (tmp_path / "out" / "results.h5").exists()
