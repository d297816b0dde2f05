"""What every ``seqedit`` command shares: the Typer ``app``, the consoles, option definitions,
argument parsing, clean failures, model and facts loading, and the Rich progress adapter.

Command modules import from here only (never from :mod:`seqedit.cli`), so registering commands on
``app`` forms no import cycle. Results go to ``out`` (stdout, so ``--json`` output stays one
document); spinners, bars and errors go to ``console`` (stderr).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..progress import Phase, ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    from ..facts import Fact
    from ..models.load import LoadedModel

__all__ = [
    "BaseOpt", "DeviceMapOpt", "DtypeOpt", "JsonOpt", "LamOpt", "LayersOpt", "LedgerOpt", "ModelOpt", "PresetOpt", "SetOpt",
    "VStepsOpt", "EXIT_CHECK_FAILED", "EXIT_INTERNAL", "EXIT_USAGE",
    "app", "console", "out", "fail", "load", "one_line", "parse_csv", "parse_layers", "parse_sets", "progress_bars",
    "read_facts",
]

EXIT_CHECK_FAILED = 1  # a check ran and failed (verify)
EXIT_USAGE = 2  # bad input: options, files, a refused ledger operation
EXIT_INTERNAL = 3  # an error seqedit did not anticipate (a bug): one line, the traceback with --debug

console = Console(stderr=True)
out = Console()
_debug = {"on": False}


def one_line(msg: object) -> str:
    """``msg`` on one line: every run of whitespace holding a line break becomes one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(msg)).strip()


def _say_error(msg: object) -> None:
    # soft_wrap: Rich would break the line at 80 columns when stderr is no terminal (a log file)
    console.print(f"[bold red]error:[/] {escape(one_line(msg))}", soft_wrap=True, highlight=False)


class _Group(TyperGroup):
    """The ``seqedit`` group: every failure ends as ONE ``error:`` line on stderr and an exit code
    (:data:`EXIT_USAGE` for bad input and refused operations, :data:`EXIT_INTERNAL` for anything
    unforeseen), never a traceback unless ``--debug`` (or ``SEQEDIT_DEBUG=1``)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        from ..errors import SeqEditError

        _debug["on"] = os.environ.get("SEQEDIT_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
        code: int
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except TyperException as e:  # usage errors: bad option values, missing arguments
            if type(e).__name__ != "NoArgsIsHelpError":  # (that one has printed the help)
                ctx = getattr(e, "ctx", None)
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                _say_error(e.format_message() + hint)
            code = e.exit_code
        except typer.Abort:
            _say_error("aborted")
            code = 1
        except (SeqEditError, OSError, ValueError) as e:  # what bad input raises (KeyError, TypeError: bugs)
            if _debug["on"]:
                raise
            _say_error(_describe(e))
            code = EXIT_USAGE
        except Exception as e:  # a bug: say so on one line, the traceback is one flag away
            if _debug["on"]:
                raise
            _say_error(f"internal error ({type(e).__name__}: {_describe(e)}); rerun with seqedit --debug for the traceback")
            code = EXIT_INTERNAL
        if not standalone_mode:
            return code
        sys.exit(code)


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


app = typer.Typer(
    cls=_Group,
    help="Sequential knowledge editing whose every step equals the one-time solution.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar="SEQEDIT_DEBUG", help="Show the traceback of an error."),
) -> None:
    _debug["on"] = debug

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="HF id, local directory, or 'smollm2-135m'.")
DtypeOpt = typer.Option(None, "--dtype", help="Model dtype: float32 (default), bfloat16, float16 or auto; "
                        "a ledger's own by default when reopening one.")
DeviceMapOpt = typer.Option(None, "--device-map", help="Where the model goes: a device (cuda:1, cpu), 'auto' "
                            "(spread over the GPUs, then CPU), or a JSON map {\"module\": device}; "
                            "default: the first GPU, else the CPU.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
LayersOpt = typer.Option(None, "--layers", help="Edited layers, comma separated (default: model preset).")
LamOpt = typer.Option(None, "--lam", help="Preservation weight λ of λ·Σ₀ (default: model preset).")
VStepsOpt = typer.Option(None, "--v-steps", help="Value-optimisation step budget (default: model preset).")
PresetOpt = typer.Option(None, "--preset", help="A named preset of the model instead of its default: paper | public-json (the paper's models), long-run | one-step (the embedded model).")
SetOpt = typer.Option(None, "--set", help="Override any hyperparameter, NAME=VALUE (repeatable), e.g. "
                      "--set v_compute_dtype=bfloat16 --set clamp_norm_factor=0.5.")
LedgerOpt = typer.Option(..., "--ledger", "-l", help="Ledger directory.")
BaseOpt = typer.Option(None, "--model", "-m", help="Base model (default: the one the ledger records).")


def parse_layers(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--layers "1,2"`` as ``(1, 2)``; ``None`` (the preset's layers) when not given."""
    if not spec:
        return None
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise typer.BadParameter(f"--layers must be comma-separated integers, got {spec!r}") from None


def parse_sets(items: Optional[list[str]], **flags: Any) -> dict[str, Any]:
    """``--set NAME=VALUE`` options as typed hyperparameter overrides, merged with the dedicated flags
    (``lam=``, ``layers=`` …; ``None``: not given). A usage error names a bad assignment, or a flag and
    a ``--set`` that give one field different values; a flag not given leaves the ``--set`` value."""
    from ..models.presets import EditHParams

    try:
        out = EditHParams.parse_assignments(items or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--set") from None
    for name, value in flags.items():
        if value is None:
            continue
        if name in out and out[name] != value:
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{flag} {value} and --set {name}={out[name]} disagree; give one",
                                     param_hint="--set")
        out[name] = value
    return out


def parse_csv(value: str, what: str) -> tuple[str, ...]:
    """A comma list as lower-case names, first occurrence kept; a usage error if it names nothing."""
    items = tuple(dict.fromkeys(x.strip().lower() for x in value.split(",") if x.strip()))
    if not items:
        raise typer.BadParameter(f"{what} names nothing: {value!r}")
    return items


def fail(msg: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: msg`` on stderr, on one line, and exit with ``code`` (no traceback)."""
    # escaped: paths such as runs[v2] must print as they are, not as Rich markup
    _say_error(msg)
    raise typer.Exit(code)


def load(model: str, dtype: Optional[str] = None, device_map: Optional[str] = None) -> tuple[LoadedModel, float]:
    """Load ``model`` (in ``dtype``, placed by ``device_map``: the ``--dtype`` / ``--device-map`` texts)
    under a status spinner: ``(loaded model, seconds)``; a clean failure if it cannot."""
    from ..errors import SeqEditError
    from ..models.load import load_model, parse_device_map

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the spinner says it; tqdm bars would garble Rich's output
    t = time.perf_counter()
    if not console.is_terminal:
        _plain(f"loading {model} …")
    try:
        with console.status(f"loading {model} …"):
            lm = load_model(model, dtype=dtype, device_map=parse_device_map(device_map))
    except (SeqEditError, ValueError) as e:
        fail(str(e))
    return lm, time.perf_counter() - t


def _plain(msg: str) -> None:
    """One plain progress line on stderr (for logs: no colour, no wrapping)."""
    console.print(escape(msg), soft_wrap=True, highlight=False, markup=True)


def read_facts(path: str, n: Optional[int], split: Optional[str], fmt: str) -> list[Fact]:
    """The first ``n`` facts of ``path`` (after ``split``); a clean failure if the file is bad or missing."""
    from ..datasets import load_facts
    from ..errors import SeqEditError

    try:
        facts = load_facts(path, format=fmt, split=split, limit=n, distinct=True)
    except (SeqEditError, OSError) as e:
        fail(str(e))
    if not facts:
        fail(f"{path} holds no facts" + (f" in split {split!r}" if split else ""))
    return facts


@contextmanager
def progress_bars(enabled: bool = True, labels: Mapping[Phase, str] | None = None) -> Iterator[ProgressCallback | None]:
    """A :data:`~seqedit.progress.ProgressCallback` drawing Rich bars on stderr (``None`` if not ``enabled``).

    One bar per phase, labelled ``labels[phase]`` or ``phase.label``: a ``start`` event creates it
    (or resets it to the new total, e.g. the layer solves of the next step), an advance event
    advances it (creating it if no start came first). ``STATUS`` events set a one-line description,
    created on the first such event, so runs that send none show no empty line. Bars vanish when
    the block ends.
    """
    if not enabled:
        yield None
        return
    names = {**{p: p.label for p in Phase}, **(labels or {})}
    if not console.is_terminal:  # a log file: plain lines, not bars that only a terminal redraws
        yield _PlainProgress(names)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[Phase, TaskID] = {}

        def show(event: ProgressEvent) -> None:
            task = tasks.get(event.phase)
            if event.phase is Phase.STATUS:
                text = escape(event.message or "")
                if task is None:
                    tasks[event.phase] = bar.add_task(text, total=None)
                else:
                    bar.update(task, description=text)
                return
            if task is None:
                task = tasks[event.phase] = bar.add_task(names[event.phase], total=event.total)
            elif event.start:
                bar.reset(task, total=event.total)
            if event.advance:
                bar.advance(task, event.advance)

        yield show


class _PlainProgress:
    """Progress as plain lines on stderr when it is not a terminal: one per finished step or
    configuration, one per new status message, and for the finer phases (Σ₀ tokens, value
    optimisation, layer solves) at most one every ``SEQEDIT_PROGRESS_SECONDS`` (default 30)."""

    def __init__(self, names: Mapping[Phase, str]) -> None:
        self.names = names
        self.done: dict[Phase, int] = {}
        self.total: dict[Phase, Optional[int]] = {}
        self.t0 = self.last = time.perf_counter()
        try:
            self.every = float(os.environ.get("SEQEDIT_PROGRESS_SECONDS", "30"))
        except ValueError:
            self.every = 30.0
        self.status: Optional[str] = None

    def __call__(self, event: ProgressEvent) -> None:
        p = event.phase
        if p is Phase.STATUS:
            if event.message and event.message != self.status:
                self.status = event.message
                self._line(event.message)
            return
        if event.start or p not in self.done:
            self.done[p] = 0
        if event.total is not None:
            self.total[p] = event.total
        self.done[p] += event.advance
        if not event.advance:
            return
        now = time.perf_counter()
        if p in (Phase.STEPS, Phase.CONFIGS) or now - self.last >= self.every:
            total = self.total.get(p)
            self._line(f"{self.names[p]}: {self.done[p]}" + (f"/{total}" if total is not None else "") + " done")

    def _line(self, msg: str) -> None:
        self.last = time.perf_counter()
        _plain(f"[{self.last - self.t0:7.1f} s] {msg}")
