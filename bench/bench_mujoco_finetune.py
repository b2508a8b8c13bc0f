"""Issue 19, claim 2 (partial, CPU): how far fine-tuning the bundled detector on MuJoCo renders brings it on real footage.

    OMP_NUM_THREADS=1 python bench/bench_mujoco_finetune.py --recordings 48 --frames 4 --steps 1500 --strong-augment --self-train 5 --run /tmp/mj_ft

The shipped `fly_neuromechfly`'s recipe (this bench's --posture renders, training, --self-train 2 --pseudo-repeat 3,
then bench/bundle_model.py) is one resumable library call, `neuromechfly_model.make_neuromechfly_model`
(`python -m deeperfly_nb.neuromechfly_model`): on a small configuration the two give bit-identical weights. This bench
scores each step on the real sample and keeps the variants that were tried.

Renders `--recordings` short recordings of the NeuroMechFly body (`synth_mujoco.render_recording_mujoco` at the rig's
full 960 x 480, seeds 3000..: every other one driven by deeperfly's own gait through inverse kinematics (`gait=True`),
the others by the recorded walk; random looks from `sample_mj_look`: DeepFly3D's infrared look, with wings, pigment,
a hanging abdomen and a tether plate), makes the default plan's pathway samples from their
exact 2D, and fine-tunes `bundled:fly_synthetic` on them for `--steps` (`training.train_detector`, resumable: run it
again with the same --run to continue). Evaluated with `training.evaluate` on the real DeepFly3D sample, frames 0-14,
against DeepFly3D's own 2D (never trained on), per view, before and after; and on the held-out 10% of the renders.

--self-train N then adapts the model to real footage without labels, N rounds of multi-view bootstrapping on the
unlabelled `../shared/data/deeperfly_example` (a different fly and recording from the sample): `run.run_recording` with
the model (default config, no videos), `labels.labels_from_result` on its bundle-adjusted result (RANSAC, >= 3 views
within 20 px), and `--self-train-steps` more steps on the renders plus those pseudo-labels, from the previous round's
last weights (`--pseudo-only`: on the pseudo-labels alone). Each round is scored on the sample as above; the last model is run on the example once more for its
bone-length CV and reprojection error. The sample's frames are never trained on, labelled or not.
--threshold-px sets the pseudo-labels' agreement threshold per round (the last value repeats; default 20 px);
--pseudo-drop TEXT leaves the points whose name contains TEXT unlabelled in the pseudo-labels (e.g. antenna).
--look FIELD=VALUE (repeatable) sets an `MjLook` field in every recording instead of `sample_mj_look`'s draw, e.g.
--look plate_rim=0.8 --look plate_streaks=0.5 (the renders are cached under a name that includes these settings).
--posture F (a `synth_mujoco.LegPosture` as JSON: bench/fit_posture.py writes it, e.g. bench/results/posture_example.json)
drives every recording by the recorded walk re-posed by F's per-joint offsets (`render_fly(posture=...)`), times a factor
drawn per recording from --posture-scale (default 0.25-1.5; `WalkParams.posture_scale`), instead of
every other one by the gait generator: the legs held as a real fly's are (cached under a name that includes F).
--style N gives half the training crops the tone of real frames (`training.fourier_style`, Fourier domain adaptation):
N frames per pathway of the unlabelled example recording (`labels.footage_inputs`), never the sample's.
The renders are kept in the run folder (renders_<recordings>x<frames>_<units>_<renderer code digest>.npz) and reused by a
later call with the same --run. Writes bench/results/mujoco_finetune.json (or --out). Nothing here is asserted.

On a GPU machine (training runs on the GPU when torch sees one; --device chooses), render in parallel and train
with larger batches, e.g. --workers 14 --batch-size 32 --loader-threads 8 (the renders and the weights are the same
with any --workers and --loader-threads). A machine without ../shared/data (a rented GPU, say) trains with
--no-real and --style-file F, F written beforehand by --save-style F on a machine with the example recording;
--render-budget-s S stops rendering after S seconds and keeps the first recordings that finished (the count goes in
the JSON: --recordings with that count renders the same set again). A model trained there is scored and
self-trained here with --from-model RUN/last.pt (no training on the renders; self-training still mixes in the
renders of --recordings).
"""
from __future__ import annotations
import argparse, json, os, sys, time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --strong-augment: `training.Augment.for_renders()`, wider contrast, gamma, brightness, blur and noise (and a little more
# zoom and turn) than Augment's defaults (on the real sample, same renders: 39.9 px with the defaults, 28.9 px with these).
EXAMPLE = (ROOT.parent / "shared" / "data" / "deeperfly_example").resolve()
DF3D_PKL = (ROOT.parent / "shared" / "data" / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl").resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recordings", type=int, default=24)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--units-per-mm", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="world units per NeuroMechFly mm, drawn uniformly per recording (default: synth_mujoco.DEFAULT_UNITS_PER_MM): "
                         "how large the fly stands in the rig's views")
    ap.add_argument("--aug-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="training's zoom augmentation range (default Augment's)")
    ap.add_argument("--strong-augment", action="store_true",
                    help="train with training.Augment.for_renders(): wider photometric and geometric augmentation than Augment's defaults")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    ap.add_argument("--train-seed", type=int, default=0, help="seeds the initial weights, the held-out renders, the batch order and the augmentation (another seed: the spread of one setting)")
    ap.add_argument("--self-train", type=int, default=0, metavar="N", help="rounds of multi-view bootstrapping on the unlabelled example recording")
    ap.add_argument("--self-train-steps", type=int, default=600, help="training steps per self-training round")
    ap.add_argument("--threshold-px", type=float, nargs="+", default=[20.0], metavar="PX",
                    help="the pseudo-labels' agreement threshold per round (the last one repeats), pixels")
    ap.add_argument("--pseudo-repeat", type=int, default=1, metavar="K",
                    help="each round's pseudo-labelled samples count K times against the renders (a bigger share of every batch)")
    ap.add_argument("--pseudo-only", action="store_true", help="self-training rounds train on the pseudo-labels alone, without the renders")
    ap.add_argument("--pseudo-drop", nargs="+", default=[], metavar="TEXT",
                    help="points whose name contains TEXT (e.g. antenna) get no pseudo-labels: the rounds leave them to the renders")
    ap.add_argument("--style", type=int, default=0, metavar="N",
                    help="crops take the tone of N frames per pathway of the unlabelled example recording (0: off)")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the recordings at once (the result is the same)")
    ap.add_argument("--device", default=None, help='where training runs: "cpu", "cuda", ... (default: the GPU when torch sees one)')
    ap.add_argument("--batch-size", type=int, default=8, help="training crops per step")
    ap.add_argument("--hidden-peak", type=float, default=1.0, help="target peak of the points the render hides from a camera (TrainConfig.hidden_peak; 1: as if seen)")
    ap.add_argument("--loader-threads", type=int, default=0, help="threads making the next batches while the network trains (the weights are the same)")
    ap.add_argument("--render-budget-s", type=float, default=None, help="stop rendering after this many seconds; keep the first recordings that finished")
    ap.add_argument("--style-file", default=None, help="style frames from this .npz (written by --save-style) instead of the example recording")
    ap.add_argument("--save-style", default=None, help="write the --style frames of the example recording to this .npz and stop")
    ap.add_argument("--no-real", action="store_true", help="no scores on the real sample (for a machine without ../shared/data)")
    ap.add_argument("--from-model", default=None, help="score and self-train this model instead of training one on the renders")
    ap.add_argument("--look", action="append", default=[], metavar="FIELD=VALUE",
                    help="an MjLook field set in every recording, e.g. plate_rim=0.8 (repeatable)")
    ap.add_argument("--posture", default=None, metavar="JSON",
                    help="every recording replays the recorded walk with these per-joint offsets (a LegPosture's JSON: bench/fit_posture.py writes it) "
                         "times a factor drawn per recording from --posture-scale, instead of every other one using the gait generator")
    ap.add_argument("--posture-scale", type=float, nargs=2, default=(0.25, 1.5), metavar=("LO", "HI"), help="range of that factor")
    ap.add_argument("--run", default="/tmp/deeperfly_mujoco_finetune", help="the training run folder (resumable)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mujoco_finetune.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import numpy as np, torch
    torch.set_num_threads(args.threads)
    from deeperfly_nb.config import Config
    from deeperfly_nb.core import atomic_path
    from deeperfly_nb.detector import build_network, bundled_weights, load_checkpoint
    from deeperfly_nb.labels import concat_samples, footage_inputs, labels_from_df3d, load_samples, pathway_samples
    from deeperfly_nb.training import Augment, evaluate, train_detector
    plan = Config.default().detection_plan()
    if args.save_style:
        with atomic_path(Path(args.save_style)) as tmp, open(tmp, "wb") as f: np.savez_compressed(f, style=footage_inputs(EXAMPLE, plan, n_frames=args.style))
        print(f"wrote {args.save_style}"); return 0
    if not args.no_real and not DF3D_PKL.exists(): print(f"{DF3D_PKL} is missing: no real footage to evaluate on (--no-real skips it)", file=sys.stderr); return 1
    real = None if args.no_real else pathway_samples(labels_from_df3d(DF3D_PKL, frames=range(15), plan=plan), plan)
    def per_view(ev):
        return {plan.view_names[plan.pathway(k).view_indices[0]]: round(float(v), 2) for k, v in ev.per_pathway().items()}
    def scored(ev):
        if ev is None: return None
        E, names = ev.errors_px, ev.channel_names
        groups = {"legs": [c for c, n in enumerate(names) if n[1] == "_" and n[0] in "fmh"], "claws": [c for c, n in enumerate(names) if n.endswith("claw")],
                  "antenna": [c for c, n in enumerate(names) if "antenna" in n], "stripes": [c for c, n in enumerate(names) if "stripe" in n]}
        return {"median_px": round(ev.summary()["median_px"], 2), "per_view": per_view(ev),
                "per_group_median_px": {g: round(float(np.nanmedian(E[:, c])), 2) for g, c in groups.items()}}
    t0 = time.perf_counter(); sets = []
    import hashlib, deeperfly_nb.synth_mujoco as smj
    code = hashlib.sha256(Path(smj.__file__).read_bytes()).hexdigest()[:10]          # renders of other renderer code are not reused
    look = args.look_fields = parse_look(args.look)
    if look: code += "_" + hashlib.sha256(json.dumps(look, sort_keys=True).encode()).hexdigest()[:6]   # other looks, other renders
    args.posture_job = None
    if args.posture:
        from deeperfly_nb.core import InputError
        try: pz = smj.load_posture(args.posture); smj.with_posture(smj.load_joint_angles(), pz)     # its joints are the walk's
        except InputError as e: sys.exit(f"--posture: {e}")
        args.posture_job = (pz, tuple(args.posture_scale))
        code += "_p" + hashlib.sha256(json.dumps([pz.names, pz.offset_rad.tolist(), list(args.posture_scale)]).encode()).hexdigest()[:6]
    cache = Path(args.run) / f"renders_{args.recordings}x{args.frames}_{args.units_per_mm}_{code}.npz"   # the renders, kept with the run
    if cache.exists(): S = load_samples(cache)
    else:
        sets = render_all(args)
        if len(sets) < args.recordings:                                    # --render-budget-s ran out: name the set by its count
            args.recordings = len(sets); cache = cache.with_name(f"renders_{args.recordings}x{args.frames}_{args.units_per_mm}_{code}.npz")
        S = concat_samples(sets)
        cache.parent.mkdir(parents=True, exist_ok=True); S.save(cache)
    render_s = time.perf_counter() - t0
    print(f"rendered {args.recordings} x {args.frames} frames in {render_s:.0f} s: {S}", flush=True)
    style = np.load(args.style_file)["style"] if args.style_file else footage_inputs(EXAMPLE, plan, n_frames=args.style) if args.style else None
    m0 = build_network(load_checkpoint(bundled_weights("fly_synthetic"))[0])
    before = real and evaluate(m0, real)
    cfg = dict(steps=args.steps, batch_size=args.batch_size, crop_hw=(192, 320), lr=1.5e-3, warmup_steps=50, lr_final_frac=0.02, val_frac=0.1,
               eval_every=max(100, args.steps // 5), checkpoint_every=100, log_every=50, seed=args.train_seed, num_threads=args.threads, init="bundled:fly_synthetic",
               hidden_peak=args.hidden_peak,
               **({"augment": {**(Augment.for_renders().to_dict() if args.strong_augment else {}), **({"scale": list(args.aug_scale)} if args.aug_scale else {})}}
                  if args.aug_scale or args.strong_augment else {}))
    t1 = time.perf_counter()
    if args.from_model: res, model = None, Path(args.from_model)
    else:
        res = train_detector(S, args.run, cfg, resume=(Path(args.run) / "last.pt").exists(), progress=False, device=args.device, style_images=style,
                             loader_threads=args.loader_threads,
                             callback=lambda s, l: print(f"  step {s} loss {l:.4f} ({time.perf_counter() - t1:.0f} s)", flush=True) if s % 50 == 0 else None)
        model = Path(args.run) / "last.pt"                                        # the last weights: no choice on the real frames
    after = real and evaluate(build_network(load_checkpoint(model)[0]), real)
    row = {"look": look, "posture": args.posture and {"file": args.posture, "scale": list(args.posture_scale)}, "hidden_peak": args.hidden_peak, "style_frames": args.style, "pseudo_only": args.pseudo_only, "pseudo_repeat": args.pseudo_repeat, "pseudo_drop": args.pseudo_drop, "threshold_px": args.threshold_px, "units_per_mm": args.units_per_mm, "aug_scale": args.aug_scale, "strong_augment": args.strong_augment, "command": " ".join(["OMP_NUM_THREADS=1 python", "bench/bench_mujoco_finetune.py"] + (argv or sys.argv[1:])),
           "from_model": args.from_model, "recordings": args.recordings, "frames_each": args.frames, "steps": args.steps, "render_s": round(render_s, 1),
           "train_s": round(time.perf_counter() - t1, 1), "train": cfg, "samples": str(S),
           "real_before": scored(before), "real_after": scored(after),
           "renders_held_out": [h for h in res.history if "val_median_px" in h][-1:] if res else None,
           "train_images_per_s": res and round(res.images_per_s, 1), "device": res and res.device,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg": os.getloadavg()}
    if args.self_train: row["self_train"] = self_train(args, S, plan, real, scored, cfg, model, style)
    print(json.dumps(row, indent=1), flush=True)
    with atomic_path(Path(args.out)) as tmp: tmp.write_text(json.dumps(row, indent=1) + "\n")
    return 0


def render_all(args) -> list:
    "The pathway samples of recordings 0.. --recordings, over --workers processes; with --render-budget-s only the first ones done in time."
    jobs, t0 = [(i, args.frames, args.units_per_mm, args.look_fields, args.posture_job) for i in range(args.recordings)], time.perf_counter()
    if args.workers <= 1 and args.render_budget_s is None: return [render_samples(*j) for j in jobs]
    import multiprocessing
    sets, pool = [], multiprocessing.get_context("spawn").Pool(max(args.workers, 1))
    try:
        done = pool.imap(_render_job, jobs)                                 # in seed order: the set is always recordings 0..K-1
        for _ in jobs:
            left = None if args.render_budget_s is None else max(args.render_budget_s - (time.perf_counter() - t0), 0.001)
            try: sets.append(done.next(timeout=left))
            except multiprocessing.TimeoutError: break
    finally: pool.terminate()                                               # workers still rendering a recording we no longer want
    print(f"rendered recordings 0..{len(sets) - 1} of {args.recordings} in {time.perf_counter() - t0:.0f} s", flush=True)
    return sets


def _render_job(job:tuple) -> "SampleSet":
    return render_samples(*job)


def parse_look(items:list) -> dict:
    "--look FIELD=VALUE items as {field: number}; an unknown field or a value that is not a number ends the run with one line."
    from dataclasses import fields
    from deeperfly_nb.synth_mujoco import MjLook
    names, out = {f.name for f in fields(MjLook)}, {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in names: sys.exit(f"--look {item}: {key!r} is not an MjLook field; fields: {', '.join(sorted(names))}")
        try: out[key] = float(value)
        except ValueError: sys.exit(f"--look {item}: expected FIELD=NUMBER")
    return out


def render_samples(i:int, frames:int, units_per_mm, look:dict|None=None, posture:tuple|None=None) -> "SampleSet":
    "Recording `i`'s pathway samples: seed 3000 + i, every other one driven by deeperfly's gait (run in a worker process); with `posture`, the offset walk."
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import numpy as np
    from deeperfly_nb.config import Config
    from deeperfly_nb.labels import labels_from_render, pathway_samples
    from deeperfly_nb.synth_mujoco import render_recording_mujoco
    upm = {} if units_per_mm is None else {"units_per_mm": float(np.random.default_rng([3000 + i, 7]).uniform(*units_per_mm))}
    if posture is not None:                                                 # (LegPosture, (lo, hi)): the library recipe's recording i
        from deeperfly_nb.neuromechfly_model import recipe_render_samples
        return recipe_render_samples(i, frames, posture[0], posture[1], **upm, **(look or {}))
    rec = render_recording_mujoco(frames, seed=3000 + i, gait=True if i % 2 else None, **upm, **(look or {}))
    return pathway_samples(labels_from_render(rec, name=f"mj{i}"), Config.default().detection_plan())


def example_run(model, out):
    "Run the default pipeline (no videos) on the example recording with `model`: (results.h5 path, summary numbers)."
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    from deeperfly_nb.self_training import round_config
    sm = run_recording(EXAMPLE, out, config=round_config(Config.default(), model), progress=False).result.summary()
    return Path(out) / "results.h5", {"reproj_median_px": round(sm["reprojection_error_px"]["median"], 2),
                                      "bone_cv_median_pct": round(100 * sm["bone_length_cv"]["median"], 1)}


def self_train(args, S, plan, real, scored, cfg, model, style=None) -> list:
    "Rounds of multi-view bootstrapping on the unlabelled example recording from `model` (see the module's docstring)."
    from deeperfly_nb.detector import build_network, load_checkpoint
    from deeperfly_nb.labels import concat_samples, labels_from_result, pathway_samples
    import numpy as np
    from deeperfly_nb.training import evaluate, train_detector
    rounds = []
    for r in range(1, args.self_train + 1):
        t0 = time.perf_counter()
        res_path, ex = example_run(model, Path(args.run) / f"example_{r - 1}")
        thr = args.threshold_px[min(r, len(args.threshold_px)) - 1]
        L = labels_from_result(res_path, EXAMPLE, plan, thr)
        drop = [i for i, n in enumerate(L.skeleton.point_names) if any(t in n for t in args.pseudo_drop)]
        L.pts2d[:, :, drop] = np.nan                                        # --pseudo-drop: unlabelled, so out of the loss
        P = pathway_samples(L, plan, name=f"example{r}_")
        run = Path(args.run) / f"self_train_{r}"
        c = {**cfg, "steps": args.self_train_steps, "init": str(model), "lr": 1e-3, "warmup_steps": 30, "val_frac": 0.0,
             "eval_every": args.self_train_steps}
        train_detector(P if args.pseudo_only else concat_samples([S] + [replace(P, frame_keys=[f"{k} (copy {j})" for k in P.frame_keys]) for j in range(args.pseudo_repeat)]), run, c, resume=(run / "last.pt").exists(), progress=False, device=args.device, style_images=style,
                       loader_threads=args.loader_threads)
        model = run / "last.pt"
        rounds.append({"round": r, "threshold_px": thr, "example_before": ex, "pseudo_labels": str(P), "train": c,
                       "real_after": scored(real and evaluate(build_network(load_checkpoint(model)[0]), real)), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rounds[-1]), flush=True)
    rounds.append({"example_after": example_run(model, Path(args.run) / f"example_{args.self_train}")[1]})
    return rounds


if __name__ == "__main__":
    sys.exit(main())
