"""A run never lies and never destroys (issue 10): one test per defect found by a hostile but honest user.

Each test drives the `deeperfly` command in a subprocess (`python -c "...main()"`, so that PYTHONPATH chooses
the package under test) on a 6-frame synthetic recording with a tiny detector, as a user would run it.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import tomllib, tomli_w

from deeperfly_nb.results import PoseResult
from conftest import as_image_folder, tiny_recording

CLI = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())"]
STAGES_ALL = ["pose2d", "bundle_adjustment", "triangulation", "visualization.pose2d", "visualization.pose3d"]

def deeperfly(*args, check=True, timeout=600, **kw):
    "Run the `deeperfly` command; returns the CompletedProcess."
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"deeperfly {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p

def refused(*args, contains):
    "The command exits 2 with one clear line (no traceback) that contains `contains`."
    p = deeperfly("-q", *args, check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and contains in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p

def stages_ran(stdout:str) -> list:
    "The stages `deeperfly run` reports as 'ran'."
    return [l.split()[0] for l in stdout.splitlines() if l.startswith("  ") and len(l.split()) > 1 and l.split()[1] == "ran"]

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    "A 6-frame synthetic recording (MP4s + ground truth), a tiny detector and a config with small videos."
    root = tmp_path_factory.mktemp("reliability")
    tiny_recording(root)
    return root

def edited_config(work, path, edit):
    "Write a copy of the work config with `edit(dict)` applied; returns its path."
    d = tomllib.loads((work / "config.toml").read_text())
    edit(d)
    path.write_text(tomli_w.dumps(d))
    return path

# 1. data loss ---------------------------------------------------------------------------------------------

def test_output_in_the_recording_folder_keeps_the_users_config(work, tmp_path):
    rec = tmp_path / "rec"; shutil.copytree(work / "rec", rec)
    user_cfg = rec / "config.toml"
    user_cfg.write_text("# my commented config\n" + (work / "config.toml").read_text())
    before = user_cfg.read_bytes()
    deeperfly("-q", "run", rec, "-c", user_cfg, "-o", rec)
    assert user_cfg.read_bytes() == before                              # the -c config, byte for byte
    assert (rec / ".deeperfly" / "config.toml").is_file()               # the run's snapshot, where it cannot collide
    assert (rec / "results.h5").is_file()

def test_a_file_the_run_did_not_write_is_never_replaced(work, tmp_path):
    out = tmp_path / "out"; out.mkdir()
    (out / "results.h5").write_text("a colleague's results")
    refused("run", work / "rec", "-c", work / "config.toml", "-o", out, contains="was not written by deeperfly run")
    assert (out / "results.h5").read_text() == "a colleague's results"
    assert not (out / "pose2d.h5").exists()                             # refused before any work

# 2. stale results reported as fresh ------------------------------------------------------------------------

def test_camera_and_fps_edits_reach_the_result(work, tmp_path):
    out = tmp_path / "out"
    deeperfly("-q", "run", work / "rec", "-c", work / "config.toml", "-o", out)
    focal = edited_config(work, tmp_path / "focal.toml", lambda d: d["cameras"]["rf"].update(focal_px=4000.0))
    p = deeperfly("run", work / "rec", "-c", focal, "-o", out, "--no-progress")
    assert stages_ran(p.stdout)[:2] == ["bundle_adjustment", "triangulation"] and "pose2d" not in stages_ran(p.stdout)
    res = PoseResult.load(out / "results.h5")
    assert res.provenance["config"]["cameras"]["rf"]["focal_px"] == 4000.0
    fps = edited_config(work, tmp_path / "fps.toml", lambda d: d["pipeline"].update(fps=50.0))
    p = deeperfly("run", work / "rec", "-c", fps, "-o", out, "--no-progress")
    assert stages_ran(p.stdout) == ["bundle_adjustment", "triangulation", "visualization.pose2d", "visualization.pose3d"]
    res = PoseResult.load(out / "results.h5")
    assert res.fps == 50.0 and res.provenance["config"]["pipeline"]["fps"] == 50.0
    assert res.provenance["config"]["cameras"]["rf"]["focal_px"] != 4000.0   # and the rig is the config's again

# 3. identity by content ------------------------------------------------------------------------------------

def _bmp_recording(work, dest):
    "The recording as one BMP per frame and camera (equal sizes), and a config that reads them."
    as_image_folder(work / "rec", dest, "bmp")
    return edited_config(work, dest.parent / "bmp.toml",
                         lambda d: [s.update(pattern=f"camera_{i}_img_*.bmp") for i, s in enumerate(d["sources"])])

def test_swapped_frames_with_equal_size_and_times_are_seen(work, tmp_path):
    cfg = _bmp_recording(work, tmp_path / "rec")
    out = tmp_path / "out"
    deeperfly("-q", "run", tmp_path / "rec", "-c", cfg, "-o", out)
    a, b = tmp_path / "rec" / "camera_3_img_1.bmp", tmp_path / "rec" / "camera_3_img_4.bmp"
    assert a.stat().st_size == b.stat().st_size
    times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    a.rename(tmp_path / "swap"); b.rename(a); (tmp_path / "swap").rename(b)
    os.utime(a, ns=times[0]); os.utime(b, ns=times[1])                  # as after an unzip: names, sizes, times kept
    p = deeperfly("run", tmp_path / "rec", "-c", cfg, "-o", out, "--no-progress")
    assert "pose2d" in stages_ran(p.stdout)
    deeperfly("-q", "run", tmp_path / "rec", "-c", cfg, "-o", tmp_path / "fresh")
    np.testing.assert_array_equal(PoseResult.load(out / "pose2d.h5").pts2d, PoseResult.load(tmp_path / "fresh" / "pose2d.h5").pts2d)

def test_weights_edited_in_place_are_seen(work, tmp_path):
    shutil.copy(work / "w.pt", tmp_path / "w.pt")
    cfg = edited_config(work, tmp_path / "w.toml", lambda d: d["pose2d"]["models"][0].update(weights=str(tmp_path / "w.pt")))
    out = tmp_path / "out"
    deeperfly("-q", "run", work / "rec", "-c", cfg, "-o", out)
    st = (tmp_path / "w.pt").stat()
    assert (work / "v.pt").stat().st_size == st.st_size                 # other weights, same architecture and size
    with open(tmp_path / "w.pt", "r+b") as f: f.write((work / "v.pt").read_bytes())    # in place: same inode
    os.utime(tmp_path / "w.pt", ns=(st.st_atime_ns, st.st_mtime_ns))                     # and the same times
    p = deeperfly("run", work / "rec", "-c", cfg, "-o", out, "--no-progress")
    assert "pose2d" in stages_ran(p.stdout)

# 4. image-folder recordings --------------------------------------------------------------------------------

def test_an_image_folder_recording_runs_to_the_end(work, tmp_path):
    "DeepFly3D's own layout (camera_<c>_img_<t>.jpg): no fps anywhere, the default patterns, videos included."
    rec = as_image_folder(work / "rec", tmp_path / "rec", "jpg")
    p = deeperfly("-q", "run", rec, "-c", work / "config.toml", "-o", tmp_path / "out", check=False)
    assert p.returncode == 0, p.stderr
    res = PoseResult.load(tmp_path / "out" / "results.h5")
    assert res.fps == 100.0 and res.provenance["fps_source"].startswith("[pipeline] fallback_fps")
    assert (tmp_path / "out" / "pose3d.mp4").is_file()

# 6. one run per output folder ------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused_or_waits(work, tmp_path):
    out = tmp_path / "out"
    cmd = [*CLI, "-q", "run", str(work / "rec"), "-c", str(work / "config.toml"), "-o", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.perf_counter()
        while not (out / ".deeperfly" / "lock").exists() and time.perf_counter() - t0 < 60: time.sleep(0.02)
        time.sleep(0.3)
        assert first.poll() is None, "the first run ended before a second could be started"
        p = refused("run", work / "rec", "-c", work / "config.toml", "-o", out, contains="is in use by deeperfly run (pid")
        assert str(first.pid) in p.stderr
        waited = deeperfly("run", work / "rec", "-c", work / "config.toml", "-o", out, "--wait", "--no-progress")
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert stages_ran(waited.stdout) == []                           # it waited, then found everything done
    finally:
        if first.poll() is None: first.kill()
    assert not list(out.glob(".*.tmp"))

def test_a_killed_run_leaves_no_lock_behind(work, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "-q", "run", str(work / "rec"), "-c", str(work / "config.toml"), "-o", str(out)])
    t0 = time.perf_counter()
    while not (out / ".deeperfly" / "lock").exists() and time.perf_counter() - t0 < 60: time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    deeperfly("-q", "run", work / "rec", "-c", work / "config.toml", "-o", out)   # no stale lock to clear by hand

# 7. inspect on a --max-frames run --------------------------------------------------------------------------

def test_inspect_compares_a_max_frames_run_with_its_frames_of_the_truth(work, tmp_path):
    out = tmp_path / "out"
    deeperfly("-q", "run", work / "rec", "-c", work / "config.toml", "-o", out, "--max-frames", 4)
    p = deeperfly("inspect", out / "results.h5", "--json")
    gt = json.loads(p.stdout)["ground_truth"]
    assert gt["file"].endswith("ground_truth.h5") and gt["overall"]["n"] > 0
    res = PoseResult.load(out / "results.h5")
    assert res.n_frames == 4 and res.provenance["frames"] == {"first": 0, "max_frames": 4, "count": 4}

# 8. unhandled tracebacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device, message", [("potato", "--device = 'potato': expected"),
                                             ("cuda", "finds no CUDA GPU")])
def test_bad_devices(work, tmp_path, device, message):
    import torch
    if device == "cuda" and torch.cuda.is_available(): pytest.skip("this machine has a GPU: cuda is a valid device here")
    refused("run", work / "rec", "-c", work / "config.toml", "-o", tmp_path / "o", "--device", device, contains=message)

def test_inspect_into_a_closed_pipe_ends_quietly(work, tmp_path):
    out = tmp_path / "out"
    deeperfly("-q", "run", work / "rec", "-c", work / "config.toml", "-o", out, "--max-frames", 2)
    p = subprocess.run(" ".join(map(str, [*[f"'{a}'" for a in CLI], "inspect", out / "results.h5", "--json"])) + " | head -n 1",
                       shell=True, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "{" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr

# 9. messages -----------------------------------------------------------------------------------------------

def test_messages_name_the_key_or_file(work, tmp_path):
    nan = edited_config(work, tmp_path / "nan.toml", lambda d: d["cameras"]["rf"].update(azimuth_deg=float("nan")))
    refused("run", work / "rec", "-c", nan, "-o", tmp_path / "o", contains="cameras.rf.azimuth_deg")
    inf = edited_config(work, tmp_path / "inf.toml", lambda d: d["cameras"]["rf"].update(distance=float("inf")))
    refused("run", work / "rec", "-c", inf, "-o", tmp_path / "o", contains="cameras.rf.distance")
    refused("inspect", work / "rec" / "camera_0.mp4", contains="it looks like a video")
    refused("run", work / "rec", "-c", work / "config.toml", "-o", tmp_path / "o", "--max-frames", 0, contains="--max-frames")

def test_a_config_made_in_python_with_a_long_label_runs(work, tmp_path):
    "A Config's source is only a label when it was made in Python: one too long for a file name must not stop the run."
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    base = Config.load(work / "config.toml")
    config = Config.from_dict(base.to_dict(), "config.toml with " + "refinement.smooth_order=3 " * 20, base.base_dir)
    report = run_recording(work / "rec", tmp_path / "out", config=config, progress=False, until="triangulation")
    assert report.result is not None and np.isfinite(report.result.pts3d).any()


def test_the_config_file_is_an_input_and_a_label_is_only_a_label(work, tmp_path):
    """A run refuses to write over the file its config was read from (`Config.path`). A config made in Python has no
    file: its source is only a label, even when the label names a file the run will write."""
    from deeperfly_nb.config import Config
    from deeperfly_nb.core import InputError
    from deeperfly_nb.run import run_recording
    out = tmp_path / "out"; out.mkdir()
    shutil.copy(work / "config.toml", out / "cameras.toml")           # the config, where bundle adjustment writes the rig
    before = (out / "cameras.toml").read_bytes()
    with pytest.raises(InputError, match="cameras.toml is an input of this run"):
        run_recording(work / "rec", out, config=Config.load(out / "cameras.toml"), progress=False, until="triangulation")
    assert (out / "cameras.toml").read_bytes() == before
    base, again = Config.load(work / "config.toml"), tmp_path / "again"
    run_recording(work / "rec", again, config=base, progress=False, until="triangulation")
    labelled = Config.from_dict(base.to_dict(), str(again / "cameras.toml"), base.base_dir)   # names an output, reads no file
    report = run_recording(work / "rec", again, config=labelled, progress=False, until="triangulation")
    assert report.result is not None and np.isfinite(report.result.pts3d).any()


def test_a_failed_run_keeps_the_snapshot_that_matches_the_result(work, tmp_path):
    out = tmp_path / "out"
    deeperfly("-q", "run", work / "rec", "-c", work / "config.toml", "-o", out)
    snap = (out / ".deeperfly" / "config.toml").read_text()
    broken = tmp_path / "broken"; shutil.copytree(work / "rec", broken)
    (broken / "camera_4.mp4").write_bytes(b"not a video")
    deeperfly("-q", "run", broken, "-c", work / "config.toml", "-o", out, check=False)
    assert (out / ".deeperfly" / "config.toml").read_text() == snap


def test_what_a_run_reuses_follows_what_it_computes(tmp_path):
    """How detection runs (batch size, chunking) re-runs nothing; a [filters] change re-renders the 2D video,
    which draws the filtered 2D, and not only the triangulation."""
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=4)
    run = lambda d: [s.stage for s in run_recording(tmp_path / "rec", tmp_path / "out", Config.from_dict(d), progress=False).stages
                     if s.status == "ran"]
    assert "pose2d" in run(d)
    d["pose2d"].update(batch_size=3, chunk_frames=8)
    assert run(d) == ["triangulation"]                 # detection reused; the result's provenance records the new config
    d["filters"] = {"min_confidence": 0.99}
    assert run(d) == ["triangulation", "visualization.pose2d", "visualization.pose3d"]


def test_an_output_a_failed_stage_left_unrecorded_is_still_the_folders(tmp_path):
    "A stage that wrote pose2d.h5 and died before its record: the next run re-runs it, instead of calling the file a user's."
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=4); d["pipeline"]["visualization"] = False
    run = lambda: run_recording(tmp_path / "rec", tmp_path / "out", Config.from_dict(d), progress=False)
    run()
    (tmp_path / "out" / ".deeperfly" / "pose2d.json").unlink()           # as if the run died between the file and its record
    assert "pose2d" in [s.stage for s in run().stages if s.status == "ran"]


def test_a_2d_file_run_into_its_own_folder_runs_again(tmp_path):
    "[pipeline] pose2d off, the output folder the recording's: the second run reads the recording's 2D, not the first run's results."
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=4); d["pipeline"]["visualization"] = False
    run_recording(tmp_path / "rec", tmp_path / "det", Config.from_dict(d), progress=False, until="pose2d")
    (tmp_path / "rec2").mkdir(); shutil.copy(tmp_path / "det" / "pose2d.h5", tmp_path / "rec2" / "mine.h5")
    d["pipeline"]["pose2d"] = False
    for _ in range(2):
        rep = run_recording(tmp_path / "rec2", tmp_path / "rec2", Config.from_dict(d), progress=False)
        assert PoseResult.load(tmp_path / "rec2" / "results.h5").points2d_files == [str(tmp_path / "rec2" / "mine.h5")]


def test_a_missing_lifter_is_said_before_detection(tmp_path):
    "A [lifting] folder that holds no lifter is refused before detection runs (and writes nothing)."
    from deeperfly_nb.config import Config
    from deeperfly_nb.core import InputError
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=4); d["pipeline"]["visualization"] = False
    d["lifting"] = {"model": str(tmp_path / "nowhere"), "view": "rm"}
    with pytest.raises(InputError, match=r"\[lifting\] model = .*nowhere.*no such folder"):
        run_recording(tmp_path / "rec", tmp_path / "out", Config.from_dict(d), progress=False)
    assert not (tmp_path / "out").exists()


def test_turning_bundle_adjustment_off_removes_the_earlier_rig(tmp_path):
    "cameras.toml beside a result made without bundle adjustment would claim a refined rig the result does not use."
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    d = tiny_recording(tmp_path, n_frames=4); d["pipeline"]["visualization"] = False
    run_recording(tmp_path / "rec", tmp_path / "out", Config.from_dict(d), progress=False)
    assert (tmp_path / "out" / "cameras.toml").is_file()
    d["pipeline"]["bundle_adjustment"] = False
    run_recording(tmp_path / "rec", tmp_path / "out", Config.from_dict(d), progress=False)
    assert not (tmp_path / "out" / "cameras.toml").exists()


def test_an_interrupted_run_promises_only_what_it_finished(work, tmp_path, monkeypatch, capsys):
    "Ctrl-C during bundle adjustment after a config change: the note names the stages this run finished, not an older run's records."
    import deeperfly_nb.run as run_mod
    from deeperfly_nb.cli import main
    out = tmp_path / "out"
    deeperfly("-q", "run", work / "rec", "-c", work / "config.toml", "-o", out)            # every stage recorded
    other = edited_config(work, tmp_path / "other.toml", lambda d: d["pose2d"].update(batch_size=3) or d["triangulation"].update(method="ransac"))
    def stop(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "_triangulation_stage", stop)
    assert main(["-q", "run", str(work / "rec"), "-c", str(other), "-o", str(out), "--no-progress"]) == 130
    note = capsys.readouterr().err
    assert "it reuses the finished stage(s) bundle_adjustment, pose2d" in note and "triangulation" not in note.split("reuses")[1], note
