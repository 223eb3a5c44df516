"""The web dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

A real server (registry, deployer, gate) on the session's mosquitto, three in-process agents that
really download, measure and promote the tiny models, and the dashboard served by uvicorn on a
free port. Every page is opened in Chromium and checked for what the registry holds; every
operator action is clicked through the forms, and refused without a session, with a wrong CSRF
token and from another origin. Screenshots go to reports/dashboard/.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from attack_support import public_key_file, start_agent, start_server, wait_until
from playwright.sync_api import expect

from server.registry import ArtifactRecord, Registry
from server.web import DashboardConfig, DashboardServer, create_app
from server.web.views import FleetQuery, FleetRow, fleet_page

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "reports" / "dashboard"
CHROMIUM = Path(os.environ.get("EDGEGUIDE_CHROMIUM", "/usr/bin/chromium"))
SEARCH = Path(__file__).parent / "fixtures" / "search"
TOKEN = "operator-" + uuid.uuid4().hex  # per run, never a constant in the repository
DEVICES = ("shop-a", "shop-b", "shop-c")


@dataclass
class Fleet:
    """Everything the browser tests look at."""

    registry: Registry
    server: Any
    agents: dict[str, Any]
    url: str
    float_art: ArtifactRecord
    int8_art: ArtifactRecord
    bad_art: ArtifactRecord
    promoted: str  # int8 on shop-a, measured against its float incumbent (paired A/B)
    failed: str  # the op-version model on shop-b: the device cannot load it


def _deploy_and_wait(server: Any, artifact: ArtifactRecord, device: str, timeout: float = 90.0) -> str:
    dep = server.deploy(artifact.model_id, device, version=artifact.version)
    return server.wait(dep.deployment_id, timeout=timeout).deployment_id


@pytest.fixture(scope="module")
def fleet(mosquitto, tiny_artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("dashboard")
    registry = Registry(tmp / "data")
    float_art = registry.register(tiny_artifacts["float"])
    int8_art = registry.register(tiny_artifacts["int8"])
    bad_art = registry.register(tiny_artifacts["opversion"], model_id="tiny-opversion")
    prefix = f"eg-dash-{uuid.uuid4().hex[:8]}"
    server, _recorder = start_server(registry, mosquitto.url, prefix)
    key = public_key_file(registry, tmp)
    agents = {d: start_agent(d, mosquitto.url, tmp / d, key, prefix) for d in DEVICES}
    dashboard = None
    try:
        for d in DEVICES:
            wait_until(lambda d=d: registry.find_device(d), 20, f"{d}'s state")
        for d in DEVICES:
            assert registry.deployment(_deploy_and_wait(server, float_art, d)).status == "promoted"
        promoted = _deploy_and_wait(server, int8_art, "shop-a")
        failed = _deploy_and_wait(server, bad_art, "shop-b")
        config = DashboardConfig(token=TOKEN, search_paths=(SEARCH,), poll_s=0.5, fleet_cache_s=0.2,
                                 allowed_hosts=("127.0.0.1", "localhost"))
        dashboard = DashboardServer(create_app(registry, server, config), "127.0.0.1", 0).start()
        yield Fleet(registry, server, agents, dashboard.url.rstrip("/"), float_art, int8_art, bad_art, promoted,
                    failed)
    finally:
        if dashboard is not None:
            dashboard.stop()
        for agent in agents.values():
            agent.stop()
        server.stop()
        registry.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/install-system-deps.sh test)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context per test: no cookie (no session) carries over."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    pg = context.new_page()
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.set_default_timeout(15_000)
    yield pg
    context.close()
    assert not errors, f"browser console errors: {errors}"


def _shot(pg: Any, name: str) -> None:
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _login(pg: Any, url: str, token: str = TOKEN) -> None:
    pg.goto(f"{url}/login")
    pg.fill("input[name=token]", token)
    pg.click("button[type=submit]")


def _cells(pg: Any, device: str) -> list[str]:
    return [c.strip() for c in pg.locator(f"#fleet-table tr[data-device='{device}'] td").all_inner_texts()]


# ---- read-only pages ------------------------------------------------------------------------
def test_fleet_page_shows_each_device_with_its_figures(fleet: Fleet, page: Any) -> None:
    page.goto(f"{fleet.url}/fleet")
    assert page.locator("#fleet-table tbody tr").count() == 3
    assert "3 online of 3 devices" in page.inner_text("#fleet-counts")
    a = _cells(page, "shop-a")
    device = fleet.registry.device("shop-a")
    report = fleet.registry.deployment(fleet.promoted).report
    assert a[1] == "online"
    assert a[2] == f"{device.runtime['name']} {device.runtime['version']}"
    assert a[3] == report["context"]["cpu_model"]
    assert a[4] == f"{fleet.int8_art.model_id}@{fleet.int8_art.version}"
    assert a[6] == f"{report['latency_ms']['p90']:.3g} ms"
    assert a[7] == f"{report['memory']['peak_rss_mib']:.3g} MiB"
    assert a[8] == f"{report['quality']['agreement_at_k']:.3f}"
    _shot(page, "fleet")

    page.fill("input[name=q]", "shop-b")
    page.click("#fleet-filter button[type=submit]")
    assert [r.get_attribute("data-device") for r in page.locator("#fleet-table tbody tr").all()] == ["shop-b"]
    page.goto(f"{fleet.url}/fleet")
    page.click("th a[data-sort=device_id]")  # already ascending: the click sorts descending
    assert [r.get_attribute("data-device") for r in page.locator("#fleet-table tbody tr").all()] == \
        ["shop-c", "shop-b", "shop-a"]


def test_fleet_paging_filtering_and_sorting_of_many_devices() -> None:
    rows = [FleetRow(f"dev-{i:04d}", i % 3 != 0, "online" if i % 3 else "offline", "ai-edge-litert 2.3.0", "0.1",
                     "cpu", "m@1", 1000.0 + i, None if i % 10 == 0 else float(i % 17), None, None, "", None)
            for i in range(1200)]
    page = fleet_page(rows, FleetQuery(per_page=50, page=3))
    assert (page.pages, page.page, len(page.rows)) == (24, 3, 50)
    assert page.rows[0].device_id == "dev-0100" and page.online == 800
    offline = fleet_page(rows, FleetQuery(status="offline", per_page=200))
    assert offline.matching == 400 and all(r.status == "offline" for r in offline.rows)
    by_p90 = fleet_page(rows, FleetQuery(sort="p90_ms", desc=True, per_page=200, page=6))
    assert by_p90.rows[-1].p90_ms is None  # devices without a figure come last, whatever the direction
    first = fleet_page(rows, FleetQuery(sort="p90_ms", desc=True, per_page=25)).rows
    assert [r.p90_ms for r in first] == sorted((r.p90_ms for r in first), reverse=True) and first[0].p90_ms == 16
    assert fleet_page(rows, FleetQuery(page=999)).page == 24  # past the end: the last page
    assert FleetQuery.from_params({"page": "x", "per_page": "7", "sort": "evil", "status": "?"}) == FleetQuery()


def test_deployment_page_shows_gate_checks_histogram_energy_agreement_and_paired(fleet: Fleet, page: Any) -> None:
    dep = fleet.registry.deployment(fleet.promoted)
    page.goto(f"{fleet.url}/deployments/{dep.deployment_id}")
    assert page.inner_text("#deployment-status") == "promoted"
    assert page.inner_text("#deployment-verdict") == "PASS"
    rows = page.locator("#checks-table tbody tr")
    assert rows.count() == len(dep.verdict["checks"])
    p90 = next(c for c in dep.verdict["checks"] if c["name"] == "p90_ms")
    text = rows.filter(has_text="p90_ms").inner_text()
    assert "pass" in text and "<= 1000 ms" in text
    assert f"{p90['figure']:.4g}" in text
    page.wait_for_selector("canvas.latency-chart[data-drawn='1']")
    assert page.inner_text("#energy").startswith("unavailable")  # no power sensor here, never a made-up figure
    agreement = dep.report["quality"]["agreement_at_k"]
    assert page.inner_text("#agreement").startswith(f"{agreement:.3f}")
    paired = dep.report["paired"]
    assert f"{paired['median_ratio_p50']:.3f}x over {paired['pairs']} pairs" in page.inner_text("#paired")
    assert "status:promoted" in page.inner_text("#timeline")
    assert page.locator("#report-files a", has_text="report.md").count() == 1
    _shot(page, "deployment")
    md = page.request.get(f"{fleet.url}/deployments/{dep.deployment_id}/files/report.md")
    assert md.status == 200 and dep.deployment_id in md.text()
    assert page.request.get(f"{fleet.url}/deployments/{dep.deployment_id}/files/..%2Fregistry.sqlite").status == 404
    # A PNG the server skipped while busy (ReportQueue's plot share) is still linked, and drawn on first view.
    png = fleet.registry.reports_dir / dep.deployment_id / "latency.png"
    png.unlink(missing_ok=True)  # drawn or skipped, depending on how fast the fixture's deployments ended
    page.reload()
    assert page.locator("#report-files a", has_text="latency.png").count() == 1
    drawn = page.request.get(f"{fleet.url}/deployments/{dep.deployment_id}/files/latency.png")
    assert drawn.status == 200 and drawn.body().startswith(b"\x89PNG") and png.is_file()


def test_failed_deployment_page_shows_the_reason(fleet: Fleet, page: Any) -> None:
    dep = fleet.registry.deployment(fleet.failed)
    assert dep.status != "promoted"
    page.goto(f"{fleet.url}/deployments")
    row = page.locator(f"#deployments-table tr[data-deployment='{dep.deployment_id}']")
    assert dep.status in row.inner_text()
    row.locator("a", has_text=dep.deployment_id).click()
    assert page.inner_text("#deployment-status") == dep.status
    assert dep.reason and dep.reason[:60] in page.inner_text("#deployment-reason")
    _shot(page, "deployment-failed")


def test_models_page_lists_versions_and_draws_the_search_pareto_chart(fleet: Fleet, page: Any) -> None:
    import json

    page.goto(f"{fleet.url}/models")
    for art in (fleet.float_art, fleet.int8_art, fleet.bad_art):
        row = page.locator(f"#models-table tr[data-model='{art.id}']").inner_text()
        assert f"{art.metrics['ndcg10']:.4f}" in row and f"{art.metrics['hr10']:.3f}" in row
    assert "int8" in page.locator(f"#models-table tr[data-model='{fleet.int8_art.id}']").inner_text()
    page.wait_for_selector("canvas.pareto-chart[data-drawn='1']")
    search = json.loads((SEARCH / "search.json").read_text())
    table = page.inner_text(".pareto-table")
    assert f"{search['reference']['ndcg10']:.4f}" in table
    for variant in search["variants"]:
        if not variant.get("error"):
            assert variant["name"] in table
    for name in search["baselines"]:
        assert f"baseline {name}" in table
    _shot(page, "models")


def test_live_updates_show_a_device_going_offline_without_reload(fleet: Fleet, page: Any) -> None:
    page.goto(f"{fleet.url}/fleet")
    marker = page.locator("#fleet-filter input[name=q]")
    marker.fill("typed, not submitted")  # a reload would lose it
    fleet.agents["shop-c"].stop()  # clean stop: publishes its retained offline state
    expect(page.locator("tr[data-device='shop-c'] .status-cell")).to_have_text("offline", timeout=20_000)
    assert marker.input_value() == "typed, not submitted"  # updated in place, never reloaded
    assert "2 online of 3 devices" in page.inner_text("#fleet-counts")
    _shot(page, "fleet-live-offline")


# ---- actions and their refusals ---------------------------------------------------------------
def test_without_a_session_pages_are_read_only_and_actions_are_refused(fleet: Fleet, page: Any) -> None:
    before = len(fleet.registry.deployments())
    for path in ("/deployments", "/devices/shop-a", "/models"):
        page.goto(fleet.url + path)
        assert page.locator("form[action^='/actions/']").count() == 0
        assert page.inner_text("#operator-badge") == "read-only"
    response = page.request.post(f"{fleet.url}/actions/deploy",
                                 form={"model": fleet.int8_art.id, "device": "shop-b", "csrf": "x"})
    assert response.status == 403 and "log in" in response.text()
    response = page.request.post(f"{fleet.url}/actions/rollback", form={"device": "shop-a"})
    assert response.status == 403
    assert len(fleet.registry.deployments()) == before
    assert TOKEN not in page.content()


def test_actions_need_the_forms_csrf_token_and_same_origin(fleet: Fleet, browser: Any) -> None:
    context = browser.new_context()
    pg = context.new_page()
    url = fleet.url
    try:
        _login(pg, url)
        assert pg.inner_text("#operator-badge") == "operator"
        cookies = context.cookies()
        session = next(c for c in cookies if c["name"] == "edgeguide_session")
        assert session["httpOnly"] and session["sameSite"] == "Strict" and TOKEN not in session["value"]
        before = len(fleet.registry.deployments())
        wrong = pg.request.post(f"{url}/actions/deploy",
                                form={"model": fleet.int8_art.id, "device": "shop-b", "csrf": "forged"})
        assert wrong.status == 403 and "CSRF" in wrong.text()
        pg.goto(f"{url}/deployments")
        csrf = pg.locator("#deploy-form input[name=csrf]").input_value()
        other_site = pg.request.post(f"{url}/actions/deploy", headers={"Origin": "http://evil.example"},
                                     form={"model": fleet.int8_art.id, "device": "shop-b", "csrf": csrf})
        assert other_site.status == 403
        assert len(fleet.registry.deployments()) == before
        assert TOKEN not in pg.content()
    finally:
        context.close()


@pytest.fixture
def operator_page(fleet: Fleet, browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    _login(pg, fleet.url)
    assert pg.inner_text("#operator-badge") == "operator"
    yield pg
    context.close()


def test_operator_deploys_a_version_and_sees_it_promoted_live(fleet: Fleet, operator_page: Any) -> None:
    pg = operator_page
    pg.goto(f"{fleet.url}/deployments")
    pg.fill("#deploy-form input[name=model]", fleet.int8_art.id)
    pg.fill("#deploy-form input[name=device]", "shop-b")
    pg.click("#deploy-form button[type=submit]")
    flash = pg.inner_text("#flash")
    assert flash.startswith("deployment d-") and "shop-b started" in flash
    dep_id = flash.split()[1].rstrip(":")
    assert fleet.registry.deployment(dep_id).device_id == "shop-b"
    row = f"#deployments-table tr[data-deployment='{dep_id}']"
    expect(pg.locator(row)).to_contain_text("promoted", timeout=60_000)  # polled in, no reload
    assert fleet.registry.deployment(dep_id).status == "promoted"
    assert any(e["kind"] == "operator:deploy" for e in fleet.registry.events(deployment_id=dep_id))
    _shot(pg, "deployments-operator")
    pg.goto(f"{fleet.url}/models")
    pg.fill(f"#models-table tr[data-model='{fleet.float_art.id}'] input[name=device]", "nobody-01")
    pg.click(f"#models-table tr[data-model='{fleet.float_art.id}'] button")
    assert pg.inner_text("#flash").startswith("refused: device 'nobody-01' has never been seen")


def test_operator_rolls_a_device_back_to_its_previous_model(fleet: Fleet, operator_page: Any) -> None:
    pg = operator_page
    device = fleet.registry.device("shop-a")
    assert (device.active_model_id, device.active_version) == (fleet.int8_art.model_id, fleet.int8_art.version)
    pg.goto(f"{fleet.url}/devices/shop-a")
    pg.click("#rollback-form button")
    assert pg.inner_text("#flash").startswith("rollback sent to shop-a")
    expect(pg.locator("#device-active")).to_have_text(f"{fleet.float_art.model_id}@{fleet.float_art.version}",
                                                      timeout=30_000)
    device = fleet.registry.device("shop-a")
    assert (device.active_model_id, device.active_version) == (fleet.float_art.model_id, fleet.float_art.version)
    _shot(pg, "device-rolled-back")


def test_operator_starts_a_rollout_and_aborts_it(fleet: Fleet, operator_page: Any) -> None:
    pg = operator_page
    # shop-c is offline (stopped above): its canary deployment waits, so the rollout is still running.
    pg.goto(f"{fleet.url}/deployments")
    pg.fill("#rollout-form input[name=model]", fleet.bad_art.id)
    pg.fill("#rollout-form input[name=groups]", "canary=shop-c")
    pg.fill("#rollout-form input[name=devices]", "shop-a,shop-b")
    pg.fill("#rollout-form input[name=waves]", "2")
    pg.fill("#rollout-form input[name=max_failure_pct]", "10")
    pg.click("#rollout-form button[type=submit]")
    flash = pg.inner_text("#flash")
    assert flash.startswith("rollout r-") and "in 3 stages, stop above 10 % failures" in flash
    rollout_id = flash.split()[1].rstrip(":")
    pg.click(f"#rollouts-table a:text('{rollout_id}')")
    assert pg.inner_text("#rollout-status") == "running"
    assert "more than 10 % of a stage failed" in pg.inner_text("#abort-threshold")
    assert [s.get_attribute("data-stage") for s in pg.locator(".stage").all()] == ["canary", "wave-1", "wave-2"]
    wait_until(lambda: fleet.server.rollouts.get(rollout_id).devices["shop-c"]["deployment_id"] not in
               (None, "claiming"), 20, "the canary deployment to start")
    _shot(pg, "rollout-running")
    pg.click("#abort-form button")
    assert pg.inner_text("#flash").startswith(f"rollout {rollout_id} rolling_back")
    expect(pg.locator("#rollout-status")).to_have_text("aborted", timeout=30_000)
    canary = pg.locator(".stage[data-stage='canary']")
    assert "100 %" in canary.locator(".failure-pct").inner_text()
    assert "aborted: stopped by an operator" in pg.inner_text("#rollout-reason")
    rollout = fleet.server.rollouts.get(rollout_id)
    assert rollout.status == "aborted"
    assert all(rollout.devices[d]["deployment_id"] is None for d in ("shop-a", "shop-b"))  # no wave started
    assert "(not started)" in pg.locator(".stage[data-stage='wave-1'] h3").inner_text()
    assert fleet.registry.deployment(rollout.devices["shop-c"]["deployment_id"]).status == "cancelled"
    _shot(pg, "rollout-aborted")
    assert pg.locator("#abort-form").count() == 0  # nothing left to abort
    csrf = pg.locator("header form[action='/logout'] input[name=csrf]").input_value()
    again = pg.request.post(f"{fleet.url}/actions/abort", form={"rollout": rollout_id, "csrf": csrf})
    assert f"refused: rollout {rollout_id} is aborted, not running" in again.text()


def test_operator_cancels_a_deployment_in_progress(fleet: Fleet, operator_page: Any) -> None:
    pg = operator_page
    # shop-c is offline: a deployment to it waits for the device, and can be cancelled.
    pg.goto(f"{fleet.url}/devices/shop-c")
    pg.fill("#device-deploy-form input[name=model]", fleet.int8_art.id)
    pg.click("#device-deploy-form button")
    dep_id = pg.inner_text("#flash").split()[1].rstrip(":")
    pg.goto(f"{fleet.url}/deployments/{dep_id}")
    assert pg.inner_text("#deployment-status") in ("pending", "transferring")
    pg.click("#cancel-form button")
    assert pg.inner_text("#flash") == f"deployment {dep_id} cancelled; shop-c keeps its current model"
    expect(pg.locator("#deployment-status")).to_have_text("cancelled")
    assert fleet.registry.deployment(dep_id).status == "cancelled"
    assert any(e["kind"] == "operator:cancel" for e in fleet.registry.events(deployment_id=dep_id))


def test_logout_ends_the_session(fleet: Fleet, operator_page: Any) -> None:
    pg = operator_page
    pg.goto(f"{fleet.url}/fleet")
    pg.click("header form[action='/logout'] button")
    assert pg.inner_text("#operator-badge") == "read-only"
    assert pg.request.post(f"{fleet.url}/actions/rollback", form={"device": "shop-a"}).status == 403


# ---- the command line --------------------------------------------------------------------------
def test_serve_http_serves_the_dashboard_and_refuses_a_short_token(mosquitto, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGEGUIDE_HTTP_TOKEN": ""}
    base = [sys.executable, "-m", "server", "--data-dir", str(tmp_path / "data"), "serve", "--broker", mosquitto.url,
            "--topic-prefix", f"eg-dash-cli-{uuid.uuid4().hex[:8]}", "--client-id", f"cli-{uuid.uuid4().hex[:8]}"]
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    done = subprocess.run([*base, "--http", "127.0.0.1:0", "--http-token-file", str(short)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "at least 16 characters" in done.stderr, done.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen([*base, "--http", "127.0.0.1:0", "--http-token-file", str(token_file)], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("dashboard on "):
                assert "operator token set" in line and TOKEN not in line
                url = line.split()[2]
        assert url, "serve --http never printed the dashboard URL"
        with urllib.request.urlopen(url + "fleet", timeout=10) as response:
            body = response.read().decode()
            assert response.status == 200 and "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert "<h1>Fleet</h1>" in body and TOKEN not in body
        with pytest.raises(urllib.error.HTTPError) as refused:  # another Host: a DNS rebinding page is refused
            urllib.request.urlopen(urllib.request.Request(url + "fleet", headers={"Host": "evil.example"}),
                                   timeout=10)
        assert refused.value.code == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# Last: it locks 127.0.0.1 out of logging in for a minute.
def test_wrong_token_is_refused_and_repeated_failures_are_throttled(fleet: Fleet, browser: Any) -> None:
    context = browser.new_context()
    pg = context.new_page()
    try:
        _login(pg, fleet.url, "not-the-token-at-all")
        assert "wrong token" in pg.inner_text("#error")
        assert pg.inner_text("#operator-badge") == "read-only"
        for _ in range(5):
            _login(pg, fleet.url, "still-not-the-token")
        assert "too many failed logins" in pg.inner_text("#error")
        _login(pg, fleet.url)  # even the right token waits out the window
        assert pg.inner_text("#operator-badge") == "read-only"
    finally:
        context.close()


def test_screenshots_were_written() -> None:
    assert shutil.which("chromium") or CHROMIUM.exists()
    for name in ("fleet", "deployment", "models", "rollout-aborted"):
        assert (SHOTS / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert time.time() - (SHOTS / "fleet.png").stat().st_mtime < 3600
