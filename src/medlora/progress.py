"""Every progress bar medlora shows (training, evaluation, tokenizing, export), on stderr, with ETA."""

from __future__ import annotations

import os
import sys


def bar(iterable=None, **kw):
    """A tqdm bar on stderr that follows the terminal's width. A terminal that reports a size of 0 x 0 (a pty
    nobody sized: some `docker exec -t` and `script` sessions, serial consoles) made tqdm print an empty line
    instead of the bar (it hides bars below the screen's last row), so that case gets a fixed 100 x 24."""
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    try:
        size = os.get_terminal_size(kw["file"].fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal: tqdm's own handling
        size = None
    if size is not None and 0 in size:
        kw.setdefault("ncols", size.columns or 100)
        kw.setdefault("nrows", size.lines or 24)
    else:
        kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
