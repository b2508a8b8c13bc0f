"""Training: batches (augmentation keeps keypoints on their content), targets and the masked loss, evaluation in raw pixels,
the split by frame, checkpoints in DeepFly2D's layout, resume = uninterrupted, early stopping, bad settings, and (with
the shared data) a short fine-tuning on real footage with DeepFly3D's 2D as labels."""
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, DF3D_PKL
from deeperfly_nb.config import Config
from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.detector import load_checkpoint, build_network, load_model
from deeperfly_nb.labels import LabelSet, ArrayFrames, pathway_samples, synthetic_samples, labels_from_df3d
from deeperfly_nb.plan import ModelSpec
from deeperfly_nb.skeleton import fly38
from deeperfly_nb.training import (Augment, TrainConfig, augment_sample, batch_indices, evaluate, heatmap_loss, heatmap_targets,
                                   make_batch, read_log, split_by_frame, train_detector, train_from_labels)

PLAN = Config.default().detection_plan()
TINY = dict(steps=6, batch_size=2, crop_hw=(64, 128), eval_every=3, checkpoint_every=2, log_every=2, val_frac=0.5, warmup_steps=2, init=None,
            architecture=dict(n_stacks=2, n_blocks=1, n_features=8, n_stem_features=8), num_threads=1)


pytestmark = pytest.mark.usefixtures("torch_one_thread")     # see conftest.py


@pytest.fixture(scope="module")
def two_frames():
    "Two synthetic frames (16 pathway samples), rendered once."
    return synthetic_samples([11, 12], progress=False, n_frames=1, crf=None)


def dot_image(xy, hw=(256, 512)):
    img = np.zeros((*hw, 1), np.uint8)
    for x, y in xy: cv2.circle(img, (int(round(x)), int(round(y))), 4, 255, -1)
    return img


# ---------------------------------------------------------------------------------------------- batches
def test_augmentation_keeps_keypoints_on_their_content():
    rng = np.random.default_rng(0)
    aug = Augment(rotation_deg=45, scale=(0.6, 1.5), translate_px=60, blur_prob=0, noise_std=(0, 0), flip_pairs=[[0, 2]])
    checked = 0
    for k in range(60):
        kp = np.stack([rng.uniform(40, 470, 3), rng.uniform(30, 225, 3)], -1)
        crop, out, _ = augment_sample(dot_image(kp), kp, rng, aug, (128, 192))
        for x, y in out:
            if 3 <= x < 189 and 3 <= y < 125:
                assert crop[int(round(y)), int(round(x)), 0] > 0.3, (k, x, y)
                checked += 1
    assert checked > 60


def test_mirror_swaps_the_paired_channels():
    kp = np.array([[200.5, 100.5], [255.5, 127.5], [310.5, 154.5]])
    aug = Augment(**{**Augment.none().to_dict(), "flip_pairs": [[0, 2]], "flip_prob": 1.0})
    crop, out, order = augment_sample(dot_image(kp), kp, np.random.default_rng(0), aug, (256, 512))
    np.testing.assert_allclose(out, [[511 - 310.5, 154.5], [511 - 255.5, 127.5], [511 - 200.5, 100.5]])
    np.testing.assert_array_equal(crop[..., 0], dot_image(kp)[:, ::-1, 0] / 255)
    np.testing.assert_array_equal(order, [2, 1, 0])
    _, never, _ = augment_sample(dot_image(kp), kp, np.random.default_rng(0), Augment.none(), (256, 512))
    np.testing.assert_allclose(never, kp)                       # flip_pairs None: no mirror, whatever the draw


def test_targets_peak_on_the_keypoint_and_mask_unlabeled():
    kp = np.array([[[37.5, 21.5], [np.nan, np.nan]]])          # centre of input pixels 36..39 x 20..23 -> cell (5, 9)
    t, m = heatmap_targets(kp, (64, 128), 1.5)
    assert np.unravel_index(t[0, 0].argmax(), t.shape[2:]) == (5, 9) and t[0, 1].max() == 0
    np.testing.assert_array_equal(m, [[1, 0]])


def test_loss_is_normalised_masked_and_summed_over_stacks():
    t, _ = heatmap_targets(np.array([[[40.0, 30.0], [90.0, 20.0]]]), (64, 128), 2.0)
    t = torch.from_numpy(t)
    mask = torch.tensor([[1.0, 0.0]])
    zero = torch.zeros_like(t)
    assert abs(float(heatmap_loss([zero], t, mask, 2.0)) - 1.0) < 0.02
    assert abs(float(heatmap_loss([zero, zero, zero], t, mask, 2.0)) - 3.0) < 0.06
    noisy = t.clone(); noisy[0, 1] += 7
    assert float(heatmap_loss([noisy], t, mask, 2.0)) == 0.0


def test_make_batch_shapes_and_mean(two_frames):
    x, t, m = make_batch(two_frames, [0, 5], np.random.default_rng(0), Augment.none(), (128, 256), 1.5, 0.22)
    assert x.shape == (2, 3, 128, 256) and t.shape == (2, 19, 32, 64) and m.shape == (2, 19)
    assert -0.23 <= float(x.min()) and float(x.max()) <= 0.79


def test_style_images_give_crops_the_tone_of_real_frames(two_frames):
    bright = np.full((3, 256, 512, 1), 160, np.uint8)                    # "real footage": a flat, brighter frame
    always = Augment(**{**Augment.none().to_dict(), "style_prob": 1.0, "style_mix": (1.0, 1.0), "style_window": (0.01, 0.01)})
    plain, _, _ = make_batch(two_frames, [0, 5], np.random.default_rng(0), always, (128, 256), 1.5, 0.0)
    styled, t, _ = make_batch(two_frames, [0, 5], np.random.default_rng(0), always, (128, 256), 1.5, 0.0, style=bright)
    assert float(plain.mean()) < 0.4 and abs(float(styled.mean()) - 160 / 255) < 0.02          # the footage's level ...
    hp = lambda x: x - torch.nn.functional.avg_pool2d(x, 9, 1, 4, count_include_pad=False)      # ... and the render's edges
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert float((hp(styled) - hp(plain))[inner].abs().mean()) < 0.2 * float(hp(plain)[inner].abs().mean())
    never = Augment(**{**always.to_dict(), "style_prob": 0.0})
    same, _, _ = make_batch(two_frames, [0, 5], np.random.default_rng(0), never, (128, 256), 1.5, 0.0, style=bright)
    assert torch.equal(same, plain)                                    # style_prob 0: style images change nothing
    with pytest.raises(InputError, match="style_images: expected"):
        train_detector(two_frames, Path("/nonexistent/never_made"), TINY, progress=False, style_images=bright[..., 0])


# ---------------------------------------------------------------------------------------------- evaluation
class Oracle(torch.nn.Module):
    "A 'network' that returns each sample's exact targets, in order."
    def __init__(self, samples, sigma=1.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1)); self.s, self.sigma, self.k = samples, sigma, 0
    def forward(self, x, n_stacks=None):
        n = len(x)
        t, _ = heatmap_targets(self.s.keypoints[self.k:self.k + n], self.s.input_size, self.sigma)
        self.k += n
        return [torch.from_numpy(t)]


def test_evaluation_recovers_labels_in_raw_pixels_through_mirrored_pathways():
    rng = np.random.default_rng(1)
    V, N = PLAN.n_views, PLAN.n_points
    p = np.stack([rng.uniform(30, 930, (V, 2, N)), rng.uniform(30, 450, (V, 2, N))], -1)
    s = pathway_samples(LabelSet(p, PLAN.view_names, fly38(), ArrayFrames({v: np.zeros((2, 480, 960), np.uint8) for v in PLAN.view_names})), PLAN)
    ev = evaluate(Oracle(s), s)
    summ = ev.summary()
    assert summ["n_points"] == np.isfinite(s.keypoints[..., 0]).sum()
    assert summ["median_px"] < 0.05 and summ["p90_px"] < 0.2, summ
    flip = [i for i, n in enumerate(s.pathway_names) if n.endswith("flip")]
    assert np.nanmax(ev.errors_px[np.isin(ev.pathway, flip)]) < 0.5


def test_split_by_frame_never_shares_a_frame(two_frames):
    for seed in range(5):
        tr, va = split_by_frame(two_frames, 0.5, seed)
        assert len(va) == 8 and not set(two_frames.frame[tr]) & set(two_frames.frame[va])
        assert sorted(np.concatenate([tr, va])) == list(range(len(two_frames)))
    with pytest.raises(InputError, match="cannot hold out"):
        split_by_frame(two_frames, 0.9)


def test_batch_order_is_a_function_of_seed_and_step():
    assert np.array_equal(batch_indices(50, 8, 3, 17), batch_indices(50, 8, 3, 17))
    epoch0 = np.concatenate([batch_indices(50, 8, 3, s) for s in range(6)])
    assert len(set(epoch0)) == 48


# ---------------------------------------------------------------------------------------------- the loop
def test_checkpoint_layout_is_deepfly2d(tmp_path, two_frames):
    """A run with DeepFly2D's 2-stack architecture saves exactly the published checkpoint's keys and shapes,
    and the exported model loads as a detector."""
    layout = SHARED_DATA / "df2d_layout" / "df2d_state_dict_keys.json"
    cfg = {**TINY, "steps": 1, "val_frac": 0.0, "architecture": dict(n_stacks=2, n_blocks=1, n_features=128, n_stem_features=64)}
    res = train_detector(two_frames, tmp_path / "run", cfg, progress=False)
    ck = torch.load(res.model_path, weights_only=True)
    assert {"state_dict", "epoch", "arch", "best_acc", "deeperfly"} <= set(ck)
    assert all(k.startswith("module.") for k in ck["state_dict"])
    meta = ck["deeperfly"]
    for k in ("skeleton", "channel_names", "input_size", "mean", "architecture", "training", "metrics", "data", "log"):
        assert k in meta, k
    assert meta["skeleton"] == "fly38" and meta["input_size"] == [256, 512] and meta["data"]["n_samples"] == 16
    if layout.exists():
        want = json.loads(layout.read_text())["sh2"]
        got = {k.removeprefix("module."): list(v.shape) for k, v in ck["state_dict"].items()}
        want = {k.removeprefix("module."): list(v) for k, v in want.items()}
        # DeepFly2D's file was made for 38 channels; ours for 19: only the score layers' channel counts differ
        assert set(got) == set(want)
        diff = {k for k in want if got[k] != want[k]}
        assert all(k.startswith(("score", "score_")) for k in diff), diff
    spec = ModelSpec("m", "hourglass", str(res.model_path), None, (256, 512), 19, (0.22,) * 3, {}, None)
    lm = load_model(spec, device="cpu")
    assert lm.net.architecture["n_features"] == 128 and lm.predict_heatmaps(lm.prepare(np.zeros((1, 480, 960, 3), np.uint8))).shape == (1, 19, 64, 128)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, two_frames):
    ref = train_detector(two_frames, tmp_path / "ref", TINY, progress=False)

    class Interrupt(Exception): pass
    for stop_at in (5, 3):                                       # between checkpoints; right after an evaluation
        def cb(step, loss):
            if step == stop_at: raise Interrupt
        run = tmp_path / f"cut{stop_at}"
        with pytest.raises(Interrupt):
            train_detector(two_frames, run, TINY, progress=False, callback=cb)
        assert torch.load(run / "last.pt", weights_only=True)["resume"]["step"] == (4 if stop_at == 5 else 3)
        res = train_detector(two_frames, run, TINY, progress=False, resume=True)
        a, _ = load_checkpoint(ref.model_path); b, _ = load_checkpoint(res.model_path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        la, _ = load_checkpoint(ref.out_dir / "last.pt"); lb, _ = load_checkpoint(run / "last.pt")
        assert all(torch.equal(la[k], lb[k]) for k in la)
        strip = lambda h: [{k: v for k, v in r.items() if k != "images_per_s"} for r in h]
        assert strip(res.history) == strip(ref.history) and strip(read_log(run)) == strip(read_log(ref.out_dir))
        assert res.metrics == ref.metrics and res.steps == ref.steps


def test_resume_refuses_other_settings_or_samples(tmp_path, two_frames):
    train_detector(two_frames, tmp_path / "r", {**TINY, "steps": 2}, progress=False)
    with pytest.raises(InputError, match="resume=True"):
        train_detector(two_frames, tmp_path / "r", {**TINY, "steps": 2}, progress=False)
    with pytest.raises(ConfigError, match="settings differ.*lr"):
        train_detector(two_frames, tmp_path / "r", {**TINY, "steps": 2, "lr": 1e-4}, progress=False, resume=True)
    other = dataclasses.replace(two_frames, images=two_frames.images.copy())
    other.images[:, 1, 1] += 1                                    # one other pixel per image: other samples
    with pytest.raises(InputError, match="samples differ"):
        train_detector(other, tmp_path / "r", {**TINY, "steps": 2}, progress=False, resume=True)
    with pytest.raises(InputError, match="does not exist"):
        train_detector(two_frames, tmp_path / "new", TINY, progress=False, resume=True)
    style = np.full((2, 256, 512, 1), 90, np.uint8)
    with pytest.raises(InputError, match=r"style images differ from the run's \(none then, 2 now\)"):   # other style images: other training data
        train_detector(two_frames, tmp_path / "r", {**TINY, "steps": 2}, progress=False, resume=True, style_images=style)
    with pytest.raises(ConfigError, match=r"the input mean \[0.5, 0.5, 0.5\] is not the run's"):   # the network learned another input
        train_detector(two_frames, tmp_path / "r", {**TINY, "steps": 2}, progress=False, resume=True, mean=0.5)


def test_resume_a_run_from_before_a_setting_existed(tmp_path, two_frames):
    run = tmp_path / "old"
    train_detector(two_frames, run, {**TINY, "steps": 2}, progress=False)
    ck = torch.load(run / "last.pt", weights_only=False)
    for k in ("style_prob", "style_window", "style_mix"): del ck["resume"]["config"]["augment"][k]   # as an older deeperfly wrote it
    torch.save(ck, run / "last.pt")
    res = train_detector(two_frames, run, {**TINY, "steps": 2}, progress=False, resume=True)           # its defaults: the same settings
    assert res.steps == 2
    with pytest.raises(ConfigError, match="settings differ.*augment"):
        train_detector(two_frames, run, {**TINY, "steps": 2, "augment": {"style_prob": 0.2}}, progress=False, resume=True)


def test_early_stopping(tmp_path, two_frames):
    res = train_detector(two_frames, tmp_path / "e", {**TINY, "steps": 20, "eval_every": 1, "patience": 2, "min_delta_px": 1e9}, progress=False)
    assert res.stopped_early and res.steps == 3
    assert [r["step"] for r in res.history if "val_median_px" in r] == [1, 2, 3]
    weights = lambda: torch.load(tmp_path / "e" / "model.pt", weights_only=False)["state_dict"]
    model = weights()
    again = train_detector(two_frames, tmp_path / "e", {**TINY, "steps": 20, "eval_every": 1, "patience": 2, "min_delta_px": 1e9},
                           progress=False, resume=True)           # a stopped run resumed: it stays stopped, trains no step more
    assert again.stopped_early and again.steps == 3
    assert all(torch.equal(model[k], w) for k, w in weights().items())


def test_bad_settings(tmp_path, two_frames):
    with pytest.raises(ConfigError, match="multiples of 64"):
        train_detector(two_frames, tmp_path / "a", {**TINY, "crop_hw": (96, 128)}, progress=False)
    with pytest.raises(ConfigError, match="larger than the model input"):
        train_detector(two_frames, tmp_path / "b", {**TINY, "crop_hw": (320, 512)}, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()       # refused before the run folder was made
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="steps: expected an integer >= 1, got 0"):
        TrainConfig(steps=0)


def test_train_from_a_deeplabcut_csv(tmp_path):
    "The CLI's path: a CSV of one camera -> the plan's pathway samples -> a model; weights from the bundled model."
    import csv
    d = tmp_path / "labeled-data" / "v1"; d.mkdir(parents=True)
    rows = [["scorer", "me", "me"], ["bodyparts", "lh_claw", "lh_claw"], ["coords", "x", "y"]]
    for k in range(3):
        img = np.zeros((480, 960, 3), np.uint8); cv2.circle(img, (600 + 20 * k, 300), 8, (255, 255, 255), -1)
        cv2.imwrite(str(d / f"img{k}.png"), img)
        rows.append([f"labeled-data/v1/img{k}.png", str(600 + 20 * k), "300"])
    with open(d / "CollectedData_me.csv", "w", newline="") as f: csv.writer(f).writerows(rows)
    res = train_from_labels([d / "CollectedData_me.csv"], tmp_path / "run", view="lh", progress=False,
                            **{**TINY, "steps": 2, "val_frac": 0.3, "eval_every": 2, "architecture": TINY["architecture"]})
    assert res.steps == 2 and res.metrics["n_points"] == 1
    _, meta = load_checkpoint(res.model_path)
    assert meta["data"]["pathways"] == PLAN_PATHWAYS and meta["data"]["label_files"][0].endswith("CollectedData_me.csv")


PLAN_PATHWAYS = [pw.name for pw in PLAN.pathways]


# ---------------------------------------------------------------------------------------------- real footage
def test_finetune_on_real_footage_with_deepfly3d_labels(tmp_path):
    """Issue 4, 'what it must show' 2, kept short: fine-tuning the bundled synthetic model for a few steps on real
    frames (DeepFly3D's own 2D as labels, both sides, the left cameras mirrored through the default plan's pathways;
    72 steps: after 24 this machine's CPU left one view worse, a trajectory too short to promise every view)
    lowers the median distance to DeepFly3D's 2D on held-out frames in every labeled view. The full run, frames 0-9
    for training and 10-14 held out, with its numbers, is `bench/finetune_real.py`."""
    if not DF3D_PKL.exists():
        pytest.skip(f"real DeepFly3D sample not found at {DF3D_PKL} (it lives in ../shared/data beside the repository)")
    from deeperfly_nb.training import finetune_on_df3d
    res, after, before = finetune_on_df3d(DF3D_PKL, tmp_path / "real", train_frames=range(0, 10, 2), val_frames=[11, 14],
                                          progress=False, steps=72, batch_size=4, crop_hw=(128, 256), lr=2e-3, warmup_steps=2,
                                          eval_every=72, checkpoint_every=72, log_every=4, num_threads=1)
    print(f"\nreal footage, frames 11 and 14, median distance to DeepFly3D's 2D per view (px): before "
          f"{ {k: round(v, 1) for k, v in before.items()} }, after {res.steps} steps { {k: round(v, 1) for k, v in after.items()} }")
    assert sorted(after) == sorted(before) == ["lf", "lh", "lm", "rf", "rh", "rm"]
    assert all(after[v] < before[v] for v in after), (before, after)
    assert np.median(list(after.values())) < 0.8 * np.median(list(before.values())), (before, after)
