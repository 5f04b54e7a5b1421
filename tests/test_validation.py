"""refimpl._validation.all_finite: the sum's shortcut gives the answer of isfinite().all() in every case."""

import pytest
import torch

from refimpl._validation import all_finite, check_finite


@pytest.mark.parametrize("values, expected", [
    (torch.randn(64, 32), True),
    (torch.full((8,), 3e38), True),  # finite values whose sum overflows: checked element by element
    (torch.tensor([1.0, float("nan")]), False),
    (torch.tensor([1.0, float("inf")]), False),
    (torch.tensor([float("inf"), -float("inf")]), False),  # the sum is NaN
    (torch.tensor([1.0, 2.0], dtype=torch.float16), True),
    (torch.full((4,), 60000.0, dtype=torch.float16), True),  # overflows float16's sum
    (torch.arange(5), True),
])
def test_all_finite_agrees_with_isfinite(values, expected):
    assert all_finite(values) is expected is bool(torch.isfinite(values).all())


def test_check_finite_names_the_parameter():
    with pytest.raises(ValueError, match="weights must be finite"):
        check_finite("weights", torch.tensor([0.0, float("nan")]))
    check_finite("weights", torch.full((8,), 3e38))
