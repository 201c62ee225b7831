"""configs/tiny.py's model on a data x FSDP x tensor mesh of 8 devices trains to the recorded losses."""

from __future__ import annotations

import numpy as np

from tests import golden


def test_mesh_losses_match_the_recording(tmp_path):
    want, exact = golden.expected("mesh8")
    got = golden.losses("mesh8", tmp_path)
    if exact:
        assert got == want, f"{got} != recorded {want}"
    else:
        np.testing.assert_allclose(got, want, rtol=golden.RTOL)
