"""Progress of long work on stderr, also when stderr is not a terminal.

On a terminal: a rich bar that disappears when done. On a pipe or a file (CI, `2> log`, a job
scheduler): plain lines such as `calibrating on bbc-news: 12/64 (19%, 8 s)`, one each time another
tenth is done (at most one every 2 s) or 30 s have passed, and one at the end. Every long loop of the
library uses `bar`, so a compress of minutes never prints nothing until its end.

    with bar("calibrating on bbc-news", total=64, enabled=progress) as b:
        for ...:
            b.advance()
            b.note(f"loss {loss:.4g}")  # optional: a short status shown beside the count
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterator

MIN_GAP_S = 2.0  # never two plain lines closer than this
MAX_GAP_S = 30.0  # a plain line at least this often while work goes on
STEP = 0.1  # and one each time another tenth of the work is done


class _Lines:
    """Plain progress lines (stderr is not a terminal)."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description, self.total, self.done, self.text = description, total, 0, ""
        self.start = self.last = time.perf_counter()
        self.shown = 0.0  # the fraction last printed

    def _line(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        count = f"{self.done}/{self.total} ({self.done / self.total:.0%}, " if self.total else f"{self.done} ("
        sys.stderr.write(f"{self.description}: {count}{elapsed:.0f} s){' ' + self.text if self.text else ''}"
                         f"{' done' if final else ''}\n")
        sys.stderr.flush()
        self.last = time.perf_counter()
        self.shown = self.done / self.total if self.total else 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        fraction = self.done / self.total if self.total else 0.0
        if (now - self.last >= MIN_GAP_S and fraction - self.shown >= STEP - 1e-9) or now - self.last >= MAX_GAP_S:
            self._line()

    def note(self, text: str) -> None:
        self.text = text

    def describe(self, description: str) -> None:
        self.description = description

    def close(self) -> None:
        self._line(final=True)


class _Rich:
    """A rich bar on a terminal (transient)."""

    def __init__(self, description: str, total: int | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), TextColumn("{task.fields[text]}"),
                                  console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, text="")

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        self._progress.update(self._task, text=text)

    def describe(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def close(self) -> None:
        self._progress.stop()


class _Off:
    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def describe(self, description: str) -> None:
        pass

    def close(self) -> None:
        pass


class bar:
    """Context manager: progress of `total` steps of `description` on stderr (nothing when not `enabled`)."""

    def __init__(self, description: str, total: int | None, enabled: bool = True) -> None:
        self._make = (lambda: _Off()) if not enabled else \
            (lambda: _Rich(description, total)) if sys.stderr.isatty() else (lambda: _Lines(description, total))

    def __enter__(self) -> Any:
        self._bar = self._make()
        return self._bar

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()


def say(text: str) -> None:
    """One line of news from long work (a measured round, a decision), on stderr, terminal or not."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def each(items: list[Any], description: str, enabled: bool = True) -> Iterator[Any]:
    """Iterate `items` with a bar (what rich.progress.track did, also off a terminal)."""
    with bar(description, len(items), enabled) as b:
        for item in items:
            yield item
            b.advance()
