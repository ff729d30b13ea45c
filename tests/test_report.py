"""The HTML audit report: rendered from real scans of the smoke zoo, checked as text and in
headless Chromium (Debian's `chromium`, driven by Playwright)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scanner.metrics import mask_f1
from scanner.report import bar_chart_svg, ground_truth_from_manifest, png_data_uri, render_report, write_report
from scanner.scan import ScanSettings, error_result, scan_model

PAYLOAD = "<script>window.__pwned=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__pwned2=1">'
TROJAN, CLEAN = "fm-square4-br", "fm-clean-s0"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanner.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reports(fm_smoke_zoo, tmp_path_factory) -> dict[str, Path]:
    """Real reports of the smoke zoo, built once: clean (through `scan --json`), infected (scanned
    here with a short TABOR, then `trojanscan report` with the zoo's ground truth)."""
    zoo, manifest = fm_smoke_zoo
    models = {entry["id"]: entry for entry in manifest["models"]}
    out = tmp_path_factory.mktemp("reports")

    # Clean: NeuronInspect with a threshold nothing reaches, as in test_cli_scan (verdict plumbing only).
    clean_json = out / "clean" / "result.json"
    done = run_cli("scan", str(zoo / models[CLEAN]["files"]["onnx"]["path"]), "--data", str(zoo / "clean_samples.npz"),
                   "--detectors", "ni", "--threshold", "1000", "--json", str(clean_json))
    assert done.returncode == 0, done.stdout + done.stderr

    # Infected: a short TABOR still restores pictures for every class; NI flags the target.
    short_tabor = {"max_steps": 50, "batch_size": 16, "prune_steps": 10, "slots": 10}
    settings = ScanSettings(detectors=("ni", "tabor"), detector_settings={"tabor": short_tabor})
    infected_dir = out / "infected"
    result = scan_model(zoo / models[TROJAN]["files"]["onnx"]["path"], zoo / "clean_samples.npz", settings,
                        out_dir=infected_dir, model_reference=f"{PAYLOAD}fm-square4-br.onnx")
    payload = result.to_json() | {
        "registry": {"name": PAYLOAD, "version": "3", "description": IMG_PAYLOAD, "tags": {"owner": IMG_PAYLOAD}},
        "unlearning": {"ca_before": 0.912, "ca_after": 0.905, "asr_before": 0.998, "asr_after": 0.011, "epochs": 2},
    }
    infected_json = infected_dir / "result.json"
    infected_json.write_text(json.dumps(payload))
    done = run_cli("report", str(infected_json), "--out", str(infected_dir / "audit.html"),
                   "--ground-truth", str(zoo / "manifest.json"), "--model-id", TROJAN)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"clean": clean_json.parent / "report.html", "infected": infected_dir / "audit.html",
            "infected_json": infected_json, "zoo": zoo}


# ------------------------------------------------------------------ without a browser

def test_scan_json_writes_a_clean_report_beside_it(reports):
    html = reports["clean"].read_text()
    assert "CLEAN" in html and "NeuronInspect" in html
    result = json.loads((reports["clean"].parent / "result.json").read_text())
    assert result["model"]["sha256"] in html
    assert html.count('<svg class="chart"') == 1


def test_infected_report_content(reports):
    html = reports["infected"].read_text()
    result = json.loads(reports["infected_json"].read_text())
    assert result["verdict"] == "infected" and 7 in result["flagged_classes"]
    assert '<span class="verdict-word">INFECTED</span>' in html
    for reason in result["reasons"]:
        assert reason in html
    assert result["model"]["sha256"] in html and result["versions"]["torch"] in html
    assert f"cpu, {result['threads']} CPU thread" in html  # the thread count changes the rounding
    assert html.count('<svg class="chart"') == 2
    for kind in ("restored mask", "clean image with the trigger stamped", "refined (pruned) mask", "saliency heatmap"):
        assert f'alt="{kind}"' in html, kind
    # unlearning figures as percentages, with the change in points
    assert "91.2%" in html and "90.5%" in html and "99.8%" in html and "1.1%" in html and "-98.7 points" in html


def test_mask_f1_in_the_report_matches_metrics(reports):
    html = reports["infected"].read_text()
    result = json.loads(reports["infected_json"].read_text())
    truth = np.load(reports["zoo"] / f"{TROJAN}/trigger0_mask.npy")
    restored = np.load(reports["infected_json"].parent / result["detectors"]["tabor"]["artifacts"]["7"]["mask_npy"])
    expected = mask_f1(restored, truth)
    tabor = html[html.index('id="detector-tabor"'):]
    shown = re.search(r"Target class 7: (?:not )?flagged;\s+mask F1 ([0-9.]+)", tabor)
    assert shown, "no mask F1 for the true target in the TABOR section"
    assert float(shown.group(1)) == pytest.approx(expected, abs=0.005)
    assert "true mask" in tabor


def test_untrusted_strings_are_escaped_without_a_browser(tmp_path):
    result = error_result(f"model {PAYLOAD} failed", f"models:/{PAYLOAD}/1", None, ScanSettings()).to_json()
    result["registry"] = {"name": "<script>alert(1)</script>", "tags": {"x": IMG_PAYLOAD}}
    html = render_report(result, tmp_path)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert PAYLOAD not in html and IMG_PAYLOAD not in html
    assert "<script" not in html.lower() and "<img src=x" not in html


def test_error_result_renders_with_its_reason(reports, tmp_path):
    zoo = reports["zoo"]
    done = run_cli("scan", str(zoo / f"{TROJAN}/model.onnx"), "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2
    html = (tmp_path / "report.html").read_text()
    assert '<span class="verdict-word">ERROR</span>' in html
    assert "not known to be clean" in html and "no clean data: pass --data" in html
    assert "not computed" in html  # no sha256 for a model that was never loaded


def test_missing_pictures_and_partial_results_still_render(reports, tmp_path):
    result = json.loads(reports["infected_json"].read_text())
    result["detectors"]["tabor"]["artifacts"]["7"]["stamped"] = "triggers/tabor/gone.png"
    del result["versions"], result["registry"], result["timings"]
    html = render_report(result, reports["infected_json"].parent)
    assert "picture not found: triggers/tabor/gone.png" in html and "not scanned from a model registry" in html
    # scanner.unlearning's own shape: before/after measurements
    result["unlearning"] = {"before": {"clean_accuracy": 0.9, "max_asr_restored": 0.97, "max_asr_true": 0.99},
                            "after": {"clean_accuracy": 0.89, "max_asr_restored": 0.02, "max_asr_true": 0.015}}
    html = render_report(result, reports["infected_json"].parent)
    unlearning = html[html.index('id="unlearning"'):html.index('id="glossary"')]
    assert "ASR, real trigger" in unlearning and "99.0%" in unlearning and "1.5%" in unlearning
    assert "-1.0 points" in unlearning and "-97.5 points" in unlearning
    assert 'id="ca-bound"' not in unlearning  # no bound recorded: none shown
    for bound, words in ((0.0312, "at most 3.1 points lost at 95% confidence (4 of 500 images worse, 1 better)"),
                         (-0.0071, "at least 0.7 points gained at 95% confidence (4 of 500 images worse, 1 better)")):
        result["unlearning"]["ca_drop_bound"] = {"images": 500, "worse": 4, "better": 1, "drop": 0.006,
                                                 "upper_bound": bound, "confidence": 0.95}
        html = render_report(result, reports["infected_json"].parent)
        assert words in html[html.index('id="ca-bound"'):]
    html = render_report({"verdict": "something else", "detectors": {"ni": {"anomaly_index": [1.0, None, 3.0]}}}, tmp_path)
    assert '<span class="verdict-word">ERROR</span>' in html and html.count('class="bar') == 2


def test_reports_reference_nothing_outside_the_file(reports):
    for name in ("clean", "infected"):
        html = reports[name].read_text()
        sources = re.findall(r'\bsrc="([^"]*)"', html)
        links = re.findall(r'\bhref="([^"]*)"', html)
        assert sources and all(s.startswith("data:image/png;base64,") for s in sources), name
        assert links and all(h.startswith("#") for h in links), name
        assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html), name
        assert "<link" not in html and "@import" not in html and "<script" not in html
        # the only url() references are the charts' own hatch patterns
        assert set(re.findall(r"url\(([^)]*)\)", html)) <= {"#hatch-" + d for d in re.findall(r'id="hatch-(\w+)"', html)}


def test_chart_bars_and_threshold_line():
    svg = ET.fromstring(str(bar_chart_svg([0.0, 1.0, 4.0, float("nan")], 2.0, [2], "t", chart_id="x")))
    bars = [e for e in svg.iter("rect") if "bar" in e.get("class", "").split()]
    assert len(bars) == 3  # the NaN gets no bar
    assert [b.get("class") for b in bars] == ["bar", "bar", "bar flagged"]
    heights = [float(b.get("height")) for b in bars]
    assert heights[2] == pytest.approx(4 * heights[1], rel=0.01)
    line = next(e for e in svg.iter("line") if e.get("class") == "threshold")
    base = float(bars[1].get("y")) + heights[1]  # the zero line
    assert base - float(line.get("y1")) == pytest.approx(2 * heights[1], rel=0.01)
    assert any(t.text == "n/a" for t in svg.iter("text"))


def test_pictures_outside_the_result_folder_are_not_embedded(tmp_path):
    inside, outside = tmp_path / "run", tmp_path / "secret.png"
    inside.mkdir()
    Image.new("L", (2, 2)).save(outside)
    Image.new("L", (2, 2)).save(inside / "ok.png")
    (inside / "fake.png").write_text("not a png")
    assert png_data_uri(inside, "ok.png").startswith("data:image/png;base64,")
    assert png_data_uri(inside, "../secret.png") is None
    assert png_data_uri(inside, str(outside)) is None
    assert png_data_uri(inside, "fake.png") is None and png_data_uri(inside, "absent.png") is None


def test_ground_truth_of_a_clean_zoo_model_and_unknown_ids(reports, tmp_path):
    truth = ground_truth_from_manifest(reports["zoo"] / "manifest.json", CLEAN)
    assert truth == {"model_id": CLEAN, "trojaned": False, "targets": [], "triggers": []}
    html = write_report(reports["clean"].parent / "result.json", tmp_path / "r.html", ground_truth=truth).read_text()
    assert "a clean model: no class should be flagged" in html
    done = run_cli("report", str(reports["infected_json"]), "--ground-truth", str(reports["zoo"] / "manifest.json"),
                   "--model-id", "no-such-model")
    assert done.returncode == 2 and "no-such-model" in done.stderr
    assert run_cli("report", str(reports["infected_json"]), "--model-id", TROJAN).returncode == 4


# ------------------------------------------------------------------ in Chromium

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "the Debian chromium package is needed (bash scripts/run.sh test installs it)"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_report(browser, path: Path, **context):
    """Open a report; return the page and what it logged and requested."""
    page = browser.new_page(**context)
    seen = {"console_errors": [], "page_errors": [], "requests": []}
    page.on("console", lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, seen


@pytest.mark.parametrize("kind, verdict, charts, flagged", [("clean", "CLEAN", 1, 0), ("infected", "INFECTED", 2, 1)])
def test_report_in_chromium(browser, reports, kind, verdict, charts, flagged):
    page, seen = open_report(browser, reports[kind])
    word = page.locator("h1 .verdict-word")
    assert word.inner_text() == verdict and word.is_visible()
    assert page.locator("svg.chart").count() == charts
    for i in range(charts):
        chart = page.locator("svg.chart").nth(i)
        assert chart.is_visible() and chart.bounding_box()["width"] > 300
        assert chart.locator("rect.bar").count() == 10
        assert chart.locator("line.threshold").bounding_box()["width"] > 300  # a horizontal line: no height
    assert page.locator("svg.chart rect.bar.flagged").count() >= flagged
    images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) >= 3
    assert all(complete and width > 0 for _, complete, width in images), images
    for img in page.locator("img").all()[:8]:
        assert img.is_visible()
    if kind == "infected":
        assert {"restored mask", "clean image with the trigger stamped", "saliency heatmap", "true mask"} <= \
            {alt for alt, _, _ in images}
        assert page.locator("#unlearning").is_visible()
    assert seen["console_errors"] == [] and seen["page_errors"] == []
    page_url = reports[kind].resolve().as_uri()
    assert all(url == page_url or url.startswith("data:") for url in seen["requests"]), seen["requests"]
    # the print stylesheet hides the navigation and keeps the verdict
    page.emulate_media(media="print")
    assert page.locator("nav").is_hidden() and word.is_visible()
    page.close()


def test_injected_markup_does_not_run_even_without_the_page_csp(browser, reports):
    # bypass_csp: the page's Content-Security-Policy would also stop a script; this checks the escaping alone.
    page, seen = open_report(browser, reports["infected"], bypass_csp=True)
    assert page.evaluate("window.__pwned") is None and page.evaluate("window.__pwned2") is None
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert PAYLOAD in page.locator(".model-ref").inner_text()
    assert PAYLOAD in page.locator("#provenance").inner_text() and IMG_PAYLOAD in page.locator("#provenance").inner_text()
    assert seen["page_errors"] == []
    assert not any(url.startswith(("http:", "https:")) for url in seen["requests"])
    page.close()


def test_a_wheel_install_finds_its_templates(tmp_path):
    """templates/ sits outside the packages (fixed layout): the wheel carries it as data files,
    and a report renders from an install that has no source tree beside it."""
    root = Path(__file__).resolve().parent.parent
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(root)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("trojanscan-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    script = ("import scanner.report as r; from scanner.scan import ScanSettings, error_result; "
              "print(r.__file__); print(r.TEMPLATES_DIR); "
              "print(len(r.render_report(error_result('boom', 'm.onnx', None, ScanSettings()).to_json(), '.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr
    module_file, templates, length = done.stdout.split()
    assert Path(module_file).is_relative_to(target)  # the installed copy, not the checkout
    assert Path(templates) == target / "share" / "trojanscan" / "templates"
    assert int(length) > 1000
