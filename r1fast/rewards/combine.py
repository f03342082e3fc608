"""Resolving reward functions by name and summing their weighted outputs, row by row.

A function may return None for a row: it is then left out of that row's sum. A row that no
function scores gets reward NaN, which the trainer turns into advantage 0. A function that raises,
returns the wrong number of values, or returns a non-finite value is an error naming the function
and the row; a step is never trained on a silently wrong reward. With a timeout, a call on a batch that
runs past it is an error naming the function, the timeout and the batch size.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import decimal
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
import threading
import weakref
from typing import Any, Callable, Optional, Sequence

from r1fast.rewards.builtin import (
    accuracy_reward,
    completion_text,
    is_finite_number,
    make_format_reward,
    make_length_penalty,
)
from r1fast.rewards.language import make_language_reward

BUILTIN_NAMES = ("accuracy", "format", "language", "length")


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and the row."""


class RewardTimeout(RewardError):
    """A reward function's call on a batch ran past the RewardSet's timeout (reward_timeout)."""


class _OutOfTime(Exception):
    """_invoke's or _await_all's call ran past its timeout; turned into a RewardTimeout naming the function."""


def load_function(spec: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function` → the function."""
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r}: expected a built-in name ({', '.join(BUILTIN_NAMES)}) "
                         f"or 'module:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        module = _import_user_file(spec, mod_name)
    else:
        module = _import_user_module(spec, mod_name)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {fn_name!r} in {mod_name!r} is {fn!r:.60}, not a function")
    return fn


def _import_user_file(spec: str, path: str):
    """Import the file at `path` once while it is unchanged, as `import` does a module: two functions of one file
    share its module-level state (a judge model loaded at import, not loaded twice); an edited file is imported
    again. The module is in sys.modules while it runs: a @dataclass under `from __future__ import annotations`
    looks its module up there, and failed the import with "'NoneType' object has no attribute '__dict__'"."""
    if not os.path.isfile(path):
        raise ValueError(f"reward function {spec!r}: file {path!r} does not exist")
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as f:
            # its text, not its mtime and size: an edit within the file system's clock tick (or, for Python's cached
            # bytecode, within the same second) that kept the size was taken for the file imported before
            source = f.read()
    except OSError as e:
        raise ValueError(f"reward function {spec!r}: cannot read {path!r}: {e}") from e
    name = f"r1fast_user_reward_{abs(hash(real))}"
    imported = _USER_FILES.get(real)
    if imported is not None and imported[0] == source and sys.modules.get(name) is imported[1]:
        return imported[1]
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        # the text read, never a stale __pycache__; dont_inherit: compiled here, it took this file's own
        # `from __future__ import annotations`, and the user's annotations became strings
        exec(compile(source, mspec.origin, "exec", dont_inherit=True), module.__dict__)
    except Exception as e:   # a SyntaxError or an exception at import: the user's file, not r1fast
        del sys.modules[name]
        raise ValueError(f"reward function {spec!r}: importing {path!r} raised {type(e).__name__}: {e}"
                         f"{_file_import_hint(e, real, spec)}") from e
    _USER_FILES[real] = (source, module)
    return module


def _file_import_hint(e: Exception, real: str, spec: str) -> str:
    """How to import what a reward file's own import did not find: the file runs alone, as a script would, but
    without its folder on sys.path, so `from . import x` and `import helpers` (a helpers.py beside it) failed with
    Python's bare "attempted relative import with no known parent package" or "No module named 'helpers'"."""
    folder, fn = os.path.dirname(real), spec.rsplit(":", 1)[1]
    if isinstance(e, ImportError) and e.name is None and "relative import" in str(e):
        return (f"; a file:function is imported alone, not as a module of its package: name it as "
                f"package.module:{fn}, its package importable (from the working directory or sys.path)")
    top = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
    if top and (os.path.isfile(os.path.join(folder, top + ".py")) or os.path.isdir(os.path.join(folder, top))):
        return f"; {top!r} is beside the file, but its folder {folder} is not on sys.path: add it to PYTHONPATH"
    return ""


_USER_FILES: dict[str, tuple] = {}   # a reward file's real path -> (its text when imported, its module)


def _import_user_module(spec: str, mod_name: str):
    """Import `mod_name`, also from the current directory: the `r1fast` console script does not put
    it on sys.path (`python -c` would), and a `my_rewards.py` beside the config is the usual case."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        top = mod_name.split(".")[0]
        here = os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))
        if e.name != top or not here or cwd in sys.path:
            # a my_rewards.py beside the YAML, run from another folder: say where it was looked for
            # (not for a module found whose own import lacks a package: e.name is that package)
            where = "" if e.name != top or here else (f" (looked in the working directory {cwd} and on sys.path); "
                                                      f"or name its file: path/to/{top}.py:{spec.rsplit(':', 1)[1]}")
            raise ValueError(f"reward function {spec!r}: cannot import module {mod_name!r}: {e}{where}") from None
        sys.path.append(cwd)   # appended, so a file here never shadows an installed module
        return _import_user_module(spec, mod_name)
    except Exception as e:   # a SyntaxError, or an exception raised while the module runs
        raise ValueError(f"reward function {spec!r}: importing module {mod_name!r} raised "
                         f"{type(e).__name__}: {e}") from e


def resolve(spec: str | Callable, *, format_pattern=None, language="en", length_target=None) -> tuple[str, Callable]:
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if spec == "accuracy":
        return "accuracy", accuracy_reward
    if spec == "format":
        return "format", make_format_reward(format_pattern)
    if spec == "language":
        return "language", make_language_reward(language)
    if spec == "length":
        if length_target is None:
            raise ValueError("reward 'length' needs length_penalty_target set")
        return "length", make_length_penalty(length_target)
    return spec, load_function(spec)


_FP32_MAX = 3.4028234663852886e38
# a config's option names for RewardSet's keywords, which a caller moving settings from a config passes
_CONFIG_NAMES = {"reward_weights": "weights", "reward_timeout": "timeout", "length_penalty_target": "length_target"}


def _unknown_keywords(unknown: dict) -> str:
    """RewardSet's TypeError for keywords it does not take, with its own name for a config's option."""
    said = []
    for key in unknown:
        own = _CONFIG_NAMES.get(key)
        said.append(f"{key!r} (the config's option; RewardSet's keyword is {own})" if own else repr(key))
    return (f"RewardSet() got unexpected keyword argument(s) {', '.join(said)}; it takes funcs, weights, timeout, "
            f"format_pattern, language, length_target")


class RewardSet:
    """Named, weighted reward functions evaluated together. `timeout` (seconds, None: no limit) bounds each
    function's call on a batch; past it, score raises a RewardTimeout. `format_pattern`, `language` and
    `length_target` configure the built-in 'format', 'language' and 'length' rewards (resolve)."""

    def __init__(self, funcs: Sequence[str | Callable], weights: Optional[Sequence[float]] = None, *,
                 timeout: Optional[float] = None, format_pattern: Optional[str] = None, language: str = "en",
                 length_target: Optional[int] = None, **unknown):
        if unknown:
            raise TypeError(_unknown_keywords(unknown))
        funcs = list(funcs)   # once: a generator read here again would give no functions
        if not funcs:
            raise ValueError("at least one reward function is required")
        if length_target is None and "length" in funcs:   # resolve's error names the config's option
            raise ValueError("RewardSet: reward 'length' needs length_target=<tokens> (a config's "
                             "length_penalty_target)")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < math.inf):
            raise ValueError(f"reward timeout must be a positive number of seconds (or None: no limit); got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        # kept so a trainer given this set records what it scores with (and can tell a config that differs)
        self.specs = funcs
        self.format_pattern, self.language, self.length_target = format_pattern, language, length_target
        resolved = [resolve(f, format_pattern=format_pattern, language=language, length_target=length_target)
                    for f in self.specs]
        # unique names (two lambdas, one function twice): metrics and logged samples are keyed by them
        self.names, seen = [], {}
        for name, _ in resolved:
            seen[name] = seen.get(name, 0) + 1
            unique = name if seen[name] == 1 else f"{name}_{seen[name]}"
            while unique in self.names:   # f, f_2, f: the second f is f_3, not a second f_2
                seen[name] += 1
                unique = f"{name}_{seen[name]}"
            self.names.append(unique)
        self.funcs = [f for _, f in resolved]
        if weights is None:
            weights = [1.0] * len(self.funcs)
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            # a string was read a character per weight: "12" weighed two functions 1 and 2
            raise ValueError(f"reward weights must be a list of numbers, one per reward function; got {weights!r:.80}")
        if len(weights) != len(self.funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(self.funcs)} reward functions")
        self.weights = [_weight(n, w) for n, w in zip(self.names, weights)]

    def __len__(self):
        return len(self.funcs)

    def score(self, prompts: list, completions: list, columns: dict[str, list], **extra) -> list[list[Optional[float]]]:
        """Per function, per row: float or None. Async functions (`async def`, as TRL takes them: a remote
        judge, a sandbox) are awaited together, concurrently, once the plain ones have run."""
        n = len(completions)
        results = [self._call(name, fn, prompts, completions, columns, extra) for name, fn in zip(self.names, self.funcs)]
        waiting = [i for i, r in enumerate(results) if inspect.isawaitable(r)]
        if waiting:
            for i, value in zip(waiting, _await_all([results[i] for i in waiting], self.timeout)):
                if isinstance(value, _OutOfTime):
                    raise _timed_out(self.names[i], self.timeout, n, str(value))
                if isinstance(value, BaseException):
                    raise _raised(self.names[i], self.funcs[i], value, prompts, completions, columns, extra,
                                  self.timeout) from value
                results[i] = value
        return [self._values(name, r, prompts, n) for name, r in zip(self.names, results)]

    def total(self, table: list[list[Optional[float]]]) -> list[float]:
        out = []
        for row in range(len(table[0]) if table else 0):
            parts = [w * t[row] for w, t in zip(self.weights, table) if t[row] is not None]
            total = sum(parts) if parts else float("nan")
            # the advantages are fp32: a larger total would become inf there and skip the step unexplained
            if parts and not abs(total) <= _FP32_MAX:
                raise RewardError(f"row {row}: the weighted reward total {total!r} is beyond float32's range "
                                  f"(rewards {[t[row] for t in table]}, weights {self.weights})")
            out.append(total)
        return out

    def _call(self, name, fn, prompts, completions, columns, extra):
        try:
            if self.timeout is None:
                return fn(prompts=prompts, completions=completions, **columns, **extra)
            return _invoke(fn, dict(prompts=prompts, completions=completions, **columns, **extra), self.timeout)
        except _OutOfTime:
            raise _timed_out(name, self.timeout, len(completions),
                             "it goes on running in the background: a Python thread cannot be stopped") from None
        except Exception as e:
            raise _raised(name, fn, e, prompts, completions, columns, extra, self.timeout) from e

    def _values(self, name, values, prompts, n):
        # a dict iterates over its keys, a str over characters, a set (`{f(c) for c in completions}`) in
        # its own order: each row would get another row's reward
        if isinstance(values, (dict, str, bytes, set, frozenset)):
            raise RewardError(f"reward function {name!r} {_one_per_row(n)}; got a {type(values).__name__}")
        try:
            count = len(values)
        except TypeError:   # None, a float, a generator; a 0-d tensor or array has __len__ but no length
            count = None
        if count != n:
            got = "None" if values is None else (f"{count} values" if count is not None else type(values).__name__)
            raise RewardError(f"reward function {name!r} {_one_per_row(n)}; got {got}")
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            if hasattr(v, "item"):
                with contextlib.suppress(ValueError, RuntimeError):   # not one element (a 2-D output's row):
                    v = v.item()                                      # refused below, naming it
            if isinstance(v, bool):   # `pred == gold`: TRL takes it as 1.0 / 0.0
                v = float(v)
            elif isinstance(v, (numbers.Real, decimal.Decimal)) and not isinstance(v, (int, float)):
                # an exact math reward's Fraction(1, 3) or Decimal("0.5"), which TRL's torch.tensor takes: it was
                # refused as not a finite number
                with contextlib.suppress(OverflowError, ValueError):
                    v = float(v)
            if not is_finite_number(v):
                raise RewardError(f"reward function {name!r} returned {v!r:.80} for row {i} "
                                  f"(prompt {_snippet(prompts[i])}); rewards must be finite numbers or None")
            out.append(float(v))
        return out


def _weight(name: str, w) -> float:
    """A reward function's weight as a float. A NaN weight made every row's total NaN (advantage 0 everywhere, nothing
    learnt, no error); None, a word or an int past float's range raised float()'s bare TypeError, ValueError or
    OverflowError, naming neither the weights nor the function."""
    try:
        value = float(w)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"reward weights must be finite numbers; got {w!r:.80} for {name!r}")
    return value


def _one_per_row(n: int) -> str:
    # "a list of 4 floats (or None); got None" read as if None were a return it takes
    return (f"must return a list of {n} reward{'s' if n != 1 else ''}, one per completion (each a float, or None "
            f"for a row it does not score)")


def _invoke(fn, kwargs: dict, timeout: Optional[float]):
    """fn(**kwargs) on a worker thread with the caller's torch state and context variables, waited on for `timeout`
    seconds (None: until it returns); _OutOfTime past them. The thread is a daemon: a call that never returns does
    not keep the process from exiting."""
    outcome = {}
    torch_state = _callers_torch_state()
    # context variables are the caller's thread's too: decimal's precision (a math reward's exact comparison gave
    # other scores at the worker's default 28 digits), a tracer's span
    context = contextvars.copy_context()

    def run():
        try:
            with torch_state():
                outcome["value"] = context.run(fn, **kwargs)
        except BaseException as e:   # re-raised on the caller's thread, as a direct call would raise it
            outcome["error"] = e

    worker = threading.Thread(target=run, name="r1fast-reward", daemon=True)
    worker.start()
    try:
        worker.join(timeout)
    finally:   # past the timeout, or a Ctrl-C that ended the wait
        if worker.is_alive():
            _LEFT_RUNNING.add(worker)
    if worker.is_alive():
        raise _OutOfTime
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# reward calls whose wait ended while they ran: alive, each is held by threading's own list of threads
_LEFT_RUNNING: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def reward_calls_left_running() -> int:
    """How many reward calls a RewardTimeout (or a Ctrl-C during the call) left running on their worker threads.
    At interpreter exit such a thread inside a torch op (a reward model judge) is ended mid-call, which aborts the
    process ("terminate called without an active exception", exit status 134): the CLI exits before that."""
    return sum(t.is_alive() for t in list(_LEFT_RUNNING))


def _callers_torch_state():
    """A context manager that gives a worker thread the calling thread's torch state: grad mode, inference mode
    and the current CUDA device are per thread, so a reward model judge called under torch.no_grad() would build
    autograd graphs on the worker (and run on cuda:0). torch is not imported here for a run that does not use it:
    without it in sys.modules no one has set any of that state."""
    torch = sys.modules.get("torch")
    if torch is None:
        return contextlib.nullcontext
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def entered():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            if inference:
                stack.enter_context(torch.inference_mode())
            if device is not None:
                stack.enter_context(torch.cuda.device(device))
            yield
    return entered


def _timed_out(name, timeout, rows, fate) -> RewardTimeout:
    return RewardTimeout(f"reward function {name!r} did not return within reward_timeout = {timeout:g} s on a batch "
                         f"of {rows} completions ({fate}); raise reward_timeout if the function is slow "
                         f"but sound")


def _await_all(awaitables: list, timeout: Optional[float] = None) -> list:
    """Their results (an exception in place of a result; _OutOfTime for one that ran past `timeout`, which
    is cancelled), run concurrently on an event loop of their own; in a thread whose loop is already
    running (a notebook's), on another thread, as asyncio.run cannot nest."""
    async def gather():
        return await asyncio.gather(*awaitables, return_exceptions=True)

    if timeout is not None:
        return _await_all_bounded(awaitables, timeout)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    return _invoke(asyncio.run, {"main": gather()}, None)


def _await_all_bounded(awaitables: list, timeout: float) -> list:
    """_await_all with a limit. The loop runs on a daemon thread the caller waits on for `timeout` seconds:
    asyncio.wait cannot end a function that blocks the loop (a synchronous call inside `async def`), and
    asyncio.run, once the function is cancelled, waits without end for the threads it had started
    (asyncio.to_thread of a judge's client that never answers)."""
    # what a function that has not finished when the wait ends gets: one that held the loop was never cancelled
    outcomes = [_OutOfTime("it blocked its event loop and goes on running in the background") for _ in awaitables]

    async def bounded(i, awaitable):
        # asyncio.wait, not wait_for: a TimeoutError the function raises itself is its error, not a timeout
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            outcomes[i] = _OutOfTime("it was cancelled")
            return
        try:
            outcomes[i] = task.result()
        except BaseException as e:   # returned as gather(return_exceptions=True) returns it
            outcomes[i] = e

    decided = threading.Event()   # every function has returned, raised or been cancelled: `outcomes` are final
    loop_thread: list[int] = []

    async def gather():
        loop_thread.append(threading.get_ident())
        await asyncio.gather(*(bounded(i, a) for i, a in enumerate(awaitables)))
        decided.set()

    # the loop's own limit ends a function that yields to it; this one ends the wait for one that does not
    try:
        _invoke(asyncio.run, {"main": gather()}, timeout + 0.5)
    except _OutOfTime:
        _wait_for_a_late_loop(decided, loop_thread, {a.cr_code for a in awaitables if inspect.iscoroutine(a)})
    return list(outcomes)


def _wait_for_a_late_loop(decided: threading.Event, loop_thread: list[int], functions: set, most_s: float = 10.0):
    """The loop has not said how its functions ended by the wait's end: it is either blocked by one of them (its
    thread runs that function's code) or only scheduled late by a busy machine. That one is waited for (up to
    `most_s` more seconds), so a function it cancelled is reported as cancelled, not as one that blocked its loop
    (a fixed half-second margin gave that wrong fate to a loop thread paused longer)."""
    import time

    give_up = time.monotonic() + most_s
    while not decided.wait(0.05) and time.monotonic() < give_up:
        if not loop_thread:   # the loop has not started yet: it runs no function
            continue
        frame = sys._current_frames().get(loop_thread[0])
        while frame is not None and frame.f_code not in functions:
            frame = frame.f_back
        if frame is not None or loop_thread[0] not in sys._current_frames():   # in a function, or gone
            return


def _raised(name, fn, e, prompts, completions, columns, extra, timeout=None) -> RewardError:
    """The error of a reward function that raised `e` on the batch, naming the row it raises on."""
    mismatch = _signature_mismatch(fn, columns, extra) if isinstance(e, TypeError) else None
    if mismatch:   # no row to look for: every call fails the same way, before the function's body runs
        return RewardError(f"reward function {name!r} {mismatch}")
    if isinstance(e, KeyError) and e.args and e.args[0] in _TRL_ONLY and e.args[0] not in columns:
        # kwargs["trainer_state"] of a function written for TRL: every row fails, none is to blame
        return RewardError(f"reward function {name!r} raised KeyError: {e.args[0]!r}: r1fast does not pass TRL's "
                           f"{e.args[0]}: read it with kwargs.get")
    # an empty batch has no row to look for (the search returned its row 0: an IndexError naming it)
    try:
        row = _find_failing_row(fn, prompts, completions, columns, extra, timeout) if completions else None
    except _OutOfTime:   # the search's own calls are bounded too
        row = _SEARCH_TIMED_OUT
    if row == _SEARCH_TIMED_OUT:
        where = (f" (called again on part of the batch to find the row, it ran past reward_timeout = {timeout:g} s "
                 f"there; no row is named)")
    elif row == _EVERY_ROW:
        # a judge that is down, or row 0 failing and another row too (an unparsable answer in several rows): row
        # 0 is still shown, and neither is claimed (rows 0 and 3 of a parse error were "not one row's")
        rest = "row 1" if len(completions) == 2 else f"rows 1-{len(completions) - 1}"
        where = (f" on row 0 (prompt {_snippet(prompts[0])}, completion {_snippet(completions[0])}) and on {rest} "
                 f"too (called again on parts of the batch to find the row, it raised on each: a judge that is "
                 f"down, or more than one failing row)")
    elif row is not None:
        where = f" on row {row} (prompt {_snippet(prompts[row])}, completion {_snippet(completions[row])})"
    elif not completions:
        where = " (on an empty batch)"
    else:
        where = (" (called again on parts of the batch to find the row, it did not raise: the error is "
                 "intermittent or needs the whole batch)")
    hint = _worker_thread_hint(e, timeout)
    return RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}{where}{hint}")


# what works on the main thread only: a signal (math-verify's parse/verify with their default timeouts, a function's
# own signal.alarm) and asyncio.get_event_loop() without a loop set (Python makes one for the main thread alone); and
# what works only on the thread that made it: a sqlite3 connection opened at import (a cache of a judge's answers)
_MAIN_THREAD_ONLY = ("main thread", "threaded environment", "no current event loop in thread",
                     "can only be used in that same thread")


def _worker_thread_hint(e, timeout) -> str:
    """Why a function that runs without reward_timeout raises with it, when its error says so."""
    if timeout is None or not any(s in str(e) for s in _MAIN_THREAD_ONLY):
        return ""
    return ("; with reward_timeout set, each call runs on a worker thread, where signals and asyncio.get_event_loop() "
            "without a loop of the thread's own do not work, nor an object that only the thread that made it may use "
            "(a sqlite3 connection: open it with check_same_thread=False): give the function a limit of its own that "
            "works off the main thread (math-verify: parsing_timeout=None, timeout_seconds=None; asyncio.run for a "
            "coroutine), or unset reward_timeout")


# keyword arguments TRL passes to reward functions and r1fast does not (docs/training.md, Rewards)
_TRL_ONLY = ("trainer_state", "log_extra", "log_metric")


def _signature_mismatch(fn, columns, extra) -> Optional[str]:
    """Why `fn` cannot be called with the arguments r1fast passes, or None. A TRL function that requires
    trainer_state raised a bare "missing 1 required positional argument", then was called again on halves
    of the batch in search of a row to blame."""
    try:
        sig = _parameters_only_signature(fn)
    except (TypeError, ValueError, NameError):   # a builtin or C callable without one: nothing to check against
        return None
    passed = ["prompts", "completions", *columns, *extra]
    try:
        sig.bind(**dict.fromkeys(passed))
    except TypeError as e:
        trl = [n for n in _TRL_ONLY if n in sig.parameters]
        hint = f"; r1fast does not pass TRL's {', '.join(trl)}: read it with kwargs.get" if trl else ""
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        if not takes_any and any(n not in sig.parameters for n in passed):
            # def reward(prompts, completions): the usual first attempt, refused for a column it never asked for
            hint += "; give it a **kwargs parameter: every dataset column is passed as a keyword, as TRL passes them"
        return f"cannot take the arguments r1fast passes ({', '.join(passed)}): {e}{hint}"
    return None


def _parameters_only_signature(fn) -> inspect.Signature:
    """fn's signature, its annotations left unevaluated (only its parameters are read). Python 3.14 evaluates them
    by default: a TRL function's `trainer_state: TrainerState`, imported under TYPE_CHECKING, raised NameError from
    here, in place of the function's own error."""
    try:
        import annotationlib
    except ImportError:   # before 3.14 annotations were evaluated when the function was defined, or are strings
        return inspect.signature(fn)
    return inspect.signature(fn, annotation_format=annotationlib.Format.FORWARDREF)


_EVERY_ROW = -1   # _find_failing_row: the function raised on row 0 alone and on the rows after it too
_SEARCH_TIMED_OUT = -2   # _raised: a call of _find_failing_row's ran past the timeout


def _find_failing_row(fn, prompts, completions, columns, extra, timeout=None) -> Optional[int]:
    """The first row the function raises on, by halving the batch: at most ceil(log2(rows)) + 1 more calls
    (7 for 64 rows, not 64), as each call may be a paid or rate-limited judge's. None when the calls do
    not raise again (a flaky judge, or an error that only the whole batch triggers); _EVERY_ROW when every
    call raised, rows 1.. too (a judge down: no row to blame). Each call has `timeout` (_OutOfTime past it)."""
    passed = []

    def raises(lo, hi):
        part_cols = {k: v[lo:hi] for k, v in columns.items()}
        part_extra = {k: (v[lo:hi] if isinstance(v, list) else v) for k, v in extra.items()}
        try:
            kwargs = dict(prompts=prompts[lo:hi], completions=completions[lo:hi], **part_cols, **part_extra)
            result = fn(**kwargs) if timeout is None else _invoke(fn, kwargs, timeout)
        except _OutOfTime:
            raise
        except Exception:
            return True
        # an async function raises when awaited (its row was never named, unlike a plain function's)
        outcome = _await_all([result], timeout)[0] if inspect.isawaitable(result) else None
        if isinstance(outcome, _OutOfTime):
            raise outcome
        failed = isinstance(outcome, Exception)
        passed.append(not failed)
        return failed

    lo, hi = 0, len(completions)   # the whole batch raised: a failing row is in [lo, hi)
    seen_raise = hi > 0             # so a one-row batch's row is that row, without another call
    while hi - lo > 1:
        mid = (lo + hi) // 2
        seen_raise = raises(lo, mid)
        lo, hi = (lo, mid) if seen_raise else (mid, hi)   # the first half passed: it is in the second
    if not (seen_raise or raises(lo, hi)):
        return None
    # every part raised, down to row 0 alone: the one more call on the other rows tells a row's error from a
    # whole judge's (still within the bound: the search made no final call)
    if lo == 0 and not any(passed) and len(completions) > 1 and raises(1, len(completions)):
        return _EVERY_ROW
    return lo


def _snippet(x: Any, n: int = 60) -> str:
    try:
        s = completion_text(x)
    except TypeError:
        s = str(x)
    return repr(s if len(s) <= n else s[:n] + "…")
