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
3. A library from deeperfly's own result: the bundled example's detections (examples/data/points2d.h5,
   nominal rig), bundle-adjusted and triangulated (RANSAC) into a `PoseResult`, through `library_from_results`
   (3D in the adjusted rig's rm camera frame, 2D re-projected; its 64 frames tiled to the synthetic library's size,
   so both get the same number of steps), vs the synthetic-only library of 1, vs both;
   tested on a held-out recording made like the example (walking_fly defaults, seed 1000) filmed by the
   example's true rm camera (examples/data/ground_truth.h5).
4. Speed: lifting 100,000 poses on the CPU with the lifters of 1 (wall and process seconds, best of 3; 1 run above width 256);
   training wall and process time of 1.

Writes bench/results/lifting.json. Nothing is asserted; the machine is shared, so the load is recorded.
"""
from __future__ import annotations
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

from deeperfly_nb.core import atomic_path
from deeperfly_nb.skeleton import fly38
from deeperfly_nb.synth import walking_fly, default_rig
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
    if 3 in parts: part3(res, lib, epochs, w2, tmp, save)
    if 4 in parts: part4(res, widths, lib2_cam, tmp, save, lib)
    print(f"wrote {out}")


def part3(res, lib, epochs, w2, tmp, save):
    ex = ROOT / "examples" / "data"
    det, truth = PoseResult.load(ex / "points2d.h5"), PoseResult.load(ex / "ground_truth.h5")
    rig, ba = bundle_adjust_cameras(det.cameras, det.pts2d, det.conf, skeleton=FLY)
    own = PoseResult(det.pts2d, det.conf, rig, FLY, pts3d=triangulate(rig, det.pts2d, det.conf, method="ransac"), fps=det.fps)
    own2, own3 = library_from_results([own], camera="rm")
    test_cam = truth.cameras["rm"]
    Xh = walking_fly(200, seed=1000)
    H2, H3 = test_cam.project(Xh), in_cam(test_cam, Xh)
    synth2 = {k: CAM.project(v) for k, v in lib.items()}
    synth3 = {k: in_cam(CAM, v) for k, v in lib.items()}
    res["own_library"] = {"width": w2, "library": f"{len(lib)} recordings", "ba_median_reproj_px": float(ba.median_reproj_after), "own_frames": int(sum(len(v) for v in own3.values())),
                          "test": "walking_fly(200, seed=1000) through the example's true rm camera"}
    leg_h = leg_length(Xh)
    reps = max(1, sum(len(v) for v in synth3.values()) // sum(len(v) for v in own3.values()))
    own2x, own3x = ({k: np.concatenate([v] * reps) for k, v in d.items()} for d in (own2, own3))   # as many steps per epoch
    res["own_library"]["own_tiled"] = reps
    for name, (l2, l3) in {"synthetic_only": (synth2, synth3), "own_result": (own2x, own3x),
                           "both": ({**synth2, **{f"own{k}": v for k, v in own2.items()}}, {**synth3, **{f"own{k}": v for k, v in own3.items()}})}.items():
        lf, t = timed_train(l2, None, l3, None, ROOTS, TARGETS, training_kwargs={"epochs": epochs, "linear_size": w2},
                            output_folder=tmp / f"own_{name}", skeleton=FLY)
        r = evaluate(lf, H2, H3, leg_h)["lifter"]; r["train"] = t
        res["own_library"][name] = r
        print(f"[3] {name}: {r['euclid']:.4f} ({r['euclid_leg_frac']:.2%} leg)", flush=True)
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
