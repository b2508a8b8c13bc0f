"""Scrubbing in the reviewer (issue 18): how long `Reviewer.goto(t)` takes to update every view — decode each view's
frame (lazily, a forward decoder kept open), scale and JPEG-encode it, compute the detections and reprojections to draw,
and set the widget's traits — on the bundled example (7 views of 960x480 H.264, 64 frames). Target: < 150 ms.

Cases, each with a fresh reviewer (empty image cache):
- forward: t = 1, 2, ... (dragging the slider or playing: one new frame per view per step);
- back: the same frames again in reverse (recently seen frames: from the JPEG cache, nothing decoded);
- jump: frames in a random order (picking frames from the worst-frames list; each jump backwards re-opens the video
  and decodes from its keyframe — the example's videos have a single keyframe, the worst case).

    OMP_NUM_THREADS=1 python bench/bench_review.py        # ~1 min

The time to send the traits to a browser is not included (no kernel here); the browser test covers the round trip.
Writes bench/results/review.json.
"""
import json, os, platform, sys, tempfile, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data"


def output_folder(work:Path) -> Path:
    "A run of the bundled example from its simulated detections (points2d.h5): triangulation only, no videos."
    import logging
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    logging.getLogger("deeperfly").setLevel(logging.WARNING)
    d = Config.load(EXAMPLE / "config.toml").to_dict() if (EXAMPLE / "config.toml").is_file() else Config.default().to_dict()
    d["pipeline"].update(pose2d=False, bundle_adjustment=False); d["visualization"]["videos"] = []
    run_recording(EXAMPLE, work / "out", Config.from_dict(d), progress=False)
    return work / "out"


def timed(rv, frames) -> list:
    "Milliseconds of rv.goto(t) for each t."
    ms = []
    for t in frames:
        t0 = time.perf_counter(); rv.goto(int(t)); ms.append(1000 * (time.perf_counter() - t0))
    return ms


def stats(ms) -> dict:
    return {"n": len(ms), "median_ms": round(float(np.median(ms)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(np.max(ms)), 1)}


def main():
    from deeperfly_nb.review import Reviewer
    with tempfile.TemporaryDirectory() as tmp:
        out = output_folder(Path(tmp))
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter(); rv = Reviewer(out); open_s = time.perf_counter() - t0
        T = rv.result.n_frames
        assert rv.footage is not None, rv.footage_note
        cases = {}
        cases["forward"] = stats(timed(rv, range(1, T)))
        cases["back"] = stats(timed(rv, range(T - 2, -1, -1)))
        rv = Reviewer(out)
        cases["jump"] = stats(timed(rv, np.random.default_rng(0).permutation(np.arange(1, T))))
        size = rv.footage[rv.result.view_names[0]].reader.frame_size
    res = {"what": "Reviewer.goto(t): every view's image, points and reprojections updated", "target_ms": 150,
           "footage": f"{len(rv.result.view_names)} views x {T} frames of {size[1]}x{size[0]} H.264 (examples/data)",
           "reviewer_open_s": round(open_s, 2), "cases": cases,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_before": round(load0, 1),
                       "load_average_after": round(os.getloadavg()[0], 1)},
           "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(f"{'case':10s} {'median ms':>10s} {'p95 ms':>8s} {'max ms':>8s}")
    for k, s in cases.items(): print(f"{k:10s} {s['median_ms']:10.1f} {s['p95_ms']:8.1f} {s['max_ms']:8.1f}")
    print(f"(reviewer opened in {open_s:.2f} s; load average {res['machine']['load_average_before']} -> {res['machine']['load_average_after']})")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "review.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
