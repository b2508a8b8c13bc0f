"""What cropzoom's cropping and remapping cost (issue 12, item 4).

    OMP_NUM_THREADS=1 python bench/bench_cropzoom_speed.py [--frames 32] [--rounds 3]

Detection of the same synthetic 7-camera frames (tests/conftest.py `tiny_recording`) through two plans with the
same two models (a finder at 64x128 on every source, the pose model at 128x256 on the default plan's 8 pathways):

- cropzoom:  finder -> boxes (cropzoom preprocessor) -> pose model on the crops, points remapped to raw pixels,
             the footage decoded twice (once per stage);
- one stage: the same pathways and models in one pass, the pose model on the resized full frame (no boxes, no remap).

Rounds alternate; each figure is the median over rounds of wall and process (CPU) time of `inference.detect_2d`, the
whole of `deeperfly run`'s pose2d stage. Writes bench/results/cropzoom_speed.json; nothing is asserted.
"""
from __future__ import annotations
import argparse, copy, json, os, platform, sys, tempfile, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cropzoom_speed.json"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from conftest import tiny_recording
    from test_cropzoom_plan import cropzoom_tables, FINDER_HW, POSE_HW
    from deeperfly_nb.config import Config
    from deeperfly_nb.core import atomic_path
    from deeperfly_nb.detector import HourglassNet, load_models, save_checkpoint
    from deeperfly_nb.inference import detect_2d
    root = Path(tempfile.mkdtemp(prefix="bench_cz_"))
    d = tiny_recording(root, n_frames=args.frames)
    for name, hw in (("finder.pt", FINDER_HW), ("pose.pt", POSE_HW)):
        torch.manual_seed(0)
        save_checkpoint(root / name, HourglassNet(n_stacks=1, n_blocks=1, n_features=16, n_out_channels=19), {"input_size": hw})
    d["pose2d"]["models"][0].update(weights=str(root / "pose.pt"), input_size=POSE_HW)
    cz = cropzoom_tables(d)
    cz["pose2d"]["models"][1]["weights"] = str(root / "finder.pt")
    flat = copy.deepcopy(cz)
    flat["pose2d"]["preprocessors"] = [{"name": "zoom", "ops": []}, {"name": "zoom_flip", "ops": [{"op": "fliplr"}]}]
    for p in flat["pose2d"]["pathways"]: p.pop("crop_from", None)
    plans = {k: Config.from_dict(v).detection_plan() for k, v in (("cropzoom", cz), ("one stage", flat))}
    models = {k: load_models(p, device="cpu") for k, p in plans.items()}
    runs = {k: [] for k in plans}
    for r in range(args.rounds):
        for k in plans:
            w, c = time.perf_counter(), time.process_time()
            det = detect_2d(plans[k], models[k], root / "rec", progress=False)
            runs[k].append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c, "load": os.getloadavg()[0]})
            print(f"round {r + 1} {k:>9}: wall {runs[k][-1]['wall_s']:.2f} s, cpu {runs[k][-1]['cpu_s']:.2f} s", flush=True)
    med = {k: {m: float(np.median([x[m] for x in v])) for m in ("wall_s", "cpu_s")} for k, v in runs.items()}
    res = {"frames": args.frames, "images_per_frame": {"cropzoom": 15, "one stage": 15}, "threads": 1,
           "env": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                   "load_average_at_end": os.getloadavg()},
           "median": med, "runs": runs,
           "overhead_wall": med["cropzoom"]["wall_s"] / med["one stage"]["wall_s"] - 1,
           "overhead_cpu": med["cropzoom"]["cpu_s"] / med["one stage"]["cpu_s"] - 1}
    print(f"cropzoom vs the same two models in one stage: wall {100 * res['overhead_wall']:+.1f}%, cpu {100 * res['overhead_cpu']:+.1f}% "
          f"(target: at most +15%)")
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp: tmp.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
