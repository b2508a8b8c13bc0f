"""Issue 19 (CPU): the `synth_mujoco.LegPosture` that brings the recorded NeuroMechFly walk's leg posture to a real fly's.

    OMP_NUM_THREADS=1 python bench/fit_posture.py RESULTS_H5 --out posture.json

The shipped walk holds its legs further forward and back, and less far down, than the flies of the DeepFly3D rig.
This reads the 3D of an unlabelled real recording (a `PoseResult` file with fly38 points, e.g. the example recording
run by a detector), and fits one offset per joint of the walk with `synth_mujoco.fit_posture` (radians, at most 0.8,
ridge 0.3: the median leg points of 40 of its frames, in the fly's body frame, against the recording's). Prints the
misfit before and after, and the distance to DeepFly3D's 3D of the sample before and after (when ../shared/data is
there; a check only, never fitted to). Writes the posture with `save_posture`; `bench_mujoco_finetune.py --posture
posture.json` (or `render_fly(posture=...)`) renders with it. Nothing here is asserted.
"""
from __future__ import annotations
import argparse, json, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DF3D_PKL = (ROOT.parent / "shared" / "data" / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl").resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a PoseResult .h5 of a real recording (fly38)")
    ap.add_argument("--out", default="posture.json")
    ap.add_argument("--ridge", type=float, default=0.3, help="weight of the offsets' size against the misfit")
    args = ap.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import numpy as np
    from deeperfly_nb.core import InputError
    from deeperfly_nb.results import PoseResult
    from deeperfly_nb import synth_mujoco as sm
    try: fitted = sm.fit_posture(PoseResult.load(args.results).pts3d, ridge=args.ridge, source=str(args.results))
    except InputError as e: sys.exit(f"fit_posture.py: {e}")
    print(f"leg points' rms distance to {args.results}'s median posture: {np.round(fitted.misfit_spans, 3).tolist()} coxa spans (before, after)")
    if DF3D_PKL.exists():                                   # a check against another fly: how the fit moved the walk towards the sample's
        from deeperfly_nb.df3d import read_df3d_result
        check, fly, ja = sm.median_leg_posture(read_df3d_result(DF3D_PKL).pts3d), sm.build_fly(sm.MjLook(), 0), sm.load_joint_angles()
        qadr, A = fly.check_names(ja.names, ja.source), ja.angles[np.linspace(0, len(ja.angles) - 1, 40).astype(int)]
        rms = lambda offset: round(float(np.sqrt(((sm.walk_leg_posture(fly, qadr, A, offset) - check) ** 2).sum(-1).mean())), 3)
        print(f"and to DeepFly3D's sample (not fitted to): {[rms(0 * fitted.offset_rad), rms(fitted.offset_rad)]}")
    for n, d in zip(fitted.names, fitted.offset_rad):
        if abs(d) > 0.05: print(f"  {n:22s} {np.rad2deg(d):+6.1f} deg")
    sm.save_posture(fitted, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__": sys.exit(main())
