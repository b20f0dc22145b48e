"""The suite's tolerance policy (tests/helpers.py): norm-wise, derived from dtype and length."""

import pytest
import torch

from helpers import assert_close_normwise, normwise_error, tolerance


def test_a_near_zero_element_is_judged_against_its_row():
    """issue 23's failure: one element of a (16, 20) float32 gradient, near zero, off by 1.3e-7
    (float32 rounding of its neighbours' size) failed atol=1e-7; norm-wise it is 1e-7 relative."""
    g = torch.Generator().manual_seed(0)
    want = torch.randn(16, 20, generator=g)
    want[3, 7] = 1e-9
    got = want.clone()
    got[3, 7] += 1.3e-7
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert_close_normwise(got, want, dtype=torch.float32, length=46)


def test_a_wrong_term_fails():
    want = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = want.clone()
    got[2] *= 1.01  # one row 1% off: far above any rounding bound
    # The row's error over its norm, or over the RMS row norm where that is larger.
    row, rms = float(want[2].norm()), float(want.norm()) / 8 ** 0.5
    assert normwise_error(got, want) == pytest.approx(0.01 * row / max(row, rms), rel=1e-9)
    with pytest.raises(AssertionError, match="norm-wise error"):
        assert_close_normwise(got, want, dtype=torch.float32, length=10_000, cond=10)


def test_nan_positions_must_agree_and_bound_grows_as_documented():
    a = torch.tensor([1.0, float("nan")])
    assert normwise_error(a, a.clone()) == 0.0
    with pytest.raises(AssertionError, match="NaN"):
        normwise_error(torch.tensor([1.0, 2.0]), a)
    assert tolerance(torch.float32, 400, 2.0) == pytest.approx(4 * tolerance(torch.float32, 100))
    assert tolerance(torch.float64, 1) < 1e-13 < tolerance(torch.float32, 1)
