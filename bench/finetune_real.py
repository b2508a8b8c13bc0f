"""Fine-tune the bundled synthetic detector on real footage, with DeepFly3D's own 2D as labels (issue 4, 'what it must show' 2 and 3).

    python bench/finetune_real.py [--threads 1] [--steps N] [--set key=value ...] [--keep RUN_DIR]

The real DeepFly3D sample (`../shared/data/deepfly3d_sample/`: 15 frames of 7 cameras, 960x480) with DeepFly3D's 2D
detections as labels (`labels.labels_from_df3d`: both sides, through the default plan's pathways, so the left cameras
are mirrored; the front camera has no detections in that file). Frames 0-9 train, frames 10-14 are held out.
`training.finetune_on_df3d` starts from `bundled:fly_synthetic` with the settings `training.REAL_FINETUNE`
(overridable with --steps / --set) and reports, per view, the median distance of the detector's held-out
detections to DeepFly3D's 2D, before and after fine-tuning (target: at most 6 px in every view), the training time
and the throughput (training images per second, evaluation excluded).

Prints a table and writes bench/results/finetune_real.json. Timings are wall-clock on this machine; nothing here is
asserted (the short version in tests/test_training.py checks that fine-tuning lowers the error).
"""
from __future__ import annotations
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DF3D_PKL = (ROOT / ".." / "shared" / "data" / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl").resolve()
TARGET_PX = 6.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: REAL_FINETUNE's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig setting (TOML value), repeatable")
    ap.add_argument("--init", default="bundled:fly_synthetic", help="weights to start from (default bundled:fly_synthetic)")
    ap.add_argument("--keep", metavar="RUN_DIR", help="keep the run folder here (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_real.json"), help="the JSON to write")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from deeperfly_nb.cli import parse_settings
    from deeperfly_nb.core import atomic_path
    from deeperfly_nb.training import REAL_FINETUNE, finetune_on_df3d

    if not DF3D_PKL.exists():
        print(f"the real DeepFly3D sample is not at {DF3D_PKL}; nothing to do", file=sys.stderr)
        return 1
    overrides = parse_settings(args.set)
    if args.steps is not None: overrides["steps"] = args.steps
    overrides["num_threads"] = args.threads
    settings = {**REAL_FINETUNE, **overrides}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.keep) if args.keep else Path(tmp) / "run"
        res, after, before = finetune_on_df3d(DF3D_PKL, run, init=args.init, progress=True, **overrides)
    wall = time.perf_counter() - t0
    views = list(after)
    evals = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in h.items()} for h in res.history if "val_median_px" in h]
    m = res.metrics
    out = {
        "what": "fine-tune bundled:fly_synthetic on frames 0-9 of the real DeepFly3D sample with DeepFly3D's 2D as labels; "
                "median distance to DeepFly3D's 2D on held-out frames 10-14, per view (raw pixels)",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__},
        "settings": settings, "init": args.init,
        "before_px": {v: round(before[v], 2) for v in views}, "after_px": {v: round(after[v], 2) for v in views},
        "after_overall": {"median_px": round(m["median_px"], 2), "pck5": round(m["pck5"], 3), "pck10": round(m["pck10"], 3),
                          "n_points": m["n_points"]},
        "target_px": TARGET_PX, "target_met": bool(max(after.values()) <= TARGET_PX),
        "steps": res.steps, "train_seconds": round(res.train_seconds, 1), "images_per_s": round(res.images_per_s, 2),
        "wall_seconds": round(wall, 1), "evaluations": evals,
    }
    path = Path(args.out); path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp: tmp.write_text(json.dumps(out, indent=1) + "\n")

    print(f"\nreal footage (DeepFly3D sample), held-out frames 10-14: median distance to DeepFly3D's 2D, px")
    print(f"{'view':<6}{'before':>10}{'after':>10}")
    for v in views: print(f"{v:<6}{before[v]:>10.1f}{after[v]:>10.2f}")
    print(f"{'all':<6}{'':>10}{m['median_px']:>10.2f}   PCK@5 {100 * m['pck5']:.1f}%, PCK@10 {100 * m['pck10']:.1f}% over {m['n_points']} points")
    print(f"target <= {TARGET_PX:g} px in every view: {'met' if out['target_met'] else 'NOT met'} (worst {max(after.values()):.2f} px)")
    print(f"{res.steps} steps of {settings['batch_size']} crops {list(settings['crop_hw'])}: {res.train_seconds:.0f} s of training steps, "
          f"{res.images_per_s:.2f} training images/s on {args.threads} thread(s); {wall:.0f} s wall in all")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
