'use strict';
// The only contract this consumer uses: Helox's published AsyncAPI 3.0 document
// (contracts/asyncapi.json), read at start-up. Channel, stream address, message, header and
// payload schemas are all looked up in it; nothing about the event's fields is hard-coded.

const fs = require('node:fs');
const Ajv2020 = require('ajv/dist/2020');
const addFormats = require('ajv-formats');

const DOC_ID = 'helox-asyncapi.json';

class ContractError extends Error {}

function pointerGet(doc, pointer) {
  if (!pointer.startsWith('#/')) throw new ContractError(`only local $refs are supported, got ${pointer}`);
  let node = doc;
  for (const raw of pointer.slice(2).split('/')) {
    const part = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (node === null || typeof node !== 'object' || !(part in node)) {
      throw new ContractError(`${pointer} does not resolve in the AsyncAPI document`);
    }
    node = node[part];
  }
  return node;
}

function escapePart(part) {
  return String(part).replace(/~/g, '~0').replace(/\//g, '~1');
}

/** Follow $ref objects (AsyncAPI reference objects) to the node; returns [node, its JSON pointer]. */
function deref(doc, node, pointer) {
  const seen = new Set();
  while (node && typeof node === 'object' && typeof node.$ref === 'string') {
    if (seen.has(node.$ref)) throw new ContractError(`$ref cycle at ${node.$ref}`);
    seen.add(node.$ref);
    pointer = node.$ref;
    node = pointerGet(doc, pointer);
  }
  return [node, pointer];
}

function majorOf(version) {
  const m = /^(\d+)\./.exec(String(version ?? ''));
  return m ? Number(m[1]) : null;
}

/**
 * Load the AsyncAPI document and find the channel carrying `eventName`.
 * Returns {stream, topicKey, channelId, message, validateHeaders, validatePayload, schemaMajor}.
 */
function loadContract(path, eventName, { prefix } = {}) {
  let doc;
  try {
    doc = JSON.parse(fs.readFileSync(path, 'utf8'));
  } catch (exc) {
    throw new ContractError(`cannot read the AsyncAPI document ${path}: ${exc.message}`);
  }
  if (!String(doc.asyncapi || '').startsWith('3.')) {
    throw new ContractError(`${path} is not an AsyncAPI 3 document (asyncapi: ${doc.asyncapi})`);
  }
  const found = [];
  for (const [channelId, channel] of Object.entries(doc.channels || {})) {
    for (const [msgKey, ref] of Object.entries(channel.messages || {})) {
      const [message, msgPointer] = deref(doc, ref, `#/channels/${escapePart(channelId)}/messages/${escapePart(msgKey)}`);
      if (msgKey === eventName || message.name === eventName) found.push({ channelId, channel, message, msgPointer });
    }
  }
  if (found.length !== 1) {
    throw new ContractError(`expected one channel carrying ${eventName} in ${path}, found ${found.length}`);
  }
  const { channelId, channel, message, msgPointer } = found[0];
  const topicKey = channel['x-topic-key'];
  let stream = channel.address;
  if (prefix !== undefined && prefix !== null) {
    if (!topicKey) throw new ContractError(`channel ${channelId} has no x-topic-key to put the prefix ${prefix} on`);
    stream = `${prefix}${topicKey}`;
  }
  if (!stream) throw new ContractError(`channel ${channelId} has no address`);

  // Pydantic writes JSON Schema 2020-12; the schemas sit inside the AsyncAPI document and
  // refer to each other as #/components/schemas/..., so the whole document is added once
  // and each schema is compiled by its JSON pointer. strictSchema is off because the
  // document's non-schema parts (info, channels, x-*) are not JSON Schema keywords.
  const ajv = new Ajv2020({ allErrors: true, strictSchema: false, validateFormats: true });
  addFormats(ajv);
  ajv.addSchema(doc, DOC_ID);
  const compileAt = (field) => {
    let node = message[field];
    if (node === undefined) return null;
    let pointer = `${msgPointer}/${field}`;
    if (node && typeof node === 'object' && 'schemaFormat' in node) { // an AsyncAPI multi-format schema
      pointer += '/schema';
      node = node.schema;
    }
    return ajv.compile({ $ref: `${DOC_ID}${pointer}` });
  };
  return {
    stream,
    topicKey,
    channelId,
    eventName,
    message,
    validateHeaders: compileAt('headers'),
    validatePayload: compileAt('payload'),
    schemaMajor: majorOf(message['x-schema-version']),
  };
}

/** ajv errors as one short line. */
function describeErrors(errors, limit = 5) {
  const parts = (errors || []).slice(0, limit).map((e) => {
    const where = e.instancePath || '(root)';
    const extra = e.keyword === 'additionalProperties' ? ` (${e.params.additionalProperty})` : '';
    return `${where} ${e.message}${extra}`;
  });
  const more = (errors || []).length > limit ? `; and ${(errors || []).length - limit} more` : '';
  return parts.join('; ') + more;
}

module.exports = { loadContract, describeErrors, majorOf, ContractError };
