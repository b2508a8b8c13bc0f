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
