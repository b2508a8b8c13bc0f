"""Issue 19 (CPU): per-joint offsets that bring the recorded NeuroMechFly walk's leg posture to a real fly's.

    OMP_NUM_THREADS=1 python bench/fit_posture.py RESULTS_H5 --out posture.json

The shipped walk holds its legs further forward and back, and less far down, than the flies of the DeepFly3D rig.
This reads the 3D of an unlabelled real recording (a `PoseResult` file with fly38 points, e.g. the example recording
run by a self-trained model), puts every frame in the body frame (origin between the front and hind body-coxa points,
x forward, y to the left, z up, lengths in front-to-hind coxa spans), and fits one offset per joint of the walk
(radians, at most 0.8, ridge 0.3) so that the median leg points of 40 of its frames match the recording's median
leg points. Prints the fit, and the distance to DeepFly3D's 3D of the sample before and after (when
../shared/data is there; a check only, never fitted to). `bench_mujoco_finetune.py --posture posture.json` renders with it.
Nothing here is asserted.
"""
from __future__ import annotations
import argparse, json, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DF3D_PKL = (ROOT.parent / "shared" / "data" / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl").resolve()
JOINTS = ("coxa_femur", "femur_tibia", "tibia_tarsus", "claw")


def body_frame(pts3d, sk):
    "(T, N, 3) fly38 points in the body frame, in front-to-hind coxa spans; z points away from the claws (a mirrored frame is undone)."
    import numpy as np
    at = lambda n: pts3d[:, sk.point_names.index(n)]
    front, hind = (at("lf_body_coxa") + at("rf_body_coxa")) / 2, (at("lh_body_coxa") + at("rh_body_coxa")) / 2
    x = front - hind; span = np.linalg.norm(x, axis=-1, keepdims=True); x = x / span
    y = at("lm_body_coxa") - at("rm_body_coxa"); y = y - (y * x).sum(-1, keepdims=True) * x; y /= np.linalg.norm(y, axis=-1, keepdims=True)
    P = np.einsum("tij,tnj->tni", np.stack([x, y, np.cross(x, y)], -2), pts3d - ((front + hind) / 2)[:, None]) / span[:, None]
    claws = [sk.point_names.index(f"{s}{l}_claw") for s in "lr" for l in "fmh"]
    return P * [1, 1, -1] if np.nanmedian(P[:, claws, 2]) > 0 else P          # claws hang below the body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a PoseResult .h5 of a real recording (fly38)")
    ap.add_argument("--out", default="posture.json")
    ap.add_argument("--ridge", type=float, default=0.3, help="weight of the offsets' size against the misfit")
    args = ap.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import numpy as np
    from scipy.optimize import least_squares
    from deeperfly_nb.results import PoseResult
    from deeperfly_nb.skeleton import Skeleton
    from deeperfly_nb import synth_mujoco as sm
    sk = Skeleton.fly38()
    legs = [sk.point_names.index(f"{s}{l}_{j}") for s in "lr" for l in "fmh" for j in JOINTS]
    target = np.nanmedian(body_frame(PoseResult.load(args.results).pts3d, sk)[:, legs], 0)      # (24, 3)
    fly, ja = sm.build_fly(sm.MjLook(), 0), sm.load_joint_angles()
    qadr, A = fly.check_names(ja.names, ja.source), ja.angles[np.linspace(0, len(ja.angles) - 1, 40).astype(int)]
    def posture(offset):
        P = []
        for a in A: fly.pose(qadr, a + offset); P.append(fly.label_points_mm())
        return np.median(body_frame(np.array(P), sk)[:, legs], 0)
    def residual(offset): return np.concatenate([(posture(offset) - target).ravel(), args.ridge * offset])
    fit = least_squares(residual, np.zeros(len(ja.names)), bounds=(-0.8, 0.8), diff_step=1e-2, max_nfev=30)
    rms = lambda P, Q: round(float(np.sqrt(((P - Q) ** 2).sum(-1).mean())), 3)
    before, after = posture(np.zeros_like(fit.x)), posture(fit.x)                               # (24, 3) each, computed once
    out = {"what": "per-joint offsets (radians) added to the shipped NeuroMechFly walk: bench/fit_posture.py", "fitted_to": str(args.results),
           "rms_to_fitted_coxa_spans": [rms(before, target), rms(after, target)]}
    print(f"leg points' rms distance to {args.results}'s median posture: {out['rms_to_fitted_coxa_spans']} coxa spans (before, after)")
    if DF3D_PKL.exists():
        from deeperfly_nb.df3d import read_df3d_result
        check = np.nanmedian(body_frame(read_df3d_result(DF3D_PKL).pts3d, sk)[:, legs], 0)
        out["rms_to_deepfly3d_sample_coxa_spans"] = [rms(before, check), rms(after, check)]
        print(f"and to DeepFly3D's sample (not fitted to): {out['rms_to_deepfly3d_sample_coxa_spans']}")
    for n, d in zip(ja.names, fit.x):
        if abs(d) > 0.05: print(f"  {n:22s} {np.rad2deg(d):+6.1f} deg")
    out.update(names=list(ja.names), offset_rad=[float(d) for d in fit.x])
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__": sys.exit(main())
