from __future__ import annotations

import os

import pytest
import torch

from tests.checkpoints import FAMILIES, write_checkpoint

# the README's test command runs one pytest-xdist worker per CPU: each takes its share of the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET once, when it is first imported; anything may import it during collection
    # (transformers does), so the Triton kernel tests' own setting would come too late.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> (directory, transformers model), built once per session."""
    built = {}

    def get(family: str):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            built[family] = (directory, write_checkpoint(family, directory))
        return built[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
