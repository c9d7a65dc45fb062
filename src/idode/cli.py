"""The ``idode`` command line: parse -> config -> call. Also ``python -m idode``.

idode train    --config PRESET|FILE.json [--set key=value ...] --out RUN_DIR [--resume|--overwrite]
idode finetune --from RUN_DIR/checkpoint --out RUN_DIR2 [--steps N] [--weight 0.1] [--resume]
idode eval     --checkpoint CKPT [--dequantization ...] [--num-samples K] [--out DIR]
idode eval     --checkpoint DIFFUSERS_DIR --data NAME [--set data.root=DIR]
idode sample   --checkpoint CKPT -n 64 [--out PREFIX]
idode demo     [--out DIR]
idode ablate   --preset digits [--quick] --out DIR [--docs DIR]
idode ablate   --render RESULTS_JSON [--docs DIR]
idode convert  CKPT.flax --config PRESET [--set key=value ...] --out DIR

Exit status: 0 done; 2 a user error, told in one line ``idode: error: <problem>: <fix>``; 130
interrupted; 141 the reader of stdout went away (``| head``). A traceback means a bug (or
IDODE_DEBUG=1, which shows one for every error).

train and finetune stop cleanly on SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send
before killing a job): the current step ends, a checkpoint is written, one line says where, and
the exit code is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), so a scheduler sees
an unfinished job; ``--resume`` then continues exactly.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "user_error_message"]


def _load_config(spec: str, overrides: list[str] | None):
    from idode.config import PRESETS, ConfigError, apply_overrides, config_from_dict, get_preset

    if spec in PRESETS:
        cfg = get_preset(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
            )
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"--config {path} must hold a JSON object of config sections")
        cfg = config_from_dict(obj)
    return apply_overrides(cfg, overrides)


def _run_guards(args: argparse.Namespace) -> None:
    from idode.config import ConfigError

    if args.resume and args.overwrite:
        raise ConfigError(
            "--resume continues the run in --out and --overwrite discards it: pass one of them"
        )


def _train(args: argparse.Namespace, cfg, **kw) -> int:
    """train(); a SIGINT/SIGTERM stop is one line on stderr and exit code 128 + signal."""
    from idode.train import TrainingStopped, train

    try:
        res = train(
            cfg,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **kw,
        )
    except TrainingStopped as e:
        if e.checkpoint is not None:  # rank 0 of a multi-process run says it once
            print(f"idode {args.command}: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    _done(res)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from idode.checkpoint import load_newest_intact
    from idode.config import ConfigError, apply_overrides, dumps

    _run_guards(args)
    if args.resume:
        ck, _ = load_newest_intact(args.out)  # train() names a damaged newer checkpoint
        cfg = apply_overrides(ck.config, args.set)
    else:
        if args.config is None:
            raise ConfigError("--config PRESET|FILE is required (or --resume to continue --out)")
        cfg = _load_config(args.config, args.set)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    return _train(args, cfg)


def cmd_finetune(args: argparse.Namespace) -> int:
    from idode.checkpoint import load_checkpoint
    from idode.config import ConfigError, apply_overrides, dumps
    from idode.train import finetune_config

    _run_guards(args)
    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive number of extra steps, got {args.steps}")
    ck = load_checkpoint(args.source)
    cfg = finetune_config(ck.config, ck.step, args.steps, args.weight)
    cfg = apply_overrides(cfg, args.set)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    print(
        f"finetuning {ck.path} (step {ck.step}) with the second-order term, lambda_2="
        f"{cfg.train.second_order_weight}, to step {cfg.train.steps}"
    )
    return _train(args, cfg, init_from=ck.path)


def _done(res) -> None:
    if res.metrics:
        print(json.dumps({k: round(v, 5) for k, v in res.metrics.items()}, indent=1))
    print(f"run directory: {res.run_dir}  (checkpoint: {res.checkpoint})")


def cmd_eval(args: argparse.Namespace) -> int:
    from idode.evaluate import EVAL_FLAGS, evaluate

    result = evaluate(
        args.checkpoint,
        args.out,
        split=args.split,
        max_examples=args.max_examples,
        data_root=args.data_root,
        data=args.data,
        overrides=args.set,
        with_elbo=not args.no_elbo,
        ema=not args.raw_weights,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        **{k: getattr(args, k) for k in EVAL_FLAGS},
    )
    print(_bpd_line(result))
    print(f"results: {Path(result['out_dir']) / 'eval.json'}")
    return 0


def _bpd_line(result: dict) -> str:
    """'truncated_normal (K=5) bits/dim: mean +- SE (95% CI ..)', or the value alone for n = 1."""
    st, bpd = result["settings"], result["bpd"]
    what = st["dequantization"] + (f", K={st['num_samples']}" if st["num_samples"] > 1 else "")
    what += ", importance-weighted" if st["importance_weighted"] else ""
    if bpd["stderr"] is None:
        return f"{what} bits/dim: {bpd['mean']:.4f} (n=1: the interval needs n >= 2 examples)"
    return (
        f"{what} bits/dim: {bpd['mean']:.4f} +- {bpd['stderr']:.4f} "
        f"(95% CI {bpd['ci95'][0]:.4f} .. {bpd['ci95'][1]:.4f}, n={bpd['n']})"
    )


def cmd_sample(args: argparse.Namespace) -> int:
    from idode.sampling import sample_to_files

    res = sample_to_files(
        args.checkpoint,
        args.out,
        args.n,
        seed=args.seed,
        rtol=args.rtol,
        atol=args.atol,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    print(json.dumps({k: str(v) for k, v in res.items()}, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from idode.experiments.demo import run_demo

    run_demo(args.out, steps=args.steps, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from idode.experiments.ablate import render_docs, run_ablation

    if args.render:
        path = render_docs(args.render, args.docs or Path(args.render).parent)
        print(f"wrote {path}")
        return 0
    if not args.out:
        raise SystemExit("idode ablate: --out DIR is required (or --render RESULTS_JSON)")
    run_ablation(
        args.preset,
        args.out,
        steps=args.steps,
        quick=args.quick,
        progress=not args.no_progress,
        workers=args.workers,
        docs_dir=args.docs,
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from idode.convert import convert_checkpoint

    cfg = _load_config(args.config, args.set)
    out = convert_checkpoint(args.ckpt, args.out, cfg)
    print(f"converted {args.ckpt} -> {out}  (idode eval --checkpoint {out})")
    return 0


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


def _device(text: str) -> str:
    from idode.validation import check_device

    return check_device(text, name="")


DEVICE_HELP = "auto (default), cpu, cuda or cuda:N"
POSITIVE_INT = _arg_type("positive_int", lambda t: _positive(t, True))
POSITIVE_FLOAT = _arg_type("positive_float", lambda t: _positive(t, False))
NON_NEGATIVE_FLOAT = _arg_type("non_negative_float", _non_negative)
OUT_DIR = _arg_type("out_dir", lambda t: _out_path(t, True))
OUT_PREFIX = _arg_type("out_prefix", lambda t: _out_path(t, False))
DEVICE = _arg_type("device", _device)


_STOP_NOTE = (
    "SIGINT (Ctrl-C) or SIGTERM ends the current step, writes a checkpoint and exits with code "
    "130 or 143 (128 + signal); --resume continues exactly."
)


def build_parser() -> argparse.ArgumentParser:
    from idode.config import PRESETS
    from idode.data import DATASETS, SPLITS
    from idode.dequantization import DEQUANTIZATIONS
    from idode.likelihood import DIVERGENCES

    p = _Parser(
        prog="idode",
        description="Maximum-likelihood diffusion ODEs (i-DODE): train, finetune, evaluate "
        "exact bits/dim, sample.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

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
    common(t)
    t.set_defaults(fn=cmd_train)

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
    common(f)
    f.set_defaults(fn=cmd_finetune)

    e = sub.add_parser(
        "eval",
        help="ODE bits/dim over a split (EMA weights) + the SDE bound",
        description="The evaluation protocol (dequantization, K, importance weighting, "
        "divergence, tolerances, batch size, seed) comes from the checkpoint's eval config "
        "(the presets carry the official protocols); each flag given overrides it.",
    )
    e.add_argument(
        "--checkpoint",
        required=True,
        help="idode checkpoint or run directory, or a diffusers model folder (with --data)",
    )
    e.add_argument(
        "--out", type=OUT_DIR, help="output directory (default: RUN/evals/step_N_SPLIT_DEQ...)"
    )
    e.add_argument("--split", default="test", choices=list(SPLITS))
    e.add_argument("--dequantization", choices=list(DEQUANTIZATIONS), help="default: checkpoint")
    e.add_argument("--num-samples", type=POSITIVE_INT, help="K draws (default: checkpoint)")
    e.add_argument(
        "--importance-weighted",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="report the IW bound with -log K (default: checkpoint)",
    )
    e.add_argument("--divergence", choices=list(DIVERGENCES), help="default: checkpoint")
    e.add_argument(
        "--rtol", type=POSITIVE_FLOAT, help="ODE relative tolerance (default: checkpoint)"
    )
    e.add_argument(
        "--atol", type=POSITIVE_FLOAT, help="ODE absolute tolerance (default: checkpoint)"
    )
    e.add_argument("--batch-size", type=POSITIVE_INT, help="images per solve (default: checkpoint)")
    e.add_argument("--seed", type=int, help="noise and probe seed (default: checkpoint)")
    e.add_argument("--max-examples", type=POSITIVE_INT, default=None)
    e.add_argument("--data-root", default=None, help="override the dataset directory")
    e.add_argument("--data", choices=list(DATASETS), help="dataset (needed for a diffusers folder)")
    e.add_argument(
        "--set", action="append", metavar="data.KEY=VALUE", help="data override, e.g. data.root=DIR"
    )
    e.add_argument("--no-elbo", action="store_true", help="skip the SDE bound")
    e.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    e.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)
    e.add_argument("--overwrite", action="store_true", help="discard earlier partial results")
    common(e)
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="ODE samples as a PNG grid and an .npz of integers")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("-n", type=POSITIVE_INT, default=64, help="number of samples")
    s.add_argument("--out", type=OUT_PREFIX, help="output prefix (default: RUN/samples/step_N)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rtol", type=POSITIVE_FLOAT, default=1e-5)
    s.add_argument("--atol", type=POSITIVE_FLOAT, default=1e-5)
    s.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    s.add_argument("--device", type=DEVICE, default="auto", help=DEVICE_HELP)
    common(s)
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train + evaluate on scikit-learn digits, write report.md")
    d.add_argument(
        "--out", type=OUT_DIR, default="runs/demo", help="run directory (default runs/demo)"
    )
    d.add_argument(
        "--steps", type=POSITIVE_INT, default=None, help="training steps (default: preset)"
    )
    d.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    common(d)
    d.set_defaults(fn=cmd_demo)

    a = sub.add_parser(
        "ablate",
        help="the paper's ablations at small scale, with a report (or --render one again)",
    )
    a.add_argument("--preset", default="digits", choices=["digits", "mnist"])
    a.add_argument(
        "--out", type=OUT_DIR, help="output folder of the run (required unless --render)"
    )
    a.add_argument(
        "--steps", type=POSITIVE_INT, default=None, help="base training steps of every run"
    )
    a.add_argument("--quick", action="store_true", help="a < 5 minute smoke version")
    a.add_argument(
        "--workers", type=POSITIVE_INT, default=None, help="processes (default min(2, cpus))"
    )
    a.add_argument(
        "--render", metavar="RESULTS_JSON", help="only re-render figures and report from this file"
    )
    a.add_argument(
        "--docs", metavar="DIR", help="also write results.json, figures/, results.md there"
    )
    common(a)
    a.set_defaults(fn=cmd_ablate)
    _add_convert_parser(sub)
    return p


def _add_convert_parser(sub) -> None:
    from idode.config import PRESETS

    c = sub.add_parser("convert", help="an official i-DODE / VDM Flax checkpoint -> idode run dir")
    c.add_argument("ckpt", help="a clu ckpt-N.flax file, or a directory (its newest ckpt-*.flax)")
    c.add_argument(
        "--config", required=True, help=f"preset ({', '.join(PRESETS)}) or a config JSON file"
    )
    c.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="e.g. model.parameterization=eps"
    )
    c.add_argument("--out", required=True, type=OUT_DIR, help="the idode run directory to create")
    c.set_defaults(fn=cmd_convert)


def user_error_message(e: BaseException, out: str | None = None) -> str | None:
    """The one-line message for a known user error, or None for a bug (which shows a traceback).

    ``out`` is the command's output path, named when a full disk gives no file name.
    """
    from idode.checkpoint import CheckpointError
    from idode.config import ConfigError
    from idode.train import TrainingDiverged
    from idode.validation import InputError

    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or (isinstance(e, RuntimeError) and "No space left on device" in str(e)):
        name = getattr(e, "filename", None)  # None for a write to an open file or to stdout
        where = name or (f"{out} or the standard output" if out else "the output")
        return f"no space left on the device writing {where}: free space and rerun"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}; choose a path you may write to"
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"{e.filename} not found: check the path"
    if isinstance(
        e, ConfigError | InputError | CheckpointError | TrainingDiverged | FileNotFoundError
    ):
        return " ".join(str(e).split())  # one line
    return None


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        e.filename = e.filename or "the standard output"
        raise


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured by a test)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one ``idode`` command; exit status 0, or 2 with one line for a user error.

    A traceback is shown only for a bug, or for every error when IDODE_DEBUG=1.
    """
    args = None
    try:
        args = build_parser().parse_args(argv)
        code = int(args.fn(args) or 0)
        _flush_stdout()  # a closed pipe (``| head``) fails here, inside the handler
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a reader closing the pipe means for any Unix tool
    except KeyboardInterrupt:
        print("idode: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error_message(e, getattr(args, "out", None))
        if message is None or os.environ.get("IDODE_DEBUG", "") not in ("", "0"):
            raise
        try:
            print(f"idode: error: {message}", file=sys.stderr)
        except BrokenPipeError:
            pass
        return 2


if __name__ == "__main__":
    sys.exit(main())
