'use strict';
// FastStream's BinaryMessageFormatV1, read by hand (faststream/redis/parser/binary.py):
//
//   offset  size  field
//   0       8     magic 89 42 49 4E 0D 0A 1A 0A ("\x89BIN\r\n\x1a\n")
//   8       2     format version, u16 big-endian, 1
//   10      4     headers_start, u32 big-endian (18 for every frame FastStream writes)
//   14      4     data_start, u32 big-endian
//   headers_start:
//           2     header count, u16 big-endian
//           then per header: u16 key length, key bytes, u16 value length, value bytes (UTF-8)
//   data_start .. end: the body (for Helox: the envelope's JSON, UTF-8)
//
// FastStream itself falls back to a JSON {"data", "headers"} envelope or to raw bytes when
// the magic does not match; Helox always writes the binary frame, so a strict consumer
// refuses anything else.

const MAGIC = Buffer.from([0x89, 0x42, 0x49, 0x4e, 0x0d, 0x0a, 0x1a, 0x0a]);
const VERSION = 1;
const FIXED = MAGIC.length + 2 + 8;
const utf8 = new TextDecoder('utf-8', { fatal: true });

class FrameError extends Error {}

function readString(buf, offset, what) {
  if (offset + 2 > buf.length) throw new FrameError(`frame truncated in the length of ${what} at byte ${offset}`);
  const len = buf.readUInt16BE(offset);
  const start = offset + 2;
  if (start + len > buf.length) throw new FrameError(`${what} (${len} bytes at ${start}) runs past the frame's end`);
  let text;
  try {
    text = utf8.decode(buf.subarray(start, start + len));
  } catch {
    throw new FrameError(`${what} at byte ${start} is not UTF-8`);
  }
  return [text, start + len];
}

/** Decode one `__data__` value: returns {headers, body (Buffer)} or throws FrameError. */
function decodeFrame(buf) {
  if (!Buffer.isBuffer(buf)) throw new FrameError('the entry has no __data__ field');
  if (buf.length < FIXED) throw new FrameError(`frame of ${buf.length} bytes is shorter than its ${FIXED}-byte prefix`);
  if (!buf.subarray(0, MAGIC.length).equals(MAGIC)) throw new FrameError('no FastStream binary magic at byte 0');
  const version = buf.readUInt16BE(8);
  if (version !== VERSION) throw new FrameError(`unsupported FastStream binary format version ${version}`);
  const headersStart = buf.readUInt32BE(10);
  const dataStart = buf.readUInt32BE(14);
  if (headersStart < FIXED || headersStart + 2 > buf.length) {
    throw new FrameError(`headers_start ${headersStart} is outside the frame (${buf.length} bytes)`);
  }
  const count = buf.readUInt16BE(headersStart);
  const headers = {};
  let offset = headersStart + 2;
  for (let i = 0; i < count; i++) {
    let key, value;
    [key, offset] = readString(buf, offset, `header ${i} key`);
    [value, offset] = readString(buf, offset, `header ${key} value`);
    headers[key] = value; // a repeated key: the last one wins, as in FastStream's dict
  }
  if (dataStart < offset || dataStart > buf.length) {
    throw new FrameError(`data_start ${dataStart} overlaps the headers (which end at ${offset}) or the frame's end`);
  }
  return { headers, body: buf.subarray(dataStart) };
}

module.exports = { decodeFrame, FrameError, MAGIC };
