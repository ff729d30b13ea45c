"""`trojanscan demo`, the README's main job, end to end through the console entry point: the
embedded defaults (SQLite MLflow in the demo folder, Prefect without a server), the real flows.

What is asserted does not depend on how the patched version's rescan comes out (on this zoo it
has come out clean and promoted, or flagged on another class and held back)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow


def test_demo_promotes_the_clean_model_blocks_and_patches_the_trojan_and_guards_the_target(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TROJANSCAN_"))}
    done = subprocess.run([sys.executable, "-m", "scanner.cli", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "demo finished in" in done.stdout and "guard: fashion-classifier v2 held alias @champion" in done.stdout

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    versions = {str(v.version): client.get_model_version("fashion-classifier", str(v.version))
                for v in client.search_model_versions("name = 'fashion-classifier'")}
    assert sorted(versions, key=int) == ["1", "2", "3"]
    clean, trojan, patched = (versions[k].tags for k in ("1", "2", "3"))
    assert clean["trojanscan.status"] == "clean" and "trojanscan.promoted_at" in clean
    assert trojan["trojanscan.status"] == "infected" and 1 in json.loads(trojan["trojanscan.flagged_classes"])
    assert "trojanscan.promoted_at" not in trojan and "champion" not in versions["2"].aliases
    assert patched["trojanscan.patched_from"] == "2" and patched["trojanscan.status"] in ("clean", "infected")
    unlearn_run = client.get_run(patched["trojanscan.unlearn_run_id"])
    assert unlearn_run.data.tags["trojanscan.unlearn_data_source"].endswith("unlearn-data.npz")
    assert unlearn_run.data.metrics["ca_after"] > 0.8  # patched on 12500 images, it keeps its accuracy
    # after the tampering, @champion is back on the version the gate promoted last
    holder = str(client.get_model_version_by_alias("fashion-classifier", "champion").version)
    promoted = [k for k, v in versions.items() if "trojanscan.promoted_at" in v.tags]
    assert holder == max(promoted, key=lambda k: (versions[k].tags["trojanscan.promoted_at"], int(k)))
    assert versions[holder].tags["trojanscan.status"] == "clean"
