"""Bundle adjustment keeps the fly in one piece on real detections (issue 19, stop 44's split, end to end).

tests/data/sample_2d_renders_only.npz holds the 2D (pts2d (7, 15, 38, 2), conf (7, 15, 38), float32, NaN where no
pathway writes) that the fly_neuromechfly recipe's renders-only model (step 2 with the default settings, before the
self-training rounds) detected on DeepFly3D's real sample. From the packaged rig, bundle adjustment once scaled the
left cameras' block by bilateral symmetry (0.84, inside the 0.5-2 bound) and carried the left half of the fly many
body sizes away along those cameras' rays: a body spread of 12 median bone lengths where a fly spans about 3.
`bundle_adjustment.keeps_together` refuses such a scale. This test runs the whole 2D -> 3D path as `deeperfly
reconstruct` does (packaged config: bundle adjustment, triangulation, refinement) and needs nothing from ../shared."""
from pathlib import Path
import numpy as np

from deeperfly_nb.config import Config
from deeperfly_nb.pipeline import run_from_points2d

DATA = Path(__file__).parent / "data" / "sample_2d_renders_only.npz"


def test_real_detections_keep_the_halves_together():
    d = np.load(DATA)
    pts2d, conf = d["pts2d"].astype(float), d["conf"].astype(float)
    cfg = Config.default()
    sk = cfg.skeleton()
    tri = cfg.triangulate_kwargs()
    method, weigh = tri.pop("method"), tri.pop("weigh_by_confidence")
    res = run_from_points2d(cfg.camera_group(image_sizes=(480, 960)), sk, pts2d, conf, bundle_adjust_kwargs=cfg.bundle_adjust_kwargs(sk),
                            triangulation=method, weigh_by_confidence=weigh, triangulate_kwargs=tri)
    X = res.pts3d
    side = np.array([n[0] for n in sk.point_names])                 # 'l', 'r' (legs, antennae, stripes)
    half = {s: np.nanmedian(X[:, side == s].reshape(-1, 3), 0) for s in "lr"}
    right = X[:, side == "r"]
    radius = np.nanmedian(np.linalg.norm(right - np.nanmedian(right, 1, keepdims=True), axis=-1))   # the right half's own size
    apart = float(np.linalg.norm(half["l"] - half["r"]) / radius)
    spread = res.summary()["spread_in_bones"]
    print(f"halves' centres {apart:.2f} half-radii apart; body spread {spread:.2f} bone lengths")
    assert apart < 3, apart                                         # a fly's halves: about one half-radius apart
    assert spread < 5, spread
