"""The `r1fast` command. `info` and `bench` live here; the training commands come from r1fast.trainer.cli."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys


def _cmd_info(args):
    from r1fast import info

    print(info.render(info.collect()))


class _EngineStartUpToStdout(logging.Handler):
    """Prints to sys.stdout as it is at each record (not the one at set-up: tests swap it)."""

    def emit(self, record):
        print(f"[bench] engine start-up: {self.format(record)}", flush=True)


def _show_engine_start_up():
    """Which decode kernel the engine's start-up timing picked, and by how much, belongs in a bench log."""
    picks = logging.getLogger("r1fast.rollout.self_check")
    picks.setLevel(logging.INFO)
    if not any(isinstance(h, _EngineStartUpToStdout) for h in picks.handlers):
        picks.addHandler(_EngineStartUpToStdout())


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM (gpu_check.sh's `timeout`) raises SystemExit(143), so the running suite's `finally` removes its
    temp folders (a GPU-size grpo_step checkpoint is ~3 GB); by default the process died without cleaning up."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        # only the main thread may set a handler (ValueError otherwise): a bench run from a worker thread runs
        # as before, as the trainers' stop handlers do there
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        # None: a handler installed from C, which Python cannot put back (signal.signal(sig, None) is a TypeError
        # that would hide the bench's own result); the default then, as the trainers' stop_handlers leaves it
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _cmd_bench(args):
    from pathlib import Path

    from r1fast.bench import harness

    if args.list:
        for name, s in harness.load_suites().items():
            print(f"{name:<18} {s.description}")
        return
    if args.short and not args.table:
        # alone it was ignored: `r1fast bench --short` ran every suite (minutes) instead of printing a table
        raise SystemExit("r1fast bench: --short goes with --table: r1fast bench --table --short [CSV ...]")
    if args.table or args.plot:
        # both given: the table, then the plot, of the same CSVs (--plot was ignored without a word)
        flag = " ".join(f for f, on in (("--table", args.table), ("--plot", args.plot)) if on)
        # the newest by modification time: names begin with the card, so by name a cpu run never beats a gpu one
        out = Path(args.out or "bench-results")
        paths = [Path(p) for p in args.suites] or sorted(out.glob("*.csv"), key=lambda p: p.stat().st_mtime)[-1:]
        if not paths:
            # "under --out" named an option the user had not given; the folder looked in, and how to fill it, say more
            raise SystemExit(f"r1fast bench {flag}: no CSV given and none in {str(out)!r} (--out); give a results CSV, "
                             f"or run r1fast bench first (it writes one there)")
        for p in paths:
            if not p.is_file():
                raise SystemExit(f"r1fast bench {flag}: {p} is not a file")
        if args.table:
            try:
                for p in paths:
                    table = harness.format_short_table if args.short else harness.format_table
                    print(table(harness.read_csv(p), harness.read_skipped(p)))
            except ValueError as e:
                raise SystemExit(f"r1fast bench --table: {e}") from None
        if args.plot:
            try:
                print(f"wrote {harness.plot(paths, paths[-1].with_suffix('.png'))}")
            except ModuleNotFoundError as e:
                if e.name != "matplotlib":
                    raise
                raise SystemExit("r1fast bench --plot needs matplotlib: pip install matplotlib") from None
            except ValueError as e:
                raise SystemExit(f"r1fast bench --plot: {e}") from None
        return
    _show_engine_start_up()
    failed = []

    def log(line: str):
        print(line, flush=True)
        if line.lstrip().startswith("FAILED "):
            failed.append(line)

    try:
        with _sigterm_as_exit():
            rows = harness.main(args.suites, size=args.size, out_dir=args.out, device=args.device,
                                budget_s=args.budget, append_to=args.append, log=log, threads=args.threads,
                                suite_box_s=args.suite_box)
    except harness.DeviceLost as e:
        # exit status 3: bench/gpu_check.sh goes on with the suites left, in a fresh process
        print(f"r1fast bench: the CUDA context is lost ({e})", file=sys.stderr)
        print(f"r1fast bench: suites not run: {' '.join(e.remaining)}", file=sys.stderr)
        raise SystemExit(3)
    except ValueError as e:
        raise SystemExit(f"r1fast bench: {e}")
    if failed:  # the other rows are written: a broken kernel or peer must still fail a script or CI job
        held = "the results files hold the other rows" if rows else "no row was measured, no file written"
        raise SystemExit(f"r1fast bench: {len(failed)} FAILED (above); {held}")


def build_parser() -> argparse.ArgumentParser:
    from r1fast import __version__

    p = argparse.ArgumentParser(
        prog="r1fast", description="GRPO engine with fused Triton and CUDA kernels",
        epilog="r1fast COMMAND --help shows a command's options. To start: r1fast info (what this machine runs), "
               "then r1fast train (the embedded default: a tiny model, minutes on a CPU). Docs: README.md, "
               "docs/training.md.")
    p.add_argument("--version", action="version", version=f"r1fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, GPU, what r1fast._C was built with, optional packages",
                          description="What this machine runs: the versions of r1fast, Python, torch and Triton; "
                                      "the GPUs; what r1fast._C was built with (or why it is refused); optional "
                                      "packages; per op, the backend that runs here and the others usable "
                                      "(R1FAST_BACKEND=... forces one); the FP8 modes usable. Paste it into a bug "
                                      "report.")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="run benchmark suites (r1fast bench --list)",
                           description="Time r1fast's kernels and trainer against torch and other libraries; "
                                       "the table gives each one's time, r1fast's speed-up and, where one is known, "
                                       "%floor: the floor (the time the bytes moved or FLOPs take at this machine's "
                                       "measured bandwidth or matmul rate) over the time measured. See "
                                       "bench/README.md.")
    bench.add_argument("suites", nargs="*", help="suite names (default: all); with --table or --plot, CSV files")
    bench.add_argument("--size", choices=["smoke", "gpu"], default="smoke",
                       help="smoke: small shapes, any device, seconds to a few minutes a suite on a CPU "
                            "(default); gpu: real model shapes (Qwen2.5-1.5B's for the model suites), needs CUDA")
    bench.add_argument("--out", default=None, help="results directory (default ./bench-results)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--budget", type=float, default=None, help="seconds of repeats per implementation (default 2 on CUDA, 0.5 on the CPU)")
    bench.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads for the run (default: torch's, one per core); 1 on a small or "
                            "busy CPU, where threads waiting for each other swamp the smoke sizes' timings")
    bench.add_argument("--suite-box", type=float, default=None, metavar="SECONDS",
                       help="a suite starts no more implementations after this many seconds (the rest are "
                            "reported as skipped), so one slow suite cannot take a time-boxed run's time")
    bench.add_argument("--list", action="store_true", help="list suites and exit")
    bench.add_argument("--plot", action="store_true", help="draw a PNG from result CSVs (default: the newest), beside "
                                                           "the last; with --table, after the table")
    bench.add_argument("--table", action="store_true",
                       help="print the summary table of result CSVs (default: the newest) and exit")
    bench.add_argument("--short", action="store_true",
                       help="with --table: one line per case (r1fast's best, %% of floor, peak memory, each "
                            "peer's time over r1fast's) instead of one per implementation")
    bench.add_argument("--append", default=None, metavar="CSV",
                       help="add the rows to an earlier run's results files (that CSV and the JSON beside it)")
    bench.set_defaults(func=_cmd_bench)

    try:
        from r1fast.trainer.cli import add_commands
    except ImportError as e:
        if "r1fast.trainer" not in str(e):
            raise
    else:
        add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is not None:   # called from Python (a test, a script): the caller's process, not this command's
        return _run(argv)
    _stop_signals_end_the_command()
    _warn_as_a_command()
    try:
        try:
            try:
                code = _run(sys.argv[1:])
            except KeyboardInterrupt:   # one no command caught (in the imports, `r1fast bench`): a line, no traceback
                command_is_stopping()
                print("r1fast: stopped", file=sys.stderr)
                code = 130
            sys.stdout.flush()   # a reader gone before the last lines left is seen here, not at the interpreter's exit
        except BrokenPipeError:
            if not _stdout_reader_is_gone():
                raise   # a pipe of the command's own (a reward worker's, a judge server's): a real error
            code = _stdout_reader_gone()
    except SystemExit as e:
        _ignore_stop_signals()
        _exit_past_reward_calls(e.code)
        raise
    except BaseException as e:   # a traceback: ends as Python ends it, not in an abort
        _ignore_stop_signals()
        if _reward_calls_left_running():
            sys.excepthook(type(e), e, e.__traceback__)
            _exit_past_reward_calls(130 if isinstance(e, KeyboardInterrupt) else 1)
        raise
    _ignore_stop_signals()
    _forget_a_caught_keyboard_interrupt()
    _exit_past_reward_calls(code)
    return code


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stopping = False   # the command is ending on a stop: a further Ctrl-C or SIGTERM has nothing left to stop


def _stop_signals_end_the_command():
    """The command's own Ctrl-C and SIGTERM handler, under the trainers' (whose stop_handlers put it back when they
    close): one raises KeyboardInterrupt, which the training commands turn into their `stopped; continue with ...`
    line and status 130. Python's own handlers ended the command in other ways: a SIGTERM before a trainer's loop
    (loading the model) killed it without a word, and a Ctrl-C after the command had printed that line (a second
    press, while the interpreter shut down) raised a KeyboardInterrupt past it, or killed it by SIGINT, in either
    case without its status 130. Once the command ends on a stop (command_is_stopping), further ones are ignored;
    until then each raises: a KeyboardInterrupt some library swallows (a bare `except:`, a __del__ it interrupted)
    must not leave the next Ctrl-C without effect."""
    global _stopping
    _stopping = False   # a stop an earlier main(argv) call of this process ended on is not this command's

    def stop(signum, frame):
        if _stopping:
            return
        if in_an_import(frame):
            send_again_soon(signum)
            return
        # swallowed by a bare `except:` somewhere, it is sent again in a second unless the command has by then
        # ended on it; dropped by Python (raised in a __del__), at once, by the hook below, instead
        stop = StopRequested(signum)
        stop.sent_again_later = send_again_soon(signum, delay=1.0, unless_stopping=True)
        raise stop
    for sig in _STOP_SIGNALS:
        signal.signal(sig, stop)
    previous_hook = sys.unraisablehook

    def send_a_dropped_stop_again(unraisable):
        """What a __del__ (a weakref callback, a finalizer) raises, Python reports as `Exception ignored in ...`
        and drops: a stop raised there left the command running, until the sending again above a second later
        (the command had often finished by then), and a trainer's abort (a second Ctrl-C) left its run going. Sent
        again now, from a timer: raised here, it would be dropped again. Once only: the second's sending again is called off, as a stop sent twice is a first stop (the
        trainer's: finish the step) and then an abort, which cut short the step and its checkpoint."""
        if isinstance(unraisable.exc_value, StopRequested):
            stop = unraisable.exc_value
            if stop.sent_again_later is not None:
                stop.sent_again_later.cancel()
            if not _stopping:
                send_again_soon(stop.signum)
            return
        previous_hook(unraisable)
    sys.unraisablehook = send_a_dropped_stop_again


def in_an_import(frame) -> bool:
    """Whether the signal came while a module was being imported. A KeyboardInterrupt raised there is not safe to
    raise: torch's import swallowed some (the command went on, half-imported: `module 'numpy' has no attribute
    ...`, a RecursionError in torch._dynamo), and one raised inside its C++ start-up (or Triton's) aborted the
    process. The trainers' stop handlers defer their abort (a second stop) so too."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def send_again_soon(signum: int, delay: float = 0.05, unless_stopping: bool = False):
    """The signal, sent to this process again in `delay` seconds (from a timer thread, returned: its cancel() calls
    it off): until it comes outside an import; `unless_stopping`: unless the command has ended on a stop by then
    (command_is_stopping)."""
    import os
    import threading

    def send():
        if not (unless_stopping and _stopping):
            os.kill(os.getpid(), signum)

    again = threading.Timer(delay, send)
    again.daemon = True
    again.start()
    return again


class StopRequested(KeyboardInterrupt):
    """What the command's handler raises, and a trainer's stop handler for an abort (r1fast.trainer.grpo's
    stop_handlers): caught as a KeyboardInterrupt. A subclass, as CPython marks a process to
    die by SIGINT at its exit when a KeyboardInterrupt itself (not a subclass) leaves code run by exec or eval of a
    string (a dataclass's or namedtuple's generated methods, made all through torch's import), caught or not: under
    `python -m r1fast`, a single Ctrl-C while the command started ended it so, after its stopped line."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum   # sent again if Python drops it (send_a_dropped_stop_again)
        self.sent_again_later = None   # the timer that sends it again in a second, in case something swallows it


def _forget_a_caught_keyboard_interrupt():
    """That mark, left by a KeyboardInterrupt another handler raised (a trainer's second Ctrl-C, in a kernel's
    launcher that Triton builds by exec): CPython clears it as it starts running code from a string, so an empty
    one clears it. The command's status is its own: a caught KeyboardInterrupt never makes it a death by SIGINT."""
    exec("")


def command_is_stopping():
    """Said by the code that ends the command on a stop (r1fast.trainer.cli's `stopped` line): from here on a
    Ctrl-C or SIGTERM is ignored where the command's handler is the one set. Nothing changes in a process that
    called main(argv) (a test, a script): its handlers are its own."""
    global _stopping
    _stopping = True


def _ignore_stop_signals():
    """The command has ended (its status is known): a Ctrl-C or SIGTERM while the interpreter shuts down would end
    the process with another status. SIG_IGN, as the interpreter's shutdown puts Python handlers back to the
    default before its end (a signal then killed the process) but leaves an ignored signal ignored."""
    command_is_stopping()   # a signal still pending runs our handler as signal.signal changes it: it must not raise
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _warn_as_a_command():
    """r1fast's own warnings as one line, `r1fast: warning: <message>`: Python's format put the source file and line
    that raised it, then that line of code (`/…/r1fast/trainer/config.py:197: UserWarning: …` and `new.validate()`),
    in front of a command-line user who wrote neither. Other libraries' warnings keep Python's format."""
    import os
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    python_format = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"r1fast: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)
    warnings.formatwarning = formatwarning


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args) or 0


def _stdout_reader_is_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has closed it (poll reports an error or a hang-up on it).
    A BrokenPipeError from any other pipe the command writes to is an error to show, not a `| head` that had its
    lines; where poll cannot tell (no select.poll), it is shown too."""
    import os
    import select
    import stat

    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):   # stdout closed or not a file (replaced), or no select.poll
        return False


def _stdout_reader_gone() -> int:
    """`r1fast bench --table CSV | head`: the reader closed the pipe before the output ended, and the command died
    with a BrokenPipeError traceback. It now ends quietly with the status a command killed by SIGPIPE has, as `cat`
    does. Python flushes stdout once more at exit: pointing it at /dev/null keeps that flush from failing too."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout is not a file (replaced by a test, closed)
        pass
    return 128 + signal.SIGPIPE


def _reward_calls_left_running() -> bool:
    rewards = sys.modules.get("r1fast.rewards.combine")
    return rewards is not None and rewards.reward_calls_left_running() > 0


def _exit_past_reward_calls(code):
    """The command's exit, when a reward call that ran past reward_timeout (or was left by Ctrl-C) is still running
    on its daemon thread: the interpreter's shutdown ends such a thread mid-call, and inside a torch op that aborts
    the process ('terminate called without an active exception', status 134, after the RewardTimeout's message and
    hint). So the exit handlers run and the process ends with the command's status before that shutdown."""
    if not _reward_calls_left_running():
        return
    import atexit
    import os

    if code is not None and not isinstance(code, int):   # SystemExit("message") (or another object), as Python prints it
        print(code, file=sys.stderr)
    status = 0 if code is None else code if isinstance(code, int) else 1
    atexit._run_exitfuncs()   # what a normal exit runs: loggers, trackers, temporary folders
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
