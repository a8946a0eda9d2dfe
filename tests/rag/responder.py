"""A test-only retriever process that speaks the retrieval contracts (a stand-in for Cyrex).

    python -m tests.rag.responder REDIS_URL INSTANCE MODE [--delay S] [--heartbeat-s S]

It announces itself on retrieval.heartbeat and answers every RetrievalRequested addressed to
it (read with XREAD from the stream's end) with one RetrievalCompleted. Its chunks are made up
(source ids `cyrex-doc-<n>`), except in the modes that misbehave on purpose:

- ok: well-formed answers;
- malformed: the 2nd request gets an entry that is not an envelope (it names the request id),
  the 3rd an answer with a result for an unknown query id; the others are well-formed;
- leaky: every result also holds a chunk of the query's own document (its first excluded
  source id) and one whose text is the query's own text under another source id;
- twice: every answer is sent twice (at-least-once delivery).

Only the contracts and the Bus's frame writer are used (what any FastStream publisher writes).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import redis

from contracts import (
    Producer,
    RetrievalCompleted,
    RetrievalRequested,
    RetrievalResult,
    RetrievedChunk,
    RetrieverHeartbeat,
    topic_for,
)
from contracts.codec import decode
from contracts.codec import envelope as make_envelope
from shared.bus.wire import encode_entry, read_entry

PREFIX = "helox."
DIGEST = hashlib.sha256(b"test responder index").hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("redis_url")
    ap.add_argument("instance")
    ap.add_argument("mode", choices=["ok", "malformed", "leaky", "twice"])
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--heartbeat-s", type=float, default=0.5)
    args = ap.parse_args()
    r = redis.Redis.from_url(args.redis_url)
    producer = Producer(service="cyrex", instance=args.instance)

    def publish(payload: object) -> None:
        topic = topic_for(payload)  # type: ignore[arg-type]
        r.xadd(topic.stream(PREFIX), encode_entry(make_envelope(payload, producer=producer)))  # type: ignore[arg-type]

    requests = topic_for(RetrievalRequested).stream(PREFIX)
    newest = r.xrevrange(requests, count=1)
    cursor = newest[0][0] if newest else "0-0"  # fixed before the first heartbeat: no request is missed
    last_beat = 0.0
    served = 0
    while True:
        if time.monotonic() - last_beat >= args.heartbeat_s:
            publish(RetrieverHeartbeat(name="cyrex", instance=args.instance, version="test", index_digest=DIGEST,
                                       index_chunks=100, index_documents=10, max_k=16, interval_s=args.heartbeat_s))
            last_beat = time.monotonic()
        got = r.xread({requests: cursor}, count=10, block=100)
        for _, entries in got or []:
            for entry_id, fields in entries:
                cursor = entry_id
                req = decode(read_entry(fields)[0], RetrievalRequested).payload
                if req.retriever not in (None, args.instance):
                    continue
                time.sleep(args.delay)
                served += 1
                completed = topic_for(RetrievalCompleted).stream(PREFIX)
                if args.mode == "malformed" and served == 2:
                    r.xadd(completed, {b"__data__": b"{not json, answering " + req.request_id.encode() + b"}"})
                    continue
                results = []
                for n, q in enumerate(req.queries):
                    chunks = [RetrievedChunk(chunk_id=f"cyrex-doc-{n % 10}#{j}", source_id=f"cyrex-doc-{n % 10}",
                                             text=f"cyrex context {n} {j}: " + "lorem ipsum " * 6, score=1.0 / (j + 1))
                              for j in range(min(q.k, 3))]
                    if args.mode == "leaky" and q.exclude_source_ids:
                        chunks = [
                            RetrievedChunk(chunk_id="own#0", source_id=q.exclude_source_ids[0], text=q.text[:200], score=9.0),
                            RetrievedChunk(chunk_id="copy#0", source_id="somewhere-else", text=q.text[:120], score=8.0),
                        ] + chunks
                    results.append(RetrievalResult(query_id=q.query_id, chunks=chunks))
                if args.mode == "malformed" and served == 3:
                    results[0] = RetrievalResult(query_id="no-such-query", chunks=results[0].chunks)
                done = RetrievalCompleted(request_id=req.request_id, retriever="cyrex", instance=args.instance,
                                          index_digest=DIGEST, results=results, elapsed_ms=1.0)
                for _ in range(2 if args.mode == "twice" else 1):
                    publish(done)


if __name__ == "__main__":
    main()
