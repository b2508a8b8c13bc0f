"""`deeperfly train`: a tiny end-to-end run on a DeepLabCut CSV (and on deeperfly's .h5 label file) through the installed
command, resume, and bad input — each bad case exits with code 2 and one line naming what is wrong, before training."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deeperfly_nb.cli import main
from deeperfly_nb.config import Config
from deeperfly_nb.detector import build_network, load_checkpoint

DEEPERFLY = shutil.which("deeperfly")
PLAN = Config.default().detection_plan()
TINY = ["--steps", "3", "--threads", "1", "--no-progress", "--set", "batch_size=2", "--set", "crop_hw=[64, 128]",
        "--set", "val_frac=0.3", "--set", "eval_every=3", "--set", "warmup_steps=1", "--set", "log_every=1",
        "--set", "architecture={n_stacks=2, n_blocks=1, n_features=8, n_stem_features=8}", "--init", "none"]   # a tiny random network


def run_cli(*args):
    cmd = [DEEPERFLY, *args] if DEEPERFLY else [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def dlc_project(folder: Path, parts=("lh_claw", "lh_femur_tibia"), n=3, blank=False) -> Path:
    "A DeepLabCut project of one camera: n 480x960 images with bright dots at the labels, and CollectedData_me.csv."
    d = folder / "labeled-data" / "v1"; d.mkdir(parents=True)
    rows = [["scorer"] + ["me"] * 2 * len(parts), ["bodyparts"] + [p for p in parts for _ in "xy"], ["coords"] + ["x", "y"] * len(parts)]
    for k in range(n):
        img = np.zeros((480, 960, 3), np.uint8)
        vals = []
        for j, _ in enumerate(parts):
            x, y = 500 + 30 * k + 60 * j, 250 + 10 * j
            cv2.circle(img, (x, y), 8, (255, 255, 255), -1)
            vals += ["", ""] if blank else [str(x), str(y)]
        cv2.imwrite(str(d / f"img{k}.png"), img)
        rows.append([f"labeled-data/v1/img{k}.png"] + vals)
    with open(d / "CollectedData_me.csv", "w", newline="") as f: csv.writer(f).writerows(rows)
    return d / "CollectedData_me.csv"


def test_train_end_to_end_on_a_deeplabcut_csv_then_resume(tmp_path, capsys):
    csv_path = dlc_project(tmp_path / "proj")
    run = tmp_path / "run"
    r = run_cli("train", str(csv_path), "--view", "lh", "-o", str(run), *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out frames: median" in r.stdout and "PCK@5" in r.stdout and str(run / "model.pt") in r.stdout, r.stdout
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "log.jsonl", "model.pt", "use_model.toml"]
    state, meta = load_checkpoint(run / "model.pt")
    assert meta["training"]["steps"] == 3 and meta["training"]["crop_hw"] == [64, 128]
    assert meta["training"]["architecture"]["n_features"] == 8 and meta["data"]["n_frames"] == 3
    assert meta["data"]["label_files"] == [str(csv_path)] and meta["metrics"]["n_points"] == 2   # one held-out frame, 2 points
    assert build_network(state).architecture["n_out_channels"] == 19
    # the same folder again (in-process, faster): refused without --resume (exit 2), a no-op with it (the run is complete)
    assert main(["train", str(csv_path), "--view", "lh", "-o", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err
    assert main(["train", str(csv_path), "--view", "lh", "-o", str(run), "--resume", *TINY]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    longer = [a if a != "3" else "6" for a in TINY]                 # more steps: not a resume; the message says how
    assert main(["train", str(csv_path), "--view", "lh", "-o", str(run), "--resume", *longer]) == 2
    assert f"(steps); to train its model further, start a new run from it: --init {run / 'model.pt'}" in capsys.readouterr().err


def test_train_on_a_deeperfly_label_file_in_process(tmp_path, capsys):
    "The .h5 path (embedded frames) through `main`, fine-tuning the bundled model."
    from deeperfly_nb.labels import read_dlc_csv
    h5 = read_dlc_csv(dlc_project(tmp_path / "p", parts=("rm_claw", "rm_femur_tibia")), view="rm").save(tmp_path / "labels.h5", embed=True)
    args = TINY[:-4]                                            # the bundled model's own architecture (the default init)
    assert main(["train", str(h5), "-o", str(tmp_path / "run"), *args]) == 0
    out = capsys.readouterr().out
    assert "held-out frames: median" in out
    _, meta = load_checkpoint(tmp_path / "run" / "model.pt")
    assert meta["init"].startswith("bundled:fly_synthetic") and meta["data"]["pathways"] == [pw.name for pw in PLAN.pathways]
    check_use_model(tmp_path / "run", tmp_path)


def check_use_model(run, tmp_path):
    "RUN_DIR/use_model.toml, pasted over the default config's model table, gives a config whose detector is the new model."
    import tomllib
    from deeperfly_nb.detector import load_models
    lines = (run / "use_model.toml").read_text()
    table = tomllib.loads(lines)["pose2d"]["models"]
    assert table == [{"name": "deepfly2d", "class": "hourglass", "weights": str((run / "model.pt").resolve()),
                      "input_size": [256, 512], "n_out_channels": 19, "mean": 0.22, "decoder": "subpixel"}], table
    default = (Path(__import__("deeperfly_nb").__file__).parent / "data" / "default_config.toml").read_text()
    start = default.index("[[pose2d.models]]\n"); end = default.index("\n\n", start)
    (tmp_path / "mine.toml").write_text(default[:start] + lines + default[end:])
    plan = Config.load(tmp_path / "mine.toml").detection_plan()
    assert Path(plan.models["deepfly2d"].weights) == (run / "model.pt").resolve()
    model = load_models(plan, device="cpu")["deepfly2d"]
    mine, _ = load_checkpoint(run / "model.pt")
    assert all(torch.equal(v, mine[k]) for k, v in model.net.state_dict().items())


def test_fine_tuning_is_the_default(project, tmp_path):
    "Issue 11: without --init, train starts from the bundled model, with the CPU-sized step count of the fine-tuning recipe."
    from deeperfly_nb.cli import make_parser
    from deeperfly_nb.training import TrainConfig, REAL_FINETUNE
    args = make_parser().parse_args(["train", str(project), "--view", "lh", "-o", str(tmp_path / "r")])
    assert args.init is None and args.steps is None           # the library's defaults decide
    cfg = TrainConfig()
    assert cfg.init == "bundled:fly_synthetic" and cfg.architecture is None
    assert cfg.steps == REAL_FINETUNE["steps"] == 600 and cfg.lr == REAL_FINETUNE["lr"]


def test_train_prints_the_config_lines_that_use_the_model(project, tmp_path, capsys):
    "Issue 11: `train` prints the [[pose2d.models]] lines for the new model (needs the cli.cmd_train change in the report)."
    run = tmp_path / "run"
    assert main(["train", str(project), "--view", "lh", "-o", str(run), *TINY[:-4]]) == 0
    out = capsys.readouterr().out
    assert "[[pose2d.models]]" in out and f'weights = "{(run / "model.pt").resolve()}"' in out and str(run / "use_model.toml") in out, out
    check_use_model(run, tmp_path)


def test_train_help_has_an_example(capsys):
    "Issue 11: `train --help` shows how to fine-tune on one's own labels (needs the cli._add_train_parser change in the report)."
    with pytest.raises(SystemExit): main(["train", "--help"])
    out = capsys.readouterr().out
    assert "example" in out.lower() and "deeperfly train" in out and "use_model.toml" in out, out


@pytest.fixture
def project(tmp_path):
    return dlc_project(tmp_path / "proj")


def bad(argv, capsys, *expect):
    "Run `deeperfly train` in-process: exit code 2, one error line naming what is wrong."
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("deeperfly train: error:"), err
    for e in expect: assert e in err, (e, err)
    return err


def test_missing_label_file(tmp_path, capsys):
    bad([str(tmp_path / "nope.csv"), "--view", "rh", "-o", str(tmp_path / "r")], capsys, "not found", "nope.csv")
    assert not (tmp_path / "r").exists()


def test_keypoint_names_not_in_the_skeleton(tmp_path, capsys):
    p = dlc_project(tmp_path / "a", parts=("lh_claw", "lh_tibia_tarsuss"))
    bad([str(p), "--view", "lh", "-o", str(tmp_path / "r")], capsys, "lh_tibia_tarsuss", "not points of skeleton", "did you mean 'lh_tibia_tarsus'")


def test_nan_only_labels(tmp_path, capsys):
    p = dlc_project(tmp_path / "a", blank=True)
    bad([str(p), "--view", "lh", "-o", str(tmp_path / "r")], capsys, "hold no keypoints")


def test_a_refused_training_leaves_no_empty_run_folder(tmp_path, capsys):
    p = dlc_project(tmp_path / "one", n=1)                          # one labelled frame: none can be held out
    bad([str(p), "--view", "lh", "-o", str(tmp_path / "r"), *TINY], capsys, "cannot hold out", "val_frac=0")
    assert not (tmp_path / "r").exists()


def test_labels_referencing_missing_images(project, tmp_path, capsys):
    (project.parent / "img1.png").unlink()
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), *TINY], capsys, "img1.png", "missing")
    assert not (tmp_path / "r" / "model.pt").exists()


def test_labels_referencing_missing_frames_of_a_deepfly3d_result(df3d_pkl, tmp_path, capsys):
    bad([str(df3d_pkl), "--frames", "10-20", "-o", str(tmp_path / "r")], capsys, "[15, 16, 17, 18, 19]", "outside")


def test_csv_without_its_view_and_unknown_view(project, tmp_path, capsys):
    bad([str(project), "-o", str(tmp_path / "r")], capsys, "say which view")
    bad([str(project), "--view", "top", "-o", str(tmp_path / "r"), *TINY], capsys, "'top'")


def test_bad_settings_fail_before_training(project, tmp_path, capsys):
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "--set", "epochs=3"], capsys, "unknown training setting", "epochs")
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "--set", "lr"], capsys, "expected key=value")
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), *TINY, "--set", "crop_hw=[96, 128]"], capsys, "multiples of")
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "--frames", "9-3"], capsys, "--frames")
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "-c", str(tmp_path / "none.toml")], capsys, "none.toml")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_resume_of_a_folder_without_a_run(project, tmp_path, capsys):
    bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "--resume", *TINY], capsys, "cannot resume")


# ---------------------------------------------------------------------------------------------- issue 10 item 8
def one_line(err):
    "The error is one line: no traceback, nothing else."
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("setting, expect", [
    ("lr=abc", ["lr", "a number", "'abc'"]),
    ("steps=2.5", ["steps", "an integer", "2.5"]),
    ("batch_size=true", ["batch_size", "an integer"]),
    ("crop_hw=abc", ["crop_hw", "[h, w]"]),
    ("crop_hw=[64]", ["crop_hw", "[h, w]"]),
    ("val_frac=1.5", ["val_frac", "[0, 1)"]),
    ("channels_last=3", ["channels_last", "true or false"]),
    ("init=3", ["init", "bundled:"]),
    ("augment=3", ["augment", "a table"]),
    ("augment.rotation_deg=abc", ["augment.rotation_deg", "a number", "'abc'"]),
    ("augment.scale=[1.2]", ["augment.scale", "[lo, hi]"]),
    ("stepz=3", ["'stepz'", "did you mean 'steps'"]),
    ("augment.rotation_dg=5", ["augment.rotation_dg", "did you mean 'augment.rotation_deg'"]),
    ("architecture={n_stack=2}", ["architecture.n_stack", "did you mean 'architecture.n_stacks'"]),
])
def test_bad_setting_values_end_with_one_line_naming_the_key(project, tmp_path, capsys, setting, expect):
    "Issue 10 item 8: `--set lr=abc` (and its kin) ends with one ConfigError line naming the key and what was expected."
    err = bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "--set", setting], capsys, *expect)
    one_line(err)
    assert not (tmp_path / "r").exists()


def test_architecture_with_a_checkpoint_init_is_refused(project, tmp_path, capsys):
    "The architecture comes from the init checkpoint when fine-tuning: asking for another one is an error, not a silent choice."
    err = bad([str(project), "--view", "lh", "-o", str(tmp_path / "r"), "--set", "architecture={n_stacks=1}"], capsys,
              "architecture", "--init none")
    one_line(err)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "no_resume_record", "bad_resume_record"])
def test_resume_from_a_corrupt_last_checkpoint(project, tmp_path, capsys, damage):
    "Issue 10 item 8: `train --resume` with a damaged last.pt ends with one line naming the file and what was expected."
    run = tmp_path / "run"
    if damage in ("garbage", "empty"):
        run.mkdir()
        (run / "last.pt").write_bytes(b"" if damage == "empty" else b"not a checkpoint at all \x00\x01" * 10)
    else:
        assert main(["train", str(project), "--view", "lh", "-o", str(run), "--init", "none", *TINY]) == 0
        capsys.readouterr()
        last = run / "last.pt"
        if damage == "truncated": last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        else:
            ck = torch.load(last, weights_only=True)
            if damage == "no_resume_record": del ck["resume"]
            else: ck["resume"] = {"step": "three"}
            torch.save(ck, last)
    err = bad([str(project), "--view", "lh", "-o", str(run), "--init", "none", "--resume", *TINY], capsys, "last.pt")
    one_line(err)
    assert "weights_only=False" not in err
    expect = {"garbage": "cannot read", "truncated": "cannot read", "empty": "cannot read",
              "no_resume_record": "no resume record", "bad_resume_record": "resume record"}[damage]
    assert expect in err, err


def test_train_on_crops_from_a_detector_model(tmp_path, capsys, caplog):
    "Issue 12: --detector-model crops every labelled frame around the detected animal and trains the pose model on the crops."
    import logging
    bundled = Path(__import__("deeperfly_nb").__file__).parent / "models" / "fly_synthetic.pt"
    csv_path = dlc_project(tmp_path / "proj")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="deeperfly"):
        assert main(["train", str(csv_path), "--view", "lh", "-o", str(run), "--detector-model", str(bundled), "--crop_ratio", "3", *TINY]) == 0
    assert "found no animal in any labelled image" in caplog.text      # a fly detector on dots: the labels' own boxes, said so in the log
    _, meta = load_checkpoint(run / "model.pt")
    crop = meta["data"]["cropzoom"] if "cropzoom" in meta["data"] else meta["cropzoom"]
    assert crop["detector_model"] == str(bundled) and "crop_ratio=3.0" in crop["crop_options"]
    assert main(["train", str(csv_path), "--view", "lh", "-o", str(tmp_path / "r2"), "--crop_ratio", "0.5", *TINY]) == 2
    assert "crop_ratio" in capsys.readouterr().err and not (tmp_path / "r2" / "model.pt").exists()


def test_train_with_unlabelled_recordings_logs_every_loss(tmp_path, capsys):
    "`--unlabelled` trains the losses without labels on a recording's frames too: every chosen loss is in the log, per step."
    import json
    from deeperfly_nb.synth_footage import synth_recording
    csv_path = dlc_project(tmp_path / "proj")
    rec = synth_recording(tmp_path / "rec", n_frames=4, seed=5)
    run = tmp_path / "semi"
    argv = ["train", str(csv_path), "--view", "lh", "-o", str(run), *TINY, "--unlabelled", str(rec),
            "--losses", "temporal,consistency", "--loss-weight", "temporal=0.5", "--unlabelled-share", "equal"]
    assert main(argv) == 0, capsys.readouterr().err
    import torch
    assert torch.load(run / "last.pt", weights_only=False)["deeperfly"]["semi"]["options"]["recording_share"] == "equal"
    steps = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"loss_temporal"' in l]
    assert len(steps) == 3 and all(np.isfinite(s["loss_temporal"]) and np.isfinite(s["loss_consistency"]) for s in steps)
    assert "loss_pca" not in steps[0]
    assert main(["train", str(csv_path), "--view", "lh", "-o", str(tmp_path / "x"), *TINY, "--unlabelled", str(tmp_path / "nowhere")]) == 2
    assert "--unlabelled recording(s) not found" in capsys.readouterr().err
    assert main(["train", str(csv_path), "--view", "lh", "-o", str(tmp_path / "y"), *TINY, "--unlabelled", str(rec), "--losses", "temporl"]) == 2
    assert "temporl" in capsys.readouterr().err


def test_uncalibrated_recordings_skip_the_losses_that_need_cameras(tmp_path, capsys):
    "`--uncalibrated` names --unlabelled recordings the rig does not fit: multiview skips them, temporal still uses them."
    import json, torch
    from deeperfly_nb.synth_footage import synth_recording
    csv_path = dlc_project(tmp_path / "proj")
    a, b = synth_recording(tmp_path / "a", n_frames=4, seed=5), synth_recording(tmp_path / "b", n_frames=4, seed=6)
    base = ["train", str(csv_path), "--view", "lh", *TINY, "--losses", "temporal,multiview", "--unlabelled-share", "equal"]
    assert main(base + ["-o", str(tmp_path / "x"), "--unlabelled", str(a), "--uncalibrated", str(tmp_path / "c")]) == 2
    assert "--uncalibrated" in (err := capsys.readouterr().err) and "not among the --unlabelled" in err
    assert main(base + ["-o", str(tmp_path / "y"), "--unlabelled", str(a), "--uncalibrated", str(a)]) == 2
    assert "at least one unlabelled recording" in capsys.readouterr().err      # no calibrated recording left for multiview
    run = tmp_path / "semi"
    assert main(base + ["-o", str(run), "--unlabelled", str(a), str(b), "--uncalibrated", str(b) + "/", "--steps", "8"]) == 0, capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=False)["deeperfly"]["semi"]["options"]["missing_cameras"] == "skip"
    steps = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"loss_temporal"' in l]
    assert len(steps) >= 4 and 0 < sum("loss_multiview" in s for s in steps) < len(steps)   # steps drawing b have no multiview term


def test_semi_set_reaches_the_options(tmp_path, capsys):
    "`--semi-set key=value` sets a SemiOptions field: two frames per step with equal shares put both recordings in every step."
    import json, torch
    from deeperfly_nb.synth_footage import synth_recording
    csv_path = dlc_project(tmp_path / "proj")
    a, b = synth_recording(tmp_path / "a", n_frames=4, seed=5), synth_recording(tmp_path / "b", n_frames=4, seed=6)
    base = ["train", str(csv_path), "--view", "lh", *TINY, "--losses", "temporal,multiview", "--unlabelled", str(a), str(b),
            "--uncalibrated", str(b), "--unlabelled-share", "equal"]
    assert main(base + ["-o", str(tmp_path / "x"), "--semi-set", "frames_per_stp=2"]) == 2
    assert "frames_per_stp" in (err := capsys.readouterr().err) and "frames_per_step" in err      # the unknown key, and the known ones
    assert main(base + ["-o", str(tmp_path / "y"), "--semi-set", "frames_per_step"]) == 2
    assert "--semi-set 'frames_per_step': expected key=value" in capsys.readouterr().err
    run = tmp_path / "semi"
    assert main(base + ["-o", str(run), "--semi-set", "frames_per_step=2", "--steps", "6"]) == 0, capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=False)["deeperfly"]["semi"]["options"]["frames_per_step"] == 2
    steps = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"loss_temporal"' in l]
    assert len(steps) >= 3 and all("loss_multiview" in s for s in steps)       # a (calibrated) drawn in every step
