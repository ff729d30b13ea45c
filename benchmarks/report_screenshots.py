"""Full-page screenshots of two audit reports (a clean and an infected zoo model) for the README.

    .venv/bin/python benchmarks/report_screenshots.py --zoo zoo/fashion-mnist \
        --clean fm-clean-cnn-s1 --infected fm-square5-br --out docs

Scans both models (ni + tabor, one thread; results kept under --work and reused), renders the
reports with the zoo's ground truth, and photographs them in headless Chromium (Debian's
`chromium` package; `playwright install` cannot download browsers here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.report import ground_truth_from_manifest, write_report  # noqa: E402


def scan(zoo: Path, model_id: str, work: Path, detectors: str) -> Path:
    """The result JSON of one zoo model, scanned with the CLI unless already there."""
    result = work / model_id / "result.json"
    if not result.is_file():
        env = os.environ | {"OMP_NUM_THREADS": "1", "TROJANSCAN_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan", str(zoo / model_id / "model.onnx"),
                               "--data", str(zoo / "clean_samples.npz"), "--detectors", detectors,
                               "--json", str(result)], env=env, capture_output=True, text=True)
        if done.returncode not in (0, 1):
            raise SystemExit(f"scan of {model_id} failed: {done.stderr.strip()}")
    return result


def screenshot(html: Path, png: Path, width: int = 1100) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(html.resolve().as_uri())
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png), full_page=True)
        browser.close()
    # 256 colours are plenty for a page of text, charts and small pictures: about a third of the bytes
    Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "fashion-mnist")
    parser.add_argument("--clean", default="fm-clean-cnn-s1")
    parser.add_argument("--infected", default="fm-square5-br")
    parser.add_argument("--detectors", default="ni,tabor")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trojanscan-report-screenshots"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    for kind, model_id in (("clean", args.clean), ("infected", args.infected)):
        result = scan(args.zoo, model_id, args.work, args.detectors)
        truth = ground_truth_from_manifest(args.zoo / "manifest.json", model_id)
        html = write_report(result, result.parent / "report.html", ground_truth=truth)
        png = args.out / f"report-{kind}.png"
        screenshot(html, png)
        print(f"{kind}: {model_id} -> {html} ({html.stat().st_size / 1024:.0f} KiB) -> {png}")


if __name__ == "__main__":
    main()
