"""The ``idode`` command line: parse -> config -> call. Also ``python -m idode``.

idode train    --config PRESET|FILE.json [--set key=value ...] --out RUN_DIR [--resume|--overwrite]
idode finetune --from RUN_DIR/checkpoint --out RUN_DIR2 [--steps N] [--weight 0.1] [--resume]
idode eval     --checkpoint CKPT [--dequantization ...] [--num-samples K] [--out DIR]
idode eval     --checkpoint DIFFUSERS_DIR --data NAME [--set data.root=DIR]
idode eval     --checkpoint CKPT --data folder --set data.path=DIR [--subset random]
idode sample   --checkpoint CKPT -n 64 [--out PREFIX]
idode demo     [--out DIR]
idode ablate   --preset digits [--quick] --out DIR [--docs DIR]
idode ablate   --render RESULTS_JSON [--docs DIR]
idode convert  CKPT.flax --config PRESET [--set key=value ...] --out DIR
idode compare  EVAL_A EVAL_B [--out DIR]

Exit status: 0 done; 2 a user error, told in one line ``idode: error: <problem>: <fix>``; 130
interrupted; 141 the reader of stdout went away (``| head``). A traceback means a bug (or
IDODE_DEBUG=1, which shows one for every error).

train and finetune stop cleanly on SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send
before killing a job): the current step ends, a checkpoint is written, one line says where, and
the exit code is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), so a scheduler sees
an unfinished job; ``--resume`` then continues exactly.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings

from idode.cli.parser import build_parser

__all__ = ["build_parser", "main", "user_error_message"]


# OSError itself and the subclasses a write can raise (read-only file system, a folder in the
# way, too many open files, I/O errors); its other subclasses (timeouts, connections) are bugs
_OS_ERRORS = (OSError, IsADirectoryError, NotADirectoryError, FileExistsError)


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
    if type(e) in _OS_ERRORS and e.errno is not None:  # a read-only file system, a quota, ...
        where = e.filename or (f"{out} or the standard output" if out else "the output")
        return f"{where}: {e.strerror or e}; check the path, or choose one you may write to"
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line ``idode: warning: ...`` (not Python's file:line and source)."""
    try:
        print(f"idode: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one ``idode`` command; exit status 0, or 2 with one line for a user error.

    A traceback is shown only for a bug, or for every error when IDODE_DEBUG=1.
    """
    if argv is None:  # the command line (a caller of main(argv) keeps its own warning display)
        warnings.showwarning = _show_warning
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
