#!/usr/bin/env node
'use strict';
// A strict outside consumer of Helox's ModelReady events, in Node.js.
//
// It reads the model-ready stream in its own consumer group, decodes the FastStream binary
// frame by hand, validates headers and envelope against contracts/asyncapi.json with ajv,
// verifies the export (manifest digest, HMAC signature, fingerprint, every file's SHA-256)
// and prints one JSON line per event on stdout. See README.md.

const os = require('node:os');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const Redis = require('ioredis');

const { decodeFrame, FrameError } = require('./lib/frame');
const { loadContract, describeErrors, majorOf, ContractError } = require('./lib/contract');
const { verifyExport, VerificationError } = require('./lib/verify');

const DATA_FIELD = '__data__'; // FastStream's stream-entry field holding the frame
const utf8 = new TextDecoder('utf-8', { fatal: true });

const USAGE = `usage: node consumer.js [options]

  --redis-url URL       Redis to read (default $HELOX_REDIS_URL or redis://localhost:6379/0)
  --schema PATH         the AsyncAPI document (default $HELOX_ASYNCAPI or ../../contracts/asyncapi.json)
  --prefix PREFIX       stream prefix (default $HELOX_TOPIC_PREFIX, else the channel's address as published)
  --group NAME          this consumer's own consumer group (default cyrex-node)
  --consumer NAME       stable consumer name (default cyrex-node-<hostname>)
  --from-start          a new group reads the stream from its start (default: only new entries)
  --max-events N        exit after N events handled (verified or rejected)
  --timeout-s S         exit after S seconds (exit code 3 if --max-events was not reached)
  --allowed-root DIR    refuse files outside this directory (the artifact store)
  --block-ms MS         XREADGROUP BLOCK per poll (default 1000)

The signing key is read from $HELOX_SIGNING_KEY.
Exit codes: 0 done, 1 Redis lost mid-run, 2 bad configuration or Redis unreachable,
3 timed out before --max-events events.`;

function log(message) {
  process.stderr.write(`cyrex-node: ${message}\n`);
}

function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

function parseCli(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      'redis-url': { type: 'string', default: process.env.HELOX_REDIS_URL || 'redis://localhost:6379/0' },
      schema: { type: 'string', default: process.env.HELOX_ASYNCAPI || path.resolve(__dirname, '../../contracts/asyncapi.json') },
      prefix: { type: 'string', default: process.env.HELOX_TOPIC_PREFIX },
      group: { type: 'string', default: 'cyrex-node' },
      consumer: { type: 'string', default: `cyrex-node-${os.hostname()}` },
      'from-start': { type: 'boolean', default: false },
      'max-events': { type: 'string' },
      'timeout-s': { type: 'string' },
      'allowed-root': { type: 'string' },
      'block-ms': { type: 'string', default: '1000' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const number = (name, { integer = false } = {}) => {
    if (values[name] === undefined) return null;
    const n = Number(values[name]);
    if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) {
      throw new ContractError(`--${name} must be a positive ${integer ? 'integer' : 'number'}, got ${values[name]}`);
    }
    return n;
  };
  return {
    help: values.help,
    redisUrl: values['redis-url'],
    schema: values.schema,
    prefix: values.prefix,
    group: values.group,
    consumer: values.consumer,
    fromStart: values['from-start'],
    maxEvents: number('max-events', { integer: true }),
    timeoutS: number('timeout-s'),
    allowedRoot: values['allowed-root'] ? fs.realpathSync(values['allowed-root']) : null,
    blockMs: number('block-ms', { integer: true }),
  };
}

/** Decode and validate one entry against the contract; returns the envelope or throws VerificationError. */
function decodeEntry(contract, fields) {
  let frame;
  try {
    frame = decodeFrame(fields[DATA_FIELD]);
  } catch (exc) {
    if (exc instanceof FrameError) throw new VerificationError('frame', exc.message);
    throw exc;
  }
  if (contract.validateHeaders && !contract.validateHeaders(frame.headers)) {
    throw new VerificationError('headers', `frame headers do not match the contract: ${describeErrors(contract.validateHeaders.errors)}`);
  }
  let envelope;
  try {
    envelope = JSON.parse(utf8.decode(frame.body));
  } catch (exc) {
    throw new VerificationError('json', `the frame's body is not UTF-8 JSON: ${exc.message}`);
  }
  if (!contract.validatePayload(envelope)) {
    throw new VerificationError('schema', `the envelope does not match the contract: ${describeErrors(contract.validatePayload.errors)}`);
  }
  const major = majorOf(envelope.schema_version);
  if (contract.schemaMajor !== null && major !== contract.schemaMajor) {
    throw new VerificationError('schema-version', `schema_version ${envelope.schema_version} has major ${major}; `
      + `this consumer knows ${contract.eventName} ${contract.message['x-schema-version']}`);
  }
  // The header schema says message_id and helox-type repeat the envelope's event_id and type.
  const h = frame.headers;
  if (h['helox-type'] !== undefined && h['helox-type'] !== envelope.type) {
    throw new VerificationError('headers', `header helox-type ${h['helox-type']} differs from the envelope's type ${envelope.type}`);
  }
  if (h.message_id !== undefined && envelope.event_id !== undefined && h.message_id !== envelope.event_id) {
    throw new VerificationError('headers', `header message_id ${h.message_id} differs from the envelope's event_id ${envelope.event_id}`);
  }
  return envelope;
}

function redacted(url) {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(unparsable URL)';
  }
}

function fieldsOf(flat) {
  const fields = {};
  for (let i = 0; i + 1 < flat.length; i += 2) fields[flat[i].toString('utf8')] = flat[i + 1];
  return fields;
}

async function ensureGroup(client, stream, group, startId) {
  try {
    await client.xgroup('CREATE', stream, group, startId, 'MKSTREAM');
    log(`created consumer group ${group} on ${stream} at ${startId}`);
  } catch (exc) {
    if (!String(exc.message).includes('BUSYGROUP')) throw exc;
  }
}

async function handleEntry(contract, entryId, fields, key, opts) {
  let envelope = null;
  try {
    envelope = decodeEntry(contract, fields);
    const summary = await verifyExport(envelope.payload, key, { allowedRoot: opts.allowedRoot });
    return {
      verified: true, model_id: envelope.payload.model_id, fingerprint: envelope.payload.fingerprint,
      event_id: envelope.event_id ?? null, run_id: envelope.run_id ?? null, entry: entryId,
      files_checked: summary.files,
    };
  } catch (exc) {
    if (!(exc instanceof VerificationError)) throw exc;
    return {
      verified: false, check: exc.check, reason: exc.message, entry: entryId,
      model_id: envelope?.payload?.model_id ?? null, event_id: envelope?.event_id ?? null,
    };
  }
}

async function run(opts) {
  const key = process.env.HELOX_SIGNING_KEY;
  if (!key) throw new ContractError('HELOX_SIGNING_KEY is not set: the consumer needs the key to verify exports');
  const contract = loadContract(opts.schema, 'ModelReady', { prefix: opts.prefix });
  const stream = contract.stream;
  const deadline = opts.timeoutS ? Date.now() + opts.timeoutS * 1000 : Infinity;
  const client = new Redis(opts.redisUrl, { lazyConnect: true, maxRetriesPerRequest: 2 });
  client.on('error', (exc) => log(`redis: ${exc.message}`));
  let stopping = false;
  const stop = () => { stopping = true; };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);

  let handled = 0;
  try {
    try {
      await client.connect();
    } catch (exc) {
      throw new ContractError(`cannot reach Redis at ${redacted(opts.redisUrl)}: ${exc.message}`);
    }
    await ensureGroup(client, stream, opts.group, opts.fromStart ? '0' : '$');
    log(`reading ${stream} as ${opts.group}/${opts.consumer}`);
    let pendingFirst = true; // after a restart, first our own unacked entries
    while (!stopping && (opts.maxEvents === null || handled < opts.maxEvents) && Date.now() < deadline) {
      const args = ['GROUP', opts.group, opts.consumer, 'COUNT', '1'];
      if (!pendingFirst) args.push('BLOCK', String(Math.max(1, Math.min(opts.blockMs, deadline - Date.now()))));
      let reply;
      try {
        reply = await client.xreadgroupBuffer(...args, 'STREAMS', stream, pendingFirst ? '0' : '>');
      } catch (exc) {
        if (String(exc.message).includes('NOGROUP')) { // Redis restarted empty: recreate and go on
          await ensureGroup(client, stream, opts.group, '0');
          continue;
        }
        throw exc;
      }
      const entries = reply ? reply[0][1] : [];
      if (pendingFirst && entries.length === 0) {
        pendingFirst = false;
        continue;
      }
      for (const [idBuf, flat] of entries) {
        const entryId = idBuf.toString();
        if (!flat) { // a pending entry deleted from the stream
          await client.xack(stream, opts.group, entryId);
          continue;
        }
        let record;
        try {
          record = await handleEntry(contract, entryId, fieldsOf(flat), key, opts);
        } catch (exc) { // I/O trouble, not a bad export: leave it pending for a retry
          log(`entry ${entryId} left pending: ${exc.stack || exc}`);
          pendingFirst = false;
          continue;
        }
        // A bad export is acked too: retrying cannot make it valid.
        await client.xack(stream, opts.group, entryId);
        if (!record.verified) log(`entry ${entryId} failed check ${record.check}: ${record.reason}`);
        emit(record);
        handled += 1;
      }
    }
  } finally {
    client.disconnect();
  }
  if (opts.maxEvents !== null && handled < opts.maxEvents && !stopping) {
    log(`timed out after ${opts.timeoutS}s with ${handled} of ${opts.maxEvents} events`);
    return 3;
  }
  return 0;
}

async function main(argv) {
  let opts;
  try {
    opts = parseCli(argv);
  } catch (exc) {
    log(exc.message);
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  try {
    return await run(opts);
  } catch (exc) {
    if (exc instanceof ContractError) {
      log(`error: ${exc.message}`);
      return 2;
    }
    throw exc;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (exc) => {
    log(`fatal: ${exc.stack || exc}`);
    process.exitCode = 1;
  });
}

module.exports = { main, decodeEntry, handleEntry };
