"""Many recordings on Dask (issue 17): `batch.run_many` gives the same results as a sequential run, survives a
killed worker, isolates bad recordings and refuses bad input clearly.

Six short synthetic recordings (6 frames each, distinct seeds) share one tiny random detector (`conftest.tiny_recording`);
Dask runs use a LocalCluster of 2 single-threaded worker processes.
"""
import json, os, shutil, signal, socket, threading, time, tomllib
from pathlib import Path
import h5py, numpy as np, pytest

from deeperfly_nb.core import ConfigError, InputError
from deeperfly_nb.config import Config
from deeperfly_nb.run import OutputLock, STATE_DIR, read_record
from deeperfly_nb.batch import (BatchOptions, ClusterConfig, cluster_config, cluster_from_config, connect, local_cluster,
                                open_client, run_many)
from conftest import tiny_recording

distributed = pytest.importorskip("distributed")
N_RECORDINGS = 6
QUIET = BatchOptions(progress=False)

@pytest.fixture(scope="module")
def batch(tmp_path_factory, torch_one_thread):
    "{'config', 'recs', 'seq': the sequential run's output folder, 'outcomes'}."
    from deeperfly_nb.synth_footage import synth_recording
    root = tmp_path_factory.mktemp("batch")
    d = tiny_recording(root / "w")
    d["pipeline"]["visualization"] = False                                # videos: not what these tests are about
    config = Config.from_dict(d, "test config")
    recs = [synth_recording(root / "recs" / f"rec{i}", n_frames=4, seed=100 + i) for i in range(N_RECORDINGS)]
    outcomes = run_many(recs, config, None, root / "seq", QUIET)
    return {"root": root, "config": config, "recs": recs, "seq": root / "seq", "outcomes": outcomes}

@pytest.fixture(scope="module")
def client():
    "A LocalCluster of 2 single-threaded worker processes (each restarted by its nanny if it dies)."
    with local_cluster(2, 1, dashboard_address=None) as lc:
        c = connect(lc)
        assert set(c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {None}   # deeperfly's workers
        yield c
        c.close()

CLOCK_KEYS = {"seconds", "created", "created_utc"}     # wall times and creation times: they differ between any two runs

def _untimed(x):
    "JSON data without its clock readings (`CLOCK_KEYS`)."
    if isinstance(x, dict): return {k: _untimed(v) for k, v in x.items() if k not in CLOCK_KEYS}
    return [_untimed(v) for v in x] if isinstance(x, list) else x

def _content(ds) -> tuple:
    "A dataset's dtype, shape and bytes; for a JSON text (meta, provenance), its data less the wall times."
    v = ds[()]
    if isinstance(v, (bytes, str)):
        try: return ("json", _untimed(json.loads(v)))
        except ValueError: return ("text", v)
    a = np.asarray(v)
    return (str(a.dtype), a.shape, a.tolist() if a.dtype.kind == "O" else a.tobytes())

def datasets(path:Path) -> dict:
    "{dataset name: (dtype, shape, content)} of every dataset in an HDF5 file."
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, _content(v)) if isinstance(v, h5py.Dataset) else None)
    return out

def assert_same_results(a:Path, b:Path, names):
    "results.h5 and pose2d.h5 of every recording bit for bit, and cameras.toml byte for byte."
    for n in names:
        for f in ("results.h5", "pose2d.h5"):
            da, db = datasets(a / n / f), datasets(b / n / f)
            assert da.keys() == db.keys() and len(da) > 3, (n, f, sorted(da), sorted(db))
            for k in da: assert da[k] == db[k], f"{n}/{f}:{k} differs"
        assert (a / n / "cameras.toml").read_bytes() == (b / n / "cameras.toml").read_bytes(), n

def assert_nothing_half_written(out:Path):
    "No temporary file anywhere, and every stage record's outputs exist with the content it recorded."
    tmp = [p for p in out.rglob(".*.tmp")]
    assert not tmp, tmp
    from deeperfly_nb.core import DigestCache
    for rec_dir in (p for p in out.iterdir() if p.is_dir()):
        for rec in (rec_dir / STATE_DIR).glob("*.json"):
            if rec.name in ("digests.json", "weights.json", "recording.json"): continue   # caches and the folder's recording
            r = read_record(rec_dir, rec.stem)
            for rel, dg in r["outputs"].items():
                assert DigestCache(rec_dir / STATE_DIR / "check.json").digest(rec_dir / rel) == dg, (rec_dir, rel)

# 1. the same results, sequential or on Dask -----------------------------------------------------------------

def test_dask_run_is_bit_identical_to_sequential(batch, client, tmp_path):
    assert [o.status for o in batch["outcomes"]] == ["done"] * N_RECORDINGS, [o.error for o in batch["outcomes"]]
    outcomes = run_many(batch["recs"], batch["config"], client, tmp_path / "dask", QUIET)
    assert [o.status for o in outcomes] == ["done"] * N_RECORDINGS, [o.error for o in outcomes]
    assert len({o.worker for o in outcomes}) == 2                       # both workers took recordings
    assert [Path(o.recording) for o in outcomes] == batch["recs"]       # reported in input order
    assert_same_results(batch["seq"], tmp_path / "dask", [r.name for r in batch["recs"]])
    statuses = lambda os_: [{s: v[0] for s, v in o.stages.items()} for o in os_]
    assert statuses(outcomes) == statuses(batch["outcomes"])            # every stage ran, in its own step's task
    rows = (tmp_path / "dask" / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + N_RECORDINGS and all(",done," in r for r in rows[1:])
    assert "<table>" in (tmp_path / "dask" / "summary.html").read_text()

def test_one_task_per_stage_group_records_every_stage(batch, tmp_path):
    "Each step ran its stages (detection, then geometry); a forced stage re-runs in its own step only."
    first = batch["outcomes"][0]
    assert {s: v[0] for s, v in first.stages.items()} == {"pose2d": "ran", "bundle_adjustment": "ran", "triangulation": "ran",
                                                          "visualization": "disabled"}, first.stages
    assert first.cpu_seconds > 0 and all(v[1] > 0 for v in first.stages.values() if v[0] == "ran")
    rec = batch["recs"][0]
    shutil.copytree(batch["seq"] / rec.name, tmp_path / "out" / rec.name)
    again = run_many([rec], batch["config"], None, tmp_path / "out", QUIET)[0]
    assert {s: v[0] for s, v in again.stages.items() if s != "visualization"} == dict.fromkeys(
        ["pose2d", "bundle_adjustment", "triangulation"], "reused"), again.stages
    forced = run_many([rec], batch["config"], None, tmp_path / "out", BatchOptions(overwrite=("triangulation",), progress=False))[0]
    assert [forced.stages[s][0] for s in ("pose2d", "bundle_adjustment", "triangulation")] == ["reused", "reused", "ran"], forced.stages
    forced = run_many([rec], batch["config"], None, tmp_path / "out", BatchOptions(overwrite=("pose2d",), progress=False))[0]
    assert [forced.stages[s][0] for s in ("pose2d", "bundle_adjustment", "triangulation")] == ["ran"] * 3, forced.stages
    assert read_record(tmp_path / "out" / rec.name, "pose2d")["seconds"] == forced.stages["pose2d"][1]   # detected once, not again by geometry
    assert_same_results(batch["seq"], tmp_path / "out", [rec.name])

# 2. a worker killed mid-run ----------------------------------------------------------------------------------

def _kill_a_busy_worker(client, out:Path, pids:dict, killed:list, stop:threading.Event):
    "SIGKILL the first worker seen running a recording whose output folder is started but has no results.h5 yet."
    while not stop.is_set():
        for addr, keys in client.processing().items():
            for k in keys:
                name = str(k).split("-")[1]
                if (out / name / STATE_DIR).is_dir() and not (out / name / "results.h5").exists() and addr in pids:
                    os.kill(pids[addr], signal.SIGKILL); killed.append((name, pids[addr])); return
        time.sleep(0.05)

def test_a_killed_worker_changes_nothing(batch, client, tmp_path):
    out, stop, killed, recs = tmp_path / "killed", threading.Event(), [], batch["recs"][:3]
    client.wait_for_workers(2)
    pids = client.run(os.getpid)
    t = threading.Thread(target=_kill_a_busy_worker, args=(client, out, pids, killed, stop), daemon=True); t.start()
    try: outcomes = run_many(recs, batch["config"], client, out, QUIET)
    finally: stop.set(); t.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert [o.status for o in outcomes] == ["done"] * len(recs), [o.error for o in outcomes]
    name, pid = killed[0]
    victim = next(o for o in outcomes if Path(o.recording).name == name)
    assert victim.worker != f"{socket.gethostname()}:{pid}"              # finished by another worker process
    assert_same_results(batch["seq"], out, [r.name for r in recs])
    assert_nothing_half_written(out)

# 3. failures are isolated -------------------------------------------------------------------------------------

def test_a_bad_recording_fails_alone(batch, client, tmp_path):
    bad = tmp_path / "bad"; shutil.copytree(batch["recs"][0], bad)
    (bad / "camera_3.mp4").write_bytes(b"not a video" * 100)
    good = batch["recs"][:2]
    out = tmp_path / "out"
    for r in good: shutil.copytree(batch["seq"] / r.name, out / r.name)       # cached: only the bad one computes
    outcomes = run_many([good[0], bad, good[1]], batch["config"], client, out, QUIET)
    assert [o.status for o in outcomes] == ["done", "failed", "done"], [o.error for o in outcomes]
    assert "cannot open" in outcomes[1].error and "camera_3.mp4" in outcomes[1].error, outcomes[1].error
    assert "\n" not in outcomes[1].error                                  # one line: a row of the table
    summary = (out / "summary.csv").read_text()
    assert "failed" in summary and "camera_3.mp4" in summary

def test_a_recording_removed_mid_run_fails_alone(batch, tmp_path):
    recs = [shutil.copytree(r, tmp_path / "recs" / r.name) for r in batch["recs"][:2]]
    for r in recs: shutil.copytree(batch["seq"] / r.name, tmp_path / "out" / r.name)   # detection cached
    def remove_the_next(o): shutil.rmtree(recs[1], ignore_errors=True)  # after the first recording finishes
    outcomes = run_many(recs, batch["config"], None, tmp_path / "out", QUIET, on_result=remove_the_next)
    assert [o.status for o in outcomes] == ["done", "failed"], [o.error for o in outcomes]
    assert "no such recording folder" in outcomes[1].error
    assert "no such recording folder" in (tmp_path / "out" / "summary.csv").read_text()

# 4. the cluster table and the SLURM job script ------------------------------------------------------------------

def test_unknown_and_misplaced_cluster_keys_are_named():
    with pytest.raises(ConfigError) as e:
        cluster_config({"kind": "slurm", "memory": "8GB", "gpu": 1, "cores": "4", "address": "tcp://h:8786"}, "lab.toml")
    msg = str(e.value)
    assert "lab.toml: cluster.gpu: unknown key" in msg and "did you mean 'gpus'" in msg
    assert "lab.toml: cluster.cores: expected a positive whole number" in msg
    with pytest.raises(ConfigError, match="address not used by kind = 'local'"): cluster_config({"address": "tcp://h:8786"})
    with pytest.raises(ConfigError, match="cluster.walltime: expected a SLURM time limit"):
        cluster_config({"kind": "slurm", "memory": "8GB", "walltime": "2 hours"})

def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue")
    cc = cluster_config({"kind": "slurm", "queue": "gpu", "account": "flylab", "cores": 4, "memory": "16GB",
                         "walltime": "04:00:00", "gpus": 1, "processes": 2, "job_extra": ["--constraint=a100"],
                         "prologue": ["module load cuda"], "log_directory": "/tmp/deeperfly-logs"})
    cluster = cluster_from_config(cc)
    try: script = cluster.job_script()
    finally: cluster.close()
    lines = script.splitlines()
    for d in ("-p gpu", "-A flylab", "--cpus-per-task=4", "-t 04:00:00", "--constraint=a100", "--gres=gpu:1"):
        assert f"#SBATCH {d}" in lines, (d, script)
    assert any(l.startswith("#SBATCH --mem=") for l in lines), script
    worker = next(l for l in lines if "distributed.cli.dask_worker" in l)
    assert "--nworkers 2" in worker and "--nthreads 2" in worker and "--resources GPU=1" in worker, worker
    assert lines.index("module load cuda") < lines.index(worker)

# 5. bad input ------------------------------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def test_an_unreachable_scheduler_fails_fast_and_clearly():
    address = f"tcp://127.0.0.1:{_closed_port()}"
    cc = cluster_config({"kind": "scheduler", "address": address, "connect_timeout_s": 2})
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"cannot reach the Dask scheduler at {address} within 2 s"):
        with open_client(cc, 3): pass
    assert time.perf_counter() - t0 < 15

def test_two_batches_on_one_output_folder(batch, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):                                                 # another batch holds the folder
        with pytest.raises(InputError, match="is in use by deeperfly run .*add --wait"):
            run_many(batch["recs"][:1], batch["config"], None, out, QUIET)
    assert not (out / "summary.csv").exists() and not (out / batch["recs"][0].name).exists()
    other = OutputLock(out).__enter__()
    threading.Timer(1.0, other.__exit__).start()                          # the other batch ends in a second
    shutil.copytree(batch["seq"] / batch["recs"][0].name, out / batch["recs"][0].name)
    t0 = time.perf_counter()
    outcomes = run_many(batch["recs"][:1], batch["config"], None, out, BatchOptions(wait=True, progress=False))
    assert time.perf_counter() - t0 >= 0.9 and outcomes[0].status == "done"

def test_a_gpu_task_without_gpu_workers_is_refused(batch, client, tmp_path):
    with pytest.raises(InputError, match="none of the cluster's 2 workers offers a GPU slot"):
        run_many(batch["recs"][:1], batch["config"], client, tmp_path / "out", BatchOptions(device="cuda", progress=False))


def test_cli_run_with_workers_writes_the_summary(batch, tmp_path, caplog):
    "`deeperfly run FOLDER --workers 0` goes through the batch path: same results as run_many, a summary table; a bad [cluster] key is named."
    import tomli_w
    from deeperfly_nb.cli import main
    (tmp_path / "config.toml").write_text(tomli_w.dumps(batch["config"].to_dict()))
    recs = batch["recs"][0].parent
    assert main(["run", str(recs), "-c", str(tmp_path / "config.toml"), "-o", str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 0
    assert (tmp_path / "out" / "summary.csv").is_file() and (tmp_path / "out" / "summary.html").is_file()
    assert_same_results(batch["seq"], tmp_path / "out", [r.name for r in batch["recs"]])
    import csv
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    weights = [str(m["weights"]) for m in batch["config"].to_dict()["pose2d"]["models"]]
    assert [(r["frames"], r["detector"]) for r in rows] == [("4", " + ".join(weights))] * len(rows), rows   # 4 frames each
    assert all(0 <= float(r["triangulated_pct"]) <= 100 for r in rows), rows
    warned = [r for r in rows if r["warnings"]]                          # the tiny detector's 3D: the warnings `run` gives one recording
    assert warned and all(f"{r['recording']}: {r['warnings'].split(' | ')[0]}" in caplog.text for r in warned), caplog.text[-2000:]
    d = batch["config"].to_dict(); d["cluster"] = {"kind": "slurm", "memroy": "8GB"}
    (tmp_path / "bad.toml").write_text(tomli_w.dumps(d))
    assert main(["run", str(recs), "-c", str(tmp_path / "bad.toml"), "-o", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
