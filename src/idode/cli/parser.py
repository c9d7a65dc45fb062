"""The one argument parser of ``idode``: typed arguments checked before anything runs.

Each subcommand's arguments are added by its own function; every value a user can get wrong is
checked here (``POSITIVE_INT``, ``OUT_DIR``, ``DEVICE``, ...) and reported as a one-line usage
error, exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from idode.cli import commands

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line: ``idode: error: <problem>. See '<prog> --help'``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"idode: error: {message}. See '{self.prog} --help'.\n")


def _arg_type(name: str, check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` that runs ``check`` and reports its InputError as a usage error."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as e:  # InputError included
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _positive(text: str, integer: bool) -> int | float:
    from idode.validation import InputError, check_positive

    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise InputError(f"{text!r} is not {'an integer' if integer else 'a number'}") from None
    try:
        return check_positive("value", value, integer=integer)
    except InputError:
        raise InputError(
            f"must be a positive {'integer' if integer else 'number'}, got {text}"
        ) from None


def _non_negative(text: str) -> float:
    from idode.validation import InputError

    value = _arg_float(text)
    if not value >= 0 or value == float("inf"):
        raise InputError(f"must be a finite number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    from idode.validation import InputError

    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{text!r} is not an integer") from None
    if value < 0:
        raise InputError(f"must be an integer >= 0, got {text}")
    return value


def _integer(text: str) -> int:
    from idode.validation import InputError

    try:
        return int(text)
    except ValueError:
        raise InputError(f"{text!r} is not an integer") from None


def _finite(text: str) -> float:
    from idode.validation import InputError

    value = _arg_float(text)
    if not abs(value) < float("inf"):
        raise InputError(f"must be a finite number, got {text}")
    return value


def _arg_float(text: str) -> float:
    from idode.validation import InputError

    try:
        return float(text)
    except ValueError:
        raise InputError(f"{text!r} is not a number") from None


def _out_path(text: str, folder: bool) -> str:
    """An output folder (or file prefix) whose nearest existing ancestor is a folder."""
    from idode.validation import InputError

    path = Path(text).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{text!r} is an existing file; --out names a folder: choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(
                    f"{parent} in {text!r} is a file, not a folder: choose another path"
                )
            break
    return text


def _check_size(text: str) -> int | float:
    """A count (an integer, e.g. 8; 0: none) or a fraction in (0, 1) (e.g. 0.02)."""
    from idode.certify import num_check_jobs

    try:
        value: int | float = int(text)
    except ValueError:
        value = _arg_float(text)
    num_check_jobs(1, value)  # InputError naming both spellings
    return value


def _device(text: str) -> str:
    from idode.validation import check_device

    return check_device(text, name="")


DEVICE_HELP = "auto (default), cpu, cuda or cuda:N"


def _subset(text: str) -> str:
    from idode.data import parse_subset

    parse_subset(text, max_examples=1)  # the spelling; whether N is given is checked later
    return text


POSITIVE_INT = _arg_type("positive_int", lambda t: _positive(t, True))
POSITIVE_FLOAT = _arg_type("positive_float", lambda t: _positive(t, False))
NON_NEGATIVE_FLOAT = _arg_type("non_negative_float", _non_negative)
NON_NEGATIVE_INT = _arg_type("non_negative_int", lambda t: _non_negative_int(t))
FLOAT = _arg_type("float", lambda t: _finite(t))
COUNT_OR_FRACTION = _arg_type("count_or_fraction", _check_size)
INT = _arg_type("int", lambda t: _integer(t))
OUT_DIR = _arg_type("out_dir", lambda t: _out_path(t, True))
OUT_PREFIX = _arg_type("out_prefix", lambda t: _out_path(t, False))
DEVICE = _arg_type("device", _device)
SUBSET = _arg_type("subset", _subset)


_STOP_NOTE = (
    "SIGINT (Ctrl-C) or SIGTERM ends the current step, writes a checkpoint and exits with code "
    "130 or 143 (128 + signal); --resume continues exactly."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``idode`` parser: one subparser per command, each command's ``fn`` its cmd_ function."""
    p = _Parser(
        prog="idode",
        description="Maximum-likelihood diffusion ODEs (i-DODE): train, finetune, evaluate "
        "exact bits/dim, sample.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_finetune, _add_eval, _add_sample, _add_demo, _add_ablate):
        add(sub)
    _add_convert(sub)
    _add_compare(sub)
    return p


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_network_flags(sp: argparse.ArgumentParser) -> None:
    from idode.precision import PRECISIONS

    sp.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the network (default: checkpoint's model.compile)",
    )
    sp.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="the network's arithmetic (default fp32, whatever the model was trained in: bf16 "
        "moves bits/dim by ~0.02, see README)",
    )


def _add_train(sub) -> None:
    from idode.presets import PRESETS

    t = sub.add_parser(
        "train",
        help="first-order training (velocity + likelihood weighting + IS)",
        description="First-order training. " + _STOP_NOTE,
    )
    t.add_argument("--config", help=f"preset ({', '.join(PRESETS)}) or a config JSON file")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=1000"
    )
    t.add_argument("--out", required=True, type=OUT_DIR, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier run in --out (checkpoints, metrics, tb/, config.json)",
    )
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument(
        "--compile", action="store_true", help="torch.compile the network (= --set model.compile=1)"
    )
    _common(t)
    t.set_defaults(fn=commands.cmd_train)


def _add_finetune(sub) -> None:
    f = sub.add_parser(
        "finetune",
        help="second-order flow-matching finetuning of a checkpoint",
        description="Second-order finetuning of a checkpoint into a new run. " + _STOP_NOTE,
    )
    f.add_argument("--from", dest="source", required=True, help="checkpoint or run directory")
    f.add_argument(
        "--out", required=True, type=OUT_DIR, help="run directory of the finetuned model"
    )
    f.add_argument(
        "--steps", type=POSITIVE_INT, default=1000, help="extra optimizer steps (default 1000)"
    )
    f.add_argument("--weight", type=NON_NEGATIVE_FLOAT, default=0.1, help="lambda_2 (default 0.1)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE")
    f.add_argument("--resume", action="store_true", help="continue an interrupted finetuning")
    f.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    f.add_argument("--dry-run", action="store_true")
    _common(f)
    f.set_defaults(fn=commands.cmd_finetune)


def _add_eval(sub) -> None:
    from idode.choices import DATASETS, SPLITS

    e = sub.add_parser(
        "eval",
        help="ODE bits/dim over a split (EMA weights) + the SDE bound",
        description="The evaluation protocol (idode.Protocol: dequantization, K, bound, "
        "divergence, solver and tolerances, SDE bound, seed) and the batch size come from the "
        "checkpoint's eval config (the presets carry the official protocols); each flag given "
        "overrides it. Rerunning into the same --out resumes; another protocol, other weights "
        "or other data there are refused.",
    )
    e.add_argument(
        "--checkpoint",
        required=True,
        help="idode checkpoint or run directory, or a diffusers model folder (with --data)",
    )
    e.add_argument(
        "--out",
        type=OUT_DIR,
        help="output directory (default: RUN/evals/step_N_SPLIT_DEQ...; for a diffusers "
        "folder ./evals/FOLDER_DATA_SPLIT_DEQ...)",
    )
    e.add_argument("--split", default="test", choices=list(SPLITS))
    _add_protocol_flags(e)
    e.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        help="rows per network call, refilled as solves end (default: checkpoint)",
    )
    e.add_argument("--max-examples", type=POSITIVE_INT, default=None)
    e.add_argument(
        "--subset",
        type=SUBSET,
        default="first",
        metavar="first|random[:SEED]",
        help="which --max-examples N: the first N (default) or N at random (seed 0 unless given)",
    )
    e.add_argument("--data-root", default=None, help="override the dataset directory")
    e.add_argument(
        "--data",
        choices=list(DATASETS),
        help="dataset (needed for a diffusers folder); 'folder': image files in data.path=DIR",
    )
    e.add_argument(
        "--set", action="append", metavar="data.KEY=VALUE", help="data override, e.g. data.root=DIR"
    )
    e.add_argument("--no-elbo", action="store_true", help="skip the SDE bound")
    e.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    e.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)
    _add_network_flags(e)
    e.add_argument("--overwrite", action="store_true", help="discard earlier partial results")
    _common(e)
    e.set_defaults(fn=commands.cmd_eval)


def _add_protocol_flags(e: argparse.ArgumentParser) -> None:
    """One flag per field of ``idode.Protocol``, with its help; None (not given): the
    checkpoint's value."""
    from idode.protocol import settings_schema

    number = {("int", "positive"): POSITIVE_INT, ("float", "positive"): POSITIVE_FLOAT,
              ("int", "non_negative"): NON_NEGATIVE_INT,
              ("float", "non_negative"): NON_NEGATIVE_FLOAT,
              ("float", "count_or_fraction"): COUNT_OR_FRACTION,
              ("int", None): INT, ("float", None): FLOAT}  # fmt: skip
    for s in settings_schema():
        flag, help_ = "--" + s.name.replace("_", "-"), f"{s.help} (default: checkpoint)"
        if s.kind == "bool":
            e.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif s.kind == "choice":
            e.add_argument(flag, choices=list(s.choices), help=help_)
        else:
            e.add_argument(flag, type=number[(s.kind, s.range)], help=help_)


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="ODE samples as a PNG grid and an .npz of integers")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("-n", type=POSITIVE_INT, default=64, help="number of samples")
    s.add_argument(
        "--out", type=OUT_PREFIX, help="output prefix (default: RUN/samples/step_N_seedS)"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rtol", type=POSITIVE_FLOAT, default=1e-5)
    s.add_argument("--atol", type=POSITIVE_FLOAT, default=1e-5)
    s.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    s.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)
    s.add_argument("--overwrite", action="store_true", help="replace earlier samples at --out")
    _common(s)
    s.set_defaults(fn=commands.cmd_sample)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="train + evaluate on scikit-learn digits, write report.md")
    d.add_argument(
        "--out", type=OUT_DIR, default="runs/demo", help="run directory (default runs/demo)"
    )
    from idode.experiments.demo import DEMO_QUICK_STEPS, DEMO_STEPS

    d.add_argument(
        "--steps",
        type=POSITIVE_INT,
        default=None,
        help=f"training steps (default {DEMO_STEPS}; {DEMO_QUICK_STEPS} with --quick)",
    )
    d.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another run (or other settings) in --out; files the demo does not write "
        "are never deleted",
    )
    _common(d)
    d.set_defaults(fn=commands.cmd_demo)


def _add_ablate(sub) -> None:
    a = sub.add_parser(
        "ablate",
        help="the paper's ablations at small scale, with a report (or --render one again)",
    )
    a.add_argument("--preset", default="digits", choices=["digits", "mnist"])
    what = a.add_mutually_exclusive_group(required=True)  # argparse's own usage error if neither
    what.add_argument("--out", type=OUT_DIR, help="output folder of the run (or --render)")
    a.add_argument(
        "--steps", type=POSITIVE_INT, default=None, help="base training steps of every run"
    )
    a.add_argument("--quick", action="store_true", help="a < 5 minute smoke version")
    a.add_argument(
        "--workers", type=POSITIVE_INT, default=None, help="processes (default min(2, cpus))"
    )
    what.add_argument(
        "--render", metavar="RESULTS_JSON", help="only re-render figures and report from this file"
    )
    a.add_argument(
        "--docs", metavar="DIR", help="also write results.json, figures/, results.md there"
    )
    _common(a)
    a.set_defaults(fn=commands.cmd_ablate)


def _add_convert(sub) -> None:
    from idode.presets import PRESETS

    c = sub.add_parser("convert", help="an official i-DODE / VDM Flax checkpoint -> idode run dir")
    c.add_argument("ckpt", help="a clu ckpt-N.flax file, or a directory (its newest ckpt-*.flax)")
    c.add_argument(
        "--config", required=True, help=f"preset ({', '.join(PRESETS)}) or a config JSON file"
    )
    c.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="e.g. model.parameterization=eps"
    )
    c.add_argument("--out", required=True, type=OUT_DIR, help="the idode run directory to create")
    c.set_defaults(fn=commands.cmd_convert)


def _add_compare(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="paired difference of two evaluations of the same examples, with a report",
        description="The per-example difference A - B of two `idode eval` folders of the same "
        "examples (refused when the evaluated data differ): paired 95% interval, scatter plot, "
        "the solver error of each side. Writes report.md, compare.json and scatter.png.",
    )
    c.add_argument("eval_a", metavar="EVAL_A", help="an evaluation folder (or its eval.json)")
    c.add_argument("eval_b", metavar="EVAL_B", help="the other evaluation of the same examples")
    c.add_argument(
        "--out", type=OUT_DIR, help="output folder (default: compare_A_vs_B beside EVAL_A)"
    )
    c.set_defaults(fn=commands.cmd_compare)
