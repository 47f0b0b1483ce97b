"""`GET /dashboard`: served without auth with a strict CSP; in headless Chromium it renders the real
experiment data (per-arm charts of requests, latency, feedback and probe scores) and the views of
each tenant, read from the admin API with the key given in the URL fragment."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from alter_serve.registry import RequestLogEntry

from .admin_app import AdminApp, store_random_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Tenants acme (original + forget-x, max 4 concurrent) and globex; experiment bio-ab with 30
    logged requests per arm, feedback, and one probe run."""
    with AdminApp.start(tmp_path_factory.mktemp("dashboard")) as running:
        service, registry = running.service, running.service.registry
        folder = store_random_bundle(service, "rnd", ["x", "y"], seed=3)
        with running.client() as admin:
            for method, path, body in [
                ("POST", "/admin/bundles", {"name": "rnd", "path": str(folder)}),
                ("PUT", "/admin/views/forget-x", {"bundle": "rnd", "forget": {"x": 1.0}}),
                ("POST", "/admin/tenants", {"name": "acme", "views": ["original", "forget-x"],
                                            "default_view": "original", "limits": {"max_concurrent": 4}}),
                ("POST", "/admin/tenants", {"name": "globex", "views": ["original"]}),
                ("POST", "/admin/experiments", {"name": "bio-ab", "alias": "chat", "tenants": ["acme"],
                                                "arms": [{"name": "control", "view": "original", "weight": 1},
                                                         {"name": "forget", "view": "forget-x", "weight": 1}]}),
            ]:
                assert admin.request(method, path, json=body).status_code == 200
        registry.log_requests([
            RequestLogEntry(f"r{i}", "acme", "chat", view, 500 if i in (0, 2, 4) else 200,
                            100.0 + i if arm == "control" else 300.0 + i, None, "bio-ab", arm, 7.0, 12, 20)
            for i, (arm, view) in enumerate([("control", "original"), ("forget", "forget-x")] * 30)
        ])
        for i in range(20):
            registry.record_feedback("acme", f"r{i}", 2.0 + (i % 2) * 2 + (i % 4) * 0.25)
        registry.record_probe_results("bio-ab", [
            {"arm": "control", "view": "original", "samples": 20,
             "metrics": {"forget_probability": 0.61, "retain_probability": 0.58}},
            {"arm": "forget", "view": "forget-x", "samples": 20, "view_version": registry.get_view("forget-x").content_hash,
             "metrics": {"forget_probability": 0.12, "retain_probability": 0.55}},
        ], source="test")
        yield running


def test_page_and_assets_are_served_without_auth_and_with_a_strict_csp(app):
    page = httpx.get(app.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<script src="/dashboard/dashboard.js"' in page.text and "http" not in page.text.split("<body")[0]
    script = httpx.get(app.url + "/dashboard/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text  # data goes in as text only
    assert not re.search(r"https?://", script.text.replace("http://www.w3.org/2000/svg", ""))  # no CDN, no network
    missing = httpx.get(app.url + "/dashboard/..%2Fapp.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


class _Dom(HTMLParser):
    """Collects elements with their attributes, and the text of table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    assert CHROMIUM, "Debian's chromium is missing: `make test` installs it (apt-get install -y chromium)"
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100",
               "--virtual-time-budget=15000", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dashboard_renders_the_real_data_in_headless_chromium(app, tmp_path):
    dom_text = _chromium(tmp_path, f"{app.url}/dashboard#key={app.admin_key}", "--dump-dom")
    dom = _Dom()
    dom.feed(dom_text)
    body = dom.find("body")[0]
    assert body["data-state"] == "ready", dom_text[:3000]
    assert app.admin_key not in dom_text  # the key stays in sessionStorage, never in the page

    card = dom.find("div", data_experiment="bio-ab")
    assert len(card) == 1
    charts = {a["data-chart"] for a in dom.find("svg") if "data-chart" in a}
    assert charts == {"Requests", "Latency", "Feedback", "Probe scores"}

    def bar(series: str, category: str) -> float:
        (found,) = dom.find("rect", data_series=series, data_category=category)
        return float(found["data-value"])

    assert bar("requests", "control") == 30 and bar("requests", "forget") == 30
    assert bar("errors", "control") == 3 and bar("errors", "forget") == 0
    assert bar("p50", "control") == pytest.approx(129.0)  # 100 + even i, median of 0…58
    assert bar("p50", "forget") == pytest.approx(330.0)
    assert bar("forget p", "control") == 0.61 and bar("forget p", "forget") == 0.12
    assert bar("retain p", "forget") == 0.55
    report = httpx.get(f"{app.url}/admin/experiments/bio-ab/results", headers=app.admin_headers).json()
    assert bar("rating", "forget") == pytest.approx(report["arms"][1]["feedback"]["mean"])
    assert len([w for t, w in dom.elements if t == "line" and "whisker" in w.get("class", "")]) == 6  # 2 CIs × 3

    cells = dom.cells
    assert "control (control)" in cells and "forget-x" in cells
    assert any(c.startswith("p=") and "welch_t" in c for c in cells)  # feedback test vs control
    assert any("fisher_exact" in c for c in cells)  # error-rate test vs control
    tenant_row = cells[cells.index("acme"):cells.index("acme") + 4]
    assert tenant_row == ["acme", "forget-x, original", "4 concurrent", "active"]
    assert [a for a in dom.find("span", **{"class": "default-view"})]  # the default view is marked
    globex = cells[cells.index("globex"):cells.index("globex") + 4]
    assert globex == ["globex", "original", "unlimited", "active"]


def test_dashboard_asks_for_a_key_and_refuses_a_wrong_one(app, tmp_path):
    dom = _Dom()
    dom.feed(_chromium(tmp_path, f"{app.url}/dashboard", "--dump-dom"))
    assert dom.find("body")[0]["data-state"] == "need-key"
    assert "hidden" not in dom.find("form", id="key-form")[0]
    wrong = _Dom()
    wrong.feed(_chromium(tmp_path / "wrong", f"{app.url}/dashboard#key=as-wrong", "--dump-dom"))
    assert wrong.find("body")[0]["data-state"] == "need-key"
    assert "hidden" in wrong.find("main", id="content")[0]


def test_dashboard_screenshot_is_drawn(app, tmp_path):
    from PIL import Image

    shot = tmp_path / "dashboard.png"
    _chromium(tmp_path, f"{app.url}/dashboard#key={app.admin_key}", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1100)
    colors = {color for _, color in image.getcolors(maxcolors=1 << 20)}
    blue, red = (9, 105, 218), (209, 36, 47)  # the first two chart series (dashboard.css --c0, --c1)
    assert blue in colors and red in colors
