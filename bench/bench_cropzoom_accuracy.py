"""Cropzoom vs full frame on free-arena synthetic recordings (issue 12, "What it must show" item 1).

A fly walks freely in a large arena, filmed from above (`synth_footage.render_arena`): in the 256x256 top view it
is ~35 px long. Two pose models with the same input size S x S (default 128 x 128), the same small hourglass
(random start), the same training settings and the same number of steps — except that each model's training
windows put the fly where inference will find it (`Augment.translate_px`: anywhere in the frame for the full-frame
model, near the centre for the crop model; with the fly always centred, a full-frame model misses it near the
frame's edges):

- **full frame**: the whole frame resized to S x S (the fly becomes ~18 px long);
- **cropzoom**: the full-frame model doubles as the detector; on held-out recordings its points give one box per
  frame (`cropzoom.boxes_from_points`, crop_ratio 2, smoothed over time), the crop is resized to S x S
  (`cropzoom.crop_frames`) and read by a pose model trained on crops of the training frames (boxes from the
  ground-truth 2D with crop_ratio 2, their size and place jittered so the model tolerates the detector's boxes);
  its points come back to the raw frame through `cropzoom.from_crop`.

Both are scored on held-out recordings (other seeds: other walks, looks and noise) against the exact 2D, in raw
pixels of each view, on the points the renderer calls visible (and, for information, on all labelled points):
median error and PCK@2/5/10 px. Also reported: cropzoom with fixed-size boxes (`crop_size` = 2 x the training
frames' median keypoint span) centred on the detector's points, and cropzoom with boxes from the ground truth (the
pose model alone, without the detector's box errors), each with the fraction of boxes that hold every true point. Results go to bench/results/cropzoom_accuracy.json.

    OMP_NUM_THREADS=1 python bench/bench_cropzoom_accuracy.py            # ~15 min on a busy 2-core machine
    OMP_NUM_THREADS=1 python bench/bench_cropzoom_accuracy.py --quick    # a 2-minute smoke run (not written to results/)
"""
from __future__ import annotations
import argparse, json, os, sys, tempfile, time
from dataclasses import replace
from pathlib import Path
import numpy as np
import torch

from deeperfly_nb import synth
from deeperfly_nb.core import atomic_path
from deeperfly_nb.cropzoom import CropBoxes, CropOptions, boxes_from_points, crop_frames, from_crop, to_crop
from deeperfly_nb.labels import SampleSet, resize_to_input
from deeperfly_nb.synth_footage import render_arena
from deeperfly_nb.training import Augment, TrainConfig, Trainer, evaluate, torch_threads

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def say(*a):
    print(f"[{time.perf_counter() - T0:6.0f} s]", *a, flush=True)


def render_set(seeds, n_frames:int, views:list) -> list:
    "One free-arena recording per seed, filmed by the views asked for (of `synth.arena_rig()`)."
    rig = synth.arena_rig().subset(views)
    return [render_arena(n_frames=n_frames, seed=int(s), cameras=rig, n_workers=1) for s in seeds]


def make_samples(images, pts_raw, visible, src_hw, input_hw, keys, names) -> SampleSet:
    "A SampleSet of one pathway ('arena'): (S, h, w) uint8 images of size src_hw, resized to input_hw; keypoints in raw px."
    H, W = input_hw
    img = resize_to_input(np.repeat(images[..., None], 3, -1), input_hw)[..., :1]
    sh, sw = src_hw
    kp = np.stack([(pts_raw[..., 0] + 0.5) * W / sw - 0.5, (pts_raw[..., 1] + 0.5) * H / sh - 0.5], -1)
    S = len(images)
    return SampleSet(img, kp.astype(np.float32), pts_raw.astype(float), visible | ~np.isfinite(pts_raw[..., 0]),
                     np.tile(np.array(src_hw, np.int64), (S, 1)), np.zeros(S, int), np.arange(S), ["arena"], [[]], list(keys),
                     list(names), (H, W), {"mean": [0.22] * 3, "skeleton": "fly38"})


def full_frame_samples(recs, input_hw) -> SampleSet:
    "Every (recording, view, frame) as a whole frame resized to the model input."
    im, pts, vis, keys = [], [], [], []
    for r, rec in enumerate(recs):
        truth = rec.truth_pts2d()
        for v in range(len(rec.cameras)):
            im.append(rec.frames[v]); pts.append(truth[v]); vis.append(rec.visible[v])
            keys += [f"rec{r}/{rec.cameras.names[v]}/{t}" for t in range(rec.frames.shape[1])]
    H, W = recs[0].frames.shape[2:]
    return make_samples(np.concatenate(im), np.concatenate(pts), np.concatenate(vis), (H, W), input_hw, keys,
                        recs[0].skeleton.point_names)


def jitter_boxes(boxes:CropBoxes, rng, scale_range=(0.8, 1.25), shift_frac:float=0.1) -> CropBoxes:
    "The boxes scaled (log-uniform, about their centres) and shifted by up to shift_frac of their side, at random."
    s = np.exp(rng.uniform(*np.log(scale_range), boxes.hw_px.shape[:2]))[..., None]
    hw = boxes.hw_px * s
    centre = boxes.corner_px - 0.5 + boxes.hw_px[..., ::-1] / 2 + rng.uniform(-shift_frac, shift_frac, boxes.corner_px.shape) * boxes.hw_px[..., ::-1]
    return replace(boxes, corner_px=centre - hw[..., ::-1] / 2 + 0.5, hw_px=hw)


def crops_of(recs, boxes_per_rec:list, pts_per_rec:list, input_hw) -> tuple:
    "(SampleSet of the crops, truth in raw px (S, N, 2), visible (S, N), view index (S,), boxes): crops at the model input size."
    im, kp, raw, vis, vidx, keys = [], [], [], [], [], []
    for r, (rec, boxes, pts) in enumerate(zip(recs, boxes_per_rec, pts_per_rec)):
        T = rec.frames.shape[1]
        crop_pts = to_crop(pts, boxes)                                                # (V, T, N, 2)
        for v in range(len(rec.cameras)):
            im.append(crop_frames(rec.frames[v], boxes, v, np.arange(T))); kp.append(crop_pts[v])
            raw.append(rec.truth_pts2d()[v]); vis.append(rec.visible[v]); vidx.append(np.full(T, v))
            keys += [f"rec{r}/{rec.cameras.names[v]}/{t}" for t in range(T)]
    s = make_samples(np.concatenate(im), np.concatenate(kp), np.concatenate(vis), input_hw, input_hw, keys,
                     recs[0].skeleton.point_names)
    return s, np.concatenate(raw), np.concatenate(vis), np.concatenate(vidx)


def train(samples:SampleSet, steps:int, arch:dict, batch_size:int, translate_px:float, label:str) -> torch.nn.Module:
    "A random-start hourglass trained on all the samples (no held-out split: the test recordings are the held-out set)."
    cfg = TrainConfig(steps=steps, batch_size=batch_size, crop_hw=tuple(samples.input_size), init=None, architecture=arch,
                      val_frac=0.0, eval_every=10 ** 9, checkpoint_every=10 ** 9, log_every=10 ** 9, num_threads=1, seed=0,
                      augment=Augment(translate_px=float(translate_px)))
    with tempfile.TemporaryDirectory() as d, torch_threads(1):
        t = Trainer(samples, cfg, Path(d), samples.meta["mean"], {"bench": "cropzoom_accuracy"})
        t.net = t.net.to(memory_format=torch.channels_last)
        losses, t1 = [], time.perf_counter()
        while t.state.step < steps:
            losses.append(t.train_step())
            if t.state.step % max(1, steps // 10) == 0 or t.state.step == steps:
                say(f"  {label}: step {t.state.step}/{steps}, loss {np.mean(losses[-20:]):.3f}, "
                    f"{(time.perf_counter() - t1) / t.state.step:.2f} s/step")
    return t.net


def predict(net, samples:SampleSet) -> tuple:
    "(points (S, N, 2) in the samples' source pixels, confidences (S, N)), decoded as at inference."
    with torch_threads(1):
        ev = evaluate(net, samples, mean=samples.meta["mean"], batch_size=16)
    return ev.pred_px, ev.conf


def score(pred, truth, visible, view_idx, view_names) -> dict:
    "Per view: median error, PCK@2/5/10 px on the visible points, and median / PCK@5 on all labelled points."
    err = np.linalg.norm(pred - truth, axis=-1)                                       # NaN where unlabelled
    out = {}
    for v, name in enumerate(view_names):
        e_all = err[view_idx == v]; lab = np.isfinite(e_all); e_vis = e_all[lab & visible[view_idx == v]]
        out[name] = {"n_visible_points": int(e_vis.size), "median_px": float(np.median(e_vis)),
                     **{f"pck{k}": float((e_vis <= k).mean()) for k in (2, 5, 10)},
                     "all_points_median_px": float(np.median(e_all[lab])), "all_points_pck5": float((e_all[lab] <= 5).mean())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700, help="optimizer steps of each model")
    ap.add_argument("--input", type=int, default=128, help="model input size S (S x S)")
    ap.add_argument("--train-recordings", type=int, default=16)
    ap.add_argument("--test-recordings", type=int, default=4)
    ap.add_argument("--frames", type=int, default=48, help="frames per recording")
    ap.add_argument("--views", default="top", help="comma-separated views of synth.arena_rig() (top, ring0, ring1, ring2)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few recordings and steps, results not written")
    ap.add_argument("--save-models", default=None, help="a folder to keep the two trained networks' state dicts in")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cropzoom_accuracy.json"))
    a = ap.parse_args(argv)
    if a.quick: a.steps, a.train_recordings, a.test_recordings, a.frames = 40, 3, 1, 16
    views, S = a.views.split(","), (a.input, a.input)
    arch = dict(n_stacks=1, n_blocks=1, n_features=32, n_stem_features=16)
    crop_opts = CropOptions(crop_ratio=2.0, smooth_frames=5, min_confidence=0.0 if a.quick else 0.2)   # a 40-step detector is unsure
    train_seeds = list(range(100, 100 + a.train_recordings))
    test_seeds = list(range(9100, 9100 + a.test_recordings))
    say(f"rendering {a.train_recordings} training and {a.test_recordings} test recordings x {a.frames} frames, views {views}")
    train_recs, test_recs = render_set(train_seeds, a.frames, views), render_set(test_seeds, a.frames, views)
    H, W = train_recs[0].frames.shape[2:]
    tp_train = np.concatenate([r.truth_pts2d() for r in train_recs], 1)           # (V, sum T, N, 2)
    with np.errstate(invalid="ignore"):
        train_span = np.nanmedian(np.nanmax(np.nanmax(tp_train, 2) - np.nanmin(tp_train, 2), -1))
    say(f"frames {H}x{W}; the fly spans ~{train_span:.0f} px (median over the training frames); model input {S}")

    full_train = full_frame_samples(train_recs, S)
    say(f"full-frame model: {len(full_train)} samples, {a.steps} steps")
    t_full = time.perf_counter(); net_full = train(full_train, a.steps, arch, 8, S[0] / 2, "full frame"); t_full = time.perf_counter() - t_full

    rng = np.random.default_rng(0)
    gt_boxes = []
    for rec in train_recs:
        tp = rec.truth_pts2d()
        b = boxes_from_points(tp, np.isfinite(tp[..., 0]).astype(float), (H, W), S, crop_opts)
        gt_boxes.append(jitter_boxes(b, rng))
    crop_train, *_ = crops_of(train_recs, gt_boxes, [r.truth_pts2d() for r in train_recs], S)
    say(f"cropzoom pose model: {len(crop_train)} crops (ground-truth boxes, crop_ratio 2, jittered), {a.steps} steps")
    t_crop = time.perf_counter(); net_crop = train(crop_train, a.steps, arch, 8, S[0] / 8, "cropzoom pose"); t_crop = time.perf_counter() - t_crop

    say("evaluating on the held-out recordings")
    full_test = full_frame_samples(test_recs, S)
    det_pts, det_conf = predict(net_full, full_test)                            # (S, N, 2) raw px: the full-frame result
    vidx = np.concatenate([np.repeat(np.arange(len(views)), r.frames.shape[1]) for r in test_recs])
    truth, vis = full_test.source_keypoints, full_test.visible & np.isfinite(full_test.source_keypoints[..., 0])
    res_full = score(det_pts, truth, vis, vidx, views)

    fixed = CropOptions(crop_ratio=None, crop_size=2.0 * float(train_span), smooth_frames=crop_opts.smooth_frames,
                        min_confidence=crop_opts.min_confidence)
    boxes = {"cropzoom": [], "cropzoom_fixed_size": [], "cropzoom_gt_boxes": []}
    k = 0
    for rec in test_recs:                                                       # the detector's points, per recording and view
        V, T = len(rec.cameras), rec.frames.shape[1]
        p, c = det_pts[k:k + V * T].reshape(V, T, -1, 2), det_conf[k:k + V * T].reshape(V, T, -1); k += V * T
        boxes["cropzoom"].append(boxes_from_points(p, c, (H, W), S, crop_opts))
        boxes["cropzoom_fixed_size"].append(boxes_from_points(p, c, (H, W), S, fixed))
        tp = rec.truth_pts2d()
        boxes["cropzoom_gt_boxes"].append(boxes_from_points(tp, np.isfinite(tp[..., 0]).astype(float), (H, W), S, crop_opts))
    results = {}
    for label, bx in boxes.items():
        cs, raw, cvis, cv = crops_of(test_recs, bx, [r.truth_pts2d() for r in test_recs], S)
        pc, _ = predict(net_crop, cs)
        back, k = [], 0
        for rec, b in zip(test_recs, bx):                                       # crop px -> raw px, exactly
            V, T = len(rec.cameras), rec.frames.shape[1]
            back.append(from_crop(pc[k:k + V * T].reshape(V, T, -1, 2), b).reshape(V * T, -1, 2)); k += V * T
        results[label] = score(np.concatenate(back), raw, cvis & np.isfinite(raw[..., 0]), cv, views)
        results[label]["boxes_contain_all_points"] = float(np.concatenate([_contains(b, r.truth_pts2d()) for r, b in zip(test_recs, bx)]).mean())
    if a.save_models:
        Path(a.save_models).mkdir(parents=True, exist_ok=True)
        torch.save(net_full.state_dict(), Path(a.save_models) / "full_frame.pt"); torch.save(net_crop.state_dict(), Path(a.save_models) / "cropzoom_pose.pt")

    ratio = {v: {"median_full_over_cropzoom": res_full[v]["median_px"] / results["cropzoom"][v]["median_px"],
                 "median_full_over_cropzoom_fixed_size": res_full[v]["median_px"] / results["cropzoom_fixed_size"][v]["median_px"],
                 "pck5_full": res_full[v]["pck5"], "pck5_cropzoom": results["cropzoom"][v]["pck5"],
                 "pck5_cropzoom_fixed_size": results["cropzoom_fixed_size"][v]["pck5"]} for v in views}
    out = {"what": "median 2D error (raw px) and PCK of a full-frame pose model vs cropzoom (detector = the full-frame model, "
                   "pose model on crops) on held-out free-arena synthetic recordings; visible points",
           "command": "OMP_NUM_THREADS=1 python bench/bench_cropzoom_accuracy.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
           "settings": {"views": views, "frame_hw": [int(H), int(W)], "fly_span_px": float(train_span), "model_input": list(S),
                        "architecture": arch, "steps_each": a.steps, "batch_size": 8, "train_recordings": train_seeds,
                        "test_recordings": test_seeds, "frames_per_recording": a.frames, "crop_options": crop_opts.__dict__,
                        "fixed_size_crop_options": fixed.__dict__,
                        "train_box_jitter": {"scale": [0.8, 1.25], "shift_frac": 0.1}, "augment": {"full_frame": f"training.Augment(translate_px={S[0] / 2:g})", "cropzoom_pose": f"training.Augment(translate_px={S[0] / 8:g})",
                                    "why": "each model's training windows place the fly where inference will: anywhere in the frame / near the crop's centre"},
                        "torch_threads": 1},
           "full_frame": res_full, **results, "ratio": ratio,
           "train_seconds": {"full_frame": round(t_full, 1), "cropzoom_pose": round(t_crop, 1)},
           "total_seconds": round(time.perf_counter() - T0, 1)}
    for v in views:
        say(f"{v}: full frame median {res_full[v]['median_px']:.2f} px, PCK@5 {res_full[v]['pck5']:.2f} | cropzoom median "
            f"{results['cropzoom'][v]['median_px']:.2f} px, PCK@5 {results['cropzoom'][v]['pck5']:.2f} | ratio "
            f"{ratio[v]['median_full_over_cropzoom']:.2f}x | cropzoom with true boxes {results['cropzoom_gt_boxes'][v]['median_px']:.2f} px")
        say(f"{v}: cropzoom with fixed-size boxes (crop_size {fixed.crop_size:.0f} px) median "
            f"{results['cropzoom_fixed_size'][v]['median_px']:.2f} px, PCK@5 {results['cropzoom_fixed_size'][v]['pck5']:.2f} | ratio "
            f"{ratio[v]['median_full_over_cropzoom_fixed_size']:.2f}x")
    for label in boxes:
        say(f"{label}: boxes contain all true points in {results[label]['boxes_contain_all_points']:.1%} of the (view, frame)s")
    if not a.quick:
        path = Path(a.out); path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp: tmp.write_text(json.dumps(out, indent=1) + "\n")
        say(f"wrote {path}")
    return out


def _contains(boxes:CropBoxes, pts) -> np.ndarray:
    "(V*T,) bool: every in-frame true point of the (view, frame) lies inside its box."
    c = to_crop(pts, boxes)
    H_in, W_in = boxes.out_hw
    inside = (c[..., 0] >= -0.5) & (c[..., 0] <= W_in - 0.5) & (c[..., 1] >= -0.5) & (c[..., 1] <= H_in - 0.5)
    return (inside | ~np.isfinite(c[..., 0])).all(-1).reshape(-1)


if __name__ == "__main__":
    main()
