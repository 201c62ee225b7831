"""configs/tiny.py's model trains to the recorded losses (tests/golden.py) on every layer path: unrolled, scanned, a
Python loop, and a data x FSDP x tensor mesh of 8 devices. Each runs in a subprocess under the recording's compile
flags (golden.FLAGS), one per device count.

Bit-identical where the environment is the recording's; elsewhere within golden.RTOL (5e-5), which real changes of
the math still fail: RMSNorm's eps 1e-6 -> 2e-6 moves the losses by up to 2.0e-3 relative, AdamW's eps 1e-8 -> 2e-8
by 3.9e-4 (checked 2026-12-05), while environments differ by at most 5.5e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import golden


def check(run: dict) -> None:
    for path, got in run["losses"].items():
        want = golden.recorded(path)
        if run["exact"]:
            assert got == want, f"{path}: {got} != recorded {want}"
        else:  # another environment (tests/golden.py says what differs)
            np.testing.assert_allclose(got, want, rtol=golden.RTOL, err_msg=path)


@pytest.mark.slow(50)
def test_the_one_device_paths_match_the_recording():
    run = golden.run(devices=1)
    assert sorted(run["losses"]) == sorted(p for p in golden.PATHS if p not in golden.EIGHT_DEVICES)
    check(run)


@pytest.mark.slow(30)
def test_the_8_device_mesh_matches_the_recording():
    run = golden.run(devices=8)
    assert sorted(run["losses"]) == list(golden.EIGHT_DEVICES)
    check(run)
