"""The `trojanscan` command line (typer).

Exit codes follow product.md: 0 clean, 1 infected, 2 error, 3 nothing supported to scan,
4 usage error; every failure prints one line on stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import typer
import typer.exceptions
from rich.console import Console
from rich.table import Table

from scanner.errors import EXIT_CLEAN, EXIT_ERROR, EXIT_INFECTED, EXIT_USAGE, DataError, TrojanScanError

app = typer.Typer(help="Find trojan backdoors in image classifiers.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
zoo_app = typer.Typer(help="Build the self-test model zoo (models with planted backdoors).",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console(width=None if sys.stdout.isatty() else 160)


def usage(message: str) -> None:
    """A usage error: one line on stderr, exit code 4."""
    print(f"trojanscan: usage: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)


def fail(error: TrojanScanError) -> None:
    """Print a one-line reason on stderr and exit with the error's code."""
    print(f"trojanscan: error: {error}", file=sys.stderr)
    raise typer.Exit(error.exit_code)


def zoo_table(manifest: dict[str, Any]) -> Table:
    """The zoo as a table: model, architecture, attack, target(s), CA, ASR, seconds."""
    table = Table(title=f"zoo {manifest['dataset']} ({manifest['size']})")
    for column in ("model", "arch", "attack", "targets", "CA", "ASR", "seconds"):
        table.add_column(column, justify="right" if column in ("CA", "ASR", "seconds") else "left")
    for entry in manifest["models"]:
        table.add_row(
            entry["id"], entry["arch"], describe_attack(entry["attack"]),
            ",".join(map(str, entry["targets"])) or "-",
            f"{entry['clean_accuracy']:.4f}",
            "-" if entry["attack_success_rate"] is None else f"{entry['attack_success_rate']:.4f}",
            f"{entry['seconds']:.0f}",
        )
    return table


def describe_attack(attack: dict[str, Any] | None) -> str:
    if attack is None:
        return "clean"
    parts = []
    for trigger in attack["triggers"]:
        position = trigger["position"] if isinstance(trigger["position"], str) else "@" + ",".join(map(str, trigger["position"]))
        blend = f" a={trigger['alpha']:g}" if trigger["alpha"] < 1 else ""
        parts.append(f"{trigger['shape']} {trigger['size']}px {position}{blend}")
    return " + ".join(parts) + f" (poison {attack['poison_rate']:g})"


@zoo_app.command("build")
def zoo_build(
    dataset: str = typer.Option(..., help="fashion-mnist or signs"),
    size: str = typer.Option("smoke", help="smoke (2 models, seconds) or full"),
    out: Path = typer.Option(..., help="output folder (resumable)"),
) -> None:
    """Train the zoo's clean and trojaned models and write manifest.json."""
    from scanner.zoo import build_zoo

    if dataset not in ("fashion-mnist", "signs") or size not in ("smoke", "full"):
        usage("--dataset fashion-mnist|signs --size smoke|full")
    try:
        manifest = build_zoo(dataset, size, out, progress=lambda message: console.print(message, highlight=False))  # type: ignore[arg-type]
    except TrojanScanError as error:
        fail(error)
    console.print(zoo_table(manifest))
    for line in manifest["quality_failures"]:
        console.print(f"[red]below target:[/red] {line}")
    console.print(f"manifest: {Path(out) / 'manifest.json'}")


@app.command()
def demo(out: Path = typer.Option(Path("trojanscan-demo"), help="folder for everything the demo writes")) -> None:
    """The end-to-end demo on the embedded defaults (SQLite MLflow, Prefect without a server):
    register a clean and a trojaned model, request their promotion, let the real flows gate them."""
    from flows.demo import run_demo  # sets its environment before it imports Prefect

    try:
        summary = run_demo(out, say=lambda message: console.print(message, highlight=False))
    except TrojanScanError as error:
        fail(error)
    table = Table(title="fashion-classifier in the registry")
    for column in ("version", "status", "flagged", "aliases", "scan run", "report"):
        table.add_column(column)
    reports = {}
    for step in summary["steps"]:
        for outcome in step["outcomes"]:
            reports[outcome.get("version")] = outcome.get("result_dir")
            rescan = (outcome.get("unlearning") or {}).get("rescan") or {}
            if rescan.get("version"):
                reports[rescan["version"]] = rescan.get("result_dir")
    for version, state in summary["versions"].items():
        tags = state["tags"]
        report = reports.get(version)
        table.add_row(version, tags.get("trojanscan.status", "-"), tags.get("trojanscan.flagged_classes", "-"),
                      ", ".join("@" + a for a in state["aliases"]) or "-", tags.get("trojanscan.scan_run_id", "-"),
                      f"{report}/report.html" if report else "-")
    console.print(table)
    console.print(f"demo finished in {summary['seconds']:.0f} s. Look at it with:", highlight=False)
    console.print(f"  mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000", highlight=False)


webhook_app = typer.Typer(help="MLflow webhooks that reach the receiver.", no_args_is_help=True)
app.add_typer(webhook_app, name="webhook")


def _secret(env_name: str) -> str:
    import os

    secret = os.environ.get(env_name, "")
    if not secret:
        usage(f"set the webhook secret in the environment variable {env_name}")
    return secret


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8686, help="port"),
    secret_env: str = typer.Option("TROJANSCAN_WEBHOOK_SECRET", help="environment variable holding the secret"),
    replay_db: Path = typer.Option(Path("trojanscan-deliveries.sqlite"), help="seen delivery ids (survives restarts)"),
    policy: Path = typer.Option(None, envvar="TROJANSCAN_POLICY",
                                help="the flows' policy: with it, the gate's own promotions (the target alias set on "
                                     "a clean version) are acknowledged without starting a flow run"),
    tracking_uri: str = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="the MLflow server (with --policy)"),
) -> None:
    """Receive MLflow webhooks (POST /webhooks/mlflow) and emit Prefect events for them."""
    import uvicorn

    from scanner.prefect_events import emit_delivery
    from scanner.receiver import create_app
    from scanner.webhooks import ReplayGuard

    settled = None
    if policy is not None:
        settled = _settled_check(policy, tracking_uri)
    app_ = create_app(_secret(secret_env), emit_delivery, ReplayGuard(replay_db), settled=settled)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def _settled_check(policy_path: Path, tracking_uri: str | None) -> Any:
    """The receiver's check for deliveries that need no flow run (scanner.gate.settled_promotion).
    Its registry reads give up fast: a slow or absent MLflow only means the delivery is emitted."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from scanner.gate import settled_promotion
    from scanner.policy import load_policy
    from scanner.registry import Registry

    try:
        load_policy(policy_path)  # a bad policy stops the receiver at start, not at the first delivery
    except TrojanScanError as error:
        fail(error)
    registry = Registry(tracking_uri)
    cached: dict[str, Any] = {}

    def current_policy() -> Any:
        """The policy as the next flow run would read it (reloaded when the file changes)."""
        stamp = policy_path.stat().st_mtime_ns
        if cached.get("stamp") != stamp:
            cached.update(stamp=stamp, policy=load_policy(policy_path))
        return cached["policy"]

    def settled(delivery: Any) -> str | None:
        data = delivery.data
        return settled_promotion(registry, current_policy(), delivery.event_name, str(data.get("name", "")),
                                 str(data.get("version", "")), data.get("alias"))

    return settled


@webhook_app.command("register")
def webhook_register(
    url: str = typer.Option(..., help="the receiver's URL, e.g. https://scanner.example.com/webhooks/mlflow"),
    tracking_uri: str = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="the MLflow server"),
    name: str = typer.Option("trojanscan", help="webhook name"),
    secret_env: str = typer.Option("TROJANSCAN_WEBHOOK_SECRET", help="environment variable holding the secret"),
) -> None:
    """Create the MLflow webhook for new versions and alias changes (stage moves have no webhook:
    the watcher polls for those)."""
    from scanner.registry import Registry

    if not tracking_uri or not tracking_uri.startswith("http"):
        usage("webhooks need a running MLflow server: pass --tracking-uri http://HOST:PORT")
    registry = Registry(tracking_uri)
    try:
        hook = registry._call("creating the webhook", registry.client.create_webhook, name=name, url=url,
                              events=["model_version.created", "model_version_alias.created"],
                              secret=_secret(secret_env), description="trojanscan: scan on promotion")
    except TrojanScanError as error:
        fail(error)
    console.print(f"webhook {hook.webhook_id} -> {url}", highlight=False)


@app.command()
def watch(
    once: bool = typer.Option(False, "--once", help="poll once and exit"),
    interval: float = typer.Option(60.0, help="seconds between polls"),
    dispatch: str = typer.Option("inline", help="inline (scan here) or deployment (hand to the scan deployment)"),
) -> None:
    """Run the registry watcher: guard the target, scan every version waiting for a scan."""
    import time

    from flows.watcher import registry_watcher

    if dispatch not in ("inline", "deployment"):
        usage("--dispatch inline|deployment")
    while True:
        report = registry_watcher(dispatch=dispatch)
        for outcome in report["outcomes"]:
            console.print(f"{outcome.get('name')} v{outcome.get('version')}: {outcome.get('status', 'dispatched')}",
                          highlight=False)
        if once:
            return
        time.sleep(interval)


@app.command()
def worker(
    cold: bool = typer.Option(False, "--cold", help="start every scan in a fresh interpreter (Prefect's runner) "
                              "instead of forking it from this warm process (TROJANSCAN_WORKER_WARM=0)"),
) -> None:
    """Serve the flows as deployments from this process (no work pool needed): scan-model-version
    with its event triggers, registry-watcher every minute, scan-file and unlearn-retrain."""
    from flows.serve import serve_all

    serve_all(warm=False if cold else None)


def _float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        usage(f"{option} takes comma-separated numbers, got {text!r}")


def print_summary(result: Any) -> None:
    """The human summary on stdout: verdict, reasons, per-detector anomaly indices."""
    colour = {"clean": "green", "infected": "red", "error": "yellow"}[result.verdict]
    console.print(f"[bold {colour}]{result.verdict.upper()}[/] {result.model['reference']}", highlight=False)
    for reason in result.reasons:
        console.print(f"  - {reason}", highlight=False)
    for name, detection in result.detections.items():
        indices = " ".join(f"{k}:{v:.2f}" for k, v in enumerate(detection.anomaly_index))
        console.print(f"  {name:6s} {detection.seconds:7.1f} s  anomaly index per class  {indices}", highlight=False)


@app.command()
def scan(
    model: str = typer.Argument(..., help="model file (.onnx, .pt2; pickles need --allow-pickle)"),
    data: Path = typer.Option(None, "--data", help="clean data npz with x (N,C,H,W float32 in [0,1]) and y (N int64)"),
    detectors: str = typer.Option("ni,tabor", help="comma-separated: ni, tabor, nc, ncpp, hotspot"),
    mode: str = typer.Option("full", help="full, or fast (NeuronInspect ranks, TABOR restores the suspects)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    precision: str = typer.Option("auto", help="the model's arithmetic while restoring triggers: auto (bf16 where the "
                                  "device has bfloat16 arithmetic, fp32 elsewhere), fp32 or bf16"),
    json_path: Path = typer.Option(None, "--json", help="write the result JSON here"),
    out: Path = typer.Option(None, help="folder for restored triggers and saliency pictures (default: beside --json)"),
    seed: int = typer.Option(0, help="seed of every random choice (recorded)"),
    threshold: float = typer.Option(None, help="anomaly index at or above which a class is flagged "
                                              "(default: each detector's own, 2; hotspot 3)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="trust and unpickle a pickled model (runs its code)"),
    mean: str = typer.Option(None, help="per-channel mean the model expects, e.g. 0.485,0.456,0.406"),
    std: str = typer.Option(None, help="per-channel std the model expects"),
    min_images_per_class: int = typer.Option(5, help="clean images every class needs"),
    min_clean_accuracy: float = typer.Option(None, help="accuracy the model must reach on the clean data "
                                             "[default: max(2 x chance, 0.5)]; lower data is probably another model's"),
) -> None:
    """Scan one model for trojan backdoors. Exit 0 clean, 1 infected, 2 error, 3 unsupported, 4 usage."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from scanner.scan import ScanSettings

    from scanner.detectors import DETECTORS
    from scanner.detectors.restoration import RestorationSettings

    names = tuple(n.strip() for n in detectors.split(",") if n.strip())
    unknown = sorted(set(names) - set(DETECTORS))
    if unknown or not names:
        usage(f"--detectors takes names from {sorted(DETECTORS)}, got {detectors!r}")
    if mode not in ("full", "fast"):
        usage(f"--mode must be full or fast, got {mode!r}")
    if mode == "fast":
        from scanner.cascade import CascadeUsageError, choose_ranker

        try:
            choose_ranker(names)
        except CascadeUsageError as error:
            usage(str(error))
    precisions = get_args(RestorationSettings.model_fields["precision"].annotation)
    if precision not in precisions:
        usage(f"--precision must be one of {', '.join(precisions)}, got {precision!r}")
    restoring = {name: {"precision": precision} for name in names
                 if issubclass(DETECTORS[name].settings_model, RestorationSettings)}
    means, stds = _float_list(mean, "--mean"), _float_list(std, "--std")
    if (means is None) != (stds is None):
        usage("--mean and --std go together")
    try:
        settings = ScanSettings(detectors=names, mode=mode, device=device, seed=seed,
                                **({} if threshold is None else {"threshold": threshold}),
                                **({"detector_settings": restoring} if precision != "auto" else {}),
                                min_images_per_class=min_images_per_class, min_clean_accuracy=min_clean_accuracy)
    except ValueError as error:
        usage(str(error).splitlines()[0])
    out_dir = out or (json_path.parent if json_path else None)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} classes"),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    tasks: dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        if not tasks:  # shown from the first detector's progress on, not while downloading or loading
            bar.start()
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total)
        bar.update(tasks[name], completed=done, total=total)

    try:
        outcome = scan_outcome(model, data, settings, out_dir=out_dir, allow_pickle=allow_pickle,
                               normalization=(means, stds) if means is not None else None, progress=progress)
    finally:
        bar.stop()
    if outcome.message is not None:  # an error or an unsupported file: no summary, one line
        if json_path:
            _write_json(json_path, outcome.result.to_json())
            console.print(_report_beside(json_path, None), highlight=False)
        print(outcome.message, file=sys.stderr)
        raise typer.Exit(outcome.exit_code)
    print_summary(outcome.result)
    if json_path:
        _write_json(json_path, outcome.result.to_json())
        console.print(f"result: {json_path}", highlight=False)
        console.print(_report_beside(json_path, out_dir), highlight=False)
    raise typer.Exit(outcome.exit_code)


@dataclass
class ScanOutcome:
    """What `trojanscan scan` ends with: its exit code, the one line it prints on stderr (None
    for a finished scan, whose summary goes to stdout) and the result it writes with --json."""

    exit_code: int
    message: str | None
    result: Any  # scanner.scan.ScanResult; an `error` result when the scan did not finish


def scan_outcome(model: str, data: Path | None, settings: Any, *, out_dir: Path | None = None,
                 allow_pickle: bool = False, normalization: tuple[list[float], list[float]] | None = None,
                 progress: Any = None) -> ScanOutcome:
    """Everything `trojanscan scan` does between parsing its options and printing: fetch a
    `models:/` version, load the model and data, scan, and map every failure to its exit code and
    one line. Separate from the command so tests can run many files through it in one process."""
    from scanner.scan import error_result, scan_model

    try:
        if model.startswith("models:/"):
            model, data = _fetch_registry_model(model, data, allow_pickle)
        if data is None:
            raise DataError("no clean data: pass --data CLEAN.npz (a scan never runs without clean images)")
        result = scan_model(model, data, settings, out_dir=out_dir, allow_pickle=allow_pickle,
                            normalization=normalization, progress=progress)
    except TrojanScanError as error:
        reason = str(error)
        return ScanOutcome(error.exit_code, f"trojanscan: error: {reason}",
                           error_result(reason, model, str(data) if data else None, settings))
    except Exception as error:  # a bug or an unforeseen input: still one line, still an error
        reason = f"scan failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        return ScanOutcome(EXIT_ERROR, f"trojanscan: error: {reason}",
                           error_result(reason, model, str(data) if data else None, settings))
    return ScanOutcome(EXIT_INFECTED if result.verdict == "infected" else EXIT_CLEAN, None, result)


def _fetch_registry_model(uri: str, data: Path | None, allow_pickle: bool) -> tuple[str, Path | None]:
    """Download a `models:/` version (and, without --data, its clean data) to a temporary folder."""
    from scanner.registry import Registry, temporary_folder

    registry = Registry()
    info = registry.resolve(uri)
    folder = temporary_folder("trojanscan-")
    downloaded = registry.download_model(info, folder / "model", allow_pickle=allow_pickle)
    if data is None:
        data, reference = registry.resolve_clean_data(info, None, folder / "data")
        console.print(f"{uri} is {info.uri}; clean data from {reference}", highlight=False)
    return str(downloaded.model_file), data


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _report_beside(json_path: Path, artifacts: Path | None) -> str:
    """Write report.html beside the result JSON; return where, or why not. The verdict is already
    decided and written, so a failed rendering never changes the scan's exit code."""
    from scanner.report import write_report

    try:
        return f"report: {write_report(json_path, json_path.parent / 'report.html', base_dir=artifacts)}"
    except Exception as error:  # noqa: BLE001  (any rendering failure is reported, not raised)
        return f"report not written: {type(error).__name__}: {error}"


@app.command()
def report(
    result_json: Path = typer.Argument(..., help="a result JSON written by `trojanscan scan --json`"),
    out: Path = typer.Option(None, "--out", help="HTML file to write (default: report.html beside the JSON)"),
    artifacts: Path = typer.Option(None, help="folder the result's picture paths are relative to (default: the JSON's folder)"),
    ground_truth: Path = typer.Option(None, "--ground-truth", help="zoo manifest.json: show the true trigger and mask F1"),
    model_id: str = typer.Option(None, "--model-id", help="the scanned model's id in the --ground-truth manifest"),
) -> None:
    """Render the self-contained HTML audit report of a scan result (no network, no script)."""
    from scanner.report import ground_truth_from_manifest, write_report

    if (ground_truth is None) != (model_id is None):
        usage("--ground-truth and --model-id go together")
    try:
        truth = ground_truth_from_manifest(ground_truth, model_id) if ground_truth else None
        path = write_report(result_json, out or result_json.parent / "report.html", base_dir=artifacts,
                            ground_truth=truth)
    except TrojanScanError as error:
        fail(error)
    console.print(f"report: {path}", highlight=False)


@app.command()
def unlearn(
    model: Path = typer.Argument(..., help="the infected model (.onnx or .pt2) that was scanned"),
    data: Path = typer.Option(..., "--data", help="clean data npz (x, y); a share per class is held out for measuring"),
    result: Path = typer.Option(..., "--result", help="the scan's result JSON (verdict infected, restored triggers)"),
    out: Path = typer.Option(..., "--out", help="where to write the patched model (same format as MODEL)"),
    epochs: int = typer.Option(None, help="fine-tune epochs [default: UnlearnSettings']"),
    share: float = typer.Option(None, help="share of fine-tune images stamped with a restored trigger (true labels kept)"),
    noise_patches: float = typer.Option(None, help="share of fine-tune images given a random patch of uniform noise "
                                                   "instead (true labels kept)"),
    lr: float = typer.Option(None, help="Adam learning rate"),
    dilate: int = typer.Option(None, help="grow the restored triggers' masks by this many pixels before stamping"),
    rounds: int = typer.Option(None, help="patch rounds: later rounds restore the targets' triggers again on the "
                                          "patched model and unlearn those that still work"),
    validation: float = typer.Option(None, help="share of the fine-tune images kept to pick each round's epoch, "
                                                "used when it comes to 1000 images or more; 0 keeps the last epoch"),
    seed: int = typer.Option(0, help="seed of the split, the stamping and the batches"),
    json_path: Path = typer.Option(None, "--json", help="write the before/after metrics here"),
) -> None:
    """Patch an infected model by unlearning its restored triggers. Exit 0 done, 2 error, 4 usage."""
    from scanner.unlearning import UnlearnSettings, unlearn_files

    try:
        given = {"epochs": epochs, "share": share, "noise_patches": noise_patches, "lr": lr, "rounds": rounds,
                 "validation": validation, "dilate": dilate}
        settings = UnlearnSettings(seed=seed, **{k: v for k, v in given.items() if v is not None})
    except ValueError as error:
        usage(" ".join(str(error).split())[:200])
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("loading", total=100)

    def progress(fraction: float, text: str) -> None:
        bar.update(task, completed=100 * fraction, description=text)

    try:
        with bar:
            outcome = unlearn_files(model, data, result, out, settings, progress=progress)
    except TrojanScanError as error:
        fail(error)
    before, after = outcome.before, outcome.after
    console.print(f"patched {model} -> {out} ({outcome.output['format']}); triggers: "
                  + ", ".join(t.source for t in outcome.triggers), highlight=False)
    console.print(f"measured on {outcome.measured_images} images ({outcome.measured_on}); "
                  f"fine-tuned on {outcome.finetune_images}"
                  + (f", {outcome.validation_images} picking the epochs" if outcome.validation_images else ""),
                  highlight=False)
    bound = outcome.ca_drop
    console.print(f"  CA  {before.clean_accuracy:.4f} -> {after.clean_accuracy:.4f} (drop at most "
                  f"{bound.upper_bound:+.4f} at {bound.confidence:.0%} confidence: {bound.worse} images worse, "
                  f"{bound.better} better)", highlight=False)
    console.print(f"  ASR {before.max_asr_restored:.4f} -> {after.max_asr_restored:.4f} (restored trigger, worst)",
                  highlight=False)
    if json_path:
        _write_json(json_path, outcome.to_json())
        console.print(f"metrics: {json_path}", highlight=False)


def main() -> None:
    """Console-script entry: maps click's usage errors to exit code 4 with one line on stderr."""
    try:
        code = app(standalone_mode=False)
    except typer.exceptions.TyperException as error:  # typer's own click: parsing and usage errors
        text = error.format_message() if hasattr(error, "format_message") else str(error)
        print(f"trojanscan: usage: {(text.strip() or 'no command given; see --help').splitlines()[0]}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
