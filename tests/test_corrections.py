"""The corrections sidecar: round trip, refusals (another recording, skeleton or length; a correction outside the
frame or the image), atomic writes, applying and restoring, the digest, and the label export `deeperfly train` reads.
Expected values are written out by hand or computed with plain numpy, never by the module under test."""
import math, os
from pathlib import Path
import numpy as np
import pytest
from deeperfly_nb.core import InputError
from deeperfly_nb.corrections import (CORRECTIONS, Correction, Corrections, write_corrections, read_corrections,
                                      apply_corrections, restore_detections, corrections_digest, detections_key,
                                      corrections_to_labels)

VIEWS, POINTS, T = ["rh", "rf", "lf"], ["a", "b", "c", "d"], 8
SIZES = {v: (48, 64) for v in VIEWS}


def detections(seed=0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 47, (3, T, 4, 2)); c = rng.uniform(0.2, 0.9, (3, T, 4))
    p[1, 2, 3] = np.nan; c[1, 2, 3] = 0
    return p, c


def some_corrections(p, c) -> Corrections:
    cs = Corrections(VIEWS, POINTS, T, "tiny", detections_key(p, c), SIZES, "/rec")
    cs.add(Correction("rf", 2, "d", 10.0, 11.0, "t1", "ann", (math.nan, math.nan, 0.0)))    # a missed detection placed
    cs.add(Correction("rh", 5, "a", math.nan, math.nan, "t2", "bob", (*p[0, 5, 0], c[0, 5, 0])))
    cs.add(Correction("lf", 7, "c", 63.5, -0.5, "t3", "ann", (*p[2, 7, 2], c[2, 7, 2])))   # the image's far corner
    return cs


def test_round_trip_and_order_of_the_caller(tmp_path):
    p, c = detections(); cs = some_corrections(p, c)
    write_corrections(tmp_path / CORRECTIONS, cs)
    back = read_corrections(tmp_path / CORRECTIONS, VIEWS[::-1], POINTS[::-1], T, detections_key=detections_key(p, c))
    assert back.view_names == VIEWS[::-1] and back.point_names == POINTS[::-1]
    assert [repr(x) for x in back] == [repr(x) for x in cs]
    assert (back.skeleton, back.recording, back.image_sizes) == ("tiny", "/rec", SIZES)
    assert [x.author for x in back] == ["ann", "bob", "ann"]


def test_a_later_fix_replaces_and_remove_restores():
    p, c = detections(); cs = some_corrections(p, c)
    cs.add(Correction("rf", 2, "d", 20.0, 21.0))
    assert len(cs) == 3 and cs.get("rf", 2, "d").x == 20.0
    q, k = apply_corrections(p, c, cs)
    assert q[1, 2, 3].tolist() == [20.0, 21.0] and k[1, 2, 3] == 1.0
    assert np.isnan(q[0, 5, 0]).all() and k[0, 5, 0] == 0.0
    assert q[2, 7, 2].tolist() == [63.5, -0.5]
    changed = ~np.isclose(np.nan_to_num(q, nan=-1), np.nan_to_num(p, nan=-1)).all(-1)
    assert changed.sum() == 3                           # nothing else moved
    for key in list(cs.items): cs.remove(*key)
    q2, k2 = apply_corrections(p, c, cs)
    np.testing.assert_array_equal(q2, p); np.testing.assert_array_equal(k2, c)


def test_restore_detections_undoes_apply():
    p, c = detections(); cs = some_corrections(p, c)
    q, k = apply_corrections(p, c, cs)
    p2, c2 = restore_detections(q, k, cs)
    np.testing.assert_array_equal(p2, p); np.testing.assert_array_equal(c2, c)


@pytest.mark.parametrize("views, points, frames, match", [
    (["rh", "rf"], POINTS, T, "its views are"),
    (VIEWS, ["a", "b", "c", "e"], T, r"lacks: \['d'\]"),
    (VIEWS, POINTS + ["e"], T, "has 4 points, this one 5"),
    (VIEWS, POINTS, T + 1, "it is for 8 frames, this recording has 9")])
def test_another_recording_or_skeleton_is_refused(tmp_path, views, points, frames, match):
    p, c = detections()
    write_corrections(tmp_path / CORRECTIONS, some_corrections(p, c))
    with pytest.raises(InputError, match="belongs to another recording or skeleton") as e:
        read_corrections(tmp_path / CORRECTIONS, views, points, frames)
    assert e.match(match) and str(tmp_path / CORRECTIONS) in str(e.value)


def test_other_detections_are_refused_unless_not_checked(tmp_path):
    p, c = detections()
    write_corrections(tmp_path / CORRECTIONS, some_corrections(p, c))
    p2, c2 = detections(seed=1)
    with pytest.raises(InputError, match="other detections"):
        read_corrections(tmp_path / CORRECTIONS, VIEWS, POINTS, T, detections_key=detections_key(p2, c2))
    assert len(read_corrections(tmp_path / CORRECTIONS, VIEWS, POINTS, T)) == 3


def test_corrections_outside_the_frame_or_image_are_refused(tmp_path):
    p, c = detections(); cs = some_corrections(p, c)
    for bad, match in [(Correction("rh", 8, "a", 1, 1), "frame outside the recording's 8 frames"),
                       (Correction("rh", -1, "a", 1, 1), "frame outside"),
                       (Correction("rh", 0, "a", 63.6, 1), "outside the 64x48 image"),
                       (Correction("rh", 0, "a", 1, -0.6), "outside the 64x48 image"),
                       (Correction("rh", 0, "a", 1, math.nan), "must both be numbers or both NaN"),
                       (Correction("xx", 0, "a", 1, 1), "unknown view"),
                       (Correction("rh", 0, "z", 1, 1), "unknown point")]:
        with pytest.raises(InputError, match=match): cs.add(bad)
    assert len(cs) == 3
    write_corrections(tmp_path / CORRECTIONS, cs)            # a sidecar checked against smaller footage than it was made on
    with pytest.raises(InputError, match=r"\(63.5, -0.5\) px lies outside the 32x24 image"):
        read_corrections(tmp_path / CORRECTIONS, VIEWS, POINTS, T, image_sizes={"lf": (24, 32)})


def test_not_a_sidecar(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nothing")
    with pytest.raises(InputError, match="not a readable HDF5 corrections file"): read_corrections(tmp_path / "x.h5", VIEWS, POINTS, T)
    import h5py
    with h5py.File(tmp_path / "y.h5", "w") as f: f.attrs["format"] = "deeperfly.PoseResult"
    with pytest.raises(InputError, match="not a deeperfly corrections file"): read_corrections(tmp_path / "y.h5", VIEWS, POINTS, T)


def test_writes_are_atomic(tmp_path, monkeypatch):
    p, c = detections(); cs = some_corrections(p, c)
    path = write_corrections(tmp_path / CORRECTIONS, cs)
    before = path.read_bytes()
    cs.add(Correction("rh", 1, "b", 5, 5))
    def crash(*a, **kw): raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError): write_corrections(path, cs)
    monkeypatch.undo()
    assert path.read_bytes() == before                      # the old sidecar is intact
    assert sorted(x.name for x in tmp_path.iterdir()) == [CORRECTIONS]   # and no temporary file is left


def test_a_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    import tempfile
    p, c = detections()
    def refuse(*a, **kw): raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match=r"cannot write the corrections to .*corrections.h5: Permission denied \(is the folder .* read-only\?\)"):
        write_corrections(tmp_path / CORRECTIONS, some_corrections(p, c))


def test_digest_follows_content_not_time_or_author():
    p, c = detections()
    a, b = some_corrections(p, c), some_corrections(p, c)
    b.items = {k: Correction(x.view, x.frame, x.point, x.x, x.y, "later", "someone else", x.detected) for k, x in reversed(list(b.items.items()))}
    assert corrections_digest(a) == corrections_digest(b)
    b.add(Correction("rf", 2, "d", 10.0, 11.000001))
    assert corrections_digest(a) != corrections_digest(b)
    assert corrections_digest(None) == corrections_digest(Corrections(VIEWS, POINTS, T)) == "none"


def test_apply_refuses_arrays_of_another_shape():
    p, c = detections(); cs = some_corrections(p, c)
    with pytest.raises(InputError, match="frames"): apply_corrections(p[:, :4], c[:, :4], cs)
    with pytest.raises(InputError, match="points"): apply_corrections(p[:, :, :3], c[:, :, :3], cs)


def test_labels_from_corrections_are_read_by_train(tmp_path):
    import cv2
    from deeperfly_nb.labels import read_labels
    from deeperfly_nb.skeleton import Skeleton
    rec = tmp_path / "rec"; rec.mkdir()
    for v in range(3):
        for t in range(T): cv2.imwrite(str(rec / f"camera_{v}_img_{t}.png"), np.full((48, 64, 3), 10 * t + v, np.uint8))
    sk = Skeleton("tiny", tuple(POINTS), ((0, 1), (1, 2), (2, 3)), (("leg", (0, 1, 2, 3)),), ("#00ff00",))
    p, c = detections(); cs = some_corrections(p, c)
    pats = {v: f"camera_{i}_img_*.png" for i, v in enumerate(VIEWS)}
    corrections_to_labels(cs, p, c, sk, rec, pats, tmp_path / "labels.h5")
    ls = read_labels(tmp_path / "labels.h5")                  # what `deeperfly train LABELS` calls for a .h5
    assert ls.frame_ids == ["frame 2", "frame 5", "frame 7"]
    expect = np.full((3, 3, 4, 2), np.nan)
    expect[1, 0] = p[1, 2]; expect[1, 0, 3] = (10, 11)        # rf, frame 2: every point of the view, d placed by hand
    expect[0, 1] = p[0, 5]; expect[0, 1, 0] = np.nan          # rh, frame 5: a marked unseen → unlabelled
    expect[2, 2] = p[2, 7]; expect[2, 2, 2] = (63.5, -0.5)    # lf, frame 7
    np.testing.assert_array_equal(ls.pts2d, expect)
    assert ls.frames.read("lf", [2])[0][0, 0, 0] == 72        # frame 7 of camera_2: 10*7+2
    only = corrections_to_labels(cs, p, c, sk, rec, pats, only_corrected=True)
    assert np.isfinite(only.pts2d[..., 0]).sum() == 2         # the two placed points (the unseen one is no label)
