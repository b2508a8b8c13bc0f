"""Property tests of deeperfly_nb.cropzoom (hypothesis drives seeds, sizes and options): crop -> remap is the identity
to 1e-6 px for variable boxes in ratio and size modes, at frame edges and with padding; the crops OpenCV cuts agree
with `crop_matrices`; bbox CSVs read back bit for bit."""
import tempfile
from pathlib import Path
import numpy as np
from hypothesis import given, settings, strategies as st, HealthCheck

from deeperfly_nb.cropzoom import (CropOptions, CropBoxes, boxes_from_points, crop_frames, crop_matrices, to_crop, from_crop,
                                   write_bbox_csv, read_bbox_csv)

OUT_HWS = st.sampled_from([(64, 64), (128, 96), (96, 160), (256, 256), (33, 47)])
IMAGE_HWS = st.sampled_from([(480, 960), (480, 640), (1024, 1280), (37, 53)])
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_boxes(rng, n_views, n_frames, out_hw, image_hw):
    "Boxes of out_hw's aspect, sizes from 2 px to 4 frame widths, centres anywhere from half a frame outside to inside."
    H, W = image_hw
    H_in, W_in = out_hw
    short = np.exp(rng.uniform(np.log(2), np.log(4 * max(H, W)), (n_views, n_frames)))
    hw = np.stack([short * max(1, H_in / W_in), short * max(1, W_in / H_in)], -1)
    corner = rng.uniform([-0.5 * W, -0.5 * H], [1.5 * W, 1.5 * H], (n_views, n_frames, 2)) - hw[..., ::-1] / 2
    return CropBoxes(corner, hw, out_hw, np.zeros((n_views, n_frames), bool), image_hw)


def points_near(rng, boxes, n_points):
    "Points inside, on the edges of and well outside each box, some NaN."
    V, T = boxes.n_views, boxes.n_frames
    u = rng.uniform(-0.5, 1.5, (V, T, n_points, 2))
    u[..., :2, :] = rng.integers(0, 2, (V, T, 2, 2))                       # exact box corners
    p = boxes.corner_px[:, :, None] - 0.5 + u * boxes.hw_px[:, :, None, ::-1]
    p[rng.uniform(size=(V, T, n_points)) < 0.1] = np.nan
    return p


def assert_round_trip(p, boxes, atol=1e-6):
    back = from_crop(to_crop(p, boxes), boxes)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(p))
    np.testing.assert_allclose(back[np.isfinite(p)], p[np.isfinite(p)], atol=atol, rtol=0)


@settings(max_examples=100, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), out_hw=OUT_HWS, image_hw=IMAGE_HWS, V=st.integers(1, 4), T=st.integers(1, 12))
def test_round_trip_random_boxes(seed, out_hw, image_hw, V, T):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, V, T, out_hw, image_hw)
    p = points_near(rng, boxes, 7)
    assert_round_trip(p, boxes)
    M = crop_matrices(boxes)                                                # the matrices say the same as to_crop
    via_M = np.einsum("vtij,vtnj->vtni", M[..., :2], p) + M[:, :, None, :, 2]
    np.testing.assert_allclose(to_crop(p, boxes), via_M, atol=1e-6, equal_nan=True)


@settings(max_examples=60, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), out_hw=OUT_HWS, image_hw=IMAGE_HWS, size_mode=st.booleans(),
       smooth=st.sampled_from([1, 3, 5]), missing=st.sampled_from(["interpolate", "hold"]), T=st.integers(1, 20))
def test_round_trip_boxes_from_points(seed, out_hw, image_hw, size_mode, smooth, missing, T):
    "Boxes from a wandering animal (view 0 pinned to the frame's corner, so its boxes are padded) in ratio or size mode."
    rng = np.random.default_rng(seed)
    H, W = image_hw
    V, N = 3, 6
    centre = np.cumsum(rng.normal(0, 0.05 * W, (V, T, 2)), 1) + rng.uniform(0, [W, H], (V, 1, 2))
    centre[0] = rng.uniform(-3, 3, (T, 2))                                 # at the top-left corner of the frame
    spread = rng.uniform(2, 0.3 * min(H, W), (V, T, 1, 1))
    spread[0] = 2.0                           # view 0's mean stays within 5 px of the corner, its box is >= 16 px
    pts = centre[:, :, None] + spread * rng.uniform(-1, 1, (V, T, N, 2))
    conf = rng.uniform(0, 1, (V, T, N))
    conf[:, 0] = 1.0                                                       # every view has a usable frame
    options = (CropOptions(crop_ratio=None, crop_size=float(rng.uniform(10, 2 * max(H, W))), smooth_frames=smooth, missing=missing)
               if size_mode else CropOptions(crop_ratio=float(rng.uniform(1.01, 4)), smooth_frames=smooth, missing=missing))
    boxes = boxes_from_points(pts, conf, image_hw, out_hw, options)
    H_in, W_in = out_hw
    np.testing.assert_allclose(boxes.hw_px[..., 1] / boxes.hw_px[..., 0], W_in / H_in, rtol=1e-12)
    assert (boxes.hw_px.min(-1) >= options.min_size_px - 1e-9).all()
    assert (boxes.corner_px[0] < -0.5).any(axis=-1).all()                 # view 0's boxes reach past the frame
    assert_round_trip(pts, boxes)
    assert_round_trip(points_near(rng, boxes, 5), boxes)


@settings(max_examples=60, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), out_hw=st.sampled_from([(24, 24), (16, 40), (48, 20)]),
       H=st.integers(8, 90), W=st.integers(8, 90))
def test_crop_frames_agrees_with_crop_matrices(seed, out_hw, H, W):
    """Crop an image whose channels are x + 10 and y + 10 (bilinear interpolation reproduces them exactly): every crop
    pixel whose raw source lies inside the frame holds its source's coordinates, as from_crop gives them, to 1/16 px
    (OpenCV's fixed-point grid is 1/32 px); pixels whose source is more than a pixel outside are 0."""
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 1, 2, out_hw, (H, W))
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    frames = np.repeat(np.stack([xx + 10, yy + 10, np.full_like(xx, 77)], -1)[None], 2, 0)
    crops = crop_frames(frames, boxes, 0, [0, 1])
    assert crops.shape == (2, *out_hw, 3) and crops.dtype == np.float32
    cy, cx = np.mgrid[:out_hw[0], :out_hw[1]].astype(float)
    grid = np.broadcast_to(np.stack([cx, cy], -1).reshape(1, 1, -1, 2), (1, 2, cx.size, 2))
    src = from_crop(grid, boxes)[0].reshape(2, *out_hw, 2)
    inside = (src[..., 0] >= 0) & (src[..., 0] <= W - 1) & (src[..., 1] >= 0) & (src[..., 1] <= H - 1)
    np.testing.assert_allclose(crops[..., :2][inside] - 10, src[inside], atol=1 / 16, rtol=0)
    far = (src[..., 0] < -1) | (src[..., 0] > W) | (src[..., 1] < -1) | (src[..., 1] > H)
    assert (crops[far] == 0).all()
    grey = crop_frames(frames[..., 0].astype(np.uint8), boxes, 0, [0, 1])   # (T, H, W) uint8 frames keep their shape
    assert grey.shape == (2, *out_hw) and grey.dtype == np.uint8


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), out_hw=OUT_HWS, T=st.integers(1, 30))
def test_bbox_csv_round_trip_is_exact(seed, out_hw, T):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 2, T, out_hw, (480, 640))
    with tempfile.TemporaryDirectory() as d:
        corner, hw, scale = read_bbox_csv(write_bbox_csv(Path(d) / "bbox.csv", boxes, 1), n_frames=T)
    np.testing.assert_array_equal(corner, boxes.corner_px[1])
    np.testing.assert_array_equal(hw, boxes.hw_px[1])
    np.testing.assert_array_equal(scale, boxes.scale[1, :, 1])
