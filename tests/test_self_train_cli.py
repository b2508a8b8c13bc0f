"""`deeperfly self-train` end to end through the installed command, on a short synthetic recording rendered by deeperfly.

The steps are far too few to say anything about accuracy (`bench/bench_mujoco_finetune.py` measures that on real
footage); these check the loop a user drives: files, the record, resuming, mixing labels in, and bad input.
"""
import json, shutil, subprocess
from pathlib import Path
import numpy as np
import pytest

from deeperfly_nb.results import PoseResult

EXE = shutil.which("deeperfly") or pytest.fail("the `deeperfly` command is not installed (pip install -e .)")
TINY = ["--steps", "2", "--set", "batch_size=2", "--set", "crop_hw=[128,256]", "--set", "num_threads=1", "--no-progress"]

def deeperfly(*args):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=900)

@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    p = deeperfly("synth", root / "fly", "--frames", 3, "--seed", 9310)
    assert p.returncode == 0, p.stderr
    return root / "fly"

def test_self_train_rounds_resume_and_mix(rec, tmp_path):
    out = tmp_path / "st"
    p = deeperfly("self-train", rec, "-o", out, "--rounds", 2, *TINY)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "round 1: before it fly: reprojection" in p.stdout and "round 2:" in p.stdout
    assert f"deeperfly run RECORDING --model {out / 'round_2' / 'train' / 'model.pt'}" in p.stdout, p.stdout
    log = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in log["rounds"]] == [1, 2]
    assert log["rounds"][1]["started_from"] == log["rounds"][0]["model"]
    final = PoseResult.load(out / "final" / "fly" / "results.h5")          # the last run used the last model
    assert final.provenance["config"]["pose2d"]["models"][0]["weights"] == str(out / "round_2" / "train" / "model.pt")
    assert (out / "use_model.toml").read_text().count(str(out / "round_2" / "train" / "model.pt")) == 1
    mtime = (out / "round_2" / "train" / "model.pt").stat().st_mtime_ns
    p = deeperfly("self-train", rec, "-o", out, "--rounds", 2, *TINY)     # resumed: both rounds done, nothing trained
    assert p.returncode == 0, p.stderr
    assert (out / "round_2" / "train" / "model.pt").stat().st_mtime_ns == mtime
    # labelled frames mixed in: the round trains on the file's 3 frames and the recording's 3 pseudo-labelled frames, twice
    from deeperfly_nb.detector import load_checkpoint
    p = deeperfly("self-train", rec, "-o", tmp_path / "mixed", "--rounds", 1, "--labels", out / "round_1" / "labels_fly.h5",
                  "--pseudo-repeat", 2, *TINY)
    assert p.returncode == 0, p.stdout + p.stderr
    assert load_checkpoint(out / "round_1" / "train" / "model.pt")[1]["data"]["n_frames"] == 3
    assert load_checkpoint(tmp_path / "mixed" / "round_1" / "train" / "model.pt")[1]["data"]["n_frames"] == 3 + 2 * 3
    assert json.loads((tmp_path / "mixed" / "rounds.json").read_text())["options"]["pseudo_repeat"] == 2

def test_self_train_bad_input(rec, tmp_path):
    p = deeperfly("self-train", tmp_path / "nowhere", "-o", tmp_path / "o1", *TINY)
    assert p.returncode == 2 and "nowhere" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = deeperfly("self-train", rec, "-o", tmp_path / "o2", "--rounds", 0, *TINY)
    assert p.returncode == 2 and "rounds must be an integer >= 1" in p.stderr, p.stderr
    p = deeperfly("self-train", rec, "-o", tmp_path / "o3", "--set", "stpes=3", "--no-progress")
    assert p.returncode == 2 and "stpes" in p.stderr, p.stderr
    p = deeperfly("self-train", rec, "-o", tmp_path / "o4", "--pseudo-repeat", 0, *TINY)
    assert p.returncode == 2 and "pseudo_repeat must be an integer >= 1" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()
