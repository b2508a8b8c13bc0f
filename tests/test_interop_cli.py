"""`deeperfly export` and `deeperfly reconstruct` from other tools' files (issue 16, item 3): the bundled example's 2D
written as DeepLabCut CSVs (one per view) and as a SLEAP file, then reconstructed, gives the same 3D as
deeperfly's own 2D file — through the real command line, bundle adjustment included."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deeperfly_nb.results import PoseResult

ROOT = Path(__file__).resolve().parents[1]
POINTS2D = ROOT / "examples" / "data" / "points2d.h5"


def cli(*args, cwd):
    p = subprocess.run([sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())", *map(str, args)],
                       cwd=cwd, capture_output=True, text=True, timeout=600)
    return p


@pytest.fixture(scope="module")
def sized_config(tmp_path_factory):
    "The packaged config with every camera's image size (other tools' 2D files do not record it)."
    d = tmp_path_factory.mktemp("cfg")
    assert cli("init", d / "config.toml", cwd=d).returncode == 0
    text = (d / "config.toml").read_text()
    (d / "config.toml").write_text(re.sub(r"(\[cameras\.\w+\]\n)", r"\1image_size = [480, 960]\n", text))
    return d / "config.toml"


def test_reconstruct_from_dlc_and_sleap_equals_own_2d(tmp_path, sized_config):
    for fmt, dest in (("csv", "exp/pred.csv"), ("slp", "exp/pred.slp")):
        p = cli("export", POINTS2D, dest, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "exp").glob("pred_*.csv"))) == 7
    runs = {"own": [POINTS2D], "dlc": ["exp/pred_*.csv"], "slp": ["exp/pred.slp"]}
    for name, src in runs.items():
        p = cli("reconstruct", *src, "-c", sized_config, "-o", name, "-q", cwd=tmp_path)
        assert p.returncode == 0, (name, p.stderr)
    p = cli("reconstruct", "exp/pred_*.csv", "-o", "bare", cwd=tmp_path)             # no config with image sizes: say how to give them
    assert p.returncode == 2 and "records no image size for view(s)" in p.stderr and "deeperfly init config.toml" in p.stderr, p.stderr
    assert "pred_" in p.stderr and not (tmp_path / "bare" / "results.h5").exists()
    own = PoseResult.load(tmp_path / "own" / "results.h5").pts3d
    for name in ("dlc", "slp"):
        other = PoseResult.load(tmp_path / name / "results.h5").pts3d
        np.testing.assert_array_equal(np.isnan(other), np.isnan(own))
        np.testing.assert_allclose(other, own, atol=1e-6, rtol=0, equal_nan=True, err_msg=name)


def test_export_refuses_unknown_format_and_bad_map(tmp_path):
    p = cli("export", POINTS2D, "out.xyz", cwd=tmp_path)
    assert p.returncode == 2 and "out.xyz" in p.stderr + p.stdout
    assert not (tmp_path / "out.xyz").exists()
    p = cli("reconstruct", "a.csv", "--map", "nose", cwd=tmp_path)
    assert p.returncode == 2 and "--map takes FOREIGN=POINT" in p.stderr


def test_run_reads_another_tools_2d_in_the_recording(tmp_path, sized_config):
    "[pipeline] pose2d = false: the recording's 2D may be a SLEAP file (or one DeepLabCut CSV per view)."
    rec = tmp_path / "rec"; rec.mkdir()
    assert cli("export", POINTS2D, rec / "pred.slp", cwd=tmp_path).returncode == 0
    cfg = sized_config.read_text().replace("pose2d = true ", "pose2d = false").replace("visualization = true ", "visualization = false")
    (tmp_path / "config.toml").write_text(cfg)
    p = cli("run", rec, "-c", "config.toml", "-o", "out", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    own = cli("reconstruct", POINTS2D, "-c", sized_config, "-o", "own", "-q", cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    np.testing.assert_allclose(PoseResult.load(tmp_path / "out" / "results.h5").pts3d,
                               PoseResult.load(tmp_path / "own" / "results.h5").pts3d, atol=1e-6, equal_nan=True)


def test_reconstruct_from_deeperflys_own_nwb_needs_no_config(tmp_path, sized_config):
    "An NWB file deeperfly wrote carries its rig, image sizes included: reconstruct reads it with the packaged config, and with --rig source starts from that rig."
    assert cli("export", POINTS2D, "s.nwb", cwd=tmp_path).returncode == 0
    p = cli("reconstruct", "s.nwb", "-o", "nwb", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    q = cli("reconstruct", POINTS2D, "-c", sized_config, "-o", "own", "-q", cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    np.testing.assert_allclose(PoseResult.load(tmp_path / "nwb" / "results.h5").pts3d,
                               PoseResult.load(tmp_path / "own" / "results.h5").pts3d, atol=1e-6, equal_nan=True)
    for name, src in (("nwb_rig", "s.nwb"), ("own_rig", POINTS2D)):          # the rig each file records, as it is
        p = cli("reconstruct", src, "-o", name, "--rig", "source", "--no-bundle-adjust", "-q", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
    np.testing.assert_allclose(PoseResult.load(tmp_path / "nwb_rig" / "results.h5").pts3d,
                               PoseResult.load(tmp_path / "own_rig" / "results.h5").pts3d, atol=1e-6, equal_nan=True)


def test_export_reprojected_2d_is_nearer_the_truth(tmp_path, sized_config):
    "`export --points2d reprojected` writes the 3D's projections where each view detected a point: nearer the rendered truth than the detections."
    from deeperfly_nb.interop import read_dlc_predictions
    from deeperfly_nb.synth_footage import load_ground_truth
    assert cli("reconstruct", POINTS2D, "-c", sized_config, "-o", "own", "-q", cwd=tmp_path).returncode == 0
    res = PoseResult.load(tmp_path / "own" / "results.h5")
    p = cli("export", tmp_path / "own" / "results.h5", "rep/pred.csv", "--points2d", "reprojected", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rep" / "pred_rh.csv").read_text().splitlines()[0].split(",")[1] == "deeperfly_reprojected"   # the file says which 2D
    _, extra = load_ground_truth(POINTS2D.parent)
    truth, seen = extra["pts2d_all"], extra["visible"] & np.isfinite(res.pts2d).all(-1)
    det, rep = [], []
    for v, view in enumerate(res.view_names):
        xy = read_dlc_predictions(tmp_path / "rep" / f"pred_{view}.csv", res.skeleton)[0]          # (T, N, 2) as written
        np.testing.assert_array_equal(np.isnan(xy[..., 0]), ~np.isfinite(res.pts2d[v]).all(-1) | np.isnan(res.pts3d[..., 0]))
        det.append(np.linalg.norm(res.pts2d[v] - truth[v], axis=-1)[seen[v]]); rep.append(np.linalg.norm(xy - truth[v], axis=-1)[seen[v]])
    det, rep = np.concatenate(det), np.concatenate(rep)
    assert np.nanmedian(rep) < 0.8 * np.nanmedian(det), (np.nanmedian(rep), np.nanmedian(det))
    p = cli("export", POINTS2D, "x.csv", "--points2d", "reprojected", cwd=tmp_path)            # 2D only: nothing to project
    assert p.returncode == 2 and "points2d.h5 holds 2D only" in p.stderr and not list(tmp_path.glob("x*.csv")), p.stderr


def test_export_refuses_to_replace_files(tmp_path):
    "An export names the first file that exists and writes nothing, unless --overwrite; a foreign file survives."
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "pred_lh.csv").write_text("my own labels\n")
    p = cli("export", POINTS2D, "exp/pred.csv", cwd=tmp_path)
    assert p.returncode == 2 and "pred_lh.csv exists" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert sorted(f.name for f in (tmp_path / "exp").iterdir()) == ["pred_lh.csv"] and (tmp_path / "exp" / "pred_lh.csv").read_text() == "my own labels\n"
    assert cli("export", POINTS2D, "exp/pred.csv", "--overwrite", cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "exp").glob("pred_*.csv"))) == 7 and "my own labels" not in (tmp_path / "exp" / "pred_lh.csv").read_text()
    p = cli("export", POINTS2D, "s.nwb", cwd=tmp_path); q = cli("export", POINTS2D, "s.nwb", cwd=tmp_path)
    assert p.returncode == 0 and q.returncode == 2 and "s.nwb exists" in q.stderr, q.stderr


def test_a_library_warning_is_one_line(tmp_path):
    "A view without 2D in a file: the warning is one line of the log, not Python's warning with a source listing."
    res = PoseResult.load(POINTS2D)
    pts2d = res.pts2d.copy(); pts2d[res.view_names.index("f")] = np.nan
    PoseResult(pts2d, res.conf, res.cameras, res.skeleton, fps=res.fps).save(tmp_path / "no_f.h5")
    assert cli("export", tmp_path / "no_f.h5", "no_f.nwb", cwd=tmp_path).returncode == 0
    p = cli("reconstruct", "no_f.nwb", "-o", "r", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "WARNING deeperfly: no 2D detections for view(s) ['f'] in no_f.nwb" in p.stderr, p.stderr
    assert "UserWarning" not in p.stderr and "read_points2d(" not in p.stderr, p.stderr


def test_an_unknown_2d_file_type_lists_every_kind_reconstruct_reads(tmp_path):
    "A file of no 2D kind: one line naming it and every kind `reconstruct` reads, not just deeperfly's own two."
    (tmp_path / "x.toml").write_text("[skeleton]\n")
    p = cli("reconstruct", "x.toml", "-o", "out", cwd=tmp_path)
    assert p.returncode == 2 and "x.toml: unknown 2D source type '.toml'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert all(k in p.stderr for k in (".h5", ".pkl", ".slp", ".nwb", ".nc", ".csv")) and not (tmp_path / "out").exists(), p.stderr


def test_export_nwb_takes_the_labs_fields(tmp_path):
    "--nwb FIELD=VALUE fills the NWB file's session and subject; a typo or a bad time is refused before anything is written."
    import pynwb
    p = cli("export", POINTS2D, "plain.nwb", cwd=tmp_path)
    assert p.returncode == 0 and "session_start_time is when the result was made" in p.stdout, p.stdout + p.stderr
    p = cli("export", POINTS2D, "lab.nwb", "--nwb", "session_start_time=2026-01-31T10:15:00+01:00", "--nwb", "experimenter=Doe, Jane",
            "--nwb", "institution=EPFL", "--nwb", "subject.subject_id=fly_7", "--nwb", "subject.sex=F", cwd=tmp_path)
    assert p.returncode == 0 and "session_start_time is when" not in p.stdout, p.stdout + p.stderr
    with pynwb.NWBHDF5IO(str(tmp_path / "lab.nwb"), "r") as io:
        f = io.read()
        assert (f.experimenter, f.institution, f.subject.subject_id, f.subject.sex) == (("Doe, Jane",), "EPFL", "fly_7", "F")
        assert f.session_start_time.isoformat() == "2026-01-31T10:15:00+01:00"
    for bad, said in ((["--nwb", "instituton=EPFL"], "did you mean 'institution'?"), (["--nwb", "session_start_time=monday"], "ISO 8601")):
        p = cli("export", POINTS2D, "bad.nwb", *bad, cwd=tmp_path)
        assert p.returncode == 2 and said in p.stderr and not (tmp_path / "bad.nwb").exists(), p.stderr
    p = cli("export", POINTS2D, "pred.slp", "--nwb", "institution=EPFL", cwd=tmp_path)
    assert p.returncode == 2 and "--nwb sets fields of an NWB file" in p.stderr and not (tmp_path / "pred.slp").exists(), p.stderr
