"""The documentation site: `python docs/build.py` builds it into `_docs/` (doing nothing when it is up to date), the
tests serve it on localhost and open every page in headless Chromium (Debian's `chromium`, driven over the DevTools
protocol through a pipe: docs/browser.py), and check that

- every notebook in nbs/ built without an error into its own page, reachable from the navigation;
- plotly.js is served once from the site (`_static/plotly.min.js`), no page inlines it, nothing comes from a CDN;
- in the browser: no console errors, every request goes to localhost and succeeds, every Plotly figure has drawn
  its `svg.main-svg`, every link into the site points at an existing page; the search page finds things;
- at 1400 and 1920 px windows no figure (Plotly figure, image, SVG) sticks out of its column, also as first drawn
  (before the resize script), and the article column takes most of the window;
- a notebook that fails mid-edit gets an error page while the rest of the site builds.

The build is the notebooks' test run: CI runs `python docs/build.py --no-cache` first (each notebook executed once,
a line per notebook, failures named with their cell), and these tests then find the site up to date.

Screenshots of the home page, a module page and the walkthrough (its top and its first figure) are saved in
`_docs/_screenshots/`; the walkthrough page is checked for being complete (every step, every figure drawn, the
ground-truth error at the end) and light (frames as small JPEGs, no full-frame arrays in figures). Without chromium the browser tests fail (CI installs it); set DEEPERFLY_SKIP_BROWSER=1 to
skip them on a machine without it.
"""
import html.parser
import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_docs"
SHOTS = OUT / "_screenshots"
sys.path.insert(0, str(ROOT / "docs"))
import build  # noqa: E402  (docs/build.py)
from browser import Chromium, find_chromium  # noqa: E402  (docs/browser.py)

_PLOTLY_BANNER = re.compile(r"\*\s*plotly\.js v\d+\.\d+\.\d+\s*\n\*\s*Copyright")  # the library's own header
MAX_PAGE_BYTES = 3_000_000  # a page holding its figures' data; plotly.js itself (~4.7 MB) is never in a page


def _build(args=(), timeout=3600):
    return subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site():
    "The built site and its build report (docs/build.py rebuilds only what changed)"
    r = _build()
    sys.stdout.write(r.stdout[-4000:])
    # no other build replaces the site while these tests read it (one that started meanwhile finishes first)
    lock = build._lock(build.PROC, shared=True)
    report = OUT / build.REPORT
    assert report.exists(), f"docs/build.py wrote no site (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    yield SimpleNamespace(out=OUT, report=json.loads(report.read_text()), rc=r.returncode, stderr=r.stderr)
    lock.close()


def _pages(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(out).parts))


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.scripts, self.styles, self.ids = [], [], [], set()
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("href"): self.hrefs.append(a["href"])
        if tag == "script" and a.get("src"): self.scripts.append(a["src"])
        if tag == "link" and a.get("href"): self.styles.append(a["href"])


def _parse(path: Path) -> _Links:
    p = _Links(); p.feed(path.read_text(errors="replace")); return p


# --------------------------------------------------------------------------------------------------- build

def test_every_notebook_builds_into_a_page(site):
    failed = [p for p in site.report["pages"] if not p["ok"]]
    assert not failed, f"{len(failed)} notebook(s) failed to build (their pages show the error):\n" + \
        "\n\n".join(f"--- {p['notebook']} ---\n{p['error']}" for p in failed)
    assert site.rc == 0, site.stderr[-4000:]
    built = {p["notebook"] for p in site.report["pages"]}
    assert not [nb.name for nb in build.discover() if nb.name not in built], "notebooks added after the build: rerun"
    for nb in build.discover():
        assert (site.out / f"{build.page_name(nb)}.html").exists(), f"{nb.name} has no page"
    print(f"\nbuild: notebooks {site.report['execute_s']} s, sphinx {site.report['sphinx_s']} s, "
          f"total {site.report['total_s']} s (the last full build; 'up to date' runs cost nothing)")


def test_navigation_lists_modules_and_tutorials(site):
    nbs = [build.NBS / p["notebook"] for p in site.report["pages"]]
    modules = [p["page"] for p in site.report["pages"] if p["kind"] == "module"]
    tutorials = [p["page"] for p in site.report["pages"] if p["kind"] == "tutorial"]
    api = {h.split("#")[0] for h in _parse(site.out / "api.html").hrefs}
    assert not [m for m in modules if f"{m}.html" not in api], "module pages missing from api.html"
    home = {h.split("#")[0] for h in _parse(site.out / "index.html").hrefs}
    assert "api.html" in home, "the home page's navigation has no API reference"
    if tutorials:
        tut = {h.split("#")[0] for h in _parse(site.out / "tutorials.html").hrefs}
        assert "tutorials.html" in home and not [t for t in tutorials if f"{t}.html" not in tut], "tutorials missing"
    # the Quarto sidebar (for those with Quarto) lists the same notebooks
    sidebar = (ROOT / "nbs" / "sidebar.yml").read_text()
    assert not [p.name for p in nbs if p.name not in sidebar], "nbs/sidebar.yml is missing notebooks"


def test_plotly_is_served_once_and_nothing_from_a_cdn(site):
    js = [p for p in site.out.rglob("*.js") if "plotly" in p.name.lower()]
    assert [str(p.relative_to(site.out)) for p in js] == ["_static/plotly.min.js"], js
    problems, with_figs = [], 0
    for page in _pages(site.out):
        text = (site.out / page).read_text(errors="replace")
        links = _parse(site.out / page)
        remote = [u for u in links.scripts + links.styles if re.match(r"(https?:)?//", u)]
        if remote: problems.append(f"{page}: loads {remote}")
        if re.search(r"<script[^>]*mathjax", text, re.I): problems.append(f"{page}: loads MathJax")
        if _PLOTLY_BANNER.search(text): problems.append(f"{page}: inlines plotly.js")
        if len(text) > MAX_PAGE_BYTES: problems.append(f"{page}: {len(text) / 1e6:.1f} MB")
        if "Plotly.newPlot" in text:
            with_figs += 1
            if not any(s.split("?")[0].endswith("_static/plotly.min.js") for s in links.scripts):
                problems.append(f"{page}: has figures but does not load _static/plotly.min.js")
    assert not problems, "\n".join(problems)
    assert with_figs, "no page has a Plotly figure"
    sizes = site.report["page_bytes"]
    print("\nlargest pages: " + ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in list(sizes.items())[:6])
          + f"; plotly.min.js {site.report['plotly_js_bytes'] / 1e6:.1f} MB, served once")


# --------------------------------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if not exe:
        if os.environ.get("DEEPERFLY_SKIP_BROWSER") == "1":
            pytest.skip("chromium is not installed and DEEPERFLY_SKIP_BROWSER=1: the browser checks did NOT run")
        pytest.fail("chromium is not installed: `apt-get install chromium` (CI installs it). "
                    "On a machine without it, DEEPERFLY_SKIP_BROWSER=1 skips the browser checks.")
    with Chromium(exe, log=ROOT / "_proc" / "chromium.log") as b:
        yield b


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def log_request(self, code="-", size="-"):
        self.server.log.append((self.path, int(code) if str(code).isdigit() else 0))


@pytest.fixture(scope="module")
def server(site):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site.out)))
    httpd.log = []
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield SimpleNamespace(base=f"http://127.0.0.1:{httpd.server_address[1]}/", log=httpd.log)
    httpd.shutdown(); httpd.server_close()


def _screenshot_for(page: str, tutorials: set) -> list:
    "(file, scroll-to selector) screenshots to take of `page`"
    if page == "index.html": return [("home.png", None)]
    if page == "cameras.html": return [("cameras.png", None)]
    if page == "walkthrough.html":
        return [("walkthrough.png", None), ("walkthrough-figure.png", ".plotly-graph-div")]
    return []


def test_every_page_in_chromium(site, browser, server):
    tutorials = {build.page_name(p) for p in build.discover() if build.kind(p) == "tutorial"}
    problems, rows, shots, missing_anchors = [], [], [], []
    ids = {}
    for page in _pages(site.out):
        url = server.base + page
        todo = _screenshot_for(page, tutorials) or [(None, None)]
        for shot, scroll in todo:
            v = browser.visit(url, screenshot=SHOTS / shot if shot else None, scroll_to=scroll)
            if shot: shots.append(SHOTS / shot)
        problems += [f"{page}: console error: {e}" for e in v.console_errors]
        problems += [f"{page}: request failed: {u} ({why})" for u, why in v.failed_requests]
        problems += [f"{page}: request leaves localhost: {u}" for u in v.requests
                     if urlsplit(u).scheme in ("http", "https", "ws", "wss") and not u.startswith(server.base)]
        if v.plotly["rendered"] < v.plotly["divs"]:
            problems.append(f"{page}: {v.plotly['divs'] - v.plotly['rendered']} of {v.plotly['divs']} Plotly "
                            "figures drew no svg.main-svg")
        if "Plotly.newPlot" in (site.out / page).read_text() and not v.plotly["divs"]:
            problems.append(f"{page}: has Plotly.newPlot but no figure div in the browser")
        for href in v.links:
            if not href.startswith(server.base): continue
            parts = urlsplit(href)
            path = unquote(parts.path[len(urlsplit(server.base).path):]) or "index.html"
            target = site.out / path
            if target.is_dir(): target = target / "index.html"
            if not target.exists():
                problems.append(f"{page}: broken link {href}"); continue
            if parts.fragment and target.suffix == ".html":
                if target not in ids: ids[target] = _parse(target).ids
                if unquote(parts.fragment) not in ids[target]: missing_anchors.append(f"{page} -> {path}#{parts.fragment}")
        rows.append((page, v.load_s, v.plotly["divs"], (site.out / page).stat().st_size))
    bad_status = [(p, c) for p, c in server.log if c >= 400]
    problems += [f"server answered {c} for {p}" for p, c in bad_status]

    print(f"\n{len(rows)} pages opened in {browser.version}:")
    for page, secs, figs, size in sorted(rows, key=lambda r: -r[3]):
        print(f"  {page:<32} {size / 1024:7.0f} KB  {figs:2d} figure(s)  {secs:5.1f} s")
    print("screenshots: " + ", ".join(str(s.relative_to(ROOT)) for s in shots))
    if missing_anchors:  # links land on the right page, just not on the symbol's heading
        print(f"{len(missing_anchors)} link anchor(s) not found on their page (first 10):\n  " + "\n  ".join(missing_anchors[:10]))
    assert not problems, f"{len(problems)} problem(s) in the browser:\n" + "\n".join(problems[:80])
    want = {"home.png", "cameras.png"} | ({"walkthrough.png", "walkthrough-figure.png"} if "walkthrough" in tutorials else set())
    assert want <= {s.name for s in shots}, shots
    for s in shots: assert s.stat().st_size > 10_000, f"{s} looks empty"


WALKTHROUGH_SECTIONS = ("step-1", "step-2", "step-3", "step-4", "step-5", "step-6", "step-7", "step-8", "step-9",
                        "step-10", "step-11", "step-12", "sanity-check", "how-far-from-the-truth", "mapping-back-to-the-cli")


def test_walkthrough_page(site, browser, server):
    "The walkthrough: a tutorial page with every step, every figure drawn, light frames, ending with the ground truth"
    page = site.out / "walkthrough.html"
    assert page.exists(), "nbs/walkthrough.ipynb has no page"
    assert "walkthrough" in {p["page"] for p in site.report["pages"] if p["kind"] == "tutorial"}
    text = page.read_text()
    ids = _parse(page).ids
    missing = [s for s in WALKTHROUGH_SECTIONS if not any(i == s or i.startswith(s + "-") for i in ids)]
    assert not missing, f"walkthrough sections missing: {missing}"
    figs = text.replace("\\u002f", "/")  # figure JSON escapes "/"
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", figs)
    jpgs = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", figs)
    assert not pngs, f"{len(pngs)} PNG images inlined: frames should be JPEG"
    assert len(jpgs) >= 20, f"only {len(jpgs)} JPEG frames on the page"
    assert max(len(j) for j in jpgs) < 60_000, f"a frame of {max(len(j) for j in jpgs)} base64 bytes: not a small JPEG"
    assert len(text) < 1_500_000, f"walkthrough.html is {len(text) / 1e6:.1f} MB"
    # every figure fits its column (figures are drawn before the side bars take their room: docs/_static/fit-figures.js)
    v = browser.visit(server.base + "walkthrough.html", evaluate=(
        "[...document.querySelectorAll('.plotly-graph-div')].map(d => [d.getBoundingClientRect().width, "
        "(d.querySelector('svg.main-svg') || d).getBoundingClientRect().width])"))
    assert not v.console_errors and not v.failed_requests, (v.console_errors, v.failed_requests)
    assert v.plotly["divs"] >= 10 and v.plotly["rendered"] == v.plotly["divs"], v.plotly
    too_wide = [(round(a), round(b)) for a, b in v.value if b > a + 1]
    assert not too_wide, f"figures wider than their column (column, figure px): {too_wide}"
    # the last section states the bundled example's ground-truth error, computed
    tail = text[text.index('id="how-far-from-the-truth"'):]
    assert re.search(r"3D error of the bundled example: median \d+\.\d+", tail), "no ground-truth error at the end"
    print(f"\nwalkthrough.html: {len(text) / 1024:.0f} KB, {v.plotly['divs']} figures, {len(jpgs)} JPEG frames "
          f"(largest {max(len(j) for j in jpgs) / 1024:.0f} KB base64)")


FIT_WIDTHS = (1400, 1920)  # browser windows, CSS px
# Every figure in the article (Plotly figures, their drawn SVG, images, SVGs) against its output cell and the article:
# "tag.class left..right px in a container left..right px" for each one that sticks out on either side.
_OVERFLOW_JS = """(() => {
  const art = document.querySelector('.bd-article'), bad = [];
  if (!art) return ['no .bd-article on the page'];
  const a = art.getBoundingClientRect();
  for (const el of art.querySelectorAll('.plotly-graph-div, .plotly-graph-div svg.main-svg, img, svg:not(svg svg)')) {
    const r = el.getBoundingClientRect();
    if (!r.width) continue;
    const box = (el.parentElement.closest('.cell_output') || art).getBoundingClientRect();
    const left = Math.max(box.left, a.left), right = Math.min(box.right, a.right);
    if (r.right > right + 1 || r.left < left - 1)
      bad.push(el.tagName.toLowerCase() + '.' + ((el.getAttribute('class') || '').split(' ')[0]) + ' ' + Math.round(r.left) +
               '..' + Math.round(r.right) + ' px in a container ' + Math.round(left) + '..' + Math.round(right) + ' px');
  }
  return bad;
})()"""


def _figure_pages(out: Path) -> list[str]:
    "Pages whose article holds a Plotly figure or an image"
    pages = []
    for page in _pages(out):
        text = (out / page).read_text(errors="replace")
        art = re.search(r"<article.*?</article>", text, re.S)
        if art and re.search(r'plotly-graph-div|<img\b', art[0]): pages.append(page)
    return pages


def test_figures_fit_their_column(site, browser, server):
    """At 1920 and 1400 px windows no figure sticks out of its column, and the article column takes most of the window.
    Each page is loaded at 1920 px without the resize script (docs/_static/fit-figures.js): figures must be drawn at
    their column's width in the first place; then the window shrinks to 1400 px and they must follow."""
    pages = _figure_pages(site.out)
    assert "walkthrough.html" in pages, pages
    expr = "[" + _OVERFLOW_JS + ", document.querySelector('.bd-article').getBoundingClientRect().width]"
    problems, widths = [], {}
    for page in pages:
        v = browser.visit(server.base + page, width=FIT_WIDTHS[-1], then_widths=FIT_WIDTHS[:-1][::-1],
                          block=("*fit-figures.js*",), evaluate=expr)
        for w, (bad, col) in zip(FIT_WIDTHS[::-1], v.value):
            problems += [f"{page} at {w} px: {b}" for b in bad]
            widths[w] = min(widths.get(w, col), round(col))
    assert not problems, f"{len(problems)} figure(s) overflow their column:\n" + "\n".join(problems[:40])
    for w, col in widths.items():  # the content column uses the page: the side bars take at most 600 px
        assert col >= w - 600, f"the article column is {col} px wide in a {w} px window"
    print(f"\n{len(pages)} pages with figures fit at {FIT_WIDTHS} px; narrowest article column {widths} px")


def test_search_finds_symbols(site, browser, server):
    v = browser.visit(server.base + "search.html?q=triangulate",
                      wait_for="document.querySelectorAll('#search-results li').length")
    assert not v.console_errors and not v.failed_requests, (v.console_errors, v.failed_requests)
    assert v.waited, "the search page found nothing for 'triangulate'"
    hits = [h for h in v.links if "triangulation.html" in h]
    assert hits, f"no search result links to triangulation.html: {[h for h in v.links if 'html' in h][:20]}"


# --------------------------------------------------------------------------------------------------- failures

def _nb(cells):
    return json.dumps({"cells": [{"cell_type": t, "id": f"c{i}", "metadata": {}, "source": s,
                                  **({"outputs": [], "execution_count": None} if t == "code" else {})}
                                 for i, (t, s) in enumerate(cells)],
                       "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                       "nbformat": 4, "nbformat_minor": 5})


def test_a_broken_notebook_gets_an_error_page_and_the_rest_builds(tmp_path):
    nbs = tmp_path / "nbs"; nbs.mkdir()
    # outputs are built at run time ('a' + 'b') so that the code shown on a page never contains them
    (nbs / "index.ipynb").write_text(_nb([("markdown", "# Home\n> the home page"), ("code", "print('home-' + 'output')")]))
    (nbs / "01_good.ipynb").write_text(_nb([("code", "#| default_exp good"), ("markdown", "# Good\n> works"), ("code", "import plotly.graph_objects as go"),
                                            ("code", "go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))")]))
    (nbs / "02_raises.ipynb").write_text(_nb([("code", "#| default_exp raises"), ("markdown", "# Raises\n> fails in its second cell"), ("code", "x = 1"),
                                              ("code", "raise ValueError('half-edited cell')"), ("code", "print('never-' + 'ran')")]))
    (nbs / "03_slow.ipynb").write_text(_nb([("code", "#| default_exp slow"), ("markdown", "# Slow\n> its slow cell is skipped"),
                                            ("code", "#| slow\nraise RuntimeError('slow cells ' + 'ran')"),
                                            ("code", "#| eval: false\nraise RuntimeError('eval: false ' + 'ran')"),
                                            ("code", "print('ordinary cells ' + 'ran')")]))
    (nbs / "04_halfwritten.ipynb").write_text(_nb([("markdown", "# Half")])[:40])
    (nbs / "walkthrough.ipynb").write_text(_nb([("markdown", "# Walkthrough\n> a tutorial"), ("code", "print('step ' + 'one')")]))
    r = _build(["--nbs", str(nbs), "--out", str(tmp_path / "site"), "--proc", str(tmp_path / "proc")], timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads((tmp_path / "site" / build.REPORT).read_text())
    assert sorted(rep["failed"]) == ["halfwritten", "raises"], rep["failed"]
    assert "half-edited cell" in r.stderr and "halfwritten" in r.stderr
    site = tmp_path / "site"
    for page in ("index", "good", "raises", "slow", "halfwritten", "walkthrough"): assert (site / f"{page}.html").exists(), page
    raises = (site / "raises.html").read_text()
    assert "did not build completely" in raises and "half-edited cell" in raises and "never-ran" not in raises
    assert "could not be built" in (site / "halfwritten.html").read_text()
    slow = (site / "slow.html").read_text()
    assert "ordinary cells ran" in slow and "slow cells ran" not in slow and "eval: false ran" not in slow
    assert "Plotly.newPlot" in (site / "good.html").read_text() and "home-output" in (site / "index.html").read_text()
    assert (site / "_static" / "plotly.min.js").exists()
    # navigation: modules under "API reference", other notebooks under "Tutorials"
    assert 'href="tutorials.html"' in (site / "index.html").read_text()
    def toc(page):  # the pages listed in the article's own toctree
        article = re.search(r"<article.*?</article>", (site / page).read_text(), re.S)[0]
        return set(re.findall(r'toctree-l1[^>]*><a class="reference internal" href="([\w.-]+)\.html"', article))
    assert toc("api.html") == {"good", "raises", "slow"}, toc("api.html")
    assert toc("tutorials.html") == {"walkthrough", "halfwritten"}, toc("tutorials.html")  # (unreadable: not a module)
    assert "step one" in (site / "walkthrough.html").read_text()
