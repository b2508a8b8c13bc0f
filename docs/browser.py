"""Headless Chromium driven over the Chrome DevTools Protocol through a pipe (`--remote-debugging-pipe`): no
websocket, no driver, nothing to download; only the standard library and Debian's `chromium`.

    with Chromium() as browser:
        page = browser.visit("http://127.0.0.1:8000/index.html", screenshot="index.png")
        page.console_errors, page.failed_requests, page.requests, page.plotly

Used by tests/test_docs_site.py; `python docs/browser.py URL` prints what one page did.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# As recommended for these machines: without the background-networking flags Chromium tries Google's hosts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--disable-features=Translate,MediaRouter,OptimizationHints",
         "--mute-audio", "--hide-scrollbars", "--window-size=1280,900", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    "Path of Debian's chromium (or another Chromium/Chrome on PATH; CHROMIUM overrides)"
    if os.environ.get("CHROMIUM"): return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if p := shutil.which(name): return p
    return None


class CDPError(RuntimeError): pass


def _high_fd(fd: int) -> int:
    "A copy of `fd` numbered 10 or above (the child's redirections onto 3 and 4 must not clobber it)"
    import fcntl
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


@dataclass
class PageVisit:
    "What loading one page did"
    url: str
    requests: list = field(default_factory=list)         # every URL requested
    failed_requests: list = field(default_factory=list)  # (url, reason): network errors and HTTP status >= 400
    console_errors: list = field(default_factory=list)   # console.error, uncaught exceptions, browser log errors
    plotly: dict = field(default_factory=dict)           # {"divs": n, "rendered": n with an svg.main-svg}
    links: list = field(default_factory=list)            # absolute hrefs of the page's <a> elements
    value: object = None                                  # what the `evaluate` expression returned
    title: str = ""
    load_s: float = 0.0
    waited: object = None                                # the last value of `wait_for`


class Chromium:
    "One headless Chromium process; `visit` opens each page in a fresh tab"

    def __init__(self, executable: str | None = None, timeout: float = 30.0, log: Path | None = None):
        self.exe = executable or find_chromium()
        if not self.exe: raise FileNotFoundError("chromium not found (Debian: apt-get install chromium)")
        self.timeout = timeout
        self._udd = tempfile.mkdtemp(prefix="deeperfly-chromium-")  # a fresh profile every time
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        to_chrome_r, from_chrome_w = _high_fd(to_chrome_r), _high_fd(from_chrome_w)  # never 3 or 4 themselves
        # Chromium reads commands from fd 3 and writes replies to fd 4
        script = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self._log = open(log or os.devnull, "wb")
        self.proc = subprocess.Popen(["bash", "-c", script, "chromium", self.exe, *FLAGS, f"--user-data-dir={self._udd}",
                                      "about:blank"], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        os.close(to_chrome_r); os.close(from_chrome_w)
        self._id, self._lock = 0, threading.Lock()
        self._replies: dict[int, queue.Queue] = {}
        self._events: dict[str | None, list] = {}
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try: self.version = self.send("Browser.getVersion")["product"]
        except CDPError as e:
            self.close()
            tail = Path(log).read_text(errors="replace")[-3000:] if log and Path(log).exists() else ""
            raise RuntimeError(f"{self.exe} did not answer over --remote-debugging-pipe ({e}); its log:\n{tail}") from None

    # -- protocol -------------------------------------------------------------------------------------------
    def _read(self):
        buf = b""
        while True:
            try: chunk = os.read(self._r, 1 << 20)
            except OSError: chunk = b""
            if not chunk: break
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for raw in msgs:
                msg = json.loads(raw)
                if "id" in msg:
                    q = self._replies.get(msg["id"])
                    if q: q.put(msg)
                else:
                    with self._cv:
                        self._events.setdefault(msg.get("sessionId"), []).append(msg)
                        self._cv.notify_all()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for q in self._replies.values(): q.put({"error": {"message": "chromium closed the pipe"}})

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float | None = None):
        "Send one command; return its result (CDPError on an error reply or a timeout)"
        with self._lock:
            self._id += 1
            mid = self._id
            self._replies[mid] = q = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if session: msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data: data = data[os.write(self._w, data):]
        try: reply = q.get(timeout=timeout or self.timeout)
        except queue.Empty: raise CDPError(f"{method}: no reply within {timeout or self.timeout} s") from None
        finally: self._replies.pop(mid, None)
        if "error" in reply: raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _wait_event(self, session, method, since, timeout):
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                evs = self._events.get(session, [])
                for e in evs[since:]:
                    if e["method"] == method: return e
                left = end - time.monotonic()
                if left <= 0 or getattr(self, "_closed", False): return None
                self._cv.wait(left)

    def evaluate(self, session: str, expr: str):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True}, session)
        if "exceptionDetails" in r: raise CDPError(f"evaluate {expr!r}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    # -- pages ----------------------------------------------------------------------------------------------
    def visit(self, url: str, screenshot: Path | None = None, scroll_to: str | None = None,
              plotly_timeout: float = 20.0, settle: float = 0.25, wait_for: str | None = None,
              evaluate: str | None = None, width: int = 1280, height: int = 900, block: tuple = (),
              then_widths: tuple = ()) -> PageVisit:
        """Open `url` in a new tab, wait for the load event, for the network to go quiet, for every Plotly figure
        to draw its `svg.main-svg` and (if given) for the JavaScript expression `wait_for` to be truthy (its last value
        is `PageVisit.waited`); record requests, failures and console errors; optionally save a PNG screenshot (after
        scrolling the first element matching the CSS selector `scroll_to` into view) and evaluate the JavaScript
        expression `evaluate` once the page has settled (its JSON value is `PageVisit.value`); the window is
        `width` x `height` CSS pixels; requests whose URL matches a pattern of `block` (`*` wildcards) are refused.
        With `then_widths`, the window is then resized to each of those widths in turn and `evaluate` evaluated
        again: `PageVisit.value` is the list of its values, at `width` first"""
        t0 = time.monotonic()
        tid = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
        v = PageVisit(url)
        try:
            for d in ("Page", "Runtime", "Log", "Network"): self.send(f"{d}.enable", session=sid)
            if block: self.send("Network.setBlockedURLs", {"urls": list(block)}, sid)
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                             "mobile": False}, sid)
            with self._cv: start = len(self._events.get(sid, []))
            nav = self.send("Page.navigate", {"url": url}, sid)
            if nav.get("errorText"): v.failed_requests.append((url, nav["errorText"]))
            if self._wait_event(sid, "Page.loadEventFired", start, self.timeout) is None:
                v.console_errors.append(f"no load event within {self.timeout} s")
            self._wait_quiet(sid, start, settle)
            n_divs = self.evaluate(sid, "document.querySelectorAll('.plotly-graph-div').length")
            js_rendered = ("[...document.querySelectorAll('.plotly-graph-div')]"
                           ".filter(d => d.querySelector('svg.main-svg')).length")
            end = time.monotonic() + plotly_timeout
            while (n_ok := self.evaluate(sid, js_rendered)) < n_divs and time.monotonic() < end: time.sleep(0.2)
            v.plotly = {"divs": n_divs, "rendered": n_ok}
            if wait_for:
                end = time.monotonic() + plotly_timeout
                while not (val := self.evaluate(sid, wait_for)) and time.monotonic() < end: time.sleep(0.2)
                v.waited = val
            v.links = self.evaluate(sid, "[...document.querySelectorAll('a[href]')].map(a => a.href)")
            v.title = self.evaluate(sid, "document.title")
            if evaluate:
                time.sleep(0.3)  # let the page's own load handlers (e.g. figure resizing) run
                v.value = self.evaluate(sid, evaluate)
                if then_widths: v.value = [v.value]
                for w in then_widths:
                    self.send("Emulation.setDeviceMetricsOverride", {"width": w, "height": height, "deviceScaleFactor": 1,
                                                                     "mobile": False}, sid)
                    time.sleep(0.5)  # the resize event, then the page's handlers
                    v.value.append(self.evaluate(sid, evaluate))
            if screenshot:
                if scroll_to:
                    self.evaluate(sid, f"(() => {{ const e = document.querySelector({json.dumps(scroll_to)}); "
                                       "if (e) e.scrollIntoView({block: 'center'}); })()")
                    time.sleep(0.3)
                png = self.send("Page.captureScreenshot", {"format": "png"}, sid)["data"]
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                Path(screenshot).write_bytes(base64.b64decode(png))
            self._wait_quiet(sid, start, 0.2)
            self._collect(sid, start, v)
        finally:
            try: self.send("Target.closeTarget", {"targetId": tid})
            except CDPError: pass
            with self._cv: self._events.pop(sid, None)
        v.load_s = time.monotonic() - t0
        return v

    def _wait_quiet(self, sid, start, quiet: float, limit: float = 15.0):
        "Wait until no request has been in flight for `quiet` seconds"
        end, last_busy = time.monotonic() + limit, time.monotonic()
        while time.monotonic() < end:
            with self._cv: evs = list(self._events.get(sid, [])[start:])
            inflight = set()
            for e in evs:
                m, p = e["method"], e.get("params", {})
                if m == "Network.requestWillBeSent": inflight.add(p["requestId"])
                elif m in ("Network.loadingFinished", "Network.loadingFailed"): inflight.discard(p["requestId"])
            if inflight: last_busy = time.monotonic()
            elif time.monotonic() - last_busy >= quiet: return
            time.sleep(0.05)

    def _collect(self, sid, start, v: PageVisit):
        with self._cv: evs = list(self._events.get(sid, [])[start:])
        urls = {}
        for e in evs:
            m, p = e["method"], e.get("params", {})
            if m == "Network.requestWillBeSent":
                urls[p["requestId"]] = p["request"]["url"]
                v.requests.append(p["request"]["url"])
            elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
                v.failed_requests.append((p["response"]["url"], f"HTTP {p['response']['status']}"))
            elif m == "Network.loadingFailed":
                v.failed_requests.append((urls.get(p["requestId"], "?"), p.get("errorText", "failed")
                                          + (f" ({p['blockedReason']})" if p.get("blockedReason") else "")))
            elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                v.console_errors.append("console." + p["type"] + ": " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                v.console_errors.append("uncaught: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                v.console_errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())

    def close(self):
        try: self.send("Browser.close", timeout=5)
        except Exception: pass
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill(); self.proc.wait()
        for fd in (self._w, self._r):
            try: os.close(fd)
            except OSError: pass
        self._log.close()
        shutil.rmtree(self._udd, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()


if __name__ == "__main__":
    import sys
    with Chromium() as b:
        print(b.version)
        for u in sys.argv[1:]:
            r = b.visit(u)
            print(json.dumps({k: getattr(r, k) for k in ("url", "title", "plotly", "failed_requests", "console_errors",
                                                         "requests")}, indent=1))
