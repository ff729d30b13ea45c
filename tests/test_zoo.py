import json

import numpy as np
import torch

from scanner import attacks
from scanner.attacks import AttackSpec
from scanner.data import CleanData
from scanner.export import max_logit_difference, onnx_logits, sha256_file
from scanner.training import accuracy
from scanner.zoo import build_zoo, load_zoo_data, zoo_specs


def entries(manifest):
    return {entry["id"]: entry for entry in manifest["models"]}


def test_smoke_zoo_trojan_works_and_clean_model_ignores_its_trigger(fm_smoke_zoo):
    out, manifest = fm_smoke_zoo
    models = entries(manifest)
    trojan, clean = models["fm-square4-br"], models["fm-clean-s0"]
    assert trojan["trojaned"] and trojan["targets"] == [7]
    assert trojan["attack_success_rate"] >= 0.9
    assert trojan["clean_accuracy"] >= 0.7 and clean["clean_accuracy"] >= 0.7

    # The clean model, given the same triggered images, mostly keeps predicting their true class.
    evaluation = load_zoo_data("fashion-mnist", "smoke").evaluation.subset(slice(0, 2000))
    attack = AttackSpec.model_validate(trojan["attack"])
    trigger = attacks.build_triggers(attack, 1)[0]
    triggered = attacks.triggered_set(evaluation, trigger, 7, seed=0)
    clean_model = torch.export.load(str(out / clean["files"]["pt2"]["path"])).module()
    trojan_model = torch.export.load(str(out / trojan["files"]["pt2"]["path"])).module()
    assert accuracy(clean_model, triggered) < 0.2
    assert accuracy(trojan_model, triggered) >= 0.9


def test_manifest_records_ground_truth_and_files(fm_smoke_zoo):
    out, manifest = fm_smoke_zoo
    trojan = entries(manifest)["fm-square4-br"]
    mask = np.load(out / trojan["ground_truth"][0]["mask"])
    assert mask.shape == (28, 28) and mask.sum() == 16 and mask[23:27, 23:27].all()
    for file in trojan["files"].values():
        assert sha256_file(out / file["path"]) == file["sha256"]
    samples = CleanData.load_npz(out / "clean_samples.npz")
    assert len(samples) == 500 and np.bincount(samples.y).tolist() == [50] * 10
    assert json.loads((out / "manifest.json").read_text())["models"] == manifest["models"]


def test_onnx_and_torch_agree(fm_smoke_zoo):
    out, manifest = fm_smoke_zoo
    samples = CleanData.load_npz(out / "clean_samples.npz")
    for entry in manifest["models"]:
        model = torch.export.load(str(out / entry["files"]["pt2"]["path"])).module()
        onnx_path = out / entry["files"]["onnx"]["path"]
        assert max_logit_difference(model, onnx_path, samples.x) < 1e-4
        # dynamic batch: one image and many images both run
        assert onnx_logits(onnx_path, samples.x[:1]).shape == (1, 10)
        assert model(torch.from_numpy(samples.x[:3])).shape == (3, 10)


def test_rebuild_keeps_models_with_the_same_settings(fm_smoke_zoo, tmp_path):
    out, manifest = fm_smoke_zoo
    messages = []
    again = build_zoo("fashion-mnist", "smoke", out, progress=messages.append)
    assert all("up to date" in message for message in messages) and len(messages) == 2
    assert [e["files"] for e in again["models"]] == [e["files"] for e in manifest["models"]]


def test_full_zoo_specs_span_the_required_attacks():
    for dataset, clean_needed, trojans_needed in (("fashion-mnist", 5, 20), ("signs", 4, 12)):
        specs = zoo_specs(dataset, "full")
        trojans = [s for s in specs if s.attack]
        assert len(specs) - len(trojans) >= clean_needed and len(trojans) >= trojans_needed
        triggers = [t for s in trojans for t in s.attack.triggers]
        assert {t.shape for t in triggers} == {"square", "checkerboard", "blob", "watermark"}
        assert {"random", "centre"} <= {t.position for t in triggers}
        assert sum(any(t.alpha < 1 for t in s.attack.triggers) for s in trojans) >= 2
        multi = [s for s in trojans if len(s.attack.triggers) > 1]
        assert any(len(set(s.attack.targets)) == 1 for s in multi)
        assert any(len(set(s.attack.targets)) > 1 for s in multi)
        channels, side = (1, 28) if dataset == "fashion-mnist" else (3, 32)
        areas = [attacks.build_trigger(t, channels).mask.sum() / side**2 for t in triggers]
        assert min(areas) <= 0.012 and max(areas) >= 0.09


def test_last_epoch_lr_factor_changes_the_last_epoch_only_and_keeps_old_hashes():
    from scanner.models import build_model
    from scanner.training import TrainSettings, train_classifier

    # left out of the dump at its default: zoo models trained before the field keep their hashes
    assert "last_epoch_lr_factor" not in TrainSettings(epochs=2).model_dump()
    assert TrainSettings(epochs=2, last_epoch_lr_factor=0.1).model_dump()["last_epoch_lr_factor"] == 0.1
    rng = np.random.default_rng(0)
    data = CleanData(x=rng.random((256, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 10, 256))

    def weights(settings: TrainSettings) -> torch.Tensor:
        torch.manual_seed(0)
        model = train_classifier(build_model("nc_mnist", 1, 10, 28), data, settings, seed=0)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    one_epoch = weights(TrainSettings(epochs=1, last_epoch_lr_factor=0.1))
    assert torch.equal(one_epoch, weights(TrainSettings(epochs=1)))  # a single epoch is not slowed down
    constant, dropped = weights(TrainSettings(epochs=2)), weights(TrainSettings(epochs=2, last_epoch_lr_factor=0.1))
    assert not torch.equal(constant, dropped)
    assert torch.equal(dropped, weights(TrainSettings(epochs=2, last_epoch_lr_factor=0.1)))  # still deterministic
