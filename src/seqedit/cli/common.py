"""What every ``seqedit`` command shares: the Typer ``app``, the consoles, option definitions,
argument parsing, clean failures, model and facts loading, and the Rich progress adapter.

Command modules import from here only (never from :mod:`seqedit.cli`), so registering commands on
``app`` forms no import cycle. Results go to ``out`` (stdout, so ``--json`` output stays one
document); spinners, bars and errors go to ``console`` (stderr).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..progress import Phase, ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    from ..facts import Fact
    from ..models.load import LoadedModel

__all__ = [
    "BaseOpt", "DeviceMapOpt", "DtypeOpt", "JsonOpt", "LamOpt", "LayersOpt", "LedgerOpt", "ModelOpt", "VStepsOpt",
    "app", "console", "out", "fail", "load", "parse_csv", "parse_layers", "progress_bars", "read_facts",
]

app = typer.Typer(
    help="Sequential knowledge editing whose every step equals the one-time solution.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
out = Console()

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


def parse_sets(items: Optional[list[str]]) -> dict[str, Any]:
    """``--set NAME=VALUE`` options as typed hyperparameter overrides; a usage error names a bad one."""
    from ..models.presets import EditHParams

    try:
        return EditHParams.parse_assignments(items or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--set") from None


def parse_csv(value: str, what: str) -> tuple[str, ...]:
    """A comma list as lower-case names, first occurrence kept; a usage error if it names nothing."""
    items = tuple(dict.fromkeys(x.strip().lower() for x in value.split(",") if x.strip()))
    if not items:
        raise typer.BadParameter(f"{what} names nothing: {value!r}")
    return items


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` on stderr and exit with 2 (no traceback)."""
    # escaped: paths such as runs[v2] must print as they are, not as Rich markup
    console.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(2)


def load(model: str, dtype: Optional[str] = None, device_map: Optional[str] = None) -> tuple[LoadedModel, float]:
    """Load ``model`` (in ``dtype``, placed by ``device_map``: the ``--dtype`` / ``--device-map`` texts)
    under a status spinner: ``(loaded model, seconds)``; a clean failure if it cannot."""
    from ..errors import SeqEditError
    from ..models.load import load_model, parse_device_map

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the spinner says it; tqdm bars would garble Rich's output
    t = time.perf_counter()
    try:
        with console.status(f"loading {model} …"):
            lm = load_model(model, dtype=dtype, device_map=parse_device_map(device_map))
    except (SeqEditError, ValueError) as e:
        fail(str(e))
    return lm, time.perf_counter() - t


def read_facts(path: str, n: Optional[int], split: Optional[str], fmt: str) -> list[Fact]:
    """The first ``n`` facts of ``path`` (after ``split``); a clean failure if the file is bad or missing."""
    from ..datasets import load_facts
    from ..errors import SeqEditError

    try:
        return load_facts(path, format=fmt, split=split, limit=n)
    except (SeqEditError, OSError) as e:
        fail(str(e))


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
