"""The detection plan: invertible transforms (property tests), the packaged DeepFly3D plan, and load-time checks of the plan tables."""
import glob, logging, warnings
from pathlib import Path
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from conftest import SHARED_DATA
from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.config import Config, default_config_text, write_config
from deeperfly_nb.plan import (OPS, ConfigWarning, DetectionPlan, ModelSpec, Pathway, Source, Transform, check_ops,
                               plan_problems)
from deeperfly_nb.skeleton import fly38
from deeperfly_nb.synth import DEFAULT_VIEWS, default_visibility

FLY = fly38()
BASE = default_config_text()

# ----------------------------------------------------------------------------------------------- transforms
@st.composite
def op_chains(draw, max_side=1500, max_ops=6, ops=tuple(sorted(OPS))):
    "((H, W), ops): a source size and a random op chain that fits it."
    hw = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    (h, w), chain = hw, []
    for _ in range(draw(st.integers(0, max_ops))):
        name = draw(st.sampled_from(ops))
        if name == "rot90":
            k = draw(st.integers(-7, 7)); chain.append({"op": name, "k": k})
            if k % 2: h, w = w, h
        elif name == "crop":
            cw, ch = draw(st.integers(1, w)), draw(st.integers(1, h))
            chain.append({"op": name, "x": draw(st.integers(0, w - cw)), "y": draw(st.integers(0, h - ch)), "width": cw, "height": ch})
            h, w = ch, cw
        elif name == "resize":
            h, w = draw(st.integers(1, 2 * max_side)), draw(st.integers(1, 2 * max_side))
            chain.append({"op": name, "height": h, "width": w})
        else: chain.append({"op": name})
    return hw, chain

@settings(max_examples=200, deadline=None)
@given(op_chains(), st.integers(0, 2**32 - 1))
def test_forward_then_inverse_is_identity(chain, seed):
    hw, ops = chain
    t = Transform(ops)
    p = np.random.default_rng(seed).uniform(-2000, 4000, (40, 2))
    assert np.abs(t.to_source(t.from_source(p, hw), hw) - p).max() < 1e-6
    assert np.abs(t.from_source(t.to_source(p, hw), hw) - p).max() < 1e-6

@settings(max_examples=100, deadline=None)
@given(op_chains(), op_chains(max_ops=3))
def test_matrix_is_the_point_map_and_composes(a, b):
    hw, ops_a = a
    ta = Transform(ops_a)
    p = np.random.default_rng(0).uniform(-10, 2000, (10, 2))
    M = ta.matrix(hw)
    np.testing.assert_allclose(p @ M[:2, :2].T + M[:2, 2], ta.from_source(p, hw), atol=1e-6)
    # a second chain composes after the first; its crops were drawn for another size and may not fit: drop them
    _, ops_b = b
    hw_b = ta.output_size(hw)
    ops_b = [o for o in ops_b if o["op"] != "crop"]
    tb = Transform(ops_b)
    np.testing.assert_allclose((ta + tb).matrix(hw), tb.matrix(hw_b) @ M, atol=1e-6)

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_chains(max_side=40, ops=("crop", "fliplr", "flipud", "rot90")), st.data())
def test_apply_moves_a_bright_pixel_where_from_source_maps_it(chain, data):
    hw, ops = chain
    t = Transform(ops)
    x, y = data.draw(st.integers(0, hw[1] - 1)), data.draw(st.integers(0, hw[0] - 1))
    img = np.zeros((*hw, 3), np.uint8); img[y, x] = [200, 100, 50]
    out = t.apply(img)
    assert out.shape == (*t.output_size(hw), 3) and out.flags.c_contiguous
    q = t.from_source([x, y], hw)
    inside = (0 <= q[0] <= out.shape[1] - 1) and (0 <= q[1] <= out.shape[0] - 1)
    if inside:        # the pixel survived the crops: it is exactly where the point map says
        assert tuple(out[int(q[1]), int(q[0])]) == (200, 100, 50) and out[..., 0].sum() == 200
    else:             # cropped away
        assert out.sum() == 0
    batch = t.apply(np.stack([img, img[::-1, ::-1]]))
    np.testing.assert_array_equal(batch[0], out)

@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("factor", [2, 3])
def test_resize_up_keeps_a_pixel_centroid_exactly(dtype, factor):
    hw, pix = (11, 13), (5, 4)
    img = np.zeros((*hw, 1), dtype); img[pix[1], pix[0]] = 200
    t = Transform([{"op": "resize", "height": hw[0] * factor, "width": hw[1] * factor}])
    out = t.apply(img)[..., 0].astype(float)
    assert t.apply(img).dtype == dtype
    yy, xx = np.mgrid[:out.shape[0], :out.shape[1]]
    centroid = [(out * xx).sum() / out.sum(), (out * yy).sum() / out.sum()]
    np.testing.assert_allclose(centroid, t.from_source(pix, hw), atol=1e-4)
    # a non-integer factor samples the bilinear tent unevenly: within a tenth of a pixel
    t = Transform([{"op": "resize", "height": 25, "width": 31}])
    out = t.apply(img)[..., 0].astype(float)
    yy, xx = np.mgrid[:25, :31]
    np.testing.assert_allclose([(out * xx).sum() / out.sum(), (out * yy).sum() / out.sum()], t.from_source(pix, hw), atol=0.1)

def test_resize_down_maps_a_block_onto_its_pixel():
    img = np.zeros((4, 30, 40, 3), np.uint8); img[:, 9:12, 21:24] = 255          # a 3x3 block centred on (22, 10)
    t = Transform([{"op": "crop", "x": 0, "y": 0, "width": 39, "height": 30}, {"op": "resize", "height": 10, "width": 13}])
    out = t.apply(img)
    assert out.shape == (4, 10, 13, 3)
    q = t.from_source([22, 10], (30, 40))
    np.testing.assert_allclose(q, [7, 3])
    assert (out[:, 3, 7] == 255).all() and out[..., 0].sum() == 4 * 255

def test_transform_errors_name_the_op_and_the_array():
    with pytest.raises(InputError, match=r"ops\[1\] .*crop.*do not fit in the 10x20 \(HxW\) frame it receives"):
        Transform([{"op": "rot90"}, {"op": "crop", "x": 0, "y": 0, "width": 11, "height": 20}]).output_size((20, 10))
    with pytest.raises(InputError, match=r"frames must have shape \(H, W, C\) or \(T, H, W, C\), got \(5, 6\)"):
        Transform([{"op": "fliplr"}]).apply(np.zeros((5, 6)))
    with pytest.raises(InputError, match=r"src_hw must be two positive integers"):
        Transform().from_source([0, 0], (0, 5))
    with pytest.raises(InputError, match=r"points must have shape \(\.\.\., 2\)"):
        Transform().to_source(np.zeros((3, 3)), (5, 5))
    with pytest.raises(ConfigError, match=r"preprocessor 'p': ops\[0\]\.op: unknown op \"mirror\""):
        Transform([{"op": "mirror"}], name="p")
    assert check_ops({"op": "fliplr"})[1][0][1].startswith("expected a list of op tables")

def test_nan_points_stay_nan():
    t = Transform([{"op": "rot90"}, {"op": "resize", "height": 7, "width": 9}])
    q = t.to_source(t.from_source([[np.nan, np.nan], [1.0, 2.0]], (5, 8)), (5, 8))
    assert np.isnan(q[0]).all() and np.allclose(q[1], [1, 2])

# ------------------------------------------------------------------------------------------- the default plan
@pytest.fixture(scope="module")
def plan():
    return Config.default().detection_plan()

def test_default_plan_is_the_walkthrough_plan(plan):
    assert plan.view_names == ["rh", "rm", "rf", "f", "lf", "lm", "lh"] == list(DEFAULT_VIEWS)
    assert (plan.n_views, plan.n_points) == (7, 38) and plan.point_names == list(FLY.point_names)
    assert {p.name: len(p.mapping) for p in plan.pathways} == {
        "rh": 19, "rm": 19, "rf": 16, "f": 7, "f_flip": 7, "lf_flip": 16, "lm_flip": 19, "lh_flip": 19}
    assert [s.name for s in plan.sources] == [f"vid_{v}" for v in plan.view_names]
    assert plan.source_pathways() == {**{f"vid_{v}": [v] for v in ("rh", "rm", "rf")}, "vid_f": ["f", "f_flip"],
                                      **{f"vid_{v}": [f"{v}_flip"] for v in ("lf", "lm", "lh")}}
    assert plan.view_sources() == {v: f"vid_{v}" for v in plan.view_names}
    assert list(plan.preprocessors) == ["flip"] and plan.preprocessors["flip"].to_json() == [{"op": "fliplr"}]
    spec = plan.models["deepfly2d"]
    assert (spec.cls, spec.input_size, spec.n_out_channels, spec.mean) == ("hourglass", (256, 512), 19, (0.22, 0.22, 0.22))
    assert spec.weights == "bundled:fly_synthetic" and spec.bundled_name == "fly_synthetic" and spec.weights_path is None

def test_default_plan_reproduces_synth_visibility(plan):
    np.testing.assert_array_equal(plan.visibility_mask(), default_visibility(plan.view_names, FLY))
    np.testing.assert_array_equal(Config.default().detection_plan().visibility_mask(), default_visibility())

def test_mirrored_pathways_land_on_the_correct_side(plan):
    names = FLY.point_names
    for p in plan.pathways:
        mirrored = p.preprocessor == "flip"
        assert mirrored == p.name.endswith("_flip")
        side = "l" if mirrored else "r"
        assert all(names[i].startswith(side) for i in p.mapping[:, 2]), p.name
        # channel i of the one-side model is the i-th point of that side
        np.testing.assert_array_equal(p.mapping[:, 2], p.mapping[:, 0] + (0 if mirrored else 19))
        # and its detections come back unmirrored: x -> W - 1 - x for mirrored pathways only
        np.testing.assert_allclose(p.transform.to_source([[10.0, 5.0]], (480, 960)), [[949.0, 5.0]] if mirrored else [[10.0, 5.0]])
    f, ff = plan.pathway("f"), plan.pathway("f_flip")
    assert f.source == ff.source == "vid_f" and f.view_indices == ff.view_indices == [3]
    assert [names[i] for i in f.mapping[:, 2]] == ["rf_femur_tibia", "rf_tibia_tarsus", "rf_claw", "rm_femur_tibia",
                                                   "rm_tibia_tarsus", "rm_claw", "r_antenna"]

def test_summary_lists_the_plan(plan):
    s = plan.summary()
    assert repr(plan) == s
    for line in ["views: ['rh', 'rm', 'rf', 'f', 'lf', 'lm', 'lh']", "vid_lh <- ['camera_6.mp4', 'camera_6_img_*.jpg']",
                 "flip: [{'op': 'fliplr'}]", "deepfly2d: class='hourglass' input_size=(256, 512) n_out_channels=19",
                 "rf:   vid_rf --None--> deepfly2d -> ['rf'] (16 points)", "f_flip:    vid_f --flip--> deepfly2d -> ['f'] (7 points)",
                 "sources feeding more than one pathway: {'vid_f': 2}"]:
        assert line in s, (line, s)

def test_default_sources_find_the_deepfly3d_sample_both_ways():
    folder = SHARED_DATA / "deepfly3d_sample"
    if not folder.exists(): pytest.skip(f"shared data not found at {folder} (it lives in ../shared/data beside the repository)")
    patterns = Config.default().detection_plan().source_patterns()
    for c, (name, (video, images)) in enumerate(patterns.items()):
        assert (folder / video).is_file() and video == f"camera_{c}.mp4"
        assert len(glob.glob(str(folder / images))) == 15, images
    assert Config.default().source_patterns()["vid_rh"] == ["camera_0.mp4", "camera_0_img_*.jpg"]

def test_init_template_loads_to_the_same_plan(tmp_path, plan):
    path = write_config(tmp_path / "config.toml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the packaged plan raises no warning
        loaded = Config.load(path)
    np.testing.assert_array_equal(loaded.detection_plan().visibility_mask(), plan.visibility_mask())
    assert [p.name for p in loaded.detection_plan().pathways] == [p.name for p in plan.pathways]
    again = Config.loads(loaded.to_toml())
    assert again == loaded and again.to_dict()["pose2d"]["models"][0]["class"] == "hourglass"

def test_relative_weights_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir(); (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "exp" / "config.toml"
    path.write_text(BASE.replace('weights = "bundled:fly_synthetic"', 'weights = "models/df2d.tar"'))
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = Config.load(path).detection_plan().models["deepfly2d"]
    assert spec.weights_kind == "path" and spec.weights_path == (tmp_path / "exp" / "models" / "df2d.tar").resolve()
    path.write_text(BASE.replace('weights = "bundled:fly_synthetic"', f'weights = "{tmp_path}/abs.tar"'))
    assert Config.load(path).detection_plan().models["deepfly2d"].weights_path == tmp_path / "abs.tar"

def test_a_config_without_pathways_has_no_plan():
    cams = {v: {"azimuth_deg": az, "distance": 10, "focal_px": 100} for v, az in (("a", 0), ("b", 90))}
    cfg = Config.from_dict({"skeleton": {"name": "fly38"}, "cameras": cams}, "x.toml")
    with pytest.raises(ConfigError, match=r"x\.toml: pose2d\.pathways: the config has no detection plan"):
        cfg.detection_plan()

# ------------------------------------------------------------------------------------------- load-time checks
def errors(text):
    with pytest.raises(ConfigError) as e:
        Config.loads(text, "config.toml")
    return str(e.value).splitlines()

PATHWAY_F = 'name = "f"\nsource = "vid_f"\nmodel = "deepfly2d"'
CASES = {
    "dangling model": ([(PATHWAY_F, PATHWAY_F.replace("deepfly2d", "deepfly"))],
                       ["config.toml: pose2d.pathways[3].model: 'deepfly' is not a model; known: deepfly2d (did you mean 'deepfly2d'?)"]),
    "dangling source": ([(PATHWAY_F, PATHWAY_F.replace("vid_f", "vid_ff"))],
                        ["config.toml: pose2d.pathways[3].source: 'vid_ff' is not a source; known: vid_rh, vid_rm, vid_rf, vid_f, "
                         "vid_lf, vid_lm, vid_lh (did you mean 'vid_f'?)"]),
    "dangling preprocessor": ([('preprocessor = "flip"\nmodel = "deepfly2d"\n\n[[pose2d.pathways]]\nname = "lf_flip"',
                                'preprocessor = "flp"\nmodel = "deepfly2d"\n\n[[pose2d.pathways]]\nname = "lf_flip"')],
                              ["config.toml: pose2d.pathways[4].preprocessor: 'flp' is not a preprocessor; known: flip (did you mean 'flip'?)"]),
    "unknown view": ([("[pose2d.output_points.lh.lh_flip]", "[pose2d.output_points.hl.lh_flip]")],
                     ["config.toml: pose2d.output_points.hl: 'hl' is not a view; the views are the [cameras.*] tables: "
                      "rh, rm, rf, f, lf, lm, lh"]),
    "unknown pathway": ([("[pose2d.output_points.lh.lh_flip]", "[pose2d.output_points.lh.lh_flipp]")],
                        ["config.toml: pose2d.output_points.lh.lh_flipp: 'lh_flipp' is not a pathway; known: rh, rm, rf, f, f_flip, "
                         "lf_flip, lm_flip, lh_flip (did you mean 'lh_flip'?)"]),
    "unknown point": ([('"rm_claw", "r_antenna"', '"rm_claw", "r_antena"')],
                      ["config.toml: pose2d.output_points.f.f.points[6]: 'r_antena' is not a point of skeleton 'fly38'; known: "
                       "lf_body_coxa, "]),
    "point twice in one entry": ([('"rm_claw", "r_antenna"', '"rm_claw", "rm_claw"')],
                                 ["config.toml: pose2d.output_points.f.f.points[6]: 'rm_claw' is listed twice (also points[5]); "
                                  "a (view, point) takes one channel"]),
    "one (view, point) from two pathways": (
        [('"lm_claw", "l_antenna"', '"lm_claw", "r_antenna"')],
        ["config.toml: pose2d.output_points.f.f_flip.points[6]: point 'r_antenna' of view 'f' is also written by pathway 'f'; "
         "a (view, point) takes one channel"]),
    "channel out of range": ([("channels = [2, 3, 4, 7, 8, 9, 15]", "channels = [2, 3, 4, 7, 8, 9, 19]")],
                             ["config.toml: pose2d.output_points.f.f.channels[6]: channel 19 is out of range: model 'deepfly2d' of "
                              "pathway 'f' has n_out_channels = 19 (channels 0..18)"]),
    "default channels out of range": ([("n_out_channels = 19", "n_out_channels = 16")],
                                      [f"config.toml: pose2d.output_points.{v}.{p}: 19 points, so the channels default to 0..18, but "
                                       f"model 'deepfly2d' of pathway '{p}' has n_out_channels = 16 (channels 0..15); list the channels"
                                       for v, p in (("rh", "rh"), ("rm", "rm"), ("lm", "lm_flip"), ("lh", "lh_flip"))]),
    "channels out of range": ([("channels = [2, 3, 4, 7, 8, 9, 15]", "channels = [2, 3, 4, 7, 8, 20, 19]")],
                              ["config.toml: pose2d.output_points.f.f.channels: channels 20, 19 are out of range: model 'deepfly2d' "
                               "of pathway 'f' has n_out_channels = 19 (channels 0..18)"]),
    "channel twice": ([("channels = [2, 3, 4, 7, 8, 9, 15]", "channels = [2, 3, 4, 7, 8, 9, 9]")],
                      ["config.toml: pose2d.output_points.f.f.channels[6]: channel 9 is listed twice (also channels[5]); "
                       "a channel lands on one point of a view"]),
    "length mismatch": ([("channels = [2, 3, 4, 7, 8, 9, 15]", "channels = [2, 3, 4, 7, 8, 9]")],
                        ["config.toml: pose2d.output_points.f.f: 6 channels but 7 points; channels[i] lands on points[i]"]),
    "unknown op": ([('ops = [{op = "fliplr"}]', 'ops = [{op = "flip_lr"}]')],
                   ["config.toml: pose2d.preprocessors[0].ops[0].op: unknown op \"flip_lr\"; allowed: fliplr, flipud, rot90, crop, "
                    "resize (did you mean 'fliplr'?)"]),
    "bad op parameters": ([('ops = [{op = "fliplr"}]', 'ops = [{op = "fliplr"}, {op = "resize", height = 0, widht = 5}]')],
                          ["config.toml: pose2d.preprocessors[0].ops[1].widht: not a parameter of resize; allowed: height, width "
                           "(did you mean 'width'?)",
                           "config.toml: pose2d.preprocessors[0].ops[1].height: expected a positive integer (the new height, pixels), got 0",
                           "config.toml: pose2d.preprocessors[0].ops[1].width: missing: resize needs height, width; expected a "
                           "positive integer (the new width, pixels)"]),
    "typo in a pathway key": ([(PATHWAY_F, PATHWAY_F.replace("model =", "modle ="))],
                              ["config.toml: pose2d.pathways[3].modle: unknown key; allowed keys: name, source, preprocessor, model, crop_from "
                               "(did you mean 'model'?)",
                               "config.toml: pose2d.pathways[3].model: required key missing; expected the name of a [[pose2d.models]] table"]),
    "typo in output_points": ([("[pose2d.output_points.rf.rf]\npoints", "[pose2d.output_points.rf.rf]\npoint")],
                              ["config.toml: pose2d.output_points.rf.rf.point: unknown key; allowed keys: channels, points "
                               "(did you mean 'points'?)",
                               "config.toml: pose2d.output_points.rf.rf.points: required key missing; expected a non-empty list of "
                               "skeleton point names"]),
    "wrong types": ([("n_out_channels = 19", 'n_out_channels = "19"'), ('input_size = [256, 512]', 'input_size = [256]'),
                     ('pattern = ["camera_2.mp4", "camera_2_img_*.jpg"]', 'pattern = 2')],
                    ['config.toml: pose2d.models[0].n_out_channels: expected a positive integer, got "19"',
                     "config.toml: pose2d.models[0].input_size: expected [H, W] in pixels (2 positive integers), got [256]",
                     "config.toml: sources[2].pattern: expected a file name or glob pattern, relative to the input folder, or a list"]),
    "model class and weights": ([('class = "hourglass"', 'class = "unet"'), ('weights = "bundled:fly_synthetic"', 'weights = "https://x.org/w.tar"')],
                                ["config.toml: pose2d.models[0].class: unknown model class 'unet'; allowed: hourglass"]),
    "URL without sha256": ([('weights = "bundled:fly_synthetic"', 'weights = "https://x.org/w.tar"')],
                           ["config.toml: pose2d.models[0].sha256: required with a URL weights file"]),
    "bad sha256": ([('weights = "bundled:fly_synthetic"', 'weights = "w.tar"\nsha256 = "abc"')],
                   ["config.toml: pose2d.models[0].sha256: expected 64 hexadecimal digits"]),
    "duplicate names": ([('name = "vid_rm"', 'name = "vid_rh"')],
                        ["config.toml: sources[1].name: 'vid_rh' is already the name of sources[0]; names must be unique",
                         "config.toml: pose2d.pathways[1].source: 'vid_rm' is not a source; known: vid_rh, vid_rf, vid_f, vid_lf, "
                         "vid_lm, vid_lh (did you mean 'vid_rh'?)"]),
    "a view from two sources": ([('name = "f_flip"\nsource = "vid_f"', 'name = "f_flip"\nsource = "vid_lf"')],
                                ["config.toml: pose2d.output_points.f: view 'f' is written by pathways on different sources "
                                 "(f <- vid_f, f_flip <- vid_lf); the points of a view are pixels of one footage source"]),
}

@pytest.mark.parametrize("case", list(CASES))
def test_plan_mistakes_are_named_by_key_path(case):
    edits, wanted = CASES[case]
    text = BASE
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    lines = errors(text)
    for want in wanted:
        assert any(l.startswith(want) for l in lines), (want, lines)
    assert len(lines) == len(wanted), lines

def test_every_problem_at_once():
    text, cases = BASE, ("dangling model", "unknown view", "unknown point", "channel twice", "bad sha256", "duplicate names", "unknown op")
    for case in cases:
        for old, new in CASES[case][0]: text = text.replace(old, new, 1)
    lines = errors(text)
    wanted = [w for case in cases for w in CASES[case][1]]
    assert len(lines) == len(wanted) == 8, lines
    for want in wanted: assert any(l.startswith(want) for l in lines), (want, lines)

def test_warnings_for_what_runs_for_nothing_or_stays_empty(caplog):
    # pathway rf now reads vid_rh: vid_rf feeds nothing; a pathway nobody routes; an eighth camera nobody fills
    text = BASE.replace('name = "rf"\nsource = "vid_rf"', 'name = "rf"\nsource = "vid_rh"')
    text += '\n[[pose2d.pathways]]\nname = "spare"\nsource = "vid_rh"\nmodel = "deepfly2d"\n'
    text += '\n[cameras.top]\nposition = [0, 0, 100]\nup = [1, 0, 0]\nfocal_px = 20000\n'
    with caplog.at_level(logging.WARNING, logger="deeperfly"), pytest.warns(ConfigWarning) as record:
        cfg = Config.loads(text, "config.toml")
    want = ["config.toml: sources[2]: source 'vid_rf' is used by no pathway",
            "config.toml: pose2d.pathways[8]: pathway 'spare' writes no points: no [pose2d.output_points.<view>] table names it; it would run for nothing",
            "config.toml: pose2d.output_points: view 'top' is filled by no pathway; its points stay NaN (add a [pose2d.output_points.top] table)"]
    assert [str(w.message) for w in record if w.category is ConfigWarning] == want
    assert [r.getMessage() for r in caplog.records if r.name == "deeperfly"] == want
    plan = cfg.detection_plan()           # the plan works: the eighth view stays empty
    assert plan.n_views == 8 and not plan.visibility_mask()[7].any() and "top" not in plan.view_sources()

def test_plan_problems_skip_what_is_already_reported():
    p2 = {"models": [{"name": "m", "n_out_channels": 2}], "pathways": [{"name": "p", "source": "s", "model": "x"}]}
    errs, _ = plan_problems([{"name": "s", "pattern": "a.mp4"}], p2, ["v"], FLY)
    assert errs == [("pose2d.pathways[0].model", "'x' is not a model; known: m")]
    errs, _ = plan_problems([{"name": "s", "pattern": "a.mp4"}], p2, ["v"], FLY, ok=lambda path: path != "pose2d.pathways[0].model")
    assert errs == []

# ------------------------------------------------------------------------------------------- building plans
def test_from_tables_checks_then_builds():
    sources = [{"name": "top", "pattern": "top.avi"}]
    pose2d = {"preprocessors": [{"name": "turn", "ops": [{"op": "rot90", "k": 3}]}],
              "models": [{"name": "m", "class": "hourglass", "input_size": [64, 64], "n_out_channels": 4, "mean": [0.1, 0.2, 0.3]}],
              "pathways": [{"name": "p", "source": "top", "preprocessor": "turn", "model": "m"}],
              "output_points": {"cam": {"p": {"channels": [3, 0], "points": ["lf_claw", "rf_claw"]}}}}
    with pytest.warns(ConfigWarning, match="view 'side' is filled by no pathway"):
        plan = DetectionPlan.from_tables(sources, pose2d, FLY, ["cam", "side"], where="mine")
    p = plan.pathway("p")
    np.testing.assert_array_equal(p.mapping, [[3, 0, 4], [0, 0, 23]])
    assert p.transform.to_json() == [{"op": "rot90", "k": 3}] and plan.models["m"].mean == (0.1, 0.2, 0.3)
    mask = plan.visibility_mask()
    assert mask.sum() == 2 and mask[0, 4] and mask[0, 23]
    pose2d["preprocessors"][0]["ops"] = [{"op": "rot90", "k": "3"}]
    pose2d["output_points"]["cam"]["p"]["channels"] = [4, 0]
    with pytest.raises(ConfigError) as e:
        DetectionPlan.from_tables(sources, pose2d, FLY, ["cam"], where="mine")
    assert str(e.value).splitlines() == [
        "mine: pose2d.output_points.cam.p.channels[0]: channel 4 is out of range: model 'm' of pathway 'p' has n_out_channels = 4 (channels 0..3)",
        "mine: pose2d.preprocessors[0].ops[0].k: expected an integer (quarter turns, counter-clockwise as displayed), got \"3\""]

def test_a_hand_built_plan_is_checked():
    spec = ModelSpec("m", "hourglass", None, None, (64, 64), 2, 0.0)
    src = [Source("s", "a.mp4")]
    with pytest.raises(ConfigError, match="out of range"):
        DetectionPlan(["v"], ["a", "b"], src, {}, {"m": spec}, [Pathway("p", "s", None, "m", Transform(), [[2, 0, 0]])])
    with pytest.raises(ConfigError, match="more than one channel"):
        DetectionPlan(["v"], ["a", "b"], src, {}, {"m": spec}, [Pathway("p", "s", None, "m", Transform(), [[0, 0, 0], [1, 0, 0]])])
    with pytest.raises(ConfigError, match="pathway 'p': source 'x' and model 'n' not in the plan"):
        DetectionPlan(["v"], ["a"], src, {}, {"m": spec}, [Pathway("p", "x", None, "n", Transform(), [])])
