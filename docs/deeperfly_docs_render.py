"""Helpers the docs build (docs/build.py) uses inside each notebook's shell and when cleaning its outputs."""
from __future__ import annotations

import base64
import importlib
import inspect
import re

FIGURE_HEIGHT = "525px"   # as plotly's notebook renderer, when the figure sets no height
BIG_IMAGE_BYTES = 150_000  # PNG outputs larger than this become JPEG
JPEG_QUALITY = 85


FIGURE_CONFIG = {"responsive": True, "displaylogo": False}

# Draw once the page is parsed: a figure drawn where its script stands would take the width its column has at that
# moment, before the page's right-hand side bar exists, and come out wider than the column (clipped on the right).
_DRAW = ('<script>(function () {{ var draw = function () {{ var f = {spec}; Plotly.newPlot("{id}", f.data, f.layout, {config}); }};'
         ' if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw); else draw(); }})();</script>')


def figure_html(fig) -> str:
    """A Plotly figure (dict or Figure) -> `<div>` + a script that draws it with `Plotly.newPlot` once the page is parsed,
    as wide as its column (a width set in the figure's layout is dropped); plotly.js itself is loaded once by the page"""
    import json
    import uuid
    import plotly.io as pio
    fig = fig.to_dict() if hasattr(fig, "to_dict") else dict(fig)
    fig = _compact_arrays(_shrink_figure_images(fig))
    layout = dict(fig.get("layout") or {})
    layout.pop("width", None)
    height = layout.get("height")
    fig = {**fig, "layout": layout}
    div_id = str(uuid.uuid4())
    style = f"height:{height}px; width:100%;" if isinstance(height, (int, float)) else f"height:{FIGURE_HEIGHT}; width:100%;"
    return (f'<div style="{style}"><div id="{div_id}" class="plotly-graph-div" style="height:100%; width:100%;"></div>'
            + _DRAW.format(spec=pio.to_json(fig, validate=False), id=div_id, config=json.dumps(FIGURE_CONFIG)) + "</div>")


COMPACT_MIN_BYTES = 4_000  # float64 arrays bigger than this (base64) are sent as float32


def _compact_arrays(obj):
    "Large float64 typed arrays in a figure dict ({'dtype': 'f8', 'bdata': ...}) -> float32: half the bytes on the page"
    import numpy as np
    if isinstance(obj, dict):
        if obj.get("dtype") == "f8" and isinstance(obj.get("bdata"), str) and len(obj["bdata"]) > COMPACT_MIN_BYTES:
            a = np.frombuffer(base64.b64decode(obj["bdata"]), "<f8")
            with np.errstate(over="ignore"):
                return {**obj, "dtype": "f4", "bdata": base64.b64encode(a.astype("<f4").tobytes()).decode()}
        return {k: _compact_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list): return [_compact_arrays(v) for v in obj]
    return obj


def _png_to_jpeg(png: bytes) -> bytes | None:
    "JPEG bytes for an opaque PNG (None if it has transparency or would not get smaller)"
    import cv2
    import numpy as np
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None: return None
    if img.ndim == 3 and img.shape[2] == 4:
        if (img[..., 3] < 255).any(): return None
        img = img[..., :3]
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return buf.tobytes() if ok and len(buf) < len(png) else None


_RE_PNG_URI = re.compile(r"^data:image/png;base64,(.*)$", re.DOTALL)


def _shrink_uri(uri):
    m = _RE_PNG_URI.match(uri) if isinstance(uri, str) else None
    if not m or len(uri) < BIG_IMAGE_BYTES: return uri
    jpg = _png_to_jpeg(base64.b64decode(m[1]))
    return uri if jpg is None else "data:image/jpeg;base64," + base64.b64encode(jpg).decode()


def _shrink_figure_images(fig: dict) -> dict:
    "Large PNG images inside a figure (px.imshow traces, layout images) -> JPEG"
    for tr in fig.get("data", []):
        if isinstance(tr, dict) and "source" in tr: tr["source"] = _shrink_uri(tr["source"])
    for im in (fig.get("layout") or {}).get("images", []) or []:
        if isinstance(im, dict) and "source" in im: im["source"] = _shrink_uri(im["source"])
    return fig


def shrink_image(data: dict, mime: str) -> dict:
    "A notebook output's data with a large PNG replaced by a JPEG"
    if mime != "image/png": return data
    b64 = data[mime] if isinstance(data[mime], str) else "".join(data[mime])
    if len(b64) < BIG_IMAGE_BYTES: return data
    jpg = _png_to_jpeg(base64.b64decode(b64))
    if jpg is None: return data
    return {**{k: v for k, v in data.items() if k != mime}, "image/jpeg": base64.b64encode(jpg).decode()}


def package_twin(sym, module: str | None):
    """The exported `deeperfly_nb.<module>` version of a class defined in the notebook's shell, when its signature
    matches (docments needs a class's source file to read its parameter comments); otherwise `sym` itself"""
    if not module or not isinstance(sym, type) or sym.__module__ != "__main__": return sym
    try:
        obj = importlib.import_module(f"deeperfly_nb.{module}")
        for part in sym.__qualname__.split("."): obj = getattr(obj, part)
        if isinstance(obj, type) and str(inspect.signature(obj)) == str(inspect.signature(sym)): return obj
    except Exception:
        pass
    return sym


def type_name(t) -> str:
    "A short readable type: `Annotated` metadata dropped, unions as `a | b`, no `typing.` prefixes"
    import types
    import typing
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated: return type_name(args[0])
    if origin in (typing.Union, types.UnionType): return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal: return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if t is type(None): return "None"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def field_doc(field) -> str | None:
    "A pydantic field's documentation: its description, else the project's `expected` phrase (shown in error messages)"
    if field.description: return field.description
    extra = field.json_schema_extra
    return extra.get("expected") or None if isinstance(extra, dict) else None


class PydanticDoc:
    "show_doc for a pydantic model: nbdev's heading and docstring, with the fields (type, default, doc) as the signature"
    def __init__(self, cls, markdown: str): self.cls, self.md = cls, markdown

    def signature(self) -> str:
        from pydantic_core import PydanticUndefined
        lines = []
        for name, f in self.cls.model_fields.items():
            key = f.alias or name
            default = "" if f.default is PydanticUndefined and f.default_factory is None else \
                "=<factory>" if f.default_factory is not None else f"={f.default!r}"
            doc = field_doc(f)
            lines.append(f"    {key}:{type_name(f.annotation)}{default},{' # ' + doc if doc else ''}")
        return f"class {self.cls.__name__}(\n" + "\n".join(lines) + "\n)"

    def _repr_markdown_(self):
        return re.sub(r"```python\n.*?\n```", lambda m: f"```python\n{self.signature()}\n```", self.md, count=1, flags=re.DOTALL)


def show_doc(sym, *args, module: str | None = None, **kwargs):
    "nbdev's show_doc with the site's improvements: the exported twin of a notebook class, pydantic fields"
    from nbdev.showdoc import show_doc as nbdev_show_doc
    sym = package_twin(sym, module)
    res = nbdev_show_doc(sym, *args, **kwargs)
    try:
        import pydantic
        if isinstance(sym, type) and issubclass(sym, pydantic.BaseModel) and res is not None:
            return PydanticDoc(sym, res._repr_markdown_())
    except ImportError:
        pass
    return res
