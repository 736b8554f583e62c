"""Stream helpers from SGLang's offline-engine docs, made exact.

SGLang's versions guess where consecutive chunks overlap. Ours know the engine's
streaming mode: by default each chunk carries the whole text so far, so the new text is
what lies past the previous chunk's end; with incremental_streaming_output each chunk
carries only the new text already.
"""

from __future__ import annotations

from typing import Any, AsyncIterator


def _is_incremental(engine: Any) -> bool:
    return bool(getattr(getattr(engine, "config", None), "incremental_streaming_output", False))


def stream_and_merge(engine: Any, prompt: str, sampling_params: dict | None = None) -> str:
    """Stream one prompt and return its full generated text."""
    incremental = _is_incremental(engine)
    merged = ""
    for chunk in engine.generate(prompt, sampling_params, stream=True):
        merged = merged + chunk["text"] if incremental else chunk["text"]
    return merged


async def async_stream_and_merge(engine: Any, prompt: str, sampling_params: dict | None = None) -> AsyncIterator[str]:
    """Stream one prompt asynchronously, yielding exactly the new text of each chunk."""
    incremental = _is_incremental(engine)
    seen = 0
    generator = await engine.async_generate(prompt, sampling_params, stream=True)
    async for chunk in generator:
        text = chunk["text"]
        if incremental:
            if text:
                yield text
        else:
            new = text[seen:]
            seen = len(text)
            if new:
                yield new
