"""Shared test set-up: the device list every tensor test is parametrised over, and hypothesis profiles."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Hypothesis loads its built-in "ci" profile (derandomised, no deadline, no database) when CI is set;
# extend it rather than replace it, and keep a randomised "dev" profile for local exploration.
_suppress = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", settings.get_profile("ci"), max_examples=30, suppress_health_check=_suppress
)
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=_suppress)
# A longer randomised search, for hunting counterexamples before a release: HYPOTHESIS_PROFILE=deep.
settings.register_profile("deep", max_examples=400, deadline=None, suppress_health_check=_suppress)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_generate_tests(metafunc):
    """Any test that takes a ``device`` argument runs once per available device."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
