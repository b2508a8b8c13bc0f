"""Every public function, class and method of `deeperfly_nb` has a docstring and documented parameters, as the docs
site shows them: docments comments (`x:int, # what it is`), `Annotated` strings or a NumPy-style "Parameters"
section (`fastcore.docments.docments`, what nbdev's `show_doc` renders); pydantic models document their fields
(`Field(description=...)`, or the `expected` phrase that config errors quote). Public = listed in a module's `__all__`; for classes also their own public methods and
properties (names without a leading underscore, defined in deeperfly_nb, `@patch`-ed ones included)."""
import dataclasses
import importlib
import inspect
import pkgutil

import pytest
from fastcore.docments import docments

import deeperfly_nb

SKIP_PARAMS = {"self", "cls"}


def _modules():
    return sorted(m.name for m in pkgutil.iter_modules(deeperfly_nb.__path__) if not m.name.startswith("_"))


def _own_doc(obj) -> str | None:
    "The object's own docstring (not inherited, not the signature a dataclass makes up)"
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc and doc.startswith(obj.__name__ + "("): return None
    return doc.strip() if isinstance(doc, str) and doc.strip() else None


def _undocumented_params(fn, skip_first: bool = False) -> list[str]:
    "Parameters without a doc (`self`/`cls`, and with `skip_first` the bound instance of a method, excepted)"
    try: dm = docments(fn, args_kwargs=True, returns=False)
    except Exception as e: return [f"(docments failed: {type(e).__name__}: {e})"]
    names = list(dm)[1:] if skip_first else list(dm)
    return [k for k in names if k not in SKIP_PARAMS and not dm[k]]


def _is_pydantic(cls) -> bool:
    try:
        import pydantic
        return issubclass(cls, pydantic.BaseModel)
    except ImportError: return False


def _field_doc(f) -> str | None:
    "A pydantic field's doc, as the site shows it: its description, else the config's `expected` phrase"
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return f.description or extra.get("expected")


def _ours(fn) -> bool:
    return (getattr(fn, "__module__", "") or "").startswith("deeperfly_nb")


def check_function(qual: str, fn, method: bool = False) -> list[str]:
    probs = []
    if not _own_doc(fn): probs.append(f"{qual}: no docstring")
    if (bad := _undocumented_params(fn, skip_first=method)): probs.append(f"{qual}: undocumented parameters {bad}")
    return probs


def check_class(qual: str, cls) -> list[str]:
    probs = []
    if not _own_doc(cls): probs.append(f"{qual}: no docstring")
    if _is_pydantic(cls):
        bad = [n for n, f in cls.model_fields.items() if not _field_doc(f)]
        if bad: probs.append(f"{qual}: fields without a description {bad}")
    elif dataclasses.is_dataclass(cls) or _ours(cls.__init__):
        # a dataclass documents its fields; a class with its own __init__ documents that __init__'s parameters
        if (bad := _undocumented_params(cls)): probs.append(f"{qual}: undocumented parameters {bad}")
    for name, attr in vars(cls).items():
        if name.startswith("_"): continue
        if isinstance(attr, property):
            if _ours(attr.fget) and not _own_doc(attr.fget): probs.append(f"{qual}.{name}: property without a docstring")
            continue
        fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
        if type(attr).__name__ == "_clsmethod": fn = attr.f   # fastcore's `@patch(cls_method=True)` wrapper
        if inspect.isfunction(fn) and _ours(fn):  # the first parameter of a method, whatever its name, is the instance
            probs += check_function(f"{qual}.{name}", fn, method=not isinstance(attr, staticmethod))
    return probs


def public_api_problems() -> list[str]:
    "Every problem found, one line each, `module.name: what is missing`"
    probs, seen = [], set()
    for m in _modules():
        try: mod = importlib.import_module(f"deeperfly_nb.{m}")
        except Exception as e:
            probs.append(f"deeperfly_nb.{m}: does not import ({type(e).__name__}: {e})"); continue
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if obj is None or id(obj) in seen: continue
            seen.add(id(obj))
            qual = f"{m}.{name}"
            if isinstance(obj, type): probs += check_class(qual, obj)
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj): probs += check_function(qual, obj)
    return probs


def test_public_api_is_documented():
    probs = public_api_problems()
    assert not probs, f"{len(probs)} public symbols lack a docstring or parameter docs:\n" + "\n".join(probs)


def test_the_check_catches_what_it_should():
    "The checker itself: it flags a missing docstring, an undocumented parameter and a bare pydantic field"
    def good(a: int,  # the a
             *rest,   # more
             b=1,     # the b
             **kw):   # options
        "Documented."
    def no_doc(a):  # the a
        pass
    def half(a,  # the a
             b):
        "Half documented."
    @dataclasses.dataclass
    class DC:
        x: int  # the x
        y: int
    @dataclasses.dataclass
    class DCNoDoc:
        x: int  # the x
    class Plain:
        "Plain."
        def __init__(self, a):
            pass
        def meth(obj, b):
            "A method."
        @staticmethod
        def stat(c):
            "A static method."
    for f in (Plain.__init__, Plain.meth, Plain.__dict__["stat"].__func__): f.__module__ = "deeperfly_nb.fake"
    for f in (good, no_doc, half): f.__module__ = "deeperfly_nb.fake"
    assert check_function("good", good) == []
    assert check_function("no_doc", no_doc) == ["no_doc: no docstring"]
    assert check_function("half", half) == ["half: undocumented parameters ['b']"]
    assert check_class("DC", DC) == ["DC: no docstring", "DC: undocumented parameters ['y']"]
    assert check_class("DCNoDoc", DCNoDoc) == ["DCNoDoc: no docstring"]
    assert check_class("Plain", Plain) == ["Plain: undocumented parameters ['a']", "Plain.meth: undocumented parameters ['b']",
                                           "Plain.stat: undocumented parameters ['c']"]
    pydantic = pytest.importorskip("pydantic")
    class M(pydantic.BaseModel):
        "A model."
        a: int = pydantic.Field(1, description="the a")
        b: int = 2
        c: int = pydantic.Field(3, json_schema_extra={"expected": "an integer"})
    assert check_class("M", M) == ["M: fields without a description ['b']"]
