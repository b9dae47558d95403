"""The command line's one error handler (fusebench/cli_errors.py): every command goes
through it, and each kind of error a user can cause gets its one line and documented exit
code (README "Exit codes"); a bug keeps its traceback."""

from __future__ import annotations

import errno

import pytest
import typer
from fusebench.cache import CacheError
from typer.testing import CliRunner

from fusebench.cli import app
from fusebench.cli_errors import EXIT_CODES, FAILED, INTERRUPTED, USAGE, one_line_errors
from tests.conftest import REPO, cli, one_line_error


def commands(group, path=()):
    """(command path, click command) of every command under `group`."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_command_goes_through_the_one_handler():
    found = dict(commands(typer.main.get_command(app)))
    assert {"extract", "fuse", "compare", "predict", "report", "cache info"} <= set(found)
    missing = [name for name, c in found.items() if not getattr(c.callback, "one_line_errors", 0)]
    assert missing == []


class ExtractError(RuntimeError):  # matched by name, as stage two never imports stage one
    pass


@pytest.mark.parametrize(
    "error, code, line",
    [
        (CacheError("damaged cache x.h5;  rerun extract"), FAILED, "damaged cache x.h5; rerun extract"),
        (ExtractError("every sample failed"), FAILED, "every sample failed"),
        (ValueError("--folds must be >= 2"), USAGE, "--folds must be >= 2"),
        (FileNotFoundError("no dataset at d"), USAGE, "no dataset at d"),
        (PermissionError(errno.EACCES, "Permission denied", "/x/c.h5"), FAILED,
         "cannot read /x/c.h5 (Permission denied); check the path and its permissions"),
        (KeyboardInterrupt(), INTERRUPTED, "interrupted; rerun the same command"),
    ],
)  # fmt: skip
def test_an_error_a_user_can_cause_is_one_line_and_its_exit_code(error, code, line):
    sub = typer.Typer()

    @sub.command()
    @one_line_errors(os_error="cannot read {path} ({reason}); check the path and its permissions")
    def go(out: str = "o") -> None:
        raise error

    result = CliRunner().invoke(sub, [])
    assert one_line_error(result, code) == f"error: {line}"


def test_a_bug_keeps_its_traceback():
    sub = typer.Typer()

    @sub.command()
    @one_line_errors()
    def go() -> None:
        raise RuntimeError("a bug")

    result = CliRunner().invoke(sub, [])
    assert isinstance(result.exception, RuntimeError)


def test_the_exit_codes_are_documented_in_help_and_readme():
    assert "Exit codes" in cli("-h").stdout
    readme = (REPO / "README.md").read_text()
    for code in ("0", "1", "2", "130"):
        assert f"| {code} " in readme.split("### Exit codes", 1)[1][:2000], code
    assert "130 interrupted" in EXIT_CODES


def test_cache_info_on_a_damaged_file_is_a_failure_not_usage(tmp_path):
    """cache info and cache verify used to disagree (2 and 1) on the same CacheError."""
    bad = tmp_path / "c.h5"
    bad.write_bytes(b"not hdf5 at all")
    info, verify = cli("cache", "info", bad), cli("cache", "verify", bad)
    assert info.exit_code == verify.exit_code, (info.output, verify.output)
    one_line_error(info)
