import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Triton tests only make sense in the TRITON_INTERPRET=1 process `make test` starts for them.
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from tests._devices import FAKE_CUDA

    skip = pytest.mark.skip(reason="only triton-marked tests run in the TRITON_INTERPRET=1 process")
    for item in items:
        if "triton" not in item.keywords and not (FAKE_CUDA and "cuda" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
