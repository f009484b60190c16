"""The program shell `lm.cli`: what it silences of the libraries' background threads, and what it lets through."""

import sys
import threading
import types

import pytest

from lm import cli


@pytest.fixture
def silenced(monkeypatch):
    """`cli`'s hooks installed over recording ones; yields the list of errors they passed on."""
    passed_on = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, traceback: passed_on.append(error))
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: passed_on.append(unraisable.exc_value))
    cli._silence_closed_loop_callbacks()
    yield passed_on


def report(error: BaseException, *, hook: str, in_thread: bool) -> None:
    """Reports `error` as tensorstore does from its threads: `PyErr_Print` calls `sys.excepthook`,
    `PyErr_WriteUnraisable` calls `sys.unraisablehook`."""

    def call():
        if hook == "excepthook":
            sys.excepthook(type(error), error, None)
        else:
            sys.unraisablehook(types.SimpleNamespace(exc_value=error))

    if in_thread:
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    else:
        call()


@pytest.mark.parametrize("hook", ["excepthook", "unraisablehook"])
def test_a_closed_event_loop_in_a_background_thread_is_silenced_and_other_errors_are_not(silenced, hook):
    closed = RuntimeError("Event loop is closed")
    report(closed, hook=hook, in_thread=True)
    assert silenced == []
    other = RuntimeError("something else")
    report(other, hook=hook, in_thread=True)
    report(closed, hook=hook, in_thread=False)  # In the main thread it is lm's own bug: shown.
    assert silenced == [other, closed]
