import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import idode  # noqa: E402

SCHEDULES = {"VP": idode.VPSchedule(), "SP": idode.SPSchedule()}


@pytest.fixture(params=["VP", "SP"])
def schedule(request):
    return SCHEDULES[request.param]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # The test models are tiny: threads buy little, and OpenMP threads competing with any other
    # process on a 2-core machine can slow torch down fifty-fold.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
