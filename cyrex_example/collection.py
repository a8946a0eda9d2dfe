"""A document collection on disk, cut into chunks with stable ids, and its digest.

- Files: every `.txt`, `.md`, `.py` and `.jsonl` file under the root (recursively; hidden
  files and directories, `__pycache__`, `site-packages`, `dist-packages` and `node_modules`
  skipped, so the Python standard library indexes without the installed packages; files with
  a NUL byte skipped as binary), read as UTF-8
  (undecodable bytes replaced), in sorted path order.
- Documents and `source_id`: a text file is one document whose `source_id` is its path
  relative to the root, POSIX style (`notes/a.md`). Each line of a `.jsonl` file that holds
  an object with a string `text` field is one document, `source_id` = `<relative path>:<line>`
  (1-based, as Helox's data-prep names JSONL records); other lines are skipped and counted.
- Text: normalised as Helox's data-prep does (NFC, LF line endings, no trailing whitespace on
  a line, at most two blank lines in a row).
- Chunks: a document's paragraphs (split on blank lines) are packed greedily into chunks of at
  most `chunk_words` words; a longer paragraph is cut between lines (a longer line between
  words). A chunk is a verbatim slice of the normalised document (line breaks and indentation
  kept), so a requester can tell a chunk of its own text by a substring search. `chunk_id` =
  `<source_id>#<n>`, n counting the document's chunks from 0: the same file gives the same ids.
- Index digest: SHA-256 over the chunks sorted by `chunk_id` (code-point order, i.e. the order
  of their UTF-8 bytes); for each chunk, 8-byte big-endian byte length + UTF-8 `chunk_id`, then
  8-byte big-endian byte length + UTF-8 text. The empty collection's digest is SHA-256 of nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = frozenset({".txt", ".md", ".py", ".jsonl"})
DEFAULT_CHUNK_WORDS = 40  # ~50-60 tokens: a few fit a Helox RAG window's context budget
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
_PARAGRAPH = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
_BLANK_RUN = re.compile(r"\n{4,}")
_WORD = re.compile(r"\S+")
_LINE = re.compile(r"[^\n]*")


class CollectionError(ValueError):
    """The collection path cannot be indexed."""


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    source_id: str
    text: str
    file: str  # the document's file relative to the root (== source_id except for JSONL records)


@dataclass
class Collection:
    """The chunks of a collection and what was read to make them."""

    root: Path
    chunks: list[Chunk]
    documents: int
    files: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return index_digest((c.chunk_id, c.text) for c in self.chunks)


def index_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the sorted (chunk_id, text) pairs, each string length-prefixed (module docstring)."""
    h = hashlib.sha256()
    for chunk_id, text in sorted(pairs):
        for s in (chunk_id, text):
            raw = s.encode("utf-8")
            h.update(struct.pack(">Q", len(raw)) + raw)
    return h.hexdigest()


def normalize(text: str) -> str:
    """NFC, LF line endings, no trailing whitespace on a line, at most two blank lines in a row
    (what Helox's data-prep does to a document before it trains on it)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUN.sub("\n\n\n", text)


def chunk_text(text: str, chunk_words: int = DEFAULT_CHUNK_WORDS) -> list[str]:
    """Paragraphs packed into chunks of at most `chunk_words` words, in order. Each chunk is a
    verbatim slice of `text` (line breaks and indentation kept: code stays code); a paragraph
    too long for one chunk is cut between lines, a line too long between words."""
    if chunk_words < 1:
        raise ValueError("chunk_words must be at least 1")
    spans: list[tuple[int, int, int]] = []  # (start, end, words), each at most chunk_words words
    start = 0
    for sep in [*_PARAGRAPH.finditer(text), None]:
        end = sep.start() if sep else len(text)
        spans += _fit(text, start, end, chunk_words)
        start = sep.end() if sep else len(text)
    chunks: list[str] = []
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and sum(w for _, _, w in group) + span[2] > chunk_words:
            chunks.append(text[group[0][0]:group[-1][1]])
            group = []
        group.append(span)
    if group:
        chunks.append(text[group[0][0]:group[-1][1]])
    return chunks


def _fit(text: str, start: int, end: int, n: int) -> list[tuple[int, int, int]]:
    """text[start:end] as spans of at most n words each, without surrounding blank lines."""
    words = list(_WORD.finditer(text, start, end))
    if not words:
        return []
    # From the start of the first word's line: its indentation is part of the text.
    line_start = max(start, text.rfind("\n", start, words[0].start()) + 1)
    if len(words) <= n:
        return [(line_start, words[-1].end(), len(words))]
    lines = [m for m in _LINE.finditer(text, start, end) if m.group().strip()]
    if len(lines) > 1:
        return [s for m in lines for s in _fit(text, m.start(), m.end(), n)]
    return [(words[i].start() if i else line_start, words[min(i + n, len(words)) - 1].end(), min(n, len(words) - i))
            for i in range(0, len(words), n)]


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts):
            continue
        if path.is_file() and path.suffix in SUFFIXES:
            yield path


def documents(root: str | Path, skipped: dict[str, int] | None = None) -> Iterator[tuple[str, str, str]]:
    """(source_id, file, text) of every document under `root` (a directory, or a single file);
    `file` is the document's file relative to the root."""
    root = Path(root)
    if not root.exists():
        raise CollectionError(f"collection {root} does not exist: pass --collection an existing directory")
    skipped = {} if skipped is None else skipped
    base, paths = (root.parent, [root]) if root.is_file() else (root, list(_files(root)))
    for path in paths:
        data = path.read_bytes()
        if b"\x00" in data:
            skipped["binary files"] = skipped.get("binary files", 0) + 1
            continue
        text = data.decode("utf-8", errors="replace")
        rel = path.relative_to(base).as_posix()
        if path.suffix != ".jsonl":
            yield rel, rel, normalize(text)
            continue
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                skipped["jsonl lines without a text field"] = skipped.get("jsonl lines without a text field", 0) + 1
                continue
            yield f"{rel}:{lineno}", rel, normalize(record["text"])


def read_collection(root: str | Path, chunk_words: int = DEFAULT_CHUNK_WORDS) -> Collection:
    """Read and chunk every document under `root`."""
    root = Path(root).resolve()
    skipped: dict[str, int] = {}
    chunks: list[Chunk] = []
    n_docs = 0
    files: set[str] = set()
    for source_id, file, text in documents(root, skipped):
        n_docs += 1
        files.add(file)
        chunks += [Chunk(f"{source_id}#{n}", source_id, t, file) for n, t in enumerate(chunk_text(text, chunk_words))]
    return Collection(root, chunks, n_docs, len(files), skipped)
