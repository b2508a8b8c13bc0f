"""Overlay drawing, tiling, videos (decoded back), the config model and the HTML inspection report."""
from pathlib import Path

import numpy as np
import pytest

from deeperfly_nb.core import InputError
from deeperfly_nb.results import PoseResult
from deeperfly_nb.skeleton import Skeleton
from deeperfly_nb.synth import default_rig, default_visibility, observe, walking_fly
from deeperfly_nb.triangulation import triangulate
from deeperfly_nb.drawing import default_radius_px, draw_skeleton, point_colors_u8
from deeperfly_nb.tiling import compose_grid, grid_layout
from deeperfly_nb.overlay_video import (MemoryWriter, project_visible, render_pose2d_video, render_pose3d_video,
                                        scaled_points, separated_points)
from deeperfly_nb.inspection import inspection_figures, write_report_html
from deeperfly_nb.config import VisualizationConfig
from deeperfly_nb.visualization import render_videos

HW = (120, 240)                     # a quarter of DeepFly3D's 480 x 960


@pytest.fixture(scope="module")
def fly(): return Skeleton.fly38()


@pytest.fixture(scope="module")
def syn(fly):
    "A 6-frame walking fly in the DeepFly3D ring at 240 x 120, with grey noisy frames per view."
    rig = default_rig(image_size=HW, focal_px=22388 / 4)
    pts3d = walking_fly(6, seed=5)
    obs = observe(rig, pts3d, visibility=default_visibility(), noise_px=0.3, seed=5)
    rng = np.random.default_rng(5)
    frames = {v: np.clip(rng.normal(60, 3, (6, *HW, 3)), 0, 255).astype(np.uint8) for v in rig.names}
    res = PoseResult(obs.pts2d, obs.conf, rig, fly, pts3d=pts3d, fps=100)
    return res, frames


def _decode(path):
    import av
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
        return frames, float(st.average_rate)


def _chroma(c):
    c = np.asarray(c, float)
    return c - c.mean(-1, keepdims=True)


def _check_colours(decoded, result, views_drawn, scale, t_list, tol=80, max_bad=0.01):
    """Pixel colour at each separated reprojected point of the decoded grid = its limb colour, up to H.264 loss:
    within `tol` per channel, chroma pointing to its own limb colour (not grey); at most `max_bad` may miss.
    Returns the number of points checked."""
    H, W = HW if result.cameras[0].image_size is None else result.cameras[0].image_size
    th, tw = int(round(H * scale)), int(round(W * scale))
    lay = grid_layout([(th, tw)] * (len(result.view_names) + 1))
    cols = point_colors_u8(result.skeleton)
    palette = np.unique(cols, axis=0).astype(float)
    pal_dir = _chroma(palette) / np.linalg.norm(_chroma(palette), axis=1, keepdims=True)
    n, bad = 0, []
    for t in t_list:
        uv = scaled_points(project_visible(result.cameras, result.pts3d[t]), tw / W, th / H)
        uv[~views_drawn] = np.nan
        for v in range(len(result.view_names)):
            x0, y0 = lay.origin(v)
            for i in separated_points(uv[v], cols, 2 * default_radius_px((th, tw)) + 2):
                x, y = uv[v, i]
                if not (0 <= x < tw and 0 <= y < th): continue
                px = decoded[t][y0 + int(round(y)), x0 + int(round(x))].astype(int)
                c = _chroma(px)
                ok = (np.abs(px - cols[i]).max() <= tol and np.linalg.norm(c) > 15     # not washed out to grey
                      and (palette[np.argmax(pal_dir @ c)] == cols[i]).all())
                if not ok: bad.append((t, v, result.skeleton.point_names[i], px.tolist(), cols[i].tolist()))
                n += 1
    assert len(bad) <= max_bad * n, bad
    return n


# ---------------------------------------------------------------- drawing
def test_drawn_skeleton_lies_on_the_points(fly):
    H, W = 150, 260
    rng = np.random.default_rng(1)
    P = np.full((38, 2), np.nan)
    right = np.arange(19, 38)
    P[right] = np.stack([np.linspace(12, 248, 19), 75 + 55 * np.sin(1.7 * np.arange(19))], 1) + rng.uniform(-0.5, 0.5, (19, 2))
    frame = np.zeros((H, W, 3), np.uint8)
    img = draw_skeleton(frame, P, fly)
    assert frame.max() == 0                                         # not modified in place
    cols = np.round(255 * fly.point_colors_rgb()).astype(int)
    for i in right:
        assert img[int(round(P[i, 1])), int(round(P[i, 0]))].tolist() == cols[i].tolist(), fly.point_names[i]
    # pixels farther than 6 px from every drawn bone and point stay black
    yy, xx = np.mgrid[:H, :W]
    pix = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    B = fly.bone_array[np.isin(fly.bone_array, right).all(1)]
    p, q = P[B[:, 0]], P[B[:, 1]]
    d = q - p
    t = np.clip(((pix[:, None] - p) * d).sum(-1) / (d * d).sum(-1), 0, 1)
    dist = np.linalg.norm(pix[:, None] - (p + t[..., None] * d), axis=-1).min(1)
    dist = np.minimum(dist, np.linalg.norm(pix[:, None] - P[right], axis=-1).min(1))
    far = dist > 6
    assert far.sum() > 0.4 * H * W
    assert img.reshape(-1, 3)[far].max() == 0
    near = dist < 0.5                                               # and the bones were drawn
    assert (img.reshape(-1, 3)[near].max(1) > 0).mean() > 0.95


def test_subpixel_position_and_nan(fly):
    one = Skeleton("one", ("a", "b"), ((0, 1),), (("ab", (0, 1)),), ("#ffffff",))
    for x, y in [(7.25, 11.8), (20.5, 20.5), (33.9, 4.1)]:
        g = draw_skeleton(np.zeros((30, 40, 3), np.uint8), [[x, y], [np.nan, np.nan]], one, radius_px=3)[..., 0].astype(float)
        gy, gx = np.mgrid[:30, :40]
        assert abs((g * gx).sum() / g.sum() - x) < 0.05 and abs((g * gy).sum() / g.sum() - y) < 0.05
    # a NaN point draws nothing, nor any bone touching it
    blank = draw_skeleton(np.zeros((30, 40, 3), np.uint8), np.full((38, 2), np.nan), fly)
    assert blank.max() == 0
    f = np.zeros((30, 40, 3), np.uint8)
    out = draw_skeleton(f, [[5, 5], [30, 20]], one, in_place=True)
    assert out is f and f.max() == 255


def test_scaled_points_match_opencv_resize():
    import cv2
    one = Skeleton("one", ("a", "b"), ((0, 1),), (("ab", (0, 1)),), ("#ffffff",))
    for x, y, s in [(40.3, 21.7, 0.5), (17.0, 30.25, 0.25)]:
        big = draw_skeleton(np.zeros((48, 80, 3), np.uint8), [[x, y], [np.nan, np.nan]], one, radius_px=4)
        small = cv2.resize(big, (int(80 * s), int(48 * s)), interpolation=cv2.INTER_AREA)[..., 0].astype(float)
        gy, gx = np.mgrid[:small.shape[0], :small.shape[1]]
        got = np.array([(small * gx).sum(), (small * gy).sum()]) / small.sum()
        assert np.abs(got - scaled_points([x, y], s, s)).max() < 0.06


def test_compose_grid_geometry():
    tiles = [np.full((21, 33, 3), 20 * i + 5, np.uint8) for i in range(5)]
    g = compose_grid(tiles, titles=list("abcde"))
    lay = grid_layout([(21, 33)] * 5)
    assert g.shape[0] % 2 == 0 and g.shape[1] % 2 == 0 and g.shape[:2] == lay.size
    for i in range(5):
        x0, y0 = lay.origin(i)
        assert (g[y0:y0 + 21, x0:x0 + 33] == 20 * i + 5).all()


# ---------------------------------------------------------------- videos
def test_pose3d_video_frames_exact_colours(syn):
    res, frames = syn
    mem = {}
    def writer(p, fps, crf): mem["w"] = MemoryWriter(p, fps, crf); return mem["w"]
    render_pose3d_video("never_written.mp4", frames, res, writer=writer)
    w = mem["w"]
    assert len(w.frames) == 6 and w.fps == 100
    detected = np.isfinite(res.pts2d).all(-1).any(1)
    n = _check_colours(w.frames, res, detected, 0.5, [0, 2, 5], tol=0, max_bad=0)   # uncompressed: exact colours
    assert n > 100
    assert not Path("never_written.mp4").exists()


def test_streaming_pulls_one_frame_at_a_time(syn):
    res, frames = syn
    produced = {v: 0 for v in res.view_names}
    def gen(v):
        for f in frames[v]:
            produced[v] += 1
            yield f
    class Checking(MemoryWriter):
        def write(self, f):
            super().write(f)
            assert max(produced.values()) == len(self.frames)
    render_pose3d_video("x.mp4", {v: gen(v) for v in res.view_names}, res, writer=lambda p, f, c: Checking(p, f, c))
    assert set(produced.values()) == {6}


def test_pose3d_video_decodes_with_skeleton_on_reprojected_points(syn, tmp_path):
    res, frames = syn
    path = render_pose3d_video(tmp_path / "pose3d.mp4", frames, res, scale=1.0)
    dec, fps = _decode(path)
    lay = grid_layout([HW] * 8)
    assert (len(dec), fps, dec[0].shape[:2]) == (6, 100.0, lay.size)
    n = _check_colours(dec, res, np.isfinite(res.pts2d).all(-1).any(1), 1.0, [0, 3, 5])
    assert n > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pose3d.mp4"]


def test_pose2d_video_downscaled(syn, tmp_path):
    res, frames = syn
    path = render_pose2d_video(tmp_path / "pose2d.mp4", frames, res.pts2d, res.conf, res.skeleton, res.view_names,
                                   fps=25, views=["rh", "f", "lh"], scale=0.5, max_frames=4)
    dec, fps = _decode(path)
    assert (len(dec), fps, dec[0].shape[:2]) == (4, 25.0, grid_layout([(60, 120)] * 3).size)


def test_failed_render_leaves_no_file(syn, tmp_path):
    res, frames = syn
    def broken(v):
        for t, f in enumerate(frames[v]):
            if t == 3: raise RuntimeError("decoder died (simulated)")
            yield f
    with pytest.raises(RuntimeError, match="decoder died"):
        render_pose3d_video(tmp_path / "pose3d.mp4", {v: broken(v) for v in res.view_names}, res)
    assert list(tmp_path.iterdir()) == []


def test_real_deepfly3d_overlay(df3d_pkl, tmp_path):
    import cv2
    from deeperfly_nb.df3d import read_df3d_result
    sample = df3d_pkl.parent.parent
    res = read_df3d_result(df3d_pkl).to_pose_result(fps=100)
    frames = {v: np.stack([cv2.imread(str(sample / f"camera_{c}_img_{t}.jpg"))[..., ::-1] for t in range(3)])
              for c, v in enumerate(res.view_names)}
    path = render_pose3d_video(tmp_path / "pose3d.mp4", frames, res, scale=0.5, max_frames=3)
    dec, fps = _decode(path)
    assert (len(dec), fps, dec[0].shape[:2]) == (3, 100.0, grid_layout([(240, 480)] * 8).size)
    assert _check_colours(dec, res, np.isfinite(res.pts2d).all(-1).any(1), 0.5, [0, 2]) > 100


# ---------------------------------------------------------------- bad input
def test_bad_input_is_named(syn):
    res, frames = syn
    w = lambda p, f, c: MemoryWriter(p, f, c)
    with pytest.raises(InputError, match=r"pts2d has 6 along views \(axis 0\) but 7 were expected"):
        render_pose2d_video("x.mp4", frames, res.pts2d[:6], res.conf, res.skeleton, res.view_names, fps=100, writer=w)
    with pytest.raises(InputError, match=r"frames_by_view has no frames for view\(s\) \['lm'\]"):
        render_pose3d_video("x.mp4", {v: f for v, f in frames.items() if v != "lm"}, res, writer=w)
    with pytest.raises(InputError, match=r"unknown view\(s\) \['side'\]"):
        render_pose2d_video("x.mp4", frames, res.pts2d, res.conf, res.skeleton, res.view_names, fps=100,
                                views=["side"], writer=w)
    with pytest.raises(InputError, match="needs a result with pts3d"):
        render_pose3d_video("x.mp4", frames, PoseResult(res.pts2d, res.conf, res.cameras, res.skeleton), writer=w)
    with pytest.raises(InputError, match="pts2d has 37 along points"):
        draw_skeleton(np.zeros((10, 10, 3), np.uint8), np.zeros((37, 2)), res.skeleton)


# ---------------------------------------------------------------- config
def test_video_config():
    from pydantic import ValidationError
    cfg = VisualizationConfig()
    assert [(v.name, v.kind) for v in cfg.videos] == [("pose2d", "pose2d"), ("pose3d", "pose3d")]
    ok = VisualizationConfig.model_validate({"videos": [{"name": "x", "kind": "pose3d", "views": ["rh"], "scale": 1}]})
    assert ok.videos[0].filename == "x.mp4" and ok.videos[0].with_3d_panel is True
    for bad in ({"name": "x", "kind": "pose3d", "scale": 0}, {"name": "x", "kind": "pose3d", "colour": 1},
                {"name": "x", "kind": "3d"}, {"name": "../x", "kind": "pose2d"}, {"name": "x", "kind": "pose2d", "fps": "30"},
                {"name": "x", "kind": "pose2d", "views": []}):
        with pytest.raises(ValidationError):
            VisualizationConfig.model_validate({"videos": [bad]})
    assert ok.dangling_views(["rh", "lh"]) == []
    assert ok.dangling_views(["lh"])[0][0] == "visualization.videos[0].views[0]"


def test_render_videos_from_config_in_one_pass(syn):
    res, frames = syn
    got = {}
    def w(p, f, c): got[Path(p).name] = m = MemoryWriter(p, f, c); return m
    pulled = {v: 0 for v in res.view_names}
    def gen(v):                                         # a one-shot source: both videos must share one pass
        for f in frames[v]:
            pulled[v] += 1
            yield f
    paths = render_videos(Path("out"), VisualizationConfig(), res, {v: gen(v) for v in res.view_names}, writer=w)
    assert [p.name for p in paths] == ["pose2d.mp4", "pose3d.mp4"]
    assert len(got["pose2d.mp4"].frames) == len(got["pose3d.mp4"].frames) == 6
    assert set(pulled.values()) == {6}
    # the pose2d video shows the detections: the pixel under each separated detection has its limb colour
    lay = grid_layout([(60, 120)] * 7)
    cols = point_colors_u8(res.skeleton)
    uv = scaled_points(res.pts2d[:, 4], 0.5, 0.5)
    n = 0
    for v in range(7):
        x0, y0 = lay.origin(v)
        for i in separated_points(uv[v], cols, 2 * default_radius_px((60, 120)) + 1):
            x, y = uv[v, i]
            if 0 <= x < 120 and 0 <= y < 60:
                assert got["pose2d.mp4"].frames[4][y0 + int(round(y)), x0 + int(round(x))].tolist() == cols[i].tolist()
                n += 1
    assert n > 50


# ---------------------------------------------------------------- report
def test_report_html_is_one_offline_file(syn, tmp_path):
    res, _ = syn
    est = PoseResult(res.pts2d, res.conf, res.cameras, res.skeleton, pts3d=triangulate(res.cameras, res.pts2d), fps=100)
    n_figs = len(inspection_figures(est, res))
    assert n_figs == 7
    path = write_report_html(tmp_path / "report.html", est, truth=res)
    text = path.read_text()
    assert text.count("* plotly.js v") == 1                 # plotly.js embedded once
    assert text.count("Plotly.newPlot(") == n_figs
    assert "<script src=" not in text                        # nothing to fetch
    assert "3D error against ground truth" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert len(inspection_figures(PoseResult(res.pts2d, res.conf, res.cameras, res.skeleton))) == 1


def test_a_video_replaces_no_file_unasked_and_never_the_footage_it_draws_on(syn, tmp_path):
    from deeperfly_nb.io import VideoWriter, open_reader
    res, frames = syn
    dest = tmp_path / "pose2d.mp4"; dest.write_bytes(b"a user's notes")
    with pytest.raises(InputError, match="pose2d.mp4 exists"):
        render_pose2d_video(dest, frames, res.pts2d, res.conf, res.skeleton, res.view_names, fps=100)
    assert dest.read_bytes() == b"a user's notes"
    footage = tmp_path / "camera_0.mp4"
    with VideoWriter(footage, fps=100) as w:
        for f in frames["rh"]: w.write(f)
    before = footage.read_bytes()
    with pytest.raises(InputError, match="camera_0.mp4 is footage the video draws on"):
        render_pose2d_video(footage, {"rh": open_reader(footage)}, res.pts2d, res.conf, res.skeleton, res.view_names,
                            fps=100, views=["rh"], overwrite=True)
    assert footage.read_bytes() == before
