"""Exporting a long result to NWB in bounded memory (issue 16, item 4).

A synthetic result of 100,000 frames x 38 points x 7 views (2D, confidence, 3D, reprojection error: ~0.94 GB of
float64 arrays, NaN where a side is unseen) is exported with `interop.write_nwb` in a fresh subprocess, which reports
the wall time, its resident memory just before the export and its peak resident memory (`resource.getrusage`,
ru_maxrss) after it; a 10,000-frame result is measured the same way, so the memory the export adds can be compared
across a 10x longer recording (bounded: it must not grow with the frame count). The file is then opened with pynwb and
a few series are checked against the arrays.

    OMP_NUM_THREADS=1 python bench/bench_nwb_export.py            # ~2-4 min on 2 shared cores

Writes bench/results/nwb_export.json.
"""
import json, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, resource, sys, time, warnings
import numpy as np
from pathlib import Path
warnings.simplefilter("ignore")
from deeperfly_nb.cameras import CameraGroup, ring_camera
from deeperfly_nb.skeleton import Skeleton
from deeperfly_nb.results import PoseResult
from deeperfly_nb import interop
import pynwb, ndx_pose                                    # imported before measuring: their import is not the export

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

T, dest = int(sys.argv[1]), Path(sys.argv[2])
V, N = 7, 38
rig = CameraGroup([ring_camera(n, a, focal_px=22388, image_size=(480, 960)) for n, a in
                   zip("rh rm rf f lf lm lh".split(), [-120, -90, -45, 0, 45, 90, 120])])
rng = np.random.default_rng(0)
pts3d = np.empty((T, N, 3))
for s in range(0, T, 10000):                             # a slow random walk around a rest pose, built in blocks
    n = min(10000, T - s)
    pts3d[s:s + n] = rng.uniform(-1, 1, (N, 3)) + np.cumsum(0.001 * rng.normal(size=(n, N, 3)), 0)
pts2d, conf, err = np.empty((V, T, N, 2)), np.empty((V, T, N)), np.empty((V, T, N))
for v in range(V):
    for s in range(0, T, 10000):
        p = rig.cameras[v].project(pts3d[s:s + 10000])
        pts2d[v, s:s + 10000] = p + 0.5 * rng.normal(size=p.shape)
        err[v, s:s + 10000] = np.linalg.norm(pts2d[v, s:s + 10000] - p, axis=-1)
        conf[v, s:s + 10000] = rng.uniform(0.5, 1, p.shape[:-1])
unseen = np.zeros((V, N), bool); unseen[:3, :19] = True; unseen[4:, 19:] = True
for v in range(V):
    pts2d[v][:, unseen[v]] = np.nan; conf[v][:, unseen[v]] = 0.0; err[v][:, unseen[v]] = np.nan
res = PoseResult(pts2d, conf, rig, Skeleton.fly38(), pts3d=pts3d, reproj_error=err, fps=100.0, meta={"world_unit": "millimeters"})
arrays_mb = sum(a.nbytes for a in (pts2d, conf, pts3d, err)) / 2**20
before_rss, before_peak = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
interop.write_nwb(res, dest)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with pynwb.NWBHDF5IO(str(dest), "r") as io:
    m = io.read().processing["behavior"]["deeperfly_pose"]
    s = m.pose_estimations["lf"].pose_estimation_series["lf_claw"]
    ok = (np.array_equal(s.data[:], pts2d[4, :, 4]) and np.array_equal(s.confidence[:], conf[4, :, 4])
          and np.array_equal(m.pose_estimation_series["rh_claw"].data[:], pts3d[:, 33]))
    chunks = list(s.data.chunks); compression = s.data.compression
print(json.dumps({"frames": T, "views": V, "points": N, "seconds": round(seconds, 2), "arrays_mb": round(arrays_mb, 1),
                  "rss_before_export_mb": round(before_rss, 1), "peak_rss_before_export_mb": round(before_peak, 1),
                  "peak_rss_mb": round(peak, 1), "export_added_mb": round(peak - max(before_rss, before_peak), 1),
                  "file_mb": round(dest.stat().st_size / 2**20, 1), "chunks": chunks, "compression": compression,
                  "read_back_equal": bool(ok)}))
'''

def run(frames:int, folder:Path) -> dict:
    dest = folder / f"result_{frames}.nwb"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(frames), str(dest)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if out.returncode: raise SystemExit(f"child failed for {frames} frames:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["child_wall_seconds"] = round(time.perf_counter() - t0, 1)
    r["children_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    dest.unlink()
    return r

def main():
    with tempfile.TemporaryDirectory() as d:
        small, big = run(10_000, Path(d)), run(100_000, Path(d))
    res = {"command": "OMP_NUM_THREADS=1 python bench/bench_nwb_export.py", "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
           "python": platform.python_version(), "runs": [small, big],
           "ratios_100k_over_10k": {"seconds": round(big["seconds"] / small["seconds"], 2),
                                    "arrays": round(big["arrays_mb"] / small["arrays_mb"], 2),
                                    "export_added_memory": round(big["export_added_mb"] / max(small["export_added_mb"], 1e-9), 2)}}
    out = ROOT / "bench" / "results" / "nwb_export.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))

if __name__ == "__main__": main()
