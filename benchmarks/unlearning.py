"""Patching (unlearning) over the trojaned zoo models: CA and ASR before and after, true trigger.

    python benchmarks/unlearning.py [--zoo zoo/fashion-mnist] [--models ID,...] [--restore-only] [--scan-with tabor|ni]
                                    [--epochs N --share S --lr LR --validation V --finetune-images N] [--patch-clean-reference]
                                    [--jobs N] [--name unlearning]

For every trojaned model of the zoo:

1. Restoration: a TABOR scan (`scan_model(..., detectors=("tabor",), out_dir=...)`, default
   settings, seed 0, the zoo's `clean_samples.npz`, the ONNX file) whose result JSON and restored
   triggers are cached under `<zoo>/unlearning-scans/<model>-tabor-<key>/`, keyed by the model's
   sha256 and the scan settings. The detection benchmark's cache (`<zoo>/scans/`) keeps only
   table rows, no masks or patterns, so it cannot be reused.
   `--scan-with ni` scans with NeuronInspect instead, which restores nothing: the classes it
   flags get their triggers restored at patch time (`restore_missing_triggers`, as
   `unlearn_files` does in the product).
2. Patching: `scanner.unlearning.unlearn_files` on the ONNX file with the restored trigger(s) of
   the classes TABOR flagged (whatever it restored: a wrong extra class or a partial mask is
   used as it is, as a user would), the output written as ONNX again.
3. Measuring: CA on the zoo's held-out evaluation split (test[:9000], never trained on by the
   zoo model nor by the fine-tune) and ASR of every TRUE trigger (ground truth from the
   manifest's attack spec) on the same split's non-target images, before and after.
4. With `--patch-clean-reference`: the same patch (the same restored triggers, settings and
   fine-tune images, every round) applied to the never-trojaned model of the same architecture,
   and the true trigger's ASR on it after. What that leaves is the procedure's floor for that
   trigger and target: the share of images a model with no backdoor at all still puts in the
   target class once stamped, after the same fine-tune. Doubles the run time.

The fine-tune set is a seeded class-balanced subset of the zoo's clean training images (the
defender's clean training data in the TABOR paper's threat model; the poisoned copies the zoo
model was trained with are not used). Each model is patched with one thread; `--jobs N` patches N
models at once in forked processes. Writes
benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import markdown_table, write_results  # noqa: E402
from scanner import attacks  # noqa: E402
from scanner.data import CleanData  # noqa: E402
from scanner.model_io import LoadedModel, load_model  # noqa: E402
from scanner.scan import ScanSettings, scan_model  # noqa: E402
from scanner.unlearning import (  # noqa: E402
    PatchTrigger,
    TrueTrigger,
    UnlearnSettings,
    export_patched,
    flagged_without_trigger,
    load_restored_triggers,
    measure,
    restore_missing_triggers,
    unlearn,
)
from scanner.zoo import load_manifest, load_zoo_data  # noqa: E402

ASR_TARGET = 0.02
CA_DROP_TARGET = 0.01

RESTORE_SEED = 0


def restoration_dir(zoo: Path, entry: dict, settings: ScanSettings) -> Path:
    """Cache folder keyed by the model's sha256 and the settings that decide what TABOR restores
    (listed explicitly, so a new unrelated ScanSettings field does not invalidate the cache)."""
    decisive = {k: settings.model_dump(mode="json")[k] for k in ("detectors", "mode", "threshold", "seed",
                                                                  "detector_settings")}
    payload = json.dumps({"model": entry["files"]["onnx"]["sha256"], "settings": decisive}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return zoo / "unlearning-scans" / f"{entry['id']}-{'-'.join(settings.detectors)}-{key}"


def restore(zoo: Path, entry: dict, detector: str = "tabor") -> Path:
    """The scan of one zoo model whose flags the patch follows (TABOR by default), artifacts saved
    (cached); returns the result JSON path."""
    settings = ScanSettings(detectors=(detector,), seed=RESTORE_SEED, device="cpu")
    folder = restoration_dir(zoo, entry, settings)
    result_path = folder / "result.json"
    if result_path.is_file():
        return result_path
    started = time.perf_counter()
    result = scan_model(zoo / entry["files"]["onnx"]["path"], zoo / "clean_samples.npz", settings, out_dir=folder)
    result_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"{entry['id']:28s} {detector}: flagged {result.flagged_classes}, {time.perf_counter() - started:.1f} s",
          flush=True)
    return result_path


def patch_triggers(result_path: Path, loaded: LoadedModel, finetune: CleanData, seed: int) -> tuple[list[PatchTrigger], str]:
    """The restored triggers the product would unlearn: those of the flagged classes, restored at
    patch time (on the fine-tune images, as `unlearn_files`) for classes the scan restored none for
    (a NeuronInspect flag). A scan that flagged nothing would not be patched by the product; to
    still measure patching, the benchmark then uses the class with the highest anomaly index and
    says so."""
    result = json.loads(result_path.read_text())
    detector_name, detector = next(iter(result["detectors"].items()))
    if result["verdict"] == "infected":
        triggers, how = load_restored_triggers(result_path)[0], "flagged"
        missing = flagged_without_trigger(result, triggers)
    else:
        top = int(np.argmax(detector["anomaly_index"]))
        how = f"top suspect, not flagged (index {detector['anomaly_index'][top]:.2f})"
        files = detector.get("artifacts", {}).get(str(top), {})
        triggers, missing = [], {top: [detector_name]}
        if "mask_npy" in files:
            triggers = [PatchTrigger(target=top, mask=np.load(result_path.parent / files["mask_npy"]),
                                     pattern=np.load(result_path.parent / files["pattern_npy"]),
                                     source=f"{detector_name} class {top} (not flagged)")]
            missing = {}
    if missing:
        found, _ = restore_missing_triggers(loaded.module, finetune, loaded.num_classes, missing, seed)
        triggers += found
        how += f", restored for the patch: {[t.target for t in found]} of {list(missing)}"
    return triggers, how


def true_triggers(entry: dict, channels: int) -> list[TrueTrigger]:
    spec = attacks.AttackSpec(**entry["attack"])
    return [TrueTrigger(t, target) for t, target in zip(attacks.build_triggers(spec, channels), spec.targets)]


def finetune_set(train: CleanData, images: int, seed: int) -> CleanData:
    """A seeded class-balanced subset of the zoo's clean training images."""
    rng = np.random.default_rng(seed)
    classes = np.unique(train.y)
    per_class = images // len(classes)
    index = np.concatenate([rng.choice(np.flatnonzero(train.y == k), per_class, replace=False) for k in classes])
    return train.subset(np.sort(index))


def asr_parts(module, evaluation: CleanData, truths: list[TrueTrigger]) -> dict[str, float]:
    """Where a true trigger's ASR comes from, each figure the worst over the true triggers:

    - `correct_only`: ASR counted only on non-target images the model gets right without the
      trigger;
    - `no_trigger`: the share of non-target images the model puts in the target class with NO
      trigger at all (its natural confusions into that class; no patch of the trigger can take
      ASR below the part of it that stays in the target once stamped);
    - `flipped`: the share sent to the target by the trigger, i.e. put elsewhere without it.

    ASR = (images in the target both with and without the trigger) + `flipped`."""
    from scanner.training import predict

    clean_prediction = predict(module, evaluation.x)
    correct = clean_prediction == evaluation.y
    parts = {"correct_only": 0.0, "no_trigger": 0.0, "flipped": 0.0}
    for index, truth in enumerate(truths):
        keep = evaluation.y != truth.target
        triggered = attacks.triggered_set(evaluation, truth.trigger, truth.target, seed=index)
        hits = predict(module, triggered.x) == truth.target
        already = clean_prediction[keep] == truth.target
        for name, value in (("correct_only", hits[correct[keep]].mean()), ("no_trigger", already.mean()),
                            ("flipped", (hits & ~already).mean())):
            parts[name] = max(parts[name], float(value))
    return parts


def patch_row(zoo: Path, entry: dict, data, finetune: CleanData, settings: UnlearnSettings,
              references: dict[str, torch.nn.Module], out_dir: Path, detector: str = "tabor",
              patch_clean_reference: bool = False) -> dict:
    """Scan (cached), patch, measure and export one trojaned zoo model (and, when asked, patch
    the clean reference model the same way: step 4 of the module docstring)."""
    result_path = restore(zoo, entry, detector)
    truths = true_triggers(entry, data.image_shape[0])
    loaded = load_model(zoo / entry["files"]["onnx"]["path"], check_data=data.evaluation.x[:64])
    started = time.perf_counter()
    triggers, how = patch_triggers(result_path, loaded, finetune, settings.seed)
    if not triggers:  # nothing restorable: the product stops with an error; the row says so, unpatched
        return {"model_id": entry["id"], "targets": entry["targets"], "patched_with": how, "error": "no trigger"}
    outcome = unlearn(loaded.module, finetune, triggers, settings, evaluation=data.evaluation, true_triggers=truths)
    seconds = time.perf_counter() - started
    written = export_patched(outcome.module, loaded.format, out_dir / f"{entry['id']}.onnx", data.image_shape,
                             data.evaluation.x[:64])
    reference = measure(references[entry["arch"]], data.evaluation, outcome.triggers, truths)
    before, after = outcome.before, outcome.after
    parts_after = asr_parts(outcome.module, data.evaluation, truths)
    floor = {}
    if patch_clean_reference:
        clean = unlearn(references[entry["arch"]], finetune, triggers, settings, evaluation=data.evaluation,
                        true_triggers=truths)
        floor = {"asr_clean_reference_patched": clean.after.max_asr_true,
                 "no_trigger_to_target_clean_reference_patched": asr_parts(clean.module, data.evaluation,
                                                                           truths)["no_trigger"],
                 "ca_clean_reference_patched": clean.after.clean_accuracy}
    return floor | {
        "model_id": entry["id"], "arch": entry["arch"], "targets": entry["targets"],
        "flagged_classes": json.loads(result_path.read_text())["flagged_classes"], "patched_with": how,
        "triggers": [t.source for t in outcome.triggers],
        "rounds": outcome.rounds,
        "finetune_images": outcome.finetune_images, "validation_images": outcome.validation_images,
        "ca_before": before.clean_accuracy, "ca_after": after.clean_accuracy,
        "asr_before": before.max_asr_true, "asr_after": after.max_asr_true,
        "ca_drop": before.clean_accuracy - after.clean_accuracy,
        "ca_drop_upper_bound": outcome.ca_drop.upper_bound,  # paired, at settings.ca_drop_confidence
        "asr_after_per_trigger": after.asr_true,
        "asr_restored_before": before.max_asr_restored, "asr_restored_after": after.max_asr_restored,
        "asr_after_correct_only": parts_after["correct_only"],
        "no_trigger_to_target_after": parts_after["no_trigger"],
        "flipped_by_trigger_after": parts_after["flipped"],
        "asr_clean_reference": reference.max_asr_true,
        "no_trigger_to_target_clean_reference": asr_parts(references[entry["arch"]], data.evaluation,
                                                          truths)["no_trigger"],
        "export_max_abs_difference": written["max_abs_logit_difference"],
        "seconds": round(seconds, 2),
    }


_JOB: dict = {}  # what every patch of one run shares; set before the worker processes fork


def _patch_job(entry: dict) -> dict:
    torch.set_num_threads(1)
    return patch_row(_JOB["zoo"], entry, _JOB["data"], _JOB["finetune"], _JOB["settings"], _JOB["references"],
                     _JOB["out_dir"], _JOB["detector"], _JOB["patch_clean_reference"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("zoo/fashion-mnist"))
    parser.add_argument("--models", default="", help="only these model ids")
    parser.add_argument("--restore-only", action="store_true", help="only run (and cache) the TABOR restorations")
    parser.add_argument("--scan-with", choices=("tabor", "ni"), default="tabor",
                        help="the detector whose flags are patched (ni: its flagged classes get their triggers "
                             "restored at patch time, as unlearn_files does)")
    defaults = UnlearnSettings()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--validation", type=float, default=defaults.validation,
                        help="share of the fine-tune images kept to pick each round's epoch (0: the last epoch)")
    parser.add_argument("--share", type=float, default=defaults.share)
    parser.add_argument("--noise-patches", type=float, default=defaults.noise_patches,
                        help="share of fine-tune images given a uniform-noise patch (see UnlearnSettings)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--dilate", type=int, default=defaults.dilate,
                        help="grow the restored masks by this many pixels (see UnlearnSettings)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="patch rounds (see UnlearnSettings)")
    parser.add_argument("--reround-asr", default=",".join(f"{v:g}" for v in defaults.reround_attack_success),
                        help="attack successes the triggers are restored again at, comma-separated (see UnlearnSettings)")
    parser.add_argument("--finetune-images", type=int, default=20000,
                        help="clean training images fine-tuned on (the defender's clean data; 20000 of the 60000)")
    parser.add_argument("--out", type=Path, default=None, help="patched ONNX files (default: <zoo>/unlearned)")
    parser.add_argument("--name", default="unlearning", help="results file name")
    parser.add_argument("--patch-clean-reference", action="store_true",
                        help="also patch each architecture's never-trojaned model with the same triggers and report "
                             "the true trigger's ASR on it (the procedure's floor; doubles the run time)")
    parser.add_argument("--clean-reference", default="",
                        help="never-trojaned model ids to compare with, one per architecture (default: the zoo's "
                             "first clean model of each architecture)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models patched at once, each in its own process with one thread (2 on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = load_manifest(args.zoo)
    if not manifest:
        print(f"no zoo at {args.zoo}: run benchmarks/build_zoo.py --dataset fashion-mnist --size full", file=sys.stderr)
        return 2
    only = set(filter(None, args.models.split(",")))
    trojans = [e for e in manifest["models"] if e["trojaned"] and (not only or e["id"] in only)]
    if args.restore_only:
        for entry in trojans:
            restore(args.zoo, entry, args.scan_with)
        return 0
    settings = UnlearnSettings(epochs=args.epochs, share=args.share, noise_patches=args.noise_patches, lr=args.lr,
                               validation=args.validation, dilate=args.dilate,
                               seed=args.seed, rounds=args.rounds,
                               reround_attack_success=tuple(float(v) for v in args.reround_asr.split(",")))
    chosen = set(filter(None, args.clean_reference.split(",")))
    clean = [e for e in manifest["models"] if not e["trojaned"]]
    unknown = chosen - {e["id"] for e in clean}
    if unknown:
        print(f"--clean-reference: not clean models of the zoo: {sorted(unknown)}", file=sys.stderr)
        return 2
    chosen_archs = [e["arch"] for e in clean if e["id"] in chosen]
    if len(chosen_archs) != len(set(chosen_archs)):
        print("--clean-reference: give at most one model per architecture", file=sys.stderr)
        return 2
    reference_entries: dict[str, dict] = {}  # a clean model per architecture: the natural "ASR" floor
    for entry in sorted(clean, key=lambda e: e["id"] not in chosen):  # the chosen ones first (a stable sort)
        reference_entries.setdefault(entry["arch"], entry)
    reference_ids = {arch: entry["id"] for arch, entry in reference_entries.items()}
    references = {arch: load_model(args.zoo / entry["files"]["onnx"]["path"]).module
                  for arch, entry in reference_entries.items()}
    data = load_zoo_data(manifest["dataset"], manifest["size"])
    finetune = finetune_set(data.train, args.finetune_images, args.seed)
    out_dir = args.out or args.zoo / "unlearned"
    rows, failed = [], []
    if args.jobs > 1:
        for entry in trojans:  # restorations first, one at a time: they share a cache folder
            restore(args.zoo, entry, args.scan_with)
    _JOB.update(detector=args.scan_with, zoo=args.zoo, data=data, finetune=finetune, settings=settings, references=references, out_dir=out_dir,
                patch_clean_reference=args.patch_clean_reference)
    # fork: the workers inherit the loaded data and reference models instead of pickling them
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        results = pool.map(_patch_job, trojans) if args.jobs > 1 else map(_patch_job, trojans)
        for row in results:
            if "error" in row:
                failed.append(row)
                print(f"{row['model_id']:28s} not patched: {row['error']} ({row['patched_with']})", flush=True)
                continue
            rows.append(row)
            print(f"{row['model_id']:28s} CA {row['ca_before']:.4f} -> {row['ca_after']:.4f}  "
                  f"ASR {row['asr_before']:.4f} -> {row['asr_after']:.4f} (clean model {row['asr_clean_reference']:.4f}, "
                  f"correct-only {row['asr_after_correct_only']:.4f})  {row['patched_with']} {row['triggers']}  "
                  f"{row['seconds']:.0f} s", flush=True)
    summary = {
        "max_asr_after": max(r["asr_after"] for r in rows),
        "max_ca_drop": max(r["ca_drop"] for r in rows),
        "mean_asr_after": float(np.mean([r["asr_after"] for r in rows])),
        "models": len(rows),
        "asr_target_met": sum(r["asr_after"] <= ASR_TARGET for r in rows),
        "ca_target_met": sum(r["ca_drop"] <= CA_DROP_TARGET for r in rows),
        "max_ca_drop_upper_bound": max(r["ca_drop_upper_bound"] for r in rows),
        "ca_target_met_by_upper_bound": sum(r["ca_drop_upper_bound"] <= CA_DROP_TARGET for r in rows),
        "max_asr_after_correct_only": max(r["asr_after_correct_only"] for r in rows),
        "max_asr_clean_reference": max(r["asr_clean_reference"] for r in rows),
        "max_flipped_by_trigger_after": max(r["flipped_by_trigger_after"] for r in rows),
        "models_no_trigger_above_asr_target": sum(r["no_trigger_to_target_after"] > ASR_TARGET for r in rows),
        "targets": {"asr_after": ASR_TARGET, "ca_drop": CA_DROP_TARGET},
    }
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    table = markdown_table(
        ["model", "targets", "flagged", "CA before", "CA after", "CA drop", "CA drop bound", "ASR before", "ASR after",
         "ASR after (correct only)", "no trigger -> target after", "flipped by trigger after", "clean-model ASR",
         "clean model no trigger -> target", "restored-trigger ASR after", "seconds"],
        [[r["model_id"], r["targets"], r["flagged_classes"], pct(r["ca_before"]), pct(r["ca_after"]),
          pct(r["ca_drop"]), pct(r["ca_drop_upper_bound"]), pct(r["asr_before"]), pct(r["asr_after"]),
          pct(r["asr_after_correct_only"]),
          pct(r["no_trigger_to_target_after"]), pct(r["flipped_by_trigger_after"]), pct(r["asr_clean_reference"]),
          pct(r["no_trigger_to_target_clean_reference"]), pct(r["asr_restored_after"]), f"{r['seconds']:.0f}"]
         for r in rows])
    table += (f"\n\nAll figures in %, true trigger(s), measured on {len(data.evaluation)} held-out test images; "
              f"fine-tuned on {rows[0]['finetune_images']} of {len(finetune)} clean training images "
              f"({rows[0]['validation_images']} kept to pick each round's epoch) with {settings.model_dump()}.\n\n"
              f"Summary: max ASR after {pct(summary['max_asr_after'])}% (target <= {pct(ASR_TARGET)}), "
              f"{summary['asr_target_met']}/{len(rows)} models meet it; max CA drop {pct(summary['max_ca_drop'])} "
              f"points (target <= {pct(CA_DROP_TARGET)}), {summary['ca_target_met']}/{len(rows)} meet it; "
              f"{summary['ca_target_met_by_upper_bound']}/{len(rows)} meet it by the drop's one-sided "
              f"{settings.ca_drop_confidence:.0%} upper bound ('CA drop bound', paired on the same images; max "
              f"{pct(summary['max_ca_drop_upper_bound'])}).\n\n"
              f"'no trigger -> target': non-target images put in the target class with no trigger at all (worst "
              f"target); {summary['models_no_trigger_above_asr_target']}/{len(rows)} patched models are above the ASR "
              f"target on that alone. 'flipped by trigger': images the trigger sends to the target that go elsewhere "
              f"without it; worst {pct(summary['max_flipped_by_trigger_after'])}%.")
    table += f"\n\nClean reference model per architecture: {reference_ids}."
    if args.patch_clean_reference:
        table += ("\n\nThe same patch applied to the never-trojaned model of each architecture (its triggers, settings, "
                  "fine-tune images and rounds), true-trigger ASR after, % (no trigger -> target; CA after): " + "; ".join(
                      f"{r['model_id']} {pct(r['asr_clean_reference_patched'])} "
                      f"({pct(r['no_trigger_to_target_clean_reference_patched'])}; {pct(r['ca_clean_reference_patched'])})"
                      for r in rows)
                  + f". Models whose patched ASR is at or under this floor: "
                  f"{sum(r['asr_after'] <= r['asr_clean_reference_patched'] for r in rows)}/{len(rows)}.")
    if args.scan_with != "tabor":
        table += f"\n\nPatched from the flags of a `{args.scan_with}` scan (seed {RESTORE_SEED}); triggers: " + "; ".join(
            f"{r['model_id']} {r['patched_with']}" for r in rows)
    if failed:
        table += "\n\nNot patched (no trigger restored): " + ", ".join(
            f"{r['model_id']} ({r['patched_with']})" for r in failed)
    path = write_results(args.name, {"zoo": str(args.zoo), "settings": settings.model_dump(),
                                     "finetune_images": len(finetune), "evaluation_images": len(data.evaluation),
                                     "scan_with": args.scan_with, "clean_references": reference_ids, "rows": rows, "not_patched": failed,
                                     "summary": summary}, table)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
