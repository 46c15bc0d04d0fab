"""The built-in /dashboard page, rendered by headless Chromium against a live FastAPI app.

The app's figures come from metrics recorded through the real instruments
(test_dashboard.App); the page must draw what /dashboard/data says.
"""

import math
import os
import re
import shutil
import struct
import subprocess

import pytest
from fastapi import FastAPI
from test_dashboard import EXPERTS, GROUPS, LAYERS, REPORT, app  # noqa: F401  (app is a fixture)

from cluster.observe.dashboard import add_dashboard_routes
from cluster.observe.dashboard_data import summarize
from cluster.tools.harness import serving

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make browser` installs "
                                                         "Debian's package); the page is not rendered")


def chromium(profile, *args) -> subprocess.Popen:
    return subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={profile}", "--virtual-time-budget=6000", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def attrs(tag: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def test_page_draws_the_data(app, tmp_path):  # noqa: F811  (app: the fixture imported above)
    families = app.families()

    async def gather():
        return families, REPORT

    web = FastAPI()
    # A window longer than the test: every poll shows the totals, which the test can know.
    add_dashboard_routes(web, gather, min_window_s=3600)
    expected = summarize(families, None, None, REPORT)
    shot = tmp_path / "dashboard.png"
    with serving(web) as url:
        dom_run = chromium(tmp_path / "p1", "--dump-dom", f"{url}/dashboard")
        shot_run = chromium(tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,900",
                            "--hide-scrollbars", f"{url}/dashboard")
        dom = dom_run.communicate(timeout=60)[0].decode()
        shot_run.communicate(timeout=60)
    (tmp_path / "dashboard.dom.html").write_text(dom)       # to look at when an assertion fails

    assert "live ·" in dom, "the page never got /dashboard/data"
    cells = [attrs(t) for t in re.findall(r"<rect[^>]*\bclass=\"cell\"[^>]*>", dom)]
    assert len(cells) == LAYERS * EXPERTS
    heat = expected["heatmap"]
    for c in cells:
        l, e = int(c["data-layer"]), int(c["data-expert"])
        assert float(c["data-value"]) == heat["values"][l][e]
        assert int(c["data-group"]) == heat["group"][l][e]
    hottest = max(cells, key=lambda c: float(c["data-value"]))
    coldest = min(cells, key=lambda c: float(c["data-value"]))
    assert hottest["fill"] != coldest["fill"]
    assert ">layer<" in dom and ">expert<" in dom

    section = dom[dom.index('id="groups"'):]
    section = section[:section.index("</section>")]
    cards = {int(attrs(c[:c.index(">")])["data-group"]): re.sub(r"<[^>]+>", " ", c)
             for c in re.split(r'(?=<div class="card)', section) if c.startswith('<div class="card group"')}
    assert sorted(cards) == list(range(GROUPS))
    for g, text in cards.items():
        want, got = REPORT[f"ExpertGroup-{g}"], next(x for x in expected["groups"] if x["group"] == g)
        assert re.search(rf"\b{want['current']}\s+→\s+{want['target']}\b", text), text
        assert f"{math.floor(got['busy'] * 100 + 0.5)}%" in text, text
        assert f"{got['demand']:.0f} pairs/s" in text, text
    assert 'class="to up">4<' in dom        # group 1 grows from 2 to 4

    text = re.sub(r"<[^>]+>", " ", dom)
    r = expected["requests"]
    assert re.search(r"Running / waiting requests\s+5 / 2", text)
    assert re.search(rf"KV cache use\s+{r['kv_usage'] * 100:.0f}%", text)
    assert re.search(r"Failed and rejected\s+2\s+of 4 requests", text)
    assert re.search(r"Time to first token p50\s+[\d.]+ (µs|ms|s)\s+p99 [\d.]+ (µs|ms|s)", text)

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1280, 900)
    assert len(png) > 30_000, "the screenshot is nearly blank"
