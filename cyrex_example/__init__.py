"""A reference Cyrex-side consumer of Helox's `export.model-ready` events.

It subscribes in its own consumer group (`cyrex`), verifies each announced export (HMAC
signature over the manifest with HELOX_SIGNING_KEY, every file's SHA-256), loads it in
onnxruntime (or transformers) and answers a prompt with greedy decoding.

Imports `contracts`, redis, faststream's wire parser and the runtimes only: never Helox's
`shared` or `services`, exactly what an outside team would have.
"""

from .loader import ExportVerificationError, load_export, load_from_event, verify_export_dir

__all__ = ["ExportVerificationError", "load_export", "load_from_event", "verify_export_dir"]
