"""A tqdm bar for jobs: rows, rows/s, generated tokens/s, and an ETA from the tokens left.

Rows/s swings with prompt and answer lengths; tokens/s is what the engine actually sustains.
The ETA is (rows left x tokens per row so far) / tokens per second.
"""

from __future__ import annotations

import time

_now = time.perf_counter  # a module attribute, so a test can drive the clock


class JobProgress:
    def __init__(self, total_rows: int | None, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_rows, unit="row", desc="generate", disable=not enabled, dynamic_ncols=True)
        self.total = total_rows
        self.start = _now()
        self.rows = 0  # generated this run
        self.skipped = 0  # already done by an earlier run
        self.tokens = 0
        self.errors = 0

    def skip(self, rows: int) -> None:
        self.skipped += rows
        self._postfix()  # before update(), which redraws: the bar shows the new figures
        self.bar.update(rows)

    def done(self, rows: int, tokens: int, errors: int) -> None:
        self.rows += rows
        self.tokens += tokens
        self.errors += errors
        self._postfix()
        self.bar.update(rows)

    def _postfix(self) -> None:
        elapsed = max(_now() - self.start, 1e-9)
        tok_s = self.tokens / elapsed
        parts = [f"tok/s={tok_s:.0f}"]
        if self.skipped:
            parts.append(f"skipped={self.skipped}")
        if self.errors:
            parts.append(f"errors={self.errors}")
        if self.total is not None and self.rows and tok_s > 0:
            left = max(self.total - self.rows - self.skipped, 0)
            parts.append(f"eta={_fmt(left * (self.tokens / self.rows) / tok_s)}")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)

    def close(self) -> None:
        self.bar.close()


def _fmt(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
