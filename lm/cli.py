"""The shell every lm program runs in: `cli.run(main)` in place of `absl.app.run(main)`.

It does what each program would otherwise repeat: logging at WARNING (orbax and grain log every save and read at
INFO), TensorFlow's C++ start-up chatter off (only the data code imports TensorFlow), `lm.cpu.keep_step_memory()` (XLA:CPU
reuses each step's memory instead of page-faulting it in anew) and `lm.distributed.initialize()` before anything
touches a device, and every foreseeable error printed as one line on stderr, `error: <message>`,
with exit code 1 and no traceback:
- any `lm.errors.LmError` (bad config fields, files, data, tokenizers, checkpoints, flags);
- an error while parsing the command line, which also runs the `--config=path.py` file and applies its
  `--config.a.b=value` overrides (a missing or broken config file, an unknown field).
Ctrl-C outside a training loop (which saves first; a second Ctrl-C there stops it at once) prints `interrupted` and
exits 130. Other exceptions are bugs and keep their traceback. What orbax's failed sibling reads of a damaged
checkpoint print after lm has handled the first failure is silenced: asyncio's error log, and tensorstore's traceback
of "Event loop is closed" from its own threads. `--verbose` (or `LM_VERBOSE=1`) shows the traceback of the one-line
errors too, and those, for bug reports.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading
from typing import Callable

from absl import app, flags, logging

from lm import cpu
from lm import distributed
from lm import errors

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of lm's one-line errors (or set LM_VERBOSE=1).")


def _verbose(argv: list[str]) -> bool:
    return bool(os.environ.get("LM_VERBOSE")) or "--verbose" in argv


def _fail(message: str, code: int = 1) -> None:
    """Prints `error: message` and ends the process now. `os._exit`, not `sys.exit`: the error has already unwound
    the program (its `with` blocks closed files and waited for saves), and background threads of a failed orbax or
    tensorstore read would otherwise print their own tracebacks while the interpreter shuts down."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _is_closed_loop_callback(error: BaseException | None) -> bool:
    """True for the error a tensorstore read that finished after orbax closed its event loop raises in tensorstore's
    thread (orbax runs each restore in its own loop and closes it at the first failed read; the sibling reads of a
    damaged checkpoint complete later and deliver their results to the closed loop)."""
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and threading.current_thread() is not threading.main_thread())


def _silence_closed_loop_callbacks() -> None:
    """Tensorstore prints such an error with `PyErr_Print` (which calls `sys.excepthook`) or `PyErr_WriteUnraisable`
    (`sys.unraisablehook`): both hooks skip it and pass every other error on."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, error, traceback):
        if not _is_closed_loop_callback(error):
            excepthook(kind, error, traceback)

    def quiet_unraisablehook(unraisable):
        if not _is_closed_loop_callback(unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors and those of the config file it runs as one line each."""
    try:
        remaining = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.keys()  # config_flags defers a config file's load failure to the first use: make it now.
        return remaining
    except flags.Error as error:
        _fail(f"{_one_line(error)} (--help lists the flags)")
    except Exception as error:  # Raised by a --config file or its overrides: the user's input, not lm's bug.
        if _verbose(argv):
            raise
        config = next((a for a in argv if a.startswith("--config=")), "--config")
        if isinstance(error, SyntaxError):
            _fail(f"{config}: {error.filename}:{error.lineno}: {error.msg}")
        if isinstance(error, (KeyError, AttributeError)) and "Did you mean" in str(error):
            _fail(f"{config}: an override names no config field: {_one_line(error)}")
        _fail(f"{config}: {type(error).__name__}: {_one_line(error)}")


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's str() is the repr of its message; ConfigDict wraps a KeyError
    in an AttributeError)."""
    if error.args and (isinstance(error, KeyError) or isinstance(error.args[0], BaseException)):
        message = error.args[0]
        return _one_line(message) if isinstance(message, BaseException) else " ".join(str(message).split())
    return " ".join(str(error).split())


def run(main: Callable[[list[str]], None], *, parse_flags: bool = True) -> None:
    """Parses the flags (absl) and runs `main(argv)` as described in the module docstring. `parse_flags=False`:
    the program parses its whole command line itself (`lm.harness` takes the harness's flags), so `--verbose` is
    `LM_VERBOSE=1` there."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def shell(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        if not (_VERBOSE.value or _verbose(argv)):
            # When one read of a damaged checkpoint fails, orbax's sibling reads fail too; asyncio logs those
            # ("Task exception was never retrieved", with a traceback) whenever the garbage collector meets them,
            # after lm has already handled the first error in one line.
            std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
            _silence_closed_loop_callbacks()
        try:
            cpu.keep_step_memory()
            distributed.initialize()
            main(argv)
        except errors.LmError as error:
            if _VERBOSE.value or _verbose(argv):
                raise
            _fail(str(error))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)

    app.run(shell, flags_parser=_parse_flags if parse_flags else _leave_to_program)


def _leave_to_program(argv: list[str]) -> list[str]:
    """No absl parsing: every argument goes to the program (absl's own flags keep their defaults)."""
    flags.FLAGS.mark_as_parsed()
    return argv
