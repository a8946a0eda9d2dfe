"""The reference Cyrex: a retrieval service and a consumer of Helox's `export.model-ready` events.

`serve` indexes a document collection (BM25, bm25s), announces it on `retrieval.heartbeat`
and answers `retrieval.requested`; for every ModelReady it verifies the export (HMAC signature
over the manifest with HELOX_SIGNING_KEY, every file's SHA-256), loads it in onnxruntime (or
transformers) and answers a prompt with greedy decoding, with retrieved context laid out the way
Helox trained the model (the export's rag_template.json). See README.md beside this file.

Imports `contracts`, redis, bm25s and the runtimes only: never Helox's `shared`, `services` or
`helox`, exactly what an outside team would have; the wire format is written from
contracts/WIRE.md (`wire.py`).
"""

__version__ = "0.2.0"

from .loader import ExportVerificationError, load_export, load_from_event, verify_export_dir

__all__ = ["ExportVerificationError", "__version__", "load_export", "load_from_event", "verify_export_dir"]
