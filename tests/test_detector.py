"""Detector and decoding: DeepFly2D checkpoint layouts, weights resolution and cache, the skimage-exact input
contract, LoadedModel, sub-pixel decoding, the coordinate round trip and channel routing."""
import dataclasses
import hashlib
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from deeperfly_nb.testing import random_df2d_checkpoint
from hypothesis import assume, given, settings, strategies as st

import deeperfly_nb.detector as det
from deeperfly_nb.config import Config
from deeperfly_nb.core import InputError, ModelError
from deeperfly_nb.decoding import (DECODERS, argmax_peaks_torch, gaussian_heatmaps, heatmap_to_points, heatmap_to_points_torch,
                                   normalized_peaks_to_original_pixels, route_channels_to_points_in_views)
from deeperfly_nb.inference import detect_sequence
from deeperfly_nb.detector import (HourglassNet, build_network, infer_architecture, load_checkpoint, load_model,
                                   load_models, resize_like_skimage, resolve_weights, save_checkpoint)
from deeperfly_nb.plan import ConfigWarning, ModelSpec, Transform

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
LAYOUT = SHARED / "df2d_layout" / "df2d_state_dict_keys.json"
FRAMES = sorted((SHARED / "deepfly3d_sample").glob("camera_*_img_*.jpg"))


pytestmark = pytest.mark.usefixtures("torch_one_thread")     # see conftest.py


@pytest.fixture(scope="module")
def layout() -> dict:
    if not LAYOUT.exists(): pytest.skip(f"DeepFly2D layout not found at {LAYOUT} (it lives in ../shared/data beside the repository)")
    return json.loads(LAYOUT.read_text())


@pytest.fixture(scope="module")
def real_frame() -> np.ndarray:
    if not FRAMES: pytest.skip(f"real DeepFly3D frames not found under {SHARED / 'deepfly3d_sample'} (it lives in ../shared/data beside the repository)")
    import cv2
    return cv2.cvtColor(cv2.imread(str(FRAMES[10])), cv2.COLOR_BGR2RGB)


def spec(**kw) -> ModelSpec:
    return ModelSpec(**(dict(name="df2d", cls="hourglass", weights=None, sha256=None, input_size=(256, 512), n_out_channels=19,
                             mean=0.22, options={}, base_dir=None) | kw))


# --- the published layouts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,n_stacks", [("sh2", 2), ("sh8", 8)])
def test_published_layouts_load_strictly(layout, tmp_path, name, n_stacks):
    assert layout["prefix"] == "module."
    sd = random_df2d_checkpoint(tmp_path / f"{name}.tar", layout[name])
    raw = torch.load(tmp_path / f"{name}.tar", weights_only=True)
    assert sorted(raw) == sorted(layout["top_level_keys"])
    state, meta = load_checkpoint(tmp_path / f"{name}.tar")
    assert meta == {"epoch": 12, "arch": "hg", "best_acc": 0.8}
    arch = infer_architecture(state)
    assert arch["n_stacks"] == n_stacks and arch["n_out_channels"] == 19
    net = build_network(state, {"n_out_channels": 19})
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == layout[name]
    for k in list(layout[name])[::97]: assert torch.equal(net.state_dict()[k], sd["module." + k])


def test_use_stack_runs_only_the_first_stacks(layout, tmp_path, real_frame):
    random_df2d_checkpoint(tmp_path / "sh8.tar", layout["sh8"])
    fused = load_model(spec(weights="sh8.tar", base_dir=tmp_path, options={"use_stack": 2}), device="cpu")
    assert fused.fused is not None and fused.fused.n_stacks == 2 and len(fused.fused.hg) == 2   # only 2 stacks rebuilt
    model = load_model(spec(weights="sh8.tar", base_dir=tmp_path, options={"use_stack": 2}), device="cpu", fused=False)
    assert model.use_stack == 2 and model.net.n_stacks == 8
    ran = []
    hooks = [model.net.hg[i].register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i in range(8)]
    x = model.prepare(real_frame[None, :, ::-1])
    hm = model.predict_heatmaps(x)
    for h in hooks: h.remove()
    assert ran == [0, 1]
    assert hm.shape == (1, 19, 64, 128) and hm.dtype == np.float32 and np.isfinite(hm).all()
    with torch.inference_mode(): second = model.net(x, n_stacks=2)[1].numpy()
    np.testing.assert_allclose(hm, second, atol=1e-5)
    np.testing.assert_allclose(fused.predict_heatmaps(x), second, atol=1e-5)


def test_layout_mismatch_names_the_first_key(layout, tmp_path):
    random_df2d_checkpoint(tmp_path / "sh2.tar", layout["sh2"])
    with pytest.raises(ModelError, match=r"sh2\.tar: missing key 'module\.hg\.2\.hg\.0\.0\.0\.bn1\.weight'.*2-stack.*n_stacks = 8"):
        load_model(spec(weights="sh2.tar", base_dir=tmp_path, options={"n_stacks": 8}), device="cpu")
    with pytest.raises(ModelError, match=r"'module\.score\.0\.weight' has shape \[19, 256, 1, 1\] but \[38, 256, 1, 1\]"):
        load_model(spec(weights="sh2.tar", base_dir=tmp_path, n_out_channels=38), device="cpu")
    with pytest.raises(ModelError, match="use_stack = 3 but checkpoint .*sh2.tar has 2 stack"):
        load_model(spec(weights="sh2.tar", base_dir=tmp_path, options={"use_stack": 3}), device="cpu")


def test_corrupt_and_wrong_files(tmp_path):
    net = HourglassNet(n_stacks=1, n_features=8, n_stem_features=8)
    save_checkpoint(tmp_path / "ok.pt", net)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match=r"cannot read checkpoint .*cut\.pt.*is the file complete"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"list\.pt holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7)}}, tmp_path / "partial.pt")
    state, _ = load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(ModelError, match=r"not a stacked-hourglass state dict: key 'module\.score\.0\.weight' is missing"):
        build_network(state, source="partial.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(spec(weights="absent.pt", base_dir=tmp_path))


def test_save_is_atomic_and_keeps_metadata(tmp_path, monkeypatch):
    net = HourglassNet(n_stacks=2, n_features=8, n_stem_features=8, n_out_channels=5)
    meta = {"skeleton": "fly38", "channel_names": list("abcde"), "input_size": np.array([128, 256]), "mean": (0.2, 0.2, 0.3),
            "training": {"steps": 10}, "metrics": {"pck": np.float64(0.75)}}
    save_checkpoint(tmp_path / "m.pt", net, meta, epoch=4, best_acc=0.75)
    state, back = load_checkpoint(tmp_path / "m.pt")
    assert back["input_size"] == [128, 256] and back["mean"] == [0.2, 0.2, 0.3] and back["metrics"]["pck"] == 0.75
    assert back["epoch"] == 4 and back["architecture"] == net.architecture
    rebuilt = build_network(state)
    for k, v in net.state_dict().items(): assert torch.equal(rebuilt.state_dict()[k], v)

    def exploding_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(det.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.pt", net)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# --- weights: paths, bundled, download cache ----------------------------------------------------------------------

def test_download_cache(tmp_path, monkeypatch):
    src = tmp_path / "src" / "fly-model.pt"
    src.parent.mkdir()
    save_checkpoint(src, HourglassNet(n_stacks=1, n_features=8, n_stem_features=8))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setenv("DEEPERFLY_CACHE", str(tmp_path / "cache"))
    calls = []

    class Response:
        def __init__(self, data): self.data, self.pos = data, 0
        def read(self, n):
            out = self.data[self.pos:self.pos + n]; self.pos += n; return out
        def __enter__(self): return self
        def __exit__(self, *a): return False

    def opener(url, timeout=None):
        calls.append(url)
        if "offline" in url: raise urllib.error.URLError("Temporary failure in name resolution")
        return Response(src.read_bytes())
    monkeypatch.setattr(det, "_urlopen", opener)
    url = "https://example.org/models/fly-model.pt"
    got = resolve_weights(spec(weights=url, sha256=sha))
    assert got == tmp_path / "cache" / "models" / f"fly-model-{sha[:8]}.pt"
    assert got.read_bytes() == src.read_bytes() and calls == [url]
    assert resolve_weights(spec(weights=url, sha256=sha)) == got and calls == [url]        # cached: downloaded once
    got.write_bytes(b"corrupted")                                                         # a damaged cache is fetched again
    assert resolve_weights(spec(weights=url, sha256=sha.upper())).read_bytes() == src.read_bytes() and len(calls) == 2

    with pytest.raises(ModelError, match="nothing was saved"):
        resolve_weights(spec(weights="https://example.org/models/other.pt", sha256="a" * 64))
    assert sorted(p.name for p in got.parent.iterdir()) == [got.name]

    bad = "https://offline.example.org/sh8_deepfly.tar"
    with pytest.raises(ModelError) as e:
        resolve_weights(spec(weights=bad, sha256=sha))
    msg = str(e.value)
    assert bad in msg and sha in msg and str(tmp_path / "cache" / "models" / f"sh8_deepfly-{sha[:8]}.tar") in msg

    # a file:// URL goes through the real opener
    monkeypatch.setattr(det, "_urlopen", det.urllib.request.urlopen)
    monkeypatch.setenv("DEEPERFLY_CACHE", str(tmp_path / "cache2"))
    assert resolve_weights(spec(weights=src.as_uri(), sha256=sha)).read_bytes() == src.read_bytes()


def test_cache_location_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("DEEPERFLY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert det.cache_dir() == tmp_path / ".cache" / "deeperfly" / "models"
    monkeypatch.setenv("DEEPERFLY_CACHE", "/somewhere")
    assert det.cache_dir() == Path("/somewhere/models")


def test_weight_paths_and_bundled(tmp_path):
    save_checkpoint(tmp_path / "w.pt", HourglassNet(n_stacks=1, n_features=8, n_stem_features=8))
    sha = hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    assert resolve_weights(spec(weights="w.pt", base_dir=tmp_path, sha256=sha)) == tmp_path / "w.pt"
    assert resolve_weights(spec(weights=str(tmp_path / "w.pt"))) == tmp_path / "w.pt"
    with pytest.raises(ModelError, match="has sha256"):
        resolve_weights(spec(weights="w.pt", base_dir=tmp_path, sha256="0" * 64))
    with pytest.raises(ModelError, match=r"no bundled model 'nope'.*give weights as a path or URL"):
        resolve_weights(spec(weights="bundled:nope"))


# --- the input contract -------------------------------------------------------------------------------------------

def test_resize_matches_skimage_on_real_frames(real_frame):
    from skimage.transform import resize
    for img in (real_frame, real_frame[:, ::-1]):
        ref = resize(img, (256, 512), anti_aliasing=True)
        ours = resize_like_skimage(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255, (256, 512))
        assert np.abs(ours.permute(1, 2, 0).numpy() - ref).max() < 1e-3


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), oh=st.integers(1, 70), ow=st.integers(1, 70), seed=st.integers(0, 1000))
def test_resize_matches_skimage_any_size(h, w, oh, ow, seed):
    from skimage.transform import resize
    img = np.random.default_rng(seed).random((h, w, 2))
    ref = resize(img, (oh, ow), anti_aliasing=True)
    ours = resize_like_skimage(torch.from_numpy(img).permute(2, 0, 1), (oh, ow)).permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 1e-9


def test_prepare_is_the_df2d_input(real_frame, tmp_path):
    from skimage.transform import resize
    save_checkpoint(tmp_path / "s.pt", HourglassNet(n_stacks=1, n_features=8, n_stem_features=8), {"input_size": [256, 512]})
    model = load_model(spec(weights="s.pt", base_dir=tmp_path), device="cpu")
    flipped = Transform([{"op": "fliplr"}]).apply(real_frame)
    x = model.prepare(np.stack([real_frame, flipped]))
    assert x.shape == (2, 3, 256, 512) and x.device.type == "cpu"
    expected = resize(real_frame[:, ::-1], (256, 512), anti_aliasing=True) - 0.22
    assert np.abs(x[1].permute(1, 2, 0).numpy() - expected).max() < 1e-5
    with pytest.raises(ModelError, match="float16 needs a GPU"):
        load_model(spec(weights="s.pt", base_dir=tmp_path), device="cpu", dtype="float16")
    with pytest.raises(ModelError, match="trained on input_size"):
        load_model(spec(weights="s.pt", base_dir=tmp_path, input_size=(128, 256)), device="cpu")
    with pytest.raises(InputError, match="call prepare"):
        model.predict_heatmaps(torch.zeros(1, 3, 64, 64))


def test_load_models_of_the_default_plan(tmp_path):
    save_checkpoint(tmp_path / "s.pt", HourglassNet(n_stacks=1, n_features=8, n_stem_features=8))
    plan = Config.default().detection_plan()
    plan.models["deepfly2d"] = dataclasses.replace(plan.models["deepfly2d"], weights=str(tmp_path / "s.pt"))
    models = load_models(plan, device="cpu")
    assert list(models) == ["deepfly2d"] and models["deepfly2d"].input_size == (256, 512)
    assert models["deepfly2d"].mean == (0.22, 0.22, 0.22) and models["deepfly2d"].device().type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_precision(tmp_path, dtype):
    from skimage.transform import resize
    save_checkpoint(tmp_path / "s.pt", HourglassNet(n_stacks=2, n_features=16, n_stem_features=8))
    m32 = load_model(spec(weights="s.pt", base_dir=tmp_path))
    mh = load_model(spec(weights="s.pt", base_dir=tmp_path), dtype=dtype)
    assert m32.device().type == "cuda"
    frames = (np.random.default_rng(0).random((2, 480, 960, 3)) * 255).astype(np.uint8)
    x = m32.prepare(frames)
    assert np.abs(x[0].permute(1, 2, 0).cpu().numpy() - (resize(frames[0], (256, 512), anti_aliasing=True) - 0.22)).max() < 1e-5
    h32, hh = m32.predict_heatmaps(x), mh.predict_heatmaps(mh.prepare(frames))
    assert hh.dtype == np.float32 and np.abs(hh - h32).max() < 0.05 * np.abs(h32).max()
    xy, conf = heatmap_to_points_torch(m32.heatmaps(x))
    assert xy.device.type == "cuda" and xy.shape == (2, 19, 2)


# --- decoding -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_subpixel_decoding_beats_argmax(sigma):
    rng = np.random.default_rng(7)
    n, hw = 400, (64, 128)
    cells = np.stack([rng.uniform(4, hw[1] - 4, n), rng.uniform(4, hw[0] - 4, n)], -1)
    truth = (cells + 0.5) / [hw[1], hw[0]]
    clean = gaussian_heatmaps(truth[:, None], hw, sigma)[:, 0]
    noisy = clean + 0.05 * rng.standard_normal(clean.shape).astype(np.float32)
    err = lambda xy: np.linalg.norm((xy[:, :] - truth) * [hw[1], hw[0]], axis=-1)
    argmax = err(heatmap_to_points(noisy, smooth_sigma=0, refine=False)[0])
    refined = err(heatmap_to_points(noisy)[0])
    assert np.median(argmax) > 0.3
    assert np.median(refined) < 0.1
    assert np.median(err(heatmap_to_points(clean)[0])) < 1e-3
    conf = heatmap_to_points(clean)[1]
    assert ((conf > 0.6) & (conf <= 1)).all()


def test_decoding_keeps_leading_axes_and_marks_bad_maps():
    hm = np.zeros((2, 3, 4, 16, 32), np.float32)
    hm[..., 5, 9] = 0.7
    hm[1, 2, 3, 0, 0] = np.inf
    xy, conf = heatmap_to_points(hm)
    assert xy.shape == (2, 3, 4, 2) and conf.shape == (2, 3, 4)
    np.testing.assert_allclose(xy[0, 0, 0], [(9 + 0.5) / 32, (5 + 0.5) / 16], atol=1e-9)
    assert np.isnan(xy[1, 2, 3]).all() and conf[1, 2, 3] == 0 and np.isfinite(xy[0]).all()
    np.testing.assert_allclose(conf[0], 0.7, atol=1e-6)


OPS = st.sampled_from([{"op": "fliplr"}, {"op": "flipud"}, {"op": "rot90", "k": 1}, {"op": "rot90", "k": 3},
                       {"op": "crop", "x": 30, "y": 20, "width": 500, "height": 300}, {"op": "resize", "height": 200, "width": 333}])


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(OPS, max_size=4), seed=st.integers(0, 10_000))
def test_peaks_map_back_to_source_pixels(ops, seed):
    tf = Transform(ops)
    src_hw, in_hw = (480, 960), (256, 512)
    try: tf.output_size(src_hw)
    except InputError: assume(False)          # a crop that does not fit the frame it receives
    pts = np.random.default_rng(seed).uniform([-0.5, -0.5], [959.5, 479.5], (50, 2))
    h, w = tf.output_size(src_hw)
    xm = (tf.from_source(pts, src_hw) + 0.5) * [in_hw[1] / w, in_hw[0] / h] - 0.5
    uv = (xm + 0.5) / [in_hw[1], in_hw[0]]
    np.testing.assert_allclose(normalized_peaks_to_original_pixels(uv, tf, in_hw, src_hw), pts, atol=1e-9)


def test_peaks_from_heatmaps_land_in_the_source(tmp_path):
    "A Gaussian target drawn at a source point, decoded and mapped back through a mirror: the point, on the right side."
    src_hw, in_hw, hm_hw = (480, 960), (256, 512), (64, 128)
    tf = Transform([{"op": "fliplr"}])
    pts = np.array([[100.0, 200.0], [700.3, 50.9]])
    uv = (tf.from_source(pts, src_hw) + 0.5) / [src_hw[1], src_hw[0]]
    xy, _ = heatmap_to_points(gaussian_heatmaps(uv, hm_hw, 1.0))
    np.testing.assert_allclose(normalized_peaks_to_original_pixels(xy, tf, in_hw, src_hw), pts, atol=1e-2)


def test_routing_into_views():
    plan = Config.default().detection_plan()
    T = 3
    out_pts = np.full((plan.n_views, T, plan.n_points, 2), np.nan)
    out_conf = np.zeros((plan.n_views, T, plan.n_points))
    for i, pw in enumerate(plan.pathways):
        xy = np.full((T, 19, 2), float(i))
        route_channels_to_points_in_views(xy, np.full((T, 19), 0.5), pw.mapping, out_pts, out_conf)
    finite = np.isfinite(out_pts).all(-1)
    assert (finite == plan.visibility_mask()[:, None, :]).all()
    f = plan.view_names.index("f")
    written_by = {int(v) for v in out_pts[f, 0, :, 0][finite[f, 0]]}
    assert written_by == {[p.name for p in plan.pathways].index("f"), [p.name for p in plan.pathways].index("f_flip")}
    with pytest.raises(InputError, match="out of range"):
        route_channels_to_points_in_views(xy, np.ones((T, 19)), [(0, plan.n_views, 0)], out_pts, out_conf)


# --- DeepFly2D compatibility ---------------------------------------------------------------------------------------

def test_many_stacks_without_use_stack_warn(layout, tmp_path):
    random_df2d_checkpoint(tmp_path / "sh8.tar", layout["sh8"])
    random_df2d_checkpoint(tmp_path / "sh2.tar", layout["sh2"])
    with pytest.warns(ConfigWarning, match=r"sh8\.tar has 8 stacks and use_stack is not set.*use_stack = 2"):
        m = load_model(spec(weights="sh8.tar", base_dir=tmp_path), device="cpu")
    assert m.use_stack == 8
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(spec(weights="sh8.tar", base_dir=tmp_path, options={"use_stack": 2}), device="cpu").use_stack == 2
        assert load_model(spec(weights="sh2.tar", base_dir=tmp_path), device="cpu").use_stack == 2    # 2 stacks: nothing to say


def test_pickled_objects_refused_without_torchs_advice(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "meta": np.arange(3)}, tmp_path / "pickled.tar")
    with pytest.raises(ModelError) as e:
        load_checkpoint(tmp_path / "pickled.tar")
    msg = str(e.value)
    assert str(tmp_path / "pickled.tar") in msg and "non-tensor Python objects" in msg and "will not execute the pickled code" in msg
    rest = msg.replace(str(tmp_path), "")
    assert "weights_only" not in rest and "trust" not in rest and "add_safe_globals" not in rest
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ModelError, match=r"cannot read checkpoint .*garbage\.pt") as e:
        load_checkpoint(tmp_path / "garbage.pt")
    assert "weights_only" not in str(e.value).replace(str(tmp_path), "")


def df2d_rule(hm: torch.Tensor) -> np.ndarray:
    "DeepFly2D's heatmap2points, map by map: (row, col) of the first maximum / (Hh, Ww), returned as (u, v)."
    out = np.zeros(hm.shape[:-2] + (2,))
    for idx in np.ndindex(*hm.shape[:-2]):
        r, c = (hm[idx] == torch.max(hm[idx])).nonzero(as_tuple=False)[0].tolist()
        out[idx] = c / hm.shape[-1], r / hm.shape[-2]
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), levels=st.integers(2, 6))
def test_argmax_decoder_is_deepfly2ds_rule(seed, levels):
    g = torch.Generator().manual_seed(seed)
    hm = torch.randint(0, levels, (2, 3, 8, 16), generator=g).float() / levels     # few levels: many tied maxima
    xy, conf = argmax_peaks_torch(hm)
    assert np.array_equal(xy.numpy(), df2d_rule(hm))
    np.testing.assert_allclose(conf.numpy(), hm.flatten(-2).amax(-1).numpy())
    assert DECODERS["argmax"].pixel_offset == 0.5 and DECODERS["subpixel"].pixel_offset == 0.0


@pytest.fixture(scope="module")
def sample_windows():
    if not FRAMES: pytest.skip(f"real DeepFly3D frames not found under {SHARED / 'deepfly3d_sample'} (it lives in ../shared/data beside the repository)")
    import cv2
    plan = Config.default().detection_plan()
    read = lambda c, t: cv2.cvtColor(cv2.imread(str(SHARED / "deepfly3d_sample" / f"camera_{c}_img_{t}.jpg")), cv2.COLOR_BGR2RGB)
    return {s.name: np.stack([read(c, t) for t in range(2)]) for c, s in enumerate(plan.sources)}


def small_plan(tmp_path, **options):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "small.pt", HourglassNet(n_stacks=2, n_features=16, n_stem_features=8))
    plan = Config.default().detection_plan()
    plan.models["deepfly2d"] = dataclasses.replace(plan.models["deepfly2d"], weights=str(tmp_path / "small.pt"), options=options)
    return plan


def test_detections_identical_however_batched(tmp_path, sample_windows):
    plan = small_plan(tmp_path)
    models = load_models(plan, device="cpu")
    assert models["deepfly2d"].fused is not None
    first = detect_sequence(plan, models, sample_windows, batch_size=16)
    for b in (1, 3, 16):                      # other batch shapes, and the same shape again (its buffers reused)
        again = detect_sequence(plan, models, sample_windows, batch_size=b)
        assert all(np.array_equal(a, c, equal_nan=True) for a, c in zip(again, first)), b
    # against the network's own forward: float rounding only, which the sub-pixel step amplifies on the flat maps of
    # random weights to a few hundredths of a pixel at most (as much as the NHWC and NCHW eager forwards differ by)
    eager = detect_sequence(plan, load_models(plan, device="cpu", fused=False, channels_last=False), sample_windows)
    assert np.array_equal(np.isnan(eager[0]), np.isnan(first[0]))
    assert np.nanmax(np.abs(eager[0] - first[0])) < 0.05 and np.nanmax(np.abs(eager[1] - first[1])) < 1e-5


def test_argmax_detections_are_deepfly3ds_pixels(tmp_path, sample_windows):
    "On the DeepFly3D rig, argmax points lie on DeepFly3D's 7.5 px lattice and follow DeepFly2D's rule, mirrors included."
    plan = small_plan(tmp_path, decoder="argmax", use_stack=2)
    model = load_models(plan, device="cpu")["deepfly2d"]
    assert model.decoder == "argmax"
    pts2d, conf = detect_sequence(plan, {"deepfly2d": model}, sample_windows)
    seen = np.isfinite(pts2d).all(-1)
    assert seen.sum() == 2 * plan.visibility_mask().sum()
    assert np.array_equal(pts2d[seen] / 7.5, np.round(pts2d[seen] / 7.5))
    for pw in plan.pathways:
        hm = torch.from_numpy(model.predict_heatmaps(model.prepare(pw.transform.apply(sample_windows[pw.source]))))
        uv = df2d_rule(hm)                                                      # (T, 19, 2), DeepFly2D's normalized points
        if pw.preprocessor == "flip": uv[..., 0] = 1 - uv[..., 0]               # DeepFly3D un-mirrors u as 1 - u
        for c, v, p in pw.mapping:
            np.testing.assert_allclose(pts2d[v, :, p], uv[:, c] * [960, 480], atol=1e-9)
            np.testing.assert_allclose(conf[v, :, p], np.clip(hm[:, c].flatten(1).amax(1).numpy(), 0, 1), atol=1e-6)


def test_deepfly2d_preset_file():
    import tomllib
    from deeperfly_nb.config import ModelConfig
    path = ROOT / "deeperfly_nb" / "data" / "deepfly2d_config.toml"
    preset, default = tomllib.loads(path.read_text()), tomllib.loads((ROOT / "deeperfly_nb" / "data" / "default_config.toml").read_text())
    model = preset["pose2d"]["models"][0]
    assert (model["decoder"], model["use_stack"], model["weights"]) == ("argmax", 2, "weights/sh8_deepfly.tar")
    assert {k: v for k, v in preset.items() if k != "pose2d"} == {k: v for k, v in default.items() if k != "pose2d"}
    assert {k: v for k, v in preset["pose2d"].items() if k != "models"} == {k: v for k, v in default["pose2d"].items() if k != "models"}
    if "decoder" in ModelConfig.model_fields:                   # the schema knows the key: the file loads as it is
        plan = Config.load(path).detection_plan()
        assert plan.models["deepfly2d"].options.get("decoder") == "argmax"    # the config passes it on to the model
    else:                                                       # until then: everything else is valid
        plain = {**preset, "pose2d": {**preset["pose2d"], "models": [{k: v for k, v in model.items() if k != "decoder"}]}}
        plan = Config.from_dict(plain).detection_plan()
    assert plan.models["deepfly2d"].options.get("use_stack") == 2


def test_trained_model_detections_unchanged_by_fused_forward(sample_windows):
    "The bundled trained model on real frames: the fused CPU forward gives the eager network's points to 0.01 px."
    try: det.bundled_weights("fly_synthetic")
    except ModelError as e: pytest.skip(str(e))
    plan = Config.default().detection_plan()
    fused = detect_sequence(plan, load_models(plan, device="cpu"), sample_windows)
    eager = detect_sequence(plan, load_models(plan, device="cpu", fused=False, channels_last=False), sample_windows)
    assert np.array_equal(np.isnan(fused[0]), np.isnan(eager[0]))
    assert np.nanmax(np.abs(fused[0] - eager[0])) < 0.01 and np.nanmax(np.abs(fused[1] - eager[1])) < 1e-4
