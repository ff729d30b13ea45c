"""NC++ reuses Neural Cleanse's restoration when a scan runs both."""

import numpy as np
import pytest
import torch

from scanner.scan import ScanSettings, run_detectors

# Short restorations with fixed slots and precision (no device probe): seconds on one core, and the same
# triggers every time for one seed.
QUICK = {"max_steps": 150, "slots": 10, "check_every": 5, "precision": "fp32"}


@pytest.fixture(scope="module")
def trojan(smoke_models):
    _, models, data, load = smoke_models
    return load("fm-square4-br"), data


def detect(trojan, detectors, ncpp_extra=None):
    module, data = trojan
    settings = ScanSettings(detectors=detectors, detector_settings={
        "nc": QUICK, "ncpp": QUICK | {"prune_steps": 30} | (ncpp_extra or {})})
    return run_detectors(module, data, 10, settings, torch.device("cpu"))


@pytest.fixture(scope="module")
def alone(trojan):
    return detect(trojan, ("ncpp",))["ncpp"]


def test_ncpp_beside_nc_judges_nc_triggers_and_scores_as_when_alone(trojan, alone):
    both = detect(trojan, ("ncpp", "nc"))
    assert list(both) == ["ncpp", "nc"]  # the caller's order, though NC ran first
    shared = both["ncpp"]
    assert shared.notes["restoration"] == "shared with nc"
    assert "restoration" not in alone.notes
    np.testing.assert_allclose(shared.anomaly_index, alone.anomaly_index, rtol=1e-5, atol=1e-6)
    for k, trigger in shared.triggers.items():
        np.testing.assert_array_equal(trigger.mask, both["nc"].triggers[k].mask)
        assert trigger.refined_mask is not None
        assert both["nc"].triggers[k].refined_mask is None  # NC's own triggers are left unpruned


def test_ncpp_with_other_restoration_settings_restores_its_own(trojan):
    both = detect(trojan, ("nc", "ncpp"), ncpp_extra={"max_steps": 100})
    assert "restoration" not in both["ncpp"].notes
    assert max(both["ncpp"].notes["steps"]) <= 100 < max(both["nc"].notes["steps"])
