"""A time limit on one call, on any thread.

math-verify's own limit is SIGALRM, which only the main thread may set; off it there was no limit at
all, and a policy's `9^{9^{9}}` or a few dozen nested brackets kept a reward call busy for minutes or
for ever. Here the main thread still gets a SIGALRM timer (it also interrupts C code that checks for
signals, such as `re`), and any other thread gets the same exception raised into it by a watchdog
(CPython's PyThreadState_SetAsyncExc), delivered where a signal handler's would be: between bytecodes.
Neither interrupts one long C operation; both stop the Python loops sympy spends its time in.
"""
from __future__ import annotations

import ctypes
import signal
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class OutOfTime(BaseException):
    """Raised into the call when its time is up. A BaseException: math-verify and sympy catch
    `Exception` and would carry on past the limit."""


def call_with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """fn(), or OutOfTime once `seconds` have passed."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(fn, seconds)
    return _with_watchdog(fn, seconds)


def _with_alarm(fn, seconds):
    live = [True]

    def on_alarm(signum, frame):
        if live[0]:   # a signal whose handler runs late, once the call is over, is no timeout
            raise OutOfTime

    previous = signal.signal(signal.SIGALRM, on_alarm)
    others, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return fn()
    finally:
        live[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if others:   # someone else's timer was running: it gets what was left of it
            signal.setitimer(signal.ITIMER_REAL, max(others - (time.monotonic() - start), 1e-6))


def _set_async_exc(thread_id: int, exc) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None if exc is None else ctypes.py_object(exc))


def _with_watchdog(fn, seconds):
    target = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire():
        with lock:   # never raises into the thread once the call is over
            if not state["done"]:
                state["fired"] = True
                _set_async_exc(target, OutOfTime)

    watchdog = threading.Timer(seconds, fire)
    watchdog.daemon = True
    watchdog.start()
    try:
        return fn()
    finally:
        watchdog.cancel()
        with lock:
            state["done"] = True
            if state["fired"]:   # fired but not yet delivered: withdrawn, so it cannot land after this returns
                _set_async_exc(target, None)
