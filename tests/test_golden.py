"""configs/tiny.py's model trains to the recorded losses (tests/golden.py) on every one-device layer path."""

from __future__ import annotations

import numpy as np
import pytest

from tests import golden


@pytest.mark.parametrize("path", [p for p in golden.PATHS if p not in golden.EIGHT_DEVICES])
def test_losses_match_the_recording(path, tmp_path):
    want, exact = golden.expected(path)
    got = golden.losses(path, tmp_path)
    if exact:
        assert got == want, f"{path}: {got} != recorded {want}"
    else:  # another environment (tests/golden.py says what differs)
        np.testing.assert_allclose(got, want, rtol=golden.RTOL)
