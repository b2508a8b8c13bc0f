"""A full disk ends a run cleanly (issue 10, item 5): exit code 2, one line naming the folder and the space
needed, no temporary file left, every output a finished stage recorded still intact.

The output folder lives on a small tmpfs mounted in a private mount namespace (`unshare -rm`, which needs
no root on a kernel that allows user namespaces; as root a plain namespace is used), filled to several
levels below what the run needs; `deeperfly run --overwrite` then recomputes every stage there.
"""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
import xxhash

from deeperfly_nb.results import PoseResult
from conftest import tiny_recording

CLI = [sys.executable, "-c", "import sys; from deeperfly_nb.cli import main; sys.exit(main())"]
TMPFS_BYTES = 64 << 20

def _unshare_prefix() -> list:
    "The command prefix that gives a private mount namespace where tmpfs can be mounted."
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        p = subprocess.run([*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                           capture_output=True, text=True)
        if p.returncode == 0: return prefix
    pytest.fail("cannot mount a tmpfs in a private mount namespace here (unshare -m / -rm both failed): "
                "this check needs it; " + p.stderr.strip())

@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    "A 6-frame recording, a tiny-detector config, and a complete run of it (the outputs a full disk must not harm)."
    root = tmp_path_factory.mktemp("diskfull")
    tiny_recording(root, seed=5, video_scale=0.5)
    p = subprocess.run([*CLI, "-q", "run", str(root / "rec"), "-c", str(root / "config.toml"), "-o", str(root / "out")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return root

def _outputs_intact(out:Path):
    "Every output that a stage record lists holds the content recorded (digests computed here, independently)."
    for rec in (out / ".deeperfly").glob("*.json"):
        r = json.loads(rec.read_text())
        if "outputs" not in r: continue
        for rel, digest in r["outputs"].items():
            assert (out / rel).is_file(), f"{rel} of {rec.name} is gone"
            assert xxhash.xxh3_128_hexdigest((out / rel).read_bytes()) == digest, f"{rel} of {rec.name} changed"
    PoseResult.load(out / "results.h5")

def _run_on_tmpfs(prefix, complete, mnt:Path, after:Path, free:int, copy_outputs:bool, stage:str):
    "Mount a tmpfs at `mnt`, (copy the complete outputs there,) leave `free` bytes, run with --overwrite STAGE; copy the outputs back."
    copy = f"cp -a '{complete / 'out'}' '{mnt}/out' && " if copy_outputs else ""
    script = (f"mount -t tmpfs -o size={TMPFS_BYTES} tmpfs '{mnt}' && {copy}"
              f"avail=$(df -B1 --output=avail '{mnt}' | tail -1) && "
              f"head -c $((avail - {free})) /dev/zero > '{mnt}/filler'; "
              + " ".join(f"'{a}'" for a in CLI) +
              f" -q run '{complete / 'rec'}' -c '{complete / 'config.toml'}' -o '{mnt}/out' --overwrite {stage}; rc=$?; "
              f"mkdir -p '{mnt}/out'; cp -a '{mnt}/out' '{after}'; exit $rc")
    return subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=600)

# (complete outputs there?, bytes left free, stages redone): an empty folder on a full disk and one with too little
# room for detection's results (both refused before any work); a complete run redone from detection with room for
# ever more of it (the lock and resume blocks, the 2D, the rig, the result); its videos redone with room for part of
# them (the encoder meets the full disk mid-stream).
def _levels(videos_bytes:int) -> list:
    return [(False, 0, ""), (False, 40_000, ""), *[(True, int(f * videos_bytes), "") for f in (0.0, 0.1, 0.4)],
            *[(True, int(f * videos_bytes), "visualization") for f in (0.1, 0.3)]]

def test_full_disk_at_every_level(complete, tmp_path):
    prefix = _unshare_prefix()
    sizes = {p.name: p.stat().st_size for p in (complete / "out").iterdir() if p.is_file()}
    print("outputs:", sizes)
    videos = sizes["pose2d.mp4"] + sizes["pose3d.mp4"]        # rendered together, in one pass: the peak need
    for i, (copy_outputs, free, stage) in enumerate(_levels(videos)):
        mnt, after = tmp_path / f"mnt{i}", tmp_path / f"after{i}"
        mnt.mkdir()
        p = _run_on_tmpfs(prefix, complete, mnt, after, free, copy_outputs, stage)
        print(f"{'complete outputs' if copy_outputs else 'empty folder'}, {free} bytes free, redo {stage or 'all'}: exit {p.returncode}: {p.stderr.strip()}")
        assert p.returncode == 2, (free, p.returncode, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left in" in lines[0] and str(mnt) in lines[0], (free, p.stderr)
        assert "Traceback" not in p.stderr
        assert not [q for q in after.rglob("*") if q.name.endswith(".tmp")], sorted(after.rglob("*"))
        if copy_outputs: _outputs_intact(after)
