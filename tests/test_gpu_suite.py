"""The prepared GPU suite runs end to end on the CPU with tiny nets, so it cannot rot before a GPU.

Every section's code runs (training, checkpoint load, bits/dim against float64, torchrun, the
throughput cells eager and compiled, the projection, first- and second-order training steps);
only TF32 and the NCCL all-reduce say "skipped: needs CUDA".
"""

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SECTIONS = ("correctness", "torchrun", "throughput", "projection", "training", "compiled")


@pytest.fixture(autouse=True)
def _keep_sigint_handler():
    # torch.compile's worker pools and the in-process training may leave another SIGINT handler
    # in this process; later tests (run safety) expect the default one
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def _suite():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_suite", BENCH / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_suite_writes_every_table_on_the_cpu(tmp_path):
    rc = _suite().main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--budget", "1e9"])
    assert rc == 0
    summary = (tmp_path / "summary.md").read_text()
    for name in SECTIONS:
        text = (tmp_path / f"{name}.md").read_text()
        assert text in summary and "error:" not in text, text
    correctness = (tmp_path / "correctness.md").read_text()
    assert "identical weights" in correctness
    assert "| cpu fp32 |" in correctness and "| cpu fp32 compiled |" in correctness
    assert "| cpu bf16 |" in correctness and "skipped: TF32 needs CUDA" in correctness
    assert "| idode train (1 rank) | ok" in (tmp_path / "torchrun.md").read_text()
    assert "| 4 | bf16 | eager |" in (tmp_path / "throughput.md").read_text()
    assert "| 2 | fp32 | compiled |" in (tmp_path / "compiled.md").read_text()
    assert "skipped: time budget" not in summary
    projection = (tmp_path / "projection.md").read_text()
    assert "paper protocol" in projection and "| fp32 | 200 |" in projection
    training = (tmp_path / "training.md").read_text()
    assert (
        "| first-order | fp32 |" in training
        and "| second-order (lambda_2 = 0.1) | bf16 |" in training
    )
