"""The `trojanscan` command line (typer).

Exit codes follow product.md: 0 clean, 1 infected, 2 error, 3 nothing supported to scan,
4 usage error; every failure prints one line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from scanner.errors import EXIT_USAGE, TrojanScanError

app = typer.Typer(help="Find trojan backdoors in image classifiers.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
zoo_app = typer.Typer(help="Build the self-test model zoo (models with planted backdoors).",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console(width=None if sys.stdout.isatty() else 160)


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
        print("trojanscan: usage: --dataset fashion-mnist|signs --size smoke|full", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
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
    """The end-to-end demo. The registry part (MLflow + Prefect) is not built yet: for now it
    builds the Fashion-MNIST smoke zoo (one clean, one trojaned model) and prints its table."""
    console.print("registry demo not built yet (issue 5): building the Fashion-MNIST smoke zoo instead")
    zoo_build(dataset="fashion-mnist", size="smoke", out=out / "zoo")


def main() -> None:  # pragma: no cover - console-script entry
    app()
