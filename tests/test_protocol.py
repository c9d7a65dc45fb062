"""idode.Protocol: one home for the settings of a bits/dim, and everything derived from it."""

import hashlib
import inspect
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from problems import DiscreteOptimalNet

import idode
from idode.cli.parser import build_parser
from idode.config import ConfigError, EvalConfig, apply_overrides, config_from_dict
from idode.presets import get_preset
from idode.protocol import Protocol, settings_schema
from idode.validation import InputError

DATA = Path(__file__).parent / "data"
PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])
# a valid value other than the default for every field (a new field needs a row here)
OTHER = {
    "dequantization": "uniform",
    "num_samples": 3,
    "importance_weighted": True,
    "analytic_entropy": False,
    "uniform_gamma_start": -10.5,
    "divergence": "exact",
    "num_probes": 2,
    "method": "dopri5",  # the only pair so far: no other value yet
    "rtol": 1e-4,
    "atol": 1e-6,
    "tolerance": "logp",
    "logp_atol": 0.01,
    "elbo_importance_sampling": False,
    "elbo_antithetic": True,
    "elbo_prior": "unit",
    "seed": 7,
    "max_solver_error": 0.002,
    "solver_check": 0.05,
}


def test_every_field_has_help_and_a_test_value():
    assert set(OTHER) == set(Protocol.field_names())
    for f in fields(Protocol):
        assert len(f.metadata["help"]) > 10, f.name


def test_json_round_trip_and_fingerprint():
    p = Protocol(**OTHER)
    assert Protocol.from_json(json.loads(json.dumps(p.to_json()))) == p
    # the fingerprint is the sha256 of the canonical JSON form, computed here independently
    text = json.dumps(p.to_json(), sort_keys=True, separators=(",", ":"))
    assert p.fingerprint() == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    # ints where floats belong do not change it; every other setting does
    assert Protocol(rtol=1).fingerprint() == Protocol(rtol=1.0).fingerprint()
    assert isinstance(Protocol(rtol=1).to_json()["rtol"], float)
    prints = {Protocol().fingerprint()}
    for name, value in OTHER.items():
        if value != getattr(Protocol, name):
            prints.add(Protocol(**{name: value}).fingerprint())
    assert len(prints) == 1 + sum(v != getattr(Protocol, k) for k, v in OTHER.items())


def test_json_of_an_older_file_and_unknown_keys():
    older = Protocol(seed=3).to_json()
    del older["num_probes"], older["elbo_prior"]  # written before these fields existed
    assert Protocol.from_json(older) == Protocol(seed=3)
    with pytest.raises(InputError, match="unknown protocol setting.*rtoll; valid: deq"):
        Protocol.from_json({"rtoll": 1e-3})
    with pytest.raises(InputError, match="must be a JSON object"):
        Protocol.from_json([1])
    assert Protocol(seed=1).differences(Protocol(seed=2, rtol=1e-3)) == [
        "rtol: saved 1e-05, now 0.001",
        "seed: saved 1, now 2",
    ]


@pytest.mark.parametrize(
    "given, message",
    [
        ({"rtol": 0.0}, "rtol must be > 0, got 0.0"),
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
        ({"num_samples": 2.0}, r"num_samples=2.0 must be of type int"),
        ({"num_probes": True}, "num_probes=True must be of type int"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"logp_atol": -1.0}, "logp_atol must be > 0 or None"),
        ({"atol": math.nan}, "atol=nan must be a finite number"),
        ({"dequantization": "gauss"}, "unknown dequantization 'gauss'; valid: 'truncated_normal'"),
        ({"method": "rk4"}, "unknown method 'rk4'; valid: 'dopri5'"),
        ({"importance_weighted": "yes"}, "importance_weighted='yes' must be of type bool"),
        ({"tolerance": "paper", "logp_atol": 1.0}, "logp_atol has no effect with tolerance=paper"),
    ],
)
def test_validation_names_the_knob(given, message):
    with pytest.raises(InputError, match=message):
        Protocol(**given).validate()
    knob = message.removeprefix("unknown ").split()[0].split("=")[0]
    with pytest.raises(ConfigError, match=f"eval.{knob}"):
        Protocol(**given).validate("eval.", ConfigError)


def test_every_field_is_a_config_key_and_an_eval_flag():
    """One field gives its config key (--set eval.NAME), its flag (--NAME) with its help."""
    cfg = apply_overrides(get_preset("digits_cpu"), ["eval.tolerance=logp"])
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    flags = {a.dest: a for a in sub._actions}
    for s in settings_schema():
        value = OTHER[s.name]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        assert getattr(apply_overrides(cfg, [f"eval.{s.name}={text}"]).eval, s.name) == value
        assert s.help in flags[s.name].help, s.name
        if s.kind == "bool":
            argv = [f"--{'' if value else 'no-'}{s.name.replace('_', '-')}"]
        else:
            argv = [f"--{s.name.replace('_', '-')}", text]
        args = parser.parse_args(["eval", "--checkpoint", "x", *argv])
        assert getattr(args, s.name) == value, s.name
    defaults = parser.parse_args(["eval", "--checkpoint", "x"])
    assert all(getattr(defaults, n) is None for n in Protocol.field_names())  # the checkpoint's


def test_eval_config_is_the_protocol_and_the_batch_size():
    ev = get_preset("cifar10_aug").eval
    assert isinstance(ev.protocol, Protocol) and type(ev.protocol) is Protocol
    assert ev.protocol == Protocol(num_samples=20, importance_weighted=True)
    assert {f.name for f in fields(EvalConfig)} == {*Protocol.field_names(), "batch_size"}
    # a config file of an older idode (no num_probes, method, ... keys) still loads
    meta = json.loads((DATA / "checkpoint_v1" / "meta.json").read_text())
    assert config_from_dict(meta["config"]).eval.protocol.num_probes == 1


def test_format_1_checkpoint_gets_a_checksum():
    from idode.checkpoint import load_checkpoint

    ck = load_checkpoint(DATA / "checkpoint_v1")
    data = (DATA / "checkpoint_v1" / "state.safetensors").read_bytes()
    assert ck.checksum == "sha256:" + hashlib.sha256(data).hexdigest()


def _model():
    schedule = idode.VPSchedule()
    return idode.DiffusionODE(DiscreteOptimalNet(schedule, PROBS), schedule, "x0")


def test_bits_per_dim_takes_a_protocol():
    model = _model()
    x = torch.multinomial(
        PROBS, 2 * 6, replacement=True, generator=torch.Generator().manual_seed(1)
    )
    x = x.reshape(6, 2)
    # the keyword defaults are the protocol's (one home for them)
    for name, param in inspect.signature(idode.bits_per_dim).parameters.items():
        if name in Protocol.field_names():
            assert param.default == getattr(Protocol, name), name
    p = Protocol(num_samples=2, importance_weighted=True, rtol=1e-4, atol=1e-4, seed=5)
    a = idode.bits_per_dim(model, x, 4, protocol=p)
    # None as generator: the protocol's seeded per-example streams
    b = idode.bits_per_dim(
        model, x, 4, num_samples=2, importance_weighted=True, rtol=1e-4, atol=1e-4,
        generator=p.generators(range(6)), batch_size=4,
    )  # fmt: skip
    torch.testing.assert_close(a.bpd, b.bpd, rtol=0, atol=1e-9)
    assert torch.equal(a.bpd, a.bpd_importance_weighted) and a.protocol == p
    assert a.settings["seed"] == 5 and a.settings["num_samples"] == 2
    with pytest.raises(ValueError, match="protocol= and the setting.*num_samples"):
        idode.bits_per_dim(model, x, 4, num_samples=3, protocol=p)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        idode.bits_per_dim(model, x, 4, protocol=Protocol(num_probes=0))
