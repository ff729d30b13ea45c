"""bfloat16 restoration: the model's arithmetic under autocast, where the device has bfloat16 arithmetic."""

import pytest
import torch
from torch import nn

from scanner.detectors.restoration import (
    RestorationSettings,
    bf16_native,
    choose_slots,
    logits_of,
    plan_restoration,
)
from scanner.scan import ScanSettings, run_detectors

TARGET = 7  # the smoke zoo's trojan target
QUICK = {"max_steps": 400, "slots": 10}  # fixed slots: only the precision differs between runs


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()


def test_bf16_logits_are_float32_close_to_fp32_and_carry_input_gradients():
    model, x = small_cnn(), torch.rand(16, 1, 8, 8)
    exact = logits_of(model, x)
    x_bf16 = x.clone().requires_grad_(True)
    rough = logits_of(model, x_bf16, bf16=True)
    assert rough.dtype == torch.float32
    assert torch.allclose(rough, exact, atol=0.05 * float(exact.abs().max()))
    assert not torch.equal(rough, exact)  # bfloat16 did run: its rounding shows
    x_fp32 = x.clone().requires_grad_(True)
    logits_of(model, x_fp32).logsumexp(1).sum().backward()
    rough.logsumexp(1).sum().backward()
    assert torch.isfinite(x_bf16.grad).all()
    assert torch.cosine_similarity(x_bf16.grad.flatten(), x_fp32.grad.flatten(), dim=0) > 0.99


def test_auto_precision_follows_the_hardware_and_not_a_timing():
    """auto is bfloat16 exactly where the CPU reports bfloat16 instructions: the same on every
    scan of this machine, however busy it is."""
    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16_native(cpu) == native
    choices = {choose_slots(small_cnn(), (1, 8, 8), cpu, images_per_class=32, num_classes=5, precision="auto")[1]
               for _ in range(3)}
    assert choices == {native}
    slots, bf16, probe = choose_slots(small_cnn(), (1, 8, 8), cpu, 32, 5, precision="auto")
    assert probe["precision"] == ("bf16" if bf16 else "fp32") and "precision_probe" not in probe
    # slots are sized on the chosen precision's rates, over the batches 5 classes can use
    assert list(probe["images_per_second"]) == ["32", "64", "128", "160"]
    assert 1 <= slots <= 5


def test_fixed_precision_is_taken_as_given():
    _, bf16, probe = choose_slots(small_cnn(), (1, 8, 8), torch.device("cpu"), 32, 5, precision="bf16")
    assert bf16 and probe["precision"] == "bf16"
    # slots fixed: nothing is timed, whatever the precision
    for precision, expected in (("fp32", False), ("bf16", True), ("auto", bf16_native(torch.device("cpu")))):
        slots, bf16, notes = plan_restoration(small_cnn(), (1, 8, 8), torch.device("cpu"),
                                              RestorationSettings(slots=3, precision=precision), 5)
        assert (slots, bf16, notes) == (3, expected, {"precision": "bf16" if expected else "fp32"})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tabor_catches_the_smoke_trojan_in_either_precision(smoke_models, precision):
    _, _, data, load = smoke_models
    pruning = {"prune_steps": 60}
    settings = ScanSettings(detectors=("tabor", "ncpp", "nc"), detector_settings={
        "tabor": QUICK | pruning | {"precision": precision}, "ncpp": QUICK | pruning | {"precision": precision},
        "nc": QUICK | {"precision": precision}})
    results = run_detectors(load("fm-square4-br"), data, 10, settings, torch.device("cpu"))
    assert TARGET in results["tabor"].flagged_classes, results["tabor"].anomaly_index
    for name in ("tabor", "nc"):
        assert results[name].notes["precision"] == precision
    assert results["ncpp"].notes["restoration"] == "shared with nc"
    assert results["ncpp"].notes["precision"] == precision  # NC++ prunes in NC's precision
