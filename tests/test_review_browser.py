"""The reviewer in a real browser: the test starts JupyterLab on a loopback port, headless Chromium (Debian's
/usr/bin/chromium, or $DEEPERFLY_CHROMIUM) opens a notebook that shows the reviewer on a small `deeperfly run` output
folder, drags a keypoint with the mouse, and the test checks that the sidecar holds the move and that the reviewer's
3D and reprojection changed. A screenshot is saved in the test's tmp dir. Skips only when chromium or playwright is absent."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import numpy as np
import pytest

CHROMIUM = os.environ.get("DEEPERFLY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file(): pytest.skip(f"no chromium at {CHROMIUM} (set DEEPERFLY_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install playwright; no browser download needed)")
pytest.importorskip("jupyterlab", reason="the browser test needs jupyterlab")
pytest.importorskip("anywidget", reason="the reviewer needs anywidget")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def run_output(root:Path) -> Path:
    "A 4-frame synthetic recording run by `run_recording` (2D from its points2d.h5, no bundle adjustment, no videos)."
    from deeperfly_nb.synth_footage import synth_recording
    from deeperfly_nb.config import Config
    from deeperfly_nb.run import run_recording
    rec = synth_recording(root / "rec", n_frames=4, seed=5)
    d = Config.load(rec / "config.toml").to_dict()
    d["pipeline"].update(pose2d=False, bundle_adjustment=False); d["visualization"]["videos"] = []
    run_recording(rec, root / "out", Config.from_dict(d), progress=False)
    return root / "out"


NOTEBOOK_CODE = """\
import json, numpy as np
from deeperfly_nb.review import Reviewer
rv = Reviewer({out!r}, author="browser", view_width=300)
def dump(rv, t, path={after!r}):
    json.dump({{"frame": t, "pts3d": np.nan_to_num(rv.result.pts3d[t], nan=-1e9).tolist(),
               "reproj": np.nan_to_num(rv.result.reproj_error[:, t], nan=-1.0).tolist()}}, open(path, "w"))
dump(rv, 0, {before!r})
rv.on_change(dump)
rv"""


def write_notebook(path:Path, code:str):
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": code}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving tmp_path on a loopback port, without a token; yields its URL."
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / ".jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / ".jupyter-runtime"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1", "--allow-root",
           "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
           f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None: raise RuntimeError(f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=1); break
            except OSError: time.sleep(0.1)
        else: raise RuntimeError("JupyterLab did not answer within 60 s")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


def topmost_keypoint(page) -> dict:
    "A keypoint circle that is the topmost element at its centre (so a press lands on it), with what the test needs."
    return page.evaluate("""() => {
      for (const c of document.querySelectorAll('svg circle.kp')) {
        c.scrollIntoView({block: 'center'});
        const r = c.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;
        if (document.elementFromPoint(x, y) !== c) continue;
        const svg = c.ownerSVGElement, scale = svg.viewBox.baseVal.width / svg.getBoundingClientRect().width;
        return {view: c.dataset.view, point: +c.dataset.point, x, y, cx: +c.getAttribute('cx'), cy: +c.getAttribute('cy'), scale};
      }
      return null; }""")


def test_drag_a_keypoint_in_jupyterlab(lab, tmp_path):
    from deeperfly_nb.corrections import CORRECTIONS, read_corrections
    from deeperfly_nb.results import PoseResult
    out = run_output(tmp_path / "data")
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    write_notebook(tmp_path / "review.ipynb", NOTEBOOK_CODE.format(out=str(out), before=str(before), after=str(after)))
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=args,
                                                       headless=True, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(f"{lab}/lab/tree/review.ipynb", wait_until="domcontentloaded", timeout=60000)
            page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return k && k.status === 'idle'; }""", timeout=90000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_selector("svg circle.kp", timeout=90000)
            page.wait_for_timeout(300)
            kp = topmost_keypoint(page)
            assert kp is not None, "no keypoint circle could be pressed"
            dx, dy = 37, 23                                            # screen pixels
            page.mouse.move(kp["x"], kp["y"]); page.mouse.down()
            page.mouse.move(kp["x"] + dx, kp["y"] + dy, steps=8); page.mouse.up()
            for _ in range(300):
                if (out / CORRECTIONS).is_file() and after.is_file(): break
                page.wait_for_timeout(100)
            page.wait_for_timeout(300)
            page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        finally: browser.close()
    print(f"screenshot: {tmp_path / 'review.png'}")
    assert (out / CORRECTIONS).is_file(), f"the drag did not reach the sidecar; screenshot in {tmp_path / 'review.png'}"
    res = PoseResult.load(out / "results.h5")
    cs = list(read_corrections(out / CORRECTIONS, res.view_names, res.skeleton.point_names, res.n_frames))
    assert len(cs) == 1
    c, name = cs[0], res.skeleton.point_names[kp["point"]]
    assert (c.view, c.frame, c.point, c.author) == (kp["view"], 0, name, "browser")
    tol = 2 * kp["scale"]                                              # a screen pixel is `scale` image pixels
    assert abs(c.x - (kp["cx"] + dx * kp["scale"])) < tol and abs(c.y - (kp["cy"] + dy * kp["scale"])) < tol
    # the reviewer's result changed: the point's 3D moved, and the dragged view's reprojection error grew
    b, a = json.loads(before.read_text()), json.loads(after.read_text())
    v, n = res.view_names.index(c.view), kp["point"]
    assert a["frame"] == 0
    assert np.linalg.norm(np.subtract(a["pts3d"][n], b["pts3d"][n])) > 1e-6
    assert a["reproj"][v][n] != b["reproj"][v][n]
    # ... and the dragged view's reprojection error is that of the new 3D point against the dragged position
    uv = res.cameras.project(np.array(a["pts3d"][n]))[v]
    assert a["reproj"][v][n] == pytest.approx(np.hypot(uv[0] - c.x, uv[1] - c.y), abs=1e-6)
    np.testing.assert_array_equal(np.delete(np.array(a["pts3d"]), n, 0), np.delete(np.array(b["pts3d"]), n, 0))
    assert (tmp_path / "review.png").stat().st_size > 10000
