"""Domains, deterministic splits and the tokenizer.

A domain is ``NAME=GLOB``; ``GLOB`` may start with ``strings:`` to use the string
literals of Python files instead of their raw text (``pydoc_data/topics.py`` is a
dict of documentation strings). ``{stdlib}`` expands to the running Python's
standard-library folder.

Split: each domain's text (files ordered by a hash of their path, capped at
``max_chars``) is cut into ``chunk_chars`` pieces; piece ``i`` goes to ``val`` when
``i % 10 == 0``, to ``test`` when ``i % 10 == 5`` and to ``train`` otherwise. The
tokenizer is trained on the train pieces only. Each split is then tokenized and
packed into blocks of ``seq_len`` tokens.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch

EOS = "<|endoftext|>"
SPLITS = ("train", "val", "test")


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


DEFAULT_DOMAINS = (
    "code={stdlib}/*.py",
    "prose=strings:{stdlib}/pydoc_data/topics.py",
    "legal=/usr/share/common-licenses/*",
)


@dataclass(frozen=True)
class Domain:
    name: str
    pattern: str
    strings: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Domain":
        if "=" not in spec:
            raise ValueError(f"--domain expects NAME=GLOB, got {spec!r}")
        name, pattern = spec.split("=", 1)
        name = name.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"domain name must be alphanumeric (with - or _), got {name!r}")
        strings = pattern.startswith("strings:")
        if strings:
            pattern = pattern[len("strings:"):]
        return cls(name, pattern.replace("{stdlib}", stdlib_dir()), strings)

    def files(self) -> List[str]:
        found = {}
        for path in glob.glob(self.pattern, recursive=True):
            if not os.path.isfile(path):
                continue
            real = os.path.realpath(path)  # symlinks (GPL -> GPL-3) count once
            found.setdefault(real, path)
        return sorted(found, key=lambda p: hashlib.sha1(p.encode()).hexdigest())


def python_strings(source: str) -> str:
    """The string literals (>= 40 characters) of a Python file, in order."""
    tree = ast.parse(source)
    parts = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= 40
    ]
    return "\n\n".join(parts)


def read_domain(domain: Domain, max_chars: int) -> List[str]:
    """Documents of a domain (one per file), capped at ``max_chars`` in total."""
    files = domain.files()
    if not files:
        raise FileNotFoundError(f"domain {domain.name!r}: no files match {domain.pattern!r}")
    docs, total = [], 0
    for path in files:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if domain.strings:
            try:
                text = python_strings(text)
            except SyntaxError:
                continue
        text = text[: max(0, max_chars - total)]
        if text.strip():
            docs.append(text)
            total += len(text)
        if total >= max_chars:
            break
    if not docs:
        raise ValueError(f"domain {domain.name!r}: the matched files hold no text")
    return docs


def split_text(docs: Sequence[str], chunk_chars: int) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {s: [] for s in SPLITS}
    index = 0
    for doc in docs:
        for start in range(0, len(doc), chunk_chars):
            piece = doc[start : start + chunk_chars]
            slot = index % 10
            split = "val" if slot == 0 else "test" if slot == 5 else "train"
            out[split].append(piece)
            index += 1
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int, path: Path):
    """Byte-level BPE trained on ``texts``, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    fast.save_pretrained(str(path))
    return fast


def pack(tokenizer, pieces: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenize ``pieces`` (EOS between them) and pack into (blocks, seq_len) int64."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: List[int] = []
    for encoding in tokenizer(list(pieces), add_special_tokens=False)["input_ids"]:
        ids.extend(encoding)
        ids.append(eos)
    blocks = len(ids) // seq_len
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


@dataclass
class Corpus:
    names: List[str]
    tokenizer: Path
    blocks: Dict[str, Dict[str, torch.Tensor]]  # split -> domain -> (blocks, seq_len)
    stats: Dict[str, Dict[str, object]]


def domain_texts(domains: Sequence[Domain], max_chars: int, chunk_chars: int) -> Dict[str, Dict[str, List[str]]]:
    """domain -> split -> text pieces (the deterministic split above)."""
    return {d.name: split_text(read_domain(d, max_chars), chunk_chars) for d in domains}


def prepare(
    domains: Sequence[Domain],
    root: Path,
    *,
    vocab_size: int,
    seq_len: int,
    max_chars: int,
    chunk_chars: int,
) -> Corpus:
    """Read, split, train the tokenizer (cached under ``root``), pack the blocks."""
    from transformers import PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    texts = domain_texts(domains, max_chars, chunk_chars)
    digest = hashlib.sha256()
    for name in sorted(texts):
        for split in SPLITS:
            for piece in texts[name][split]:
                digest.update(piece.encode("utf-8", "replace"))
    digest.update(json.dumps([vocab_size, seq_len]).encode())
    key = digest.hexdigest()[:16]
    tok_dir = root / f"tokenizer-{key}"
    cache = root / f"blocks-{key}.pt"
    if (tok_dir / "tokenizer.json").exists() and cache.exists():
        saved = torch.load(cache)
        return Corpus(saved["names"], tok_dir, saved["blocks"], saved["stats"])
    train_texts = [p for name in sorted(texts) for p in texts[name]["train"]]
    tokenizer = train_tokenizer(train_texts, vocab_size, tok_dir)
    blocks = {s: {} for s in SPLITS}
    stats: Dict[str, Dict[str, object]] = {}
    for d in domains:
        stats[d.name] = {"pattern": ("strings:" if d.strings else "") + d.pattern,
                         "files": len(d.files())}
        for split in SPLITS:
            packed = pack(tokenizer, texts[d.name][split], seq_len)
            if packed.shape[0] == 0:
                raise ValueError(
                    f"domain {d.name!r}: the {split} split is shorter than one block of "
                    f"{seq_len} tokens; give it more text"
                )
            blocks[split][d.name] = packed
            stats[d.name][f"{split}_chars"] = sum(len(p) for p in texts[d.name][split])
            stats[d.name][f"{split}_tokens"] = int(packed.numel())
    names = [d.name for d in domains]
    torch.save({"names": names, "blocks": blocks, "stats": stats}, cache)
    return Corpus(names, tok_dir, blocks, stats)
