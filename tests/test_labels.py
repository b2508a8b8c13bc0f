"""Label sets and pathway samples: the formats (deeperfly HDF5, DeepLabCut / lightning-pose CSV, DeepFly3D pseudo-labels),
bad input, and the geometry of the samples one model trains on (mirrored pathways mirrored, the front view twice)."""
import csv
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from deeperfly_nb.config import Config
from deeperfly_nb.core import InputError
from deeperfly_nb import io
from deeperfly_nb.labels import (ArrayFrames, FileFrames, LabelSet, RecordingFrames, labels_from_df3d, labels_from_points,
                                 load_labels, merge_labels, pathway_samples, read_dlc_csv, read_labels, load_samples,
                                 concat_samples, channel_names, read_keypoints_csv)
from deeperfly_nb.skeleton import fly38

FLY = fly38()
PLAN = Config.default().detection_plan()


pytestmark = pytest.mark.usefixtures("torch_one_thread")     # see conftest.py


def random_frames(n, seed=0, hw=(480, 960)):
    "Textured grayscale-as-RGB frames, different per frame."
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (n, *hw)).astype(np.float32).transpose(1, 2, 0), (0, 0), 6)
    base = base.reshape(*hw, n).transpose(2, 0, 1)
    base = (base - base.min()) / (base.max() - base.min()) * 255
    return np.repeat(base.astype(np.uint8)[..., None], 3, -1)


def full_labels(n_frames=2, seed=0):
    "Every (view, point) of the default plan labeled at random pixels, frames embedded."
    rng = np.random.default_rng(seed)
    V, N = PLAN.n_views, PLAN.n_points
    p = np.stack([rng.uniform(20, 940, (V, n_frames, N)), rng.uniform(20, 460, (V, n_frames, N))], -1)
    p[~np.broadcast_to(PLAN.visibility_mask()[:, None], (V, n_frames, N))] = np.nan
    frames = {v: random_frames(n_frames, seed + i) for i, v in enumerate(PLAN.view_names)}
    return LabelSet(p, PLAN.view_names, FLY, ArrayFrames(frames))


# ---------------------------------------------------------------------------------------------- bad input
def test_nan_only_labels_are_refused():
    st = ArrayFrames({"rh": np.zeros((3, 8, 8), np.uint8)})
    with pytest.raises(InputError, match="hold no keypoints"):
        LabelSet(np.full((1, 3, 38, 2), np.nan), ["rh"], FLY, st)


def test_shape_mismatches_are_named():
    st = ArrayFrames({"rh": np.zeros((3, 8, 8), np.uint8)})
    with pytest.raises(InputError, match="points"):
        LabelSet(np.zeros((1, 3, 37, 2)), ["rh"], FLY, st)
    with pytest.raises(InputError, match="views"):
        LabelSet(np.zeros((2, 3, 38, 2)), ["rh"], FLY, st)
    with pytest.raises(InputError, match="visible"):
        LabelSet(np.zeros((1, 3, 38, 2)), ["rh"], FLY, st, visible=np.ones((1, 2, 38), bool))
    with pytest.raises(InputError, match="frame_ids"):
        LabelSet(np.zeros((1, 3, 38, 2)), ["rh"], FLY, st, frame_ids=["a", "b"])
    half = np.full((1, 3, 38, 2), np.nan); half[0, 0, 0, 0] = 5
    with pytest.raises(InputError, match="finite or both NaN"):
        LabelSet(half, ["rh"], FLY, st)


def test_unknown_keypoint_names_are_refused_with_a_suggestion():
    st = ArrayFrames({"rh": np.zeros((1, 8, 8), np.uint8)})
    with pytest.raises(InputError, match=r"\['rh_clawz'\].*did you mean 'rh_claw'"):
        labels_from_points(np.ones((1, 1, 2, 2)), ["rh_clawz", "rh_femur_tibia"], ["rh"], st)
    with pytest.raises(InputError, match="more than once"):
        labels_from_points(np.ones((1, 1, 2, 2)), ["rh_claw", "rh_claw"], ["rh"], st)


def test_labels_referencing_missing_frames(tmp_path):
    io.write_video(tmp_path / "camera_0.mp4", random_frames(4, hw=(64, 96)), fps=10)
    p = np.full((1, 3, 38, 2), np.nan); p[0, :, 19] = 10
    ls = LabelSet(p, ["rh"], FLY, RecordingFrames(tmp_path, {"rh": "camera_0.mp4"}, [0, 3, 9]))
    with pytest.raises(InputError, match=r"labeled frame\(s\) \[9\] are not in camera_0.mp4 \(4 frames\)"):
        ls.check_frames()
    gone = LabelSet(p, ["rh"], FLY, RecordingFrames(tmp_path, {"rh": ["camera_5.mp4", "camera_5_img_*.jpg"]}, [0, 1, 2]))
    with pytest.raises(InputError, match="camera_5"):
        gone.check_frames()
    emb = LabelSet(p, ["rh"], FLY, ArrayFrames({"rh": np.zeros((2, 8, 8), np.uint8)}))
    with pytest.raises(InputError, match=r"reference frames \[2\]"):
        emb.check_frames()
    # pathway_samples checks before it reads anything
    with pytest.raises(InputError, match=r"\[9\]"):
        pathway_samples(ls, PLAN)
    # reading them unchecked (a run of frames, or one) names them too, as do the crops of cropzoom training
    for frames in ([1, 2], [2]):
        with pytest.raises(InputError, match=r"view 'rh': labeled frame\(s\) \[9\] are not in camera_0.mp4 \(4 frames\)"):
            ls.frames.read("rh", frames)
    from deeperfly_nb.training import crop_labels_for_model
    with pytest.raises(InputError, match=r"\[9\] are not in camera_0.mp4"):
        crop_labels_for_model(ls, (64, 64))


def test_labels_that_meet_no_pathway():
    p = np.full((7, 1, 38, 2), np.nan); p[3, 0, 0] = [5, 5]     # front view, lf_body_coxa: no pathway writes it
    ls = LabelSet(p, PLAN.view_names, FLY, ArrayFrames({v: np.zeros((1, 480, 960), np.uint8) for v in PLAN.view_names}))
    with pytest.raises(InputError, match="no pathway"):
        pathway_samples(ls, PLAN)
    odd = LabelSet(np.ones((1, 1, 38, 2)), ["top"], FLY, ArrayFrames({"top": np.zeros((1, 8, 8), np.uint8)}))
    with pytest.raises(InputError, match=r"\['top'\] are not views"):
        pathway_samples(odd, PLAN)


# ---------------------------------------------------------------------------------------------- samples
def test_default_plan_gives_eight_samples_per_frame_and_mirrors_the_left_cameras():
    ls = full_labels(2)
    s = pathway_samples(ls, PLAN)
    assert len(s) == 16 and len(s.frame_keys) == 2
    assert sorted(np.bincount(s.pathway)) == [2] * 8
    assert s.images.shape[1:] == (256, 512, 1)
    raw = {v: ls.frames.read(v, [0])[0] for v in PLAN.view_names}
    for k, name in enumerate(s.pathway_names):
        i = np.flatnonzero((s.pathway == k) & (s.frame == 0))[0]
        pw = PLAN.pathway(name)
        view = PLAN.view_names[pw.mapping[0, 1]]
        src = raw[view][:, ::-1] if name.endswith("flip") else raw[view]
        ref = cv2.resize(src, (512, 256), interpolation=cv2.INTER_AREA)[..., 0].astype(float)
        assert np.abs(s.images[i, ..., 0] - ref).mean() < 2.0, name           # the (mirrored) frame, resized
        for c, v, p in pw.mapping:
            x, y = ls.pts2d[v, 0, p]
            if name.endswith("flip"): x = 959 - x
            np.testing.assert_allclose(s.keypoints[i, c], [(x + 0.5) * 512 / 960 - 0.5, (y + 0.5) * 256 / 480 - 0.5], atol=1e-4)
            np.testing.assert_allclose(s.source_keypoints[i, c], ls.pts2d[v, 0, p])
        unmapped = np.setdiff1d(np.arange(19), pw.mapping[:, 0])
        assert np.isnan(s.keypoints[i, unmapped]).all()
    # the front view: two samples of 7 channels, one per side
    f = [s.pathway_names.index(n) for n in ("f", "f_flip")]
    for k in f:
        i = np.flatnonzero(s.pathway == k)[0]
        assert np.isfinite(s.keypoints[i, :, 0]).sum() == 7


def test_occluded_labels_can_be_dropped():
    ls = full_labels(1)
    vis = np.ones(ls.pts2d.shape[:3], bool); vis[0, 0, 19] = False            # rh view hides rf_body_coxa
    ls.visible = vis
    keep, drop = pathway_samples(ls, PLAN), pathway_samples(ls, PLAN, occluded="ignore")
    i = keep.pathway_names.index("rh")
    assert np.isfinite(keep.keypoints[keep.pathway == i][0, 0]).all() and not keep.visible[keep.pathway == i][0, 0]
    assert np.isnan(drop.keypoints[drop.pathway == i][0, 0]).all()
    ls.visible = None                                                     # labels that do not say what is hidden
    with pytest.raises(InputError, match="occluded='ignore' needs the labels' visibility"):
        pathway_samples(ls, PLAN, occluded="ignore")


def test_channel_names_of_the_default_model():
    names = channel_names(PLAN, "deepfly2d")
    legs = [f"{l}_{j}" for l in "fmh" for j in ("body_coxa", "coxa_femur", "femur_tibia", "tibia_tarsus", "claw")]
    assert names == legs + ["antenna", "stripe_1", "stripe_2", "stripe_3"]


def test_sample_file_roundtrip_and_concat(tmp_path):
    a = pathway_samples(full_labels(1, seed=1), PLAN, name="a")
    b = pathway_samples(full_labels(1, seed=2), PLAN, name="b")
    ab = concat_samples([a, b])
    back = load_samples(ab.save(tmp_path / "s.npz"))
    assert back.fingerprint() == ab.fingerprint() and back.frame_keys == ["a/frame 0", "b/frame 0"]
    np.testing.assert_array_equal(back.frame, np.repeat([0, 1], 8))
    with pytest.raises(InputError, match="repeat"):
        concat_samples([a, a])
    with pytest.raises(InputError, match="not a sample file"):
        np.savez(tmp_path / "x.npz", a=np.zeros(3)); load_samples(tmp_path / "x.npz")


# ---------------------------------------------------------------------------------------------- files
def test_hdf5_roundtrip_embedded_and_references(tmp_path):
    ls = full_labels(2)
    ls.visible = np.isfinite(ls.pts2d[..., 0])
    back = load_labels(ls.save(tmp_path / "emb.h5"))
    np.testing.assert_array_equal(back.pts2d, ls.pts2d)
    np.testing.assert_array_equal(back.visible, ls.visible)
    assert back.view_names == ls.view_names and back.frame_ids == ls.frame_ids
    np.testing.assert_array_equal(back.frames.read("lm", [1])[0], ls.frames.read("lm", [1])[0])
    rec = tmp_path / "rec"; rec.mkdir()
    for c in range(7): io.write_video(rec / f"camera_{c}.mp4", random_frames(3, seed=c, hw=(48, 96)), fps=10)
    p = np.full((7, 2, 38, 2), np.nan); p[0, :, 19] = [[10, 11], [12, 13]]
    ref = LabelSet(p, PLAN.view_names, FLY, RecordingFrames(rec, {"rh": ["camera_0.mp4"]}, [2, 0]))
    back = load_labels(ref.save(tmp_path / "ref.h5"))
    np.testing.assert_array_equal(back.frames.frame_index, [2, 0])
    assert back.frames.folder.resolve() == rec.resolve()
    with h5py.File(tmp_path / "ref.h5") as f: assert f["frames"].attrs["folder"] == "rec"     # relative: the project can move
    (tmp_path / "moved").mkdir(); (tmp_path / "ref.h5").rename(tmp_path / "moved" / "ref.h5"); rec.rename(tmp_path / "moved" / "rec")
    assert load_labels(tmp_path / "moved" / "ref.h5").check_frames().frames.read("rh", [0])[0].shape == (48, 96, 3)
    with h5py.File(tmp_path / "other.h5", "w") as f: f["x"] = 1
    with pytest.raises(InputError, match="not a deeperfly label file"):
        load_labels(tmp_path / "other.h5")


def write_dlc(folder: Path, parts, rows, index_cols=3, likelihood=False, name="CollectedData_me.csv"):
    "A DeepLabCut-style project: images under labeled-data/v1 and the CSV (rows: {part: (x, y) or None})."
    d = folder / "labeled-data" / "v1"; d.mkdir(parents=True, exist_ok=True)
    coords = ["x", "y"] + (["likelihood"] if likelihood else [])
    pad = [""] * (index_cols - 1)
    out = [["scorer"] + pad + ["me"] * len(coords) * len(parts), ["bodyparts"] + pad + [p for p in parts for _ in coords],
           ["coords"] + pad + coords * len(parts)]
    for k, r in enumerate(rows):
        img = f"img{k:03d}.png"
        cv2.imwrite(str(d / img), np.full((40, 60, 3), 10 * k, np.uint8))
        idx = ["labeled-data", "v1", img] if index_cols == 3 else [f"labeled-data/v1/{img}"]
        vals = []
        for p in parts:
            xy = r.get(p)
            vals += (["", ""] if xy is None else [str(xy[0]), str(xy[1])]) + (["0.9"] if likelihood else [])
        out.append(idx + vals)
    with open(d / name, "w", newline="") as f: csv.writer(f).writerows(out)
    return d / name


@pytest.mark.parametrize("index_cols,likelihood", [(3, False), (1, False), (1, True)])
def test_dlc_csv_layouts(tmp_path, index_cols, likelihood):
    rows = [{"lh_claw": (1.5, 2.5), "l_antenna": (3, 4)}, {"lh_claw": None, "l_antenna": (5, 6)}]
    path = write_dlc(tmp_path, ["lh_claw", "l_antenna"], rows, index_cols, likelihood)
    ls = read_dlc_csv(path, view="lh", view_names=PLAN.view_names).check_frames()
    v, claw, ant = PLAN.view_names.index("lh"), FLY.index(["lh_claw"])[0], FLY.index(["l_antenna"])[0]
    np.testing.assert_array_equal(ls.pts2d[v, :, claw], [[1.5, 2.5], [np.nan, np.nan]])
    np.testing.assert_array_equal(ls.pts2d[v, :, ant], [[3, 4], [5, 6]])
    assert ls.labeled.sum() == 3 and ls.frame_ids == ["lh:labeled-data/v1/img000.png", "lh:labeled-data/v1/img001.png"]
    assert ls.frames.read("lh", [1])[0][0, 0, 0] == 10
    # the same CSV through read_labels, and into pathway samples (mirrored: lh_flip)
    s = pathway_samples(read_labels(path, view="lh"), PLAN)
    assert s.pathway_names[s.pathway[0]] == "lh_flip" and len(s) == 2


def test_dlc_csv_bad_input(tmp_path):
    with pytest.raises(InputError, match=r"\['tail'\] are not points"):
        read_dlc_csv(write_dlc(tmp_path / "a", ["tail"], [{"tail": (1, 2)}]), view="rh")
    with pytest.raises(InputError, match="hold no keypoints"):
        read_dlc_csv(write_dlc(tmp_path / "b", ["rh_claw"], [{"rh_claw": None}, {"rh_claw": None}]), view="rh")
    p = write_dlc(tmp_path / "c", ["rh_claw"], [{"rh_claw": (1, 2)}, {"rh_claw": (3, 4)}])
    (p.parent / "img001.png").unlink()
    with pytest.raises(InputError, match="img001.png"):
        read_dlc_csv(p, view="rh").check_frames()
    bad = tmp_path / "bad.csv"; bad.write_text("scorer,me,me\nbodyparts,a,a\nfoo,x,y\nimg.png,1,2\n")
    with pytest.raises(InputError, match="coords"):
        read_dlc_csv(bad, view="rh")
    notnum = write_dlc(tmp_path / "d", ["rh_claw"], [{"rh_claw": ("abc", 2)}])
    with pytest.raises(InputError, match="'abc' is not a number"):
        read_dlc_csv(notnum, view="rh")
    gaps = tmp_path / "gaps.csv"              # blank lines before the bad row: the error names the row as the file counts it
    gaps.write_text("scorer,me,me\nbodyparts,a,a\ncoords,x,y\nimg0.png,1,2\n\n\nimg1.png,zz,2\n")
    with pytest.raises(InputError, match=r"gaps.csv row 7: 'zz' is not a number"):
        read_keypoints_csv(gaps)


def test_merge_views_from_several_csvs(tmp_path):
    a = read_dlc_csv(write_dlc(tmp_path / "a", ["rh_claw"], [{"rh_claw": (1, 2)}]), view="rh")
    b = read_dlc_csv(write_dlc(tmp_path / "b", ["lh_claw"], [{"lh_claw": (3, 4)}, {"lh_claw": (5, 6)}]), view="lh")
    m = merge_labels([a, b]).check_frames()
    assert m.view_names == ["rh", "lh"] and m.n_frames == 3
    s = pathway_samples(m, PLAN)
    assert sorted(s.pathway_names[k] for k in s.pathway) == ["lh_flip", "lh_flip", "rh"]


# ---------------------------------------------------------------------------------------------- DeepFly3D
def test_df3d_pseudo_labels(df3d_pkl):
    from deeperfly_nb.df3d import load_df3d_pickle
    raw = load_df3d_pickle(df3d_pkl)["points2d"]                 # (7, 15, 38, 2) normalised (row, col)
    ls = labels_from_df3d(df3d_pkl, frames=range(10)).check_frames()
    assert ls.n_frames == 10 and ls.frames.folder.name == "deepfly3d_sample"
    for p in (0, 15, 19, 33):                                    # deeperfly point p is DeepFly3D joint (p + 19) % 38
        j = (p + 19) % 38
        r, c = raw[:, :10, j, 0], raw[:, :10, j, 1]
        undetected = (r == 0) & ((c == 0) | (c == 1))              # DeepFly3D's "not detected": (0, 0), or (0, 1) = the corner
        assert np.isnan(ls.pts2d[:, :, p, 0][undetected]).all()
        np.testing.assert_allclose(ls.pts2d[:, :, p][~undetected], (raw[:, :10, j][..., ::-1] * [960, 480])[~undetected])
    assert not ls.labeled[3].any()                               # the front camera is all zeros in this file
    s = pathway_samples(ls, PLAN)
    assert len(s) == 60 and sorted(set(s.pathway_names[k] for k in s.pathway)) == ["lf_flip", "lh_flip", "lm_flip", "rf", "rh", "rm"]
    with pytest.raises(InputError, match="outside"):
        labels_from_df3d(df3d_pkl, frames=[14, 15])


def test_embedding_stores_that_hold_only_some_frames_of_a_view(tmp_path):
    """LabelSet.save(embed=True) reads only the labeled frames of each view, whatever the store holds: a store with
    just some label frames of a view, a merge whose parts have frames of different sizes in one view, footage with
    fewer frames than the label set; and a labeled view without images is an InputError before anything is written."""
    pa = np.full((1, 3, 38, 2), np.nan); pa[0, 1, 19] = [3, 4]
    a = LabelSet(pa, ["rh"], FLY, ArrayFrames({"rh": [np.full((8, 12), 7, np.uint8)]}, index={"rh": [1]}), frame_ids=["a0", "a1", "a2"])
    b = LabelSet(np.ones((1, 1, 38, 2)), ["rh"], FLY, ArrayFrames({"rh": np.full((1, 6, 10, 3), 9, np.uint8)}), frame_ids=["b0"])
    m = load_labels(merge_labels([a, b]).save(tmp_path / "m.h5", embed=True)).check_frames()
    assert [im.shape for im in m.frames.read("rh", [1, 3])] == [(8, 12, 3), (6, 10, 3)]
    assert [int(im.max()) for im in m.frames.read("rh", [1, 3])] == [7, 9]
    s = pathway_samples(m, PLAN)                                   # trains: both frames become samples of pathway rh
    assert len(s) == 2 and {s.pathway_names[k] for k in s.pathway} == {"rh"}
    # footage of 4 frames, labels on footage frame 2 only, the label set also naming frame 99 (unlabeled)
    io.write_video(tmp_path / "camera_0.mp4", random_frames(4, hw=(48, 64)), fps=10)
    p = np.full((1, 3, 38, 2), np.nan); p[0, 1, 19] = [5, 6]
    rec = LabelSet(p, ["rh"], FLY, RecordingFrames(tmp_path, {"rh": "camera_0.mp4"}, [0, 2, 99]))
    emb = load_labels(rec.save(tmp_path / "e.h5", embed=True)).check_frames()
    np.testing.assert_array_equal(emb.frames.read("rh", [1])[0], rec.frames.read("rh", [1])[0])
    with pytest.raises(InputError, match="view 'rm' has labels but no embedded frames"):
        LabelSet(np.ones((2, 1, 38, 2)), ["rh", "rm"], FLY, ArrayFrames({"rh": np.zeros((1, 8, 8), np.uint8)})).save(tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()
