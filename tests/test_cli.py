"""End-to-end runs of the `deeperfly` command on the bundled example, and its handling of bad input.

Each bad-input case must exit non-zero with one line naming what is wrong, and leave nothing half-written.
"""
import os, pickle, shutil, subprocess, sys
from pathlib import Path
import h5py
import numpy as np
import pytest
from conftest import EXAMPLE, ROOT

DEEPERFLY = shutil.which("deeperfly")

def run_cli(*args, cwd=None):
    "Run the installed `deeperfly` console script (falling back to `python -m`) and return the CompletedProcess."
    cmd = [DEEPERFLY, *args] if DEEPERFLY else [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)

def leftovers(folder: Path) -> list:
    "Temporary or partial files left in `folder`."
    if not folder.exists(): return []
    state = [p.name for p in (folder / ".deeperfly").glob("*.tmp")]          # the state folder: records, config snapshot
    return state + [p.name for p in folder.iterdir() if p.name != ".deeperfly" and (p.name.startswith(".") or p.suffix == ".tmp")]

def test_main_job_on_bundled_example(tmp_path, example_dir):
    out = tmp_path / "out"
    r = run_cli("reconstruct", str(example_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "results.h5").exists() and (out / ".deeperfly" / "config.toml").exists()
    assert leftovers(out) == []
    r = run_cli("inspect", str(out / "results.h5"), "--ground-truth", str(example_dir / "ground_truth.h5"), "--json")
    assert r.returncode == 0, r.stderr
    import json
    s = json.loads(r.stdout)
    assert (s["shape"]["views"], s["shape"]["points"]) == (7, 38)
    assert s["ground_truth"]["overall"]["n"] > 0
    assert s["reprojection_error_px"]["median"] < 1.5     # 1 px detection noise
    # against the exact 3D the example was rendered from: each side of the fly within 2% of the body length
    # (antenna to the last abdominal stripe, measured on the truth) after a similarity alignment
    from deeperfly_nb.results import PoseResult, ground_truth_error
    truth = PoseResult.load(example_dir / "ground_truth.h5").pts3d
    result = PoseResult.load(out / "results.h5")
    body = float(np.median(np.linalg.norm(truth[:, 15] - truth[:, 18], axis=-1)))
    for side in (slice(0, 19), slice(19, 38)):
        err = ground_truth_error(result.pts3d[:, side], truth[:, side])["overall"]["median"]
        assert err < 0.02 * body, (side, err, body)

def test_init_writes_a_loadable_config(tmp_path):
    path = tmp_path / "config.toml"
    assert run_cli("init", str(path)).returncode == 0
    from deeperfly_nb.config import Config
    assert Config.load(path).to_dict() == Config.default().to_dict()
    r = run_cli("init", str(path))            # never overwrites silently
    assert r.returncode == 2 and "exists" in r.stderr

def _config_text():
    return (ROOT / "deeperfly_nb" / "data" / "default_config.toml").read_text()

def test_example_config_is_the_packaged_default(example_dir):
    """examples/README.md says data/config.toml is the packaged default, as `deeperfly init` writes it: a user who
    starts from it must find every table (it once lacked [refinement], [filters], [lifting], [interop], [cluster])."""
    from deeperfly_nb.config import default_config_text
    assert (example_dir / "config.toml").read_text(encoding="utf-8") == default_config_text(), \
        "examples/data/config.toml is stale: rewrite it with deeperfly_nb.config.default_config_text()"

def test_typo_in_config_is_rejected_before_any_work(tmp_path, example_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text(_config_text().replace("\n[triangulation]\n", "\n[triangulation]\nransac_treshold = 12\n", 1))
    out = tmp_path / "out"
    r = run_cli("reconstruct", str(example_dir), "-c", str(bad), "-o", str(out))
    assert r.returncode == 2
    assert "triangulation.ransac_treshold" in r.stderr and "ransac_threshold_px" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()                    # rejected before the output folder is touched

def test_camera_missing_from_rig(tmp_path, example_dir):
    text = _config_text()
    start = text.index("[cameras.lh]")
    end = text.find("\n[", start + 1)
    bad = tmp_path / "six_cameras.toml"
    bad.write_text(text[:start] + (text[end + 1:] if end > 0 else ""))
    r = run_cli("reconstruct", str(example_dir), "-c", str(bad), "-o", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "'lh'" in r.stderr
    assert not (tmp_path / "out" / "results.h5").exists()

def test_output_folder_that_is_a_file(tmp_path, example_dir):
    f = tmp_path / "out"
    f.write_text("not a folder")
    r = run_cli("reconstruct", str(example_dir), "-o", str(f))
    assert r.returncode == 2 and "is a file" in r.stderr
    assert f.read_text() == "not a folder"

def test_empty_source_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("reconstruct", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "no 2D source" in r.stderr

def test_reconstruct_refuses_to_replace_a_result(tmp_path, example_dir):
    "A second reconstruct into a folder that holds a result (maybe an hour of `deeperfly run`) refuses, naming it, unless --overwrite."
    out = tmp_path / "out"
    assert run_cli("reconstruct", str(example_dir), "-o", str(out), "--no-bundle-adjust").returncode == 0
    before = (out / "results.h5").read_bytes()
    r = run_cli("reconstruct", str(example_dir), "-o", str(out))
    assert r.returncode == 2 and f"{out / 'results.h5'} exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (out / "results.h5").read_bytes() == before and leftovers(out) == []
    r = run_cli("reconstruct", str(example_dir), "-o", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "results.h5").read_bytes() != before                     # now bundle-adjusted
    r = run_cli("inspect", str(out / "results.h5"))
    assert f"2D read from {example_dir}" in r.stdout and "detector weights" not in r.stdout, r.stdout   # no detector ran

def test_synth_refuses_to_replace_your_files(tmp_path):
    "`deeperfly synth` into a folder that holds a recording's files refuses before rendering and leaves them as they were; --overwrite replaces."
    (tmp_path / "rec").mkdir(); mine = tmp_path / "rec" / "camera_0.mp4"; mine.write_text("my own footage")
    r = run_cli("synth", str(tmp_path / "rec"), "--frames", "2")
    assert r.returncode == 2 and f"{mine} exists; give --overwrite" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert mine.read_text() == "my own footage" and sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["camera_0.mp4"]
    (tmp_path / "rec" / "notes.txt").write_text("mine too")
    r = run_cli("synth", str(tmp_path / "rec"), "--frames", "2", "--overwrite")
    assert r.returncode == 0 and mine.read_bytes()[4:8] == b"ftyp"           # now an MP4
    assert "camera_6.mp4" in r.stdout and "notes.txt" not in r.stdout, r.stdout   # it lists what it wrote, not the folder

def test_inspect_truncated_result(tmp_path, example_dir):
    out = tmp_path / "out"
    assert run_cli("reconstruct", str(example_dir), "-o", str(out), "--no-bundle-adjust").returncode == 0
    data = (out / "results.h5").read_bytes()
    cut = tmp_path / "truncated.h5"
    cut.write_bytes(data[: len(data) // 2])
    r = run_cli("inspect", str(cut))
    assert r.returncode == 2 and "truncated.h5" in r.stderr and "Traceback" not in r.stderr

def test_inspect_a_file_that_is_not_a_result(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f: f["x"] = np.arange(3)
    r = run_cli("inspect", str(p))
    assert r.returncode == 2 and "other.h5" in r.stderr

def test_inspect_scores_against_deepfly3d(tmp_path, df3d_pkl):
    "`inspect --ground-truth df3d_result.pkl` scores a reconstruction against DeepFly3D's own 2D and 3D, mirror image allowed."
    import json
    gts = {}
    for name, opts in (("source", ["--rig", "source", "--no-bundle-adjust"]), ("adjusted", [])):
        r = run_cli("reconstruct", str(df3d_pkl), "-o", str(tmp_path / name), *opts)
        assert r.returncode == 0 and ("the 3D is the fly's mirror image" in r.stderr) == (name == "source"), r.stderr   # said at once
        r = run_cli("inspect", str(tmp_path / name / "results.h5"), "--ground-truth", str(df3d_pkl), "--json")
        assert r.returncode == 0, r.stderr
        gts[name] = json.loads(r.stdout)["ground_truth"]
    for gt in gts.values():                                     # the 2D it read is DeepFly3D's own, view for view
        assert gt["2d"]["overall"]["median_px"] == 0 and gt["2d"]["overall"]["n"] == 1590, gt["2d"]["overall"]
    # DeepFly3D's calibration as it is: DeepFly3D's own 3D (measured 0.05% of the body length), same handedness
    assert gts["source"]["overall"]["median_pct_body"] < 0.1 and not gts["source"]["mirrored"]
    # the config's rig, bundle-adjusted, keeps the left legs on the left: DeepFly3D's 3D is its mirror image (3.25%)
    assert gts["adjusted"]["mirrored"] and gts["adjusted"]["overall"]["median_pct_body"] < 5
    r = run_cli("inspect", str(tmp_path / "adjusted" / "results.h5"), "--ground-truth", str(df3d_pkl), "--plot", str(tmp_path / "r.html"))
    assert "after similarity alignment that may mirror (it did)" in r.stdout, r.stdout
    assert "its 2D error compares that 2D with itself" in r.stdout                 # 0.00 px: the same 2D, said so
    page = (tmp_path / "r.html").read_text()                    # the report's figure aligns as the text does
    assert f"(similarity or mirror alignment): overall median {gts['adjusted']['overall']['median']:.4f}" in page
    assert "rig: started from the config" in page and "2D read from " in page     # the page says what inspect printed

def test_inspect_reads_every_form_of_recorded_inputs(tmp_path, example_dir):
    "Results name their 2D files as {'points2d': path}, {'points2d': [paths]} (per-view files) or, in older files, a list."
    from deeperfly_nb.results import PoseResult
    assert run_cli("reconstruct", str(example_dir), "-o", str(tmp_path / "rc"), "--no-bundle-adjust", "-q").returncode == 0
    res = PoseResult.load(tmp_path / "rc" / "results.h5")
    for i, inputs in enumerate(([str(example_dir / "points2d.h5")], {"points2d": ["a.csv", "b.csv"]})):
        res.provenance = {**res.provenance, "inputs": inputs}
        res.save(tmp_path / f"r{i}.h5")
        r = run_cli("inspect", str(tmp_path / f"r{i}.h5"), "--plot", str(tmp_path / f"r{i}.html"))
        assert r.returncode == 0 and (tmp_path / f"r{i}.html").is_file(), r.stderr
        assert ("2D read from a.csv, b.csv" if i else f"2D read from {example_dir / 'points2d.h5'}") in r.stdout, r.stdout
    assert "3D error against" in run_cli("inspect", str(tmp_path / "r0.h5")).stdout      # its ground truth found beside the 2D

def test_inspect_plot_replaces_only_its_own_reports(tmp_path, example_dir):
    "`inspect --plot` never writes over the result it reads, nor any file but an earlier report, unless --overwrite; `export` never over its input."
    import shutil
    res, notes = tmp_path / "results.h5", tmp_path / "notes.txt"
    shutil.copy(example_dir / "ground_truth.h5", res); notes.write_text("my notes")
    before = res.read_bytes()
    for target, msg in ((res, "is the result itself"), (notes, "exists and is not a deeperfly report; give --overwrite")):
        r = run_cli("inspect", str(res), "--plot", str(target))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert res.read_bytes() == before and notes.read_text() == "my notes"
    for _ in range(2):                                                    # an earlier report of ours is replaced
        assert run_cli("inspect", str(res), "--plot", str(tmp_path / "r.html")).returncode == 0
    assert run_cli("inspect", str(res), "--plot", str(notes), "--overwrite").returncode == 0 and notes.read_text() != "my notes"
    r = run_cli("export", str(res), str(res), "--format", "nwb", "--overwrite")
    assert r.returncode == 2 and "is the result being exported" in r.stderr and res.read_bytes() == before, r.stderr

def test_inspect_scores_2d_only_results(example_dir):
    "A 2D-only file (the example's noisy 2D, a run's pose2d.h5) is scored in 2D against the truth found beside it."
    import json
    r = run_cli("inspect", str(example_dir / "points2d.h5"), "--json")
    gt = json.loads(r.stdout)["ground_truth"]
    assert gt["file"].endswith("ground_truth.h5") and "overall" not in gt, gt.keys()     # no 3D to compare
    # 1 px Gaussian noise per axis: the distance's median is sqrt(2 ln 2) = 1.18 px
    assert 1.05 < gt["2d"]["overall"]["median_px"] < 1.3 and gt["2d"]["overall"]["n"] > 7000, gt["2d"]["overall"]

class _Payload:
    "Unpickling this would run a shell command that creates a marker file."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))

def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    pkl = tmp_path / "df3d_result_evil.pkl"
    pkl.write_bytes(pickle.dumps({"points2d": np.zeros((7, 2, 38, 2)), 0: _Payload(marker)}))
    r = run_cli("reconstruct", str(pkl), "-o", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "system" in r.stderr and str(pkl.name) in r.stderr
    assert not marker.exists(), "the pickle's payload ran"


def test_quiet_prints_nothing_but_errors(tmp_path):
    "-q: errors only, whatever the command prints (synth listed its files and the run command before)."
    r = run_cli("-q", "synth", str(tmp_path / "rec"), "--frames", "2")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    r = run_cli("-q", "synth", str(tmp_path / "rec"), "--frames", "2")              # refused: the error still shows
    assert r.returncode == 2 and r.stdout == "" and "camera_0.mp4 exists" in r.stderr, (r.stdout, r.stderr)


def test_other_libraries_info_lines_only_with_verbose(tmp_path):
    "Libraries that set their own logger levels (Dask's distributed logs ~30 INFO lines per batch) stay quiet unless -v."
    script = ("import logging, sys; from deeperfly_nb.cli import main\n"
              "main(sys.argv[1:])\n"
              "lg = logging.getLogger('distributed.scheduler'); lg.setLevel(logging.INFO); lg.info('dask chatter')\n"
              "logging.getLogger('deeperfly').info('our own line')\n")
    for flags, chatter in (([], False), (["-v"], True)):
        r = subprocess.run([sys.executable, "-c", script, *flags, "synth", str(tmp_path / f"r{len(flags)}"), "--frames", "2"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "our own line" in r.stderr, r.stderr
        assert ("dask chatter" in r.stderr) == chatter, (flags, r.stderr)


def test_a_refused_command_leaves_no_folder_and_no_traceback(tmp_path):
    "crop and lift refused (a missing input) leave no empty output folder; a file where a folder belongs is one line, exit 2."
    for args, out in ((["crop", "none.csv", "none.mp4", "-o", "cropout"], "cropout"),
                      (["lift", "none.h5", "-m", "lifter", "-o", "lifted/a/b"], "lifted")):
        p = run_cli(*args, cwd=tmp_path)
        assert p.returncode == 2 and "does not exist" in p.stderr and not (tmp_path / out).exists(), (args, p.stderr)
    (tmp_path / "afile").write_text("notes")
    p = run_cli("synth", "afile/rec", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == "deeperfly synth: error: afile/rec: Not a directory (a part of the path is a file, not a folder)"
    p = run_cli("run", "--overwrite", "nowhere", "--max-frames", "1", cwd=tmp_path)      # the recording after a bare --overwrite
    assert p.returncode == 2 and p.stderr.strip() == "deeperfly run: error: nowhere: no such folder", p.stderr


def test_reconstruct_applies_the_configs_filters(tmp_path):
    "reconstruct drops the 2D [filters] drop, as run does (it used to record the filters in the result and ignore them)."
    from deeperfly_nb.config import default_config_text
    from deeperfly_nb.results import PoseResult
    from deeperfly_nb.synth import write_example
    write_example(tmp_path / "rec", n_frames=8, seed=3)
    p = PoseResult.load(tmp_path / "rec" / "points2d.h5")
    p.conf[0] = 0.5; p.save(tmp_path / "rec" / "points2d.h5")         # one camera's 2D below the config's threshold
    (tmp_path / "strict.toml").write_text(default_config_text().replace("min_confidence = 0.0       #", "min_confidence = 0.9       #"))
    assert run_cli("reconstruct", "rec", "-o", "out", "-c", "strict.toml", cwd=tmp_path).returncode == 0
    res = PoseResult.load(tmp_path / "out" / "results.h5")
    assert np.isnan(res.pts2d[0]).all() and np.isfinite(res.pts2d[1:]).any()
