__version__ = "0.1.0"
# The package's front door, kept by hand (nbdev only updates the version line above): the names a notebook
# user needs first, each imported from its module on first use, so `import deeperfly_nb` stays instant and
# torch is imported only by what needs it. `tests/test_api.py` checks every name resolves.
_API = {"Config": "config", "Skeleton": "skeleton", "Camera": "cameras", "CameraGroup": "cameras",
        "triangulate": "triangulation", "reprojection_error": "triangulation",
        "bundle_adjust_cameras": "bundle_adjustment", "run_from_points2d": "pipeline", "load_points2d": "pipeline",
        "reconstruct": "pipeline", "PoseResult": "results", "read_df3d_result": "df3d",
        "run_recording": "run", "open_reader": "io",
        "CropOptions": "cropzoom", "boxes_from_points": "cropzoom", "refine_3d": "refinement", "RefineOptions": "refinement",
        "export_result": "interop", "read_points2d": "interop", "load_lifter": "lifting", "lift": "lifting"}
__all__ = ["__version__", *_API]

def __getattr__(name):
    if name not in _API: raise AttributeError(f"module 'deeperfly_nb' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"deeperfly_nb.{_API[name]}"), name)
    globals()[name] = value
    return value

def __dir__(): return sorted([*globals(), *_API])
