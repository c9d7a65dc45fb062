"""The evaluation protocol: every setting that defines a bits/dim, in one frozen dataclass.

``Protocol`` owns the settings' defaults, their validation, their JSON form and the fingerprint.
Everything else is derived from its fields: the ``eval`` section of a config (``EvalConfig`` =
the protocol + the batch size), the flags of ``idode eval`` (``settings_schema``: one flag per
field, with the field's help), ``bits_per_dim(protocol=...)``, ``idode.evaluate``, the periodic
evaluation of training and the ablation. A new evaluation setting is one field below with its
help (and, for a number, its range); its flag, config key, JSON key and fingerprint follow.

JSON and fingerprint contract:

- ``to_json()``: ``{field: value}`` for every field in field order; floats as floats (``1`` ->
  ``1.0``), choices as strings, ``None`` as null.
- ``from_json(d)``: refuses unknown keys; a key that is missing takes the field's default, so a
  file written before a field existed reads as that default. A new field's default must
  therefore reproduce the numbers computed before the field existed (e.g. ``None``: off).
- ``fingerprint()``: ``"sha256:" + hex`` of the canonical JSON of ``to_json()`` (sorted keys, no
  spaces). Adding a field changes every fingerprint, so a guard that must accept files written
  before compares ``from_json(saved)`` with the protocol (``differences``), not fingerprints.

Execution settings that do not change the numbers (rows per network call, device, the number of
examples, progress bars) are not part of a protocol. ``solver_check`` is: it sets the measured
solver error that is reported with the bits/dim, though not the bits/dim itself, so an
evaluation folder's resume guard ignores it (``evaluate``) while the fingerprint includes it.
``max_solver_error`` sets the tolerances (by calibration) and so is guarded like them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from idode.choices import (
    ELBO_PRIORS,
    TOLERANCES,
    Dequantization,
    Divergence,
    ElboPrior,
    SolverMethod,
    Tolerance,
)
from idode.dequantization import UNIFORM_GAMMA_START, dequantization_bounds
from idode.rng import example_generators
from idode.validation import InputError, check_choice, check_rtol, check_setting_type

__all__ = [
    "ELBO_PRIORS",
    "LOGP_ATOL_BPD",
    "TOLERANCES",
    "ElboPrior",
    "Protocol",
    "Setting",
    "Tolerance",
    "settings_schema",
    "solver_tolerances",
]

# Error control of the augmented state (z, l). "logp": the image part z keeps the RMS test with
# rtol/atol and the log-density l gets its own test |err_l| <= logp_atol + rtol |l| (nats), so the
# number users read is controlled whatever d is. "paper": one RMS over all d + 1 components, as
# the official code and torchode (l then weighs 1/(d + 1)); for comparisons with published numbers.
# (Tolerance and the other option lists live in idode.choices)
# default logp_atol per image = LOGP_ATOL_BPD * d ln 2 nats, a local-error budget in bits/dim.
# benchmarks/results/work_precision_digits_cpu.md: 1e-5 costs 10-40 % more NFE and gains little,
# because the image part's trajectory error, not l's local error, dominates |dbpd| there.
LOGP_ATOL_BPD = 1e-4

_POSITIVE, _NON_NEGATIVE = "positive", "non_negative"
# a count (an integral value >= 1) or a fraction in (0, 1); 0: none
_COUNT_OR_FRACTION = "count_or_fraction"


def _knob(default: Any, help: str, bound: str | None = None) -> Any:
    """A protocol field: its default, its help (the text of its flag) and a number's range."""
    return field(default=default, metadata={"help": help, "range": bound})


@dataclass(frozen=True)
class Protocol:
    """How a bits/dim is computed: dequantization, bound, divergence, solver, ELBO, seed."""

    dequantization: Dequantization = _knob(
        "truncated_normal", "dequantization q(z | k): truncated_normal, uniform or variational"
    )
    num_samples: int = _knob(1, "K dequantization draws per image", _POSITIVE)
    importance_weighted: bool = _knob(
        False, "report the importance-weighted K-draw bound (with -log K), not the mean of bounds"
    )
    analytic_entropy: bool = _knob(
        True, "the mean of bounds uses the analytic E_q[log q] (as the official code)"
    )
    uniform_gamma_start: float = _knob(
        UNIFORM_GAMMA_START, "gamma where the ODE starts with uniform dequantization"
    )
    divergence: Divergence = _knob(
        "rademacher", "divergence of the drift: exact (d VJPs) or Hutchinson (rademacher, gaussian)"
    )
    num_probes: int = _knob(1, "Hutchinson probes per image, fixed for its whole solve", _POSITIVE)
    method: SolverMethod = _knob("dopri5", "ODE solver: an adaptive embedded Runge-Kutta pair")
    rtol: float = _knob(1e-5, "ODE relative tolerance", _POSITIVE)
    atol: float = _knob(1e-5, "ODE absolute tolerance", _POSITIVE)
    tolerance: Tolerance = _knob(
        "logp",
        "error control: logp = the log-density's own test; paper = one RMS norm over image and "
        "log-density, as the official code",
    )
    logp_atol: float | None = _knob(
        None,
        "log-density tolerance in nats, with tolerance=logp (None: 1e-4 bits/dim x d ln 2)",
        _POSITIVE,
    )
    elbo_importance_sampling: bool = _knob(
        True, "the SDE bound draws gamma by importance sampling (else uniformly)"
    )
    elbo_antithetic: bool = _knob(False, "the SDE bound stratifies its times within a batch")
    elbo_prior: ElboPrior = _knob("sigma_max", "the SDE bound's prior: sigma_max or unit")
    seed: int = _knob(
        0, "seed of the per-example noise: dequantization, probes, SDE bound", _NON_NEGATIVE
    )
    # the measured solver error (idode.certify, idode.calibration); None: off / automatic
    max_solver_error: float | None = _knob(
        None,
        "target solver error per image, bits/dim (e.g. 0.002): rtol, atol and logp_atol are "
        "calibrated for it on a few images first, replacing the given ones (None: off)",
        _POSITIVE,
    )
    solver_check: float | None = _knob(
        None,
        "jobs solved again 100x tighter (network in float64) to measure the solver error: a "
        "count N (an integer >= 1) or a fraction in (0, 1); 0: off; None: max(8, 2 percent) of "
        "the jobs (bits_per_dim: only with max_solver_error). It changes the check, not the "
        "bits/dim, so a resumed evaluation may change it",
        _COUNT_OR_FRACTION,
    )

    # ------------------------------------------------------------------------------------------
    # fields, validation, JSON
    # ------------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The protocol's settings, in field order (a subclass's extra fields excluded)."""
        return tuple(f.name for f in fields(Protocol))

    @classmethod
    def of(cls, obj: Any) -> Protocol:
        """The protocol held by ``obj`` (a Protocol, or an ``EvalConfig`` with more fields)."""
        return Protocol(**{n: getattr(obj, n) for n in Protocol.field_names()})

    def validate(self, prefix: str = "", error: type[Exception] = InputError) -> Protocol:
        """Check every setting (type, choice, range, combination); one ``error`` naming the knob
        as ``prefix + name`` (``eval.rtol``)."""
        hints = _hints()
        for f in fields(Protocol):
            _check_value(prefix + f.name, getattr(self, f.name), hints[f.name], f, error)
        if self.tolerance == "paper" and self.logp_atol is not None:
            raise error(
                f"{prefix}logp_atol has no effect with {prefix}tolerance=paper; drop one of them"
            )
        return self

    def replace(self, **given: Any) -> Protocol:
        """A copy with the ``given`` settings changed (an unknown name is refused)."""
        unknown = sorted(set(given) - set(self.field_names()))
        if unknown:
            raise InputError(
                f"unknown protocol setting(s) {', '.join(unknown)}; valid: "
                f"{', '.join(self.field_names())}"
            )
        return replace(self, **given)

    def to_json(self) -> dict[str, Any]:
        """``{setting: value}`` of every field, floats as floats (see the module docstring)."""
        hints = _hints()
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            if value is not None and float in (get_args(hints[name]) or (hints[name],)):
                value = float(value)
            out[name] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> Protocol:
        """The protocol of a ``to_json`` dict; a missing key takes its default, an unknown one
        is refused."""
        if not isinstance(data, dict):
            raise InputError(f"a protocol must be a JSON object, got {type(data).__name__}")
        return Protocol().replace(**data).validate()

    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the canonical JSON form: equal iff every setting is equal."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def differences(self, other: Protocol) -> list[str]:
        """'name: saved A, now B' for every setting where ``self`` (saved) and ``other`` differ."""
        a, b = self.to_json(), Protocol.of(other).to_json()
        return [f"{k}: saved {a[k]!r}, now {b[k]!r}" for k in a if a[k] != b[k]]

    # ------------------------------------------------------------------------------------------
    # what the settings mean
    # ------------------------------------------------------------------------------------------

    @property
    def bound_key(self) -> str:
        """The column of the reported bits/dim: the IW bound or the mean of single-draw bounds."""
        return "bpd_importance_weighted" if self.importance_weighted else "bpd_mean_of_bounds"

    def bounds(
        self,
        log_p_model: Tensor,
        log_decoder: Tensor,
        log_q: Tensor,
        expected_log_q: Tensor,
        num_dims: int,
    ) -> dict[str, Tensor]:
        """Bits/dim [...] from per-draw terms [..., K] (``dequantization_bounds``), with
        ``bpd``: the column this protocol reports."""
        cols = dequantization_bounds(
            log_p_model, log_decoder, log_q, expected_log_q, num_dims, self.analytic_entropy
        )
        return {"bpd": cols[self.bound_key], **cols}

    def solver_options(self, num_dims: int) -> dict[str, float]:
        """Keyword arguments of ``solve_ivp`` / ``solve_stream`` for images of ``num_dims``."""
        return solver_tolerances(self.tolerance, self.rtol, self.atol, self.logp_atol, num_dims)

    def elbo_options(self) -> dict[str, Any]:
        """Keyword arguments of ``idode.elbo`` for the SDE bound."""
        return dict(
            importance_sampling=self.elbo_importance_sampling,
            antithetic=self.elbo_antithetic,
            prior=self.elbo_prior,
        )

    def generators(
        self, indices: Any, device: torch.device | str = "cpu", purpose: str = "dequantization"
    ) -> list[torch.Generator]:
        """One random stream per example index from this protocol's seed: ``"dequantization"``
        (its dequantization draws and probe) or ``"elbo"`` (the SDE bound's noise)."""
        return example_generators(self.seed, indices, device, purpose=purpose)


def solver_tolerances(
    tolerance: Tolerance, rtol: float, atol: float, logp_atol: float | None, num_dims: int
) -> dict:
    """Keyword arguments of ``solve_ivp``/``solve_stream`` for a tolerance protocol."""
    check_choice("tolerance", tolerance, TOLERANCES)
    check_rtol(rtol)  # refuses what float64 cannot deliver; warns when the result is biased
    if tolerance == "paper":
        if logp_atol is not None:
            raise ValueError('logp_atol has no effect with tolerance="paper"; drop one of them')
        return dict(rtol=rtol, atol=atol)
    if logp_atol is None:
        logp_atol = LOGP_ATOL_BPD * num_dims * math.log(2.0)
    if not logp_atol > 0:
        raise ValueError(f"logp_atol must be positive (nats), got {logp_atol}")
    return dict(rtol=rtol, atol=atol, last_rtol=rtol, last_atol=float(logp_atol))


# --------------------------------------------------------------------------------------------------
# the fields as data: for validation and for generated command-line flags
# --------------------------------------------------------------------------------------------------


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Protocol)


@dataclass(frozen=True)
class Setting:
    """One protocol field as a command line sees it."""

    name: str
    kind: Literal["bool", "choice", "int", "float"]
    choices: tuple[str, ...]  # for kind "choice"
    range: str | None  # "positive" | "non_negative" | "count_or_fraction" | None
    optional: bool  # None is a valid value
    default: Any
    help: str


def settings_schema() -> list[Setting]:
    """Every protocol field, typed, in field order (``idode eval`` makes one flag of each)."""
    out = []
    for f in fields(Protocol):
        hint = _hints()[f.name]
        args = get_args(hint)
        if typing.get_origin(hint) is Literal:
            kind, choices = "choice", tuple(args)
        else:
            base = next(a for a in (args or (hint,)) if a is not type(None))
            kind, choices = base.__name__, ()
        out.append(
            Setting(
                f.name,
                kind,
                choices,
                f.metadata.get("range"),
                type(None) in args,
                f.default,
                f.metadata["help"],
            )
        )
    return out


def _check_value(key: str, value: Any, hint: Any, f: Any, error: type[Exception]) -> None:
    """Type, choice, finiteness and range of one setting."""
    args = get_args(hint)
    if typing.get_origin(hint) is Literal:
        check_choice(key, value, args, error=error)
        return
    allowed = args or (hint,)
    base = check_setting_type(key, value, hint, error)
    if value is None:
        return
    bound = f.metadata.get("range")
    if bound == _POSITIVE and not value > 0:
        need = ">= 1" if base is int else "> 0"
        raise error(
            f"{key} must be {need}{' or None' if type(None) in allowed else ''}, got {value!r}"
        )
    if bound == _NON_NEGATIVE and not value >= 0:
        raise error(f"{key} must be >= 0, got {value!r}")
    if bound == _COUNT_OR_FRACTION and not (0 <= value < 1 or value == int(value) >= 1):
        raise error(
            f"{key}={value!r} is neither a count nor a fraction; give an integer number of jobs "
            f"(e.g. 8), a fraction in (0, 1) (e.g. 0.02) or 0 (off)"
        )
