"""What both apps share: consoles, the progress bar, the options every command takes, and
`main`, the console-script entry that turns faults into one line and a non-zero exit."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sqlite3
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand, TyperGroup

from curation.privacy.scrub import one_line

# Off a terminal (a log file, CI), a line is never hard-wrapped: one fault stays one grep-able line.
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())  # progress, warnings, errors
out = Console(soft_wrap=not sys.stdout.isatty())  # results

WorkdirOpt = typer.Option(Path("."), "--workdir", help="The workdir: every output goes under it (manifests/, "
                          "volumes/, cache/, embeddings/, checkpoints/, exports/, reports/); relative paths in "
                          "manifests are relative to it.")
DEBUG_ENV = "MED3DINSIGHT_DEBUG"  # set to 1 for tracebacks (same as --debug)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (the one place defaults live)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name}")


def option(cls: type, name: str, *flags: str, help: str = "", **kw: Any) -> Any:
    """A typer option for config field ``name`` of ``cls``: its default comes from the dataclass,
    its flag is ``--name-with-dashes`` unless ``flags`` are given."""
    return typer.Option(default_of(cls, name), *(flags or ("--" + name.replace("_", "-"),)), help=help, **kw)


def switch(cls: type, name: str, on: str, help: str) -> Any:
    """An on/off option ``--on/--no-on`` for bool field ``name`` of ``cls``."""
    return typer.Option(default_of(cls, name), f"--{on}/--no-{on}", help=help)


def _tidy_help(command: Any) -> None:
    """Help as written, whatever it contains: with rich markup on (typer's default), a help text
    or docstring naming ``pip install 'med3dinsight[ray]'`` would lose ``[ray]`` as a markup tag,
    so brackets are escaped (once, here: nothing else escapes help texts). On/off flags take no
    value, so they show no ``<bool>`` type either (typer shows one for every flag, --help too)."""
    rich = getattr(command, "rich_markup_mode", None) == "rich"
    if rich and command.help:
        command.help = escape(command.help)
    for param in command.params:
        if rich and getattr(param, "help", None):
            param.help = escape(param.help)
        _no_flag_metavar(param)


def _no_flag_metavar(param: Any) -> None:
    if getattr(param, "is_flag", False) and not getattr(param, "count", False) and param.metavar is None:
        param.metavar = ""


class _TidyHelp:
    """Help texts shown as written, flags shown without a value (see `_tidy_help`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _no_flag_metavar(option)
        return option


class _Command(_TidyHelp, TyperCommand):
    """A command of the apps."""


class _Group(_TidyHelp, TyperGroup):
    """The app itself (its --help lists the commands)."""


class _App(typer.Typer):
    """``app.command(...)`` makes `_Command`s unless told otherwise."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


def new_app(help: str) -> typer.Typer:
    """A console app: `_Command`s and a `_Group` (help texts as written, flags without a value)."""
    return _App(help=help, cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}", markup=False),
        console=console,
        transient=False,
    )


def say(line: str, label: str = "", style: str = "yellow", markup: bool = False) -> None:
    """One line on stderr, control characters escaped, never wrapped; ``line`` is plain text
    unless ``markup``."""
    head = f"[{style}]{label}:[/{style}] " if label else ""
    text = one_line(line)
    console.print(head + (text if markup else escape(text)), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2, label: str = "error") -> typer.Exit:
    """Print one line and return the Exit to raise: ``raise fail(f"{path}: ...")``.

    ``message`` is plain text (file names and exception text print as they are)."""
    say(message, label, "red")
    return typer.Exit(code)


class _OneLineHandler(logging.Handler):
    """The library loggers' warnings (`curation.*`) as ``warning: ...`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        say(record.getMessage(), "warning" if record.levelno >= logging.WARNING else "")


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    say(f"{category.__name__}: {message}", "warning")


def fault_line(exc: BaseException) -> str | None:
    """The one line for a fault the user can act on (a file, the disk, a store); None otherwise."""
    if isinstance(exc, FileExistsError) and exc.filename:
        return f"{exc.filename}: exists and is not a folder (or is in the way)"
    if isinstance(exc, OSError):
        name = exc.filename or ""
        why = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
        if name and str(name) in why:
            return why
        return f"{name}: {why}" if name else why
    if isinstance(exc, sqlite3.Error):
        return f"SQLite store: {type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        return "out of memory (smaller --workers, --max-voxels or --batch-size?)"
    try:
        import pyarrow as pa

        if isinstance(exc, pa.ArrowException):
            return f"Parquet/Arrow: {type(exc).__name__}: {exc}"
    except ImportError:  # pragma: no cover
        pass
    return None


def exit_now(code: Any) -> None:
    """End the process without the interpreter's teardown (a quarter of a second and more spent
    freeing the pandas, SciPy and pydicom modules a command imported): the exit handlers run
    (multiprocessing, Ray, logging), the streams are flushed, then the process ends. Where
    another non-daemon thread still runs, the ordinary exit (which waits for it)."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe, no stream: nothing more to say
            pass
    os._exit(code)


def run_console(app: typer.Typer) -> None:
    """The console scripts' entry: `main`, then `exit_now` with its exit status."""
    try:
        main(app)
    except SystemExit as exc:
        exit_now(exc.code)


def main(app: typer.Typer) -> None:
    """Run ``app`` as a console script: faults are one line naming the path and the fault,
    exit code 1; tracebacks only with ``--debug`` (anywhere on the command line) or
    ``MED3DINSIGHT_DEBUG=1``. Library warnings and log lines are one line each."""
    debug = "--debug" in sys.argv[1:] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != "--debug"]
    logger = logging.getLogger("curation")
    logger.addHandler(_OneLineHandler())
    logger.propagate = False
    if not debug:
        warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)  # click returns the exit code of typer.Exit
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        say("aborted", "error", "red")
        raise SystemExit(130) from None
    except Exception as exc:
        # a usage error (bad option value, missing folder): click's own message and status 2;
        # typer bundles its own click, so the class is typer's, not the click package's
        if any(c.__name__ == "ClickException" for c in type(exc).__mro__) and hasattr(exc, "show"):
            ctx = getattr(exc, "ctx", None)
            if ctx is not None and hasattr(exc, "format_message"):  # one line, like every other fault
                say(f"{exc.format_message()} (see `{ctx.command_path} --help`)", "error", "red")
            else:
                exc.show()
            raise SystemExit(exc.exit_code) from None
        if debug:
            raise
        line = fault_line(exc) or f"{type(exc).__name__}: {exc}"
        say(f"{line} (--debug for the traceback)", "error", "red")
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
