"""Consume `export.model-ready` in consumer group `cyrex`: verify, load, answer a prompt.

For every ModelReady event: verify the export (signature + digests), load it, answer the prompt
(with retrieved context when an index is given and the export has a rag_template.json), emit
one JSON record, XACK. An export that fails verification is reported and acked (retrying cannot
make it valid); an error while loading a valid export leaves the entry pending, so a restarted
consumer sees it again.

A plain redis-py XREADGROUP loop (any FastStream RedisBroker subscriber with
`StreamSub(stream, group="cyrex", consumer=...)` reads the same entries).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from contracts import ModelReady, SchemaVersionError, decode

from .loader import ExportVerificationError, LanguageModel, Runtime, load_from_event
from .rag import RagTemplateError, build_prompt, context_budget, load_template
from .retrieval import Bm25Index
from .wire import WireError, read_body

GROUP = "cyrex"


def rag_prompt(model: LanguageModel, prompt: str, index: Bm25Index, *, max_new_tokens: int,
               max_k: int) -> tuple[str, dict[str, Any]]:
    """The prompt the model gets, and what was put in front of it.

    With the export's rag_template.json: the template's k best chunks of `index` for the prompt
    (at most max_k), laid out as Helox trained the model, within the template's context budget;
    without one, the prompt as it is (the record's `note` says so)."""
    try:
        template, note = load_template(model.export_dir, model.manifest)
    except RagTemplateError as exc:
        return prompt, {"with_context": False, "note": f"rag_template.json is unusable, prompting without "
                                                       f"context: {exc}"}
    if template is None:
        return prompt, {"with_context": False, "note": note}
    hits = index.search(prompt, min(template.k, max_k))
    budget = context_budget(template, model.context_length, len(model.encode(template.doc_marker + prompt)),
                            max_new_tokens)
    built = build_prompt(prompt, [h.text for h in hits], template, model, budget)
    return built.text, {"with_context": True, "note": note, "index_digest": index.digest,
                        "chunks": [h.chunk_id for h in hits[:built.chunks_used]], "cut": built.cut,
                        "context_tokens": built.context_tokens, "budget_tokens": budget}


def handle_entry(fields: dict[bytes, bytes], key: bytes, *, prompt: str, runtime: Runtime = "onnx",
                 max_new_tokens: int = 32, allowed_root: str | None = None, index: Bm25Index | None = None,
                 max_k: int = 16) -> dict[str, Any]:
    """One stream entry -> a result record. Raises only for errors worth a retry (I/O, runtime)."""
    try:
        env = decode(read_body(fields), ModelReady)
    except (WireError, SchemaVersionError, ValueError) as exc:
        return {"status": "rejected", "reason": f"not a ModelReady event: {exc}"}
    event = env.payload
    try:
        model = load_from_event(event, key, runtime=runtime, allowed_root=allowed_root)
    except ExportVerificationError as exc:
        return {"status": "rejected", "model_id": event.model_id, "reason": str(exc)}
    context: dict[str, Any] | None = None
    text = prompt
    if index is not None:
        text, context = rag_prompt(model, prompt, index, max_new_tokens=max_new_tokens, max_k=max_k)
    started = time.perf_counter()
    answer = model.answer(text, max_new_tokens=max_new_tokens)
    record = {"status": "ok", "model_id": event.model_id, "fingerprint": event.fingerprint, "runtime": runtime,
              "prompt": prompt, "answer": answer, "answer_s": round(time.perf_counter() - started, 3),
              "run_id": event.lineage.run_id, "checkpoint_step": event.lineage.checkpoint_step}
    if context is not None:
        record["context"] = context
        record["model_prompt"] = text
    return record


def ensure_group(client: redis.Redis, stream: str, start_id: str, group: str = GROUP) -> None:
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def run(client: redis.Redis, stream: str, key: bytes, *, prompt: str, consumer: str, runtime: Runtime = "onnx",
        max_new_tokens: int = 32, start_id: str = "$", block_ms: int = 1000, max_messages: int | None = None,
        allowed_root: str | None = None, emit: Callable[[dict[str, Any]], None] | None = None,
        index: Bm25Index | None = None, max_k: int = 16, stop: threading.Event | None = None) -> int:
    """The consume loop; returns the number of entries handled (stops after max_messages, or
    once `stop` is set)."""
    emit = emit or (lambda rec: print(json.dumps(rec), flush=True))
    ensure_group(client, stream, start_id)
    handled = 0
    pending_first = True  # after a restart, first re-read our own unacked entries
    while (max_messages is None or handled < max_messages) and not (stop and stop.is_set()):
        try:
            resp = client.xreadgroup(GROUP, consumer, {stream: "0" if pending_first else ">"}, count=1,
                                     block=None if pending_first else block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty: recreate and go on
                ensure_group(client, stream, "0")
                continue
            raise
        entries = resp[0][1] if resp else []
        if pending_first and not entries:
            pending_first = False
            continue
        for entry_id, fields in entries:
            if not fields:  # a pending entry trimmed away
                client.xack(stream, GROUP, entry_id)
                continue
            try:
                record = handle_entry(fields, key, prompt=prompt, runtime=runtime, max_new_tokens=max_new_tokens,
                                      allowed_root=allowed_root, index=index, max_k=max_k)
            except Exception as exc:
                emit({"status": "error", "entry": entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                      "reason": f"{type(exc).__name__}: {exc}"})
                pending_first = False
                continue
            client.xack(stream, GROUP, entry_id)
            emit(record)
            handled += 1
    return handled
