import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Every run's token caches (and those of the subprocesses tests start) go to one temporary folder,
# not the user's $MIXTRAIN_HOME/data.
if "MIXTRAIN_DATA_CACHE" not in os.environ:
    os.environ["MIXTRAIN_DATA_CACHE"] = tempfile.mkdtemp(prefix="mixtrain-test-data-")
    atexit.register(shutil.rmtree, os.environ["MIXTRAIN_DATA_CACHE"], True)


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
