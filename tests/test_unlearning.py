"""Unlearning on the Fashion-MNIST smoke zoo's trojan (4x4 white square, bottom-right, target 7).

The restored trigger comes from a real, short TABOR restoration on the trojan's ONNX file (run
once per module); ASR with the TRUE trigger is measured on test images neither the
zoo model nor the fine-tune saw."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scanner import attacks, unlearning
from scanner.data import CleanData
from scanner.errors import DataError
from scanner.fashion_mnist import load_fashion_mnist
from scanner.model_io import load_model
from scanner.detectors.base import DetectionResult, RestoredTrigger
from scanner.detectors.restoration import restore_triggers
from scanner.detectors.tabor import TaborSettings, tabor_extra_terms, tabor_regularizers
from scanner.scan import ScanResult, ScanSettings, save_artifacts
from scanner.unlearning import (
    PatchTrigger,
    TrueTrigger,
    UnlearnSettings,
    dilated,
    export_patched,
    fine_tune,
    flagged_without_trigger,
    load_restored_triggers,
    noise_patched,
    restore_again,
    split_held_out,
    unlearn,
    unlearn_files,
    validation_error,
)

RESTORE_STEPS = 200  # a short TABOR restoration of the target class: ~4 s on one core


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanner.cli", *args], capture_output=True, text=True, timeout=600)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def smoke(fm_smoke_zoo, tmp_path_factory):
    """(zoo folder, trojan manifest entry, result JSON of its ONNX file, test images).

    A full TABOR scan costs minutes on a shared 2-core machine, so the result is built from a
    short real TABOR restoration of the target class only (eqs. 2-3, `RESTORE_STEPS` steps) and
    written by the scanner's own result writer (`ScanResult.to_json`, `save_artifacts`). It has
    no anomaly statistics (index 0 everywhere); unlearning reads only the verdict, the flagged
    classes, the restored arrays and the model's sha256."""
    zoo, manifest = fm_smoke_zoo
    trojan = next(entry for entry in manifest["models"] if entry["trojaned"])
    target = trojan["targets"][0]
    model_path = zoo / trojan["files"]["onnx"]["path"]
    clean = CleanData.load_npz(zoo / "clean_samples.npz")
    loaded = load_model(model_path, check_data=clean.x[:8])
    s = TaborSettings(max_steps=RESTORE_STEPS)
    outcome = restore_triggers(
        loaded.module, clean.x, clean.y, 10, s, seed=0, device=torch.device("cpu"), slots=1,
        size_penalty=lambda mask, pattern: tabor_regularizers(mask, pattern, s),
        extra_terms=lambda x, y, mask, pattern, t: tabor_extra_terms(x, y, mask, pattern, t, s),
        classes=[target])
    assert outcome.reached[target] and outcome.attack_success[target] >= 0.9
    trigger = RestoredTrigger(mask=outcome.masks[target], pattern=outcome.patterns[target],
                              attack_success=float(outcome.attack_success[target]))
    detection = DetectionResult(detector="tabor", anomaly_index=np.zeros(10), flagged_classes=[target], statistics={},
                                settings=s.model_dump(), seed=0, seconds=0.0, triggers={target: trigger},
                                notes={"test": f"short restoration of class {target} only"})
    result = ScanResult(model={"reference": str(model_path), "sha256": loaded.sha256, "normalization": None},
                        data={"reference": str(zoo / "clean_samples.npz")}, settings=ScanSettings(detectors=("tabor",)),
                        detections={"tabor": detection}, verdict="infected", reasons=[f"tabor flags class {target}"])
    out = tmp_path_factory.mktemp("unlearn-scan")
    save_artifacts(result, clean, out)
    (out / "result.json").write_text(json.dumps(result.to_json()))
    return zoo, trojan, out / "result.json", load_fashion_mnist("test")


def finetune_and_evaluation(test: CleanData) -> tuple[CleanData, CleanData]:
    """1500 test images to fine-tune on, 2000 others to measure on (the smoke zoo trained on the
    train split and keeps test[9000:] for its clean samples)."""
    return test.subset(slice(0, 1500)), test.subset(slice(1500, 3500))


def true_triggers(entry: dict) -> list[TrueTrigger]:
    spec = attacks.AttackSpec(**entry["attack"])
    return [TrueTrigger(t, target) for t, target in zip(attacks.build_triggers(spec, 1), spec.targets)]


SETTINGS = UnlearnSettings(epochs=3, share=0.3, lr=1e-3)


def test_onnx_model_is_patched_and_written_as_onnx(smoke, tmp_path):
    zoo, trojan, result_json, test = smoke
    train, evaluation = finetune_and_evaluation(test)
    out = tmp_path / "patched.onnx"
    outcome = unlearn_files(zoo / trojan["files"]["onnx"]["path"], train, result_json, out, SETTINGS,
                            evaluation=evaluation, true_triggers=true_triggers(trojan))
    assert outcome.before.max_asr_true >= 0.9
    assert outcome.after.max_asr_true <= 0.1, outcome.to_json()
    assert outcome.after.max_asr_restored <= 0.1
    assert outcome.after.clean_accuracy >= outcome.before.clean_accuracy - 0.02
    reloaded = load_model(out, check_data=evaluation.x[:16])
    assert reloaded.format == "onnx" and outcome.output["format"] == "onnx"
    assert reloaded.sha256 != trojan["files"]["onnx"]["sha256"]
    with torch.no_grad():
        x = torch.from_numpy(evaluation.x[:32])
        assert np.allclose(reloaded.module(x).numpy(), outcome.module(x).numpy(), atol=1e-4)


def test_pt2_program_trains_and_is_written_as_pt2(smoke, tmp_path):
    zoo, trojan, result_json, test = smoke
    train, evaluation = finetune_and_evaluation(test)
    loaded = load_model(zoo / trojan["files"]["pt2"]["path"], check_data=train.x[:8])
    assert loaded.format == "pt2"
    with pytest.raises(NotImplementedError):
        loaded.module.inner.eval()  # a torch.export module refuses it; unlearning must not need it
    triggers, _ = load_restored_triggers(result_json)
    before_weights = [p.clone() for p in loaded.module.parameters()]
    outcome = unlearn(loaded.module, train, triggers, SETTINGS, evaluation=evaluation,
                      true_triggers=true_triggers(trojan))
    assert all(torch.equal(a, b) for a, b in zip(before_weights, loaded.module.parameters())), "input was modified"
    changed = [not torch.equal(a, b) for a, b in zip(before_weights, outcome.module.parameters())]
    assert len(changed) >= 4 and all(changed), "every weight of the exported program should train"
    assert outcome.before.max_asr_true >= 0.9 and outcome.after.max_asr_true <= 0.1
    assert outcome.after.clean_accuracy >= outcome.before.clean_accuracy - 0.02
    written = export_patched(outcome.module, "pt2", tmp_path / "patched.pt2", (1, 28, 28), evaluation.x[:32])
    reloaded = load_model(tmp_path / "patched.pt2", check_data=evaluation.x[:8])
    assert written["format"] == reloaded.format == "pt2"
    with torch.no_grad():
        x = torch.from_numpy(evaluation.x[:64])
        assert np.allclose(reloaded.module(x).numpy(), outcome.module(x).numpy(), atol=1e-4)


def test_restoring_again_on_the_infected_model_keeps_a_small_working_trigger(smoke):
    """The re-restoration of later rounds, on a model whose backdoor still works: Neural
    Cleanse's restoration finds a trigger for the target that reaches the threshold with a mask
    within the growth limit, and returns it as a new trigger of that class."""
    zoo, trojan, result_json, test = smoke
    train, _ = finetune_and_evaluation(test)
    triggers, _ = load_restored_triggers(result_json)
    loaded = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=train.x[:8])
    target = trojan["targets"][0]
    found, report = restore_again(loaded.module, train, triggers, round_number=2, seed=0)
    entry = report["classes"][str(target)]
    assert report["round"] == 2 and list(report["classes"]) == [str(target)]
    assert entry["reached"] and entry["kept"] and entry["mask_l1"] <= entry["mask_l1_limit"], entry
    assert [t.target for t in found] == [target] and found[0].mask.shape == (28, 28)
    assert found[0].source.startswith("round 2")
    # the size limit comes from the triggers the patch started with, not from those kept later
    original = max(float(t.mask.sum()) for t in triggers if t.target == target)
    assert entry["mask_l1_limit"] == pytest.approx(3 * original)
    grown = [*triggers, dataclasses.replace(found[0], mask=np.ones_like(found[0].mask))]
    _, again = restore_again(loaded.module, train, grown, round_number=3, seed=0, limit_from=triggers)
    assert again["classes"][str(target)]["mask_l1_limit"] == pytest.approx(3 * original)


def test_two_rounds_report_the_second_and_measure_every_trigger_used(smoke):
    zoo, trojan, result_json, test = smoke
    train, evaluation = finetune_and_evaluation(test)
    triggers, _ = load_restored_triggers(result_json)
    loaded = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=train.x[:8])
    heard: list[tuple[float, str]] = []
    outcome = unlearn(loaded.module, train, triggers, SETTINGS.model_copy(update={"rounds": 2}),
                      evaluation=evaluation, true_triggers=true_triggers(trojan),
                      progress=lambda fraction, text: heard.append((fraction, text)))
    restorations = [r for r in outcome.rounds if "attack_success_required" in r]
    # round 2 restores once per required attack success (0.99, then 0.5)
    assert [(r["round"], r["attack_success_required"]) for r in restorations] == [(2, 0.99), (2, 0.5)]
    kept = sum(c["kept"] for r in restorations for c in r["classes"].values())
    fine_tunes = [r for r in outcome.rounds if "epoch_kept" in r]
    assert [r["round"] for r in fine_tunes] == ([1, 2] if kept else [1])
    # 1500 images: 10% is under the 1000 validation images needed, so no validation, last epoch kept
    assert outcome.validation_images == 0 and all(r["epoch_kept"] == 3 for r in fine_tunes)
    assert len(outcome.triggers) == len(triggers) + kept
    assert len(outcome.before.asr_restored) == len(outcome.after.asr_restored) == len(outcome.triggers)
    assert outcome.after.max_asr_true <= 0.1 and outcome.after.clean_accuracy >= outcome.before.clean_accuracy - 0.02
    assert outcome.to_json()["rounds"] == outcome.rounds
    # progress: every epoch of every round run, out of 2 rounds x 3 epochs, then the measurement
    fractions = [fraction for fraction, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    epochs_heard = [(fraction, text) for fraction, text in heard if "epoch" in text]
    assert epochs_heard[:3] == [(e / 6, f"round 1/2: epoch {e}/3") for e in (1, 2, 3)]
    assert len(epochs_heard) == 3 * len(fine_tunes)
    assert any("restoring the triggers again" in text for _, text in heard)


def test_validation_keeps_the_weights_of_the_epoch_with_the_lowest_error(smoke):
    """Each epoch is judged on the validation images ((1 - CA) + worst restored-trigger ASR); the
    weights returned are those of the best epoch, which a run stopped at that epoch reproduces."""
    zoo, trojan, result_json, test = smoke
    fit, validation = test.subset(slice(0, 1500)), test.subset(slice(1500, 2000))
    triggers, _ = load_restored_triggers(result_json)
    module = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=fit.x[:8]).module
    settings = SETTINGS.model_copy(update={"epochs": 4})
    chosen, report = fine_tune(module, fit, triggers, settings, validation)
    errors = report["validation_error"]
    assert len(errors) == 4 and errors[report["epoch_kept"] - 1] == min(errors)
    assert all(e > min(errors) for e in errors[report["epoch_kept"]:])  # the later epoch wins a tie
    assert validation_error(chosen, validation, triggers) == pytest.approx(min(errors), abs=1e-5)
    stopped, _ = fine_tune(module, fit, triggers, settings.model_copy(update={"epochs": report["epoch_kept"]}))
    for a, b in zip(chosen.parameters(), stopped.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_unlearn_sets_validation_images_apart_only_when_there_are_enough(smoke):
    zoo, trojan, result_json, test = smoke
    data, evaluation = test.subset(slice(0, 1500)), test.subset(slice(1500, 2000))
    triggers, _ = load_restored_triggers(result_json)
    module = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=data.x[:8]).module
    settings = SETTINGS.model_copy(update={"epochs": 2, "rounds": 1, "validation": 0.2, "validation_min_images": 300})
    outcome = unlearn(module, data, triggers, settings, evaluation=evaluation)
    expected = sum(round(0.2 * count) for count in np.bincount(data.y))  # per class, as split_held_out
    assert outcome.validation_images == expected and outcome.finetune_images == 1500 - expected
    assert len(outcome.rounds[0]["validation_error"]) == 2
    fewer = unlearn(module, data, triggers, settings.model_copy(update={"validation_min_images": 301}),
                    evaluation=evaluation)
    assert fewer.validation_images == 0 and fewer.finetune_images == 1500 and fewer.rounds[0]["epoch_kept"] == 2


def test_noise_patches_cover_one_square_of_each_image_and_nothing_else():
    x = torch.zeros(200, 3, 32, 24)
    patched = noise_patched(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.zeros_like(x))  # the input is left alone
    sides = []
    for image in patched:
        rows, cols = torch.nonzero(image.abs().sum(0) > 0, as_tuple=True)
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert height == width and 2 <= height <= 24 // 4  # a square, side 2 to a quarter of the shorter side
        assert 0 <= float(image.min()) and float(image.max()) <= 1
        sides.append(height)
    assert set(sides) == {2, 3, 4, 5, 6}  # every side is drawn
    again = noise_patched(x, torch.Generator().manual_seed(0))
    assert torch.equal(patched, again)  # seeded


def test_fine_tune_uses_noise_patches_when_asked(smoke):
    """noise_patches reaches the batches: other weights than without it, the same on a rerun."""
    zoo, trojan, result_json, test = smoke
    fit = test.subset(slice(0, 600))
    triggers, _ = load_restored_triggers(result_json)
    module = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=fit.x[:8]).module
    settings = SETTINGS.model_copy(update={"epochs": 1})
    weights = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
    plain = weights(fine_tune(module, fit, triggers, settings)[0])
    noisy = weights(fine_tune(module, fit, triggers, settings.model_copy(update={"noise_patches": 0.3}))[0])
    again = weights(fine_tune(module, fit, triggers, settings.model_copy(update={"noise_patches": 0.3}))[0])
    assert any(not torch.equal(a, b) for a, b in zip(plain, noisy))
    assert all(torch.equal(a, b) for a, b in zip(noisy, again))


def test_dilated_grows_the_mask_on_every_side_and_keeps_the_pattern():
    mask = np.zeros((6, 7), np.float32)
    mask[0, 0], mask[3, 3] = 1.0, 0.5  # a corner pixel and a half-strength one inside
    pattern = np.random.default_rng(0).random((1, 6, 7), dtype=np.float32)
    grown = dilated(PatchTrigger(target=2, mask=mask.copy(), pattern=pattern, source="tabor class 2"), 1)
    expected = np.zeros((6, 7), np.float32)
    expected[2:5, 2:5] = 0.5
    expected[0:2, 0:2] = 1.0  # clipped at the border, not wrapped
    assert np.array_equal(grown.mask, expected) and grown.mask.dtype == np.float32
    assert grown.pattern is pattern and grown.target == 2 and "dilated 1 px" in grown.source
    assert mask[0, 1] == 0  # the input is left alone
    assert dilated(PatchTrigger(2, mask, pattern), 2).mask[0:3, 0:3].min() == 1.0


def test_unlearn_stamps_the_dilated_triggers_by_default_and_the_restored_ones_at_0(smoke):
    zoo, trojan, result_json, test = smoke
    train, evaluation = finetune_and_evaluation(test)
    triggers, _ = load_restored_triggers(result_json)
    loaded = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=train.x[:8])
    settings = SETTINGS.model_copy(update={"epochs": 1, "rounds": 1})
    assert settings.dilate == 1
    outcome = unlearn(loaded.module, train, triggers, settings, evaluation=evaluation)
    assert [t.source for t in outcome.triggers] == [f"{t.source} (mask dilated 1 px)" for t in triggers]
    assert all(np.array_equal(u.mask, dilated(t, 1).mask) for u, t in zip(outcome.triggers, triggers))
    assert outcome.triggers[0].mask.sum() > triggers[0].mask.sum()
    assert outcome.to_json()["settings"]["dilate"] == 1

    as_restored = unlearn(loaded.module, train, triggers, settings.model_copy(update={"dilate": 0}),
                          evaluation=evaluation)
    assert [t.source for t in as_restored.triggers] == [t.source for t in triggers]
    assert all(np.array_equal(u.mask, t.mask) for u, t in zip(as_restored.triggers, triggers))


def test_held_out_split_is_disjoint_and_per_class(smoke):
    *_, test = smoke
    data = test.subset(slice(0, 500))
    train, held = split_held_out(data, 0.2, seed=0)
    assert len(train) + len(held) == len(data)
    assert set(np.bincount(held.y, minlength=10)) <= {round(0.2 * c) for c in np.bincount(data.y)}
    keys = lambda d: {a.tobytes() + bytes([b]) for a, b in zip(d.x, d.y)}  # noqa: E731
    assert not keys(train) & keys(held)


def test_cli_patches_and_prints_before_and_after(smoke, tmp_path):
    zoo, trojan, result_json, test = smoke
    data = tmp_path / "clean.npz"
    test.subset(slice(0, 2500)).save_npz(data)
    done = run_cli("unlearn", str(zoo / trojan["files"]["onnx"]["path"]), "--data", str(data), "--result",
                   str(result_json), "--out", str(tmp_path / "patched.onnx"), "--epochs", "3", "--share", "0.3",
                   "--lr", "1e-3", "--json", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CA" in done.stdout and "ASR" in done.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    held = sum(round(0.2 * count) for count in np.bincount(test.y[:2500]))  # 20% of each class held out
    assert metrics["measured_images"] == held and metrics["finetune_images"] == 2500 - held
    assert metrics["validation_images"] == 0  # 10% of 2000 is under the 1000 needed
    assert metrics["before"]["max_asr_restored"] >= 0.9 and metrics["after"]["max_asr_restored"] <= 0.1
    assert metrics["settings"]["epochs"] == 3 and metrics["output"]["format"] == "onnx"
    assert load_model(tmp_path / "patched.onnx", check_data=test.x[:8]).format == "onnx"


def test_cli_refuses_bad_inputs_with_exit_2(smoke, tmp_path):
    zoo, trojan, result_json, test = smoke
    model = str(zoo / trojan["files"]["onnx"]["path"])
    good_data = tmp_path / "clean.npz"
    test.subset(slice(0, 300)).save_npz(good_data)
    clean_result = tmp_path / "clean-result.json"
    clean_result.write_text(json.dumps(json.loads(result_json.read_text()) | {"verdict": "clean"}))
    rgb = tmp_path / "rgb.npz"
    CleanData(np.zeros((20, 3, 32, 32), np.float32), np.arange(20) % 10).save_npz(rgb)
    cases = {
        "not infected": (model, good_data, clean_result),
        "no result": (model, good_data, tmp_path / "missing.json"),
        "no model": (str(tmp_path / "missing.onnx"), good_data, result_json),
        "wrong shape": (model, rgb, result_json),
        "other model": (str(zoo / trojan["files"]["pt2"]["path"]), good_data, result_json),
    }
    for name, (m, d, r) in cases.items():
        done = run_cli("unlearn", m, "--data", str(d), "--result", str(r), "--out", str(tmp_path / f"{name}.onnx"))
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert one_line(done.stderr).startswith("trojanscan: error:"), name
        assert not (tmp_path / f"{name}.onnx").exists()
    usage = run_cli("unlearn", model, "--data", str(good_data), "--result", str(result_json), "--out",
                    str(tmp_path / "u.onnx"), "--share", "1.5")
    assert usage.returncode == 4 and one_line(usage.stderr).startswith("trojanscan: usage:")
    bad_validation = run_cli("unlearn", model, "--data", str(good_data), "--result", str(result_json), "--out",
                             str(tmp_path / "v.onnx"), "--validation", "1.5")
    assert bad_validation.returncode == 4 and "validation" in one_line(bad_validation.stderr)
    no_clean_images_left = run_cli("unlearn", model, "--data", str(good_data), "--result", str(result_json), "--out",
                                   str(tmp_path / "n.onnx"), "--share", "0.6", "--noise-patches", "0.4")
    assert no_clean_images_left.returncode == 4 and "noise_patches" in one_line(no_clean_images_left.stderr)
    assert not (tmp_path / "n.onnx").exists()
    missing_option = run_cli("unlearn", model, "--data", str(good_data), "--result", str(result_json))
    assert missing_option.returncode == 4


def test_a_restored_trigger_that_does_not_fit_is_refused(smoke, tmp_path):
    zoo, trojan, result_json, test = smoke
    result = json.loads(result_json.read_text())
    files = result["detectors"]["tabor"]["artifacts"]["7"]
    np.save(tmp_path / "small_mask.npy", np.ones((5, 5), np.float32))
    files["mask_npy"] = str(tmp_path / "small_mask.npy")
    files["pattern_npy"] = str(result_json.parent / files["pattern_npy"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(result))
    with pytest.raises(DataError, match="mask"):
        unlearn_files(zoo / trojan["files"]["onnx"]["path"], test.subset(slice(0, 200)), bad, tmp_path / "x.onnx")


def neuron_inspect_only_result(smoke, out: Path) -> Path:
    """The smoke trojan's result JSON as a scan with NeuronInspect alone writes it: infected,
    the target flagged, and no restored trigger."""
    zoo, trojan, _, _ = smoke
    target = trojan["targets"][0]
    clean = CleanData.load_npz(zoo / "clean_samples.npz")
    sha256 = load_model(zoo / trojan["files"]["onnx"]["path"], check_data=clean.x[:8]).sha256
    index = np.zeros(10)
    index[target] = 3.0
    detection = DetectionResult(detector="ni", anomaly_index=index, flagged_classes=[target], statistics={},
                                settings={}, seed=0, seconds=0.0)
    result = ScanResult(model={"reference": "smoke trojan", "sha256": sha256, "normalization": None},
                        data={"reference": "clean_samples.npz"}, settings=ScanSettings(detectors=("ni",)),
                        detections={"ni": detection}, verdict="infected", reasons=[f"ni flags class {target}"])
    out.mkdir(parents=True, exist_ok=True)
    save_artifacts(result, clean, out)
    (out / "result.json").write_text(json.dumps(result.to_json()))
    return out / "result.json"


def test_flagged_classes_without_a_restored_trigger_are_listed_with_their_detectors():
    result = {"detectors": {"ni": {"flagged_classes": [3, 7]}, "tabor": {"flagged_classes": [7]},
                            "nc": {"flagged_classes": [3, 5]}}}
    triggers = [PatchTrigger(target=7, mask=np.zeros((2, 2)), pattern=np.zeros((1, 2, 2)))]
    assert flagged_without_trigger(result, triggers) == {3: ["nc", "ni"], 5: ["nc"]}
    assert flagged_without_trigger(result, triggers + [PatchTrigger(3, triggers[0].mask, triggers[0].pattern),
                                                       PatchTrigger(5, triggers[0].mask, triggers[0].pattern)]) == {}


def test_a_neuron_inspect_flag_gets_its_trigger_restored_and_unlearned(smoke, tmp_path):
    zoo, trojan, _, test = smoke
    target = trojan["targets"][0]
    result_json = neuron_inspect_only_result(smoke, tmp_path / "scan")
    assert load_restored_triggers(result_json)[0] == []  # the scan itself restored nothing
    train, evaluation = finetune_and_evaluation(test)
    outcome = unlearn_files(zoo / trojan["files"]["onnx"]["path"], train, result_json, tmp_path / "patched.onnx",
                            SETTINGS, evaluation=evaluation, true_triggers=true_triggers(trojan))
    restored = outcome.to_json()["restored_for_patch"]["classes"][str(target)]
    assert restored["kept"] and restored["flagged_by"] == ["ni"], restored
    assert restored["attack_success"] >= unlearning.MISSING_TRIGGER_ATTACK_SUCCESS
    assert outcome.triggers[0].target == target and "restored for the patch" in outcome.triggers[0].source
    assert outcome.before.max_asr_true >= 0.9
    assert outcome.after.max_asr_true <= 0.1, outcome.to_json()
    assert outcome.after.clean_accuracy >= outcome.before.clean_accuracy - 0.02


def test_a_flag_whose_trigger_cannot_be_restored_is_an_error_and_writes_nothing(smoke, tmp_path, monkeypatch):
    zoo, trojan, _, test = smoke
    result_json = neuron_inspect_only_result(smoke, tmp_path / "scan")
    monkeypatch.setattr(unlearning, "MISSING_TRIGGER_ATTACK_SUCCESS", 1.01)  # no trigger can reach it
    with pytest.raises(DataError, match="no trigger restores"):
        unlearn_files(zoo / trojan["files"]["onnx"]["path"], test.subset(slice(0, 300)), result_json,
                      tmp_path / "patched.onnx", SETTINGS)
    assert not (tmp_path / "patched.onnx").exists()
