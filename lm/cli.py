"""The shell every lm program runs in: `cli.run(main)` in place of `absl.app.run(main)`.

It does what each program would otherwise repeat: logging at WARNING (orbax and grain log every save and read at
INFO), TensorFlow's C++ start-up chatter off (only the data code imports TensorFlow), `lm.distributed.initialize()`
before anything touches a device, and any `lm.errors.LmError` printed as one line, `error: <message>`, on stderr with
exit code 1 and no traceback. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, logging

from lm import distributed
from lm import errors


def run(main: Callable[[list[str]], None]) -> None:
    """Parses the flags (absl) and runs `main(argv)` as described in the module docstring."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def shell(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        try:
            distributed.initialize()
            main(argv)
        except errors.LmError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(shell)
