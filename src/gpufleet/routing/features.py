"""A request's routing features from its body: prompt blocks, a prefix key, a token estimate.

Routing needs a *stable* cut of the prompt, not the engine's tokenizer: messages are rendered
the same way every time (role and content in order), cut into 64-character blocks (about 16
tokens of English, vLLM's block size) and each block's id covers the whole prefix up to it, so
two requests share a block only when everything before it is the same too.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from gpufleet.routing.base import RequestFeatures

__all__ = ["BLOCK_CHARS", "CHARS_PER_TOKEN", "features_of", "prompt_blocks", "render"]

BLOCK_CHARS = 64
CHARS_PER_TOKEN = 4
_MAX_BLOCKS = 8192  # 512k characters: beyond that, more prefix adds nothing to a decision


def render(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"<{m.get('role', '')}>{content or ''}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "".join(str(p) for p in prompt)
    return prompt if isinstance(prompt, str) else ""


def prompt_blocks(text: str) -> tuple[int, ...]:
    """Chained 64-bit ids of the prompt's whole blocks.

    Block *i*'s id covers everything up to the end of block *i*: the running CRC-32 and the
    running Adler-32 of the prefix, side by side. Both chain for free (each call continues the
    last), and zlib computes them in C, so an 8,000-character prompt costs a fraction of a
    cryptographic hash per block (~200 µs, measured); routing needs equal prefixes to get equal
    ids, not resistance to an adversary (a collision only misplaces one request).
    """
    data = memoryview(text.encode("utf-8", "surrogatepass"))
    end = min(len(data) - len(data) % BLOCK_CHARS, _MAX_BLOCKS * BLOCK_CHARS)
    out: list[int] = []
    crc, adler = 0, 1
    crc32, adler32 = zlib.crc32, zlib.adler32
    for start in range(0, end, BLOCK_CHARS):
        block = data[start : start + BLOCK_CHARS]
        crc = crc32(block, crc)
        adler = adler32(block, adler)
        out.append(crc << 32 | adler)
    return tuple(out)


def features_of(body: Mapping[str, Any], session: str | None = None) -> RequestFeatures:
    text = render(body)
    key = ""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if (
                isinstance(m, dict)
                and m.get("role") == "user"
                and isinstance(m.get("content"), str)
            ):
                key = m["content"][:100]
                break
    else:
        key = text[:100]
    return RequestFeatures(
        blocks=prompt_blocks(text),
        prefix_key=f"{body.get('model', '')}:{key}",
        prompt_tokens=len(text) // CHARS_PER_TOKEN,
        session=session,
    )
