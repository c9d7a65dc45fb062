import json
import math

import pytest
import torch

from idode import train as train_module
from idode.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_model
from idode.config import apply_overrides
from idode.presets import get_preset
from idode.train import TrainingDiverged, finetune_config, learning_rate, make_optimizer, train

TINY = [
    "train.steps=12",
    "train.checkpoint_every=4",
    "train.eval_every=0",
    "train.log_every=2",
    "train.batch_size=16",
    "model.n_embd=8",
    "model.n_layers=1",
]


def _cfg(*extra):
    return apply_overrides(get_preset("digits_cpu"), TINY + list(extra))


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(_cfg(), tmp_path_factory.mktemp("full") / "run", progress=False)


def test_run_directory_contents(uninterrupted):
    run = uninterrupted.run_dir
    assert uninterrupted.step == 12
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(r["train/loss_bpd"]) for r in rows)
    assert any((run / "tb").iterdir())  # TensorBoard events
    # keep_checkpoints=2: steps 8 and 12; the symlink points at the newest
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_00000008", "step_00000012"]
    assert find_checkpoint(run) == run / "checkpoints" / "step_00000012"
    ck = load_checkpoint(run / "checkpoint")
    assert ck.step == 12 and ck.config == _cfg()
    assert set(ck.section("rng")) == {"rank0/train", "rank0/torch"}


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    tmp_path, monkeypatch, uninterrupted
):
    calls = {"n": 0}
    real = train_module.ema_update

    def crash_at_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "ema_update", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tmp_path / "run", progress=False)
    monkeypatch.setattr(train_module, "ema_update", real)
    assert load_checkpoint(tmp_path / "run").step == 4  # the last checkpoint before the kill
    resumed = train(_cfg(), tmp_path / "run", resume=True, progress=False)
    assert resumed.step == 12
    torch.testing.assert_close(_flat(resumed.model), _flat(uninterrupted.model), rtol=0, atol=1e-6)
    torch.testing.assert_close(_flat(resumed.ema), _flat(uninterrupted.ema), rtol=0, atol=1e-6)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    real = train_module.diffusion_loss_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 7:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(train_module, "diffusion_loss_terms", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7.*checkpoints/step_00000004"):
        train(_cfg(), tmp_path / "run", progress=False)
    # the good checkpoint is intact and loadable
    assert load_checkpoint(tmp_path / "run").step == 4


def test_finetune_restores_everything_and_switches_on_the_second_order_term(
    tmp_path, uninterrupted
):
    ck = load_checkpoint(uninterrupted.run_dir)
    cfg = finetune_config(ck.config, ck.step, 4)
    assert cfg.train.second_order_weight == 0.1 and cfg.train.steps == 16
    res = train(cfg, tmp_path / "ft", init_from=uninterrupted.run_dir, progress=False)
    assert res.step == 16
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 14 and all(r["train/second_order_bpd"] > 0 for r in rows)
    ft = load_checkpoint(tmp_path / "ft")
    assert ft.config.train.second_order_weight == 0.1
    # the optimizer state came along: Adam's step counter continued from 12
    assert float(ft.section("optim")["0/step"]) == 16.0


def test_optimizer_groups_lr_warmup_and_ema():
    cfg = _cfg()
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GroupNorm(1, 3))
    opt = make_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    # GroupNorm's scale is decayed (VDM decays every parameter not named bias)
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 2
    assert learning_rate(0, cfg) == pytest.approx(1e-8)
    assert learning_rate(50, cfg) == pytest.approx(1e-8 + (cfg.train.lr - 1e-8) / 2)
    assert learning_rate(10_000, cfg) == cfg.train.lr
    ema = torch.nn.Linear(2, 3)
    cur = torch.nn.Linear(2, 3)
    before = ema.weight.detach().clone()
    train_module.ema_update(ema, cur, 0.9)
    torch.testing.assert_close(ema.weight, before + 0.1 * (cur.weight - before))


def test_missing_and_corrupt_checkpoints(tmp_path, uninterrupted):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(empty)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(find_checkpoint(uninterrupted.run_dir), bad)
    (bad / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt checkpoint tensors"):
        load_model(bad)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_checkpoint(bad)


def test_augmented_training_feeds_the_conditioning_flag(tmp_path, monkeypatch):
    from idode.nets import ScoreUNet

    seen = []
    real_forward = ScoreUNet.forward

    def spy(self, z, gamma, conditioning=None):
        seen.append(conditioning)
        return real_forward(self, z, gamma, conditioning)

    monkeypatch.setattr(ScoreUNet, "forward", spy)
    res = train(_cfg("data.augment=true", "train.steps=3"), tmp_path / "aug", progress=False)
    assert res.step == 3 and math.isfinite(res.metrics["train/loss_bpd"])
    flags = torch.cat([c for c in seen if c is not None])
    assert set(flags.tolist()) == {0.0, 1.0}  # about 3/4 of images get some augmentation


def test_resume_with_another_world_size_is_refused(tmp_path, uninterrupted):
    import shutil

    from idode.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(uninterrupted.run_dir, run, symlinks=True)
    meta_path = find_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["extra"]["world_size"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="written by 2 process"):
        train(_cfg("train.steps=14"), run, resume=True, progress=False)
