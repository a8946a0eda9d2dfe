"""Prompts with retrieved context, laid out the way Helox trained the model.

Helox packs a training window as `<ctx>chunk 1</ctx><ctx>chunk 2</ctx><doc>base text`, the
markers being sentencepiece user-defined symbols (one token each). An export that was trained
so carries `rag_template.json` at its root, listed (and so signed) in its manifest:

    {"chunk_open": "<ctx>", "chunk_close": "</ctx>", "doc_marker": "<doc>", "k": 4, "context_budget": 0.5}

`k`: chunks to put in front; `context_budget`: the fraction of the window the chunks may take,
markers included, counted in the export's own tokens. The window is the template's `seq_len`
(the packed training window) when it has one, else the model's context (`model_config.max_seq_len`).
An export without the file was not trained with context: it is prompted bare.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TEMPLATE_FILE = "rag_template.json"


class RagTemplateError(ValueError):
    """rag_template.json is there but cannot be used."""


class RagTemplate(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    chunk_open: str = Field(min_length=1)
    chunk_close: str = Field(min_length=1)
    doc_marker: str = Field(min_length=1)
    k: int = Field(default=4, gt=0)
    context_budget: float = Field(default=0.5, gt=0, le=1)
    seq_len: int | None = Field(default=None, gt=0, description="The packed training window, in tokens.")

    def window(self, context_length: int) -> int:
        """Tokens of the window the budget is a share of."""
        return min(self.seq_len, context_length) if self.seq_len else context_length


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class RagPrompt:
    text: str
    """What the model is given."""
    chunks_used: int
    """Chunks in front of the prompt (the last one possibly cut)."""
    cut: bool
    """The last chunk was cut to the budget."""
    context_tokens: int
    """Tokens the context takes (markers included)."""


def load_template(export_dir: str | Path, manifest: Mapping[str, Any]) -> tuple[RagTemplate | None, str]:
    """The export's template and a note saying where it came from (or why there is none).

    Only a file the signed manifest lists is used (the loader has checked its SHA-256); an
    unlisted rag_template.json is ignored, since nobody vouches for it."""
    path = Path(export_dir) / TEMPLATE_FILE
    if TEMPLATE_FILE not in manifest.get("files", {}):
        if path.exists():
            return None, f"{TEMPLATE_FILE} is not in the signed manifest: ignored, prompting without context"
        return None, f"the export has no {TEMPLATE_FILE}: prompting without context"
    try:
        return RagTemplate.model_validate(json.loads(path.read_text())), f"{TEMPLATE_FILE} from the export"
    except (OSError, ValueError, ValidationError) as exc:
        raise RagTemplateError(f"{path}: {exc}") from exc


def context_budget(template: RagTemplate, context_length: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """Tokens the chunks may take: the template's share of the window, and never so many that
    the prompt and the answer no longer fit the model's context."""
    return max(0, min(int(template.context_budget * template.window(context_length)),
                      context_length - prompt_tokens - max_new_tokens))


def build_prompt(prompt: str, chunks: Sequence[str], template: RagTemplate, tokenizer: TextTokenizer,
                 budget_tokens: int) -> RagPrompt:
    """`chunk_open + chunk + chunk_close` for each chunk, best first (at most `template.k`), then
    `doc_marker + prompt`.

    The chunks take at most `budget_tokens` tokens, markers included: chunks are added while
    they fit; the first that does not is cut (on a token boundary) to the tokens left and ends
    the context. Tokens are counted per piece with the export's tokenizer.
    """
    overhead = len(tokenizer.encode(template.chunk_open + template.chunk_close))
    parts: list[str] = []
    used, cut = 0, False
    for text in chunks[:template.k]:
        room = budget_tokens - used - overhead
        if room <= 0:
            break
        ids = tokenizer.encode(text)
        if len(ids) > room:
            text, ids, cut = tokenizer.decode(ids[:room]), ids[:room], True
        parts.append(template.chunk_open + text + template.chunk_close)
        used += overhead + len(ids)
        if cut:
            break
    return RagPrompt("".join(parts) + template.doc_marker + prompt, len(parts), cut, used)
