"""The cost of identifying inputs by content (issue 10): `deeperfly run`'s re-run of the bundled example, and a
1 GB video, cold and warm.

- 1 GB file: *cold* = the first digest after the file's pages were evicted from the page cache
  (`posix_fadvise(DONTNEED)`, so the disk is read); *page cache* = a digest of the bytes already in memory (the
  hashing alone); *warm* = a later run whose digest memo (`OUT/.deeperfly/digests.json`) knows the file: one
  `stat`, no read.
- The bundled example: a first run, then an unchanged re-run (every stage reused) with the memo, and one with
  the memo deleted (every footage and weights file hashed again).

    python bench/bench_hashing.py            # ~3 min on 2 cores (the first run detects 64 frames)

Writes bench/results/hashing.json.
"""
import json, os, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data"

def _evict(path):
    "Drop a file's pages from the page cache, so the next read comes from the disk."
    fd = os.open(path, os.O_RDONLY)
    try: os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally: os.close(fd)

def bench_gigabyte(folder:Path) -> dict:
    from deeperfly_nb.core import DigestCache
    big = folder / "video_1GB.mp4"
    with open(big, "wb") as f:
        block = os.urandom(1 << 24)
        for _ in range(64): f.write(block)                     # 64 x 16 MiB = 1 GiB
    os.utime(big, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))
    time.sleep(2.1)                                            # a digest taken right after a change is not trusted later
    _evict(big)
    memo = folder / "digests.json"
    t0 = time.perf_counter(); DigestCache(memo).digest(big); cold = time.perf_counter() - t0
    t0 = time.perf_counter(); c = DigestCache(); c.digest(big); cached = time.perf_counter() - t0
    c = DigestCache(memo); c.digest(big); c.save()
    t0 = time.perf_counter(); c2 = DigestCache(memo); c2.digest(big); warm = time.perf_counter() - t0
    assert c2.hashed_bytes == 0
    size = big.stat().st_size
    big.unlink()
    return {"bytes": size, "cold_s": round(cold, 3), "page_cache_s": round(cached, 3), "warm_s": round(warm, 6),
            "page_cache_GB_per_s": round(size / cached / 1e9, 2), "cold_GB_per_s": round(size / cold / 1e9, 2)}

def _run(out) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(["deeperfly", "-q", "run", str(EXAMPLE), "-o", str(out)], capture_output=True, text=True)
    if p.returncode: sys.exit(p.stderr)
    return time.perf_counter() - t0

def bench_example(folder:Path) -> dict:
    out = folder / "out"
    first = _run(out)
    warm = min(_run(out) for _ in range(3))
    cold = []
    for _ in range(3):
        (out / ".deeperfly" / "digests.json").unlink()
        cold.append(_run(out))
    return {"first_run_s": round(first, 1), "rerun_warm_s": round(warm, 2), "rerun_memo_deleted_s": round(min(cold), 2),
            "footage_bytes": sum(p.stat().st_size for p in EXAMPLE.glob("camera_*.mp4"))}

if __name__ == "__main__":
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        res = {"env": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
               "gigabyte_file": bench_gigabyte(Path(d)), "bundled_example": bench_example(Path(d))}
    res["env"]["load_average_1min_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))
    (ROOT / "bench" / "results" / "hashing.json").write_text(json.dumps(res, indent=1) + "\n")
