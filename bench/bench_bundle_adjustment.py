"""Benchmark deeperfly's bundle adjustment against aniposelib.

    python bench/bench_bundle_adjustment.py [--frames 1000] [--seed 0] [--rot-deg 2] [--focal-frac 0.02]

Case: the default DeepFly3D rig (7-camera ring); a synthetic walking fly (`deeperfly_nb.synth`) over FRAMES
frames x 38 points, observed with the DeepFly3D detector's per-view point sets, 1 px noise, 5% gross
outliers (20-150 px) and 20% occlusion; every camera perturbed by ROT_DEG about a random axis and by
FOCAL_FRAC in focal length. Both solvers start from the same perturbed rig and the same detections:

- deeperfly: `bundle_adjust_cameras(rig, pts2d, conf=None, skeleton)` with its defaults (no confidences, as
  aniposelib has none; its default `max_frames=500` solves on 500 evenly spread frames); reported too: the
  same on all FRAMES frames (`max_frames=None`), and with the detector confidences;
- aniposelib: `CameraGroup.bundle_adjust_iter(p2ds (V, T*N, 2))` with its defaults (6 rounds of robust
  re-selection; each round solves on a subsample of points; it refines focal and k1 of every camera).

Reported: wall time of each (and the ratio) and the reprojection error over all observations after each,
measured the same way for both (DLT with deeperfly's `triangulate` through the adjusted rig; median and p95),
next to the same measure through the true rig and through the perturbed one; and the 3D error against the
truth after one similarity alignment (RANSAC triangulation through the adjusted rig; median, % of the body
length, antenna to last stripe) for the whole fly and for each side: on this rig only the front camera sees
both sides, so a rig can reproject perfectly and still misplace one side against the other. Prints a table
and writes bench/results/bundle_adjustment.json. Timings are wall-clock on this machine; nothing here is
asserted. On a small shared machine a multi-threaded BLAS can oversubscribe the cores and slow both sides
several-fold (and unevenly); `OPENBLAS_NUM_THREADS=1 python bench/bench_bundle_adjustment.py` measures both
single-threaded. The results record what they were measured under (`env`: thread settings, CPU model and
count, the load average before and after, the date, library versions) and end with `summary`, the
sentence bench/README.md quotes.
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, sys, time, warnings
from importlib.metadata import version, PackageNotFoundError
from pathlib import Path
import numpy as np
from scipy.spatial.transform import Rotation

from deeperfly_nb.cameras import CameraGroup
from deeperfly_nb.core import atomic_path
from deeperfly_nb.skeleton import Skeleton
from deeperfly_nb.triangulation import triangulate
from deeperfly_nb.bundle_adjustment import bundle_adjust_cameras
from deeperfly_nb.results import align_similarity
from deeperfly_nb.synth import default_rig, walking_fly, default_visibility, observe, perturb_cameras


def to_aniposelib(rig: CameraGroup):
    from aniposelib.cameras import Camera as ACam, CameraGroup as ACG
    return ACG([ACam(matrix=c.K, dist=c.dist.copy(), rvec=c.rvec, tvec=c.tvec, name=c.name,
                     size=(c.image_size[1], c.image_size[0]) if c.image_size else None) for c in rig])


def from_aniposelib(acg, like: CameraGroup) -> CameraGroup:
    out = []
    for c, a in zip(like, acg.cameras):
        K = np.asarray(a.get_camera_matrix(), float)
        d = np.asarray(a.get_distortions(), float).ravel()
        d = np.pad(d, (0, max(0, 5 - d.size)))[:5]
        out.append(c.replace(rmat=Rotation.from_rotvec(np.asarray(a.get_rotation(), float).ravel()).as_matrix(),
                             tvec=np.asarray(a.get_translation(), float).ravel(),
                             intr=np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2]]), dist=d))
    return CameraGroup(out)


def reproj_stats(rig: CameraGroup, pts2d) -> dict:
    "DLT through `rig`, then the pixel error of every observation: median, p95, mean."
    e = np.linalg.norm(rig.project(triangulate(rig, pts2d)) - pts2d, axis=-1)
    e = e[np.isfinite(e)]
    return {"median": float(np.median(e)), "p95": float(np.percentile(e, 95)), "mean": float(e.mean()), "n": int(e.size)}


def shape_error(rig: CameraGroup, pts2d, X) -> dict:
    "RANSAC through `rig`, one similarity onto the truth X: median 3D error, % of the body length (whole fly, each side)."
    P = triangulate(rig, pts2d, method="ransac")
    body = np.median(np.linalg.norm(X[:, 15] - X[:, 18], axis=-1))
    out = {}
    for label, idx in (("whole_fly", slice(None)), ("left_side", slice(0, 19)), ("right_side", slice(19, 38))):
        aligned, *_ = align_similarity(P[:, idx], X[:, idx])
        out[label] = float(100 * np.nanmedian(np.linalg.norm(aligned - X[:, idx], axis=-1)) / body)
    return out


def _cpu_model() -> str:
    try: return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): return platform.processor()


def _version(pkg: str):
    try: return version(pkg)
    except PackageNotFoundError: return None


def environment() -> dict:
    "What the timings depend on: thread settings, the CPU, the load, the versions."
    return {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": _version("scipy"),
            "aniposelib": _version("aniposelib"), "deeperfly": _version("deeperfly") or _version("deeperfly_nb"),
            "machine": platform.machine(), "cpu_model": _cpu_model(), "cpus": os.cpu_count(),
            "load_average_1_5_15min_before": [round(x, 2) for x in os.getloadavg()],
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            **{k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}


def summary(res: dict) -> str:
    "One sentence for bench/README.md, with the settings the figures were measured under."
    e, d, a = res["env"], res["deeperfly"], res["aniposelib"]
    threads = e.get("OPENBLAS_NUM_THREADS") or "unset"
    return (f"{res['speedup']:.1f}x faster ({d['seconds']:.1f} s vs {a['seconds']:.1f} s) at reprojection median "
            f"{d['reprojection']['median']:.3f} vs {a['reprojection']['median']:.3f} px; whole-fly 3D error "
            f"{d['error3d_pct_body']['whole_fly']:.2f}% vs {a['error3d_pct_body']['whole_fly']:.1f}% of the body length "
            f"(measured {e['date_utc']} on {e['cpus']} x {e['cpu_model']}, OPENBLAS_NUM_THREADS={threads}, "
            f"load average {e['load_average_1_5_15min_before'][0]:.1f} before / {e['load_average_after'][0]:.1f} after)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rot-deg", type=float, default=2.0)
    ap.add_argument("--focal-frac", type=float, default=0.02)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bundle_adjustment.json"))
    args = ap.parse_args(argv)

    fly = Skeleton.fly38()
    true = default_rig()
    X = walking_fly(args.frames, seed=args.seed)
    obs = observe(true, X, default_visibility(true.names), noise_px=1.0, outlier_frac=0.05, occlusion_frac=0.2,
                  seed=args.seed)
    pts2d, conf = obs.pts2d, obs.conf
    start = perturb_cameras(true, rot_deg=args.rot_deg, focal_frac=args.focal_frac, seed=args.seed)
    V, T, N = pts2d.shape[:3]
    res = {"frames": T, "points": N, "views": V, "observations": int(np.isfinite(pts2d[..., 0]).sum()),
           "perturbation": {"rot_deg": args.rot_deg, "focal_frac": args.focal_frac},
           "env": environment()}
    res["reprojection_true_rig"] = reproj_stats(true, pts2d)
    res["reprojection_start_rig"] = reproj_stats(start, pts2d)

    t0 = time.perf_counter()
    ours, ours_res = bundle_adjust_cameras(start, pts2d, None, fly)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_all, ours_all_res = bundle_adjust_cameras(start, pts2d, None, fly, max_frames=None)
    t_ours_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_c, ours_c_res = bundle_adjust_cameras(start, pts2d, conf, fly)
    t_ours_c = time.perf_counter() - t0
    res["deeperfly"] = {"seconds": t_ours, "nfev": int(ours_res.nfev), "message": ours_res.message,
                        "frames_used": ours_res.n_frames, "observations_used": ours_res.n_observations,
                        "reprojection": reproj_stats(ours, pts2d), "error3d_pct_body": shape_error(ours, pts2d, X),
                        "polish": ours_res.polish, "co_registration": ours_res.co_registration}
    res["deeperfly_all_frames"] = {"seconds": t_ours_all, "nfev": int(ours_all_res.nfev),
                                   "frames_used": ours_all_res.n_frames, "reprojection": reproj_stats(ours_all, pts2d),
                                   "error3d_pct_body": shape_error(ours_all, pts2d, X)}
    res["deeperfly_with_confidence"] = {"seconds": t_ours_c, "nfev": int(ours_c_res.nfev),
                                        "reprojection": reproj_stats(ours_c, pts2d)}

    acg = to_aniposelib(start)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a_err = acg.bundle_adjust_iter(pts2d.reshape(V, -1, 2), verbose=False)
    t_anip = time.perf_counter() - t0
    theirs = from_aniposelib(acg, start)
    res["aniposelib"] = {"seconds": t_anip, "reported_error": float(a_err), "reprojection": reproj_stats(theirs, pts2d),
                         "error3d_pct_body": shape_error(theirs, pts2d, X),
                         "settings": "bundle_adjust_iter defaults (n_iters=6, n_samp_iter=200, n_samp_full=1000, "
                                     "ftol=1e-4, max_nfev=200, refines focal and k1)"}
    res["speedup"] = t_anip / t_ours
    res["speedup_all_frames"] = t_anip / t_ours_all
    res["env"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    res["summary"] = summary(res)

    r = lambda s: f"{s['median']:.3f} / {s['p95']:.2f}"
    e = lambda s: f"{s['whole_fly']:.1f} / {s['left_side']:.1f} / {s['right_side']:.1f}"
    rows = [("wall time (s)", f"{t_ours:.1f}", f"{t_anip:.1f}", f"{res['speedup']:.1f}x faster"),
            ("reprojection median / p95 (px), after", r(res["deeperfly"]["reprojection"]), r(res["aniposelib"]["reprojection"]), ""),
            ("3D error whole fly / left / right (% body)", e(res["deeperfly"]["error3d_pct_body"]),
             e(res["aniposelib"]["error3d_pct_body"]), "one similarity"),
            (f"  ... deeperfly on all {T} frames", f"{t_ours_all:.1f} s, " + r(res["deeperfly_all_frames"]["reprojection"]), "",
             f"{res['speedup_all_frames']:.1f}x faster"),
            ("  ... deeperfly with confidences", f"{t_ours_c:.1f} s, " + r(res["deeperfly_with_confidence"]["reprojection"]), "", ""),
            ("  ... through the true rig", r(res["reprojection_true_rig"]), "", "the floor"),
            ("  ... through the perturbed start rig", r(res["reprojection_start_rig"]), "", "")]
    w = max(len(x[0]) for x in rows)
    print(f"{T} frames x {N} points, {V} views, {res['observations']} observations; start rig: "
          f"{args.rot_deg} deg / {100 * args.focal_frac:.0f}% focal perturbation")
    print(f"{'case':<{w}}  {'deeperfly':>22}  {'aniposelib':>16}  note")
    for a, b, c, n in rows: print(f"{a:<{w}}  {b:>22}  {c:>16}  {n}")
    print(res["summary"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp: tmp.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
