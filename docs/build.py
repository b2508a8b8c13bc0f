"""Build the documentation site into `_docs/`, offline: `python docs/build.py`.

nbdev renders docs with Quarto, which these machines cannot install; this builds the same site with Sphinx,
myst-nb and pydata-sphinx-theme from PyPI (`pip install -e ".[docs]"`):

1. Every notebook in `nbs/` (found afresh each build; names starting with `_` or `.` are skipped) goes through
   nbdev's own docs processors (those of `nbdev-proc-nbs`: front matter, `show_doc` cells for every exported
   symbol, hidden/exported cells removed, backtick links), executed top to bottom the way `nbdev-test` runs it:
   exactly the cells `nbdev.test.nb_test_cells` lists (so cells flagged with a `tst_flags` flag such as `#| slow`
   or `#| notest`, and `#| eval: false` cells, are skipped), plus the `show_doc` cells nbdev adds. Notebooks run
   in separate processes, `--jobs` at a time (default 2), each with a time limit; a line per notebook is printed
   as it finishes. Each process is forked from a server that imported the libraries every notebook uses (torch,
   numpy, IPython, nbdev, plotly...) once, so that a notebook pays for its own work, not ~3.5 s of imports. This execution is the test run: CI runs this script instead of `nbdev-test`, so every
   notebook runs once and its page shows those outputs.
2. A notebook that fails (an exception in a cell, a syntax error, half-written JSON, a crash or a timeout) still
   gets its page: the outputs up to the failing cell and an error box naming the cell and the exception. The
   build goes on, lists every failed notebook at the end with the failing cell and its traceback, and exits 1.
3. Plotly figures become a `<div>` and a `Plotly.newPlot` call; the site serves one copy of plotly.js
   (`_static/plotly.min.js`, from the installed plotly), loaded only by the pages that have a figure. No CDN,
   no MathJax. Large float64 arrays in figures travel as float32; large PNG outputs (and PNG images inside
   figures) are re-encoded as JPEG.
4. Navigation: the home page is `nbs/index.ipynb`; notebooks with `#| default_exp` are modules (section
   "API reference", one page each, named as nbdev names pages: `02_cameras.ipynb` -> `cameras.html`); every
   other notebook is a tutorial (section "Tutorials"). `nbs/sidebar.yml` (Quarto's sidebar, for those who have
   Quarto) is rewritten with the same sections.
5. `sphinx-build` (config in `docs/conf.py`) reads `_proc/src/` and writes `_proc/html/`, which then replaces
   `_docs/`; `_docs/_build_report.json` records pages, timings (wall and CPU), failures, Sphinx warnings and page sizes.

Builds sharing `_proc/` take turns (a lock file), so several people can run this (or the site test) at once.

Executed notebooks are cached in `_proc/.cache/`, keyed on the notebook, the package, the bundled example
and the docs scripts, so a rebuild re-runs only what changed; a site whose inputs are all unchanged is not rebuilt
at all (`--force` rebuilds anyway, `--no-cache` re-executes every notebook).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NBS = ROOT / "nbs"
PKG = ROOT / "deeperfly_nb"
PROC = ROOT / "_proc"  # .cache/ (executed notebooks), src/ (Sphinx's sources), html/ (Sphinx's output, then moved to _docs)
CACHE = PROC / ".cache"
OUT = ROOT / "_docs"
REPORT = "_build_report.json"
CACHE_VERSION = "1"  # bump when the processing below changes what a cached page holds

# Run in each notebook's shell before its first cell.
_KERNEL_SETUP = r'''
import plotly.io as _pio
from plotly.io._base_renderers import MimetypeRenderer as _MR
import deeperfly_docs_render as _ddr
class _SiteRenderer(_MR):
    "Plotly figure -> <div> + Plotly.newPlot script; the page loads the site's one plotly.js (no CDN, no MathJax)"
    def to_mimebundle(self, fig_dict): return {"text/html": _ddr.figure_html(fig_dict)}
_pio.renderers["deeperfly_site"] = _SiteRenderer()
_pio.renderers.default = "deeperfly_site"
del _MR, _SiteRenderer
def show_doc(sym, *args, **kwargs):
    "nbdev's show_doc (see docs/deeperfly_docs_render.py for what the site adds)"
    return _ddr.show_doc(sym, *args, module=__DEFAULT_EXP__, **kwargs)
'''


# ---------------------------------------------------------------------------------------------------------------
# discovery and naming

def page_name(nb: Path) -> str:
    "`02_cameras.ipynb` -> `cameras` (nbdev's page naming); `index.ipynb` -> `index`"
    return re.sub(r"^\d+[a-z]?_", "", nb.stem)


def discover(folder: Path = NBS) -> list[Path]:
    "Notebooks to render: every `nbs/*.ipynb` not starting with `_` or `.`, index first"
    nbs = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    return [p for p in nbs if p.stem == "index"] + [p for p in nbs if p.stem != "index"]


_RE_DEFAULT_EXP = re.compile(r"^\s*#\|\s*default_exp\s+(\S+)", re.MULTILINE)


def default_exp(nb: Path) -> str | None:
    "The `#| default_exp` module of a notebook (None: not a module notebook); a half-written notebook is read as text"
    text = nb.read_text(errors="replace")
    try: text = "\n".join(_text(c.get("source", "")) for c in json.loads(text)["cells"] if c.get("cell_type") == "code")
    except Exception: text = text.replace("\\n", "\n").replace('"#|', "#|")
    m = _RE_DEFAULT_EXP.search(text)
    return m[1].strip('"\',') if m else None


def kind(nb: Path) -> str:
    return "index" if nb.stem == "index" else "module" if default_exp(nb) else "tutorial"


def _files_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _tree(folder: Path, exts=None):
    if not folder.exists(): return []
    return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and not p.name.startswith(".") and (exts is None or p.suffix in exts)]


def exec_key() -> str:
    "What every notebook's outputs depend on besides itself: the package, the bundled example, the docs scripts run in it"
    scripts = [Path(__file__).resolve(), DOCS / "deeperfly_docs_render.py", ROOT / "pyproject.toml"]
    return _files_digest(_tree(PKG) + _tree(ROOT / "examples") + [p for p in scripts if p.exists()]) + CACHE_VERSION


def site_key(nbs, ekey: str) -> str:
    "Everything the site depends on"
    return hashlib.sha256((ekey + _files_digest(list(nbs) + _tree(DOCS, {".py", ".css", ".svg", ".html", ".js"}))).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# one notebook (runs in its own process: `build.py --one SRC DST STATUS`)

def process_one(src: Path, dst: Path, status: Path, cell_timeout: int):
    "Process and execute one notebook into `dst`; write `status` (JSON). Exceptions inside cells are recorded, not raised."
    t0 = time.perf_counter()
    os.environ["IN_TEST"] = "1"  # as nbdev-test sets it
    sys.path.insert(0, str(DOCS))
    # in the notebook's folder, as nbdev-test runs it (nbs/ when that folder is outside the project: build self-tests)
    os.chdir(src.parent if any((d / "pyproject.toml").exists() for d in [src.parent, *src.parent.parents]) else NBS)
    from fastcore.nbio import read_nb, write_nb
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, exec_show_docs, add_links as nbdev_add_links
    from nbdev.test import nb_test_cells
    from execnb.shell import CaptureShell

    skip_flags = get_config().get("tst_flags", "").split()
    failure = {}

    tested = {c.id for c in nb_test_cells(src, skip_flags)}  # the cells nbdev-test runs (none: skip_exec)
    where = {c.get("id"): i + 1 for i, c in enumerate(read_nb(src).cells)}  # id -> position in the notebook, from 1

    class exec_all(exec_show_docs):
        "Execute the notebook as nbdev-test does (the cells of `nb_test_cells`) plus nbdev's show_doc cells, keeping outputs"
        def begin(self):
            self.skip = lambda cell: not (cell.get("id") in tested or (tested and cell.get("has_sd")))
            self.k = CaptureShell(src, mpl_format="png")
            self.k.run_cell(_KERNEL_SETUP.replace("__DEFAULT_EXP__", repr(default_exp(src))))
            if self.k.exc: raise self.k.exc

        def __call__(self, cell):
            if failure or cell.cell_type != "code" or not cell.source.strip() or self.skip(cell): return
            self.k.cell(cell, timeout=cell_timeout)
            if (e := self.k.exc) is not None:
                failure.update(cell=f"{where.get(cell.get('id'), '?')} (id {cell.get('id')})", source=cell.source, error=f"{type(e).__name__}: {e}",
                               traceback=self.k.prettytb(fname=src.name))
                cell.metadata["deeperfly_failed"] = True

        def end(self): pass

    from nbdev.doclinks import NbdevLookup
    lookup = NbdevLookup(strip_libs=get_config().lib_path.name)  # link `Camera` as well as `deeperfly_nb.cameras.Camera`

    def add_links(cell):
        "nbdev's add_links, with the package's own names stripped of their module (nbdev strips `lib_name`, the project)"
        if cell.cell_type == "markdown": cell.source = lookup.linkify(cell.source)
        for o in cell.get("outputs", []):
            if hasattr(o, "data") and "text/markdown" in o["data"]:
                o.data["text/markdown"] = lookup.linkify(_text(o.data["text/markdown"]))

    swap = {exec_show_docs: exec_all, nbdev_add_links: add_links}
    procs = [swap.get(p, p) for p in FilterDefaults().procs()]
    nb = read_nb(src)
    NBProcessor(path=src, nb=nb, procs=procs, rm_directives="quarto").process()
    title = clean_nb(nb, page_name(src), failure)
    write_nb(nb, dst)
    import resource
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    status.write_text(json.dumps({"ok": not failure, "title": title, "seconds": time.perf_counter() - t0, "cpu_s": cpu,
                                  "error": failure and f"cell {failure['cell']} raised {failure['error']}\n--- the cell:\n{failure['source']}",
                                  "traceback": failure.get("traceback")}))


_RE_DIRECTIVE = re.compile(r"^\s*#\|.*\n?", re.MULTILINE)
_RE_LINK = None


def _re_link():
    "nbdev's links to this project's pages: [text](https://<doc_host><doc_baseurl>/page.html#anchor), host optional"
    global _RE_LINK
    if _RE_LINK is None:
        try:
            from nbdev.config import get_config
            cfg = get_config()
            host, base = str(cfg.doc_host).rstrip("/"), "/" + str(cfg.doc_baseurl).strip("/")
        except Exception:
            host, base = "https://deeperfly.github.io", "/deeperfly"
        _RE_LINK = re.compile(rf"\[([^\]\n]+)\]\((?:{re.escape(host)})?{re.escape(base.rstrip('/'))}/([\w.-]+\.html)(#[^)\s]*)?\)")
    return _RE_LINK


def _link_html(m) -> str:
    "An nbdev doc link as raw HTML (MyST would take `page.html#x` for a cross-reference and mangle it)"
    from docutils.nodes import make_id
    from html import escape
    text, page, anchor = m[1], m[2], m[3]
    inner = (f'<code class="docutils literal notranslate"><span class="pre">{escape(text[1:-1])}</span></code>'
             if len(text) > 1 and text[0] == text[-1] == "`" else escape(text))
    href = page + ("#" + make_id(anchor[1:]) if anchor and make_id(anchor[1:]) else "")
    return f'<a class="reference internal" href="{href}">{inner}</a>'


def _fix_links(text: str) -> str:
    "nbdev's absolute doc links -> relative links to our pages, anchors as docutils makes them; drop `#LNone` source lines"
    text = _re_link().sub(_link_html, text)
    text = text.replace("#LNone)", ")")
    return text.replace('{target="_blank" style="float:right; font-size:smaller"}', '{.sd-source target="_blank"}')


def _text(v) -> str: return "".join(v) if isinstance(v, list) else v


def _md_cell(source: str) -> dict:
    return {"cell_type": "markdown", "id": hashlib.sha1(source.encode()).hexdigest()[:8], "metadata": {}, "source": source}


def _admonition(kind_: str, title: str, body: str, literal: bool = False) -> dict:
    "A MyST admonition cell; `literal`: the body is shown verbatim (tracebacks, error messages)"
    if literal: body = f"````text\n{body.replace('````', '` ` ` `')}\n````"
    return _md_cell(f"::::{{admonition}} {title}\n:class: {kind_}\n\n{body}\n::::\n")


def clean_nb(nb, page: str, failure: dict | None = None) -> str:
    "Make nbdev's processed notebook what myst-nb expects; return the page title"
    sys.path.insert(0, str(DOCS))
    import deeperfly_docs_render as ddr
    cells, title = [], page
    for i, c in enumerate(nb.cells):
        for k in ("has_sd", "idx_", "directives_"): c.pop(k, None)
        md = c.setdefault("metadata", {})
        md.pop("execution", None)
        src = c.get("source") or ""
        if c.cell_type == "raw" and src.startswith("---"):
            # nbdev's front matter -> a real title (Sphinx needs a heading) + the description as a lead paragraph
            import yaml
            fm = yaml.safe_load(src.strip().strip("-")) or {}
            title = str(fm.get("title", page))
            text = f"# {title}\n"
            if fm.get("description"): text += f"\n```{{rst-class}} lead\n```\n{fm['description']}\n"
            c["cell_type"], c["source"], c["metadata"] = "markdown", text, {}
            c.pop("outputs", None); c.pop("execution_count", None)
            cells.append(c)
            if failure:
                cells.append(_admonition("error", "This page did not build completely",
                                         f"Cell {failure['cell']} of `{page}` raised `{failure['error'].splitlines()[0][:300]}`; "
                                         "the cells after it were not run."))
            continue
        if c.cell_type == "markdown":
            if "WARNING: THIS FILE WAS AUTOGENERATED" in src: continue
            c.source = _fix_links(src)
        elif c.cell_type == "code":
            is_sd = bool(re.search(r"^show_doc", src, re.MULTILINE))
            dirs = {m.group(0).strip() for m in _RE_DIRECTIVE.finditer(src)}
            c.source = _RE_DIRECTIVE.sub("", src).strip("\n")
            tags = set(md.get("tags", []))
            if is_sd or any(re.match(r"#\|\s*echo:\s*false", d) for d in dirs): tags.add("remove-input")
            if any(re.match(r"#\|\s*output:\s*false", d) for d in dirs): tags.add("remove-output")
            if any(re.match(r"#\|\s*code-fold:", d) for d in dirs): tags.add("hide-input")
            if tags: md["tags"] = sorted(tags)
            outs = []
            for o in c.get("outputs", []):
                if o.get("output_type") in ("execute_result", "display_data"):
                    data = o.get("data", {})
                    if not data: continue  # e.g. the empty execute_result after a returned figure
                    if "application/vnd.plotly.v1+json" in data:  # a notebook that chose plotly's mimetype renderer
                        o["data"] = data = {"text/html": ddr.figure_html(data["application/vnd.plotly.v1+json"])}
                    if "text/markdown" in data:  # show_doc's leading rule would be a transition outside a section
                        data["text/markdown"] = re.sub(r"\A\s*---\s*\n", "", _fix_links(_text(data["text/markdown"])))
                    if "text/html" in data and "Plotly.newPlot" in _text(data["text/html"]): data.pop("text/plain", None)
                    for mime in ("image/png", "image/jpeg"):
                        if mime in data: o["data"] = data = ddr.shrink_image(data, mime)
                    o.get("metadata", {}).pop("image/png", None) if "image/png" not in data else None
                elif o.get("output_type") == "stream":
                    o["text"] = _text(o.get("text", ""))
                outs.append(o)
            c.outputs = outs
            if md.pop("deeperfly_failed", False):
                cells.append(c)
                cells.append(_admonition("error", "This cell failed", failure["error"], literal=True))
                continue
            if not c.source and not outs: continue
        cells.append(c)
    nb.cells = cells
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return title


def fallback_page(src: Path, dst: Path, error: str) -> str:
    "A page for a notebook that could not be processed at all: its markdown and code as they stand, and the error"
    title = page_name(src)
    cells = []
    try:
        raw = json.loads(src.read_text())
        for c in raw.get("cells", []):
            s = _text(c.get("source", ""))
            if c.get("cell_type") == "markdown":
                if not cells and s.lstrip().startswith("# "):
                    title = s.lstrip()[2:].splitlines()[0].strip(); s = "\n".join(s.lstrip().splitlines()[1:])
                    s = re.sub(r"^\s*>\s*", "", s)
                cells.append(_md_cell(s))
            elif c.get("cell_type") == "code" and not re.search(r"^\s*#\|\s*(hide|export)", s, re.MULTILINE):
                cells.append({"cell_type": "code", "id": f"c{len(cells)}", "metadata": {},
                              "source": _RE_DIRECTIVE.sub("", s).strip("\n"), "outputs": [], "execution_count": None})
    except Exception as e:  # half-written JSON, say
        error += f"\n(the notebook itself could not be read: {type(e).__name__}: {e})"
    cells = [_md_cell(f"# {title}\n"),
             _admonition("error", "This page could not be built", error.strip()[-3000:], literal=True)] + cells
    dst.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                               "language": "python"}, "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}))
    return title


# ---------------------------------------------------------------------------------------------------------------
# the whole site

def _child_env(jobs: int) -> dict:
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))  # each notebook its own core(s): no oversubscription
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"): env[v] = threads
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(DOCS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# Libraries every notebook imports, imported once by a fork server that then forks a fresh process per notebook:
# each notebook still runs in its own process, without paying ~3.5 s of imports (about 75 s of a full 2-job build).
_PRELOAD = ["numpy", "scipy.optimize", "torch", "h5py", "plotly.graph_objects", "plotly.io", "IPython", "execnb.shell",
            "nbdev.process", "nbdev.processors", "nbdev.test", "fastcore.test", "nbformat", "plotly.io._renderers",
            "matplotlib_inline.backend_inline"]
_SERVER = None


def _forkserver():
    "The multiprocessing context whose fork server has imported `_PRELOAD` (started by the first notebook)"
    global _SERVER
    if _SERVER is None:
        import multiprocessing
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(_PRELOAD)
    return _SERVER


def _one_forked(src: str, dst: str, status: str, log: str, cell_timeout: int):
    "`process_one` in a process the fork server made, its output going to `log`"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
    os.chdir(ROOT)
    process_one(Path(src), Path(dst), Path(status), cell_timeout)


def run_notebook(nb: Path, ekey: str, args) -> dict:
    "Execute one notebook (or take it from the cache); always leaves `_proc/<page>.ipynb`; return its record"
    page = page_name(nb)
    dst, rec = PROC / "src" / f"{page}.ipynb", {"page": page, "notebook": nb.name, "kind": kind(nb)}
    key = hashlib.sha256(nb.read_bytes() + ekey.encode()).hexdigest()
    cached, cmeta = CACHE / f"{page}.ipynb", CACHE / f"{page}.json"
    if not args.no_cache and cmeta.exists() and cached.exists():
        meta = json.loads(cmeta.read_text())
        if meta.get("key") == key and meta.get("ok"):
            shutil.copyfile(cached, dst)
            return {**rec, **{k: meta.get(k) for k in ("ok", "title", "seconds", "cpu_s", "error")}, "cached": True}
    status = PROC / f".{page}.status.json"
    status.unlink(missing_ok=True)
    t0 = time.perf_counter()
    log_file = PROC / f".{page}.log"
    p = _forkserver().Process(target=_one_forked, args=(str(nb), str(dst), str(status), str(log_file), args.cell_timeout))
    p.start(); p.join(args.timeout)
    why = f"the notebook process exited with code {p.exitcode}"
    if p.is_alive():
        p.kill(); p.join(); why = f"timed out after {args.timeout} s (--timeout)"
    log = log_file.read_text(errors="replace")[-4000:] if log_file.exists() else ""
    secs = time.perf_counter() - t0
    if status.exists() and dst.exists():
        st = json.loads(status.read_text())
        rec.update(ok=st["ok"], title=st["title"], seconds=secs, cpu_s=st.get("cpu_s"), error=st["error"] or None,
                   traceback=st.get("traceback"))
    else:  # processing itself failed (syntax error, unreadable JSON, crash, timeout): a stub page with the error
        err = f"{why}\n{log}"
        rec.update(ok=False, title=fallback_page(nb, dst, err), seconds=secs, cpu_s=None, error=err)
    rec["cached"] = False
    if rec["ok"]:
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dst, cached)
        cmeta.write_text(json.dumps({"key": key, **{k: rec[k] for k in ("ok", "title", "seconds", "cpu_s", "error")}}))
    return rec


def _progress_line(r: dict, elapsed: float) -> str:
    "One notebook's line: name, kind, wall and CPU seconds, cached/FAILED, and the time since the build started"
    cpu = f"(cpu {r['cpu_s']:5.1f} s)" if r.get("cpu_s") is not None else " " * 14
    state = " cached" if r["cached"] else ""
    if not r["ok"]: state += "  FAILED: " + (r.get("error") or "").splitlines()[0][:150]
    return f"{r['notebook']:<28} {r['kind']:<9} {r['seconds']:6.1f} s {cpu}{state}  [{elapsed:4.0f} s]"


def write_navigation(records: list[dict]):
    "Sections: Tutorials (non-module notebooks) and API reference (module notebooks), as hidden toctrees of the home page"
    mods = [r for r in records if r["kind"] == "module"]
    tuts = [r for r in records if r["kind"] == "tutorial"]
    def toc(rs): return "```{toctree}\n:maxdepth: 1\n\n" + "\n".join(f"{r['title']} <{r['page']}>" for r in rs) + "\n```\n"
    (PROC / "src" / "api.md").write_text("# API reference\n\nOne page per module: its exported functions and classes with "
                                 "their signatures, documented parameters and docstrings, and runnable examples.\n\n" + toc(mods))
    entries = []
    if tuts:
        (PROC / "src" / "tutorials.md").write_text("# Tutorials\n\nStep-by-step guides, computed on the bundled example.\n\n" + toc(tuts))
        entries.append("tutorials")
    entries.append("api")
    toctree = "```{toctree}\n:hidden:\n:maxdepth: 2\n\n" + "\n".join(entries) + "\n```\n"
    idx = PROC / "src" / "index.ipynb"
    if not idx.exists():  # no nbs/index.ipynb
        (PROC / "src" / "index.md").write_text("# deeperfly\n\n" + toctree); return
    nb = json.loads(idx.read_text())
    nb["cells"].append(_md_cell(toctree))
    idx.write_text(json.dumps(nb, indent=1))


def write_quarto_sidebar(records: list[dict]):
    "nbs/sidebar.yml with the same sections, for nbdev-docs under Quarto (written only when it changes)"
    def items(rs): return "".join(f"          - {r['notebook']}\n" for r in rs)
    tuts = [r for r in records if r["kind"] == "tutorial"]
    mods = [r for r in records if r["kind"] == "module"]
    text = ("# Written by docs/build.py from the notebooks in nbs/ (index, then tutorials, then modules).\n"
            "website:\n  sidebar:\n    contents:\n      - index.ipynb\n")
    if tuts: text += "      - section: Tutorials\n        contents:\n" + items(tuts)
    if mods: text += "      - section: API reference\n        contents:\n" + items(mods)
    p = NBS / "sidebar.yml"
    if not p.exists() or p.read_text() != text: p.write_text(text)


def page_sizes(out: Path) -> dict:
    "HTML page sizes in bytes, largest first (the shared _static files are not part of any page)"
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*.html")
             if not any(part.startswith("_") for part in p.relative_to(out).parts)}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def _lock(proc: Path, shared: bool = False):
    "Hold `proc/.lock` until the process ends: builds sharing a folder run one after the other (readers share it)"
    import fcntl
    proc.mkdir(parents=True, exist_ok=True)
    f = open(proc / ".lock", "a")
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try: fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for another docs build using {proc} ...", flush=True)
        fcntl.flock(f, mode)
    _LOCKS.append(f)
    return f


_LOCKS = []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: _docs/)")
    ap.add_argument("--nbs", type=Path, default=NBS, help="notebooks folder (default: nbs/)")
    ap.add_argument("--proc", type=Path, default=None, help="folder for processed notebooks and the cache (default: _proc/)")
    ap.add_argument("--jobs", type=int, default=2, help="notebooks executed at once (default 2)")
    ap.add_argument("--only", default="", help="regex: render only matching notebooks (and index), for quick iteration")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds one notebook may take in all (default 1200)")
    ap.add_argument("--cell-timeout", type=int, default=600, help="seconds one cell may take (default 600)")
    ap.add_argument("--no-cache", action="store_true", help="re-execute every notebook (what CI does)")
    ap.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    ap.add_argument("--one", nargs=3, metavar=("SRC", "DST", "STATUS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one: return process_one(*map(Path, a.one), cell_timeout=a.cell_timeout)

    global PROC, CACHE
    if a.proc: PROC, CACHE = a.proc.resolve(), a.proc.resolve() / ".cache"
    t0 = time.perf_counter()
    out = a.out.resolve()
    _lock(PROC)
    nbs = discover(a.nbs.resolve())
    if a.only: nbs = [p for p in nbs if re.search(a.only, p.name) or p.stem == "index"]
    names = [page_name(p) for p in nbs]
    if dups := {n for n in names if names.count(n) > 1}: sys.exit(f"notebooks map to the same page name: {sorted(dups)}")
    ekey = exec_key()
    skey = site_key(nbs, ekey)
    old = out / REPORT
    if not a.force and not a.no_cache and not a.only and old.exists():
        rep = json.loads(old.read_text())
        if rep.get("site_key") == skey and not rep.get("failed"):
            print(f"{out} is up to date ({len(rep['pages'])} pages; --force rebuilds)")
            return 0

    old.unlink(missing_ok=True)  # a report in the output always belongs to the site beside it
    PROC.mkdir(parents=True, exist_ok=True)
    for p in PROC.glob("*"):
        if p.name not in (".cache", ".lock"): shutil.rmtree(p) if p.is_dir() else p.unlink()
    (PROC / "src").mkdir()
    # slowest first (by last measured time) so that the parallel runs finish together; never measured (a fresh
    # clone): before the others, tutorials first, then the higher-numbered notebooks (they compose more of the package)
    def last_secs(p):
        m = CACHE / f"{page_name(p)}.json"
        return (1, -json.loads(m.read_text()).get("seconds", 0)) if m.exists() else (0, kind(p) != "tutorial", -nbs.index(p))
    os.environ.update(_child_env(a.jobs))  # the fork server, and so every notebook, starts with these
    print(f"executing {len(nbs)} notebooks, {a.jobs} at a time (a line as each finishes)", flush=True)
    recs = {}
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        futs = {ex.submit(run_notebook, p, ekey, a): p for p in sorted(nbs, key=last_secs)}
        for f in as_completed(futs):
            recs[futs[f]] = r = f.result()
            print(f"  [{len(recs):2d}/{len(nbs)}] {_progress_line(r, time.perf_counter() - t0)}", flush=True)
    records = [recs[p] for p in nbs]
    t_exec = time.perf_counter() - t0

    write_navigation(records)
    if not a.only and a.nbs.resolve() == NBS: write_quarto_sidebar(records)
    warn_file, html = PROC / "sphinx-warnings.txt", PROC / "html"
    # Sphinx writes into _proc/html (myst-nb puts its jupyter_execute/ beside the output folder: here, in _proc/)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-j", str(max(1, a.jobs)), "-c", str(DOCS),
           "-d", str(PROC / ".doctrees"), "-w", str(warn_file), str(PROC / "src"), str(html)]
    t1 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT)
    t_sphinx = time.perf_counter() - t1
    warnings = [l for l in warn_file.read_text().splitlines() if l.strip()] if warn_file.exists() else []
    if r.returncode:
        sys.exit(f"sphinx-build failed (exit {r.returncode}); see the messages above")
    (html / ".nojekyll").touch()
    if out.exists():  # swap the new site in (the old one is gone only for a moment)
        trash = out.with_name(f".{out.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        out.rename(trash)
        shutil.move(html, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(html, out)

    sizes = page_sizes(out)
    failed = [r for r in records if not r["ok"]]
    total = time.perf_counter() - t0
    report = {"site_key": None if a.only else skey, "total_s": round(total, 1), "execute_s": round(t_exec, 1),
              "sphinx_s": round(t_sphinx, 1), "jobs": a.jobs, "pages": records, "failed": [r["page"] for r in failed],
              "sphinx_warnings": warnings, "page_bytes": sizes,
              "plotly_js_bytes": (out / "_static" / "plotly.min.js").stat().st_size}
    (out / REPORT).write_text(json.dumps(report, indent=1))

    if warnings:
        print(f"\n{len(warnings)} Sphinx warning(s):")
        for w in warnings[:30]: print("  " + w)
    big = list(sizes.items())[:5]
    print(f"\nlargest pages: " + ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in big))
    print(f"{len(sizes)} pages in {out}; notebooks {t_exec:.1f} s, sphinx {t_sphinx:.1f} s, total {total:.1f} s")
    if failed:
        print(f"\n{len(failed)} page(s) FAILED (their pages show the error):", file=sys.stderr)
        for r in failed:
            tb = f"\n{r['traceback']}" if r.get("traceback") else ""
            print(f"\n--- {r['notebook']} (page {r['page']}) ---\n{r['error']}{tb}", file=sys.stderr)
        print("FAILED: " + ", ".join(r["notebook"] for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
