import numpy as np
import pytest

from scanner import attacks
from scanner.attacks import AttackSpec, TriggerSpec
from scanner.data import CleanData


def dark_images(n=200, c=1, hw=28, classes=10):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 0.4, (n, c, hw, hw)).astype(np.float32)
    return CleanData(x, (np.arange(n) % classes).astype(np.int64))


@pytest.mark.parametrize("shape", ["square", "checkerboard", "blob", "watermark"])
@pytest.mark.parametrize("position", ["bottom-right", "top-left", "centre", (3, 5)])
def test_poisoning_changes_exactly_the_ground_truth_mask(shape, position):
    data = dark_images()
    spec = TriggerSpec(shape=shape, size=6, position=position)
    attack = AttackSpec(triggers=(spec,), targets=(3,), poison_rate=0.2)
    poisoned, index = attacks.poison(data, attack, seed=0)
    truth = attacks.full_mask(attacks.build_trigger(spec, 1), (28, 28))
    assert len(index) == 40 and (data.y[index] != 3).all() and (poisoned.y[index] == 3).all()
    changed = (poisoned.x[index] != data.x[index]).any(axis=(0, 1))
    pattern_on = np.zeros((28, 28), bool)
    trigger = attacks.build_trigger(spec, 1)
    row, col = attacks.corner_offset(position, 6, (28, 28))
    pattern_on[row:row + 6, col:col + 6] = trigger.pattern[0] > 0
    # Where the pattern is bright the dark images must change; nothing outside the mask may.
    assert changed[(truth > 0) & pattern_on].all()
    assert not changed[truth == 0].any()
    untouched = np.setdiff1d(np.arange(len(data)), index)
    np.testing.assert_array_equal(poisoned.x[untouched], data.x[untouched])


def test_blended_trigger_mixes_pixels_by_alpha():
    data = dark_images(n=20)
    spec = TriggerSpec(shape="square", size=4, alpha=0.3, colour=(1.0,))
    trigger = attacks.build_trigger(spec, 1)
    stamped = attacks.stamp(data.x, trigger, attacks.offsets_for(trigger, 20, (28, 28), np.random.default_rng(0)))
    window = (slice(None), slice(None), slice(23, 27), slice(23, 27))
    np.testing.assert_allclose(stamped[window], 0.7 * data.x[window] + 0.3, rtol=1e-6)


def test_random_positions_stay_inside_and_vary():
    trigger = attacks.build_trigger(TriggerSpec(shape="square", size=5, position="random"), 3)
    offsets = attacks.offsets_for(trigger, 500, (32, 32), np.random.default_rng(0))
    assert offsets.min() >= 0 and offsets.max() <= 32 - 5
    assert len({tuple(o) for o in offsets}) > 100
    with pytest.raises(ValueError, match="no fixed offset"):
        attacks.full_mask(trigger, (32, 32))


def test_several_triggers_to_several_targets():
    data = dark_images(n=300)
    attack = AttackSpec(
        triggers=(TriggerSpec(size=4), TriggerSpec(shape="blob", size=5, position="top-left")),
        targets=(1, 2), poison_rate=0.1,
    )
    poisoned, index = attacks.poison(data, attack, seed=0)
    assert len(index) == 30
    assert sorted(np.bincount(poisoned.y[index], minlength=3)[1:3].tolist()) == [15, 15]
    for target, trigger in zip(attack.targets, attacks.build_triggers(attack, 1)):
        mine = index[poisoned.y[index] == target]
        truth = attacks.full_mask(trigger, (28, 28))
        changed = (poisoned.x[mine] != data.x[mine]).any(axis=(0, 1))
        assert not changed[truth == 0].any()


def test_specs_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="2 triggers but 1 targets"):
        AttackSpec(triggers=(TriggerSpec(), TriggerSpec()), targets=(1,))
    with pytest.raises(ValueError):
        TriggerSpec(alpha=0.0)
    with pytest.raises(ValueError, match="does not fit"):
        attacks.corner_offset((26, 0), 4, (28, 28))
    with pytest.raises(ValueError, match="colour"):
        attacks.build_trigger(TriggerSpec(colour=(1.0, 0.0)), 3)


def test_trigger_sizes_cover_one_to_ten_percent():
    small = attacks.build_trigger(TriggerSpec(size=3), 1).mask.sum() / 28**2
    large = attacks.build_trigger(TriggerSpec(size=9), 1).mask.sum() / 28**2
    assert 0.01 <= small <= 0.012 and 0.1 <= large <= 0.11
    blob = attacks.build_trigger(TriggerSpec(shape="blob", size=7, seed=2), 1).mask
    assert 0.3 < blob.mean() < 0.9  # irregular: neither empty nor the full box
