"""Session-wide fixtures: real models are loaded and captured once and shared by all tests.

Tests must not mutate these objects (capture with a dtype deep-copies the module).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    from surgeon.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_cap(smollm2):
    from surgeon.capture import capture

    return capture(smollm2)


@pytest.fixture(scope="session")
def minilm():
    from surgeon.models import load

    return load("minilm-l6")


@pytest.fixture(scope="session")
def minilm_cap(minilm):
    from surgeon.capture import capture

    return capture(minilm)


@pytest.fixture(scope="session")
def vit():
    from surgeon.models import load

    return load("vit-tiny")


@pytest.fixture(scope="session")
def vit_cap(vit):
    from surgeon.capture import capture

    return capture(vit)


@pytest.fixture(scope="session")
def mha():
    from surgeon.models import load

    return load("toy_models:mha_model")


@pytest.fixture(scope="session")
def mha_cap(mha):
    from surgeon.capture import capture

    return capture(mha)
