"""`deeperfly_nb.crop_files`: crop videos and labelled frames through files, remap predictions exactly, refuse bad input.

Expected crop coordinates are computed here from the numbers in the bbox CSV with the documented map
c = (p - corner + 0.5) * (W_in / w) - 0.5 (x; y alike with H_in / h), not with the module's own functions."""
import csv
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.cropzoom import CropOptions
from deeperfly_nb.crop_files import (KeypointTable, crop_labels, crop_recording, read_keypoints_csv, remap_predictions,
                                     write_keypoints_csv)
from deeperfly_nb.io import open_reader, write_video

HW = (240, 320)   # raw frame (H, W)


def _bbox_rows(path):
    "{row label: (x, y, h, w)} of a bbox CSV, parsed with the csv module"
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    head = rows[0]
    return {r[0]: tuple(float(r[head.index(c)]) for c in "xyhw") for r in rows[1:] if r}


def _to_crop_expected(pts, box, out_hw):
    "(K, 2) raw px -> crop px by the documented formula, from one bbox row (x, y, h, w)"
    x, y, h, w = box
    H_in, W_in = out_hw
    return np.stack([(pts[:, 0] - x + 0.5) * W_in / w - 0.5, (pts[:, 1] - y + 0.5) * H_in / h - 0.5], -1)


def _dots(pts, hw=HW, sigma=2.5):
    "A grey uint8 image (H, W) with a Gaussian dot at each point of pts (K, 2)"
    yy, xx = np.mgrid[:hw[0], :hw[1]]
    img = 20 + 220 * sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in pts)
    return np.clip(img, 0, 255).astype(np.uint8)


def _dot_centre(img, near, r=10):
    "Intensity-weighted centre (x, y) of the dot near `near` (background 20 removed)"
    x0, y0 = (int(round(v)) for v in near)
    win = np.clip(img[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1].astype(float) - 20, 0, None)
    win *= win > 0.1 * win.max()
    yy, xx = np.mgrid[y0 - r:y0 + r + 1, x0 - r:x0 + r + 1]
    return np.array([(xx * win).sum(), (yy * win).sum()]) / win.sum()


def _track(T, rng, edge=False):
    "(T, 3, 2) three points per frame, moving and changing spread; with `edge`, near or past the frame's corner"
    t = np.arange(T)
    centre = np.stack([60 + 30 * t, 70 + 12 * t], -1).astype(float) if not edge else np.stack([4 + 0 * t, 3 + 0 * t], -1).astype(float)
    spread = 10 + 4 * t + rng.uniform(0, 3, T)
    offs = np.array([[-1.0, -0.5], [1.0, 0.2], [0.1, 1.0]])
    return centre[:, None] + spread[:, None, None] * offs + rng.normal(0, 0.3, (T, 3, 2))


def _write_pred(path, xy, lik=None, index=None):
    T = len(xy)
    write_keypoints_csv(path, KeypointTable(xy, np.ones(xy.shape[:2]) if lik is None else lik, ["a", "b", "c"],
                                            list(range(T)) if index is None else index))


@pytest.fixture(scope="module")
def dot_video(tmp_path_factory):
    "A 6-frame video of three dots at known places (encoded near-losslessly), and the places"
    d = tmp_path_factory.mktemp("dots")
    gt = _track(6, np.random.default_rng(0))
    frames = np.stack([_dots(p) for p in gt])
    write_video(d / "rec.mp4", np.repeat(frames[..., None], 3, -1), fps=25, crf=10)
    return d / "rec.mp4", gt


@pytest.mark.parametrize("options", [CropOptions(crop_ratio=1.7, smooth_frames=1), CropOptions(crop_ratio=None, crop_size=70.5, smooth_frames=3)],
                         ids=["ratio", "size"])
def test_crop_then_remap_through_files_is_exact(tmp_path, dot_video, options):
    video, gt = dot_video
    _write_pred(tmp_path / "det.csv", gt)
    crop, bbox, _ = crop_recording(tmp_path / "det.csv", video, options, (64, 96), tmp_path)
    with pytest.raises(InputError, match=r"_crop.mp4 exists \(and 1 more of the files to write\)"):
        crop_recording(tmp_path / "det.csv", video, options, (64, 96), tmp_path)
    rows = _bbox_rows(bbox)
    assert sorted(rows) == [str(t) for t in range(len(gt))]
    sizes = {rows[str(t)][2] for t in range(len(gt))}
    assert len(sizes) > 1 or options.crop_size is not None          # variable boxes in ratio mode
    on_crop = np.stack([_to_crop_expected(gt[t], rows[str(t)], (64, 96)) for t in range(len(gt))])
    lik = np.full(gt.shape[:2], 0.75)
    on_crop[2, 1], lik[3, 0] = np.nan, 0.125
    _write_pred(tmp_path / "crop_pred.csv", on_crop, lik)
    back = read_keypoints_csv(remap_predictions(tmp_path / "crop_pred.csv", bbox, tmp_path / "raw_pred.csv"))
    want = gt.copy(); want[2, 1] = np.nan
    assert np.array_equal(np.isnan(back.xy), np.isnan(want))
    assert np.nanmax(np.abs(back.xy - want)) < 1e-6
    assert back.likelihood[3, 0] == 0.125 and back.index == list(range(len(gt)))


def test_remap_is_exact_with_boxes_past_the_frame_edge(tmp_path):
    gt = _track(5, np.random.default_rng(1), edge=True)           # points at the corner: the boxes reach past it
    video = tmp_path / "edge.mp4"
    write_video(video, np.repeat(np.stack([_dots(p) for p in gt])[..., None], 3, -1), fps=25)
    _write_pred(tmp_path / "det.csv", gt)
    _, bbox, _ = crop_recording(tmp_path / "det.csv", video, CropOptions(crop_ratio=2.5, smooth_frames=1), (64, 64), tmp_path)
    rows = _bbox_rows(bbox)
    assert all(rows[str(t)][0] < 0 and rows[str(t)][1] < 0 for t in range(5))   # padded, not shifted
    on_crop = np.stack([_to_crop_expected(gt[t], rows[str(t)], (64, 64)) for t in range(5)])
    _write_pred(tmp_path / "crop_pred.csv", on_crop)
    back = read_keypoints_csv(remap_predictions(tmp_path / "crop_pred.csv", bbox, tmp_path / "raw.csv", image_hw=HW))
    assert np.abs(back.xy - gt).max() < 1e-6


def test_dots_land_where_the_crop_video_says(tmp_path, dot_video):
    video, gt = dot_video
    _write_pred(tmp_path / "det.csv", gt)
    crop, bbox, _ = crop_recording(tmp_path / "det.csv", video, CropOptions(crop_ratio=2.0, smooth_frames=1), (128, 128), tmp_path,
                                   crf=10)
    assert crop.name == "rec_crop.mp4" and bbox.name == "rec_bbox.csv"
    rows, frames = _bbox_rows(bbox), open_reader(crop)[:]
    assert frames.shape == (len(gt), 128, 128, 3)
    errs = []
    for t in range(len(gt)):
        want = _to_crop_expected(gt[t], rows[str(t)], (128, 128))
        errs += [np.abs(_dot_centre(frames[t, ..., 0], p) - p).max() for p in want]
    assert max(errs) < 0.5, errs


def _labelled_project(root, pts):
    "labeled-data/v/img{f}.png with a dot at each label, and CollectedData.csv (x, y only)"
    (root / "labeled-data" / "v").mkdir(parents=True)
    keys = [f"labeled-data/v/img{f}.png" for f in range(len(pts))]
    for k, p in zip(keys, pts): cv2.imwrite(str(root / k), _dots(p))
    write_keypoints_csv(root / "CollectedData.csv", KeypointTable(pts, None, ["a", "b", "c"], keys, "lab"))
    return root / "CollectedData.csv", keys


def test_labelled_crops_hold_the_dots_where_the_new_labels_say(tmp_path):
    pts = np.array([[[40.0, 50.0], [70.5, 60.25], [55.0, 80.0]], [[250.0, 200.0], [300.0, 215.0], [280.0, 230.5]],
                    [[12.0, 15.0], [30.0, 20.0], [20.0, 34.0]]])
    labels, keys = _labelled_project(tmp_path / "proj", pts)
    out = tmp_path / "out"; out.mkdir()
    lab, bbox, _ = crop_labels(labels, CropOptions(crop_ratio=None, crop_size=90), (96, 96), out)
    new, rows = read_keypoints_csv(lab), _bbox_rows(bbox)
    assert new.index == keys and sorted(rows) == sorted(keys) and new.likelihood is None
    errs = []
    for f, k in enumerate(keys):
        want = _to_crop_expected(pts[f], rows[k], (96, 96))
        assert np.abs(new.xy[f] - want).max() < 1e-9
        img = cv2.imread(str(out / k), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (96, 96)
        errs += [np.abs(_dot_centre(img, p) - p).max() for p in want]
    assert max(errs) < 0.5, errs
    back = read_keypoints_csv(remap_predictions(lab, bbox, tmp_path / "back.csv"))
    assert np.abs(back.xy - pts).max() < 1e-6
    lab.write_text(lab.read_text() + "# my corrections\n")               # labels edited on the crops: never replaced silently
    with pytest.raises(InputError, match=r"exists \(and 4 more of the files to write\); give --overwrite"):
        crop_labels(labels, CropOptions(crop_ratio=None, crop_size=90), (96, 96), out)
    assert lab.read_text().endswith("# my corrections\n")
    with pytest.raises(InputError, match="back.csv exists; give --overwrite"): remap_predictions(lab, bbox, tmp_path / "back.csv")
    assert crop_labels(labels, CropOptions(crop_ratio=None, crop_size=90), (96, 96), out, overwrite=True)[0] == lab


def test_labels_cropped_with_a_detector_csv_use_its_boxes(tmp_path):
    pts = np.array([[[40.0, 50.0], [70.0, 60.0], [55.0, 80.0]], [[250.0, 200.0], [300.0, 215.0], [280.0, 230.0]]])
    labels, keys = _labelled_project(tmp_path / "proj", pts)
    det = pts + np.array([30.0, 0.0])                                # the detector sees the animal 30 px to the right
    write_keypoints_csv(tmp_path / "det.csv", KeypointTable(det[::-1].copy(), np.ones((2, 3)), ["a", "b", "c"], keys[::-1]))
    out = tmp_path / "out"; out.mkdir()
    _, bbox, _ = crop_labels(labels, CropOptions(crop_ratio=None, crop_size=90), (96, 96), out, detections=tmp_path / "det.csv")
    rows = _bbox_rows(bbox)
    for f, k in enumerate(keys):                                    # box centred on the detector's mean, rows matched by path
        x, y, h, w = rows[k]
        assert abs(x - 0.5 + w / 2 - det[f, :, 0].mean()) < 1e-9 and abs(y - 0.5 + h / 2 - det[f, :, 1].mean()) < 1e-9


# ---- bad input: a clear error naming the culprit, nothing written -------------------------------------------------

def test_sizing_options_are_checked():
    with pytest.raises(ConfigError, match="exactly one of crop_ratio"): CropOptions(crop_ratio=2.0, crop_size=100)
    with pytest.raises(ConfigError, match=r"CropOptions.crop_ratio must be a number > 1"): CropOptions(crop_ratio=1.0)


@pytest.fixture
def cropped(tmp_path, dot_video):
    video, gt = dot_video
    _write_pred(tmp_path / "det.csv", gt)
    _, bbox, _ = crop_recording(tmp_path / "det.csv", video, CropOptions(smooth_frames=1), (64, 64), tmp_path)
    _write_pred(tmp_path / "pred.csv", np.full_like(gt, 30.0))
    return tmp_path, bbox.read_text().splitlines()


@pytest.mark.parametrize("edit, message", [
    (lambda L: L[:3] + L[4:], r"frame\(s\) missing, e.g. \[2\]"),
    (lambda L: L + [L[3]], "frame 2 appears 2 times"),
    (lambda L: L[:-1], "has 5 rows but .*pred.csv has 6"),
], ids=["missing", "duplicated", "fewer"])
def test_remap_refuses_a_bbox_csv_that_does_not_match(cropped, edit, message):
    d, lines = cropped
    (d / "bad_bbox.csv").write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(InputError, match=message) as e: remap_predictions(d / "pred.csv", d / "bad_bbox.csv", d / "out.csv")
    assert "bad_bbox.csv" in str(e.value)
    assert not (d / "out.csv").exists() and not list(d.glob(".out.csv*"))


def test_remap_refuses_predictions_for_frames_the_bbox_csv_lacks(cropped):
    d, _ = cropped
    _write_pred(d / "pred_late.csv", np.full((6, 3, 2), 30.0), index=list(range(1, 7)))
    with pytest.raises(InputError, match=r"no box for 1 row\(s\) of .*pred_late.csv, e.g. \[6\]"):
        remap_predictions(d / "pred_late.csv", d / "rec_bbox.csv", d / "out.csv")
    assert not (d / "out.csv").exists()


def test_a_box_entirely_outside_the_frame_is_refused(tmp_path, dot_video):
    video, gt = dot_video
    far = gt.copy(); far[4] += 1000.0                               # frame 4: detections from some other footage
    _write_pred(tmp_path / "det_far.csv", far)
    out = tmp_path / "out"; out.mkdir()
    with pytest.raises(InputError, match=r"det_far.csv: the crop box of view 0, frame 4 .* lies entirely outside the 240x320 frame"):
        crop_recording(tmp_path / "det_far.csv", video, CropOptions(smooth_frames=1), (64, 64), out)
    assert list(out.iterdir()) == []


def test_a_bbox_csv_box_outside_the_frame_is_refused_on_remap(cropped):
    d, lines = cropped
    bad = lines[:2] + [",".join(["1", "900.0"] + lines[2].split(",")[2:])] + lines[3:]
    (d / "far_bbox.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(InputError, match=r"far_bbox.csv, line 3: the box of frame 1 .* lies entirely outside"):
        remap_predictions(d / "pred.csv", d / "far_bbox.csv", d / "out.csv", image_hw=HW)
    assert not (d / "out.csv").exists()


def test_a_pose_model_of_another_input_size_is_refused(tmp_path, dot_video):
    from deeperfly_nb.detector import bundled_weights
    video, gt = dot_video
    _write_pred(tmp_path / "det.csv", gt)
    out = tmp_path / "out"; out.mkdir()
    with pytest.raises(ConfigError, match=r"fly_synthetic.pt: the pose model takes 256x512 \(HxW\) inputs but the crops are 64x64"):
        crop_recording(tmp_path / "det.csv", video, CropOptions(), (64, 64), out, pose_model=bundled_weights("fly_synthetic"))
    assert list(out.iterdir()) == []


def test_detections_must_cover_every_frame(tmp_path, dot_video):
    video, gt = dot_video
    _write_pred(tmp_path / "det_short.csv", gt[:4])
    out = tmp_path / "out"; out.mkdir()
    with pytest.raises(InputError, match=r"det_short.csv: 4 rows, but .*rec.mp4 has 6 frames"):
        crop_recording(tmp_path / "det_short.csv", video, CropOptions(), (64, 64), out)
    assert list(out.iterdir()) == []


# ---- property: remap through files is exact for any boxes --------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 31 - 1), out_hw=st.sampled_from([(64, 64), (128, 96), (96, 160), (33, 47)]),
       path_rows=st.booleans())
def test_remap_through_files_is_exact_for_any_boxes(tmp_path, seed, out_hw, path_rows):
    "Boxes of any size and fractional place (far past the frame too), rows by frame number or by image path."
    rng = np.random.default_rng(seed)
    T, (H_in, W_in) = int(rng.integers(1, 8)), out_hw
    short = np.exp(rng.uniform(np.log(2), np.log(2000), T))
    hw = np.stack([short * max(1, H_in / W_in), short * max(1, W_in / H_in)], -1)
    corner = rng.uniform(-800, 1600, (T, 2))
    keys = [f"labeled-data/v/img{t:03d}.png" for t in range(T)] if path_rows else list(range(T))
    lines = [",x,y,h,w,scale"] + [f"{k},{float(c[0])!r},{float(c[1])!r},{float(s[0])!r},{float(s[1])!r},{float(H_in / s[0])!r}" for k, c, s in zip(keys, corner, hw)]
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    (d / "bbox.csv").write_text("\n".join(lines) + "\n")
    gt = corner[:, None] - 0.5 + rng.uniform(-0.5, 1.5, (T, 3, 2)) * hw[:, None, ::-1]
    gt[rng.uniform(size=(T, 3)) < 0.1] = np.nan
    on_crop = np.stack([_to_crop_expected(gt[t], (*corner[t], *hw[t]), out_hw) for t in range(T)])
    order = rng.permutation(T)                                          # prediction rows in another order
    _write_pred(d / "pred.csv", on_crop[order], index=[keys[i] for i in order])
    back = read_keypoints_csv(remap_predictions(d / "pred.csv", d / "bbox.csv", d / "raw.csv"))
    np.testing.assert_array_equal(np.isnan(back.xy), np.isnan(gt[order]))
    ok = np.isfinite(gt[order])
    np.testing.assert_allclose(back.xy[ok], gt[order][ok], atol=1e-6, rtol=0)


# ---- a LabelSet cropped for training ----------------------------------------------------------------------------

def test_crop_label_set_puts_labels_on_the_dots():
    from deeperfly_nb.crop_files import crop_label_set, label_set_boxes
    from deeperfly_nb.labels import ArrayFrames, LabelSet
    from deeperfly_nb.skeleton import fly38
    sk = fly38()
    pts = np.array([[[40.0, 50.0], [70.5, 60.25]], [[250.0, 200.0], [290.0, 215.0]], [[150.0, 100.0], [170.0, 130.0]]])
    P = np.full((2, 3, sk.n_points, 2), np.nan)
    P[0, :, 3:5] = pts                                               # view 'b' has no labels
    frames = ArrayFrames({"a": np.stack([_dots(p) for p in pts]), "b": np.zeros((3, 10, 10), np.uint8)})
    ls = LabelSet(P, ["a", "b"], sk, frames)
    boxes = label_set_boxes(ls, CropOptions(crop_ratio=None, crop_size=100), (96, 128))
    out = crop_label_set(ls, boxes, (96, 128))
    assert out.view_names == ["a", "b"] and np.isnan(out.pts2d[1]).all() and np.isnan(out.pts2d[0, :, :3]).all()
    for f in range(3):
        box = (*boxes.corner_px[0, f], *boxes.hw_px[0, f])
        want = _to_crop_expected(pts[f], box, (96, 128))
        assert np.abs(out.pts2d[0, f, 3:5] - want).max() < 1e-9
        img = out.frames.read("a", [f])[0]
        assert img.shape == (96, 128, 3)
        assert max(np.abs(_dot_centre(img[..., 0], p) - p).max() for p in want) < 0.5
    with pytest.raises(ConfigError, match="the pose model takes 64x64"): crop_label_set(ls, boxes, (64, 64))


@pytest.mark.slow
def test_crop_recording_runs_a_detector_model(tmp_path, dot_video):
    "The bundled detector as the box source: the plumbing from a .pt path to a crop video (its points are not judged)"
    from deeperfly_nb.detector import bundled_weights
    video, gt = dot_video
    with pytest.warns(UserWarning, match="crops are mostly padding"):     # a fly detector on dots: its boxes are told to be too big
        crop, bbox, boxes = crop_recording(bundled_weights("fly_synthetic"), video, CropOptions(min_confidence=0.0), (64, 64), tmp_path,
                                           device="cpu")
    assert open_reader(crop)[:].shape == (len(gt), 64, 64, 3) and sorted(_bbox_rows(bbox)) == [str(t) for t in range(len(gt))]
