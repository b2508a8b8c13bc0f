"Semi-supervised training (issue 15): soft-argmax, the losses without labels, unlabelled frames, the loop, diagnostics, bad input."
import json, os, tracemalloc
from pathlib import Path
import numpy as np
import pytest
import torch
import cv2

from deeperfly_nb.core import ConfigError, InputError, ModelError
from deeperfly_nb.config import Config
from deeperfly_nb.cameras import CameraGroup
from deeperfly_nb.decoding import gaussian_heatmaps
from deeperfly_nb.labels import pathway_samples, labels_from_render
from deeperfly_nb.synth import default_rig, walking_fly
from deeperfly_nb.skeleton import fly38
from deeperfly_nb.synth_footage import render_recording
import deeperfly_nb.semisupervised as ss
from deeperfly_nb.semisupervised import (soft_argmax, rig_tensors, triangulate_t, project_t, multiview_loss, temporal_loss, fit_pca,
                                         PcaPrior, pca_loss, bone_prior, bone_loss, random_warp, apply_affine, consistency_loss,
                                         SemiOptions, UnlabelledFrames, semi_priors, semi_train_detector, plan_with_input_size,
                                         diagnose, train_semisupervised, parse_loss_weights)

torch.set_num_threads(1)
PLAN = plan_with_input_size(Config.default().detection_plan(), (64, 128))
TINY = dict(steps=4, batch_size=2, crop_hw=(64, 128), init=None, val_frac=0.0, eval_every=100, checkpoint_every=2, log_every=1,
            num_threads=1, architecture=dict(n_stacks=1, n_blocks=1, n_features=8, n_stem_features=4))


@pytest.fixture(scope="module")
def data():
    lab = render_recording(6, seed=9101, scale=0.125, n_workers=1)
    unl = render_recording(8, seed=9102, scale=0.125, n_workers=1)
    frames = {v: unl.frames[i] for i, v in enumerate(unl.cameras.names)}
    return lab, unl, frames, pathway_samples(labels_from_render(lab), PLAN)


def test_soft_argmax_recovers_points():
    rng = np.random.default_rng(5)
    pts = np.stack([rng.uniform(8, 120, 50), rng.uniform(8, 56, 50)], -1)[None]          # model-input pixels
    hm = gaussian_heatmaps(np.stack([(pts[..., 0] + .5) / 128, (pts[..., 1] + .5) / 64], -1), (16, 32), 1.5)
    hm = torch.tensor(hm) * 0.6 + 0.02 * torch.randn(1, 50, 16, 32, generator=torch.Generator().manual_seed(0))
    xy, conf = soft_argmax(hm)
    err = np.linalg.norm(xy.numpy() - pts, axis=-1)
    assert np.median(err) < 0.2 and err.max() < 0.6                  # input pixels (stride 4: a tenth of a cell)
    assert np.allclose(conf.numpy(), 0.6, atol=0.08)


def test_dlt_in_torch_matches_truth_and_has_gradients():
    rig = default_rig()
    X = np.random.default_rng(1).normal(0, 0.5, (2, 6, 3))
    p = torch.tensor(np.moveaxis(rig.project(X), 0, 1), requires_grad=True)     # (2, V, N, 2)
    rt = rig_tensors(rig)
    Xt = triangulate_t(rt, p, torch.ones(2, 7, 6))
    assert np.abs(Xt.detach().numpy() - X).max() < 1e-6
    assert np.abs(project_t(rt, Xt).detach().numpy() - p.detach().numpy()).max() < 1e-5
    bad = p + torch.nn.functional.pad(torch.tensor([[[[20.0, 5.0]]]]), (0, 0, 0, 5, 0, 6, 0, 1))
    loss, err, _, _ = multiview_loss(rt, bad, torch.ones(2, 7, 6), torch.ones(7, 6, dtype=torch.bool), eps_px=0.5)
    assert err[0, 0, 0] > 5 and err[0, :, 1:].max() < 1e-4 and err[1].max() < 1e-4
    loss.backward()                                                    # only the disturbed point is pulled
    assert torch.isfinite(p.grad).all() and p.grad[0, :, 0].abs().sum() > 0
    assert p.grad[0, :, 1:].abs().max() == 0 and p.grad[1].abs().max() == 0


def test_dlt_with_distortion():
    rig = CameraGroup([c.replace(dist=np.array([-0.25, 0.08, 0.002, -0.001, 0.01])) for c in default_rig()])
    X = np.random.default_rng(2).normal(0, 0.6, (8, 3))
    Xt = triangulate_t(rig_tensors(rig), torch.tensor(rig.project(X)), torch.ones(7, 8))
    assert np.abs(Xt.numpy() - X).max() < 1e-4


def test_temporal_hinge_and_confidence():
    a = torch.zeros(2, 4, 2); b = a.clone(); b[1, 3] = torch.tensor([30.0, 40.0])        # a 50 px jump
    seen = torch.ones(2, 4, dtype=torch.bool)
    loss, d = temporal_loss(a, b, torch.ones(2, 4), torch.ones(2, 4), seen, eps_px=20)
    assert float(loss) == pytest.approx(30 / 8) and float(d[1, 3]) == pytest.approx(50)
    low = torch.ones(2, 4); low[1, 3] = 0.1
    assert float(temporal_loss(a, b, low, torch.ones(2, 4), seen, eps_px=20)[0]) == 0


def test_pca_prior_and_refusal(data):
    lab, unl, frames, samples = data
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(60, 2)) @ rng.normal(size=(2, 8)) + 50 + rng.normal(0, 0.01, (60, 8))
    mean, comps, kept = fit_pca(rows, 0.99)
    assert len(comps) == 2 and kept > 0.99
    pr = PcaPrior((0,), (0, 1, 2, 3), mean, comps, kept, 60)
    x = torch.tensor(rows[:3].reshape(3, 1, 4, 2))
    assert float(pca_loss([pr], x, torch.ones(3, 1, 4), eps_px=0.1)[0]) == 0
    x[0, 0, 1, 0] += 8
    assert float(pca_loss([pr], x, torch.ones(3, 1, 4), eps_px=0.1)[0]) > 0.5
    uf = UnlabelledFrames([frames], PLAN, cameras=unl.cameras)
    with pytest.raises(InputError, match=r"at least 2 x keypoints = 38 labelled frames of pathway 'rh' \(19 keypoints\), got 6"):
        semi_priors(samples, PLAN, SemiOptions(losses=("pca",)), uf)
    s40 = pathway_samples(labels_from_render(render_recording(40, seed=9104, scale=0.125, n_workers=1)), PLAN)
    pri = semi_priors(s40, PLAN, SemiOptions(losses=("pca",)), uf)["pca"]            # 40 >= 2 x 19: fits
    assert len(pri) == 8 and all(p.variance_kept >= 0.99 for p in pri) and pri[0].points == tuple(range(19, 38))
    with pytest.raises(InputError, match=r"got 30"):                               # 19 <= 30 < 38: refused
        semi_priors(s40.subset(s40.frame < 30), PLAN, SemiOptions(losses=("pca",)), uf)


def test_bone_and_consistency_losses():
    sk = fly38()
    walk = walking_fly(30, seed=4, skeleton=sk)
    bp = bone_prior(walk, sk)
    ok = torch.ones(3, 38, dtype=torch.bool)
    X = torch.tensor(walk[:3])
    assert float(bone_loss(X, ok, bp)[0]) == 0
    X[1, sk.bones[2][1]] += 1.0
    assert float(bone_loss(X, ok, bp)[0]) > 0
    M = random_warp(np.random.default_rng(7), (64, 128), 15, (0.8, 1.2), 10)
    xy = torch.tensor([[[5.0, 6.0], [100.0, 50.0], [64.0, 32.0]]])
    c, u = torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)
    assert float(consistency_loss(xy, apply_affine(M, xy), M[None], c, c, u, 0)[0]) < 1e-4
    assert float(consistency_loss(xy, apply_affine(M, xy + 6), M[None], c, c, u, 0)[0]) == pytest.approx(6 * 2 ** 0.5, rel=1e-4)


def test_unlabelled_frames_spread_and_bad_input(data, tmp_path):
    lab, unl, frames, samples = data
    uf = UnlabelledFrames([frames], PLAN, cameras=unl.cameras)
    ts = [t for _, t in uf.draw(np.random.default_rng(0), 40)]
    assert set(ts) == set(range(7))                                    # the whole recording, not a contiguous run
    x = uf.read(0, 3)
    assert x.shape == (2, 8, 64, 128, 3)
    with pytest.raises(InputError, match="does not match the plan's sources"): UnlabelledFrames([tmp_path], PLAN)
    with pytest.raises(InputError, match="lack the view"): UnlabelledFrames([{"rh": unl.frames[0]}], PLAN)
    with pytest.raises(InputError, match="needs more than frame_gap"): UnlabelledFrames([{v: f[:1] for v, f in frames.items()}], PLAN)
    with pytest.raises(InputError, match="needs calibrated cameras"):
        semi_priors(samples, PLAN, SemiOptions(losses=("multiview",)), UnlabelledFrames([frames], PLAN))
    with pytest.raises(ConfigError, match="unknown loss"): SemiOptions(losses=("temporal", "bonez"))
    with pytest.raises(ConfigError, match="name=weight"): parse_loss_weights(["temporal:1"])


def test_recordings_share_the_draws_by_length_or_equally(data, tmp_path):
    "A long and a short recording: 'length' draws them 7:2 (their usable lengths), 'equal' 1:1 — and the trainer draws as its options say."
    lab, unl, frames, samples = data
    uf = UnlabelledFrames([frames, {v: f[:3] for v, f in frames.items()}], PLAN)     # 8 frames -> 7 usable pairs; 3 -> 2
    for share, want in (("length", 7 / 9), ("equal", 0.5)):
        recs = np.array([r for r, _ in uf.draw(np.random.default_rng(1), 4000, share)])
        assert abs((recs == 0).mean() - want) < 0.03, (share, (recs == 0).mean())
    with pytest.raises(InputError, match="share"): uf.draw(np.random.default_rng(1), 4, "uniform")
    with pytest.raises(ConfigError, match="recording_share"): SemiOptions(recording_share="uniform")
    seen = []
    class Spy(UnlabelledFrames):
        def draw(self, rng, n, share="length"): seen.append(share); return super().draw(rng, n, share)
    spy = Spy([frames, {v: f[:3] for v, f in frames.items()}], PLAN)
    o = SemiOptions(losses=("temporal",), recording_share="equal")
    semi_train_detector(samples, spy, tmp_path / "share", dict(TINY, steps=1), o, {}, progress=False)
    assert seen == ["equal"]


def test_preprocessing_matches_labelled_samples(data):
    "An unlabelled frame goes through the same pathway preprocessing as a labelled sample of the same frame."
    lab, unl, frames, samples = data
    uf = UnlabelledFrames([{v: lab.frames[i] for i, v in enumerate(lab.cameras.names)}], PLAN)
    x = uf.read(0, 2)
    for s in range(len(samples)):
        if samples.frame_keys[samples.frame[s]] == "frame 2":
            k = samples.pathway[s]
            assert np.array_equal(x[0, k], np.repeat(samples.images[s], 3 // samples.images.shape[-1], -1))


def test_memory_flat_in_recording_length(data, tmp_path):
    lab, unl, frames, samples = data
    peaks = {}
    for n in (10, 120):
        folder = tmp_path / f"rec{n}"; folder.mkdir()
        for v in range(7):
            for t in range(n): cv2.imwrite(str(folder / f"camera_{v}_img_{t}.jpg"), unl.frames[v, t % 8])
        uf = UnlabelledFrames([folder], PLAN)
        tracemalloc.start()
        for s in range(4): [uf.read(r, t) for r, t in uf.draw(np.random.default_rng(s), 1)]
        peaks[n] = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert peaks[120] < 1.5 * peaks[10] + 200_000, peaks


def _run(samples, uf, out, opts, pri, **kw):
    return semi_train_detector(samples, uf, out, {**TINY, **kw.pop("cfg", {})}, opts, pri, progress=False, **kw)


def test_loop_logs_every_loss_and_resumes(data, tmp_path):
    lab, unl, frames, samples = data
    uf = UnlabelledFrames([frames], PLAN, cameras=unl.cameras)
    opts = SemiOptions(losses=("temporal", "multiview", "pca_multiview", "bones", "consistency"))
    pri = semi_priors(samples, PLAN, opts, uf, bones=lab.pts3d)
    straight = _run(samples, uf, tmp_path / "a", opts, pri)
    class Stop(Exception): pass
    def stop(step, loss):
        if step == 2: raise Stop()
    with pytest.raises(Stop): _run(samples, uf, tmp_path / "b", opts, pri, callback=stop)
    done = []
    resumed = _run(samples, uf, tmp_path / "b", opts, pri, resume=True, callback=lambda step, loss: done.append(step))
    assert done == [3, 4]                                              # it continued; it did not start over
    la, lb = [r for r in straight.history if "loss" in r], [r for r in resumed.history if "loss" in r]
    assert [r["step"] for r in la] == [1, 2, 3, 4]
    names = {f"loss_{k}" for k in ("supervised", "temporal", "multiview", "pca_multiview", "bones", "consistency")}
    assert all(names <= set(r) for r in la)
    for ra, rb in zip(la, lb):
        for k in names | {"loss"}: assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (k, ra, rb)
    on_disk = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk if "loss" in r] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="semi-supervised setup differs"):
        _run(samples, uf, tmp_path / "b", SemiOptions(losses=("temporal",)), {}, resume=True)


def test_nan_loss_stops_and_keeps_good_weights(data, tmp_path, monkeypatch):
    lab, unl, frames, samples = data
    uf = UnlabelledFrames([frames], PLAN, cameras=unl.cameras)
    opts = SemiOptions(losses=("temporal",))
    real, calls = ss.temporal_loss, []
    def flaky(*a, **k):
        loss, d = real(*a, **k); calls.append(1)
        return (loss * float("nan") if len(calls) >= 3 else loss), d
    monkeypatch.setattr(ss, "temporal_loss", flaky)
    with pytest.raises(ModelError, match=r"step 3: the temporal loss is not finite.*last good weights are in .*last\.pt \(step 2\)"):
        _run(samples, uf, tmp_path / "r", opts, {})
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert ck["resume"]["step"] == 2 and all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    log = [json.loads(l) for l in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert "non-finite loss: temporal" in log[-1]["error"]


def test_diagnostics_rank_injected_failures():
    gt = render_recording(40, seed=9103, scale=0.25, n_workers=1)
    rng = np.random.default_rng(0)
    p = np.where(gt.reported[:, None, :, None], gt.pts2d, np.nan) + rng.normal(0, 0.7, gt.pts2d.shape)
    conf = np.where(gt.visible, rng.uniform(0.7, 1, gt.visible.shape), rng.uniform(0.2, 0.6, gt.visible.shape))
    bad = np.array([5, 17, 26, 33])
    for t, (v, n) in zip(bad, [(0, 22), (2, 27), (5, 3), (6, 8)]):
        assert gt.reported[v, n]
        p[v, t, n] += [9.0, -7.0]                                      # 11 px at 1/4 resolution
    d = diagnose(p, conf, gt.cameras)
    top = np.argsort(-d.score)[:4]
    assert np.isin(bad, top).mean() >= 0.75, (sorted(top), bad)
    assert d.worst_frames(1)[0]["frame"] in bad


def test_train_semisupervised_from_files(data, tmp_path):
    lab, unl, frames, samples = data
    labels = tmp_path / "labels.h5"
    labels_from_render(lab).save(labels)
    rec = tmp_path / "rec"; rec.mkdir()
    for v in range(7):
        for t in range(8): cv2.imwrite(str(rec / f"camera_{v}_img_{t}.jpg"), unl.frames[v, t])
    res = train_semisupervised(labels, [rec], tmp_path / "run", options={"losses": ("temporal", "pca_multiview")}, cameras=None,
                               progress=False, **{**TINY, "steps": 2, "crop_hw": (192, 320)})
    assert (tmp_path / "run" / "use_model.toml").exists() and res.steps == 2
    assert {"loss_temporal", "loss_pca_multiview"} <= set(res.history[-1])


def test_zero_label_mode_never_reads_labels(data, tmp_path, monkeypatch):
    "supervised_weight 0: no labelled batch is drawn, the labels do not change the weights, the unsupervised losses do."
    lab, unl, frames, samples = data
    uf = UnlabelledFrames([frames], PLAN, cameras=unl.cameras)
    opts = SemiOptions(losses=("temporal", "multiview"), supervised_weight=0.0, conf_min=0.0)
    a = _run(samples, uf, tmp_path / "a", opts, {}, cfg={"steps": 2, "seed": 3})
    moved = samples.subset(np.ones(len(samples), bool))
    moved.source_keypoints = moved.source_keypoints + 37.0                # other labels: must not matter
    moved.keypoints = moved.keypoints + 9.0
    def no_batch(*a, **k): raise AssertionError("zero-label mode drew a labelled batch")
    monkeypatch.setattr(ss.SemiTrainer, "batch", no_batch)                # where every labelled batch is drawn
    b = _run(moved, uf, tmp_path / "b", opts, {}, cfg={"steps": 2, "seed": 3})
    wa, wb = torch.load(a.model_path, weights_only=True)["state_dict"], torch.load(b.model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    logs = [r for r in a.history if "loss" in r]
    assert "loss_supervised" not in logs[-1] and {"loss_temporal", "loss_multiview"} <= set(logs[-1])
    assert logs[-1]["loss"] == pytest.approx(0.01 * logs[-1]["loss_temporal"] + 0.01 * logs[-1]["loss_multiview"], rel=1e-6)
    monkeypatch.undo()
    sup = _run(samples, uf, tmp_path / "c", SemiOptions(losses=("temporal",)), {}, cfg={"steps": 2, "seed": 3})
    assert "loss_supervised" in [r for r in sup.history if "loss" in r][-1]
    with pytest.raises(ConfigError, match="needs at least one loss without labels"): SemiOptions(losses=(), supervised_weight=0)
    with pytest.raises(ConfigError, match="start_step must be 0"): SemiOptions(losses=("temporal",), supervised_weight=0, start_step=5)
    with pytest.raises(ConfigError, match="semi-supervised.supervised_weight: -1; expected a number >= 0"): SemiOptions(supervised_weight=-1)
