"""Progress reporting: ``progress(done, total)`` callbacks, and a tqdm bar (``pip install tqdm``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import VSSError

Progress = Callable[[int, int], None]


@contextmanager
def tqdm_progress(desc: str = "", unit: str = "frame", **options: Any) -> Iterator[Progress]:
    """A ``progress(done, total)`` callback drawing a tqdm bar with rate and ETA; closed on exit."""
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise VSSError("a progress bar needs tqdm: pip install tqdm (or vss-client[progress])") from e
    bar = tqdm(desc=desc, unit=unit, file=options.pop("file", sys.stderr), dynamic_ncols=True, **options)

    def update(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        if done != bar.n:
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


@contextmanager
def resolve(progress: Progress | bool | None, desc: str, unit: str) -> Iterator[Progress]:
    """``True``: a tqdm bar; a callable: itself; ``None``/``False``: no reporting."""
    if progress is True:
        with tqdm_progress(desc, unit) as bar:
            yield bar
    elif callable(progress):
        yield progress
    else:
        yield lambda done, total: None
