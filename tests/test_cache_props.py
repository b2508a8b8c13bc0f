"""The cache, as a property (issue 10): for random edits of config keys, of input files' content (keeping their
size and times) and of the code version, the stages that re-run are exactly those whose inputs changed, and
the result equals a fresh run's.

Which stage reads what is written down here, independently of `deeperfly_nb.run`: `DIRECT` names the stages
that read an edited thing themselves; a later stage must re-run exactly when an earlier stage's output *data*
changed, which the test sees by comparing the outputs' arrays before and after. (`results.h5` records the
config tables it was made with, all but `[visualization]`, so it reads them too.)
"""
import copy, os, shutil, tempfile, tomllib
from pathlib import Path
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import deeperfly_nb.run as run_mod
from deeperfly_nb.config import Config
from deeperfly_nb.results import PoseResult
from deeperfly_nb.run import run_recording
from conftest import as_image_folder, tiny_recording

VIDEOS = {"visualization.pose2d", "visualization.pose3d"}
TRI = "triangulation"

def _cfg(d, key, value):
    "Set a dotted key of a config dict (a [[visualization.videos]] entry by index)."
    *path, last = key.split(".")
    for k in path: d = d[int(k)] if isinstance(d, list) else d[k]
    d[last] = value

# name: (config edit (key, value) or a file/code edit, the stages that read the edited thing themselves)
DIRECT = {
    "triangulation.method": (("triangulation.method", "ransac"), {TRI}),
    "triangulation.weigh_by_confidence": (("triangulation.weigh_by_confidence", False), {TRI}),
    "bundle_adjustment.min_confidence": (("bundle_adjustment.min_confidence", 0.35), {"bundle_adjustment", TRI}),
    "cameras.rf.focal_px": (("cameras.rf.focal_px", 12000.0), {"bundle_adjustment", TRI}),
    "pipeline.fps": (("pipeline.fps", 50.0), {TRI} | VIDEOS),
    "pose2d.batch_size": (("pose2d.batch_size", 3), {TRI}),       # how detection runs, not what it finds: only the provenance
    "video pose2d scale": (("visualization.videos.0.scale", 0.3), {"visualization.pose2d"}),
    "video pose3d panel": (("visualization.videos.1.with_3d_panel", False), {"visualization.pose3d"}),
    "weights content": ("weights", {"pose2d"}),
    "footage content": ("footage", {"pose2d"} | VIDEOS),
    "code pose2d": ("code", {"pose2d"}),
    "code bundle_adjustment": ("code", {"bundle_adjustment"}),
    "code triangulation": ("code", {TRI}),
    "code visualization": ("code", VIDEOS),
}

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    "A 6-frame recording as equal-size BMP frames, two tiny detectors of equal file size, a config, a complete run."
    root = tmp_path_factory.mktemp("cacheprops")
    d = tiny_recording(root / "mp4", seed=21)
    as_image_folder(root / "mp4" / "rec", root / "rec", "bmp")
    for n in ("w.pt", "v.pt"): shutil.move(root / "mp4" / n, root / n)
    assert (root / "w.pt").stat().st_size == (root / "v.pt").stat().st_size
    d["pose2d"]["models"][0]["weights"] = str(root / "w.pt")
    for i, s in enumerate(d["sources"]): s["pattern"] = f"camera_{i}_img_*.bmp"
    rep = run_recording(root / "rec", root / "out", Config.from_dict(d), progress=False)
    assert len(rep.ran) == 5
    return root, d

def _data(out:Path) -> dict:
    "What each stage computed, read back from its files: 2D arrays, the rig, the result's data."
    p2 = PoseResult.load(out / "pose2d.h5")
    res = PoseResult.load(out / "results.h5")
    return {"pose2d": (p2.pts2d.tobytes(), p2.conf.tobytes()),
            "rig": tomllib.loads((out / "cameras.toml").read_text()),
            "result": (res.pts2d.tobytes(), res.conf.tobytes(), res.pts3d.tobytes(), res.reproj_error.tobytes(),
                       res.cameras.to_dict(), res.fps)}

def _expected(direct:set, before:dict, after:dict) -> set:
    "The stages that must re-run: those reading an edit, and those reading an earlier stage's changed data."
    changed = {k for k in before if before[k] != after[k]}
    out = set(direct)
    if "pose2d" in changed: out |= {"bundle_adjustment", TRI, "visualization.pose2d"}
    if "rig" in changed: out |= {TRI}
    if "result" in changed: out |= {"visualization.pose3d"}
    return out

def _swap(a:Path, b:Path):
    "Swap two files' contents in place (same inodes), keeping both files' times."
    ta, tb = a.stat(), b.stat()
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db); b.write_bytes(da)
    os.utime(a, ns=(ta.st_atime_ns, ta.st_mtime_ns)); os.utime(b, ns=(tb.st_atime_ns, tb.st_mtime_ns))

@example(names=["footage content"])                       # each kind of edit at least once, whatever the draw
@example(names=["weights content", "pipeline.fps"])
@example(names=["code triangulation", "video pose2d scale"])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(sorted(DIRECT)), min_size=1, max_size=2, unique=True))
def test_reruns_are_exactly_what_changed(base, monkeypatch, names):
    root, d0 = base
    work = Path(tempfile.mkdtemp(dir=root))
    out = work / "out"
    shutil.copytree(root / "out", out)
    before = _data(out)
    d = copy.deepcopy(d0)
    direct, undo = set(), []
    glue = dict(run_mod.STAGE_GLUE_VERSION)
    for name in names:
        edit, reads = DIRECT[name]
        direct |= reads
        if edit == "weights": _swap(root / "w.pt", root / "v.pt"); undo.append(lambda: _swap(root / "w.pt", root / "v.pt"))
        elif edit == "footage":
            a, b = root / "rec" / "camera_2_img_1.bmp", root / "rec" / "camera_2_img_4.bmp"
            _swap(a, b); undo.append(lambda a=a, b=b: _swap(a, b))
        elif edit == "code": glue[name.split(" ", 1)[1]] += 1
        else: _cfg(d, *edit)
    monkeypatch.setattr(run_mod, "STAGE_GLUE_VERSION", glue)
    run_mod.code_version.cache_clear()
    try:
        rep = run_recording(root / "rec", out, Config.from_dict(d), progress=False)
        d_fresh = copy.deepcopy(d); d_fresh["pipeline"]["visualization"] = False          # its videos are not compared
        run_recording(root / "rec", work / "fresh", Config.from_dict(d_fresh), progress=False)
    finally:
        for u in undo: u()
        monkeypatch.undo(); run_mod.code_version.cache_clear()
    after = _data(out)
    assert set(rep.ran) == _expected(direct, before, after), (names, rep.ran)
    assert after == _data(work / "fresh"), names
    a, f = PoseResult.load(out / "results.h5"), PoseResult.load(work / "fresh" / "results.h5")
    assert a.provenance["config"] == f.provenance["config"]
    shutil.rmtree(work)
