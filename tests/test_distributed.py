"""Two CPU processes under torchrun (Gloo, loopback): DDP training and sharded evaluation."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from idode import evaluate as evaluate_module
from idode.checkpoint import load_checkpoint
from idode.evaluate import evaluate

TINY = [
    "train.steps=6",
    "train.batch_size=16",
    "train.eval_every=3",
    "train.ode_eval_every=6",
    "data.eval_examples=40",
    "data.ode_eval_examples=6",
    "eval.rtol=1e-3",
    "eval.atol=1e-3",
    "train.log_every=1",
    "train.checkpoint_every=6",
    "model.n_embd=8",
    "model.n_layers=1",
    "model.fourier_features=false",
    "train.device=cpu",
]
EVAL = dict(max_examples=12, batch_size=4, rtol=1e-3, atol=1e-3, device="cpu", progress=False)
COLUMNS = ("bpd", "bpd_mean_of_bounds", "bpd_importance_weighted", "elbo_bpd")

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from idode.config import apply_overrides
    from idode.presets import get_preset
    from idode.evaluate import evaluate
    from idode.train import train

    run_dir, eval_dir, overrides, eval_kwargs = sys.argv[1:5]
    res = train(apply_overrides(get_preset("digits_cpu"), json.loads(overrides)), run_dir,
                progress=False)
    rank = torch.distributed.get_rank()
    torch.save({"model": res.model.state_dict(), "ema": res.ema.state_dict(),
                "loss": res.metrics["train/loss_bpd"], "step": res.step},
               f"{run_dir}/replica.rank{rank}.pt")
    out = evaluate(run_dir, eval_dir, **json.loads(eval_kwargs))
    with open(f"{eval_dir}/returned.rank{rank}.json", "w") as f:
        json.dump(out, f)
    # second-order finetuning under DDP: the double backward must keep the replicas identical
    from idode.checkpoint import load_checkpoint
    from idode.train import finetune_config
    ck = load_checkpoint(run_dir)
    ft = train(finetune_config(ck.config, ck.step, 2), run_dir + "_ft", init_from=run_dir,
               progress=False)
    torch.save({"model": ft.model.state_dict(), "ema": ft.ema.state_dict(),
                "loss": ft.metrics["train/loss_bpd"], "step": ft.step,
                "second": ft.metrics["train/second_order_bpd"]},
               f"{run_dir}_ft/replica.rank{rank}.pt")
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Train and evaluate with torchrun --nproc_per_node=2; the run and eval directories."""
    tmp = tmp_path_factory.mktemp("distributed")
    script, run_dir, eval_dir = tmp / "worker.py", tmp / "run", tmp / "eval"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "IDODE_NO_PROGRESS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname says
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(run_dir),
        str(eval_dir),
        json.dumps(TINY),
        json.dumps(EVAL),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return run_dir, eval_dir


def test_ddp_replicas_stay_identical(two_ranks):
    run_dir, _ = two_ranks
    r0, r1 = (torch.load(run_dir / f"replica.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6
    assert r0["loss"] == r1["loss"]  # the all-reduced loss
    for part in ("model", "ema"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}/{k} differs between ranks"
    ck = load_checkpoint(run_dir)
    assert ck.step == 6 and ck.meta["extra"]["world_size"] == 2
    for part in ("model", "ema"):
        saved = ck.section(part)
        assert all(torch.equal(saved[k], r0[part][k]) for k in r0[part])
    # the weights did move: the raw weights differ from their EMA after 6 steps
    assert any(not torch.equal(r0["model"][k], r0["ema"][k]) for k in r0["model"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss_bpd" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # rank 0 logs alone
    # the sharded periodic evaluation equals one process evaluating everything
    evals = [r for r in rows if "eval/sde_bpd" in r]
    assert [r["step"] for r in evals] == [3, 6] and "eval/ode_bpd_tn" in evals[-1]
    from idode.checkpoint import load_model
    from idode.data import load_dataset, subset
    from idode.periodic import periodic_eval

    ema, ck = load_model(run_dir)
    x_eval = subset(load_dataset("digits", "test"), 40, seed=0).as_tensor()
    single = periodic_eval(ema, x_eval, 17, ck.config, ode=True, step=6)
    for key, value in single.items():
        assert evals[-1][key] == pytest.approx(value, abs=1e-6), key


def test_ddp_second_order_finetuning_keeps_replicas_identical(two_ranks):
    run_dir, _ = two_ranks
    ft = run_dir.parent / (run_dir.name + "_ft")
    r0, r1 = (torch.load(ft / f"replica.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 8 and r0["second"] > 0
    base = load_checkpoint(run_dir).section("model")
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"model/{k} differs between ranks"
        assert torch.equal(r0["ema"][k], r1["ema"][k]), f"ema/{k} differs between ranks"
    assert any(not torch.equal(r0["model"][k], base[k]) for k in base)  # it did train


def test_sharded_evaluation_matches_one_process(two_ranks, tmp_path, monkeypatch):
    run_dir, eval_dir = two_ranks
    sharded = json.loads((eval_dir / "eval.json").read_text())
    for r in (0, 1):  # every rank returns rank 0's summary
        assert json.loads((eval_dir / f"returned.rank{r}.json").read_text()) == sharded
    assert sharded["settings"]["world_size"] == 2 and sharded["bpd"]["n"] == 12
    assert not list(eval_dir.glob("per_example.rank*"))  # merged into per_example.jsonl

    single = evaluate(run_dir, tmp_path / "single", **EVAL)
    rows = [json.loads(x) for x in (eval_dir / "per_example.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "single" / "per_example.jsonl").open()]
    assert [r["index"] for r in rows] == [r["index"] for r in ref] == list(range(12))
    for key in COLUMNS:
        np.testing.assert_allclose(
            [r[key] for r in rows], [r[key] for r in ref], rtol=0, atol=1e-6, err_msg=key
        )
    assert sharded["bpd"]["mean"] == pytest.approx(single["bpd"]["mean"], abs=1e-6)
    assert sharded["elbo"]["mean"] == pytest.approx(single["elbo"]["mean"], abs=1e-6)

    # a one-process rerun in the sharded run's directory finds everything done
    calls = []
    real = evaluate_module.iter_bits_per_dim
    monkeypatch.setattr(
        evaluate_module, "iter_bits_per_dim", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = evaluate(run_dir, eval_dir, **EVAL)
    assert calls == [] and again["bpd"] == sharded["bpd"]
