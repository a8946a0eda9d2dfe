"""Ingest: file discovery inside roots, decoding, normalisation, JSONL, docstrings, filters."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from services.data_prep.filters import non_text_fraction, quality_filter, reject_reason
from services.data_prep.ingest import (
    CorpusFormatError,
    Document,
    EmptyCorpusError,
    PathOutsideRootsError,
    SourceNotFoundError,
    discover_files,
    extract_docstrings,
    normalize_text,
    read_file,
    read_files,
)
from shared.data.config import CorpusConfig, CorpusSource, FilterConfig, stdlib_corpus


def corpus(tmp_path: Path, *sources: CorpusSource, roots: list[str] | None = None) -> CorpusConfig:
    return CorpusConfig(sources=list(sources), roots=roots or [str(tmp_path)])


def test_normalize_keeps_indentation_and_fixes_whitespace() -> None:
    raw = "\n\ndef f(x):   \r\n    if x:\t\r\n        return 1\r\n\n\n\n\n\n    return 2  \n\n"
    assert normalize_text(raw) == "def f(x):\n    if x:\n        return 1\n\n\n    return 2"


def test_normalize_applies_nfc() -> None:
    decomposed = "cafe\u0301"
    assert normalize_text(decomposed) == "caf\u00e9"


def test_non_utf8_file_is_decoded_with_replacement_and_counted(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("na\u00efve caf\u00e9 text".encode("latin-1"))
    [sf] = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path), domain="d")))
    result = read_file(sf)
    assert result.replaced_chars == 2
    assert result.docs[0].text == "na\ufffdve caf\ufffd text"


def test_binary_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "blob.txt").write_bytes(b"header\x00\x01\x02binary")
    (tmp_path / "ok.txt").write_text("fine text")
    files = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path), domain="d")))
    results = {Path(r.file.path).name: r for r in read_files(files)}
    assert results["blob.txt"].binary and results["blob.txt"].docs == []
    assert not results["ok.txt"].binary and results["ok.txt"].docs[0].text == "fine text"


def test_directory_walk_takes_known_suffixes_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for name in ["b.md", "a.txt", "sub/c.py", "sub/d.rst", "e.jsonl", "x.bin", ".hidden/y.txt", "z.pyc"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('{"text": "t"}' if name.endswith(".jsonl") else "t")
    files = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path), domain="d")))
    assert [f.relpath for f in files] == ["a.txt", "b.md", "e.jsonl", "sub/c.py", "sub/d.rst"]
    assert {f.relpath: f.kind for f in files}["e.jsonl"] == "jsonl"


def test_glob_and_exclude(tmp_path: Path) -> None:
    for name in ["pkg/a.py", "pkg/deep/b.py", "pkg/deep/c.txt", "site-packages/x/d.py"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("t")
    src = CorpusSource(path=f"{tmp_path}/**/*.py", domain="code", exclude=["site-packages/*"])
    files = discover_files(corpus(tmp_path, src))
    assert [f.relpath for f in files] == ["pkg/a.py", "pkg/deep/b.py"]


def test_source_outside_roots_is_rejected(tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "a.txt").write_text("secret")
    with pytest.raises(PathOutsideRootsError, match="outside"):
        discover_files(corpus(tmp_path, CorpusSource(path=str(outside), domain="d"), roots=[str(inside)]))


def test_discovery_resolves_like_path_resolve(tmp_path: Path) -> None:
    """Files are resolved through their (once-resolved) directory, symlinks one by one."""
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (real / "a.txt").write_text("a")
    (real / "b.txt").write_text("b")
    os.symlink(real / "a.txt", real / "link_to_a.txt")  # a symlink inside the roots: read, resolved
    os.symlink(tmp_path / "real", tmp_path / "alias")  # a source through a symlinked directory
    files = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path / "alias"), domain="d")))
    assert [f.relpath for f in files] == ["sub/a.txt", "sub/b.txt", "sub/link_to_a.txt"]
    assert [f.path for f in files] == [str((tmp_path / "alias" / f.relpath).resolve()) for f in files]
    assert files[2].path == str((real / "a.txt").resolve())


def link_out_of_the_roots(tmp_path: Path) -> tuple[Path, Path]:
    """`inside/` (the corpus root) with `link.txt` -> `outside/secret.txt`."""
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside / "secret.txt", inside / "link.txt")
    return inside, outside


def test_symlink_escaping_roots_is_skipped_and_counted(tmp_path: Path) -> None:
    inside, _outside = link_out_of_the_roots(tmp_path)
    (inside / "ok.txt").write_text("fine")
    skipped: list[str] = []
    files = discover_files(corpus(tmp_path, CorpusSource(path=str(inside), domain="d"), roots=[str(inside)]),
                           outside=skipped)
    assert [f.relpath for f in files] == ["ok.txt"]
    assert skipped == [str(inside / "link.txt")]


def test_a_source_whose_every_file_escapes_the_roots_names_it(tmp_path: Path) -> None:
    inside, _outside = link_out_of_the_roots(tmp_path)
    with pytest.raises(EmptyCorpusError, match="resolves outside the corpus roots"):
        discover_files(corpus(tmp_path, CorpusSource(path=str(inside), domain="d"), roots=[str(inside)]))


def test_a_single_file_source_linking_out_of_the_roots_is_refused_naming_its_target(tmp_path: Path) -> None:
    inside, outside = link_out_of_the_roots(tmp_path)
    with pytest.raises(PathOutsideRootsError) as err:
        discover_files(corpus(tmp_path, CorpusSource(path=str(inside / "link.txt"), domain="d"), roots=[str(inside)]))
    assert "link.txt" in str(err.value) and str(outside / "secret.txt") in str(err.value)
    (inside / "real.txt").write_text("fine")  # a plain file source inside the roots is read
    files = discover_files(corpus(tmp_path, CorpusSource(path=str(inside / "real.txt"), domain="d"), roots=[str(inside)]))
    assert [f.relpath for f in files] == ["real.txt"]


def test_missing_source_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="nope"):
        discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path / "nope"), domain="d")))


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("x")
    cfg = CorpusConfig(sources=[CorpusSource(path="data", domain="d")], roots=["data"])
    [sf] = discover_files(cfg, base_dir=tmp_path)
    assert sf.path == str((tmp_path / "data" / "a.txt").resolve())


def test_jsonl_text_field_and_domain_field(tmp_path: Path) -> None:
    records = [{"body": "first doc", "kind": "news"}, {"body": "second doc"}, {"body": "third", "kind": "forum"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    src = CorpusSource(path=str(tmp_path / "d.jsonl"), domain="web", text_field="body", domain_field="kind")
    [sf] = discover_files(corpus(tmp_path, src))
    docs = read_file(sf).docs
    assert [(d.text, d.domain) for d in docs] == [("first doc", "news"), ("second doc", "web"), ("third", "forum")]
    assert docs[2].origin.endswith("d.jsonl:3")


def test_jsonl_missing_text_field_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"content": "wrong field"}\n')
    [sf] = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path / "d.jsonl"), domain="d")))
    with pytest.raises(CorpusFormatError, match=r"d\.jsonl:2.*'text'"):
        read_file(sf)


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{broken\n')
    [sf] = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path / "d.jsonl"), domain="d")))
    with pytest.raises(CorpusFormatError, match=r"d\.jsonl:2"):
        read_file(sf)


def test_docstrings_are_extracted_from_python() -> None:
    src = '"""Module doc."""\n\nclass A:\n    """Class doc."""\n\n    def f(self):\n        """Method doc."""\n'
    assert extract_docstrings(src) == "Module doc.\n\nClass doc.\n\nMethod doc."
    assert extract_docstrings("def broken(:\n") is None


def test_docstrings_source_reads_only_python(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text('"""The docs."""\nx = 1\n')
    (tmp_path / "r.txt").write_text("not python")
    files = discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path), domain="docs", docstrings=True)))
    assert [f.relpath for f in files] == ["m.py"]
    assert read_file(files[0]).docs[0].text == "The docs."


def test_stdlib_demo_corpus_is_found_without_site_packages() -> None:
    files = discover_files(stdlib_corpus())
    rels = {f.relpath for f in files}
    assert "os.py" in rels and "json/__init__.py" in rels
    assert not any(r.startswith("site-packages/") for r in rels)
    assert {f.domain for f in files} == {"code", "docs"}


def test_quality_filters_count_each_reason() -> None:
    cfg = FilterConfig(min_doc_chars=10, max_doc_chars=200, max_line_chars=50, max_non_text_fraction=0.1)
    docs = [
        Document("short", "d", "a"),
        Document("x" * 201, "d", "b"),
        Document("ok line\n" + "y" * 60 + "\nmore", "d", "c"),
        Document("\x01\x02\x03 binary-ish \ufffd\ufffd", "d", "d"),
        Document("a perfectly fine document", "d", "e"),
    ]
    kept, removed = quality_filter(docs, cfg)
    assert [d.origin for d in kept] == ["e"]
    assert removed == {"too_short": 1, "too_long": 1, "long_line": 1, "non_text": 1}
    assert non_text_fraction("ab\x00\ufffd") == 0.5


def test_source_without_input_files_is_an_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(EmptyCorpusError, match="matches no input file"):
        discover_files(corpus(tmp_path, CorpusSource(path=str(tmp_path / "data"), domain="d")))


def _regex_normalize(text: str) -> str:
    """normalize_text as first written, with regex substitutions: the definition the fast path must match."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def _regex_reject_reason(text: str, cfg: FilterConfig) -> str | None:
    import re

    if len(text) < cfg.min_doc_chars:
        return "too_short"
    if len(text) > cfg.max_doc_chars:
        return "too_long"
    if re.search(f"[^\n]{{{cfg.max_line_chars + 1}}}", text):
        return "long_line"
    bad = re.findall("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff]", text)
    if text and len(bad) / len(text) > cfg.max_non_text_fraction:
        return "non_text"
    return None


def test_fast_normalize_and_filters_match_their_regex_definitions() -> None:
    rng = random.Random(0)
    alphabet = [" ", "\t", "\r", "\n", "\n", "\f", "\v", "a", "b", "\u00e9", "e\u0301", "\x01", "\x7f", "\x9f",
                "\ufffd", "\ue000", "\u3000", "    ", "\n\n\n\n"]
    cfg = FilterConfig(min_doc_chars=0, max_line_chars=12, max_non_text_fraction=0.05)
    for _ in range(3_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        if rng.random() < 0.5:
            text = text.encode("ascii", "ignore").decode()  # the ASCII fast paths
        assert normalize_text(text) == _regex_normalize(text), repr(text)
        assert reject_reason(text, cfg) == _regex_reject_reason(text, cfg), repr(text)
