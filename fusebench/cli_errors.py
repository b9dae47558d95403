"""The command line's one error handler and its exit codes.

Every command of `fusebench` (cli.py) runs through `one_line_errors`: an error a user can
cause becomes one line on stderr, `error: <what happened>; <the fix>`, and one of these exit
codes; any other exception is a bug and keeps its traceback.

    0    done
    1    failed: an unusable cache (CacheError), a failed run (ExtractError), a sample that
         `data check` finds fatal, a file-system fault (OSError)
    2    usage: a bad option, value, path or dataset (ValueError, FileNotFoundError; click's
         own usage errors)
    130  interrupted: Ctrl-C or SIGTERM; nothing half-done is kept, a rerun resumes

README "Exit codes" lists the same; `fusebench -h` ends with EXIT_CODES.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import NoReturn

import typer

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = (
    "Exit codes: 0 done; 1 failed (an unusable cache, a failed run, a sample `data check` "
    "finds fatal, a file-system fault); 2 usage (a bad option, value, path or dataset: fix "
    "the command line); 130 interrupted (Ctrl-C or SIGTERM: rerun the same command)."
)

_failed: list[str] = []  # the error line a command printed (main() adds none after it)
_signalled: list[str] = []  # "SIGTERM" once a staged command was terminated
OWN_FAILURES = {"CacheError", "ExtractError"}  # by name: stage two never imports stage one
READ = "cannot read {path} ({reason}); check the path and its permissions"
RERUN = "rerun the same command"
STAGED = (
    "nothing half-done was kept (a run folder is renamed into place only when complete) "
    "— rerun the same command"
)


def fail(message: str, code: int = FAILED) -> NoReturn:
    """One clear line on stderr, then exit."""
    _failed.append(message)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def failed_already() -> bool:
    """Whether a command printed (or left to rank 0) its error line: main() adds none."""
    return bool(_failed)


def one_line_errors(
    *,
    os_error: str | None = None,
    path: str = "out",
    interrupted: str = RERUN,
    staged: bool = False,
):
    """The one error handler, on every command: an error a user can cause becomes one line
    on stderr and an exit code; anything else is a bug and keeps its traceback.

      KeyboardInterrupt (Ctrl-C, SIGTERM)    130  its message, else "interrupted; <interrupted>"
      CacheError, ExtractError               1    (CacheError is a ValueError: matched first)
      ValueError, FileNotFoundError          2    bad input: fix the command line
      OSError                                1    os_error with {path} (the file, else the
                                                  parameter `path`) and {reason}; default
                                                  fuse._util.os_error_line

    staged: the command writes a staged run folder (stage two): SIGTERM stops it as Ctrl-C
    does, under torchrun too (the folder is removed), and a rank other than 0 stays quiet
    about an interrupt or an error rank 0 reports (fuse.distributed.said_by_rank_0)."""

    def decorate(command):
        @functools.wraps(command)
        def run(**params):
            try:
                with _sigterm_as_interrupt() if staged else contextlib.nullcontext():
                    return command(**params)
            except (KeyboardInterrupt, ValueError, OSError, RuntimeError) as e:
                said = _error_line(e, os_error, params.get(path), interrupted)
                if said is None:
                    raise
                message, code = said
                if staged and _rank_0_says_it(e, code):
                    _failed.append(message)
                    raise typer.Exit(code) from None
                fail(message, code)

        run.one_line_errors = True  # tests/test_cli.py: every command has it
        return run

    return decorate


def _error_line(e: BaseException, os_error, where, interrupted: str) -> tuple[str, int] | None:
    """(one line, exit code) for an error a user can cause; None for a bug."""
    if isinstance(e, KeyboardInterrupt):
        what = "terminated (SIGTERM)" if _signalled else "interrupted"
        return str(e) or f"{what}; {interrupted}", INTERRUPTED
    if OWN_FAILURES & {c.__name__ for c in type(e).__mro__}:
        return " ".join(str(e).split()), FAILED
    if isinstance(e, (ValueError, FileNotFoundError)):
        return " ".join(str(e).split()), USAGE
    if not isinstance(e, OSError):
        return None  # a RuntimeError that is not ours
    if os_error is None:
        from fusebench.fuse._util import os_error_line

        return " ".join(os_error_line(e).split()), FAILED
    return os_error.format(path=e.filename or where, reason=e.strerror or e), FAILED


def _rank_0_says_it(e: BaseException, code: int) -> bool:
    """Under torchrun, whether rank 0 prints this line and this rank (not 0) says nothing:
    an interrupt stops every rank; an error marked by fuse.distributed.said_by_rank_0
    reached every rank."""
    from fusebench.cache.ranks import world

    if world()[0] == 0:
        return False
    dist = sys.modules.get("fusebench.fuse.distributed")  # nothing marked it unless loaded
    marked = dist is not None and getattr(e, dist.SAID_BY_RANK_0, False)
    return code == INTERRUPTED or marked


def _terminated(signum, frame) -> None:
    _signalled.append("SIGTERM")
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (`kill`, a scheduler's preemption, torchrun stopping its ranks) raises
    KeyboardInterrupt in a staged command, so its run folder is removed as on Ctrl-C."""
    import signal
    import threading

    _signalled.clear()  # an earlier command of this process (tests run many) was not this one
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill PID`, a batch system stopping a job) ends a command the way Ctrl-C
    does: one line, exit 130, nothing half-done kept, and a rerun resumes. Forked helpers die
    of it as before: the data loader's image workers have torch's own handler, and when the
    whole process group gets SIGTERM their deaths would make torch's SIGCHLD handler raise a
    "worker killed by signal" traceback into the shutdown, so that handler is dropped first.
    Ranks under torchrun keep the default, so torchrun stops them as it always has."""
    import os
    import signal
    import threading

    if (
        os.environ.get("TORCHELASTIC_RUN_ID")
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # someone chose already
        return
    pid = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked helper: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if callable(signal.getsignal(signal.SIGCHLD)):  # torch's worker watch: we are stopping
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
