"""A demo run's quality figures in the Dagster UI, checked the way a user sees them: `unicorn demo`
(fake LLM) into a temporary DAGSTER_HOME, then `dagster-webserver` on loopback. Its GraphQL API
serves every figure of quality_report's latest materialisation as a number (Float/Int metadata
entries, which the UI plots), and headless Chromium shows a plot per figure on the asset page.

Set UNICORN_UI_SCREENSHOT=docs/images/quality_figures.png to keep the screenshot (the README's)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tests.deployment.browser import INSTALL, Browser, chromium_path
from tests.deployment.test_deployment import BIN, free_port
from tests.support import ROOT, stop_process

pytestmark = pytest.mark.slow

LATEST_METADATA = """
query { assetOrError(assetKey: {path: ["quality_report"]}) { __typename
  ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { __typename label
    ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intValue } } } } } }"""


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"dagster-webserver did not answer within {seconds}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(the UI's URL, the data folder) after a finished demo run."""
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "home").mkdir()
    env = {**os.environ, "UNICORN_LLM_BACKEND": "fake", "UNICORN_DATA_DIR": str(tmp / "data"),
           "DAGSTER_HOME": str(tmp / "home"), "UNICORN_PROFILE": "local"}
    demo = subprocess.run([str(BIN / "unicorn"), "demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "webserver.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        wait_until_serving(url, server, log)
        graphql(url, "mutation { setNuxSeen }")  # the UI's first-visit dialog would cover the page
        yield url, tmp / "data"
    finally:
        stop_process(server)


def test_every_figure_is_a_number_in_the_graphql_api(ui):
    url, data = ui
    asset = graphql(url, LATEST_METADATA)["assetOrError"]
    assert asset["__typename"] == "Asset", asset
    (latest,) = asset["assetMaterializations"]
    entries = {e["label"]: e for e in latest["metadataEntries"]}
    table = pl.read_parquet(data / "quality_report.parquet")
    figures = {f"{stage}/{name}": value for stage, name, value
               in table.select("stage", "figure", "value").iter_rows()}
    assert len(figures) >= 30 and "caption/type_token_ratio" in figures
    for key, value in figures.items():
        entry = entries.get(key)
        assert entry is not None, f"{key} missing from the UI's metadata"
        assert entry["__typename"] in {"FloatMetadataEntry", "IntMetadataEntry"}, entry
        shown = entry.get("floatValue", entry.get("intValue"))
        assert shown == pytest.approx(value), key
    assert entries["report"]["__typename"] == "MarkdownMetadataEntry"


def test_the_asset_page_plots_every_figure_in_headless_chromium(ui, tmp_path: Path):
    if chromium_path() is None:
        pytest.fail(INSTALL)
    url, data = ui
    figures = pl.read_parquet(data / "quality_report.parquet").height
    with Browser(width=1400, height=1100, timeout=90) as browser:
        browser.open(f"{url}/assets/quality_report")
        browser.wait_for_text("caption/words_mean")  # the metadata table, as numbers
        browser.click("Plots")
        deadline = time.monotonic() + 60
        while browser.evaluate("document.querySelectorAll('canvas').length") < figures:
            assert time.monotonic() < deadline, "the Plots view drew fewer plots than figures"
            time.sleep(0.5)
        browser.scroll_to_button("Plots")
        time.sleep(1)  # the charts' first paint
        dom = browser.dom()
        assert "caption/type_token_ratio" in dom and "instruction/json_valid_first_attempt" in dom
        shot = Path(os.environ.get("UNICORN_UI_SCREENSHOT") or tmp_path / "quality_figures.png")
        browser.screenshot(shot)
    assert shot.stat().st_size > 10_000
