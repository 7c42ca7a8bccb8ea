"""The calibration mechanism: thresholds at a stated false-positive rate on held-out scores."""

import numpy as np
import pytest

from trainer.io import MemtrainError
from trainer.measure.calibration import Calibration, calibrate, uncalibrated


@pytest.mark.parametrize("higher", [False, True])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_held_out_rate_never_exceeds_the_stated_rate(higher, fpr):
    rng = np.random.default_rng(0)
    null = rng.normal(size=500)
    cal = calibrate(null, "d", higher_is_copy=higher, fpr=fpr)
    assert cal.fpr_heldout <= fpr
    assert cal.fpr_heldout >= fpr - 1.5 / null.size  # and uses the rate it was given (continuous scores)
    fresh = rng.normal(size=20000)  # a second draw of the null: the rate holds out of sample
    assert abs(cal.flags(fresh).mean() - fpr) < 0.02


def test_few_held_out_items_flag_only_what_is_closer_than_all_of_them():
    null = np.array([0.30, 0.25, 0.40, 0.35])
    cal = calibrate(null, "l2", higher_is_copy=False, positive_scores=[0.05, 0.1, 0.29, 0.5])
    assert cal.threshold == 0.25 and cal.fpr_heldout == 0.0
    assert cal.flags([0.249, 0.25, float("nan")]).tolist() == [True, False, False]
    assert cal.recall == 0.5 and cal.n_positive == 4
    assert "calibrated at 1.0% false positives on 4 held-out" in cal.describe()
    assert "4 held-out items cannot resolve 1.0%" in cal.describe() and "at least 100" in cal.describe()
    assert "cannot resolve" not in calibrate(np.arange(100.0), "l2", higher_is_copy=False).describe()


def test_record_round_trips_and_uncalibrated_says_so():
    cal = calibrate([0.1, 0.2, 0.3], "sim", higher_is_copy=True)
    assert Calibration.from_dict(cal.to_dict()) == cal
    fixed = uncalibrated("ratio", 1 / 3, False, "Gu et al. 2023")
    assert not fixed.calibrated and "uncalibrated: Gu et al. 2023" in fixed.describe()
    with pytest.raises(MemtrainError, match="not a calibration record"):
        Calibration.from_dict({"x": 1})


def test_bad_input_is_one_clear_error():
    with pytest.raises(MemtrainError, match="false-positive rate"):
        calibrate([0.1], "d", False, fpr=1.5)
    with pytest.raises(MemtrainError, match="no held-out scores"):
        calibrate([float("nan")], "d", False)
