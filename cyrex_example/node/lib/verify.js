'use strict';
// Verification of the export a ModelReady event announces, before anyone opens a model file:
//
//   manifest-digest  the manifest file's size and SHA-256 equal the event's `manifest` reference
//   signature        HMAC-SHA256 (key: HELOX_SIGNING_KEY) over the manifest equals `signature`.
//                    The exporter signs the manifest's canonical JSON and writes the file in
//                    exactly that form (services/exporter/provenance.py), so the HMAC is taken
//                    over the file's bytes: re-serialising JSON in another language would not
//                    reproduce Python's float spelling.
//   fingerprint      the signed manifest names the event's fingerprint and model id
//   file-digest      every file the signed manifest lists exists with its size and SHA-256, and
//                    every file the event references matches its reference
//   unsigned-file    every file the event references is one the signed manifest lists
//   uri              every URI is file:// and (with --allowed-root) inside the artifact store

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { fileURLToPath } = require('node:url');

class VerificationError extends Error {
  constructor(check, reason) {
    super(reason);
    this.check = check;
  }
}

function fail(check, reason) {
  throw new VerificationError(check, reason);
}

function isInside(child, root) {
  const rel = path.relative(root, child);
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel);
}

/** The local path of a file:// URI (symlinks resolved), optionally confined to allowedRoot. */
function resolveUri(uri, allowedRoot) {
  let url;
  try {
    url = new URL(uri);
  } catch {
    fail('uri', `${JSON.stringify(uri)} is not a URI`);
  }
  if (url.protocol !== 'file:') fail('uri', `unsupported URI scheme ${url.protocol} in ${uri}: this consumer reads file:// only`);
  let p = fileURLToPath(url);
  try {
    p = fs.realpathSync(p);
  } catch (exc) {
    if (exc.code === 'ENOENT') fail('file-digest', `${uri} does not exist`);
    throw exc;
  }
  if (allowedRoot && !isInside(p, allowedRoot)) fail('uri', `${p} is outside the allowed root ${allowedRoot}`);
  return p;
}

async function sha256File(p) {
  const hash = crypto.createHash('sha256');
  for await (const chunk of fs.createReadStream(p)) hash.update(chunk);
  return hash.digest('hex');
}

/** Size + SHA-256 of files, each read once per verification. */
class Digests {
  constructor() {
    this.cache = new Map();
  }

  async of(p) {
    if (!this.cache.has(p)) {
      let st;
      try {
        st = fs.statSync(p);
      } catch (exc) {
        if (exc.code === 'ENOENT') return null;
        throw exc;
      }
      if (!st.isFile()) return null;
      this.cache.set(p, { size: st.size, sha256: await sha256File(p) });
    }
    return this.cache.get(p);
  }
}

function hmacHex(key, bytes) {
  return crypto.createHmac('sha256', key).update(bytes).digest('hex');
}

function sameHex(a, b) {
  const x = Buffer.from(String(a), 'utf8');
  const y = Buffer.from(String(b), 'utf8');
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

/**
 * Verify the export of a validated ModelReady payload. Resolves to a summary, or rejects with a
 * VerificationError naming the failed check (other errors are I/O trouble worth a retry).
 */
async function verifyExport(event, key, { allowedRoot } = {}) {
  const digests = new Digests();
  const manifestPath = resolveUri(event.manifest.uri, allowedRoot);
  const exportDir = path.dirname(manifestPath);

  // manifest-digest
  let raw;
  try {
    raw = fs.readFileSync(manifestPath);
  } catch (exc) {
    if (exc.code === 'ENOENT' || exc.code === 'EISDIR') fail('manifest-digest', `cannot read the manifest ${manifestPath}: ${exc.code}`);
    throw exc;
  }
  const rawSha = crypto.createHash('sha256').update(raw).digest('hex');
  if (raw.length !== event.manifest.size_bytes || rawSha !== event.manifest.sha256) {
    fail('manifest-digest', `${manifestPath} (${raw.length} bytes, sha256 ${rawSha}) does not match the event's manifest `
      + `reference (${event.manifest.size_bytes} bytes, sha256 ${event.manifest.sha256})`);
  }

  // signature
  if (!sameHex(hmacHex(key, raw), String(event.signature).trim().toLowerCase())) {
    fail('signature', 'HMAC-SHA256 of the manifest does not equal the event\'s signature: wrong key, or the manifest or signature was altered');
  }

  // fingerprint (the manifest is now known to be the signer's)
  let manifest;
  try {
    manifest = JSON.parse(raw.toString('utf8'));
  } catch (exc) {
    fail('manifest-digest', `the signed manifest is not JSON: ${exc.message}`);
  }
  if (manifest.fingerprint !== event.fingerprint) {
    fail('fingerprint', `the signed manifest's fingerprint ${manifest.fingerprint} differs from the event's ${event.fingerprint}`);
  }
  if (manifest.model_id !== undefined && manifest.model_id !== event.model_id) {
    fail('fingerprint', `the signed manifest's model_id ${manifest.model_id} differs from the event's ${event.model_id}`);
  }

  // file-digest: the signed file table
  const files = manifest.files;
  if (!files || typeof files !== 'object' || Array.isArray(files)) fail('file-digest', 'the signed manifest has no files table');
  const signed = new Map();
  for (const rel of Object.keys(files).sort()) {
    const entry = files[rel];
    const p = path.resolve(exportDir, rel);
    if (!isInside(p, exportDir)) fail('uri', `the manifest lists ${rel}, outside its export directory`);
    const got = await digests.of(p);
    if (got === null) fail('file-digest', `${rel} is listed in the signed manifest but missing`);
    if (got.size !== entry.bytes || got.sha256 !== entry.sha256) {
      fail('file-digest', `${rel} (${got.size} bytes, sha256 ${got.sha256}) does not match the signed manifest `
        + `(${entry.bytes} bytes, sha256 ${entry.sha256})`);
    }
    signed.set(p, entry.sha256);
  }

  // the event's own references: each must be a signed file with the same digest
  const refs = Object.entries(event.formats || {}).map(([name, ref]) => [`formats.${name}`, ref]);
  if (event.model_card) refs.push(['model_card', event.model_card]);
  for (const [name, ref] of refs) {
    const p = resolveUri(ref.uri, allowedRoot);
    const got = await digests.of(p);
    if (got === null) fail('file-digest', `${name} (${ref.uri}) is not a file`);
    if (got.size !== ref.size_bytes || got.sha256 !== ref.sha256) {
      fail('file-digest', `${name} (${ref.uri}: ${got.size} bytes, sha256 ${got.sha256}) does not match its reference `
        + `in the event (${ref.size_bytes} bytes, sha256 ${ref.sha256})`);
    }
    if (signed.get(p) !== ref.sha256) fail('unsigned-file', `${name} (${ref.uri}) is not a file of the signed manifest`);
  }
  return { exportDir, files: signed.size, refs: refs.length };
}

module.exports = { verifyExport, VerificationError, resolveUri };
