"""What each ``idode`` subcommand does once its arguments are parsed: config -> call a loop."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = [
    "cmd_ablate",
    "cmd_convert",
    "cmd_demo",
    "cmd_eval",
    "cmd_finetune",
    "cmd_sample",
    "cmd_train",
]


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
    from idode.checkpoint import read_config
    from idode.config import ConfigError, apply_overrides, dumps

    _run_guards(args)
    if args.resume:
        # the settings only: train() loads and verifies the checkpoint (naming a damaged one)
        cfg = apply_overrides(read_config(args.out)[2], args.set)
    else:
        if args.config is None:
            raise ConfigError("--config PRESET|FILE is required (or --resume to continue --out)")
        cfg = _load_config(args.config, args.set)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    return _train(args, cfg)


def cmd_finetune(args: argparse.Namespace) -> int:
    from idode.checkpoint import read_config
    from idode.config import apply_overrides, dumps
    from idode.train import finetune_config

    _run_guards(args)  # --steps is positive by its argument type
    path, step, saved = read_config(args.source)  # train() loads and verifies the tensors
    cfg = finetune_config(saved, step, args.steps, args.weight)
    cfg = apply_overrides(cfg, args.set)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    print(
        f"finetuning {path} (step {step}) with the second-order term, lambda_2="
        f"{cfg.train.second_order_weight}, to step {cfg.train.steps}"
    )
    return _train(args, cfg, init_from=path)


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
        max_solver_error=args.max_solver_error,
        solver_check=args.solver_check,
        **{k: getattr(args, k) for k in EVAL_FLAGS},
    )
    print(_bpd_line(result))
    print(f"results: {Path(result['out_dir']) / 'eval.json'}")
    return 0


def _bpd_line(result: dict) -> str:
    """'truncated_normal (K=5) bits/dim: mean +- SE (95% CI ..); solver error max .., mean ..'."""
    from idode.certify import summary_line

    return f"{_interval_line(result)}; {summary_line(result.get('solver_error'))}"


def _interval_line(result: dict) -> str:
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
