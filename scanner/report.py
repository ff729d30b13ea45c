"""The HTML audit report: one self-contained file rendered from a scan's result JSON.

Everything the page needs is inside it: CSS inline, pictures as data URIs, charts as inline SVG
drawn here. No script and no network, so it can be archived, mailed and opened offline, and a
Content-Security-Policy in the page forbids both in case something slips through. Every string
that comes from the result (model names, registry tags, reasons) goes through Jinja2's
autoescaping; the only markup built in Python is the SVG chart, which escapes its own text.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template
from markupsafe import Markup, escape

from scanner.errors import TrojanScanError
from scanner.images import to_png_bytes
from scanner.metrics import correctness, mask_f1

def _templates_dir() -> Path:
    """The source tree's `templates/` (checkout, editable install), else where a wheel put them:
    `share/trojanscan/templates` beside the packages (`pip install --target`) or under the
    environment's prefix (a normal install)."""
    root = Path(__file__).resolve().parent.parent
    candidates = [root / "templates", root / "share" / "trojanscan" / "templates",
                  Path(sys.prefix) / "share" / "trojanscan" / "templates"]
    return next((c for c in candidates if (c / "report.html.j2").is_file()), candidates[0])


TEMPLATES_DIR = _templates_dir()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Artifact pictures, in the order they are shown, with their captions.
PICTURE_KINDS = {
    "mask": "restored mask",
    "pattern": "restored pattern (inside the mask)",
    "stamped": "clean image with the trigger stamped",
    "refined_mask": "refined (pruned) mask",
    "saliency": "saliency heatmap",
}
DETECTOR_NAMES = {
    "ni": "NeuronInspect",
    "tabor": "TABOR",
    "nc": "Neural Cleanse",
    "ncpp": "NC++",
    "hotspot": "Saliency hotspot",
}


class ReportError(TrojanScanError):
    """The result JSON or the ground truth cannot be turned into a report (exit code 2)."""


# ---------------------------------------------------------------- pictures

def _inside(base_dir: Path, relative: str) -> Path | None:
    """`relative` resolved under `base_dir`, or None when it would leave it (an absolute path or
    `..`): a result file must not be able to pull arbitrary files into a report."""
    base = base_dir.resolve()
    path = (base / relative).resolve()
    return path if path.is_relative_to(base) else None


def png_data_uri(base_dir: Path, relative: str | None) -> str | None:
    """The PNG at `relative` (under `base_dir`) as a data URI; None if absent or not a PNG."""
    if not relative:
        return None
    path = _inside(base_dir, relative)
    if path is None or not path.is_file():
        return None
    content = path.read_bytes()
    if not content.startswith(PNG_MAGIC):
        return None
    return "data:image/png;base64," + base64.b64encode(content).decode("ascii")


def array_data_uri(image: np.ndarray) -> str:
    """An array in [0, 1] as a 1:1 PNG data URI (the page enlarges it with pixelated CSS)."""
    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image, scale=1)).decode("ascii")


# ---------------------------------------------------------------- chart

def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def bar_chart_svg(values: list[Any], threshold: float, flagged: list[int], title: str, chart_id: str = "chart") -> Markup:
    """Anomaly index per class as an SVG bar chart with a dashed threshold line.

    Flagged bars are drawn in the alarm colour and hatched, so the chart still reads in black and
    white print. Values that are missing or not finite get no bar and an "n/a" label.
    """
    hatch = "hatch-" + "".join(c for c in chart_id if c.isalnum())  # ids must be unique in the page
    numbers = [_number(v) for v in values]
    finite = [v for v in numbers if v is not None]
    top = max([threshold * 1.15, *(v * 1.1 for v in finite)]) if finite else threshold * 1.15
    bottom = min([0.0, *(v * 1.1 for v in finite)]) if finite else 0.0
    step = max(12, min(64, 1000 // max(len(numbers), 1)))  # pixels per class
    left, right, upper, lower, height = 44, 10, 10, 36, 200
    width = left + step * len(numbers) + right

    def y(value: float) -> float:
        return upper + (top - value) / (top - bottom) * height

    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {upper + height + lower}" '
        f'width="{width}" height="{upper + height + lower}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<defs><pattern id="{hatch}" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="2" height="4" class="hatch"/></pattern></defs>',
    ]
    for tick in _ticks(bottom, top):
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    zero = y(0.0)
    for k, value in enumerate(numbers):
        x = left + k * step
        label_y = upper + height + 14
        if step >= 20 or k % 5 == 0 or k in flagged:  # narrow bars: label every fifth class and the flagged ones
            parts.append(f'<text class="tick" x="{x + step / 2:.1f}" y="{label_y}" text-anchor="middle">{k}</text>')
        if value is None:
            parts.append(f'<text class="tick" x="{x + step / 2:.1f}" y="{zero - 3:.1f}" text-anchor="middle">n/a</text>')
            continue
        bar_top, bar_bottom = sorted((y(value), zero))
        kind = "bar flagged" if k in flagged else "bar"
        parts.append(
            f'<rect class="{kind}" x="{x + 2:.1f}" y="{bar_top:.1f}" width="{step - 4:.1f}" '
            f'height="{max(bar_bottom - bar_top, 0.5):.1f}"><title>class {k}: {value:.2f}</title></rect>'
        )
        if k in flagged:
            parts.append(f'<rect class="hatched" x="{x + 2:.1f}" y="{bar_top:.1f}" width="{step - 4:.1f}" '
                         f'height="{max(bar_bottom - bar_top, 0.5):.1f}" fill="url(#{hatch})"/>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{zero:.1f}" y2="{zero:.1f}"/>')
    parts.append(f'<line class="threshold" x1="{left}" x2="{width - right}" y1="{y(threshold):.1f}" '
                 f'y2="{y(threshold):.1f}"/>')
    parts.append(f'<text class="threshold-label" x="{width - right}" y="{y(threshold) - 4:.1f}" '
                 f'text-anchor="end">threshold {threshold:g}</text>')
    parts.append(f'<text class="tick" x="{left + step * len(numbers) / 2:.1f}" y="{upper + height + 32}" '
                 f'text-anchor="middle">class</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _ticks(bottom: float, top: float) -> list[float]:
    """Four to eight round tick values covering [bottom, top]."""
    span = top - bottom
    if span <= 0:
        return [bottom]
    step = 10 ** math.floor(math.log10(span / 4))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= 8:
            step *= factor
            break
    first = math.ceil(bottom / step) * step
    return [round(first + i * step, 10) for i in range(int((top - first) / step) + 1)]


# ---------------------------------------------------------------- ground truth

def load_ground_truth(spec: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Ground truth in the zoo manifest's shape, with its .npy files read.

    `spec`: {"model_id"?, "trojaned"?, "targets": [int], "triggers": [{"target", "mask", "pattern"?}]}
    where mask/pattern are .npy paths under `base_dir` (a zoo manifest entry's `ground_truth`
    rows are exactly such triggers, relative to the manifest's folder).
    """
    triggers = []
    for row in spec.get("triggers", []):
        arrays = {}
        for key in ("mask", "pattern"):
            if row.get(key) is None:
                continue
            path = _inside(base_dir, str(row[key]))
            if path is None or not path.is_file():
                raise ReportError(f"ground-truth {key} file not found under {base_dir}: {row[key]}")
            arrays[key] = np.load(path, allow_pickle=False)
        if "mask" not in arrays:
            raise ReportError("every ground-truth trigger needs a mask")
        triggers.append({"target": int(row["target"]), **arrays})
    targets = sorted({int(t) for t in spec.get("targets", [])} | {t["target"] for t in triggers})
    return {"model_id": spec.get("model_id"), "trojaned": bool(spec.get("trojaned", bool(targets))),
            "targets": targets, "triggers": triggers}


def ground_truth_from_manifest(manifest_path: str | Path, model_id: str) -> dict[str, Any]:
    """The ground truth of one zoo model, from the zoo's manifest.json."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"cannot read the zoo manifest {manifest_path}: {error}") from error
    for entry in manifest.get("models", []):
        if entry.get("id") == model_id:
            return load_ground_truth({"model_id": model_id, "trojaned": entry.get("trojaned"),
                                      "targets": entry.get("targets", []), "triggers": entry.get("ground_truth", [])},
                                     manifest_path.parent)
    raise ReportError(f"model {model_id!r} is not in {manifest_path}")


def _truth_comparison(truth: dict[str, Any], detector: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Per true target: the true mask/pattern pictures beside the restored trigger, and mask F1
    (several triggers to one target are judged against their union, as the detection benchmark does)."""
    flagged = [int(k) for k in detector.get("flagged_classes", [])]
    rows = []
    for target in truth["targets"]:
        masks = [t["mask"] for t in truth["triggers"] if t["target"] == target]
        patterns = [t["pattern"] for t in truth["triggers"] if t["target"] == target and "pattern" in t]
        files = detector.get("artifacts", {}).get(str(target), {})
        f1 = None
        restored_path = _inside(base_dir, files["mask_npy"]) if files.get("mask_npy") else None
        if masks and restored_path is not None and restored_path.is_file():
            same_shape = all(m.shape == masks[0].shape for m in masks)
            union = np.maximum.reduce(masks) if same_shape else masks[0]
            f1 = mask_f1(np.load(restored_path, allow_pickle=False), union)
        rows.append({
            "target": target, "flagged": target in flagged, "f1": f1,
            "truth_pictures": [(f"true mask {i + 1}" if len(masks) > 1 else "true mask", array_data_uri(m))
                               for i, m in enumerate(masks)]
                              + [("true pattern", array_data_uri(p)) for p in patterns],
            "restored_pictures": [(PICTURE_KINDS[kind], png_data_uri(base_dir, files.get(kind)))
                                  for kind in ("mask", "pattern", "refined_mask", "saliency") if files.get(kind)],
        })
    verdict = correctness(flagged, truth["targets"], truth["trojaned"])
    return {"rows": rows, "correctness": verdict, "correctness_text": CORRECTNESS_TEXT[verdict]}


CORRECTNESS_TEXT = {
    "success": "caught: every true target flagged, nothing else",
    "success_extra": "caught, with extra classes flagged as well",
    "wrong_class": "missed a true target (other classes flagged)",
    "failure": "missed: nothing flagged on a trojaned model",
    "clean_pass": "clean model, nothing flagged (right)",
    "false_alarm": "clean model, but classes were flagged (false alarm)",
}


# ---------------------------------------------------------------- the page

def _detector_view(name: str, detector: dict[str, Any], threshold: float, base_dir: Path,
                   truth: dict[str, Any] | None) -> dict[str, Any]:
    indices = [_number(v) for v in detector.get("anomaly_index", [])]
    flagged = [int(k) for k in detector.get("flagged_classes", [])]
    label = DETECTOR_NAMES.get(name, name)
    attack_success = detector.get("attack_success", {}) or {}
    artifacts = detector.get("artifacts", {}) or {}

    def index_of(key: str) -> float | None:
        k = int(key) if str(key).isdigit() else -1
        return indices[k] if 0 <= k < len(indices) else None

    def shown_first(key: str) -> tuple[bool, float]:  # flagged classes first, then by anomaly index
        index = index_of(key)
        return (not (str(key).isdigit() and int(key) in flagged), -index if index is not None else math.inf)

    order = sorted(artifacts, key=shown_first)
    classes = []
    for key in order:
        files = artifacts[key]
        k = int(key) if str(key).isdigit() else None
        pictures = [(caption, png_data_uri(base_dir, files.get(kind)), files.get(kind))
                    for kind, caption in PICTURE_KINDS.items() if files.get(kind)]
        classes.append({
            "label": key, "flagged": k in flagged,
            "index": index_of(key),
            "attack_success": _number(attack_success.get(str(key))),
            "pictures": pictures,
        })
    statistics = detector.get("statistics", {}) or {}
    return {
        "name": name, "label": label, "flagged": flagged, "indices": indices,
        "max_index": _number(detector.get("max_anomaly_index")),
        "seconds": _number(detector.get("seconds")), "seed": detector.get("seed"),
        "settings": detector.get("settings", {}) or {},
        "chart": bar_chart_svg(detector.get("anomaly_index", []), threshold, flagged,
                               f"{label}: anomaly index per class, threshold {threshold:g}", chart_id=name),
        "statistics": statistics,
        "statistics_rows": [[k, *(vals[k] if k < len(vals) else None for vals in statistics.values())]
                            for k in range(len(indices))],
        "classes": classes,
        "truth": _truth_comparison(truth, detector, base_dir) if truth else None,
    }


def _unlearning_view(raw: Any) -> dict[str, Any] | None:
    """CA/ASR before and after unlearning, from either a flat dict (ca_before, ca_after,
    asr_before, asr_after) or scanner.unlearning's nested one (before/after measurements)."""
    if not isinstance(raw, dict):
        return None
    flat = ("ca_before", "ca_after", "asr_before", "asr_after")
    view: dict[str, Any] = {key: raw.get(key) for key in flat}
    view["asr_source"] = None
    before, after = raw.get("before"), raw.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        view["ca_before"] = view["ca_before"] if view["ca_before"] is not None else before.get("clean_accuracy")
        view["ca_after"] = view["ca_after"] if view["ca_after"] is not None else after.get("clean_accuracy")
        if view["asr_before"] is None and view["asr_after"] is None:
            # the real trigger's ASR when ground truth was known, else the restored triggers'
            key = "max_asr_true" if before.get("max_asr_true") is not None else "max_asr_restored"
            view["asr_before"], view["asr_after"] = before.get(key), after.get(key)
            view["asr_source"] = "real trigger" if key == "max_asr_true" else "restored triggers"
    bound = raw.get("ca_drop_bound")  # scanner.metrics.AccuracyDrop: how sure the CA change is
    view["ca_bound"] = bound if isinstance(bound, dict) and _number(bound.get("upper_bound")) is not None else None
    view["extra"] = {key: value for key, value in raw.items() if key not in flat}
    return view


@functools.cache
def _environment() -> Environment:
    """One Jinja environment per process, so the report template is compiled once (a warm
    worker compiles it before forking its scans: flows/warm_runner.py)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, digits=2: "n/a" if _number(v) is None else f"{_number(v):.{digits}f}"
    env.filters["pct"] = lambda v: "n/a" if _number(v) is None else f"{100 * _number(v):.1f}%"
    env.filters["plain"] = _plain
    return env


def report_template() -> Template:
    """The compiled report template (compiled on first use, then cached by the environment)."""
    return _environment().get_template("report.html.j2")


def _plain(value: Any) -> str:
    """A setting or tag value as short text (lists and dicts as compact JSON)."""
    if value is None:
        return "none"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def render_report(result: dict[str, Any], base_dir: Path, ground_truth: dict[str, Any] | None = None) -> str:
    """The report of one result JSON as one self-contained HTML page.

    base_dir: the folder the result's artifact paths are relative to (the JSON's folder).
    ground_truth: as returned by `load_ground_truth`/`ground_truth_from_manifest`; without it a
    `ground_truth` key in the result (same shape, paths under base_dir) is used if present.
    """
    base_dir = Path(base_dir)
    if not isinstance(result, dict):
        raise ReportError("the result JSON must be an object")
    if ground_truth is None and isinstance(result.get("ground_truth"), dict):
        ground_truth = load_ground_truth(result["ground_truth"], base_dir)
    settings = result.get("settings") or {}
    threshold = _number(settings.get("threshold")) or 2.0
    detectors = [_detector_view(name, detector, threshold, base_dir, ground_truth)
                 for name, detector in (result.get("detectors") or {}).items()]
    unlearning = _unlearning_view(result.get("unlearning"))
    verdict = str(result.get("verdict", "error"))
    context = {
        "r": result,
        "verdict": verdict if verdict in ("clean", "infected", "error") else "error",
        "model": result.get("model") or {},
        "data": result.get("data") or {},
        "registry": result.get("registry") if isinstance(result.get("registry"), dict) else None,
        "settings": settings,
        "threshold": threshold,
        "timings": result.get("timings") or {},
        "versions": result.get("versions") or {},
        "detectors": detectors,
        "truth": ground_truth,
        "unlearning": unlearning,
        "detector_names": DETECTOR_NAMES,
    }
    return report_template().render(**context)


def write_report(result_json_path: str | Path, out_html: str | Path, base_dir: str | Path | None = None,
                 ground_truth: dict[str, Any] | None = None) -> Path:
    """Render the report of a result JSON file into `out_html`; artifact paths are resolved under
    `base_dir` (default: the JSON's folder). Returns the written path."""
    result_json_path = Path(result_json_path)
    try:
        result = json.loads(result_json_path.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"cannot read the result JSON {result_json_path}: {error}") from error
    html = render_report(result, Path(base_dir) if base_dir else result_json_path.parent, ground_truth)
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(html, encoding="utf-8")
    return out_html
