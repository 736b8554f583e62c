"""One Engine per (model, options) per process, created on first use and shared.

Operators are pickled into worker processes (datasets' num_proc, Ray actors), so they carry
only the *description* of the engine they need; the worker builds it here the first time a
batch arrives, and every later batch and every other operator with the same model reuses it.
Loading a model costs seconds to minutes: doing it once per process is the whole point.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from typing import Any

logger = logging.getLogger("pipeline_infer.operators")
_lock = threading.Lock()
_engines: dict[tuple[str, str], Any] = {}
_owned: set[tuple[str, str]] = set()  # engines this module built (and so shuts down)
_pid = os.getpid()


def engine_key(model: str | None, options: dict[str, Any] | None) -> tuple[str, str]:
    """A hashable, order-independent key: two ops asking for the same engine share it."""
    return (model or "", json.dumps(options or {}, sort_keys=True, default=repr))


def get_engine(model: str | None, options: dict[str, Any] | None = None) -> Any:
    """The process's engine for (model, options), built now if this is the first request."""
    key = engine_key(model, options)
    with _lock:
        _forget_after_fork()
        engine = _engines.get(key)
        if engine is not None and not getattr(engine, "_closed", False):
            return engine
        from pipeline_infer.engine import Engine  # heavy import: only when an engine is needed

        twins = [k for k, e in _engines.items() if k[0] == key[0] and not getattr(e, "_closed", False)]
        if twins:
            # Legal (the options may matter), but each engine holds its own weights and KV cache.
            logger.warning(
                "loading a second engine for model %s with engine options %s (one is loaded with %s); "
                "give ops the same engine_options to share one",
                model or "(bundled)", key[1], twins[0][1],
            )
        engine = Engine(model, **(options or {}))
        _engines[key] = engine
        _owned.add(key)
        return engine


def register_engine(engine: Any, model: str | None = None, **options: Any) -> None:
    """Make an engine the caller already built serve ops that ask for (model, options).

    The caller keeps ownership: shutdown_engines() forgets it but does not shut it down.
    """
    key = engine_key(model, options)
    with _lock:
        _forget_after_fork()
        _engines[key] = engine
        _owned.discard(key)


def shutdown_engines() -> None:
    """Shut down every engine this module built and forget all registered ones."""
    with _lock:
        engines = [(k, e) for k, e in _engines.items() if k in _owned]
        _engines.clear()
        _owned.clear()
    for _, engine in engines:
        try:
            engine.shutdown()
        except Exception:
            pass


def _forget_after_fork() -> None:
    # An engine's thread and device state do not survive fork(): a forked worker (datasets'
    # num_proc uses fork on Linux) must build its own instead of talking to a dead thread.
    global _pid
    if os.getpid() != _pid:
        _engines.clear()
        _owned.clear()
        _pid = os.getpid()


atexit.register(shutdown_engines)
