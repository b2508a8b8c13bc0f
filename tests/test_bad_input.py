"""Library-level bad input: each gets an error naming the array and what was expected."""
import numpy as np
import pytest
from deeperfly_nb.core import InputError, ConfigError
from deeperfly_nb.skeleton import Skeleton
from deeperfly_nb.synth import default_rig, walking_fly, observe
from deeperfly_nb.pipeline import run_from_points2d
from deeperfly_nb.triangulation import triangulate
from deeperfly_nb.config import Config

@pytest.fixture(scope="module")
def data():
    rig, fly = default_rig(), Skeleton.fly38()
    obs = observe(rig, walking_fly(8, seed=1), noise_px=0.5, seed=1)
    return rig, fly, obs

def test_view_count_disagrees_with_rig(data):
    rig, fly, obs = data
    with pytest.raises(InputError, match=r"pts2d has 6 along views"):
        run_from_points2d(rig, fly, obs.pts2d[:6], obs.conf[:6])
    with pytest.raises(InputError, match="pts2d"):
        triangulate(rig, obs.pts2d[:6])

def test_point_count_disagrees_with_skeleton(data):
    rig, fly, obs = data
    with pytest.raises(InputError, match=r"pts2d has 37 along points \(skeleton 'fly38'\)"):
        run_from_points2d(rig, fly, obs.pts2d[:, :, :37], obs.conf[:, :, :37])

def test_all_nan_input(data):
    rig, fly, obs = data
    with pytest.raises(InputError, match="all NaN"):
        run_from_points2d(rig, fly, np.full_like(obs.pts2d, np.nan), obs.conf)

def test_conf_shape_disagrees(data):
    rig, fly, obs = data
    with pytest.raises(InputError, match="conf"):
        run_from_points2d(rig, fly, obs.pts2d, obs.conf[:, :3])

def test_typo_key_in_config_names_the_path():
    with pytest.raises(ConfigError, match=r"triangulation\.ransac_treshold"):
        Config.from_dict({**Config.default().to_dict(), "triangulation": {"ransac_treshold": 3.0}})

def test_dangling_point_name_in_config():
    d = Config.default().to_dict()
    d["bundle_adjustment"]["points_to_use"] = ["lf_claw", "lf_clawz"]
    with pytest.raises(ConfigError, match="lf_clawz"):
        Config.from_dict(d)
