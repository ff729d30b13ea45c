import numpy as np
import pytest

from scanner.anomaly import CONSISTENCY, flag, mad_anomaly_index


def test_mad_on_known_numbers_low_tail():
    # median 11, |deviations| 1 0 1 2 10 -> MAD 1 -> scaled 1.4826
    index = mad_anomaly_index(np.array([10.0, 11, 12, 13, 1]), tail="low")
    np.testing.assert_allclose(index, [1 / CONSISTENCY, 0, 0, 0, 10 / CONSISTENCY])
    assert flag(index, 2.0) == [4]


def test_mad_high_tail_ignores_the_low_side():
    index = mad_anomaly_index(np.array([1.0, 2, 3, 4, 100]), tail="high")
    assert index[0] == 0 and index[4] == pytest.approx(97 / CONSISTENCY)


def test_even_count_uses_the_mean_of_the_two_middle_values():
    # numpy median of [1,2,3,4] is 2.5 (torch would take 2): deviations 1.5 .5 .5 1.5 -> MAD 1
    index = mad_anomaly_index(np.array([1.0, 2, 3, 4]), tail="low")
    np.testing.assert_allclose(index, [1.5 / CONSISTENCY, 0.5 / CONSISTENCY, 0, 0])


def test_a_mad_floor_keeps_a_tight_cluster_from_making_a_small_deviation_an_outlier():
    # nine classes within 0.02 of each other and one 0.25 below: MAD 0.01 -> index about 16.9;
    # with the floor 0.1 the same deviation scores 0.25 / (1.4826 * 0.1) = 1.69
    values = np.array([-2.10, -2.11, -2.09, -2.10, -2.12, -2.08, -2.35, -2.10, -2.11, -2.09])
    bare = mad_anomaly_index(values, tail="low")
    floored = mad_anomaly_index(values, tail="low", min_mad=0.1)
    assert flag(bare, 2.0) == [6] and flag(floored, 2.0) == []
    assert floored[6] == pytest.approx(0.25 / (CONSISTENCY * 0.1))
    # a spread above the floor is left as it was
    wide = np.array([-2.0, -1.5, -2.5, -2.2, -1.8, -4.0])
    np.testing.assert_array_equal(mad_anomaly_index(wide, "low", min_mad=0.1), mad_anomaly_index(wide, "low"))


def test_threshold_is_inclusive_and_bad_input_is_refused():
    assert flag(np.array([1.99, 2.0, 3.0]), 2.0) == [1, 2]
    with pytest.raises(ValueError, match="NaN"):
        mad_anomaly_index(np.array([1.0, np.nan, 3.0]), tail="low")
    with pytest.raises(ValueError, match="at least 3"):
        mad_anomaly_index(np.array([1.0, 2.0]), tail="low")


def test_mask_f1_on_known_masks():
    from scanner.metrics import mask_f1

    truth = np.zeros((6, 6))
    truth[4:6, 4:6] = 1
    restored = np.zeros((6, 6))
    restored[4:6, 3:6] = 0.9  # 4 right, 2 extra: F1 = 2*4 / (6 + 4)
    assert mask_f1(restored, truth) == pytest.approx(0.8)
    assert mask_f1(restored * 0.4, truth) == 0.0  # below the 0.5 threshold nothing counts
    # a random-position trigger: its 2x2 patch matches wherever the restored mask put it
    moved = np.zeros((6, 6))
    moved[1:3, 0:2] = 1
    assert mask_f1(moved, np.ones((2, 2))) == pytest.approx(1.0)


def test_paper_mask_f1_uses_the_mask_values():
    from scanner.metrics import paper_mask_f1

    truth = np.zeros((6, 6))
    truth[4:6, 4:6] = 1
    restored = np.zeros((6, 6))
    restored[4:6, 4:6] = 0.5  # all inside the truth, half strength: precision 1, recall 2/4
    restored[0, 0] = 1.0  # one stray pixel: precision 2/3
    precision, recall = 2 / 3, 2 / 4
    assert paper_mask_f1(restored, truth) == pytest.approx(2 * precision * recall / (precision + recall))
    assert paper_mask_f1(np.zeros((6, 6)), truth) == 0.0
    moved = np.zeros((6, 6))
    moved[1:3, 0:2] = 1  # a random-position trigger's patch counts wherever it is
    assert paper_mask_f1(moved, np.ones((2, 2))) == pytest.approx(1.0)


def test_correctness_symbols():
    from scanner.metrics import correctness

    assert correctness([7], [7], True) == "success"
    assert correctness([1, 7], [7], True) == "success_extra"
    assert correctness([2], [7], True) == "wrong_class"
    assert correctness([7], [7, 8], True) == "wrong_class"
    assert correctness([], [7], True) == "failure"
    assert correctness([], [], False) == "clean_pass"
    assert correctness([3], [], False) == "false_alarm"


def test_paired_accuracy_drop_on_known_counts():
    """3 images worse and 6 better of 100: d = -0.03; Agresti-Min adds 1/2 to each cell, so
    d' = (3.5 - 6.5) / 102 and the 95% bound is d' + 1.6449 * sqrt(10 - 9 / 102) / 102 = 0.02136."""
    from scanner.metrics import paired_accuracy_drop

    before, after = np.ones(100, bool), np.ones(100, bool)
    after[:3] = False  # right before, wrong after
    before[3:9] = False  # wrong before, right after
    drop = paired_accuracy_drop(before, after, 0.95)
    assert (drop.images, drop.worse, drop.better) == (100, 3, 6)
    assert drop.drop == pytest.approx(-0.03)
    assert drop.upper_bound == pytest.approx(0.021358, abs=1e-6)
    same = paired_accuracy_drop(before, before, 0.95)  # nothing changed: still not a certain zero
    assert same.drop == 0.0 and same.upper_bound == pytest.approx(1.6449 * (1 / 102), abs=1e-4)
    assert paired_accuracy_drop(before, after, 0.99).upper_bound > drop.upper_bound
    with pytest.raises(ValueError, match="equally long"):
        paired_accuracy_drop(before, after[:50], 0.95)
    with pytest.raises(ValueError, match="confidence"):
        paired_accuracy_drop(before, after, 1.0)
