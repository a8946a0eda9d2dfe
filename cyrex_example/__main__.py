"""`python -m cyrex_example`: the reference Cyrex.

    # the retrieval service + the model-ready subscriber, until SIGTERM
    HELOX_SIGNING_KEY=... python -m cyrex_example serve --collection DOCS [--redis-url URL] \\
        [--instance NAME] [--max-k 16] [--heartbeat-s 2] [--prompt ...] [--from-start]

    # the model-ready subscriber alone (consume, verify, load, answer; one JSON line per model)
    HELOX_SIGNING_KEY=... python -m cyrex_example --redis-url redis://localhost:6379/0 \\
        --prompt "First Citizen:" [--runtime onnx|hf] [--from-start] [--max-messages N]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import redis

from .collection import DEFAULT_CHUNK_WORDS, CollectionError
from .loader import ExportVerificationError, signing_key_from_env
from .model_ready import GROUP, ensure_group, handle_entry, rag_prompt, run

__all__ = ["GROUP", "ensure_group", "handle_entry", "main", "rag_prompt", "run"]


def _common(ap: argparse.ArgumentParser, consumer_flag: bool) -> None:
    ap.add_argument("--redis-url", default=os.environ.get("HELOX_REDIS_URL", "redis://localhost:6379/0"))
    ap.add_argument("--prefix", default=os.environ.get("HELOX_TOPIC_PREFIX", "helox."))
    ap.add_argument("--prompt", default="First Citizen:\n", help="The prompt each published model answers.")
    ap.add_argument("--runtime", choices=["onnx", "hf"], default="onnx")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--from-start", action="store_true", help="A new group reads model-ready from its start.")
    ap.add_argument("--allowed-root", default=None, help="Refuse exports outside this directory.")
    if consumer_flag:
        ap.add_argument("--consumer", default=f"cyrex-{socket.gethostname()}", help="Stable consumer name.")


def serve_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m cyrex_example serve",
        description="Index a document collection, announce it on retrieval.heartbeat, answer "
        "retrieval.requested, and answer a prompt for every published model with retrieved context.")
    ap.add_argument("--collection", required=True, type=Path,
                    help="Directory (or file) of .txt/.md/.py/.jsonl documents to index.")
    _common(ap, consumer_flag=False)
    ap.add_argument("--instance", default=os.environ.get("CYREX_INSTANCE", f"cyrex-{socket.gethostname()}"),
                    help="Stable instance name: heartbeats, `retriever` addressing and the consumer name.")
    ap.add_argument("--max-k", type=int, default=16, help="Most chunks returned per query.")
    ap.add_argument("--heartbeat-s", type=float, default=2.0, help="Seconds between heartbeats.")
    ap.add_argument("--chunk-words", type=int, default=DEFAULT_CHUNK_WORDS, help="Most words per chunk.")
    ap.add_argument("--reclaim-idle-ms", type=int, default=30_000,
                    help="Take over requests another consumer of the group left pending this long.")
    ap.add_argument("--retrieval-only", action="store_true",
                    help="Serve retrieval only: no model-ready subscriber (and no HELOX_SIGNING_KEY needed).")
    return ap


def legacy_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m cyrex_example",
        description="Consume helox.export.model-ready in consumer group `cyrex`: verify, load, answer a prompt. "
        "`python -m cyrex_example serve --collection PATH` runs the retrieval service as well.",
        epilog="serve:\n" + serve_parser().format_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ap, consumer_flag=True)
    ap.add_argument("--max-messages", type=int, default=None, help="Stop after this many events.")
    return ap


def serve_main(argv: list[str]) -> int:
    from .service import ServeConfig, serve

    args = serve_parser().parse_args(argv)
    if args.max_k < 1 or args.heartbeat_s <= 0 or args.chunk_words < 1:
        print("error: --max-k and --chunk-words must be at least 1, --heartbeat-s positive", file=sys.stderr)
        return 2
    if not args.collection.exists():
        print(f"error: collection {args.collection} does not exist", file=sys.stderr)
        return 2
    key = None
    if not args.retrieval_only:
        try:
            key = signing_key_from_env()
        except ExportVerificationError as exc:
            print(f"error: {exc} (or pass --retrieval-only)", file=sys.stderr)
            return 2
    cfg = ServeConfig(redis_url=args.redis_url, collection=args.collection, instance=args.instance,
                      prefix=args.prefix, max_k=args.max_k, heartbeat_s=args.heartbeat_s,
                      chunk_words=args.chunk_words, reclaim_idle_ms=args.reclaim_idle_ms, key=key,
                      prompt=args.prompt, runtime=args.runtime, max_new_tokens=args.max_new_tokens,
                      from_start=args.from_start, allowed_root=args.allowed_root)
    try:
        return serve(cfg)
    except CollectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = legacy_parser().parse_args(argv)
    try:
        key = signing_key_from_env()
    except ExportVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(args.redis_url)
    try:
        run(client, f"{args.prefix}export.model-ready", key, prompt=args.prompt, consumer=args.consumer,
            runtime=args.runtime, max_new_tokens=args.max_new_tokens, start_id="0" if args.from_start else "$",
            max_messages=args.max_messages, allowed_root=args.allowed_root)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
