import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import idode  # noqa: E402

SCHEDULES = {"VP": idode.VPSchedule(), "SP": idode.SPSchedule()}


@pytest.fixture(params=["VP", "SP"])
def schedule(request):
    return SCHEDULES[request.param]


# the one small training run of the test session, through the command line: the digits_cpu preset
# with a 1-layer UNet of width 8, 20 steps, one SDE evaluation at step 10, one checkpoint (step 20)
TRAINED_RUN_STEPS = 20
TRAINED_RUN_SETTINGS = [
    f"train.steps={TRAINED_RUN_STEPS}",
    f"train.checkpoint_every={TRAINED_RUN_STEPS}",
    "train.eval_every=10",
    "train.ode_eval_every=0",
    "train.batch_size=16",
    "data.eval_examples=16",
    "model.n_embd=8",
    "model.n_layers=1",
    "model.fourier_features=false",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run folder of the session's one training run (``idode train``), trained once.

    Shared by every test that needs a checkpoint: read it, never write into it (a test that
    changes a run works on ``shutil.copytree(trained_run, ..., symlinks=True)``).
    """
    from idode.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    sets = [a for kv in TRAINED_RUN_SETTINGS for a in ("--set", kv)]
    argv = ["train", "--config", "digits_cpu", *sets, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    files = sorted(out.rglob("*"))
    yield out
    assert sorted(out.rglob("*")) == files, "a test wrote into the shared trained_run"


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
