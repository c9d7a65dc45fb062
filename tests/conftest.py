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
