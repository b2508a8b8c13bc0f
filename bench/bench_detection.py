"""Benchmark 2D detection against the plain forward pass of the same network.

    python bench/bench_detection.py [--frames 4] [--rounds 2] [--threads 1] [--floor-images 6]

On DeepFly3D's real sample (`../shared/data/deepfly3d_sample`, 7 views x FRAMES frames, 8 pathways of the
default plan = 8 * FRAMES images of 480x960), with a checkpoint in DeepFly2D's published 2-stack layout
(`../shared/data/df2d_layout`, random weights: speed does not depend on them), each case in its own process
so that its peak RSS is its own:

- floor:     a plain batch-1 `torch.inference_mode()` forward of the same network (NCHW, eval mode, no
             deeperfly code in the loop), per image, on prepared inputs;
- library:   `detect_sequence(plan, load_models(plan), windows)` as a notebook calls it (frames decoded
             before), with and without MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment;
- cli:       `deeperfly run` (in-process `cli.main`, pose2d stage only) on the mp4 files: its pose2d stage's
             detection seconds (video decoding overlaps on a thread), as shipped (the command calls
             glibc's mallopt itself) and with that workaround switched off;
- unfused:   (--unfused) the library path with `fused=False`, the network's own eager forward.

Rounds are interleaved; each figure is the median over rounds, and speed is reported as images per second
(wall) and CPU seconds per image (process time: what the case itself computed, robust to other jobs on a
shared machine), each also as a ratio to the floor measured in the same run. Detections of every library/CLI run are compared
with the first library run (bit-identical expected). Writes bench/results/detection.json; nothing is asserted.
"""
from __future__ import annotations
import argparse, json, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
from deeperfly_nb.testing import random_df2d_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
SAMPLE, LAYOUT = SHARED / "deepfly3d_sample", SHARED / "df2d_layout" / "df2d_state_dict_keys.json"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


def config_toml(work: Path, ckpt: Path) -> Path:
    "The packaged default config with the weights replaced and only the pose2d stage on."
    text = (ROOT / "deeperfly_nb" / "data" / "default_config.toml").read_text()
    text = text.replace('weights = "bundled:fly_synthetic"', f'weights = "{ckpt}"')
    for stage in ("bundle_adjustment", "triangulation", "visualization"):
        text = text.replace(f"\n{stage} = true", f"\n{stage} = false", 1)
    path = work / "config.toml"
    path.write_text(text)
    return path


def plan_and_windows(cfg: Path, frames: int):
    from deeperfly_nb.config import Config
    from deeperfly_nb import io
    plan = Config.load(cfg).detection_plan()
    windows = {s.name: np.asarray(io.find_source(SAMPLE, list(s.patterns))[:frames]) for s in plan.sources}
    return plan, windows


def child(mode: str, work: Path, frames: int, floor_images: int) -> dict:
    "One measurement in this process: seconds, images, peak RSS."
    import torch
    cfg, out = work / "config.toml", {}
    if mode == "floor":
        from deeperfly_nb.detector import load_checkpoint, build_network, load_model
        plan, windows = plan_and_windows(cfg, 1)
        state, _ = load_checkpoint(work / "sh2.tar")
        net = build_network(state).eval()
        prep = load_model(plan.models["deepfly2d"], fused=False)
        xs = [prep.prepare(windows[s][0]) for s in list(windows)[:floor_images]]
        del prep
        with torch.inference_mode():
            net(xs[0])                                      # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            for x in xs: net(x)
            out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "images": len(xs)}
    elif mode in ("library", "unfused"):
        from deeperfly_nb.detector import load_models
        from deeperfly_nb.inference import detect_sequence
        plan, windows = plan_and_windows(cfg, frames)
        models = load_models(plan, fused=mode == "library")
        t0, c0 = time.perf_counter(), time.process_time()
        pts2d, conf = detect_sequence(plan, models, windows)
        out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "images": frames * len(plan.pathways)}
        np.savez(work / f"{mode}_{os.getpid()}.npz", pts2d=pts2d, conf=conf)
        out["detections"] = str(work / f"{mode}_{os.getpid()}.npz")
    elif mode in ("cli", "cli_no_mallopt"):
        from deeperfly_nb import cli
        from deeperfly_nb.run import read_record
        from deeperfly_nb.results import PoseResult
        from deeperfly_nb import inference
        if mode == "cli_no_mallopt": cli._keep_freed_memory = lambda: None
        cpu, detect_2d = [], inference.detect_2d
        def timed_detect_2d(*a, **kw):                      # the CPU time of the detection inside the command
            c0 = time.process_time(); det = detect_2d(*a, **kw); cpu.append(time.process_time() - c0); return det
        inference.detect_2d = timed_detect_2d
        dest = work / f"out_{mode}_{os.getpid()}"
        rc = cli.main(["run", str(SAMPLE), "-c", str(cfg), "-o", str(dest), "--max-frames", str(frames), "--no-progress", "-q"])
        if rc: raise SystemExit(f"deeperfly run failed with exit code {rc}")
        rec = read_record(dest, "pose2d")
        out = {"seconds": rec["summary"]["seconds_detection"], "cpu_seconds": cpu[0], "images": frames * 8}
        res = PoseResult.load(dest / "pose2d.h5")
        np.savez(work / f"{mode}_{os.getpid()}.npz", pts2d=res.pts2d, conf=res.conf)
        out["detections"] = str(work / f"{mode}_{os.getpid()}.npz")
    out.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, threads=torch.get_num_threads(),
               load_average=os.getloadavg()[0])
    return out


CASES = [("floor", {}), ("library", {}), ("library", MALLOC), ("cli", {}), ("cli_no_mallopt", {})]


def run_child(mode, env_extra, work, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC} | env_extra | {"OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--frames", str(args.frames),
           "--floor-images", str(args.floor_images)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode: raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4, help="frames per view (8 pathways: 8x as many images)")
    ap.add_argument("--floor-images", type=int, default=6, help="images for the plain forward")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every case (OMP_NUM_THREADS)")
    ap.add_argument("--unfused", action="store_true", help="also time the library path with fused=False")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.frames, args.floor_images)))
        return
    if not (SAMPLE.is_dir() and LAYOUT.exists()): raise SystemExit(f"needs {SAMPLE} and {LAYOUT} (../shared/data)")
    import torch
    from deeperfly_nb.core import atomic_path
    work = Path(tempfile.mkdtemp(prefix="bench_detection_"))
    ckpt = work / "sh2.tar"
    random_df2d_checkpoint(ckpt, json.loads(LAYOUT.read_text())["sh2"])
    config_toml(work, ckpt)
    cases = CASES + ([("unfused", {})] if args.unfused else [])
    runs = {}
    for r in range(args.rounds):
        for mode, env in cases:
            name = mode + (" +MALLOC" if env else "")
            runs.setdefault(name, []).append(run_child(mode, env, work, args))
            m = runs[name][-1]
            print(f"round {r + 1} {name:>16}: {m['images'] / m['seconds']:.3f} images/s, peak RSS {m['peak_rss_mib']:.0f} MiB, "
                  f"load {m['load_average']:.1f}", flush=True)
    floor_ips = float(np.median([m["images"] / m["seconds"] for m in runs["floor"]]))
    floor_cpu = float(np.median([m["cpu_seconds"] / m["images"] for m in runs["floor"]]))
    ref = np.load(runs["library"][0]["detections"])
    summary = {}
    for name, ms in runs.items():
        ips = float(np.median([m["images"] / m["seconds"] for m in ms]))
        cpu = float(np.median([m["cpu_seconds"] / m["images"] for m in ms]))
        row = {"images_per_s": ips, "s_per_image": 1 / ips, "vs_floor": ips / floor_ips, "cpu_s_per_image": cpu,
               "vs_floor_cpu": floor_cpu / cpu,
               "peak_rss_mib": float(max(m["peak_rss_mib"] for m in ms)), "runs": ms}
        if "detections" in ms[0]:
            same = []
            for m in ms:
                d = np.load(m["detections"])
                same.append(bool(np.array_equal(d["pts2d"], ref["pts2d"], equal_nan=True) and
                                 np.array_equal(d["conf"], ref["conf"], equal_nan=True)))
            row["identical_to_first_library_run"] = all(same)
            if not all(same):
                d = np.load(ms[0]["detections"])
                row["max_abs_px_difference"] = float(np.nanmax(np.abs(d["pts2d"] - ref["pts2d"])))
        summary[name] = row
    res = {"config": {"frames": args.frames, "images": args.frames * 8, "floor_images": args.floor_images,
                      "rounds": args.rounds, "threads": args.threads, "network": "DeepFly2D 2-stack layout, 256x512 input"},
           "env": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                   "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
           "cases": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp: tmp.write_text(json.dumps(res, indent=2))
    print(f"\n{'case':>16} | images/s | s/image | vs floor | CPU s/image | vs floor (CPU) | peak RSS MiB | identical")
    for name, row in summary.items():
        print(f"{name:>16} | {row['images_per_s']:8.3f} | {row['s_per_image']:7.3f} | {row['vs_floor']:7.2f}x | "
              f"{row['cpu_s_per_image']:11.3f} | {row['vs_floor_cpu']:13.2f}x | {row['peak_rss_mib']:12.0f} | "
              f"{row.get('identical_to_first_library_run', '-')}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
