"""Rendering throughput of the MuJoCo renderer of the NeuroMechFly body (deeperfly_nb.synth_mujoco), on CPU.

    OMP_NUM_THREADS=1 python bench/bench_render_mujoco.py [--frames 3] [--backends osmesa egl]

For each OpenGL backend (MUJOCO_GL=osmesa: Mesa's software OSMesa; MUJOCO_GL=egl: EGL, on a machine without a GPU
Mesa's llvmpipe), in its own process, at 256x512 and 960x480 (H x W), through the 7 cameras of deeperfly's default
DeepFly3D rig, with the recorded walking kinematics:

- raw:  `GLView.render` alone (RGB + depth read back), per image;
- full: `render_views` (pose, keypoints, render, depth-buffer visibility, camera response), per image;
- build: `build_fly` once (MJCF + 69 meshes compiled, ball texture), seconds.

Speed is images per second (wall) and CPU seconds per image (process time, robust to other jobs on a shared machine).
Also writes bench/results/render_mujoco_side_by_side.jpg: camera 1 of the real DeepFly3D sample beside the synthetic
view `rm` at 960x480 (claim 1 of issue 19). Writes bench/results/render_mujoco.json; nothing is asserted.
"""
from __future__ import annotations
import argparse, json, os, platform, subprocess, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((256, 512), (480, 960))


def child(backend:str, n_frames:int) -> dict:
    os.environ["MUJOCO_GL"] = backend
    from deeperfly_nb import synth
    from deeperfly_nb import synth_mujoco as sm
    from deeperfly_nb.synth_footage import resize_cameras
    walk = sm.load_joint_angles()
    t0 = time.perf_counter()
    fly = sm.build_fly(sm.MjLook(), 0, max_size=(480, 960))
    build_s = time.perf_counter() - t0
    qadr = fly.check_names(walk.names)
    _, A = sm.walk_angles(walk, n_frames + 1, 100.0)
    out = {"backend": backend, "build_s": round(build_s, 3), "sizes": {}}
    for size in SIZES:
        cams = resize_cameras(synth.default_rig(), size=size)
        gv = sm.GLView(fly.model, *size)
        fly.pose(qadr, A[0]); gv.render(fly.data, cams[0])              # warm-up
        w0, c0 = time.perf_counter(), time.process_time()
        for t in range(n_frames):
            fly.pose(qadr, A[t + 1])
            for cam in cams: gv.render(fly.data, cam, sm.DEFAULT_UNITS_PER_MM)
        n = n_frames * len(cams)
        raw = dict(images=n, images_per_s=n / (time.perf_counter() - w0), cpu_s_per_image=(time.process_time() - c0) / n)
        gv.close()
        w0, c0 = time.perf_counter(), time.process_time()
        sm.render_views(fly, cams, qadr, A[1:], np.zeros(n_frames), sm.MjLook(), seed=0)
        full = dict(images=n, images_per_s=n / (time.perf_counter() - w0), cpu_s_per_image=(time.process_time() - c0) / n)
        out["sizes"][f"{size[0]}x{size[1]}"] = {"raw": {k: round(v, 4) for k, v in raw.items()},
                                                "full": {k: round(v, 4) for k, v in full.items()}}
    return out


def side_by_side(path:Path):
    "Real camera 1 (frame 0) beside the synthetic view rm, both 960x480, written as one gray JPEG."
    import cv2
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    from deeperfly_nb import synth
    from deeperfly_nb import synth_mujoco as sm
    from deeperfly_nb.testing import shared_data
    sample = shared_data("deepfly3d_sample")
    if sample is None: print("no ../shared/data/deepfly3d_sample: side-by-side figure skipped"); return None
    real = cv2.imread(str(sample / "camera_1_img_0.jpg"), cv2.IMREAD_GRAYSCALE)
    syn = sm.render_fly(synth.default_rig().subset(["rm"]), n_frames=1, seed=3).frames[0, 0]
    img = np.hstack([real, np.zeros((480, 8), np.uint8), syn])
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return str(path.relative_to(ROOT))


def gpu_name():
    "The first GPU nvidia-smi lists, or None."
    try: return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.splitlines()[0] or None
    except (OSError, IndexError, subprocess.SubprocessError): return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["osmesa", "egl"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side-by-side-only", action="store_true", help="only redraw the real-beside-synthetic JPEG (no timing; the JSON is left alone)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "render_mujoco.json"), help="where the JSON goes")
    a = ap.parse_args()
    if a.child: print(json.dumps(child(a.child, a.frames))); return
    if a.side_by_side_only: print(side_by_side(ROOT / "bench" / "results" / "render_mujoco_side_by_side.jpg")); return
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "gpu": gpu_name()}, "frames": a.frames, "backends": []}
    for b in a.backends:
        r = subprocess.run([sys.executable, __file__, "--child", b, "--frames", str(a.frames)], capture_output=True, text=True)
        line = [l for l in r.stdout.splitlines() if l.startswith("{")]
        res["backends"].append(json.loads(line[-1]) if line and r.returncode == 0 else {"backend": b, "error": r.stderr.strip()[-500:]})
        print(json.dumps(res["backends"][-1]))
    res["side_by_side"] = side_by_side(ROOT / "bench" / "results" / "render_mujoco_side_by_side.jpg")
    res["machine"]["load_after"] = os.getloadavg()[0]
    res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'backend':8} {'size':8} {'raw img/s':>10} {'full img/s':>11} {'full CPU s/img':>15}")
    for b in res["backends"]:
        for s, v in b.get("sizes", {}).items():
            print(f"{b['backend']:8} {s:8} {v['raw']['images_per_s']:10.2f} {v['full']['images_per_s']:11.2f} {v['full']['cpu_s_per_image']:15.3f}")


if __name__ == "__main__":
    main()
