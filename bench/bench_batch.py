"""Many recordings on Dask (issue 17): throughput, scheduling overhead, and a simulated 500-recording run.

1. Throughput: N short synthetic recordings (6 frames, the tiny random detector of tests/conftest.py) run by
   `batch.run_many` (a chain of tasks per recording: detection, geometry, videos) in this process, on
   `batch.local_cluster`s of 1 and 2 single-threaded worker processes, and on a plain `LocalCluster` of 2 (Dask's
   nanny environment, MALLOC_TRIM_THRESHOLD_ set), with and without `run_many`'s worker plugin (mallopt). Cluster
   start-up and one warm-up recording per worker (like the in-process warm-up run) are timed apart: steady state.
   Recordings per minute, and CPU seconds per recording (the machine may be shared: CPU seconds compare fairly,
   wall time does not).
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

def warm_worker(recording, config, root):
    "Run one recording in this worker process (imports, first-call costs), as the in-process warm-up run does."
    from deeperfly_nb.run import run_recording
    run_recording(recording, Path(root) / f"warm-{os.getpid()}", config, progress=False)
    return os.getpid()

def no_plugin():
    "A worker plugin that does nothing: `run_many` without deeperfly's worker setup, for comparison."
    from distributed.diagnostics.plugin import WorkerPlugin
    class Nothing(WorkerPlugin):
        name = "deeperfly-keep-freed-memory"
    return Nothing()

def cluster(n_workers:int, dask_env:bool=False, warm=None):
    """(LocalCluster, Client, seconds to start and warm them) with n single-threaded worker processes: deeperfly's
    `batch.local_cluster`, or (`dask_env`) a plain `LocalCluster` whose nannies set Dask's MALLOC_TRIM_THRESHOLD_."""
    from distributed import LocalCluster
    from deeperfly_nb.batch import connect, local_cluster
    t0 = time.perf_counter()
    lc = (LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) if dask_env
          else local_cluster(n_workers, 1, dashboard_address=None))
    client = connect(lc)
    client.wait_for_workers(n_workers)
    if warm is not None: client.run(warm_worker, *warm)              # steady state: every worker has run a recording
    return lc, client, time.perf_counter() - t0

def throughput(root:Path, config, recs:list) -> dict:
    "Recordings per minute in this process and on 1 and 2 workers (fresh output folders; warm-up run first)."
    from deeperfly_nb.batch import BatchOptions, run_many
    quiet, out = BatchOptions(progress=False), {}
    run_many(recs[:1], config, None, root / "warmup", quiet)              # imports torch, reads the weights once
    t0 = time.perf_counter(); o = run_many(recs, config, None, root / "here", quiet)
    out["in_process"] = {"seconds": time.perf_counter() - t0, **outcome_numbers(o)}
    import deeperfly_nb.batch as batch
    plugin = batch.worker_setup_plugin
    cases = (("workers_1", 1, False, True), ("workers_2", 2, False, True), ("workers_2_dask_default_env", 2, True, True),
             ("workers_2_dask_default_env_no_plugin", 2, True, False))
    for name, n, dask_env, with_plugin in cases:
        batch.worker_setup_plugin = plugin if with_plugin else no_plugin
        lc, client, start = cluster(n, dask_env, (recs[0], config, root / f"warm_{name}"))
        try:
            t0 = time.perf_counter(); o = run_many(recs, config, client, root / name, quiet)
            out[name] = {"seconds": time.perf_counter() - t0, "cluster_start_s": round(start, 2), **outcome_numbers(o)}
        finally: client.close(); lc.close(); batch.worker_setup_plugin = plugin
    for v in out.values(): v["recordings_per_min"] = round(60 * len(recs) / v["seconds"], 2); v["seconds"] = round(v["seconds"], 2)
    return out

def outcome_numbers(outcomes:list) -> dict:
    "Recordings done, CPU seconds per recording (median; the processes running its steps) and stage medians."
    import statistics
    return {"done": sum(x.status == "done" for x in outcomes), "cpu_s_per_recording": round(statistics.median(x.cpu_seconds for x in outcomes), 2),
            "stage_median_s": stage_medians(outcomes)}

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
