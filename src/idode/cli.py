"""The ``idode`` command line: parse -> config -> call. Also ``python -m idode``.

idode train    --config PRESET|FILE.json [--set key=value ...] --out RUN_DIR [--resume]
idode finetune --from RUN_DIR/checkpoint --out RUN_DIR2 [--steps N] [--weight 0.1]
idode eval     --checkpoint CKPT [--dequantization ...] [--num-samples K] [--out DIR]
idode sample   --checkpoint CKPT -n 64 [--out PREFIX]
idode demo     [--out DIR]
idode ablate   --preset digits [--quick] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


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
            cfg = config_from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return apply_overrides(cfg, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from idode.checkpoint import load_checkpoint
    from idode.config import apply_overrides, dumps
    from idode.train import train

    if args.resume:
        ck = load_checkpoint(args.out)
        cfg = apply_overrides(ck.config, args.set)
    else:
        if args.config is None:
            raise SystemExit("idode train: --config PRESET|FILE is required (or --resume)")
        cfg = _load_config(args.config, args.set)
        if not args.dry_run and (Path(args.out) / "checkpoint").exists():
            raise SystemExit(
                f"idode train: {args.out} already holds a run; use --resume to continue it or "
                f"choose another --out"
            )
    if args.dry_run:
        print(dumps(cfg))
        return 0
    res = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    _done(res)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from idode.checkpoint import load_checkpoint
    from idode.config import apply_overrides, dumps
    from idode.train import finetune_config, train

    ck = load_checkpoint(args.source)
    cfg = finetune_config(ck.config, ck.step, args.steps, args.weight)
    cfg = apply_overrides(cfg, args.set)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    print(
        f"finetuning {ck.path} (step {ck.step}) with the second-order term, lambda_2="
        f"{cfg.train.second_order_weight}, to step {cfg.train.steps}",
        file=sys.stderr,
    )
    res = train(cfg, args.out, init_from=ck.path, resume=args.resume, progress=not args.no_progress)
    _done(res)
    return 0


def _done(res) -> None:
    if res.metrics:
        print(json.dumps({k: round(v, 5) for k, v in res.metrics.items()}, indent=1))
    print(f"run directory: {res.run_dir}  (checkpoint: {res.checkpoint})")


def cmd_eval(args: argparse.Namespace) -> int:
    from idode.evaluate import evaluate

    out = args.out or str(Path(args.checkpoint) / f"eval_{args.split}_{args.dequantization}")
    result = evaluate(
        args.checkpoint,
        out,
        split=args.split,
        dequantization=args.dequantization,
        num_samples=args.num_samples,
        importance_weighted=args.importance_weighted,
        divergence=args.divergence,
        rtol=args.rtol,
        atol=args.atol,
        batch_size=args.batch_size,
        seed=args.seed,
        tolerance=args.tolerance,
        logp_atol=args.logp_atol,
        max_examples=args.max_examples,
        data_root=args.data_root,
        with_elbo=not args.no_elbo,
        ema=not args.raw_weights,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    bpd = result["bpd"]
    print(
        f"{args.dequantization} bits/dim: {bpd['mean']:.4f} +- {bpd['stderr']:.4f} "
        f"(95% CI {bpd['ci95'][0]:.4f} .. {bpd['ci95'][1]:.4f}, n={bpd['n']})"
    )
    print(f"results: {Path(out) / 'eval.json'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from idode.sampling import sample_to_files

    prefix = args.out or str(Path(args.checkpoint) / "samples")
    res = sample_to_files(
        args.checkpoint,
        prefix,
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
    from idode.demo import run_demo

    run_demo(args.out, steps=args.steps, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from idode.ablate import run_ablation

    run_ablation(
        args.preset, args.out, steps=args.steps, quick=args.quick, progress=not args.no_progress
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from idode.config import PRESETS

    p = argparse.ArgumentParser(
        prog="idode",
        description="Maximum-likelihood diffusion ODEs (i-DODE): train, finetune, evaluate "
        "exact bits/dim, sample.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="first-order training (velocity + likelihood weighting + IS)")
    t.add_argument("--config", help=f"preset ({', '.join(PRESETS)}) or a config JSON file")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=1000"
    )
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    common(t)
    t.set_defaults(fn=cmd_train)

    f = sub.add_parser("finetune", help="second-order flow-matching finetuning of a checkpoint")
    f.add_argument("--from", dest="source", required=True, help="checkpoint or run directory")
    f.add_argument("--out", required=True, help="run directory of the finetuned model")
    f.add_argument("--steps", type=int, default=1000, help="extra optimizer steps (default 1000)")
    f.add_argument("--weight", type=float, default=0.1, help="lambda_2 (default 0.1)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE")
    f.add_argument("--resume", action="store_true", help="continue an interrupted finetuning")
    f.add_argument("--dry-run", action="store_true")
    common(f)
    f.set_defaults(fn=cmd_finetune)

    e = sub.add_parser("eval", help="ODE bits/dim over a split (EMA weights) + the SDE bound")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", help="output directory (default: CHECKPOINT/eval_SPLIT_DEQ)")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument(
        "--dequantization",
        default="truncated_normal",
        choices=["truncated_normal", "uniform", "variational"],
    )
    e.add_argument("--num-samples", type=int, default=1, help="K dequantization draws")
    e.add_argument("--importance-weighted", action="store_true", help="report the IW bound")
    e.add_argument(
        "--divergence", default="rademacher", choices=["exact", "rademacher", "gaussian"]
    )
    e.add_argument("--rtol", type=float, default=1e-5)
    e.add_argument("--atol", type=float, default=1e-5)
    e.add_argument(
        "--batch-size", type=int, default=256, help="rows per network call, refilled as they end"
    )
    e.add_argument(
        "--tolerance",
        default="logp",
        choices=["logp", "paper"],
        help="error control: logp = own test for the log-density; paper = one RMS norm",
    )
    e.add_argument("--logp-atol", type=float, default=None, help="log-density tolerance, nats")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--data-root", default=None, help="override the dataset directory")
    e.add_argument("--no-elbo", action="store_true", help="skip the SDE bound")
    e.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    e.add_argument("--device", default="auto")
    e.add_argument("--overwrite", action="store_true", help="discard earlier partial results")
    common(e)
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="ODE samples as a PNG grid and an .npz of integers")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("-n", type=int, default=64, help="number of samples")
    s.add_argument("--out", help="output prefix (default: CHECKPOINT/samples)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rtol", type=float, default=1e-5)
    s.add_argument("--atol", type=float, default=1e-5)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    common(s)
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train + evaluate on scikit-learn digits, write report.md")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    d.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    common(d)
    d.set_defaults(fn=cmd_demo)

    a = sub.add_parser("ablate", help="the paper's ablations at small scale, with a report")
    a.add_argument("--preset", default="digits", choices=["digits", "mnist"])
    a.add_argument("--out", required=True)
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--quick", action="store_true", help="a < 5 minute smoke version")
    common(a)
    a.set_defaults(fn=cmd_ablate)
    return p


def main(argv: list[str] | None = None) -> int:
    from idode.checkpoint import CheckpointError
    from idode.config import ConfigError
    from idode.train import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError) as e:
        print(f"idode {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
