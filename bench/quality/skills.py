"""Skills behind a prefix: deterministic text transformations of the corpus.

A skill example is one block: ``"### <skill>\\n" + transform(segment)`` tokenized and cut
to ``seq_len`` tokens, where ``segment`` is a slice of a domain's text piece (the same
train/val/test split as the domains). The base never saw the prefixes; a fine-tune on
skill ``k`` learns to write in that style after its prefix, which is a capability it
*adds* (as instruction tuning does) rather than a shift of the whole distribution.
"""

from __future__ import annotations

import codecs
from typing import Callable, Dict, List, Sequence

import torch

LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})
VOWELS = str.maketrans("", "", "aeiouAEIOU")


def _brackets(text: str) -> str:
    return " ".join(f"[{word}]" for word in text.split(" "))


SKILLS: Dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "snake": lambda t: t.replace(" ", "_"),
    "leet": lambda t: t.translate(LEET),
    "rot13": lambda t: codecs.encode(t, "rot13"),
    "novowel": lambda t: t.translate(VOWELS),
    "brackets": _brackets,
}


def prefix(skill: str) -> str:
    return f"### {skill}\n"


def skill_blocks(
    tokenizer,
    pieces: Sequence[str],
    skill: str,
    seq_len: int,
    *,
    segment_chars: int = 480,
    limit: int = 0,
) -> torch.Tensor:
    """(blocks, seq_len) int64 examples of ``skill`` built from ``pieces``.

    Segments too short for ``seq_len`` tokens are skipped; ``limit`` > 0 caps the count.
    """
    transform = SKILLS[skill]
    texts: List[str] = []
    for piece in pieces:
        for start in range(0, len(piece) - segment_chars + 1, segment_chars):
            texts.append(prefix(skill) + transform(piece[start : start + segment_chars]))
            if limit and len(texts) >= 2 * limit:
                break
        if limit and len(texts) >= 2 * limit:
            break
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows = [ids[:seq_len] for ids in encoded
            if len(ids) >= seq_len]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"skill {skill!r}: no segment reaches {seq_len} tokens; give it more text")
    return torch.tensor(rows, dtype=torch.long)


def mixed_pieces(texts: Dict[str, Dict[str, List[str]]], split: str) -> List[str]:
    """The pieces of every domain for ``split``, interleaved (so a capped set mixes domains)."""
    lists = [texts[name][split] for name in sorted(texts)]
    out: List[str] = []
    for index in range(max(len(x) for x in lists)):
        out.extend(x[index] for x in lists if index < len(x))
    return out
