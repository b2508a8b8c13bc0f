"""`deeperfly run` end to end, through the installed command: caching, kill-and-resume, videos, bad input.

These drive the real CLI in subprocesses on a short synthetic recording rendered by deeperfly itself
(`deeperfly synth`), with the bundled detector, as a user would run it.
"""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import tomllib

from deeperfly_nb.results import PoseResult
from deeperfly_nb.io import open_reader
from deeperfly_nb.run import read_record

EXE = shutil.which("deeperfly") or pytest.fail("the `deeperfly` command is not installed (pip install -e .)")
STAGES_ALL = ["pose2d", "bundle_adjustment", "triangulation", "visualization.pose2d", "visualization.pose3d"]

def deeperfly(*args, check=True, timeout=600):
    "Run the installed `deeperfly` command; returns the CompletedProcess."
    p = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"deeperfly {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p

def ran(out: Path) -> dict:
    "{stage: finished time} from the stage records (which stages ran is read from them)."
    recs = {}
    for s in STAGES_ALL:
        r = read_record(out, s)
        if r: recs[s] = r["finished_utc"] + str(r["seconds"])
    return recs

@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    "A 24-frame synthetic recording (7 MP4s + ground truth), and a config with small, fast videos."
    root = tmp_path_factory.mktemp("run")
    deeperfly("synth", root / "rec", "--frames", 24, "--seed", 7)
    cfg = (root / "rec" / "config.toml").read_text()
    cfg = cfg.replace('[[visualization.videos]]\nname = "pose2d"\nkind = "pose2d"',
                      '[[visualization.videos]]\nname = "pose2d"\nkind = "pose2d"\nscale = 0.25')
    cfg = cfg.replace('[[visualization.videos]]\nname = "pose3d"\nkind = "pose3d"',
                      '[[visualization.videos]]\nname = "pose3d"\nkind = "pose3d"\nscale = 0.25')
    cfg = cfg.replace("chunk_frames = 16", "chunk_frames = 2")      # resumable blocks of 16 frames
    assert "scale = 0.25" in cfg and "chunk_frames = 2" in cfg
    (root / "config.toml").write_text(cfg)
    return root

@pytest.fixture(scope="module")
def reference(recording):
    "An uninterrupted run: the result every other run must reproduce."
    out = recording / "ref"
    t0 = time.perf_counter()
    deeperfly("-q", "run", recording / "rec", "-c", recording / "config.toml", "-o", out)
    return out, time.perf_counter() - t0

def same_result(a: Path, b: Path):
    ra, rb = PoseResult.load(a / "results.h5"), PoseResult.load(b / "results.h5")
    for k in ("pts2d", "conf", "pts3d", "reproj_error"):
        np.testing.assert_array_equal(getattr(ra, k), getattr(rb, k), err_msg=k)
    assert ra.cameras == rb.cameras

def test_caching(recording, reference):
    out, first = reference
    assert sorted(ran(out)) == sorted(STAGES_ALL)
    before = ran(out)
    t0 = time.perf_counter()
    p = deeperfly("run", recording / "rec", "-c", recording / "config.toml", "-o", out, "--no-progress")
    second = time.perf_counter() - t0
    print(f"first run {first:.1f} s, identical second run {second:.2f} s ({100 * second / first:.1f}%)\n{p.stdout}")
    assert ran(out) == before                              # nothing recomputed (its time is printed, not asserted: load varies)
    assert "reused" in p.stdout and " ran " not in p.stdout, p.stdout
    # only [triangulation] changes: triangulation and the 3D video are recomputed, detection is reused
    # (in a copy: the reference must stay the uninterrupted default-config result the other tests compare with)
    cfg = (recording / "config.toml").read_text().replace('method = "dlt"', 'method = "ransac"')
    assert 'method = "ransac"' in cfg
    (recording / "config_ransac.toml").write_text(cfg)
    out = recording / "ransac"
    shutil.copytree(reference[0], out)
    deeperfly("-q", "run", recording / "rec", "-c", recording / "config_ransac.toml", "-o", out)
    after = ran(out)
    changed = sorted(s for s in STAGES_ALL if after[s] != before[s])
    assert changed == ["triangulation", "visualization.pose3d"], changed

def test_exports_name_the_recordings_videos(recording, reference, tmp_path):
    "A run records each view's video, so that a SLEAP export opens the real footage, not placeholder names."
    import sleap_io as sio
    out, _ = reference
    res = PoseResult.load(out / "results.h5")
    want = {v: str((recording / "rec" / f"camera_{i}.mp4").resolve()) for i, v in enumerate(res.view_names)}
    assert res.meta["videos"] == want, res.meta.get("videos")
    deeperfly("-q", "export", out / "results.h5", tmp_path / "res.slp")
    assert [v.filename for v in sio.load_slp(str(tmp_path / "res.slp")).videos] == list(want.values())

def test_fps_flag_reaches_every_file_without_detecting_again(recording, reference, tmp_path):
    "`run --fps` sets the frame rate of results.h5 and of the reused pose2d.h5 (the footage's stays in the meta); detection is not re-run."
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    assert PoseResult.load(out / "pose2d.h5").fps == 100.0            # `deeperfly synth` footage: 100 fps
    p = deeperfly("run", recording / "rec", "-c", recording / "config.toml", "-o", out, "--fps", 250, "--no-progress")
    assert "pose2d: reusing" in p.stdout + p.stderr, p.stderr        # the detections were kept, only restamped
    p2d, res = PoseResult.load(out / "pose2d.h5"), PoseResult.load(out / "results.h5")
    assert (p2d.fps, res.fps, p2d.meta["footage_fps"]) == (250.0, 250.0, 100.0), (p2d.fps, res.fps, p2d.meta)
    again = ran(out)
    deeperfly("-q", "run", recording / "rec", "-c", recording / "config.toml", "-o", out, "--fps", 250)
    assert ran(out) == again                                          # and the restamped stage is still fresh

def test_another_recording_is_refused_in_a_used_folder(recording, reference, tmp_path):
    "`deeperfly run rec2 -o out` where out holds rec1's results refuses before any work, and changes nothing there."
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    files = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("lock", "digests.json")}
    before = files()
    other = Path(__file__).resolve().parents[1] / "examples" / "data"             # the bundled example: other footage
    p = deeperfly("run", other, "-o", out, check=False)
    assert p.returncode == 2 and f"{out} holds the results of another recording, {(recording / 'rec').resolve()}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert files() == before                                            # the results, records and videos as they were

def test_a_folder_of_recordings_gets_a_summary_and_absolute_paths(recording, reference, tmp_path):
    """`deeperfly run FOLDER` without Dask writes the batch's summary.csv and summary.html too, a failed recording a row of
    its own; a result names its recording by an absolute path, whatever folder the command ran in."""
    sessions = tmp_path / "sessions"; sessions.mkdir()
    shutil.copytree(recording / "rec", sessions / "good")
    bad = shutil.copytree(recording / "rec", sessions / "bad"); (bad / "camera_2.mp4").write_bytes(b"not a video" * 100)
    shutil.copytree(reference[0], tmp_path / "out" / "good")                        # cached: the good one only checks
    p = subprocess.run([EXE, "-q", "run", "sessions", "-c", recording / "config.toml", "-o", "out"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, p.stderr
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("sessions/bad,failed,") and rows[2].startswith("sessions/good,done,"), rows
    assert (tmp_path / "out" / "summary.html").is_file() and not (tmp_path / "out" / "bad").exists()
    p = subprocess.run([EXE, "-q", "run", "rec", "-c", "config.toml", "-o", tmp_path / "rel", "--max-frames", "4"], cwd=recording,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert PoseResult.load(tmp_path / "rel" / "results.h5").meta["recording"] == str(recording / "rec")   # not "rec"

def test_inspect_scores_the_detections_file(recording, reference):
    "`inspect out/pose2d.h5` finds the recording's ground truth and scores the detections in 2D."
    import json
    out, _ = reference
    r = deeperfly("inspect", out / "pose2d.h5", "--json")
    gt = json.loads(r.stdout)["ground_truth"]
    assert gt["file"] == str(recording / "rec" / "ground_truth.h5") and gt["2d"]["overall"]["median_px"] < 3, gt.get("2d")

def test_video_shows_the_reprojected_skeleton(recording, reference):
    "Decode pose3d.mp4: frame count and fps, and the limb colours drawn at the result's reprojected points."
    from deeperfly_nb.drawing import point_colors_u8
    from deeperfly_nb.tiling import grid_layout
    from deeperfly_nb.overlay_video import scaled_points
    out, _ = reference
    res = PoseResult.load(out / "results.h5")
    for name in ("pose2d.mp4", "pose3d.mp4"):
        r = open_reader(out / name)
        assert r.count() == res.n_frames and r.fps == pytest.approx(res.fps), name
    r = open_reader(out / "pose3d.mp4")
    H, W = res.cameras[0].image_size
    h2, w2 = int(round(H * 0.25)), int(round(W * 0.25))
    layout = grid_layout([(h2, w2)] * (res.n_views + 1))                # the views, then the 3D panel
    assert r.frame_size == layout.size
    colors = point_colors_u8(res.skeleton).astype(int)
    proj = res.cameras.project(res.pts3d)                                   # (V, T, N, 2)
    shown = np.isfinite(res.pts2d).all(-1).any(1)                           # (V, N): each view draws what it detects
    hits = total = 0
    for t in (0, res.n_frames // 2, res.n_frames - 1):
        img = r[t].astype(int)
        for v in range(res.n_views):
            x0, y0 = layout.origin(v)
            for p in np.flatnonzero(shown[v] & np.isfinite(proj[v, t]).all(-1)):
                x, y = scaled_points(proj[v, t, p], w2 / W, h2 / H)
                if not (0 <= x < w2 and 0 <= y < h2): continue
                total += 1
                xi, yi = int(round(x0 + x)), int(round(y0 + y))
                patch = img[yi - 1:yi + 2, xi - 1:xi + 2].reshape(-1, 3)
                hits += bool((np.abs(patch - colors[p]).max(1) < 80).any())
    print(f"{hits}/{total} reprojected points show their limb colour in pose3d.mp4")
    assert total > 300 and hits >= 0.95 * total

def _run_and_kill(recording, out, when, timeout=300):
    "Start `deeperfly run`, SIGKILL it as soon as `when(out)` is true; returns whether it was killed in time."
    cmd = [EXE, "-q", "run", recording / "rec", "-c", recording / "config.toml", "-o", out]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    try:
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            if when(out):
                proc.send_signal(signal.SIGKILL); proc.wait(); return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()

def _in_detection(out):
    blocks = list((out / ".deeperfly" / "pose2d_blocks").glob("block_*.npz"))
    return len(blocks) >= 1

def _in_bundle_adjustment(out):
    return read_record(out, "pose2d") is not None and read_record(out, "bundle_adjustment") is None

def _writing_video(out):
    return any(out.glob(".pose*.mp4.*")) or any(out.glob(".pose*.mp4*tmp"))

@pytest.mark.parametrize("phase", ["detection", "bundle_adjustment", "video"])
def test_killed_run_resumes_to_the_same_result(recording, reference, phase):
    "SIGKILL in the middle of a stage, then run again: the result equals the uninterrupted one; no partial file counts."
    ref, _ = reference
    out = recording / f"killed_{phase}"
    when = {"detection": _in_detection, "bundle_adjustment": _in_bundle_adjustment, "video": _writing_video}[phase]
    killed = _run_and_kill(recording, out, when)
    assert killed, f"the run finished before it could be killed during {phase}"
    # what the kill left: no stage after the killed one has a record, and no final file without its record
    if phase == "detection": assert read_record(out, "pose2d") is None and not (out / "pose2d.h5").exists()
    if phase == "bundle_adjustment": assert not (out / "results.h5").exists()
    if phase == "video": assert read_record(out, "triangulation") is not None
    unrecorded = [s for s in STAGES_ALL if read_record(out, s) is None]
    rerun = deeperfly("run", recording / "rec", "-c", recording / "config.toml", "-o", out, "--no-progress")
    if phase == "detection":                                             # it says that it resumed, and from where
        assert "resuming an interrupted run" in rerun.stderr and "continuing from frame" in rerun.stderr, rerun.stderr
    assert all(read_record(out, s) is not None for s in unrecorded)       # what had no record was recomputed
    same_result(ref, out)
    for v in ("pose2d.mp4", "pose3d.mp4"):
        assert open_reader(out / v).count() == open_reader(ref / v).count()
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*tmp*"))  # no temporary files left behind

# --- bad input: a clear message, a non-zero exit, nothing half-written ------------------------------------

def _bad(*args, contains):
    p = deeperfly(*args, check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert contains in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return p

def test_bad_input(recording, tmp_path):
    rec, cfg = recording / "rec", recording / "config.toml"
    (tmp_path / "empty").mkdir()
    _bad("run", tmp_path / "empty", "-c", cfg, "-o", tmp_path / "o1", contains="footage missing or unreadable for 7 of 7 sources")
    one_missing = tmp_path / "missing"
    shutil.copytree(rec, one_missing)
    (one_missing / "camera_5.mp4").unlink()
    p = _bad("run", one_missing, "-c", cfg, "-o", tmp_path / "o2", contains="vid_lm")
    assert "camera_5.mp4" in p.stderr
    garbled = shutil.copytree(rec, tmp_path / "garbled")
    (garbled / "camera_2.mp4").write_bytes(b"not a video" * 100)
    _bad("run", garbled, "-c", cfg, "-o", tmp_path / "o4", contains="cannot open")
    _bad("run", garbled, "-c", cfg, "-o", tmp_path / "o5" / "sub" / "dir", contains="cannot open")
    for o in ("o1", "o2", "o4", "o5"): assert not (tmp_path / o).exists(), o    # a failed run leaves no empty folder behind
    nothing = tmp_path / "nothing.toml"
    nothing.write_text(cfg.read_text().replace('"camera_0.mp4", ', '"cam0_*.avi", '))
    _bad("run", tmp_path / "empty", "-c", nothing, "-o", tmp_path / "o3", contains="cam0_*.avi")
    for table, line in [("triangulation", "ransac_treshold = 3"), ("pose2d", "batch_sise = 4"),
                        ("bundle_adjustment", "bone_prior = 2"), ("pipeline", "visualisation = true")]:
        typo = tmp_path / f"typo_{table}.toml"
        typo.write_text(cfg.read_text().replace(f"\n[{table}]\n", f"\n[{table}]\n{line}\n", 1))
        assert line in typo.read_text(), table
        t0 = time.perf_counter()
        _bad("run", rec, "-c", typo, "-o", tmp_path / f"o_{table}", contains=line.split(" =")[0])
        assert time.perf_counter() - t0 < 20                  # rejected before detection starts
        assert not (tmp_path / f"o_{table}").exists()
    (tmp_path / "not_a_result.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"junk" * 100)
    _bad("inspect", tmp_path / "not_a_result.h5", contains="not_a_result.h5")
    (tmp_path / "afile").write_text("x")
    _bad("run", rec, "-c", cfg, "-o", tmp_path / "afile", contains="is a file")
    ro = tmp_path / "readonly"; ro.mkdir(); ro.chmod(0o555)
    try: _bad("run", rec, "-c", cfg, "-o", ro, contains="not writable")
    finally: ro.chmod(0o755)
    assert list(ro.iterdir()) == []

def test_run_with_a_trained_model(recording, reference, tmp_path):
    "`--model PATH` detects with that checkpoint instead of the config's model, and says so in the result."
    import torch
    from deeperfly_nb.detector import bundled_weights
    ckpt = torch.load(bundled_weights("fly_synthetic"), weights_only=True)
    g = torch.Generator().manual_seed(0)                   # another model: the bundled one with its weights disturbed
    ckpt["state_dict"] = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
                          for k, v in ckpt["state_dict"].items()}
    model = tmp_path / "run" / "model.pt"; model.parent.mkdir()
    torch.save(ckpt, model)
    out = tmp_path / "out"
    deeperfly("-q", "run", recording / "rec", "-c", recording / "config.toml", "-o", out, "--max-frames", 4, "--model", model)
    res, ref = PoseResult.load(out / "results.h5"), PoseResult.load(reference[0] / "results.h5")
    assert res.provenance["config"]["pose2d"]["models"][0]["weights"] == str(model.resolve())
    moved = np.linalg.norm(res.pts2d - ref.pts2d[:, :4], axis=-1)
    assert np.nanmax(moved) > 0.1, np.nanmax(moved)        # its own detections, not the bundled model's
    _bad("run", recording / "rec", "-c", recording / "config.toml", "-o", tmp_path / "o2", "--model", tmp_path / "none.pt",
         contains="none.pt does not exist")
    _bad("run", recording / "rec", "-c", recording / "config.toml", "-o", tmp_path / "o3", "--model", f"lifter={model}",
         contains="no model 'lifter'")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
