"""Copy what detection.py and speed.py read of a zoo (manifest, clean samples, ONNX files,
ground-truth masks; no .pt2) to .gpu/zoo/<dataset>, the folder a GPU-machine run carries
(see benchmarks/on_device.sh).

    python benchmarks/copy_zoo_for_device.py signs
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def copy_zoo(dataset: str, zoo_root: Path = Path("zoo"), out_root: Path = Path(".gpu/zoo")) -> int:
    source, target = zoo_root / dataset, out_root / dataset
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    for name in ["manifest.json", "clean_samples.npz"] + [
        path for entry in manifest["models"]
        for path in [entry["files"]["onnx"]["path"], *(g["mask"] for g in entry.get("ground_truth", []))]
    ]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, target / name)
    return len(manifest["models"])


if __name__ == "__main__":
    print(copy_zoo(sys.argv[1]), "models copied")
