"""Ingest: find the corpus files, read and decode them, normalise each document.

Files are found deterministically (sorted) and must resolve inside the configured roots.
Binary files (NUL bytes) are skipped and listed; invalid UTF-8 is decoded with replacement
characters and counted. Normalisation keeps code intact: NFC, LF line endings, trailing
whitespace stripped, at most two consecutive blank lines.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.data.config import DOMAIN_PATTERN, CorpusConfig, CorpusSource, stdlib_dir

WALK_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".jsonl"})
"""Suffixes picked up when a source is a directory (a glob takes whatever it matches)."""

_GLOB_MAGIC = re.compile(r"[*?\[]")
_DOMAIN_RE = re.compile(DOMAIN_PATTERN)
_LINE_END_WS = " \t\f\v"  # stripped from line ends (not other Unicode spaces)
_BLANK_RUNS = re.compile(r"\n{4,}")


class CorpusError(ValueError):
    """Base of the corpus errors: the message names the source, file or setting to fix."""


class EmptyCorpusError(CorpusError):
    """No document is left to build a dataset from (nothing found, or all filtered/deduplicated)."""


class PathOutsideRootsError(CorpusError):
    """A corpus path resolves outside every configured root."""


class SourceNotFoundError(CorpusError):
    """A corpus source path does not exist."""


class CorpusFormatError(CorpusError):
    """A file cannot be read as its source says (bad JSON line, missing text field, bad domain)."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file to read, with the options of the source that found it."""

    source: int  # index of the source in the corpus config
    path: str  # resolved absolute path
    relpath: str  # relative to the source's base directory (POSIX), part of the version id
    kind: Literal["text", "jsonl"]
    domain: str
    docstrings: bool = False
    text_field: str = "text"
    domain_field: str | None = None


@dataclass(slots=True)
class Document:
    """A normalised document. `digest` (SHA-256 of the text) is set by exact dedup."""

    text: str
    domain: str
    origin: str  # "<source>:<relpath>" or "<source>:<relpath>:<line>" for JSONL records
    digest: bytes = b""


@dataclass(slots=True)
class FileResult:
    """What reading one file gave: its documents and what was odd about it."""

    file: SourceFile
    sha256: str
    size: int
    docs: list[Document] = field(default_factory=list)
    binary: bool = False
    replaced_chars: int = 0  # U+FFFD introduced by decoding invalid UTF-8
    unparseable: bool = False  # docstrings requested, but the file is not valid Python


def expand_path(path: str, base_dir: Path) -> Path:
    """Expand '{stdlib}' and '~'; anchor a relative path at base_dir."""
    p = Path(os.path.expanduser(path.replace("{stdlib}", stdlib_dir())))
    return p if p.is_absolute() else base_dir / p


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a relative glob ('**' crosses directories, '*' does not) to a regex."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _excluded(relpath: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(relpath, pat) for pat in patterns)


def _walk(base: Path, exclude: list[str]) -> list[str]:
    """Relative POSIX paths of every file under base, sorted; hidden and excluded dirs pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d != "__pycache__" and not _excluded(rel_dir + d + "/", exclude)
        )
        found.extend(rel_dir + f for f in filenames if not f.startswith("."))
    return sorted(found)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


class _Resolver:
    """Path(p).resolve() and whether it is inside the roots, for many files: each directory is
    resolved once, and a file that is not a symlink resolves to its resolved directory / its name
    (resolving every file walked every component of its path: ~60% of discovering the stdlib)."""

    def __init__(self, roots: list[Path]) -> None:
        self._roots = [str(r) for r in roots]
        self._dirs: dict[str, tuple[str, bool]] = {}

    def _inside(self, resolved: str) -> bool:
        return any(resolved == r or resolved.startswith(r.rstrip("/") + "/") for r in self._roots)

    def __call__(self, path: str) -> tuple[Path, bool]:
        parent, name = os.path.split(path)
        if os.path.islink(path) or not name or name in (".", ".."):
            resolved = str(Path(path).resolve())
            return Path(resolved), self._inside(resolved)
        known = self._dirs.get(parent)
        if known is None:
            resolved_dir = str(Path(parent).resolve())
            known = self._dirs[parent] = (resolved_dir, self._inside(resolved_dir))
        resolved = os.path.join(known[0], name)
        return Path(resolved), known[1] or self._inside(resolved)


def discover_files(corpus: CorpusConfig, base_dir: str | Path | None = None, *,
                   outside: list[str] | None = None) -> list[SourceFile]:
    """Every input file of the corpus, in a deterministic order (source order, then path).

    A source outside the roots is an error (PathOutsideRootsError); a file found under a
    source that resolves outside them (a symlink escaping the roots) is skipped, and its path
    appended to `outside` when given.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    roots = [expand_path(r, base).resolve() for r in corpus.roots]
    skipped = outside if outside is not None else []
    files: list[SourceFile] = []
    for index, src in enumerate(corpus.sources):
        files.extend(_source_files(index, src, base, roots, skipped))
    return files


def _source_files(index: int, src: CorpusSource, base: Path, roots: list[Path], outside: list[str]) -> list[SourceFile]:
    spec = expand_path(src.path, base)
    text = str(spec)
    if _GLOB_MAGIC.search(text):
        parts = spec.parts
        cut = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
        walk_base = Path(*parts[:cut])
        regex = _glob_regex("/".join(parts[cut:]))
        rels = [r for r in _walk(walk_base, src.exclude) if regex.match(r)] if walk_base.is_dir() else []
    elif spec.is_dir():
        walk_base = spec
        rels = [r for r in _walk(spec, src.exclude) if Path(r).suffix in WALK_SUFFIXES]
    elif spec.is_file():
        walk_base, rels = spec.parent, [spec.name]
        target = spec.resolve()
        if not _inside(target, roots):  # the source itself is a link out of the roots
            raise PathOutsideRootsError(
                f"corpus source {src.path!r} ({spec}) resolves to {target}, outside the corpus roots "
                f"{[str(r) for r in roots]} (a symlink out of them): add its target's directory to "
                "corpus.roots or remove the source"
            )
    else:
        raise SourceNotFoundError(f"corpus source {src.path!r} ({spec}) is neither a file, a directory nor a glob")
    if not _inside(walk_base.resolve(), roots) and not _inside(spec.resolve(), roots):
        raise PathOutsideRootsError(
            f"corpus source {src.path!r} ({spec}) is outside the corpus roots "
            f"{[str(r) for r in roots]}: add its directory to corpus.roots or remove the source"
        )
    if src.docstrings:
        rels = [r for r in rels if r.endswith(".py")]
    rels = [r for r in rels if not _excluded(r, src.exclude)]
    if not rels:
        raise EmptyCorpusError(
            f"corpus source {src.path!r} ({spec}) matches no input file"
            + (" (only .py files are read with docstrings: true)" if src.docstrings else "")
        )
    out = []
    resolve = _Resolver(roots)
    for rel in rels:
        p = walk_base / rel
        resolved, inside = resolve(str(p))
        if not inside:
            outside.append(str(p))  # a symlink out of the roots: never read, counted in the ingest report
            continue
        kind = src.kind if src.kind != "auto" else ("jsonl" if p.suffix == ".jsonl" else "text")
        out.append(SourceFile(
            source=index, path=str(resolved), relpath=rel, kind=kind, domain=src.domain,
            docstrings=src.docstrings, text_field=src.text_field, domain_field=src.domain_field,
        ))
    if not out:
        raise EmptyCorpusError(
            f"corpus source {src.path!r} ({spec}): every file it matches resolves outside the corpus roots "
            f"{[str(r) for r in roots]} (symlinks out of them are skipped)"
        )
    return out


def normalize_text(text: str) -> str:
    """NFC, LF line endings, no trailing whitespace, at most two blank lines in a row.

    Leading whitespace is kept: indentation is meaning in code. Each step first checks with a
    substring search (memchr speed) whether it has anything to do: a regex substitution scans
    every position, and `[ \t]+$` over indented code backtracks at each space (the three
    regex passes took ~0.9 s of CPU per 30 MB of stdlib sources, the checks ~0.1 s).
    """
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.endswith(tuple(_LINE_END_WS)) or any(c + "\n" in text for c in _LINE_END_WS):
        text = "\n".join([line.rstrip(_LINE_END_WS) for line in text.split("\n")])
    if "\n\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n")


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _definitions(stmts: list[ast.stmt]) -> Iterator[ast.AST]:
    """Classes and functions in statement lists, in source order, nested ones included.

    Only statement bodies are visited: a docstring is never inside an expression, and skipping
    expressions makes this ~4x faster than ast.walk on the standard library.
    """
    for node in stmts:
        if isinstance(node, _DEFS):
            yield node
            yield from _definitions(node.body)
            continue
        for name in ("body", "orelse", "finalbody"):
            child = getattr(node, name, None)
            if isinstance(child, list):
                yield from _definitions(child)
        for group in (getattr(node, "handlers", None) or []) + (getattr(node, "cases", None) or []):
            yield from _definitions(group.body)


def extract_docstrings(source: str) -> str | None:
    """The module, class and function docstrings of Python source, in source order, joined by blank lines.

    None when the source does not parse.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    parts = []
    for node in (tree, *_definitions(tree.body)):
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            parts.append(doc)
    return "\n\n".join(parts)


def _decode(data: bytes) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd")


def read_file(sf: SourceFile) -> FileResult:
    """Read one corpus file into normalised documents (none for binary files)."""
    data = Path(sf.path).read_bytes()
    result = FileResult(file=sf, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    if b"\x00" in data:
        result.binary = True
        return result
    text, result.replaced_chars = _decode(data)
    origin = f"{sf.source}:{sf.relpath}"
    if sf.kind == "jsonl":
        result.docs = _jsonl_documents(sf, text, origin)
        return result
    if sf.docstrings:
        doc = extract_docstrings(text)
        if doc is None:
            result.unparseable = True
            return result
        text = doc
    result.docs = [Document(normalize_text(text), sf.domain, origin)]
    return result


def _jsonl_documents(sf: SourceFile, text: str, origin: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{sf.path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusFormatError(f"{where}: invalid JSON ({e.msg}); fix the line or set kind: text") from None
        if not isinstance(record, dict):
            raise CorpusFormatError(f"{where}: a JSONL record must be an object, got {type(record).__name__}")
        value = record.get(sf.text_field)
        if not isinstance(value, str):
            raise CorpusFormatError(
                f"{where}: record has no string field {sf.text_field!r} (fields: {sorted(record)}); "
                "set the source's text_field"
            )
        domain = sf.domain
        if sf.domain_field is not None and record.get(sf.domain_field) is not None:
            domain = str(record[sf.domain_field])
            if not _DOMAIN_RE.match(domain):
                raise CorpusFormatError(
                    f"{where}: domain {domain!r} from field {sf.domain_field!r} must match {DOMAIN_PATTERN}"
                )
        docs.append(Document(normalize_text(value), domain, f"{origin}:{lineno}"))
    return docs


def read_files(files: list[SourceFile]) -> list[FileResult]:
    """read_file over a chunk of files (the unit of work of a pool worker)."""
    return [read_file(sf) for sf in files]
