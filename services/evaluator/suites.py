"""Test suites from files, and the two model primitives they need: batched generation with the
KV cache, and log-likelihoods of continuations (also used by the lm-eval adapter).

A suite directory holds `*.yaml`/`*.yml` files (one suite each) and/or `*.jsonl` files (one item
per line, the suite named after the file). YAML layout:

    name: python_completion
    description: ...
    defaults: {scorer: exact, case_fold: false, max_new_tokens: 16, stop: ["\\n"]}
    items:
      - {id: main_guard, prompt: "if __name__ == ", expected: "\\"__main__\\":"}
      - {id: sorted_kw, prompt: "...", scorer: loglik_choice, choices: [" reverse", " flip"], answer: 0}

Scorers: `exact` and `contains` (normalised, see `scoring.normalize`), `similarity` (chrF/100
or MiniLM cosine, per item or the config's default), `loglik_choice` (sum log-prob of each
choice given the prompt; the item scores acc, acc_norm is reported too). A prompt is fed as
the start of a document: EOS first, since the shards put EOS between documents.

Retrieval-conditioned items (`retrieval: true`, optionally `query:` the text sent to the retriever,
default the prompt) are for runs trained on RAG-packed data: their question goes to the run's
retriever (the dataset's local index, verified by digest) and the prompt is laid out as training
packed its windows (`retrieval_gain.RagPrompter`: <ctx>chunk</ctx>... <doc> EOS prompt, the
dataset's k, markers and context budget). Each such item is scored twice, with retrieved context
(its score) and without (`<doc> EOS prompt`: score_without_retrieval); the suite reports both
means and their difference (`SuiteResult.retrieval`). A run without retrieval (no `rag:` section)
skips these items, each with a note (`SuiteResult.skipped`); a suite left with no item is reported
with n = 0 and no score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.model import generate

from . import scoring
from .config import EvalConfig

Scorer = Literal["exact", "contains", "similarity", "loglik_choice"]


class SuiteError(ValueError):
    """A suite file that cannot be read or validated."""


class SuiteItem(BaseModel):
    """One test item."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    scorer: Scorer = "exact"
    expected: str | list[str] | None = Field(default=None, description="Reference output(s) for generation scorers.")
    choices: list[str] | None = Field(default=None, description="Continuations for loglik_choice.")
    answer: int | None = Field(default=None, ge=0, description="Index of the right choice.")
    case_fold: bool = False
    similarity: Literal["chrf", "embedding"] | None = Field(default=None, description="None: the config's default.")
    max_new_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None
    retrieval: bool = Field(default=False, description="Prompt with retrieved context (RAG-trained runs only).")
    query: str | None = Field(default=None, description="What is sent to the retriever (None: the prompt).")

    @model_validator(mode="after")
    def _check(self) -> SuiteItem:
        if self.scorer == "loglik_choice":
            if not self.choices or self.answer is None or self.answer >= len(self.choices):
                raise ValueError(f"item {self.id!r}: loglik_choice needs choices and an answer index within them")
        elif self.expected is None or (isinstance(self.expected, list) and not self.expected):
            raise ValueError(f"item {self.id!r}: scorer {self.scorer} needs 'expected'")
        if self.query is not None and not self.retrieval:
            raise ValueError(f"item {self.id!r}: 'query' is only used with retrieval: true")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    items: list[SuiteItem]
    source: str = ""

    @property
    def needs_retrieval(self) -> bool:
        return any(it.retrieval for it in self.items)

    @model_validator(mode="after")
    def _unique_ids(self) -> Suite:
        ids = [i.id for i in self.items]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"suite {self.name!r} repeats item ids {dupes}")
        return self


def load_suite(path: str | Path) -> Suite:
    """One suite from a YAML or JSONL file."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
            return Suite(name=path.stem, items=items, source=str(path))
        import yaml

        data = yaml.safe_load(path.read_text("utf-8")) or {}
        if not isinstance(data, dict) or "items" not in data:
            raise SuiteError(f"{path}: a suite YAML needs a mapping with 'items'")
        defaults = data.pop("defaults", {}) or {}
        items = [{**defaults, **item} for item in data.pop("items") or []]
        return Suite(**{"name": path.stem, **data, "items": items, "source": str(path)})
    except (ValidationError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, SuiteError):
            raise
        raise SuiteError(f"invalid suite file {path}: {exc}") from exc


def load_suites(directory: str | Path) -> list[Suite]:
    """Every suite file of a directory, sorted by file name; suite names must be unique."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SuiteError(f"suite directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".jsonl"))
    suites = [load_suite(p) for p in files]
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise SuiteError(f"duplicate suite names in {directory}: {names}")
    return suites


# --- model primitives ---------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def split_continuation(sp: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as lm-evaluation-harness splits them: trailing spaces
    of the context move to the continuation, the pair is encoded whole and split at the
    context's length (so merges across the boundary count toward the continuation)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = sp.encode(context + continuation)
    ctx = sp.encode(context) if context else []
    cont = whole[len(ctx):]
    if not cont:  # a merge swallowed the continuation: encode it alone
        cont = sp.encode(continuation)
    return ctx, cont


@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16,
) -> list[tuple[float, bool]]:
    """(sum log-prob, is_greedy) of each continuation's ids given its context's ids.

    The context must hold at least one token; both are left-truncated to max_seq_len + 1 together.
    """
    max_len = model.config.max_seq_len
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    seqs = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError("token_logprobs needs a non-empty context (e.g. EOS) and continuation")
        full = (list(ctx) + list(cont))[-(max_len + 1):]
        n_cont = min(len(cont), len(full) - 1)
        seqs.append((i, full, n_cont))
    seqs.sort(key=lambda s: -len(s[1]))  # similar lengths together: less padding
    try:
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b:b + batch_size]
            T = max(len(s[1]) for s in chunk) - 1
            inp = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, (_, full, _) in enumerate(chunk):
                inp[r, :len(full) - 1] = torch.tensor(full[:-1])
            logp = model(inp.to(device)).float().log_softmax(-1)  # [B, T, V]; right padding needs no mask
            for r, (i, full, n_cont) in enumerate(chunk):
                L = len(full) - 1
                tgt = torch.tensor(full[-n_cont:], device=device)
                rows = logp[r, L - n_cont:L]  # [n_cont, V]
                lp = rows.gather(-1, tgt[:, None]).squeeze(-1)
                out[i] = (float(lp.sum()), bool((rows.argmax(-1) == tgt).all()))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def generate_texts(
    model: torch.nn.Module,
    sp: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    prefix_id: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> list[str]:
    """Completions (decoded new text, EOS excluded) of each prompt, batched with left padding."""
    return generate_from_ids(model, sp, [[prefix_id] + sp.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                             eos_id=eos_id, pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                             batch_size=batch_size, seed=seed)


def generate_from_ids(
    model: torch.nn.Module,
    sp: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> list[str]:
    """`generate_texts` for prompts given as token ids (left-truncated to leave max_new_tokens room)."""
    max_len = model.config.max_seq_len
    keep = max(1, max_len - max_new_tokens)
    encoded = [list(p)[-keep:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = _device(model)
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T0 = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T0), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), T0, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, T0 - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, T0 - len(encoded[i]):] = 1
        same = bool(mask.all())
        res = generate(model, ids.to(device), min(max_new_tokens, max_len - T0), temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_token_id=eos_id, attention_mask=None if same else mask.to(device),
                       generator=gen)
        for r, i in enumerate(idx):
            new = res[r, T0:].tolist()
            if eos_id in new:
                new = new[:new.index(eos_id)]
            out[i] = sp.decode(new)
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s and (k := text.find(s)) >= 0:
            cut = min(cut, k)
    return text[:cut]


# --- running suites -------------------------------------------------------------------------


class ItemResult(BaseModel):
    id: str
    scorer: Scorer
    score: float
    output: str | None = None
    expected: str | list[str] | None = None
    choice_logprobs: list[float] | None = None
    extra: dict[str, float] = Field(default_factory=dict)
    retrieval: bool = Field(default=False, description="Prompted with retrieved context (score: with it).")
    score_without_retrieval: float | None = Field(default=None, description="The same item, no context retrieved.")
    output_without_retrieval: str | None = None
    choice_logprobs_without_retrieval: list[float] | None = None
    retrieved: list[str] | None = Field(default=None, description="Chunk ids packed into the prompt, rank order.")
    context_tokens: int | None = Field(default=None, description="Tokens of the retrieved part of the prompt.")


class SuiteResult(BaseModel):
    name: str
    score: float = Field(description="Mean item score, 0-1 (NaN when every item was skipped: n = 0).")
    n: int
    by_scorer: dict[str, float] = Field(default_factory=dict, description="Mean score per scorer type.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Extra aggregates, e.g. acc_norm.")
    items: list[ItemResult]
    retrieval: dict[str, float] | None = Field(
        default=None, description="Retrieval-conditioned items: n, score_with, score_without (means), gain = with - without.")
    skipped: dict[str, str] = Field(default_factory=dict, description="Items not scored, and why.")

    def scores(self) -> dict[str, float]:
        return {i.id: i.score for i in self.items}


Condition = Literal["plain", "with", "without"]


def _score_items(
    model: torch.nn.Module, sp: Any, jobs: list[tuple[str, SuiteItem, list[int], list[list[int]] | None]],
    config: EvalConfig, *, eos_id: int, pad_id: int, embedder: scoring.Embedder | None,
) -> dict[str, ItemResult]:
    """Score jobs (key, item, prompt ids, per-choice (context ids) for loglik items): key -> result.

    A generation job's ids are the whole prompt; a loglik job's context ids come per choice (the
    continuation's ids follow, `split_continuation`)."""
    g = config.generation
    results: dict[str, ItemResult] = {}
    gen = [(key, it, ids) for key, it, ids, _ in jobs if it.scorer != "loglik_choice"]
    by_len: dict[int, list[tuple[str, SuiteItem, list[int]]]] = {}
    for job in gen:
        by_len.setdefault(job[1].max_new_tokens or g.max_new_tokens, []).append(job)
    outputs: dict[str, str] = {}
    for n_new, group in sorted(by_len.items()):
        texts = generate_from_ids(model, sp, [ids for _, _, ids in group], max_new_tokens=n_new, eos_id=eos_id,
                                  pad_id=pad_id, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                  batch_size=g.batch_size, seed=g.seed)
        for (key, it, _), text in zip(group, texts, strict=True):
            outputs[key] = cut_at_stop(text, it.stop if it.stop is not None else g.stop)

    embed = []
    for key, it, _ in gen:
        out = outputs[key]
        if it.scorer == "exact":
            score = scoring.exact_match(out, it.expected, case_fold=it.case_fold)
        elif it.scorer == "contains":
            score = scoring.contains(out, it.expected, case_fold=it.case_fold)
        elif (it.similarity or config.similarity) == "chrf":
            refs = [it.expected] if isinstance(it.expected, str) else it.expected
            score = max(scoring.chrf(out, r) for r in refs) / 100.0
        else:
            embed.append((key, it))
            continue
        results[key] = ItemResult(id=it.id, scorer=it.scorer, score=score, output=out, expected=it.expected)
    if embed:
        embedder = embedder or scoring.Embedder(config.embedding_model)
        refs = [it.expected if isinstance(it.expected, str) else it.expected[0] for _, it in embed]
        cos = embedder.cosine([outputs[key] for key, _ in embed], refs)
        for (key, it), c in zip(embed, cos, strict=True):
            results[key] = ItemResult(id=it.id, scorer=it.scorer, score=max(0.0, c), output=outputs[key],
                                      expected=it.expected, extra={"cosine": c})

    mc = [(key, it, ctxs) for key, it, _, ctxs in jobs if it.scorer == "loglik_choice"]
    if mc:
        reqs = []
        for _, it, ctxs in mc:
            for c, ctx in zip(it.choices, ctxs, strict=True):
                reqs.append((ctx, split_continuation(sp, it.prompt, c)[1]))
        lps = token_logprobs(model, reqs, batch_size=config.batch_size)
        k = 0
        for key, it, _ in mc:
            lp = [lps[k + j][0] for j in range(len(it.choices))]
            k += len(it.choices)
            m = scoring.choice_metrics(lp, [len(c.encode("utf-8")) for c in it.choices], it.answer)
            results[key] = ItemResult(id=it.id, scorer=it.scorer, score=m["acc"], choice_logprobs=lp,
                                      expected=it.choices[it.answer], extra={"acc_norm": m["acc_norm"]})
    return results


def run_suite(
    model: torch.nn.Module, sp: Any, suite: Suite, config: EvalConfig, *, eos_id: int, pad_id: int = 0,
    embedder: scoring.Embedder | None = None, rag: Any = None, rag_note: str = "",
) -> SuiteResult:
    """Score every item of a suite; per-item outputs kept.

    rag: a `retrieval_gain.RagPrompter` for a RAG-trained run (None: retrieval items are skipped,
    `rag_note` saying why)."""
    g = config.generation
    max_len = model.config.max_seq_len
    skipped: dict[str, str] = {}
    jobs: list[tuple[str, SuiteItem, list[int], list[list[int]] | None]] = []
    meta: dict[str, Any] = {}  # item id -> RagPrompt of the generation prompt (or of the loglik context)
    rag_items = [it for it in suite.items if it.retrieval]
    chunks_of: dict[str, list[tuple[str, list[int]]]] = {}
    if rag is not None and rag_items:
        found = rag.retrieve([it.query or it.prompt for it in rag_items])
        chunks_of = {it.id: f for it, f in zip(rag_items, found, strict=True)}
    for it in suite.items:
        mc = it.scorer == "loglik_choice"
        if not it.retrieval:
            ctxs = [[eos_id] + split_continuation(sp, it.prompt, c)[0] for c in it.choices] if mc else None
            jobs.append((f"plain:{it.id}", it, [eos_id] + sp.encode(it.prompt), ctxs))
            continue
        if rag is None:
            skipped[it.id] = f"retrieval item skipped: {rag_note or 'the run has no retriever'}"
            continue
        try:
            if mc:
                contexts = [split_continuation(sp, it.prompt, c) for c in it.choices]
                packed = [rag.pack(ctx, chunks_of[it.id]) for ctx, _ in contexts]
                need = max(len(p.with_ids) + len(cont) for p, (_, cont) in zip(packed, contexts, strict=True))
                if need > max_len + 1:
                    raise ValueError(f"the prompt with context and a choice takes {need} tokens, more than the "
                                     f"model's max_seq_len + 1 ({max_len + 1})")
                meta[it.id] = packed[0]
                jobs.append((f"with:{it.id}", it, [], [p.with_ids for p in packed]))
                jobs.append((f"without:{it.id}", it, [], [p.without_ids for p in packed]))
            else:
                p = rag.pack(sp.encode(it.prompt), chunks_of[it.id])
                n_new = it.max_new_tokens or g.max_new_tokens
                if len(p.with_ids) + n_new > max_len:
                    raise ValueError(f"the prompt with context takes {len(p.with_ids)} tokens; with {n_new} new "
                                     f"tokens that exceeds the model's max_seq_len ({max_len})")
                meta[it.id] = p
                jobs.append((f"with:{it.id}", it, p.with_ids, None))
                jobs.append((f"without:{it.id}", it, p.without_ids, None))
        except ValueError as exc:
            skipped[it.id] = f"retrieval item skipped: {exc}"

    scored = _score_items(model, sp, jobs, config, eos_id=eos_id, pad_id=pad_id, embedder=embedder)
    items: list[ItemResult] = []
    for it in suite.items:
        if it.id in skipped:
            continue
        if not it.retrieval:
            items.append(scored[f"plain:{it.id}"])
            continue
        w, wo, p = scored[f"with:{it.id}"], scored[f"without:{it.id}"], meta[it.id]
        extra = {**w.extra, **{f"{k}_without_retrieval": v for k, v in wo.extra.items()}}
        items.append(w.model_copy(update={
            "retrieval": True, "score_without_retrieval": wo.score, "output_without_retrieval": wo.output,
            "choice_logprobs_without_retrieval": wo.choice_logprobs, "retrieved": p.chunk_ids,
            "context_tokens": p.context_tokens, "extra": extra}))

    by_scorer: dict[str, list[float]] = {}
    for r in items:
        by_scorer.setdefault(r.scorer, []).append(r.score)
    metrics: dict[str, float] = {}
    mc_results = [r for r in items if r.scorer == "loglik_choice"]
    if mc_results:
        metrics["acc"] = sum(r.score for r in mc_results) / len(mc_results)
        metrics["acc_norm"] = sum(r.extra["acc_norm"] for r in mc_results) / len(mc_results)
    retrieval = None
    conditioned = [r for r in items if r.retrieval]
    if conditioned:
        with_ = sum(r.score for r in conditioned) / len(conditioned)
        without = sum(r.score_without_retrieval for r in conditioned) / len(conditioned)  # type: ignore[misc]
        retrieval = {"n": float(len(conditioned)), "score_with": with_, "score_without": without,
                     "gain": with_ - without,
                     "context_tokens_per_item": sum(r.context_tokens or 0 for r in conditioned) / len(conditioned)}
    score = sum(r.score for r in items) / len(items) if items else math.nan
    return SuiteResult(name=suite.name, score=score, n=len(items),
                       by_scorer={k: sum(v) / len(v) for k, v in by_scorer.items()}, metrics=metrics, items=items,
                       retrieval=retrieval, skipped=skipped)


def run_suites(model: torch.nn.Module, sp: Any, suites: Sequence[Suite], config: EvalConfig, *, eos_id: int,
               pad_id: int = 0, rag: Any = None, rag_note: str = "") -> list[SuiteResult]:
    embedder = scoring.Embedder(config.embedding_model) if any(
        it.scorer == "similarity" and (it.similarity or config.similarity) == "embedding"
        for s in suites for it in s.items) else None
    return [run_suite(model, sp, s, config, eos_id=eos_id, pad_id=pad_id, embedder=embedder, rag=rag,
                      rag_note=rag_note) for s in suites]
