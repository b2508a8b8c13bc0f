"""Shared fixtures: paths to the repository, the bundled example and the shared real data."""
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
DF3D_PKL = SHARED_DATA / "deepfly3d_sample" / "df3d_output" / "df3d_result.pkl"
EXAMPLE = ROOT / "examples" / "data"

@pytest.fixture
def df3d_pkl() -> Path:
    if not DF3D_PKL.exists():
        pytest.skip(f"real DeepFly3D sample not found at {DF3D_PKL} (it lives in ../shared/data beside the repository)")
    return DF3D_PKL

@pytest.fixture
def example_dir() -> Path:
    assert (EXAMPLE / "points2d.h5").exists(), f"the bundled example is missing: {EXAMPLE}/points2d.h5"
    return EXAMPLE

@pytest.fixture(scope="module")
def torch_one_thread():
    "Small CPU tensors: one torch thread avoids oversubscription when other test processes share the 2 cores."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny_recording(root:Path, n_frames:int=6, seed:int=11, video_scale:float=0.25) -> dict:
    """A short synthetic recording (7 MP4s + ground truth) in `root/rec`, a tiny random detector of the default plan's
    shape (`root/w.pt`; `root/v.pt` is another, of the same file size; a narrow stem: 1 s of detection, not 4) and a
    config dict using it with small videos and at most 20 bundle-adjustment evaluations, written to `root/config.toml`.
    Fast end-to-end runs of the whole pipeline (about 1.5 s in-process, not 6.5 s); the detections are not meant to be good."""
    import torch, tomli_w
    from deeperfly_nb.synth_footage import synth_recording
    from deeperfly_nb.detector import HourglassNet, save_checkpoint
    from deeperfly_nb.config import Config
    root.mkdir(parents=True, exist_ok=True)
    synth_recording(root / "rec", n_frames=n_frames, seed=seed)
    for name, s in (("w.pt", 0), ("v.pt", 1)):
        torch.manual_seed(s)
        save_checkpoint(root / name, HourglassNet(n_stacks=1, n_blocks=1, n_features=16, n_out_channels=19, n_stem_features=8), {"input_size": [256, 512]})
    d = Config.default().to_dict()
    d["pose2d"]["models"][0]["weights"] = str(root / "w.pt")
    d["bundle_adjustment"]["least_squares"]["max_nfev"] = 20      # a random detector's points: a few steps show the stage works
    for v in d["visualization"]["videos"]: v["scale"] = video_scale
    (root / "config.toml").write_text(tomli_w.dumps(d))
    return d

def as_image_folder(videos:Path, # a recording folder of camera_<c>.mp4
                    dest:Path, # the image-folder recording to write (camera_<c>_img_<t>.<ext>, DeepFly3D's layout)
                    ext:str="jpg", # jpg as DeepFly3D writes; bmp for frames of equal file size
                   ) -> Path:
    "The recording's frames as one image file per frame and camera."
    import cv2
    from deeperfly_nb.io import open_reader
    dest.mkdir(parents=True)
    for c in range(7):
        r = open_reader(videos / f"camera_{c}.mp4")
        for t in range(r.count()): cv2.imwrite(str(dest / f"camera_{c}_img_{t}.{ext}"), r[t][..., ::-1])
        r.close()
    return dest
