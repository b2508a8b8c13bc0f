"""Benchmark deeperfly's lifter (LiftPose3D's workflow) on the measurements of issue 13.

    python bench/bench_lifting.py [--widths 256] [--width2 128] [--epochs 6] [--parts 1,2,3,4] [--threads 2] [--quick]

1. Synthetic-to-real: a lifter trained only on synthetic walking flies (`synth.walking_fly`, 40 recordings x
   200 frames with varied duty factor and stride frequency; bone lengths perturbed by +-20% per pose) seen by
   the default rig's right-middle camera, tested on DeepFly3D's real 3D (`df3d_result.pkl`,
   `points3d_wo_procrustes`, 15 frames) seen by the same camera. DeepFly3D's frame is mirrored relative to
   deeperfly's and its calibration has an arbitrary scale, so the real poses are first placed on the synthetic
   fly by a similarity (reflection allowed) of the body points (coxae, antennae, stripes) of the mean poses.
   Errors (root-relative, roots from the truth): mean Euclidean per joint in world units (~mm) and as a
   fraction of the real fly's mean leg length, and LiftPose3D's mean absolute coordinate difference; against
   the mean pose and the nearest neighbour (in normalised 2D) of the same library, in the same run.
   Library: 40 recordings x 200 frames for 1 and 4; 20 x 200 (width --width2) for 2 and 3, to fit a shared machine.
2. Unknown camera: two lifters trained on the same library through the same camera, one with
   `project_to_cam` and one with `random_project` (Euler ranges z +-20, y +-10, x +-10 deg); tested on five
   held-out synthetic recordings through the training camera and through it turned 10 deg about the vertical.
3. A library from deeperfly's own result of the bundled example vs the generic synthetic library of 1 (its recipe:
   varied gaits, bone lengths +-20%, the nominal rm camera; 20 x 200 frames). Test: five held-out recordings of the
   example's family (`walking_fly` with the example's gait settings, seeds 1000-1004, 200 frames each) seen by the
   example's true rm camera (examples/data/ground_truth.h5), as exact 2D and as detections (the example's noise:
   1 px, 2% gross outliers, 10% occluded). Own libraries: deeperfly's `results.h5` of `deeperfly run examples/data`
   (64 frames; --own-result, default: run it here) and its mirror images (`mirror_poses`), seen by its calibrated rm
   camera; the same without mirror images; the same from examples/data/points2d.h5 (as `deeperfly reconstruct`); the
   example's exact 3D (a ceiling: what 64 frames can give); and an archive of five more recordings of the example's
   rig and gait (seeds 3000-3004, observed like the example and reconstructed by bundle adjustment + RANSAC).
   Every own library is tiled to the synthetic library's size, so all get the same optimisation steps (--epochs3).
   The design and the mirror images were chosen on validation recordings (seeds 2000-2001), not on the test seeds.
4. Speed: lifting 100,000 poses on the CPU with the lifters of 1 (wall and process seconds, best of 3; 1 run above width 256);
   training wall and process time of 1.

Writes bench/results/lifting.json. Nothing is asserted; the machine is shared, so the load is recorded.
"""
from __future__ import annotations
import argparse, json, os, platform, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

from deeperfly_nb.core import atomic_path
from deeperfly_nb.skeleton import fly38
from deeperfly_nb.synth import walking_fly, default_rig, observe, default_visibility
from deeperfly_nb.results import PoseResult, align_similarity
from deeperfly_nb.df3d import read_df3d_result
from deeperfly_nb.triangulation import triangulate
from deeperfly_nb.bundle_adjustment import bundle_adjust_cameras
from deeperfly_nb.lifting import (fly_roots, train, lift, lift_errors, fit_stats, project_to_cam, random_project,
                                  perturb_pose, mean_pose_baseline, nearest_neighbour_baseline, library_from_results)

ROOT = Path(__file__).resolve().parents[1]
DF3D = ROOT / ".." / "shared" / "data" / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl"
FLY = fly38()
ROOTS, TARGETS = fly_roots(FLY)
CAM = default_rig()["rm"]


def in_cam(cam, X): return X @ cam.rmat.T + cam.tvec


def turned(cam, deg):
    "The camera turned by `deg` about the vertical through the origin (the fly)."
    from scipy.spatial.transform import Rotation
    Rz = Rotation.from_euler("z", deg, degrees=True).as_matrix()
    return cam.replace(rmat=cam.rmat @ Rz.T)


def synthetic_library(n_rec, n_frames, seed=0):
    rng = np.random.default_rng(seed)
    return {f"s{s}": walking_fly(n_frames, seed=s, duty=rng.uniform(0.5, 0.7), stride_hz=rng.uniform(4, 12)) for s in range(n_rec)}


def leg_length(X):
    legs = [[r, *t] for r, t in zip(ROOTS, TARGETS)]
    return float(np.mean([np.linalg.norm(np.diff(X[:, l], axis=1), axis=-1).sum(1).mean() for l in legs]))


def real_poses(lib):
    "DeepFly3D's 3D, placed on the synthetic fly (similarity of the body points, reflection allowed)."
    X = read_df3d_result(DF3D).pts3d_wo_procrustes
    S = np.concatenate(list(lib.values()))
    body = [i for i, n in enumerate(FLY.point_names) if "body_coxa" in n or "antenna" in n or "stripe" in n]
    _, s, R, t = align_similarity(X.mean(0)[body], S.mean(0)[body], allow_reflection=True)
    return s * X @ R.T + t, {"scale": s, "reflection": bool(np.linalg.det(R) < 0)}


def errors(gt, pred, leg):
    e = lift_errors(gt, pred, ROOTS, TARGETS)
    return {"euclid": e["euclid"], "abs": e["abs"], "euclid_leg_frac": e["euclid"] / leg, "abs_leg_frac": e["abs"] / leg}


def evaluate(lifter, P2, P3, leg, lib2=None, lib3=None):
    "Lifter and baselines on (P2, P3): roots from the truth."
    rts = P3[:, list(ROOTS)]
    out = {"lifter": errors(P3, lift(lifter, P2, roots_3d=rts), leg),
           "mean_pose": errors(P3, mean_pose_baseline(lifter.stats, len(P3), rts), leg)}
    if lib2 is not None: out["nearest_neighbour"] = errors(P3, nearest_neighbour_baseline(lifter.stats, lib2, lib3, P2, rts), leg)
    return out


def timed_train(*args, **kw):
    w, c = time.perf_counter(), time.process_time()
    lf = train(*args, **kw)
    return lf, {"wall_s": time.perf_counter() - w, "process_s": time.process_time() - c}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="256", help="network widths for 1 and 4")
    ap.add_argument("--width2", type=int, default=128, help="network width for 2 and 3")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs3", type=int, default=20, help="epochs of every lifter of 3 (their libraries are small)")
    ap.add_argument("--own-result", default="run", help="3: deeperfly's results.h5 of the bundled example, or 'run' (default): run "
                                         "`deeperfly run examples/data` into a temporary folder first")
    ap.add_argument("--quick", action="store_true", help="small library and 2 epochs (a smoke run; writes to a temporary file)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    widths = [int(w) for w in a.widths.split(",")]
    n_rec, n_frames, epochs = (8, 100, 2) if a.quick else (40, 200, a.epochs)
    parts = {int(p) for p in a.parts.split(",")}
    out = ROOT / "bench" / "results" / "lifting.json" if not a.quick else Path(tempfile.mkdtemp()) / "lifting_quick.json"
    out.parent.mkdir(exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() and not a.quick else {}
    def save():
        res["settings"]["load_after"] = os.getloadavg()
        for part, key in ((1, "real"), (2, "random_project"), (3, "own_library"), (4, "speed")):
            if part in parts and key in res: res[key]["run"] = res["settings"]
        with atomic_path(out) as tmpf: tmpf.write_text(json.dumps(res, indent=1))
    res["settings"] = {"widths": widths, "width2": a.width2, "epochs": epochs, "parts_last_run": sorted(parts), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": a.threads, "library": f"{n_rec} x {n_frames} frames",
                        "perturb_pose_frac": 0.2, "camera": "default_rig rm", "torch": torch.__version__,
                        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                        "load_before": os.getloadavg()}
    tmp = Path(tempfile.mkdtemp())
    lib = synthetic_library(n_rec, n_frames)
    aug = [perturb_pose(FLY, 0.2), project_to_cam(CAM)]
    lib2_cam = np.concatenate([CAM.project(v) for v in lib.values()])
    lib3_cam = np.concatenate([in_cam(CAM, v) for v in lib.values()])

    # 1. synthetic -> real
    if 1 in parts and DF3D.exists():
        Xr, align = real_poses(lib)
        leg = leg_length(Xr)
        P2, P3 = CAM.project(Xr), in_cam(CAM, Xr)
        res["real"] = {"alignment": align, "leg_length": leg, "n_frames": len(Xr), "by_width": res.get("real", {}).get("by_width", {})}
        for w in widths:
            lf, t = timed_train(None, P2, lib, P3, ROOTS, TARGETS, training_kwargs={"epochs": epochs, "linear_size": w},
                                aug=aug, output_folder=tmp / f"real_{w}", skeleton=FLY)
            r = evaluate(lf, P2, P3, leg, lib2_cam, lib3_cam)
            r["train"] = t
            res["real"]["by_width"][str(w)] = r
            print(f"[1] width {w}: lifter {r['lifter']['euclid']:.3f} ({r['lifter']['euclid_leg_frac']:.1%} leg, abs {r['lifter']['abs']:.3f}) "
                  f"mean pose {r['mean_pose']['euclid']:.3f} NN {r['nearest_neighbour']['euclid']:.3f}; train {t['wall_s']:.0f} s wall", flush=True)
        save()
    elif 1 in parts:
        print(f"[1] skipped: {DF3D} is absent")
    lib = dict(list(lib.items())[: max(1, n_rec // 2)])          # the smaller library of 2 and 3

    # 2. random_project vs project_to_cam, test camera turned 10 deg
    w2 = a.width2
    held = np.concatenate([walking_fly(n_frames, seed=500 + s) for s in range(5)])
    leg_s = leg_length(held)
    cams = {"0deg": CAM, "10deg": turned(CAM, 10.0)}
    rp = random_project(CAM, ((-20, 20), (-10, 10), (-10, 10)), "zyx")
    if 2 in parts: res["random_project"] = {"width": w2, "library": f"{len(lib)} x {n_frames} frames", "eangles_deg": [[-20, 20], [-10, 10], [-10, 10]], "leg_length": leg_s}
    for name, proj in ((("project_to_cam", project_to_cam(CAM)), ("random_project", rp)) if 2 in parts else ()):
        lf, t = timed_train(None, None, lib, None, ROOTS, TARGETS, training_kwargs={"epochs": epochs, "linear_size": w2},
                            aug=[perturb_pose(FLY, 0.2), proj], output_folder=tmp / f"rp_{name}", skeleton=FLY)
        r = {k: evaluate(lf, c.project(held), in_cam(c, held), leg_s)["lifter"] for k, c in cams.items()}
        r["growth"] = r["10deg"]["euclid"] / r["0deg"]["euclid"]
        r["train"] = t
        res["random_project"][name] = r
        print(f"[2] {name}: 0deg {r['0deg']['euclid']:.4f}, 10deg {r['10deg']['euclid']:.4f}, growth x{r['growth']:.2f}", flush=True)
        save()

    # 3. a library from deeperfly's own PoseResult of the bundled example
    if 3 in parts: part3(res, lib, 2 if a.quick else a.epochs3, w2, tmp, save, a.own_result)
    if 4 in parts: part4(res, widths, lib2_cam, tmp, save, lib)
    print(f"wrote {out}")


def example_family(seeds, n_frames, truth):
    "3D of new recordings made like the bundled example (its gait settings; other seeds): `walking_fly` as `render_recording` calls it."
    gait = {k: truth.meta[k] for k in ("fps", "stride_hz", "duty", "sway")}
    return {f"seed{s}": walking_fly(n_frames, seed=s, **gait) for s in seeds}


def reconstruct_like_example(X, seed, truth, nominal):
    "A PoseResult as deeperfly makes one from the example's rig: detections (the example's noise) -> bundle adjustment -> RANSAC."
    ob = observe(truth.cameras, X, visibility=default_visibility(truth.cameras.names, FLY), noise_px=1.0, outlier_frac=0.02,
                 occlusion_frac=0.1, seed=seed)
    rig, _ = bundle_adjust_cameras(nominal, ob.pts2d, ob.conf, skeleton=FLY)
    return PoseResult(ob.pts2d, ob.conf, rig, FLY, pts3d=triangulate(rig, ob.pts2d, ob.conf, method="ransac"), fps=truth.fps)


def own_library(results, mirror=True):
    "{name: 2D}, {name: 3D}: each result's 3D (and its mirror images) through its own calibrated rm camera."
    return library_from_results(results, camera="rm", mirror=mirror)


def tiled(d, n):
    "Each array repeated so the library has about `n` poses (as many optimisation steps as the synthetic library)."
    reps = max(1, n // sum(len(v) for v in d.values()))
    return {k: np.concatenate([v] * reps) for k, v in d.items()}


def part3(res, lib, epochs, w2, tmp, save, own_result=None):
    """The bundled example's own library vs the generic synthetic library of 1 (its recipe: varied gaits, bone lengths +-20%,
    the nominal rm camera), on held-out recordings of the example's family seen by the example's true rm camera."""
    ex = ROOT / "examples" / "data"
    det, truth = PoseResult.load(ex / "points2d.h5"), PoseResult.load(ex / "ground_truth.h5")
    how = "deeperfly run examples/data (bundled detector, bundle adjustment, triangulation)"
    if own_result in (None, "run"):                        # the main job, as the README runs it
        cli = "import sys; from deeperfly_nb.cli import main; sys.exit(main())"
        subprocess.run([sys.executable, "-c", cli, "run", str(ex), "-o", str(tmp / "example_run")], check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        own_result = tmp / "example_run" / "results.h5"
    else: how = f"{own_result}, given as the result of {how}"
    own = PoseResult.load(own_result)
    rig, _ = bundle_adjust_cameras(det.cameras, det.pts2d, det.conf, skeleton=FLY)
    own_p2d = PoseResult(det.pts2d, det.conf, rig, FLY, pts3d=triangulate(rig, det.pts2d, det.conf, method="ransac"), fps=det.fps)
    test_cam = truth.cameras["rm"]
    held = np.concatenate(list(example_family(range(1000, 1005), 200, truth).values()))
    ob = observe(truth.cameras, held, visibility=default_visibility(truth.cameras.names, FLY), noise_px=1.0, outlier_frac=0.02,
                 occlusion_frac=0.1, seed=1000)
    tests = {"exact_2d": test_cam.project(held), "detections": ob.pts2d[truth.view_names.index("rm")]}
    H3, leg_h = in_cam(test_cam, held), leg_length(held)
    archive = {k: reconstruct_like_example(X, 3000 + i, truth, det.cameras)
               for i, (k, X) in enumerate(example_family(range(3000, 3005), 200, truth).items())}
    ex_truth = PoseResult(truth.pts2d, truth.conf, truth.cameras, FLY, pts3d=truth.pts3d, fps=truth.fps)
    n = sum(len(v) for v in lib.values())
    libs = {"synthetic_only": (None, lib, [perturb_pose(FLY, 0.2), project_to_cam(CAM)]),
            "own_example": (*(tiled(d, n) for d in own_library({"example": own})), None),
            "own_example_no_mirror": (*(tiled(d, n) for d in own_library({"example": own}, mirror=False)), None),
            "own_example_from_points2d": (*(tiled(d, n) for d in own_library({"example": own_p2d})), None),
            "own_example_exact_3d": (*(tiled(d, n) for d in own_library({"example": ex_truth})), None),
            "own_archive_5x200": (*(tiled(d, n) for d in own_library(archive)), None)}
    r3 = res["own_library"] = {"width": w2, "epochs": epochs, "synthetic_library": f"{len(lib)} x {len(next(iter(lib.values())))} frames",
        "own_result": how, "own_frames": len(own.pts3d),
        "own_3d_error_cam_frame": lift_errors(in_cam(test_cam, truth.pts3d), in_cam(own.cameras["rm"], own.pts3d), ROOTS, TARGETS)["euclid"],
        "own_from_points2d": "examples/data/points2d.h5 bundle-adjusted from the nominal rig and triangulated (RANSAC), as deeperfly reconstruct does",
        "test": "walking_fly(200, seed=1000..1004, the example's gait) through the example's true rm camera: exact 2D, and detections "
                "(1 px noise, 2% outliers, 10% occluded, seed 1000)", "archive": "walking_fly(200, seed=3000..3004, the example's gait), "
                "observed like the example and reconstructed (bundle adjustment from the nominal rig, RANSAC)",
        "leg_length": leg_h}
    for name, (l2, l3, aug) in libs.items():
        lf, t = timed_train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={"epochs": epochs, "linear_size": w2},
                            aug=aug, output_folder=tmp / f"own_{name}", skeleton=FLY)
        r3[name] = {k: errors(H3, lift(lf, P2, roots_3d=H3[:, list(ROOTS)]), leg_h) for k, P2 in tests.items()}
        r3[name]["train"] = t
        print(f"[3] {name}: exact 2D {r3[name]['exact_2d']['euclid']:.4f} ({r3[name]['exact_2d']['euclid_leg_frac']:.2%} leg), "
              f"detections {r3[name]['detections']['euclid']:.4f}; train {t['wall_s']:.0f} s", flush=True)
        save()


def part4(res, widths, lib2_cam, tmp, save, lib):
    "Speed of lifting 100,000 poses with the lifters of part 1 (trained in this run)."
    from deeperfly_nb.lifting import load_lifter
    x = np.random.default_rng(0).normal(0, 1, (100_000, 38, 2)) * 40 + lib2_cam.mean(0)
    res.setdefault("speed", {})
    for w in widths:
        folder = tmp / f"real_{w}"
        if not folder.exists():     # part 1 not run: the speed does not depend on the weights, so one short epoch will do
            small = {"s": np.concatenate([v[:100] for v in list(lib.values())[:5]])}
            train({k: CAM.project(v) for k, v in small.items()}, None, {k: in_cam(CAM, v) for k, v in small.items()}, None,
                  ROOTS, TARGETS, training_kwargs={"epochs": 1, "linear_size": w}, output_folder=folder, skeleton=FLY)
        lf = load_lifter(folder); lift(lf, x[:1000])
        best = None
        for _ in range(3 if w <= 256 else 1):
            wt, ct = time.perf_counter(), time.process_time(); lift(lf, x); wt, ct = time.perf_counter() - wt, time.process_time() - ct
            best = (wt, ct) if best is None or wt < best[0] else best
        res["speed"][str(w)] = {"poses": len(x), "wall_s": best[0], "process_s": best[1], "load": os.getloadavg()[0]}
        print(f"[4] width {w}: 100,000 poses in {best[0]:.2f} s wall, {best[1]:.2f} s process", flush=True)
        save()


if __name__ == "__main__":
    main()
