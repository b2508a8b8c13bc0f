"""Semi-supervised detector training and label-free diagnostics (issue 15), on CPU with small renders.

    OMP_NUM_THREADS=1 python bench/bench_semisupervised.py domain-shift [--steps 300] [--runs sup,all,...]
    OMP_NUM_THREADS=1 python bench/bench_semisupervised.py diagnostics
    OMP_NUM_THREADS=1 python bench/bench_semisupervised.py cost
    OMP_NUM_THREADS=1 python bench/bench_semisupervised.py real [--steps 100] [--zero-steps 60] [--runs sup,semi,zero]

domain-shift ('what it must show' 1): labels from 6 synthetic recordings x 8 frames rendered with look A (the
default `Look()`), unlabelled frames from 4 recordings x 32 frames with look B (another light, gain, gamma, noise,
blur and materials), test frames from 2 more look-B recordings x 16 frames (seeds never used for training). Every
run trains the same random tiny hourglass (1 stack, 32 features, input 64 x 128, renders at 1/8 of the rig's
960 x 480) with the same labelled set, the same number of steps and the same seed; `sup` is supervised only, `all`
adds temporal, multiview, pca, bones and consistency, `zero` forwards the unlabelled frames with every weight 0 (the
BatchNorm statistics see them, no loss does), one run per loss alone, and `all-<loss>` leaves one loss out. The losses' default epsilons and weights are for
full-resolution footage, so pixel epsilons are multiplied and pixel weights divided by the render scale (consistency:
by the model-input scale, 64/256); nothing is tuned on the test frames (no setting was chosen by looking at them).
The test error is the median distance of the exported weights' detections (decoded as at inference) to the exact
2D, in raw render pixels, over visible points; the model evaluated is the last weights (no held-out selection).

diagnostics ('what it must show' 4): a synthetic recording's exact 2D with 0.7 px noise and confidences from the
visibility, and detector failures injected into 10% of the frames (one view's point moved 6-20 px at 1/4
resolution, or a leg joint swapped with the neighbouring leg's in one view); the share of failure frames among the
top 10% of frames by the diagnostics' score. Also the same on the tiny `all` model's own detections of the test
recordings: the share of the 10% frames with the largest true error among the top 10% by score (recorded with each
domain-shift run as diagnostics_on_test).

cost ('what it must show' 5): images per second of a supervised step (batch 8) and of an unsupervised-only step on
the same number of images (one time point: 2 frames x 8 pathways = 16 images, plus their 8 augmented copies for
consistency; and without consistency), and peak traced memory while drawing batches from a 20- and a 200-frame
image-folder recording.

real ('what it must show' 2 and 3, real footage, CPU): the bundled model (`bundled:fly_synthetic`) fine-tuned on the
real DeepFly3D sample (`../shared/data/deepfly3d_sample`, 15 frames x 7 cameras) with DeepFly3D's own 2D as labels
for frames 0-4 only (`labels.labels_from_df3d`, as bench/finetune_real.py, through `training.REAL_FINETUNE`'s settings
with fewer steps). Frames 10-14 are held out: they are never labelled nor unlabelled training frames. Arms, same seed,
same steps, same labelled batches: `sup` (labels alone), `semi` (labels, and after a supervised warm-up of --semi-start
steps, chosen beforehand because the bundled model starts ~120 px off, temporal, multiview and bones on unlabelled
frames 0-9 of the sample, served from a folder of links to its camera_{c}_img_{t}.jpg for t < 10, and the 64 frames of
`../shared/data/deeperfly_example`), `zero` (no labels at all: supervised weight 0, temporal + multiview only, on the
same unlabelled frames; frames 0-4's labels are never read). The multiview loss uses DeepFly3D's calibration of the
sample for both recordings (the config's nominal rig reprojects DeepFly3D's own 2D with a median of ~11 px against
~2.6 px through DeepFly3D's cameras: too far off for a 5 px epsilon; the example recording has no calibration of its
own, and it is the same rig and image size). Consistency is left out (it costs 8 more 256 x 512 forward/backward
passes a step). Reported per view: the median distance of the last weights' held-out detections (decoded as at
inference) to DeepFly3D's 2D, before and after; and the 3D bone-length coefficient of variation (median over bones)
after bundle adjustment (`pipeline.run_from_points2d`, starting from DeepFly3D's calibration) of the model's
detections of all 15 frames, beside the same measure of DeepFly3D's own 2D.

The real arms' variants (flags): --unlabelled sample|example|both; --share length|equal (SemiOptions.recording_share);
--frames-per-step N (time points a step; 2 with --share equal puts both recordings in every step); --example-cameras
df3d|ba|none (the example's rig: DeepFly3D's calibration of the sample, that bundle-adjusted on the example, or none,
when the example gets only the losses without cameras); --outlier-px; --bn-frozen; --semi-losses. Measured 2026-12-03,
seeds 0 / 1 / 2: labels alone 5.66 / 5.59 / 5.56 px; `--share equal --frames-per-step 2 --example-cameras none`
5.33 / 5.44 / 5.59 px.

Writes bench/results/semisupervised_*.json (merged per run, so an interrupted sweep keeps its finished runs).
"""
from __future__ import annotations
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCALE = 0.125                     # render scale: 120 x 60 raw frames
INPUT_HW = (64, 128)
LOOK_B = dict(light_azimuth_deg=-120.0, light_elevation_deg=20.0, key=0.6, headlight=0.25, ambient=0.1, body_albedo=0.8,
              texture=0.4, stripe_darkness=0.25, ball_albedo=0.45, ball_texture=0.3, holder_brightness=0.7, gain=1.35,
              gamma=1.5, noise_std=6.0, blur_px=2.4)
LAB_SEEDS, UNL_SEEDS, TEST_SEEDS = range(5100, 5106), range(5200, 5204), range(5300, 5302)
ARCH = dict(n_stacks=1, n_blocks=1, n_features=32, n_stem_features=16)
FIVE = ("temporal", "multiview", "pca", "bones", "consistency")


def _setup():
    import numpy as np, torch
    torch.set_num_threads(1)
    from deeperfly_nb.config import Config
    from deeperfly_nb.semisupervised import plan_with_input_size
    return np, torch, plan_with_input_size(Config.default().detection_plan(), INPUT_HW)


def _renders(seeds, n, look):
    from deeperfly_nb.synth_footage import render_recording
    return [render_recording(n, seed=s, scale=SCALE, look=look, n_workers=1) for s in seeds]


def _merge(path: Path, key: str, value):
    "Set d[key] = value in the JSON at path (locked: arms may run in parallel processes)."
    import fcntl
    from deeperfly_nb.core import atomic_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_locked(path, key, value, atomic_path)


def _merge_locked(path: Path, key: str, value, atomic_path):
    d = json.loads(path.read_text()) if path.exists() else {}
    d[key] = value
    d["machine"] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg": os.getloadavg()}
    with atomic_path(path) as tmp: tmp.write_text(json.dumps(d, indent=1))


def _options(name: str):
    "The SemiOptions of a run, defaults rescaled to the render resolution."
    from deeperfly_nb.semisupervised import SemiOptions, LOSS_DEFAULTS
    losses = {"sup": (), "all": FIVE, "zero": FIVE, "all+pcamv": FIVE + ("pca_multiview",)}.get(name, (name,))
    if name.startswith("all-"): losses = tuple(k for k in FIVE if k != name[4:])            # leave one out
    scale = {k: (INPUT_HW[0] / 256 if k == "consistency" else SCALE) for k in LOSS_DEFAULTS if k != "bones"}
    eps = {k: LOSS_DEFAULTS[k][1] * s for k, s in scale.items()}
    w = {k: (0.0 if name == "zero" else LOSS_DEFAULTS[k][0] / s) for k, s in scale.items()}
    if name == "zero": w["bones"] = 0.0
    return SemiOptions(losses=losses, weights={k: v for k, v in w.items() if k in losses},
                       epsilons={k: v for k, v in eps.items() if k in losses}, start_step=100)


def domain_shift(args):
    np, torch, plan = _setup()
    from deeperfly_nb.synth_footage import Look
    from deeperfly_nb.labels import pathway_samples, labels_from_render, concat_samples
    from deeperfly_nb.training import evaluate
    from deeperfly_nb.detector import load_checkpoint, build_network
    from deeperfly_nb.semisupervised import UnlabelledFrames, semi_priors, semi_train_detector
    t0 = time.perf_counter()
    lab = _renders(LAB_SEEDS, 8, Look())
    unl = _renders(UNL_SEEDS, 32, Look(**LOOK_B))
    test = _renders(TEST_SEEDS, 16, Look(**LOOK_B))
    S = concat_samples([pathway_samples(labels_from_render(r), plan, name=f"lab{i}") for i, r in enumerate(lab)])
    T = concat_samples([pathway_samples(labels_from_render(r), plan, name=f"test{i}") for i, r in enumerate(test)])
    frames = UnlabelledFrames([{v: r.frames[i] for i, v in enumerate(r.cameras.names)} for r in unl], plan, cameras=[r.cameras for r in unl])
    print(f"rendered in {time.perf_counter() - t0:.0f} s: {S}\n test {T}", flush=True)
    cfg = dict(steps=args.steps, batch_size=8, crop_hw=INPUT_HW, init=None, architecture=ARCH, val_frac=0.0, eval_every=10 ** 6,
               checkpoint_every=100, log_every=25, num_threads=1, warmup_steps=30, lr=2e-3, seed=args.seed)
    out = RESULTS / "semisupervised_domain_shift.json"
    bones3d = np.concatenate([r.pts3d for r in lab])             # the labelled recordings' 3D: the bone prior
    for name in args.runs.split(","):
        o = _options(name)
        pri = semi_priors(S, plan, o, frames, bones=bones3d) if o.losses else {}
        with tempfile.TemporaryDirectory() as d:
            t1 = time.perf_counter()
            res = semi_train_detector(S, frames, Path(d) / "run", cfg, o, pri, progress=False)
            secs = time.perf_counter() - t1
            net = build_network(load_checkpoint(res.model_path)[0])
            ev_test, ev_lab = evaluate(net, T).summary(), evaluate(net, S).summary()
            ev_t = evaluate(net, T)
        row = {"diagnostics_on_test": _detector_diagnostics(np, ev_t, T, plan, test)}
        row.update({"options": o.to_dict(), "test_median_px": ev_test["median_px"], "test_mean_px": ev_test["mean_px"],
               "test_p90_px": ev_test["p90_px"], "test_pck2": ev_test["pck2"], "train_median_px": ev_lab["median_px"],
               "seconds": round(secs, 1), "last_log": res.history[-1]})
        print(f"{name:<14} test median {row['test_median_px']:.2f} px  p90 {row['test_p90_px']:.2f}  train {row['train_median_px']:.2f}  ({secs:.0f} s)", flush=True)
        _merge(out, name + (f"@seed{args.seed}" if args.seed else ""), row)
    _merge(out, "setup", {"command": " ".join(["python", "bench/bench_semisupervised.py"] + sys.argv[1:]), "train": cfg, "look_b": LOOK_B,
                          "scale": SCALE, "labelled": str(S), "test": str(T), "unlabelled_frames": frames.lengths})


def _detector_diagnostics(np, ev, T, plan, renders):
    "Diagnostics of a trained model's own detections of the test recordings against their true error per frame."
    from scipy.stats import spearmanr
    from deeperfly_nb.semisupervised import diagnose, model_pathways
    pws, V, N = model_pathways(plan), plan.n_views, plan.n_points
    F = len(T.frame_keys)
    pts, cf, err = np.full((V, F, N, 2), np.nan), np.full((V, F, N), np.nan), np.full((V, F, N), np.nan)
    for s in range(len(T)):
        for c, v, p in pws[T.pathway[s]].mapping:
            pts[v, T.frame[s], p], cf[v, T.frame[s], p], err[v, T.frame[s], p] = ev.pred_px[s, c], ev.conf[s, c], ev.errors_px[s, c]
    score, worst = [], []
    for i, r in enumerate(renders):
        idx = [j for j, k in enumerate(T.frame_keys) if k.startswith(f"test{i}/")]
        d = diagnose(pts[:, idx], np.nan_to_num(cf[:, idx]), r.cameras)
        score += list(d.score); worst += list(np.nanmax(err[:, idx], axis=(0, 2)))
    score, worst = np.array(score), np.array(worst)
    k = int(np.ceil(0.1 * len(score)))
    top_s, top_e = set(np.argsort(-score)[:k]), set(np.argsort(-worst)[:k])
    return {"frames": len(score), "top10pct_overlap": len(top_s & top_e) / k, "spearman_score_vs_worst_error": float(spearmanr(score, worst)[0]),
            "worst_error_px_of_top_scored": float(np.mean(worst[list(top_s)])), "worst_error_px_median": float(np.median(worst))}


def _inject(np, pts, rng, frac=0.1):
    "Detector failures in `frac` of the frames: (pts with failures, failed frame indices)."
    V, T, N, _ = pts.shape
    bad = rng.choice(T, max(1, int(round(frac * T))), replace=False)
    out = pts.copy()
    for t in bad:
        v = rng.integers(V)
        n = rng.choice(np.flatnonzero(np.isfinite(pts[v, t, :, 0])))       # a point the view reports
        if rng.uniform() < 0.5 or n % 19 >= 15:                        # a jump
            a = rng.uniform(0, 2 * np.pi)
            out[v, t, n] += rng.uniform(6, 20) * np.array([np.cos(a), np.sin(a)])
        else:                                                         # a leg swap: the same joint of the next leg (same side)
            m = (n // 19) * 19 + ((n % 19) + 5) % 15
            out[v, t, [n, m]] = out[v, t, [m, n]]
    return out, np.sort(bad)


def diagnostics(args):
    np, torch, plan = _setup()
    from deeperfly_nb.synth_footage import render_recording
    from deeperfly_nb.semisupervised import diagnose
    out, rows = RESULTS / "semisupervised_diagnostics.json", []
    for seed in range(6):
        gt = render_recording(100, seed=5400 + seed, scale=0.25, n_workers=1)
        rng = np.random.default_rng(seed)
        p = np.where(gt.reported[:, None, :, None], gt.pts2d, np.nan) + rng.normal(0, 0.7, gt.pts2d.shape)
        conf = np.where(gt.visible, rng.uniform(0.7, 1.0, gt.visible.shape), rng.uniform(0.2, 0.6, gt.visible.shape))
        p, bad = _inject(np, p, rng)
        d = diagnose(p, conf, gt.cameras)
        top = np.argsort(-d.score, kind="stable")[:int(np.ceil(0.1 * len(d.score)))]
        hit = float(np.isin(bad, top).mean())
        d_nocam = diagnose(p, conf, None)
        top2 = np.argsort(-d_nocam.score, kind="stable")[:int(np.ceil(0.1 * len(d.score)))]
        rows.append({"seed": 5400 + seed, "frames": 100, "failures": len(bad), "found_in_top10pct": hit,
                     "found_without_cameras": float(np.isin(bad, top2).mean())})
        print(rows[-1], flush=True)
    summary = {"mean_found": float(np.mean([r["found_in_top10pct"] for r in rows])),
               "min_found": float(np.min([r["found_in_top10pct"] for r in rows])),
               "mean_found_without_cameras": float(np.mean([r["found_without_cameras"] for r in rows]))}
    print(summary)
    _merge(out, "injected", {"command": " ".join(["python", "bench/bench_semisupervised.py"] + sys.argv[1:]), "rows": rows, "summary": summary})


def cost(args):
    np, torch, plan = _setup()
    import tracemalloc, cv2
    from deeperfly_nb.synth_footage import Look
    from deeperfly_nb.labels import pathway_samples, labels_from_render, concat_samples
    from deeperfly_nb.semisupervised import UnlabelledFrames, SemiOptions, semi_priors, SemiTrainer
    from deeperfly_nb.training import TrainConfig, make_batch, heatmap_loss
    lab = _renders(LAB_SEEDS, 8, Look())
    unl = _renders(UNL_SEEDS[:1], 32, Look(**LOOK_B))
    S = concat_samples([pathway_samples(labels_from_render(r), plan, name=f"lab{i}") for i, r in enumerate(lab)])
    frames = UnlabelledFrames([{v: unl[0].frames[i] for i, v in enumerate(unl[0].cameras.names)}], plan, cameras=[unl[0].cameras])
    cfg = TrainConfig.from_dict(dict(steps=10 ** 6, batch_size=8, crop_hw=INPUT_HW, init=None, architecture=ARCH, val_frac=0.0, num_threads=1))
    res = {}
    for name, losses in (("unsupervised (5 losses)", FIVE), ("unsupervised without consistency", ("temporal", "multiview", "pca", "bones"))):
        o = SemiOptions(losses=losses)
        with tempfile.TemporaryDirectory() as d:
            t = SemiTrainer(S, cfg, Path(d), [0.22] * 3, None, frames, o, semi_priors(S, plan, o, frames, bones=np.concatenate([r.pts3d for r in lab])))
            def sup_step():
                x, tgt, m = make_batch(S, np.arange(8), np.random.default_rng(0), cfg.augment, cfg.crop_hw, cfg.sigma_cells, t.mean, t.net.stride)
                loss = heatmap_loss(t.net(x.contiguous(memory_format=torch.channels_last)), tgt, m, cfg.sigma_cells)
                t.opt.zero_grad(); loss.backward(); t.opt.step()
            def unsup_step(k=[0]):
                parts = t.unsupervised_losses(k[0]); k[0] += 1
                total = sum(parts.values()); t.opt.zero_grad(); total.backward(); t.opt.step()
            n_unsup = 16 + (16 // 2 if "consistency" in losses else 0)
            for f in (sup_step, unsup_step): f()                        # warm up
            reps, ts, tu = 12, 0.0, 0.0
            for _ in range(reps):                                       # interleaved: both see the same machine load
                a = time.perf_counter(); sup_step(); ts += (time.perf_counter() - a) / reps
                a = time.perf_counter(); unsup_step(); tu += (time.perf_counter() - a) / reps
            res[name] = {"supervised_step_s": ts, "supervised_images_per_s": 8 / ts, "unsupervised_step_s": tu,
                         "unsupervised_images": n_unsup, "unsupervised_images_per_s": n_unsup / tu,
                         "cost_ratio_per_image": (tu / n_unsup) / (ts / 8)}
            print(name, res[name], flush=True)
    mem = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (20, 200):
            folder = Path(d) / f"rec{n}"; folder.mkdir()
            for v in range(7):
                for t_ in range(n): cv2.imwrite(str(folder / f"camera_{v}_img_{t_}.jpg"), unl[0].frames[v, t_ % 32])
            fr = UnlabelledFrames([folder], plan, cameras=[unl[0].cameras])
            tracemalloc.start()
            for s in range(10): np.stack([fr.read(r, tt) for r, tt in fr.draw(np.random.default_rng(s), 2)])
            mem[n] = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()
    print("peak traced MB while drawing 10 batches:", mem)
    _merge(RESULTS / "semisupervised_cost.json", "cost", {"command": " ".join(["python", "bench/bench_semisupervised.py"] + sys.argv[1:]),
                                                         "steps": res, "peak_traced_mb_by_recording_frames": mem})


SHARED = ROOT / ".." / "shared" / "data"
DF3D_PKL = (SHARED / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl").resolve()
EXAMPLE = (SHARED / "deeperfly_example").resolve()
LAB_FRAMES, UNL_FRAMES, TEST_FRAMES = range(0, 5), range(0, 10), range(10, 15)


def _per_view(np, ev, plan):
    "{view: median px} of an evaluation's pathways (one view per pathway in the default plan)."
    return {plan.view_names[plan.pathway(k).view_indices[0]]: round(float(v), 2) for k, v in ev.per_pathway().items()}


def _detections(np, net, S, plan):
    "(V, T, N, 2) detections and (V, T, N) confidences of every sample of S, raw pixels."
    from deeperfly_nb.training import evaluate
    from deeperfly_nb.semisupervised import model_pathways
    ev, pws = evaluate(net, S), model_pathways(plan)
    pts, cf = np.full((plan.n_views, len(S.frame_keys), plan.n_points, 2), np.nan), np.zeros((plan.n_views, len(S.frame_keys), plan.n_points))
    for s in range(len(S)):
        for c, v, p in pws[S.pathway[s]].mapping:
            if np.isnan(pts[v, S.frame[s], p, 0]): pts[v, S.frame[s], p], cf[v, S.frame[s], p] = ev.pred_px[s, c], ev.conf[s, c]
    return pts, cf


def _bone_cv(np, cams, skeleton, pts2d, conf):
    "Median bone-length CV (%) after bundle adjustment + DLT, over all frames and over the held-out ones."
    from deeperfly_nb.pipeline import run_from_points2d
    r = run_from_points2d(cams, skeleton, pts2d, conf)
    ba = r.meta.get("bundle_adjustment", {})
    test = list(TEST_FRAMES)
    return {"bone_cv_median_pct": round(100 * float(np.nanmedian(skeleton.bone_length_cv(r.pts3d))), 2),
            "bone_cv_median_pct_frames_10_14": round(100 * float(np.nanmedian(skeleton.bone_length_cv(r.pts3d[test]))), 2),
            "reproj_median_px": round(float(np.nanmedian(r.reproj_error)), 2),
            "ba_median_reproj_before_after_px": [ba.get("median_reproj_before"), ba.get("median_reproj_after")]}


def _example_rig(np, weights, plan, cams, sk):
    """deeperfly_example's own rig: the labels-only model's detections of its 64 frames, bundle-adjusted from DeepFly3D's
    calibration of the sample (what a user gets from `deeperfly run` on the recording with that model)."""
    import copy, dataclasses
    from deeperfly_nb.detector import load_models
    from deeperfly_nb.inference import detect_2d
    from deeperfly_nb.pipeline import run_from_points2d
    name = plan.pathways[0].model
    plan = copy.copy(plan)
    plan.models = {**plan.models, name: dataclasses.replace(plan.models[name], weights=str(weights), sha256=None)}
    det = detect_2d(plan, load_models(plan, device="cpu"), EXAMPLE, progress=False)
    r = run_from_points2d(cams, sk, det.pts2d, det.conf)
    ba = r.meta["bundle_adjustment"]
    return r.cameras, {"example_cameras": "bundle-adjusted from DeepFly3D's calibration on the sup model's detections",
                       "median_reproj_px_df3d_cameras": ba.get("median_reproj_before"), "median_reproj_px_adjusted": ba.get("median_reproj_after"),
                       "bone_cv_median_pct": round(100 * float(np.nanmedian(sk.bone_length_cv(r.pts3d))), 2)}


def real(args):
    import numpy as np, torch
    torch.set_num_threads(1)
    from deeperfly_nb.config import Config
    from deeperfly_nb.df3d import read_df3d_result
    from deeperfly_nb.labels import labels_from_df3d, pathway_samples
    from deeperfly_nb.training import REAL_FINETUNE, evaluate
    from deeperfly_nb.detector import load_checkpoint, build_network
    from deeperfly_nb.semisupervised import UnlabelledFrames, SemiOptions, semi_priors, semi_train_detector
    if not DF3D_PKL.exists() or not EXAMPLE.exists():
        print(f"the real data ({DF3D_PKL}, {EXAMPLE}) is missing; nothing to do", file=sys.stderr); return 1
    cfg_d, df3d = Config.default(), read_df3d_result(DF3D_PKL)
    plan, cams, sk = cfg_d.detection_plan(), df3d.cameras, df3d.skeleton
    S = pathway_samples(labels_from_df3d(DF3D_PKL, frames=list(LAB_FRAMES) + list(TEST_FRAMES), plan=plan), plan)
    A = pathway_samples(labels_from_df3d(DF3D_PKL, frames=range(15), plan=plan), plan)          # all frames: for the 3D
    test_keys = [f"frame {t}" for t in TEST_FRAMES]
    cfg = {**REAL_FINETUNE, "init": "bundled:fly_synthetic", "steps": args.steps, "warmup_steps": min(30, max(1, args.steps // 10)),
           "val_frames": test_keys, "eval_every": args.steps, "checkpoint_every": 25, "num_threads": 1, "seed": args.seed}
    out = Path(args.out) if args.out else RESULTS / "semisupervised_real.json"
    test_idx = np.flatnonzero(np.isin(np.array(S.frame_keys)[S.frame], test_keys))
    with tempfile.TemporaryDirectory() as d:
        sample = Path(d) / f"deepfly3d_sample_frames_0_{args.sample_unlabelled - 1}"; sample.mkdir()
        for c in range(7):
            for t in range(args.sample_unlabelled): (sample / f"camera_{c}_img_{t}.jpg").symlink_to(DF3D_PKL.parents[1] / f"camera_{c}_img_{t}.jpg")
        recs = {"both": [sample, EXAMPLE], "sample": [sample], "example": [EXAMPLE]}[args.unlabelled]
        ex_cams, calib = cams, {"example_cameras": "DeepFly3D's calibration of deepfly3d_sample"}
        if args.example_cameras == "none":
            ex_cams, calib = None, {"example_cameras": "none: multiview and bones skip it (missing_cameras='skip'), temporal only"}
        frames = UnlabelledFrames(recs, plan, cameras=[cams if r is sample else ex_cams for r in recs])
        for name in args.runs.split(","):
            if name == "before":
                from deeperfly_nb.detector import bundled_weights
                m0 = build_network(load_checkpoint(bundled_weights("fly_synthetic"))[0])
                ev = evaluate(m0, S, test_idx)
                p2, c2 = _detections(np, m0, A, plan)
                row = {"test_per_view_px": _per_view(np, ev, plan), "test_median_px": round(ev.summary()["median_px"], 2)}
                ref = _bone_cv(np, cams, sk, df3d.pts2d, np.where(np.isfinite(df3d.pts2d[..., 0]), 1.0, 0.0))
                _merge(out, "deepfly3d_own_2d", ref); print("DeepFly3D's own 2D:", ref, flush=True)
                try: row.update(_bone_cv(np, cams, sk, p2, c2))
                except Exception as e: row["bone_cv_error"] = f"{type(e).__name__}: {e}"
                print("before", row, flush=True); _merge(out, "before", row); continue
            if name != "sup" and args.example_cameras == "ba" and EXAMPLE in recs and ex_cams is cams:
                if not (Path(d) / "sup" / "model.pt").exists(): raise SystemExit("--example-cameras ba needs the sup run first in --runs")
                ex_cams, calib = _example_rig(np, Path(d) / "sup" / "model.pt", plan, cams, sk)
                print("deeperfly_example calibrated:", calib, flush=True); _merge(out, "example_calibration" + args.suffix, calib)
                frames = UnlabelledFrames(recs, plan, cameras=[cams if r is sample else ex_cams for r in recs])
            o = {"sup": SemiOptions(losses=()),
                 "semi": SemiOptions(losses=tuple(args.semi_losses.split(",")), start_step=args.semi_start, recording_share=args.share,
                                     frames_per_step=args.frames_per_step,
                                     outlier_px=args.outlier_px, missing_cameras="skip" if ex_cams is None else "error",
                                     bn_from_unlabelled=not args.bn_frozen),
                 "zero": SemiOptions(losses=("temporal", "multiview"), supervised_weight=0.0, recording_share=args.share)}[name]
            c = {**cfg, "steps": args.zero_steps, "eval_every": args.zero_steps,
                 "warmup_steps": min(30, max(1, args.zero_steps // 10))} if name == "zero" else cfg
            pri = semi_priors(S, plan, o, frames, label_cameras=cams, skeleton=sk) if o.losses else {}
            t1 = time.perf_counter()
            res = semi_train_detector(S, frames, Path(d) / name, c, o, pri, progress=False, callback=_progress(name, c["steps"]))
            secs = time.perf_counter() - t1
            net = build_network(load_checkpoint(Path(d) / name / "last.pt")[0])        # the last weights: no choice on the test frames
            ev = evaluate(net, S, test_idx)
            p2, c2 = _detections(np, net, A, plan)
            row = {"command": " ".join(["OMP_NUM_THREADS=1 python", "bench/bench_semisupervised.py"] + sys.argv[1:]),
                   "options": o.to_dict(), "train": c, "test_per_view_px": _per_view(np, ev, plan),
                   "test_median_px": round(ev.summary()["median_px"], 2), "seconds": round(secs, 1),
                   "seconds_per_step": round(secs / c["steps"], 2), "last_log": [h for h in res.history if "loss" in h][-1]}
            try: row.update(_bone_cv(np, cams, sk, p2, c2))
            except Exception as e: row["bone_cv_error"] = f"{type(e).__name__}: {e}"
            print(name, {k: v for k, v in row.items() if k not in ("options", "train")}, flush=True)
            _merge(out, name + args.suffix, row)
    _merge(out, "setup" + args.suffix, {"command": " ".join(["OMP_NUM_THREADS=1 python", "bench/bench_semisupervised.py"] + sys.argv[1:]),
                          "labelled_frames": list(LAB_FRAMES), "test_frames": list(TEST_FRAMES),
                          "unlabelled": {str(n): L for n, L in zip(frames.names, frames.lengths)}, "sample_unlabelled_frames": f"0-{args.sample_unlabelled - 1}",
                          "cameras_for_multiview": {"deepfly3d_sample": "DeepFly3D's calibration", **calib},
                          "samples": str(S)})
    return 0


def _progress(name, steps):
    t0 = time.perf_counter()
    def cb(step, loss):
        if step in (1, 2, 5) or step % 10 == 0: print(f"  {name} step {step}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return cb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["domain-shift", "diagnostics", "cost", "real"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="domain-shift: the training seed (weights, batches, unlabelled draws)")
    ap.add_argument("--runs", default=None, help="domain-shift: sup,all,zero,<loss>,all-<loss>,...; real: before,sup,semi,zero")
    ap.add_argument("--out", default=None, help="real: the JSON to write (default bench/results/semisupervised_real.json)")
    ap.add_argument("--semi-start", type=int, default=60, help="real: the semi arm's supervised warm-up, steps (its losses join then)")
    ap.add_argument("--suffix", default="", help="real: appended to the JSON keys of the runs (e.g. @300 for a second step count)")
    ap.add_argument("--sample-unlabelled", type=int, default=len(UNL_FRAMES), choices=[10, 15],
                    help="real: the sample's first frames served unlabelled: 10 (frames 10-14 stay unseen) or 15 (transductive: the held-out frames' images, never their labels)")
    ap.add_argument("--share", default="length", choices=["length", "equal"], help="real: how the unlabelled recordings share the draws (SemiOptions.recording_share)")
    ap.add_argument("--outlier-px", type=float, default=None, help="real: SemiOptions.outlier_px of the semi arm (views this far from the others' triangulation are dropped)")
    ap.add_argument("--unlabelled", default="both", choices=["both", "sample", "example"], help="real: the unlabelled recordings")
    ap.add_argument("--example-cameras", default="df3d", choices=["df3d", "ba", "none"],
                    help="real: deeperfly_example's rig for the multiview loss: DeepFly3D's calibration of the sample, bundle-adjusted on the sup run's detections, or none (multiview and bones skip it)")
    ap.add_argument("--semi-losses", default="temporal,multiview,bones", help="real: the semi arm's unsupervised losses")
    ap.add_argument("--frames-per-step", type=int, default=1, help="real: SemiOptions.frames_per_step of the semi arm (2 with --share equal: both recordings in every step)")
    ap.add_argument("--bn-frozen", action="store_true", help="real: the semi arm's unlabelled frames leave BatchNorm's running statistics alone (SemiOptions.bn_from_unlabelled=False)")
    ap.add_argument("--zero-steps", type=int, default=60, help="real: steps of the zero-label run")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.runs is None:
        args.runs = "before,sup,semi,zero" if args.what == "real" else "sup,all,zero,temporal,multiview,pca,bones,consistency,pca_multiview"
    return {"domain-shift": domain_shift, "diagnostics": diagnostics, "cost": cost, "real": real}[args.what](args) or 0


if __name__ == "__main__":
    sys.exit(main())
