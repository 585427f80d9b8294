#!/usr/bin/env python3
"""How the web page keeps up with long answers and long conversations (headless Debian chromium, Playwright).

    .venv/bin/python bench/webui_render.py [--sizes 5000,20000,80000] [--messages 500,2000]

Table 1 streams a markdown answer (paragraphs, lists, code) into the page's renderer, `frames` renders of growing
text, and times each render including layout: the page's incremental renderer (finished blocks rendered once,
only the growing block again) against re-rendering the whole text every frame. Table 2 opens a stored
conversation of N messages: time until the newest message shows, until all are in, and the longest main-thread
task meanwhile (PerformanceObserver "longtask"). No model runs: a server without models serves the page and the
conversation store. Figures depend on the machine (and on how busy it is); JSON goes to bench/out/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

STREAM_JS = """async ({text, frames, mode}) => {
  const md = await import('/ui/static/js/markdown.js');
  const host = document.createElement('div');
  host.className = 'msg-body markdown';
  document.getElementById('messages').append(host);
  const r = new md.StreamingMarkdown(host);
  const times = [];
  const step = Math.ceil(text.length / frames);
  for (let end = step; end < text.length + step; end += step) {
    const now = text.slice(0, Math.min(end, text.length));
    const t0 = performance.now();
    if (mode === 'incremental') { r.text = now; r.renderNow(); } else { md.renderMarkdown(host, now); }
    host.offsetHeight;                       // include layout
    times.push(performance.now() - t0);
    await new Promise((res) => setTimeout(res, 0));
  }
  const t0 = performance.now();
  if (mode === 'incremental') r.finish(text);
  host.offsetHeight;
  const finish = performance.now() - t0;
  const sorted = [...times].sort((a, b) => a - b);
  const q = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  const out = {frames: times.length, total_ms: times.reduce((a, b) => a + b, 0), p50_ms: q(0.5), p95_ms: q(0.95),
               max_ms: sorted[sorted.length - 1], finish_ms: finish, pre: host.querySelectorAll('pre').length};
  host.remove();
  return out;
}"""

OPEN_JS = """async ({cid, n}) => {
  window.__long = 0;
  new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long = Math.max(window.__long, e.duration); })
    .observe({type: 'longtask', buffered: false});
  const t0 = performance.now();
  location.hash = '#/c/' + cid;
  const last = 'message number ' + (n - 1);
  let first = null;
  for (;;) {
    await new Promise((r) => setTimeout(r, 5));
    const arts = document.querySelectorAll('article[data-role]');
    if (first === null && arts.length && arts[arts.length - 1].textContent.includes(last)) first = performance.now() - t0;
    if (arts.length === n) break;
    if (performance.now() - t0 > 120000) break;
  }
  return {first_ms: first, all_ms: performance.now() - t0, longest_task_ms: window.__long,
          rendered: document.querySelectorAll('article[data-role]').length};
}"""


def sample_answer(chars: int) -> str:
    parts, i = [], 0
    while sum(len(p) for p in parts) < chars:
        parts.append(f"### Step {i}\n\nThis paragraph explains step {i} with *emphasis*, `inline code` and a "
                     f"[link](https://example.com/{i}).\n\n- first point of {i}\n- second point of {i}\n\n"
                     f"```python\ndef step_{i}(x):\n    return x * {i} + 1\n```\n\n")
        i += 1
    return "".join(parts)[:chars]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,20000,80000")
    ap.add_argument("--frames", type=int, default=300, help="renders per streamed answer")
    ap.add_argument("--messages", default="500,2000")
    args = ap.parse_args(argv)
    os.environ.setdefault("LLAMAFORGE_HOME", tempfile.mkdtemp(prefix="lf-webui-bench-"))

    import httpx
    from webui_support import Running, require_browser_for_bench

    from llamaforge.server.app import ServerConfig, create_app
    sync_playwright, chromium = require_browser_for_bench()
    srv = Running(create_app(ServerConfig(), preloaded={}))
    rows, opens = [], []
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1280, "height": 860})
            page.goto(srv.url + "/ui")
            page.wait_for_selector("body[data-ready=true]")
            for size in [int(s) for s in args.sizes.split(",")]:
                text = sample_answer(size)
                for mode in ("incremental", "full re-render"):   # interleaved, same page, same text
                    r = page.evaluate(STREAM_JS, {"text": text, "frames": args.frames, "mode": mode})
                    rows.append({"chars": size, "mode": mode, **r})
            for n in [int(s) for s in args.messages.split(",")]:
                msgs = [{"role": "user" if i % 2 == 0 else "assistant",
                         "content": f"message number {i}" + ("" if i % 2 == 0 else "\n\n" + sample_answer(300))}
                        for i in range(n)]
                cid = httpx.post(srv.url + "/ui/api/conversations", json={"title": f"{n}"}, timeout=60).json()["id"]
                for i in range(0, n, 100):
                    httpx.post(f"{srv.url}/ui/api/conversations/{cid}/messages", json={"messages": msgs[i:i + 100]},
                               timeout=60)
                page.goto(srv.url + "/ui")
                page.wait_for_selector("body[data-ready=true]")
                opens.append({"messages": n, **page.evaluate(OPEN_JS, {"cid": cid, "n": n})})
            b.close()
    finally:
        srv.stop()

    print(f"streamed answer, {args.frames} renders of growing text (ms per render, layout included)")
    print(f"{'chars':>7} {'renderer':<15} {'p50':>7} {'p95':>7} {'max':>7} {'total':>9} {'final':>7} {'code':>5}")
    for r in rows:
        print(f"{r['chars']:>7} {r['mode']:<15} {r['p50_ms']:>7.2f} {r['p95_ms']:>7.2f} {r['max_ms']:>7.2f} "
              f"{r['total_ms']:>9.1f} {r['finish_ms']:>7.1f} {r['pre']:>5}")
    print("\nopening a stored conversation")
    print(f"{'messages':>8} {'newest shown ms':>16} {'all shown ms':>13} {'longest task ms':>16}")
    for o in opens:
        print(f"{o['messages']:>8} {o['first_ms'] or float('nan'):>16.0f} {o['all_ms']:>13.0f} "
              f"{o['longest_task_ms']:>16.0f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n(machine load average {load:.1f} on {os.cpu_count()} cores while measuring: a shared machine)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "webui_render.json").write_text(json.dumps({"stream": rows, "open": opens, "load": load,
                                                       "time": time.time()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
