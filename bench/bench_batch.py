"""Many recordings on Dask (issue 17): throughput, scheduling overhead, and a simulated 500-recording run.

1. Throughput: N short synthetic recordings (6 frames, the tiny random detector of tests/conftest.py) run by
   `batch.run_many` in this process, and on a LocalCluster of 1 and 2 single-threaded worker processes
   (cluster start-up timed apart). Recordings per minute.
2. Scheduling overhead per task: `run_many` with sleep-0 stub steps on many recordings (1 and 4 chained steps
   per recording) on 2 workers: (wall - slept / workers) / tasks.
3. A simulated 500-recording run: 4 chained sleep-based stub stages per recording (2,000 tasks) on 2 workers;
   wall time against the ideal (total sleep / workers) and the overhead per task.

    OMP_NUM_THREADS=1 python bench/bench_batch.py              # ~4 min on a loaded 2-core machine
    OMP_NUM_THREADS=1 python bench/bench_batch.py --recordings 4 --simulated 200   # quicker

Writes bench/results/batch.json. Machines are noisy: compare ratios measured in one run.
"""
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

STUB_STAGES = {"pose2d": 0.040, "bundle_adjustment": 0.020, "triangulation": 0.005, "visualization": 0.015}   # seconds

def recordings(root:Path, n:int) -> tuple:
    "(config, [recording folders]): n 6-frame synthetic recordings and the tiny detector's config."
    from conftest import tiny_recording
    from deeperfly_nb.synth_footage import synth_recording
    from deeperfly_nb.config import Config
    tiny_recording(root / "w")
    return Config.load(root / "w" / "config.toml"), [synth_recording(root / "recs" / f"rec{i}", n_frames=6, seed=100 + i) for i in range(n)]

def cluster(n_workers:int):
    "(LocalCluster, Client, seconds to start them) with n single-threaded worker processes."
    from distributed import LocalCluster
    from deeperfly_nb.batch import connect
    t0 = time.perf_counter()
    lc = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = connect(lc)
    client.wait_for_workers(n_workers)
    return lc, client, time.perf_counter() - t0

def throughput(root:Path, config, recs:list) -> dict:
    "Recordings per minute in this process and on 1 and 2 workers (fresh output folders; warm-up run first)."
    from deeperfly_nb.batch import BatchOptions, run_many
    quiet, out = BatchOptions(progress=False), {}
    run_many(recs[:1], config, None, root / "warmup", quiet)              # imports torch, reads the weights once
    t0 = time.perf_counter(); o = run_many(recs, config, None, root / "here", quiet)
    out["in_process"] = {"seconds": time.perf_counter() - t0, "done": sum(x.status == "done" for x in o), "stage_median_s": stage_medians(o)}
    for n in (1, 2):
        lc, client, start = cluster(n)
        try:
            t0 = time.perf_counter(); o = run_many(recs, config, client, root / f"workers{n}", quiet)
            out[f"workers_{n}"] = {"seconds": time.perf_counter() - t0, "cluster_start_s": start,
                                   "done": sum(x.status == "done" for x in o), "stage_median_s": stage_medians(o)}
        finally: client.close(); lc.close()
    for v in out.values(): v["recordings_per_min"] = round(60 * len(recs) / v["seconds"], 2); v["seconds"] = round(v["seconds"], 2)
    return out

def stage_medians(outcomes:list) -> dict:
    "{stage: median seconds} over the recordings that ran it."
    import statistics
    stages = dict.fromkeys(s for o in outcomes for s in o.stages)
    return {s: round(statistics.median(o.stages[s][1] for o in outcomes if s in o.stages), 2) for s in stages}

def stub_run(client, root:Path, n_recordings:int, stages:dict, n_workers:int) -> dict:
    "Wall time, ideal time and overhead per task of a run of sleep-stub steps."
    from deeperfly_nb.batch import BatchOptions, run_many, stub_steps
    from deeperfly_nb.config import Config
    recs = [root / f"r{i:04d}" for i in range(n_recordings)]            # stubs never read them
    t0 = time.perf_counter()
    o = run_many(recs, Config.default(), client, root / f"stub{n_recordings}x{len(stages)}", BatchOptions(progress=False),
                 steps=stub_steps(stages))
    wall = time.perf_counter() - t0
    tasks, slept = n_recordings * len(stages), sum(sum(s[1] for s in x.stages.values()) for x in o)
    ideal = slept / n_workers
    return {"recordings": n_recordings, "tasks": tasks, "wall_s": round(wall, 3), "slept_s": round(slept, 3),
            "ideal_s": round(ideal, 3), "overhead_per_task_ms": round(1000 * (wall - ideal) / tasks * n_workers, 2),
            "wall_per_task_ms": round(1000 * wall / tasks, 2), "done": sum(x.status == "done" for x in o)}

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recordings", type=int, default=6, help="real (synthetic) recordings for the throughput")
    ap.add_argument("--overhead-recordings", type=int, default=300, help="recordings of sleep-0 stubs for the overhead")
    ap.add_argument("--simulated", type=int, default=500, help="recordings of the simulated run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch.json"), help="where to write the results")
    args = ap.parse_args()
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores", "load_before": os.getloadavg()[0],
           "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        config, recs = recordings(d / "data", args.recordings)
        res["throughput"] = throughput(d, config, recs)
        lc, client, res["cluster_start_2_workers_s"] = cluster(2)
        try:
            res["overhead_1_step"] = stub_run(client, d, args.overhead_recordings, {"run": 0.0}, 2)
            res["overhead_4_steps"] = stub_run(client, d, args.overhead_recordings, {s: 0.0 for s in STUB_STAGES}, 2)
            res["simulated"] = {**stub_run(client, d, args.simulated, STUB_STAGES, 2), "stage_sleep_s": STUB_STAGES}
        finally: client.close(); lc.close()
    res["load_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")

if __name__ == "__main__": main()
