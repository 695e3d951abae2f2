"""A headless Chromium driven over the DevTools protocol through a pipe, with the standard library only.

Chromium's ``--remote-debugging-pipe`` reads protocol commands on file descriptor 3 and writes
replies and events on descriptor 4, each message a JSON object ended by a NUL byte. No port is
opened and no driver is downloaded: the browser is Debian's ``chromium`` package.

:func:`inspect_page` loads one page of the built book, waits for MathJax, and returns what a reader
would meet: untypeset math, raw reStructuredText or autodoc markup, images that did not load,
JavaScript errors, requests that left the machine, tables and display equations wider than the text column,
exercise solutions shown before they are asked for (or that do not open), citations that do not link to the
references page.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--hide-scrollbars", "--mute-audio")

#: The width a reader's laptop page is checked at, in CSS pixels.
WIDTH = 1280


def find_chromium() -> str | None:
    """The Chromium binary (``HAWQ_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH), or None."""
    env = os.environ.get("HAWQ_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium; :meth:`call` sends a command and returns its result, events are kept."""

    def __init__(self, binary: str, user_data_dir: Path):
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        # Out of the way of 3 and 4, so that the dup2 below cannot overwrite one end with the other.
        hi_r, hi_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(evt_w, fcntl.F_DUPFD, 10)

        def to_3_and_4():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
                                      "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=to_3_and_4)
        for fd in (cmd_r, evt_w, hi_r, hi_w):
            os.close(fd)
        self._out = os.fdopen(cmd_w, "wb", buffering=0)
        self._in = os.fdopen(evt_r, "rb", buffering=0)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._queue: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            chunk = self._in.read(1 << 16)
            if not chunk:
                self._queue.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._queue.put(json.loads(msg))

    def _pump(self, deadline: float) -> None:
        try:
            msg = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return
        if msg is None:
            raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
        if "id" in msg:
            self._replies[msg["id"]] = msg
        else:
            self.events.append(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        """Send ``method`` and wait for its reply; raise on a protocol error."""
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._out.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while self._next not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {method} in {timeout} s")
            self._pump(deadline)
        reply = self._replies.pop(self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, since: int, timeout: float = 60) -> dict:
        """The first event ``method`` of ``session`` at index ``since`` or later of :attr:`events`."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[since:]:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return ev
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} in {timeout} s")
            self._pump(deadline)

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tab(self) -> "Tab":
        """A new page, attached, with the domains the checks listen to enabled, at :data:`WIDTH` pixels."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        tab = Tab(self, session)
        tab._viewport(900)
        return tab


# Runs in the page once MathJax is done: what a reader would see that is wrong.
_REPORT_JS = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await Promise.all([...document.images].map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  const skip = 'PRE,CODE,SCRIPT,STYLE,TEXTAREA,MJX-CONTAINER,MJX-ASSISTIVE-MML,NOSCRIPT';
  const main = document.querySelector('main') || document.body;
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const texts = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let p = n.parentElement, skipped = false;
    while (p) { if (skip.split(',').includes(p.tagName)) { skipped = true; break; } p = p.parentElement; }
    if (!skipped && n.textContent.trim()) texts.push(n.textContent);
  }
  const text = texts.join(' ');
  const grab = re => [...new Set((text.match(re) || []).map(s => s.slice(0, 60)))];
  const vw = document.documentElement.clientWidth;
  const article = document.querySelector('article') || main;
  const aright = article.getBoundingClientRect().right;
  const name = t => (t.id || t.className || 'table') + ' ' + Math.round(t.scrollWidth) + 'px';
  const tables = [...article.querySelectorAll('table')].filter(t => t.getBoundingClientRect().width > 0);
  // Off the page: a table whose box runs past the text column. Scrolling: one that scrolls inside its box.
  const wide = tables.filter(t => t.getBoundingClientRect().right > Math.min(vw, aright) + 2).map(name);
  const scrolling = tables.filter(t => t.scrollWidth > t.clientWidth + 2).map(name);
  const cut = [...article.querySelectorAll('pre')].filter(p => p.scrollWidth > p.clientWidth + 2)
    .map(p => p.textContent.split('\n').find(l => l.length > 0).slice(0, 60));
  // Wrapped: a shown code cell with a line longer than the column (the book's CSS wraps it, hiding its indent).
  // Folded cells (hide-input) are measured unfolded, as a reader who opens one sees them, then folded again.
  const folded = [...article.querySelectorAll('details.above-input:not([open])')];
  folded.forEach(d => { d.open = true; });
  const wrapped = [...article.querySelectorAll('div.cell_input pre')]
    .filter(p => p.checkVisibility() && p.getBoundingClientRect().height > 0)
    .filter(p => { const ws = p.style.whiteSpace; p.style.whiteSpace = 'pre';
                   const over = p.scrollWidth > p.clientWidth + 2; p.style.whiteSpace = ws; return over; })
    .map(p => p.textContent.split('\n').find(l => l.length > 0).slice(0, 60));
  const unfolded = folded.length;
  folded.forEach(d => { d.open = false; });
  // Display equations: the typeset formula (mjx-math) wider than its box is clipped or scrolls sideways.
  const displays = [...article.querySelectorAll('mjx-container[display="true"]')].map(m => {
    const inner = m.querySelector('mjx-math');
    return {m, w: Math.max(inner ? inner.getBoundingClientRect().width : 0, m.scrollWidth)};
  });
  const mathText = m => (m.querySelector('mjx-assistive-mml') || m).textContent.replace(/\s+/g, ' ').trim().slice(0, 50);
  const wideMath = displays.filter(d => d.w > Math.min(d.m.clientWidth || article.clientWidth, article.clientWidth) + 2)
    .map(d => mathText(d.m) + ' ' + Math.round(d.w) + 'px');
  // Exercises: every solution folded when the page opens, and shown once its title is clicked (the toggle).
  const solutions = [...article.querySelectorAll('div.solution')];
  const body = s => s.querySelector(':scope > section') || s.querySelector(':scope > :not(.admonition-title)');
  const shown = el => { if (!el) return false; const cs = getComputedStyle(el);
                        return el.getBoundingClientRect().height > 0 && cs.visibility !== 'hidden' && cs.opacity !== '0'; };
  const openSolutions = solutions.filter(s => shown(body(s))).map(s => s.id);
  const titles = solutions.map(s => s.querySelector(':scope > .admonition-title')).filter(t => t);
  titles.forEach(t => t.click());
  await new Promise(r => setTimeout(r, 500));
  const unrevealed = solutions.filter(s => !shown(body(s))).map(s => s.id);
  titles.forEach(t => t.click());
  // Citations: each links to its entry on the references page.
  const cites = [...article.querySelectorAll('span.bibtex-citation a')];
  return JSON.stringify({
    title: document.title,
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    untypeset: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container'))
      .map(e => e.textContent.slice(0, 60)),
    mjx_errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 60)),
    raw_tex: grab(/\\[\(\)\[\]]|\$\$|\\(?:lambda|frac|mathrm|lVert|tfrac|sum)\b/g),
    raw_rst: grab(/(?:^|\s)\.\. [a-z:-]+::|:(?:py:)?(?:func|mod|class|meth|attr|data|exc|doc|ref):`|```\{/g),
    signatures: document.querySelectorAll('dl.py').length,
    images: document.images.length,
    broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    wide_tables: wide,
    scrolling_tables: scrolling,
    cut_code: cut,
    wrapped_code: wrapped,
    unfolded: unfolded,
    display_math: displays.length,
    widest_math: Math.round(Math.max(0, ...displays.map(d => d.w))),
    column: Math.round(article.clientWidth),
    wide_math: wideMath,
    exercises: article.querySelectorAll('div.exercise').length,
    solutions: solutions.length,
    open_solutions: openSolutions,
    unrevealed_solutions: unrevealed,
    // table headers in the paper's notation written as plain text instead of typeset math
    plain_math_headers: [...article.querySelectorAll('th')].map(t => {
        const c = t.cloneNode(true); c.querySelectorAll('mjx-container, .math').forEach(m => m.remove());
        return c.textContent.trim(); })
      .filter(h => /\b(?:lambda_i|Omega_i|S_i|H_i|W_i|n_i|alpha_max)\b|\|\|/.test(h)).slice(0, 5),
    math_headers: [...article.querySelectorAll('th mjx-container')].length,
    citations: cites.length,
    // on the References page itself a citation links to its entry on the same page
    bad_citations: cites.map(a => a.getAttribute('href')).filter(h => !(/(^|\/)references\.html#./.test(h || '')
      || (/(^|\/)references\.html$/.test(location.pathname) && /^#./.test(h || '')))),
    height: document.documentElement.scrollHeight,
  });
})()
"""


class Tab:
    """One page of the browser (a DevTools session)."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def inspect(self, url: str, screenshot: Path | None = None, max_height: int = 8000) -> dict:
        """Load ``url`` and return the report of :data:`_REPORT_JS`, plus the page's errors and remote requests."""
        b = self.browser
        since = len(b.events)
        b.call("Page.navigate", {"url": url}, session=self.session)
        b.wait_event("Page.loadEventFired", self.session, since)
        res = b.call("Runtime.evaluate", {"expression": _REPORT_JS, "awaitPromise": True, "returnByValue": True},
                     session=self.session, timeout=120)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{url}: the page check failed: {res['exceptionDetails']}")
        report = json.loads(res["result"]["value"])
        mine = [e for e in b.events[since:] if e.get("sessionId") == self.session]
        report["js_errors"] = [
            e["params"]["exceptionDetails"].get("exception", {}).get("description")
            or e["params"]["exceptionDetails"].get("text") for e in mine if e["method"] == "Runtime.exceptionThrown"]
        report["js_errors"] += [f"console.error: {' '.join(str(a.get('value', a.get('description', ''))) for a in e['params']['args'])}"
                                for e in mine if e["method"] == "Runtime.consoleAPICalled"
                                and e["params"]["type"] == "error"]
        report["js_errors"] += [f"{e['params']['entry']['source']}: {e['params']['entry']['text']} "
                                f"{e['params']['entry'].get('url', '')}"
                                for e in mine if e["method"] == "Log.entryAdded"
                                and e["params"]["entry"]["level"] == "error"]
        report["failed_requests"] = [e["params"].get("errorText") for e in mine
                                     if e["method"] == "Network.loadingFailed" and not e["params"].get("canceled")]
        report["remote_requests"] = sorted({e["params"]["request"]["url"][:120] for e in mine
                                            if e["method"] == "Network.requestWillBeSent"
                                            and not e["params"]["request"]["url"].startswith(("file:", "data:", "about:"))})
        if screenshot is not None:
            # The window made as tall as the page (up to max_height), so the layout is the reader's.
            height = min(int(report["height"]), max_height)
            self._viewport(height)
            try:
                b.call("Runtime.evaluate", {"expression": "window.scrollTo(0, 0)"}, session=self.session)
                shot = b.call("Page.captureScreenshot", {"format": "png"}, session=self.session, timeout=120)
            finally:
                self._viewport(900)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return report

    def _viewport(self, height: int) -> None:
        self.browser.call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height,
                                                                 "deviceScaleFactor": 1, "mobile": False},
                          session=self.session)
