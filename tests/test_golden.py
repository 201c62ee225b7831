"""configs/tiny.py's model trains to the recorded losses (tests/golden.py) on every one-device layer path.

Bit-identical where the environment is the recording's; elsewhere within golden.RTOL (5e-5), which real changes of
the math still fail: RMSNorm's eps 1e-6 -> 2e-6 moves the losses by up to 2.0e-3 relative, AdamW's eps 1e-8 -> 2e-8
by 3.9e-4 (checked 2026-12-05), while environments differ by at most 5.5e-6.
"""

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
