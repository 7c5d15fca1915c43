"""Label helpers: the multi-label refusal and the seeded random split."""

import numpy as np
import pytest

from supcon.core.errors import UsageError
from supcon.data.labels import random_split, refuse


def test_refuse_is_one_line_naming_what_needs_one_class():
    with pytest.raises(UsageError, match=r"^the confusion matrix needs one class per image; .*multi-label"):
        refuse("the confusion matrix")


@pytest.mark.parametrize("n, fraction, want", [(10, 0.2, 2), (10, 0.01, 1), (3, 0.99, 3), (1, 0.5, 1)])
def test_random_split_size_order_and_seed(n, fraction, want):
    a = random_split(n, fraction, seed=4)
    assert len(a) == want and list(a) == sorted(set(a.tolist())) and a.max() < n
    np.testing.assert_array_equal(a, random_split(n, fraction, seed=4))
