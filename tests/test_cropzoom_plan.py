"""Cropzoom in the detection plan: bad configs named at their key (nothing written), a two-stage plan streamed end to end
with its pose points back in raw pixels, 3D-centre boxes routed to the right views, and plans without cropzoom unchanged."""
import copy, os
from pathlib import Path
import numpy as np
import pytest, tomli_w, torch
from conftest import tiny_recording
from deeperfly_nb import decoding
from deeperfly_nb.config import Config
from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.detector import HourglassNet, load_models, save_checkpoint
from deeperfly_nb.inference import crop_boxes, detect_2d
from deeperfly_nb.plan import DetectionPlan

FINDER_HW, POSE_HW = [64, 128], [128, 256]

def cropzoom_tables(d:dict, **crop) -> dict:
    "The default config `d` made two-stage: a finder pathway per source, every pose pathway cropping around its source's finder."
    d = copy.deepcopy(d)
    p2 = d["pose2d"]
    p2["models"].append({**p2["models"][0], "name": "finder", "input_size": FINDER_HW, "weights": "finder.pt"})
    zoom = {"kind": "cropzoom", "crop_size": 200, "anchor_points": [0], "smooth_frames": 1, "min_confidence": 0.0, **crop}
    p2["preprocessors"] = [{"name": "zoom", **zoom}, {"name": "zoom_flip", "ops": [{"op": "fliplr"}], **zoom}]
    finders = [{"name": f"find_{s['name']}", "source": s["name"], "model": "finder"} for s in d["sources"]]
    for pw in p2["pathways"]:
        pw.update(preprocessor="zoom_flip" if pw.get("preprocessor") == "flip" else "zoom", crop_from=f"find_{pw['source']}")
    p2["pathways"] = finders + p2["pathways"]
    return d

@pytest.fixture(scope="module")
def base() -> dict:
    return Config.default().to_dict()

def errors(d:dict, tmp_path:Path) -> list:
    "The lines of the ConfigError that loading `d` from a file gives; the folder holds nothing new afterwards."
    p = tmp_path / "config.toml"
    p.write_text(tomli_w.dumps(d))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as e: Config.load(p)
    assert sorted(tmp_path.rglob("*")) == before, "a failed load wrote something"
    return str(e.value).splitlines()

def pre(d, k=0): return d["pose2d"]["preprocessors"][k]
def pathway(d, name): return next(p for p in d["pose2d"]["pathways"] if p["name"] == name)

# ------------------------------------------------------------------------------------------ bad configs, named at their key
def _both(d): pre(d)["crop_ratio"] = 1.5
def _neither(d): del pre(d)["crop_size"]
def _ratio_one(d): del pre(d)["crop_size"]; pre(d)["crop_ratio"] = 1.0
def _ratio_small(d): del pre(d)["crop_size"]; pre(d)["crop_ratio"] = 0.5
def _no_pathway(d): pre(d)["from_pathway"] = "find_vid_rhh"; del pathway(d, "rh")["crop_from"]
def _no_crop_from(d): pathway(d, "rm")["crop_from"] = "find_vid_rn"
def _self_cycle(d): pathway(d, "rh")["crop_from"] = "rh"
def _two_cycle(d):
    pathway(d, "rh")["crop_from"] = "rm"; pathway(d, "rm")["crop_from"] = "rh"
def _input_size(d): pre(d)["output_size"] = [128, 256]
def _typo(d): pre(d)["anchor_pionts"] = pre(d).pop("anchor_points")
def _other_source(d): pathway(d, "rh")["crop_from"] = "find_vid_rm"
def _anchor_names(d): pre(d)["anchor_points"] = ["rh_coxa_femur"]
def _stray_crop_from(d): pathway(d, "find_vid_rh")["crop_from"] = "find_vid_rm"

BAD = {  # name: (edit, key path, a phrase of the message)
    "both sizing options": (_both, "pose2d.preprocessors[0].crop_size", "give crop_ratio or crop_size, not both"),
    "neither sizing option": (_neither, "pose2d.preprocessors[0]", "give crop_ratio"),
    "crop_ratio = 1": (_ratio_one, "pose2d.preprocessors[0].crop_ratio", "expected a number > 1"),
    "crop_ratio < 1": (_ratio_small, "pose2d.preprocessors[0].crop_ratio", "expected a number > 1"),
    "from_pathway names no pathway": (_no_pathway, "pose2d.preprocessors[0].from_pathway",
                                      "'find_vid_rhh' is not a pathway; known: find_vid_rh"),
    "crop_from names no pathway": (_no_crop_from, "pose2d.pathways[8].crop_from", "(did you mean 'find_vid_rm'?)"),
    "a pathway cropping from itself": (_self_cycle, "pose2d.pathways[7].crop_from", "crops from its own output: rh -> rh"),
    "two pathways cropping from each other": (_two_cycle, "pose2d.pathways[7].crop_from", "crops from its own output: rh -> rm -> rh"),
    "crop size the pose model does not take": (_input_size, "pose2d.preprocessors[0].output_size",
                                               "[128, 256] but pathway 'rh' runs model 'deepfly2d' whose input_size is [256, 512]"),
    "unknown key": (_typo, "pose2d.preprocessors[0].anchor_pionts", "(did you mean 'anchor_points'?)"),
    "upstream on another source (2D)": (_other_source, "pose2d.pathways[7].crop_from", "reads source 'vid_rh' but 'find_vid_rm' reads 'vid_rm'"),
    "anchor names through an upstream writing no points": (_anchor_names, "pose2d.preprocessors[0].anchor_points",
                                                            "writes no output points, so anchor_points are its channel indices"),
    "crop_from without a cropzoom": (_stray_crop_from, "pose2d.pathways[0].crop_from", "only a pathway whose preprocessor is a cropzoom"),
}

def test_the_good_config_loads(base, tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(tomli_w.dumps(cropzoom_tables(base)))
    plan = Config.load(p).detection_plan()
    assert [[plan.pathways[i].name for i in s] for s in plan.stages()] == [
        ["find_vid_rh", "find_vid_rm", "find_vid_rf", "find_vid_f", "find_vid_lf", "find_vid_lm", "find_vid_lh"],
        ["rh", "rm", "rf", "f", "f_flip", "lf_flip", "lm_flip", "lh_flip"]]
    assert plan.pathway("lh_flip").crop_from == "find_vid_lh" and plan.crop_spec("lh_flip").name == "zoom_flip"
    assert plan.pathway("f_flip").crop_from == plan.pathway("f").crop_from == "find_vid_f"

@pytest.mark.parametrize("case", list(BAD))
def test_bad_cropzoom_config_names_the_key(case, base, tmp_path):
    edit, key, phrase = BAD[case]
    d = cropzoom_tables(base)
    edit(d)
    lines = errors(d, tmp_path)
    assert any(l.startswith(f"{tmp_path / 'config.toml'}: {key}: ") and phrase in l for l in lines), lines
    # the plan built from the tables directly (not through a config file) refuses them the same way
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        DetectionPlan.from_tables(d["sources"], d["pose2d"], Config.default().skeleton(), list(d["cameras"]), warn=False)

# ------------------------------------------------------------------------------------------ end to end through detect_2d
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, torch_one_thread):
    "(recording folder, a two-stage cropzoom config dict, the default config dict) on a tiny synthetic recording."
    root = tmp_path_factory.mktemp("cz")
    d = tiny_recording(root, n_frames=4)
    for name, hw, seed in (("finder.pt", FINDER_HW, 3), ("pose.pt", POSE_HW, 4)):       # small inputs: a fast test
        torch.manual_seed(seed)
        save_checkpoint(root / name, HourglassNet(n_stacks=1, n_blocks=1, n_features=16, n_out_channels=19, n_stem_features=8), {"input_size": hw})
    d["pose2d"]["models"][0].update(weights=str(root / "pose.pt"), input_size=POSE_HW)
    cz = cropzoom_tables(d)
    cz["pose2d"]["models"][1]["weights"] = str(root / "finder.pt")
    return root / "rec", cz, d

def test_two_stage_plan_points_come_back_in_raw_pixels(tiny):
    rec, cz, _ = tiny
    plan = Config.from_dict(cz).detection_plan()
    models = load_models(plan)
    uv = (0.375, 0.5625)                     # a decoder that always finds this normalized point (exact in float32)
    decoding.DECODERS["fixed_uv"] = decoding.Decoder("fixed_uv", lambda hm: (torch.tensor(uv).expand(*hm.shape[:-2], 2).clone(),
                                                                            torch.ones(hm.shape[:-2])), 0.0)
    models["deepfly2d"].decoder = "fixed_uv"
    try: det = detect_2d(plan, models, rec, chunk_frames=2, batch_size=5, progress=False)
    finally: del decoding.DECODERS["fixed_uv"]
    T = det.n_frames
    assert T == 4 and sorted(det.upstream) == sorted(f"find_{s.name}" for s in plan.sources)
    assert sorted(det.boxes) == sorted(pw.name for pw in plan.pathways if pw.crop_from)
    for pw in plan.pathways:
        if pw.crop_from is None: continue
        b, (up_xy, _) = det.boxes[pw.name], det.upstream[pw.crop_from]
        assert b.out_hw == tuple(POSE_HW) and up_xy.shape == (T, 19, 2) and up_xy.dtype == np.float32
        # a fixed-size box: crop_size = 200 px high, the model's aspect, centred on the finder's channel 0 (the anchor)
        np.testing.assert_allclose(b.hw_px[0], np.tile([200.0, 400.0], (T, 1)))
        np.testing.assert_allclose(b.corner_px[0] - 0.5 + b.hw_px[0, :, ::-1] / 2, up_xy[:, 0], atol=1e-4)
        # the pose point of the crop, back in raw pixels: corner - 0.5 + (u w, v h), mirrored crops with u -> 1 - u
        u = 1 - uv[0] if pw.transform.ops else uv[0]
        want = b.corner_px[0] - 0.5 + np.array([u, uv[1]]) * b.hw_px[0, :, ::-1]
        for c, v, n in pw.mapping:
            np.testing.assert_allclose(det.pts2d[v, :, n], want, rtol=0, atol=1e-9)
    assert np.isfinite(det.pts2d).all(-1).any(1).tolist() == plan.visibility_mask().tolist()

def test_cached_stages_are_not_rerun(tiny):
    rec, cz, _ = tiny
    plan = Config.from_dict(cz).detection_plan()
    models = load_models(plan)
    first = detect_2d(plan, models, rec, chunk_frames=3, progress=False)
    # each frame's pose points: that frame cut out by its own box, the network, the decoder, and back through the box
    from deeperfly_nb.cropzoom import crop_frames, from_crop
    from deeperfly_nb.io import open_reader
    m, frames = models["deepfly2d"], open_reader(rec / "camera_6.mp4")[:]
    pw = plan.pathway("lh_flip")
    b, dec = first.boxes["lh_flip"], decoding.get_decoder(m.decoder)
    for t in range(first.n_frames):
        x, hm = m.buffers(1)
        m.heatmaps(m.prepare(pw.transform.apply(crop_frames(frames[t:t + 1], b, 0, [t])), out=x), out=hm)
        pn, c = (v.cpu().numpy() for v in dec.decode(hm))
        crop_px = decoding.normalized_peaks_to_original_pixels(pn[0], pw.transform, m.input_size, b.out_hw)
        t_box = type(b)(b.corner_px[:, t:t + 1], b.hw_px[:, t:t + 1], b.out_hw, b.filled[:, t:t + 1], b.image_hw)
        px = from_crop(crop_px[None, None], t_box)[0, 0]
        for ch, v, n in pw.mapping:
            np.testing.assert_allclose(first.pts2d[v, t, n], px[ch], rtol=0, atol=1e-9)
            assert first.conf[v, t, n] == c[0, ch]
    calls = []
    orig = models["finder"].heatmaps
    models["finder"].heatmaps = lambda *a, **k: calls.append(1) or orig(*a, **k)
    again = detect_2d(plan, models, rec, chunk_frames=3, progress=False, upstream=first.upstream, boxes=first.boxes)
    assert calls == [] and np.array_equal(again.pts2d, first.pts2d, equal_nan=True)
    with pytest.raises(InputError, match=r"upstream\['find_vid_rh'\] must be xy \(4, 19, 2\)"):
        detect_2d(plan, models, rec, progress=False, upstream={"find_vid_rh": (np.zeros((3, 19, 2)), np.zeros((3, 19)))})

def test_plan_without_cropzoom_is_unchanged(tiny):
    "The default plan: no stages, no upstream or boxes kept, and every point exactly what the pathway's own route gives."
    rec, _, d = tiny
    plan = Config.from_dict(d).detection_plan()
    assert len(plan.stages()) == 1 and all(pw.crop_from is None for pw in plan.pathways)
    models = load_models(plan)
    det = detect_2d(plan, models, rec, chunk_frames=2, batch_size=3, progress=False)
    assert det.upstream == {} and det.boxes == {}
    from deeperfly_nb.io import open_reader
    m = models["deepfly2d"]
    dec = decoding.get_decoder(m.decoder)
    for pw in plan.pathways:
        frames = open_reader(rec / f"camera_{[s.name for s in plan.sources].index(pw.source)}.mp4")[:]
        for t in range(det.n_frames):
            x, hm = m.buffers(1)
            m.heatmaps(m.prepare(pw.transform.apply(frames[t:t + 1]), out=x), out=hm)
            pn, c = (v.cpu().numpy() for v in dec.decode(hm))
            px = decoding.normalized_peaks_to_original_pixels(pn[0], pw.transform, m.input_size, frames.shape[1:3])
            for ch, v, n in pw.mapping:
                assert np.array_equal(det.pts2d[v, t, n], px[ch]) and det.conf[v, t, n] == c[0, ch]

# ------------------------------------------------------------------------------------------ 3D centre: boxes land in their views
def test_3d_centre_boxes_follow_each_views_projection(base):
    d = cropzoom_tables(base)
    for p in d["pose2d"]["preprocessors"]:
        del p["crop_size"]
        p.update(centre="3d", box_size_3d=0.6)
    cfg = Config.from_dict(d)
    plan, rig = cfg.detection_plan(), cfg.camera_group((480, 960))
    T = 4
    X = np.stack([np.linspace(-0.2, 0.2, T), np.zeros(T), np.linspace(0, 0.1, T)], 1)            # the animal's centre, world units
    uv = rig.project(X)                                                                          # (V, T, 2)
    upstream = {}
    for pw in plan.pathways:
        if pw.crop_from:
            v = pw.view_indices[0]
            xy = np.repeat(uv[v][:, None], 19, 1).astype(np.float32)
            conf = np.ones((T, 19), np.float32)
            if plan.view_names[v] == "rm": conf[:] = 0                                           # this view's finder failed
            upstream[pw.crop_from] = (xy, conf)
    with pytest.raises(InputError, match="need the rig"):
        crop_boxes(plan, upstream, {s.name: (480, 960) for s in plan.sources})
    boxes = crop_boxes(plan, upstream, {s.name: (480, 960) for s in plan.sources}, cameras=rig)
    for pw in plan.pathways:
        if not pw.crop_from: continue
        b, v = boxes[pw.name], pw.view_indices[0]
        centre = b.corner_px[0] - 0.5 + b.hw_px[0, :, ::-1] / 2
        np.testing.assert_allclose(centre, uv[v], atol=0.5, err_msg=pw.name)                     # on the animal in its own view

def test_3d_centre_plan_end_to_end(tiny):
    "detect_2d with centre = '3d' crops: the rig from a function of the footage sizes, the finder's points given, the pose points remapped."
    rec, cz, _ = tiny
    d = copy.deepcopy(cz)
    for p in d["pose2d"]["preprocessors"]:
        del p["crop_size"]
        p.update(centre="3d", box_size_3d=0.6)
    cfg = Config.from_dict(d)
    plan = cfg.detection_plan()
    asked = []
    def rig_for(sizes): asked.append(sizes); return cfg.camera_group(sizes)
    rig = cfg.camera_group((480, 960))
    X = np.stack([np.linspace(-0.1, 0.1, 4), np.zeros(4), np.zeros(4)], 1)
    uv = rig.project(X)
    upstream = {pw.crop_from: (np.repeat(uv[pw.view_indices[0]][:, None], 19, 1).astype(np.float32), np.ones((4, 19), np.float32))
                for pw in plan.pathways if pw.crop_from}
    models = load_models(plan)
    det = detect_2d(plan, models, rec, progress=False, upstream=upstream, cameras=rig_for)
    assert len(asked) == 1 and set(asked[0]) == set(plan.view_names)
    for pw in plan.pathways:
        if not pw.crop_from: continue
        b, v = det.boxes[pw.name], pw.view_indices[0]
        np.testing.assert_allclose(b.corner_px[0] - 0.5 + b.hw_px[0, :, ::-1] / 2, uv[v], atol=0.5)
        inside = (det.pts2d[v, :, pw.mapping[:, 2]] >= b.corner_px[0] - 0.5) & (det.pts2d[v, :, pw.mapping[:, 2]] <= b.corner_px[0] - 0.5 + b.hw_px[0, :, ::-1])
        assert inside.all(), pw.name                                                     # every pose point lies in its crop
    from deeperfly_nb.inference import detect_sequence, open_sources
    readers = open_sources(plan, rec)
    windows = {s: np.stack([r[t] for t in range(2)]) for s, r in readers.items()}
    for r in readers.values(): r.close()
    with pytest.raises(InputError, match="no frame has an anchor point seen by two agreeing views"):   # a random finder's points
        detect_sequence(plan, models, windows, cameras=rig_for)       # the same rig argument detect_2d takes: it is used
    assert len(asked) == 2 and set(asked[1]) == set(plan.view_names)


def test_a_cropzoom_pathway_learns_from_crops_not_whole_frames(base, tmp_path):
    "Whole frames given to a cropzoom pathway would train it on images it never sees: refused; crops at its input size pass."
    from deeperfly_nb.labels import ArrayFrames, LabelSet, pathway_samples
    p = tmp_path / "config.toml"
    p.write_text(tomli_w.dumps(cropzoom_tables(base)))
    cfg = Config.load(p)
    plan, fly = cfg.detection_plan(), cfg.skeleton()
    pose = plan.pathway("rh").model
    H, W = plan.crop_out_hw("rh")
    rng = np.random.default_rng(0)
    def labels(hw):
        pts = np.full((1, 1, fly.n_points, 2), np.nan)
        seen = plan.visibility_mask()[plan.view_names.index("rh")]
        pts[0, 0, seen] = np.stack([rng.uniform(5, hw[1] - 5, seen.sum()), rng.uniform(5, hw[0] - 5, seen.sum())], -1)
        return LabelSet(pts, ["rh"], fly, ArrayFrames({"rh": rng.integers(0, 255, (1, *hw, 3), dtype=np.uint8)}))
    with pytest.raises(InputError, match=f"pathway 'rh' crops around pathway 'find_vid_rh'.s points, so it learns from crops of "
                                         f"{H}x{W} px, but view 'rh'.s labelled images are 480x960 px"):
        pathway_samples(labels((480, 960)), plan, pose)
    s = pathway_samples(labels((H, W)), plan, pose)
    assert [s.pathway_names[k] for k in s.pathway] == ["rh"] and s.images.shape[1:3] == (H, W)
