"""Quiet by default: what libraries say (log records, Python warnings) goes to a file in the run directory, and
their progress bars are off; the console keeps automodel's own lines. `logging.verbose = true` leaves them all on."""

import contextlib
import importlib
import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence

# Loggers of the libraries a run uses (their children follow them).
LIBRARIES = ("transformers", "datasets", "huggingface_hub", "peft", "accelerate", "torch", "DeepSpeed", "deepspeed",
             "mlflow", "alembic", "sqlalchemy", "wandb", "matplotlib", "PIL", "filelock", "urllib3", "py.warnings")

# Libraries whose progress bars are turned off (importing them to do so costs ~1 s: `automodel plot` skips it).
BARS = ("transformers", "datasets", "huggingface_hub")


class _ToFile(logging.Filter):
    """On a library's logger: its own records go to the file and no further, whatever console handler the library
    attaches later (DeepSpeed and MLflow attach one when first imported)."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False


def debug_log_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / "logs" / ("debug.log" if rank == 0 else f"debug_rank{rank}.log")


@contextlib.contextmanager
def libraries_to_file(output_dir: Path, rank: int, preload: Sequence[str] = ()) -> Iterator[Path]:
    """While open, the libraries' log records and Python warnings go to <output_dir>/logs/debug.log (rank r > 0:
    debug_rank<r>.log) and their progress bars are off; everything is put back on exit (a Python user may train
    again). `preload`: modules imported inside, so what they say and the console handlers they attach as they are
    imported are set aside too."""
    path = debug_log_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        with _libraries_to(handler, preload):
            yield path
    finally:
        handler.close()


@contextlib.contextmanager
def libraries_silenced(preload: Sequence[str] = ("deepspeed",), bars: Sequence[str] = BARS) -> Iterator[None]:
    """For a command with no run directory to log into (merge, chat, generate, plot): the libraries' records,
    warnings and progress bars are dropped, so the console shows the command's own output (--verbose keeps them).
    DeepSpeed is imported inside (peft and transformers import it where installed) so its import-time lines go too."""
    with _libraries_to(logging.NullHandler(), preload, bars):
        yield


@contextlib.contextmanager
def _libraries_to(handler: logging.Handler, preload: Sequence[str], bars: Sequence[str] = BARS) -> Iterator[None]:
    to_file = _ToFile(handler)
    saved_filters = list(warnings.filters)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once per place, into the file
    before: dict[str, tuple[list[logging.Handler], bool]] = {}
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        before[name] = ([], logger.propagate)
        logger.addHandler(handler)  # records of its child loggers, which propagate here
        logger.addFilter(to_file)  # its own records
        logger.propagate = False
    _set_aside_consoles(before)
    switched = _progress_bars(False, bars)
    try:
        for module in preload:  # imported inside: what a module says as it is imported is caught too
            try:
                importlib.import_module(module)
            except ImportError:
                pass
        _set_aside_consoles(before)  # and the console handlers it attached are set aside
        yield
    finally:
        _progress_bars(True, switched)
        for name, (consoles, propagate) in before.items():
            logger = logging.getLogger(name)
            logger.removeFilter(to_file)
            logger.removeHandler(handler)
            for console in consoles:
                logger.addHandler(console)
            logger.propagate = propagate
        logging.captureWarnings(False)
        warnings.filters[:] = saved_filters


def _set_aside_consoles(before: dict[str, tuple[list[logging.Handler], bool]]) -> None:
    """Takes the libraries' console handlers off their loggers (they go back on exit): a child logger's record
    reaches its parent's handlers, past the parent's filter."""
    for name, (consoles, _) in before.items():
        logger = logging.getLogger(name)
        for console in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(console)
            consoles.append(console)


def _progress_bars(on: bool, which: Sequence[str] = BARS) -> list[str]:
    """Turns the libraries' progress bars (and transformers' console handler) off, or back on; returns the libraries
    whose bars were on and are now off."""
    switched = []
    for library in which:
        try:
            if library == "transformers":
                from transformers.utils import logging as hf_logging

                (hf_logging.enable_default_handler if on else hf_logging.disable_default_handler)()
                was_on = hf_logging.is_progress_bar_enabled()
                (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
            elif library == "datasets":
                import datasets

                was_on = datasets.is_progress_bar_enabled()
                (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
            else:
                from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                                   enable_progress_bars)

                was_on = not are_progress_bars_disabled()
                (enable_progress_bars if on else disable_progress_bars)()
            if was_on:
                switched.append(library)
        except ImportError:
            pass
    return switched
