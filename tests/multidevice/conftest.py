"""Tests that need 8 devices. The main session runs them in a subprocess that starts JAX with 8 fake CPU
devices (tests/test_multidevice.py); run them directly with
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice`."""

import pathlib

import jax
import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Skips this directory's tests (the hook sees every test of the session) without 8 devices."""
    if jax.device_count() < 8:
        skip = pytest.mark.skip(reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
        for item in items:
            if HERE in pathlib.Path(item.fspath).parents:
                item.add_marker(skip)
