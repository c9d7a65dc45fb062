"""What each ``idode`` subcommand does once its arguments are parsed: config -> call a loop."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = [
    "cmd_ablate",
    "cmd_compare",
    "cmd_convert",
    "cmd_demo",
    "cmd_eval",
    "cmd_finetune",
    "cmd_sample",
    "cmd_train",
]


def _load_config(spec: str, overrides: list[str] | None):
    from idode.config import ConfigError, apply_overrides, config_from_dict
    from idode.presets import PRESETS, get_preset

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
    if _is_main_process():  # other ranks have no checkpoint path to report
        _done(res)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from idode.checkpoint import read_config
    from idode.config import ConfigError, apply_overrides, dumps

    _run_guards(args)
    if args.compile:
        args.set = [*(args.set or []), "model.compile=true"]
    if args.resume:
        # the settings only: train() loads and verifies the checkpoint (naming a damaged one)
        saved = read_config(args.out)[2]
        cfg = apply_overrides(saved, args.set)
        if args.config is not None:
            _check_resume_config(_load_config(args.config, args.set), cfg)
    else:
        if args.config is None:
            raise ConfigError("--config PRESET|FILE is required (or --resume to continue --out)")
        cfg = _load_config(args.config, args.set)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    return _train(args, cfg)


def _check_resume_config(given, resumed) -> None:
    """--config with --resume: refused unless it says what the run (with --set) already is."""
    from idode.config import ConfigError, config_differences
    from idode.runguard import absolute_data_paths

    sections = ("model", "data", "train", "eval")
    diff = config_differences(resumed, absolute_data_paths(given), sections)
    if (given.preset or None) != (resumed.preset or None):
        diff.insert(0, f"preset (checkpoint {resumed.preset!r}, now {given.preset!r})")
    if diff:
        raise ConfigError(
            f"--resume continues the run with its own settings, but --config differs from them: "
            f"{diff[0]}{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}; drop --config "
            f"(and change a setting with --set KEY=VALUE)"
        )


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
        subset=args.subset,
        data_root=args.data_root,
        data=args.data,
        overrides=args.set,
        with_elbo=not args.no_elbo,
        ema=not args.raw_weights,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        compile=args.compile,
        precision=args.precision,
        **{k: getattr(args, k) for k in EVAL_FLAGS},
    )
    if _is_main_process():  # every rank returns the result; rank 0 says it
        print("\n".join(_eval_summary(result)))
    return 0


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _eval_summary(result: dict) -> list[str]:
    """The end-of-eval lines: bits/dim, the SDE bound, NFE, wall time, solver error, the file."""
    lines = [_bpd_line(result)]
    elbo = result.get("elbo")
    if elbo:
        se = f" +- {elbo['stderr']:.4f}" if elbo.get("stderr") is not None else ""
        lines.append(f"SDE bound (ELBO) bits/dim: {elbo['mean']:.4f}{se}")
    nfe = result.get("nfe") or {}
    if nfe:
        lines.append(
            f"NFE per image: mean {nfe['per_example_mean']:.0f} (min {nfe['per_example_min']}, "
            f"max {nfe['per_example_max']}); wall time {result.get('wall_seconds', 0.0):.1f} s"
        )
    err = result.get("local_error_estimate")
    if err:
        lines.append(
            f"solver error estimate: mean {err['bpd_mean']:.2g}, max {err['bpd_max']:.2g} "
            f"bits/dim (the solver's own local estimate)"
        )
    lines.append(f"results: {Path(result['out_dir']) / 'eval.json'}")
    return lines


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
    from idode.write_samples import sample_to_files

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
        overwrite=args.overwrite,
    )
    print(json.dumps({k: str(v) for k, v in res.items()}, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from idode.experiments.demo import run_demo
    from idode.train import TrainingStopped

    try:
        run_demo(
            args.out,
            steps=args.steps,
            quick=args.quick,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except TrainingStopped as e:  # SIGINT / SIGTERM while training: a checkpoint was written
        print(
            f"idode demo: stopped at step {e.step} with a checkpoint; the same command "
            f"continues it",
            file=sys.stderr,
            flush=True,
        )
        return 128 + e.signum
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from idode.experiments.ablate import render_docs, run_ablation

    if args.render:
        path = render_docs(args.render, args.docs or Path(args.render).parent)
        print(f"wrote {path}")
        return 0
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


def cmd_compare(args: argparse.Namespace) -> int:
    from idode.compare import compare, summary_line

    report = compare(args.eval_a, args.eval_b, args.out)
    print(summary_line(report))
    print(f"report: {report['files']['report']}")
    return 0
