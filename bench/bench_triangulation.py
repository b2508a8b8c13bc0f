"""Benchmark deeperfly's triangulation against aniposelib.

    python bench/bench_triangulation.py [--frames 10000] [--ransac-frames 20] [--seed 0]

Cases, on the default DeepFly3D rig (7-camera ring) x FRAMES frames x 38 points:

1. DLT: `triangulate(method="dlt")` vs aniposelib `CameraGroup.triangulate(points (V, M, 2), undistort=True)`:
   wall time and speed ratio, max |difference| between the two on noise-free input, and 3D error against
   the ground truth on 1 px noise (mean / median).
2. RANSAC under 1 px noise + 5% gross outliers (30-300 px): ours `method="ransac"` on all frames vs aniposelib
   `triangulate_ransac` (an exhaustive search over camera subsets in Python, very slow) on the first
   RANSAC_FRAMES frames: time per point, ratio, mean / median 3D error on the same subset.
3. Lens distortion: the same comparison as 1 on a strongly distorted 10-unit ring (noise-free), where
   aniposelib relies on OpenCV's iterative `undistortPoints`.

Prints a table and writes bench/results/triangulation.json. Timings are wall-clock on this machine; nothing
here is asserted.
"""
from __future__ import annotations
import argparse, json, os, platform, sys, time, warnings
from pathlib import Path
import numpy as np

from deeperfly_nb.cameras import CameraGroup, ring_camera
from deeperfly_nb.core import atomic_path
from deeperfly_nb.triangulation import triangulate

NAMES, AZIMS = "rh rm rf f lf lm lh".split(), [-120, -90, -45, 0, 45, 90, 120]


def default_rig(**kw) -> CameraGroup:
    kw = {"focal_px": 22388, "image_size": (480, 960), **kw}
    return CameraGroup([ring_camera(n, az, **kw) for n, az in zip(NAMES, AZIMS)])


def aniposelib_group(rig: CameraGroup):
    from aniposelib.cameras import Camera as ACam, CameraGroup as ACG
    return ACG([ACam(matrix=c.K, dist=c.dist, rvec=c.rvec, tvec=c.tvec, name=c.name,
                     size=(c.image_size[1], c.image_size[0]) if c.image_size else None) for c in rig])


def observe(rig, X, noise_px, outlier_frac, rng):
    "Detections (V, T, N, 2) with Gaussian noise and a fraction of gross outliers 30-300 px off."
    uv = rig.project(X)
    uv = uv + rng.normal(scale=noise_px, size=uv.shape) if noise_px else uv
    out = rng.random(uv.shape[:-1]) < outlier_frac
    ang, r = rng.uniform(0, 2 * np.pi, out.sum()), rng.uniform(30, 300, out.sum())
    uv[out] += np.stack([r * np.cos(ang), r * np.sin(ang)], -1)
    return uv


def timed(f, repeats=1):
    "(result, best wall time in seconds) over `repeats` calls."
    best, res = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        res = f()
        best = min(best, time.perf_counter() - t)
    return res, best


def err_stats(X, X_true) -> dict:
    e = np.linalg.norm(np.asarray(X).reshape(-1, 3) - X_true.reshape(-1, 3), axis=-1)
    return {"mean": float(np.nanmean(e)), "median": float(np.nanmedian(e)), "max": float(np.nanmax(e)),
            "nan_frac": float(np.isnan(e).mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10000, help="frames for the DLT and our RANSAC (x 38 points)")
    ap.add_argument("--ransac-frames", type=int, default=20, help="frames for aniposelib's slow RANSAC (~70 ms per point)")
    ap.add_argument("--points", type=int, default=38)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "triangulation.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(args.seed)
    T, N = args.frames, args.points
    rig = default_rig()
    acg = aniposelib_group(rig)
    X_true = rng.normal(scale=0.7, size=(T, N, 3))
    V = len(rig)
    res = {"config": {"frames": T, "points": N, "views": V, "ransac_frames": min(args.ransac_frames, T),
                      "repeats": args.repeats, "seed": args.seed},
           "env": {"python": sys.version.split()[0], "numpy": np.__version__, "machine": platform.machine(),
                   "cpus": os.cpu_count()}}
    try:
        import aniposelib; res["env"]["aniposelib"] = getattr(aniposelib, "__version__", "?")
    except Exception: pass
    rows = []

    # warm-up (aniposelib's JAX compiles its triangulation on first use)
    warm = rig.project(X_true[:10])
    acg.triangulate(warm.reshape(V, -1, 2), undistort=True)
    triangulate(rig, warm)

    # 1. DLT
    clean = rig.project(X_true)
    ours, t_ours = timed(lambda: triangulate(rig, clean), args.repeats)
    theirs, t_theirs = timed(lambda: acg.triangulate(clean.reshape(V, -1, 2), undistort=True), args.repeats)
    diff = float(np.nanmax(np.abs(ours.reshape(-1, 3) - theirs)))
    noisy = observe(rig, X_true, 1.0, 0.0, rng)
    ours_n = triangulate(rig, noisy)
    theirs_n = acg.triangulate(noisy.reshape(V, -1, 2), undistort=True)
    res["dlt"] = {"ours_s": t_ours, "aniposelib_s": t_theirs, "speedup": t_theirs / t_ours,
                  "ours_us_per_point": 1e6 * t_ours / (T * N), "aniposelib_us_per_point": 1e6 * t_theirs / (T * N),
                  "max_abs_diff_noise_free": diff,
                  "ours_vs_truth_noise_free": err_stats(ours, X_true)["max"],
                  "noisy_1px_ours": err_stats(ours_n, X_true), "noisy_1px_aniposelib": err_stats(theirs_n, X_true)}
    d = res["dlt"]
    rows += [("DLT time, %d pts" % (T * N), f"{t_ours:.3f} s", f"{t_theirs:.3f} s", f"{d['speedup']:.1f}x faster"),
             ("DLT max |ours - aniposelib|, noise-free", f"{diff:.2e}", "", "target <= 1e-6"),
             ("DLT max error vs truth, noise-free", f"{d['ours_vs_truth_noise_free']:.2e}",
              f"{err_stats(theirs, X_true)['max']:.2e}", ""),
             ("DLT 3D error mean / median, 1 px noise",
              f"{d['noisy_1px_ours']['mean']:.5f} / {d['noisy_1px_ours']['median']:.5f}",
              f"{d['noisy_1px_aniposelib']['mean']:.5f} / {d['noisy_1px_aniposelib']['median']:.5f}", "")]

    # 2. RANSAC under 5% outliers
    obs = observe(rig, X_true, 1.0, 0.05, rng)
    ours_r, t_ours_r = timed(lambda: triangulate(rig, obs, method="ransac"), args.repeats)
    ours_d = triangulate(rig, obs)
    ours_g, t_ours_g = timed(lambda: triangulate(rig, obs, method="greedy"), args.repeats)
    R = min(args.ransac_frames, T)
    sub = obs[:, :R].reshape(V, -1, 2)
    (theirs_r, *_), t_theirs_r = timed(lambda: acg.triangulate_ransac(sub, undistort=True, min_cams=2), 1)
    n_sub = R * N
    us_ours, us_theirs = 1e6 * t_ours_r / (T * N), 1e6 * t_theirs_r / n_sub
    res["ransac"] = {"ours_s": t_ours_r, "ours_points": T * N, "aniposelib_s": t_theirs_r, "aniposelib_points": n_sub,
                     "ours_us_per_point": us_ours, "aniposelib_us_per_point": us_theirs,
                     "speedup_per_point": us_theirs / us_ours,
                     "greedy_s": t_ours_g, "greedy_us_per_point": 1e6 * t_ours_g / (T * N),
                     "outliers_5pct_all_frames": {"ours_dlt": err_stats(ours_d, X_true), "ours_ransac": err_stats(ours_r, X_true),
                                                  "ours_greedy": err_stats(ours_g, X_true)},
                     "outliers_5pct_subset": {"ours_dlt": err_stats(ours_d[:R], X_true[:R]),
                                              "ours_ransac": err_stats(ours_r[:R], X_true[:R]),
                                              "aniposelib_ransac": err_stats(theirs_r, X_true[:R]),
                                              "aniposelib_dlt": err_stats(acg.triangulate(sub, undistort=True), X_true[:R])}}
    r, s = res["ransac"], res["ransac"]["outliers_5pct_subset"]
    rows += [("RANSAC time per point (us)", f"{us_ours:.2f}", f"{us_theirs:.0f}", f"{r['speedup_per_point']:.0f}x faster"),
             ("greedy time per point (us)", f"{r['greedy_us_per_point']:.2f}", "", ""),
             (f"RANSAC 3D error mean / median, 5% outliers ({R} frames)",
              f"{s['ours_ransac']['mean']:.5f} / {s['ours_ransac']['median']:.5f}",
              f"{s['aniposelib_ransac']['mean']:.5f} / {s['aniposelib_ransac']['median']:.5f}", ""),
             (f"DLT 3D error mean / median, 5% outliers ({R} frames)",
              f"{s['ours_dlt']['mean']:.5f} / {s['ours_dlt']['median']:.5f}",
              f"{s['aniposelib_dlt']['mean']:.5f} / {s['aniposelib_dlt']['median']:.5f}",
              f"RANSAC/DLT mean: {s['ours_dlt']['mean'] / s['ours_ransac']['mean']:.1f}x better")]

    # 3. strong lens distortion (noise-free)
    drig = default_rig(distance=10, focal_px=1500, dist=[-0.3, 0.12, 0.002, -0.001, -0.02])
    dacg = aniposelib_group(drig)
    TD = min(T, 1000)
    dpts = drig.project(X_true[:TD])
    ours_dd = triangulate(drig, dpts)
    theirs_dd = dacg.triangulate(dpts.reshape(V, -1, 2), undistort=True)
    res["distortion"] = {"frames": TD, "ours_max_err": err_stats(ours_dd, X_true[:TD])["max"],
                         "aniposelib_max_err": err_stats(theirs_dd, X_true[:TD])["max"]}
    rows.append((f"distorted rig, max error vs truth, noise-free ({TD} frames)",
                 f"{res['distortion']['ours_max_err']:.2e}", f"{res['distortion']['aniposelib_max_err']:.2e}", ""))

    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'deeperfly':>22}  {'aniposelib':>22}  note")
    for a, b, c, n in rows: print(f"{a:<{w}}  {b:>22}  {c:>22}  {n}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp: tmp.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
