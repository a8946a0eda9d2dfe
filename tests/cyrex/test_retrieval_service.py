"""The reference Cyrex's retrieval service: a real `python -m cyrex_example serve` process against
a real Redis. Requests are written with Helox's own frame writer (shared.bus.wire) and answers
read with Helox's own reader (shared.bus.admin.decode_entry), so both sides of the wire agree.

Plus the pure parts: chunking and the index digest (recomputed here from the README's recipe),
and the prompt laid out with a hand-made rag_template.json."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts import (
    Envelope,
    Producer,
    RetrievalCompleted,
    RetrievalQuery,
    RetrievalRequested,
    RetrieverHeartbeat,
    TrainerCommand,
    topic_for,
)
from contracts.codec import envelope
from cyrex_example.collection import chunk_text, index_digest, read_collection
from cyrex_example.model_ready import rag_prompt
from cyrex_example.rag import RagTemplate, build_prompt, context_budget, load_template
from cyrex_example.retrieval import Bm25Index
from shared.bus.admin import decode_entry
from shared.bus.wire import encode_entry, frame
from tests.bus.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
PREFIX = "helox."
REQUESTED = topic_for(RetrievalRequested).stream(PREFIX)
COMPLETED = topic_for(RetrievalCompleted).stream(PREFIX)
HEARTBEAT = topic_for(RetrieverHeartbeat).stream(PREFIX)
REQUESTER = Producer(service="data-prep", instance="data-prep-1")
MAX_K = 3

# A collection where the best chunk for each test query is obvious (words found nowhere else).
DOCS = {
    "astro/saturn.md": "Saturn has rings of ice and rock.\n\nSaturn's moon Titan has methane lakes.",
    "astro/mars.txt": "Mars is red because of iron oxide dust.\n\nOlympus Mons on Mars is a volcano.",
    "kitchen/bread.txt": "Sourdough bread rises with wild yeast and lactobacilli; a volcano cake does not.",
    "code/fib.py": "def fibonacci(n):  # no volcano here\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
}
JSONL = [{"text": "Glaciers carve valleys of ice."}, {"title": "no text field"}, {"text": "Lava from a volcano cools to basalt."}]


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "collection"
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "geo.jsonl").write_text("\n".join(json.dumps(r) for r in JSONL) + "\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("Saturn Saturn Saturn rings rings ice")
    (root / "image.txt").write_bytes(b"Saturn\x00rings")  # binary: skipped
    (root / "notes.csv").write_text("Saturn,rings")  # not an indexed suffix
    (root / "site-packages").mkdir()  # installed packages under a stdlib: not documents
    (root / "site-packages" / "pkg.py").write_text("Saturn = 'rings ice'")
    return root


class Cyrex:
    """One `python -m cyrex_example serve` process."""

    def __init__(self, redis_url: str, collection: Path, log_dir: Path, instance: str = "cyrex-test-1",
                 *extra: str) -> None:
        self.instance = instance
        self.log = log_dir / f"{instance}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        env.pop("HELOX_SIGNING_KEY", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cyrex_example", "serve", "--collection", str(collection), "--redis-url",
                 redis_url, "--instance", instance, "--max-k", str(MAX_K), "--heartbeat-s", "0.3",
                 "--retrieval-only", *extra],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def cyrex(redis_url: str, collection: Path, tmp_path: Path, client: redis.Redis) -> Iterator[Cyrex]:
    proc = Cyrex(redis_url, collection, tmp_path)
    try:
        wait_ready(client, proc)
        yield proc
    finally:
        proc.stop()


def heartbeats(client: redis.Redis, instance: str | None = None) -> list[RetrieverHeartbeat]:
    out = []
    for _id, fields in client.xrange(HEARTBEAT):
        env = decode_entry(fields)
        assert env is not None, f"Helox cannot read Cyrex's heartbeat {fields!r}"
        if instance is None or env.payload.instance == instance:
            out.append(env.payload)
    return out


def wait_ready(client: redis.Redis, proc: Cyrex) -> RetrieverHeartbeat:
    def ready() -> RetrieverHeartbeat | None:
        assert proc.proc.poll() is None, f"cyrex exited with {proc.proc.returncode}:\n{proc.logs()}"
        return next((h for h in heartbeats(client, proc.instance) if h.status == "ready"), None)

    return wait_for(ready, 60, f"a ready heartbeat from {proc.instance}")


def request(*queries: RetrievalQuery, deadline_s: float = 30, retriever: str | None = None,
            request_id: str | None = None) -> Envelope[RetrievalRequested]:
    payload = RetrievalRequested(request_id=request_id or f"req-{uuid.uuid4().hex[:8]}", requester="data-prep-1",
                                 queries=list(queries), deadline=datetime.now(UTC) + timedelta(seconds=deadline_s),
                                 retriever=retriever)
    return envelope(payload, producer=REQUESTER, run_id="run-1")


def q(query_id: str, text: str, k: int = 2, exclude: list[str] | None = None) -> RetrievalQuery:
    return RetrievalQuery(query_id=query_id, text=text, k=k, exclude_source_ids=exclude or [])


def send(client: redis.Redis, env: Envelope[RetrievalRequested]) -> str:
    return client.xadd(REQUESTED, encode_entry(env)).decode()


def answers(client: redis.Redis) -> list[Envelope[RetrievalCompleted]]:
    out = []
    for _id, fields in client.xrange(COMPLETED):
        env = decode_entry(fields)
        assert env is not None, f"Helox cannot read Cyrex's answer {fields!r}"
        out.append(env)
    return out


def answer_to(client: redis.Redis, request_id: str, timeout: float = 20) -> Envelope[RetrievalCompleted]:
    return wait_for(lambda: next((a for a in answers(client) if a.payload.request_id == request_id), None), timeout,
                    f"the answer to {request_id}")


def pending(client: redis.Redis) -> int:
    return client.xpending(REQUESTED, "cyrex")["pending"]


# --- the collection and its digest ---------------------------------------------------------


def readme_digest(pairs: list[tuple[str, str]]) -> str:
    """cyrex_example/README.md's recipe, written out again."""
    h = hashlib.sha256()
    for chunk_id, text in sorted(pairs, key=lambda p: p[0].encode()):
        for s in (chunk_id.encode(), text.encode()):
            h.update(struct.pack(">Q", len(s)) + s)
    return h.hexdigest()


def test_the_collection_is_chunked_with_stable_ids_and_path_source_ids(collection: Path) -> None:
    col = read_collection(collection, chunk_words=40)
    ids = [c.chunk_id for c in col.chunks]
    assert ids == ["astro/mars.txt#0", "astro/saturn.md#0", "code/fib.py#0", "geo.jsonl:1#0", "geo.jsonl:3#0",
                   "kitchen/bread.txt#0"]
    by_id = {c.chunk_id: c for c in col.chunks}
    assert by_id["geo.jsonl:3#0"].source_id == "geo.jsonl:3" and by_id["geo.jsonl:3#0"].text == JSONL[2]["text"]
    assert by_id["code/fib.py#0"].text == DOCS["code/fib.py"], "code keeps its lines and indentation"
    assert (col.documents, col.files) == (6, 5)
    assert col.skipped == {"binary files": 1, "jsonl lines without a text field": 1}
    assert col.digest == readme_digest([(c.chunk_id, c.text) for c in col.chunks])
    assert read_collection(collection, chunk_words=40).digest == col.digest
    # Smaller chunks: more of them, each id still <source>#<n>, another digest.
    small = read_collection(collection, chunk_words=4)
    assert [c.chunk_id for c in small.chunks if c.source_id == "astro/saturn.md"] == [
        f"astro/saturn.md#{n}" for n in range(4)]
    assert small.digest != col.digest
    assert index_digest([]) == hashlib.sha256(b"").hexdigest()


def test_chunk_text_packs_paragraphs_and_cuts_long_ones() -> None:
    assert chunk_text("a b\n\nc d\n\n\ne f g", 4) == ["a b\n\nc d", "e f g"]
    assert chunk_text("one two three four five six seven", 3) == ["one two three", "four five six", "seven"]
    assert chunk_text("x = 1\ny = 2\nz = 3", 6) == ["x = 1\ny = 2", "z = 3"]


# --- the service ---------------------------------------------------------------------------


def test_heartbeats_announce_indexing_then_the_index_then_stopping(
        redis_url: str, collection: Path, tmp_path: Path, client: redis.Redis) -> None:
    proc = Cyrex(redis_url, collection, tmp_path)
    try:
        ready = wait_ready(client, proc)
        expected = read_collection(collection)
        assert ready.index_digest == readme_digest([(c.chunk_id, c.text) for c in expected.chunks])
        assert (ready.index_chunks, ready.index_documents) == (len(expected.chunks), 6)
        assert (ready.name, ready.method, ready.max_k, ready.request_topic) == ("cyrex", "bm25", MAX_K,
                                                                               "retrieval.requested")
        assert ready.interval_s == 0.3 and ready.version
        wait_for(lambda: len([h for h in heartbeats(client) if h.status == "ready"]) >= 3, 10, "periodic heartbeats")
    finally:
        assert proc.stop() == 0, proc.logs()
    beats = heartbeats(client, proc.instance)
    assert beats[0].status == "indexing" and beats[0].index_chunks == 0
    phases = [h.status for i, h in enumerate(beats) if i == 0 or h.status != beats[i - 1].status]
    assert phases == ["indexing", "ready", "stopping"]


def test_a_request_gets_the_best_chunks_first_honouring_k_max_k_and_exclusions(
        cyrex: Cyrex, client: redis.Redis) -> None:
    env = request(
        q("saturn", "rings of ice around Saturn", k=2),
        q("volcano", "volcano", k=10),  # four chunks mention it; max_k caps at MAX_K
        q("mars", "Olympus Mons volcano on Mars", k=5),
        q("no-mars", "Olympus Mons volcano on Mars", k=5, exclude=["astro/mars.txt"]),
        q("no-geo", "volcano basalt lava", k=5, exclude=["geo.jsonl"]),  # a file: all its records
        # Helox data-prep's document origins: <source index>:<path>[:<line>]
        q("origin", "Olympus Mons volcano on Mars", k=5, exclude=["0:astro/mars.txt", "0:geo.jsonl:3"]),
        q("empty", "   ", k=2),
        q("nothing", "zyzzyva", k=2),
    )
    send(client, env)
    done = answer_to(client, env.payload.request_id)
    assert done.causation_id == env.event_id and done.correlation_id == env.correlation_id
    assert done.run_id == "run-1" and done.producer == Producer(service="cyrex", instance=cyrex.instance)
    ans = done.payload
    assert (ans.retriever, ans.instance, ans.error) == ("cyrex", cyrex.instance, None)
    assert ans.index_digest == read_collection(cyrex_collection(cyrex)).digest
    res = {r.query_id: r for r in ans.results}
    assert [r.query_id for r in ans.results] == [qq.query_id for qq in env.payload.queries]

    saturn = res["saturn"].chunks
    assert saturn[0].chunk_id == "astro/saturn.md#0" and saturn[0].source_id == "astro/saturn.md"
    assert saturn[0].text == DOCS["astro/saturn.md"]
    assert len(saturn) <= 2 and res["saturn"].error is None
    volcano = res["volcano"].chunks
    assert len(volcano) == MAX_K and len({c.chunk_id for c in volcano}) == MAX_K
    assert {c.source_id for c in volcano} <= {"astro/mars.txt", "geo.jsonl:3", "kitchen/bread.txt", "code/fib.py"}
    for result in ans.results:
        scores = [c.score for c in result.chunks]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert res["mars"].chunks[0].chunk_id == "astro/mars.txt#0"
    assert res["no-mars"].chunks and all(c.source_id != "astro/mars.txt" for c in res["no-mars"].chunks)
    assert res["no-geo"].chunks and all(not c.source_id.startswith("geo.jsonl") for c in res["no-geo"].chunks)
    assert res["origin"].chunks and not {c.source_id for c in res["origin"].chunks} & {"astro/mars.txt", "geo.jsonl:3"}
    assert res["empty"].error == "empty query text" and not res["empty"].chunks
    assert res["nothing"].error is None and res["nothing"].chunks == []
    wait_for(lambda: pending(client) == 0, 10, "the request acked")


def cyrex_collection(proc: Cyrex) -> Path:
    argv = proc.proc.args
    return Path(argv[argv.index("--collection") + 1])


def test_helox_data_prep_discovers_cyrex_and_gets_its_answers(cyrex: Cyrex, redis_url: str) -> None:
    """The requester data-prep uses (shared.retrieval): discovery by heartbeat, then a batch."""
    from shared.retrieval import SynapseLink, SynapseRetriever, discover

    link = SynapseLink(redis_url, PREFIX, REQUESTER, run_id="run-1")
    found = discover(link, timeout_s=10)
    assert found is not None and found.instance == cyrex.instance and found.status == "ready"
    (batch,) = SynapseRetriever(link, found, request_timeout_s=20).ask(
        [[q("s", "Titan methane lakes", k=2), q("e", "", k=1)]])
    assert not batch.timed_out and not batch.malformed, batch
    assert batch.results["s"].chunks[0].chunk_id == "astro/saturn.md#0"
    assert "e" in batch.failed or batch.results["e"].error == "empty query text"


def test_requests_past_their_deadline_or_for_another_instance_are_acked_unanswered(
        cyrex: Cyrex, client: redis.Redis) -> None:
    late = request(q("a", "Saturn"), deadline_s=-1)
    other = request(q("a", "Saturn"), retriever="cyrex-elsewhere")
    mine = request(q("a", "Saturn"), retriever=cyrex.instance)
    anyone = request(q("a", "sourdough"))
    for env in (late, other, mine, anyone):
        send(client, env)
    # Entries are handled in stream order: once the last is answered, the others were handled.
    answer_to(client, anyone.payload.request_id)
    got = {a.payload.request_id for a in answers(client)}
    assert got == {mine.payload.request_id, anyone.payload.request_id}
    wait_for(lambda: pending(client) == 0, 10, "every request acked")
    logs = cyrex.logs()
    assert "past its deadline" in logs and late.payload.request_id in logs
    assert "for another instance" in logs and other.payload.request_id in logs


def test_the_same_request_delivered_twice_is_answered_twice_alike(cyrex: Cyrex, client: redis.Redis) -> None:
    env = request(q("a", "Titan methane lakes", k=2), q("b", "wild yeast", k=1))
    send(client, env)
    answer_to(client, env.payload.request_id)
    send(client, env)  # at-least-once: the requester's retry, the same event
    two = wait_for(lambda: [a for a in answers(client) if a.payload.request_id == env.payload.request_id][1:] and
                   [a for a in answers(client) if a.payload.request_id == env.payload.request_id], 20, "a second answer")
    first, second = (a.payload for a in two)
    assert first.results == second.results and first.index_digest == second.index_digest


def test_malformed_entries_are_acked_and_the_next_request_is_served(cyrex: Cyrex, client: redis.Redis) -> None:
    good = request(q("a", "fibonacci"))
    bad_payload = json.loads(good.model_dump_json())
    bad_payload["payload"]["queries"] = []  # min_length 1
    wrong_type = envelope(TrainerCommand(command="checkpoint", reason="x"), producer=REQUESTER)
    wrong_frame = bytearray(encode_entry(good)[b"__data__"])
    wrong_frame[9] = 7  # frame version 7
    malformed: list[dict[bytes, bytes]] = [
        {b"other": b"field"},
        {b"__data__": b"\x00\x01garbage"},
        {b"__data__": b"\x89BIN\r\n\x1a\n\x00\x01\x00"},  # truncated frame
        {b"__data__": bytes(wrong_frame)},
        {b"__data__": frame(b"not json", {"content-type": "application/json"})},
        {b"__data__": frame(json.dumps({"k": 1}).encode(), {})},
        {b"__data__": frame(json.dumps(bad_payload).encode(), {})},
        encode_entry(wrong_type),
    ]
    for fields in malformed:
        client.xadd(REQUESTED, fields)
    send(client, good)
    done = answer_to(client, good.payload.request_id)
    assert done.payload.results[0].chunks[0].chunk_id == "code/fib.py#0"
    assert len(answers(client)) == 1
    wait_for(lambda: pending(client) == 0, 10, "every entry acked")
    assert cyrex.proc.poll() is None
    assert cyrex.logs().count("malformed retrieval request") == len(malformed)


def test_a_request_read_before_a_crash_is_answered_after_restart(
        redis_url: str, collection: Path, tmp_path: Path, client: redis.Redis) -> None:
    first = Cyrex(redis_url, collection, tmp_path, "cyrex-crashy")
    try:
        wait_ready(client, first)
        # Frozen while blocked in XREADGROUP: Redis delivers the request to it (pending, never acked).
        first.proc.send_signal(signal.SIGSTOP)
        env = request(q("a", "iron oxide dust"), deadline_s=60)
        send(client, env)
        first.proc.kill()
        first.proc.wait()
    finally:
        first.stop()
    info = client.xpending(REQUESTED, "cyrex")
    if info["pending"] == 0:  # it was between two reads when frozen: take the entry as it would have
        client.xreadgroup("cyrex", "cyrex-crashy", {REQUESTED: ">"}, count=1)
    assert client.xpending(REQUESTED, "cyrex")["consumers"] == [{"name": b"cyrex-crashy", "pending": 1}]
    assert not answers(client)
    again = Cyrex(redis_url, collection, tmp_path, "cyrex-crashy")
    try:
        done = answer_to(client, env.payload.request_id, timeout=60)
        assert done.payload.results[0].chunks[0].chunk_id == "astro/mars.txt#0"
        wait_for(lambda: pending(client) == 0, 10, "the redelivered request acked")
    finally:
        assert again.stop() == 0, again.logs()


def test_serve_refuses_a_missing_collection_and_help_lists_the_serve_flags(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cyrex_example", "serve", "--collection", str(tmp_path / "nope"),
                           "--retrieval-only"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    usage = subprocess.run([sys.executable, "-m", "cyrex_example", "--help"], env=env, capture_output=True, text=True,
                           timeout=60).stdout
    for flag in ("--collection", "--instance", "--max-k", "--heartbeat-s", "--max-messages", "--from-start"):
        assert flag in usage


# --- prompts with retrieved context -------------------------------------------------------


class WordTokenizer:
    """One token per whitespace-separated word; markers written without spaces count as words."""

    def encode(self, text: str) -> list[int]:
        self.vocab = getattr(self, "vocab", [])
        ids = []
        for word in text.replace("<", " <").replace(">", "> ").split():
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


TEMPLATE = RagTemplate(chunk_open="<ctx>", chunk_close="</ctx>", doc_marker="<doc>", k=2, context_budget=0.5)


def test_the_prompt_puts_each_chunk_between_the_markers_then_the_doc_marker() -> None:
    tok = WordTokenizer()
    chunks = ["alpha beta", "gamma delta epsilon", "never used"]
    built = build_prompt("Question here", chunks, TEMPLATE, tok, budget_tokens=100)
    assert built.text == "<ctx>alpha beta</ctx><ctx>gamma delta epsilon</ctx><doc>Question here"
    assert (built.chunks_used, built.cut, built.context_tokens) == (2, False, 4 + 5)
    # Budget 7: the first chunk (2 + 2 marker tokens) fits, the second is cut to 3 - 2 = 1 word.
    built = build_prompt("Q", chunks, TEMPLATE, tok, budget_tokens=7)
    assert built.text == "<ctx>alpha beta</ctx><ctx>gamma</ctx><doc>Q"
    assert (built.chunks_used, built.cut, built.context_tokens) == (2, True, 7)
    # No room for even the markers: no context at all.
    assert build_prompt("Q", chunks, TEMPLATE, tok, budget_tokens=2).text == "<doc>Q"


def test_the_context_budget_is_a_share_of_the_context_that_leaves_room_for_prompt_and_answer() -> None:
    assert context_budget(TEMPLATE, 128, prompt_tokens=10, max_new_tokens=16) == 64
    assert context_budget(TEMPLATE, 128, prompt_tokens=60, max_new_tokens=32) == 36
    assert context_budget(TEMPLATE, 128, prompt_tokens=120, max_new_tokens=32) == 0
    windowed = TEMPLATE.model_copy(update={"seq_len": 64})  # the packed training window
    assert context_budget(windowed, 128, prompt_tokens=10, max_new_tokens=16) == 32


class StubModel:
    """What rag_prompt needs of a loaded model: its export directory, manifest and tokenizer."""

    def __init__(self, export_dir: Path, manifest: dict[str, Any]) -> None:
        self.export_dir, self.manifest, self.context_length = export_dir, manifest, 64
        self.tok = WordTokenizer()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def test_a_signed_rag_template_brings_retrieved_context_and_none_means_a_bare_prompt(
        collection: Path, tmp_path: Path) -> None:
    index = Bm25Index(read_collection(collection))
    export = tmp_path / "export"
    export.mkdir()
    template = {"chunk_open": "<ctx>", "chunk_close": "</ctx>", "doc_marker": "<doc>", "k": 1, "context_budget": 0.5}
    (export / "rag_template.json").write_text(json.dumps(template))
    signed = StubModel(export, {"files": {"rag_template.json": {"bytes": 1, "sha256": "0" * 64}}})
    text, info = rag_prompt(signed, "Saturn rings", index, max_new_tokens=8, max_k=16)
    assert text == f"<ctx>{DOCS['astro/saturn.md']}</ctx><doc>Saturn rings"
    assert info["with_context"] and info["chunks"] == ["astro/saturn.md#0"] and info["index_digest"] == index.digest
    assert load_template(export, signed.manifest)[0] == RagTemplate.model_validate(template)

    unsigned = StubModel(export, {"files": {}})  # the file is there, but the manifest does not vouch for it
    text, info = rag_prompt(unsigned, "Saturn rings", index, max_new_tokens=8, max_k=16)
    assert text == "Saturn rings" and not info["with_context"] and "not in the signed manifest" in info["note"]
    (export / "rag_template.json").unlink()
    text, info = rag_prompt(unsigned, "Saturn rings", index, max_new_tokens=8, max_k=16)
    assert text == "Saturn rings" and "prompting without context" in info["note"]


# --- helox up --with-cyrex -----------------------------------------------------------------


def test_the_local_stack_supervises_cyrex_over_the_given_collection(
        settings: Any, collection: Path, client: redis.Redis) -> None:
    from helox.stack import LocalStack

    stack = LocalStack(settings, services=["health-monitor"], cyrex_collection=collection)
    (slot,) = [s for s in stack.slots if s.service == "cyrex"]
    assert slot.instance == "cyrex-1" and slot.args[:3] == ("serve", "--collection", str(collection.resolve()))
    stack.start()
    try:
        beat = wait_for(lambda: next((h for h in heartbeats(client, "cyrex-1") if h.status == "ready"), None), 60,
                        "a ready heartbeat from the stack's Cyrex")
        assert beat.index_digest == read_collection(collection).digest
        env = request(q("a", "sourdough yeast"))
        send(client, env)
        assert answer_to(client, env.payload.request_id).payload.results[0].chunks[0].source_id == "kitchen/bread.txt"
    finally:
        stack.stop()
    assert heartbeats(client, "cyrex-1")[-1].status == "stopping"
    with pytest.raises(ValueError, match="does not exist"):
        LocalStack(settings, services=["health-monitor"], cyrex_collection=collection / "missing")
