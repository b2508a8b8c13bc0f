"Property tests of deeperfly_nb.triangulation on random rigs (hypothesis drives the seeds and sizes)."
import warnings
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from deeperfly_nb.cameras import CameraGroup, look_at
from deeperfly_nb.core import InputError
from deeperfly_nb.triangulation import triangulate, reprojection_error

METHODS = ("dlt", "ransac", "greedy")


def random_rig(rng, n_views, distort=False):
    "Cameras on a sphere around the origin (pairwise >= 15 deg apart), random focal lengths and optional distortion."
    dist = rng.uniform(5, 200)
    dirs = []
    while len(dirs) < n_views:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        if abs(d[2]) < 0.9 and all(np.degrees(np.arccos(np.clip(d @ e, -1, 1))) > 15 for e in dirs): dirs.append(d)
    cams = []
    for i, d in enumerate(dirs):
        k = [rng.uniform(-0.2, 0.1), rng.uniform(-0.05, 0.05), rng.uniform(-1e-3, 1e-3), rng.uniform(-1e-3, 1e-3), 0.0] if distort else None
        cams.append(look_at(f"c{i}", d * dist * rng.uniform(0.7, 1.3), target=rng.normal(scale=0.02 * dist, size=3),
                            focal_px=rng.uniform(500, 5000), image_size=(480, 640), dist=k))
    return CameraGroup(cams), dist


def random_points(rng, rig, scene, shape):
    return rng.normal(scale=0.05 * scene, size=(*shape, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_views=st.integers(2, 8), distort=st.booleans(), method=st.sampled_from(METHODS))
def test_noise_free_is_exact(seed, n_views, distort, method):
    rng = np.random.default_rng(seed)
    rig, scene = random_rig(rng, n_views, distort)
    X = random_points(rng, rig, scene, (5, 7))
    pts = rig.project(X)
    got = triangulate(rig, pts, method=method)
    np.testing.assert_allclose(got, X, atol=1e-6 * scene, rtol=0)
    np.testing.assert_allclose(reprojection_error(rig, got, pts), 0, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_views=st.integers(3, 7))
def test_view_order_does_not_matter(seed, n_views):
    rng = np.random.default_rng(seed)
    rig, scene = random_rig(rng, n_views)
    X = random_points(rng, rig, scene, (4, 6))
    pts = rig.project(X) + rng.normal(size=(n_views, 4, 6, 2))
    perm = rng.permutation(n_views)
    for method in METHODS:
        a = triangulate(rig, pts, method=method)
        b = triangulate(rig.subset([rig.names[i] for i in perm]), pts[perm], method=method)
        np.testing.assert_allclose(a, b, atol=1e-9 * scene, rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_views=st.integers(2, 7), frac=st.floats(0, 1), min_views=st.integers(2, 4),
       method=st.sampled_from(METHODS))
def test_nan_exactly_where_too_few_views(seed, n_views, frac, min_views, method):
    rng = np.random.default_rng(seed)
    rig, scene = random_rig(rng, n_views)
    X = random_points(rng, rig, scene, (6, 5))
    pts = rig.project(X)
    hide = rng.random(pts.shape[:-1]) < frac
    pts[hide] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, used = triangulate(rig, pts, method=method, min_views=min_views, return_inliers=True)
    seen = (~hide).sum(0)
    assert np.array_equal(np.isnan(got).all(-1), seen < min_views)
    assert not np.isnan(got[seen >= min_views]).any()
    np.testing.assert_allclose(got[seen >= min_views], X[seen >= min_views], atol=1e-6 * scene, rtol=0)
    assert np.array_equal(used, ~hide & (seen >= min_views))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_views=st.integers(4, 8))
def test_ransac_drops_exactly_the_outliers(seed, n_views):
    rng = np.random.default_rng(seed)
    rig, scene = random_rig(rng, n_views)
    X = random_points(rng, rig, scene, (3, 10))
    pts = rig.project(X) + rng.normal(scale=0.3, size=(n_views, 3, 10, 2))
    out = np.zeros(pts.shape[:-1], bool)
    out[rng.integers(n_views, size=(3, 10)), np.arange(3)[:, None], np.arange(10)] = True   # one outlier per point
    ang = rng.uniform(0, 2 * np.pi, out.sum())
    pts[out] += 200 * np.stack([np.cos(ang), np.sin(ang)], -1)
    got, used = triangulate(rig, pts, method="ransac", return_inliers=True)
    assert np.array_equal(used, ~out)
    assert np.all(reprojection_error(rig, got, pts)[~out] < 5)


def test_shape_errors_name_pts2d_and_rig():
    rng = np.random.default_rng(0)
    rig, _ = random_rig(rng, 3)
    with pytest.raises(InputError, match=r"pts2d has 4 views \(axis 0\) but the rig has 3 cameras"):
        triangulate(rig, np.zeros((4, 2, 5, 2)))
    with pytest.raises(InputError, match="pts2d must have shape"):
        triangulate(rig, np.zeros((3, 2, 5, 3)))
    with pytest.raises(InputError, match="conf must have shape"):
        triangulate(rig, np.zeros((3, 2, 5, 2)), np.ones((3, 5)))
    assert triangulate(rig, np.zeros((3, 0, 5, 2))).shape == (0, 5, 3)
