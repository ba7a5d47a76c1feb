// herald over TLS against the npm `eventsource` package. Its fetch is undici's (npm `undici`)
// with an Agent that trusts only a test CA made fresh for this run (connect: {ca}); certificate
// verification stays on, and a fetch without the CA is shown to fail.
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/eventsource-tls.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { EventSource } from 'eventsource';
import { Agent, fetch as undiciFetch } from 'undici';
import {
  startHerald, publish, waitFor, topicName, makePki, tempDir, metrics, HERALD_BIN, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 15000;

let pki;
let herald;
let agent;

before(async () => {
  pki = makePki();
  agent = new Agent({ connect: { ca: pki.caPem } });
  herald = await startHerald({ tls: { pairs: [pki.localhost, pki.other], hsts: '1d' } });
});
after(async () => {
  await agent?.close();
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

/** fetch() that trusts the test CA (and nothing else: `ca` replaces the default roots). */
const tlsFetch = (input, init = {}) => undiciFetch(input, { ...init, dispatcher: agent });

/** Open an EventSource over `fetchImpl`, recording events, requests and response headers. */
function open(url, { fetchImpl = tlsFetch, headers, types = [] } = {}) {
  const rec = { all: [], onmessage: [], opens: 0, errors: [], requests: [], responses: [] };
  const es = new EventSource(url, {
    fetch: async (input, init) => {
      const h = { ...(init.headers || {}), ...(headers || {}) };
      rec.requests.push(h);
      const res = await fetchImpl(input, { ...init, headers: h });
      rec.responses.push({ status: res.status, headers: Object.fromEntries(res.headers) });
      return res;
    },
  });
  rec.es = es;
  es.onopen = () => { rec.opens++; };
  es.onerror = (e) => { rec.errors.push(e?.message || String(e?.code || 'error')); };
  es.onmessage = (e) => {
    rec.onmessage.push({ data: e.data, id: e.lastEventId });
    rec.all.push({ type: 'message', data: e.data, id: e.lastEventId });
  };
  for (const t of new Set(['herald-gap', ...types])) {
    es.addEventListener(t, (e) => rec.all.push({ type: t, data: e.data, id: e.lastEventId }));
  }
  rec.close = () => es.close();
  return rec;
}

const waitOpen = (rec) => waitFor(() => rec.es.readyState === EventSource.OPEN, WAIT,
  `EventSource open over TLS (errors: ${JSON.stringify(rec.errors)})`);
const waitData = (rec, data, what) => waitFor(() => rec.onmessage.some((m) => m.data === data), WAIT,
  `${what}: "${data}", got ${JSON.stringify(rec.all)}`);

test(`[${HERALD_BACKEND}] without the test CA the certificate is refused (verification is on) (${HERALD_BIN})`, { timeout: 30000 }, async () => {
  // undici's fetch with the default roots
  let err;
  try {
    await undiciFetch(`${herald.tlsBase}/healthz`, { signal: AbortSignal.timeout(5000) });
  } catch (e) { err = e; }
  assert.ok(err, 'fetch without the CA must fail');
  const code = err.cause?.code || '';
  assert.match(code, /CERT|VERIFY|ISSUER|SIGNATURE/, `a certificate error, got ${err} / cause ${err.cause}`);
  // and Node's own global fetch, as the package uses by default
  const rec = open(`${herald.tlsBase}/events/${topicName('noca')}`, { fetchImpl: fetch });
  try {
    await waitFor(() => rec.errors.length >= 1, WAIT, 'an error event');
    assert.equal(rec.opens, 0, 'never opened');
    assert.notEqual(rec.es.readyState, EventSource.OPEN);
  } finally {
    rec.close();
  }
  // with the CA, the same URL works
  const ok = await tlsFetch(`${herald.tlsBase}/healthz`, { signal: AbortSignal.timeout(5000) });
  assert.equal(ok.status, 200);
  assert.equal((await ok.text()).trim(), 'ok');
});

test(`[${HERALD_BACKEND}] events over TLS: in order, with ids, typed and multi-line, HSTS on the stream`, { timeout: 30000 }, async () => {
  const topic = topicName('tls');
  const before = (await metrics(herald.base)).get('herald_tls_handshakes_total');
  const rec = open(`${herald.tlsBase}/events/${topic}`, { types: ['goal'] });
  try {
    await waitOpen(rec);
    assert.equal(rec.responses[0].status, 200);
    assert.match(rec.responses[0].headers['content-type'], /^text\/event-stream/);
    assert.equal(rec.responses[0].headers['strict-transport-security'], 'max-age=86400', '--hsts 1d');
    await publish(herald.ingestPort, [
      { topic, data: 'one', id: 'tls-id-1' },
      { topic, data: 'two\nlines' },
      { topic, event: 'goal', data: 'typed' },
      { topic, data: 'three' },
    ]);
    // POST /publish over TLS, from 127.0.0.1
    const pr = await tlsFetch(`${herald.tlsBase}/publish/${topic}`, { method: 'POST', body: 'four' });
    assert.equal(pr.status, 200);
    const { id: fourId } = await pr.json();
    await waitData(rec, 'four', 'all events over TLS');
    assert.deepEqual(rec.all.map((e) => `${e.type}:${e.data}`),
      ['message:one', 'message:two\nlines', 'goal:typed', 'message:three', 'message:four']);
    const ids = rec.all.map((e) => e.id);
    assert.equal(ids[0], 'tls-id-1');
    assert.equal(ids[4], fourId, 'lastEventId is the id POST /publish answered');
    assert.equal(new Set(ids).size, ids.length, `distinct ids: ${ids}`);
    assert.deepEqual(rec.errors, []);
    const after = (await metrics(herald.base)).get('herald_tls_handshakes_total');
    assert.ok(after > before, `herald counted the TLS handshakes (${before} -> ${after})`);
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] resume over a new TLS connection with Last-Event-ID: exactly the later events`, { timeout: 30000 }, async () => {
  const topic = topicName('tlsresume');
  const first = open(`${herald.tlsBase}/events/${topic}`);
  let x;
  try {
    await waitOpen(first);
    await publish(herald.ingestPort, { topic, data: 'r0' });
    await waitData(first, 'r0', 'r0');
    x = first.onmessage[0].id;
  } finally {
    first.close();
  }
  await publish(herald.ingestPort, [1, 2, 3].map((i) => ({ topic, data: `r${i}` })));
  const second = open(`${herald.tlsBase}/events/${topic}`, { headers: { 'Last-Event-ID': x } });
  try {
    await waitOpen(second);
    await publish(herald.ingestPort, { topic, data: 'live' });
    await waitData(second, 'live', 'live after the replay');
    assert.deepEqual(second.all.map((e) => `${e.type}:${e.data}`), ['message:r1', 'message:r2', 'message:r3', 'message:live']);
  } finally {
    second.close();
  }
});

test(`[${HERALD_BACKEND}] the package's own reconnect over TLS after a herald restart resumes with Last-Event-ID, no gap`, { timeout: 45000 }, async () => {
  // --history-file: the restarted herald still knows the id the client resumes from, so the
  // resume must be exact (no herald-gap); --retry 200: the package reconnects quickly.
  const history = path.join(tempDir('herald-hist-'), 'history.bin');
  const h = await startHerald({ tls: { pairs: [pki.localhost] }, extraArgs: ['--history-file', history, '--retry', '200'] });
  const topic = topicName('tlsrestart');
  const rec = open(`${h.tlsBase}/events/${topic}`);
  try {
    await waitOpen(rec);
    await publish(h.ingestPort, [{ topic, data: 'a' }, { topic, data: 'b' }]);
    await waitData(rec, 'b', 'events before the restart');
    const x = rec.onmessage.find((m) => m.data === 'b').id;
    const nBefore = rec.all.length;

    const stopped = await h.restart();
    assert.deepEqual(stopped, { code: 0, signal: null }, `SIGTERM exit status\n${h.logs()}`);
    await publish(h.ingestPort, [{ topic, data: 'c' }, { topic, data: 'd' }]);
    await waitFor(() => rec.opens >= 2 && rec.onmessage.some((m) => m.data === 'd'), 20000,
      `reconnect over TLS and "d" (opens=${rec.opens}, errors=${JSON.stringify(rec.errors)}, got ${JSON.stringify(rec.all)})`);

    assert.ok(rec.requests.length >= 2, 'the package reconnected');
    assert.equal(rec.requests.at(-1)['Last-Event-ID'], x, 'the reconnect carries Last-Event-ID');
    assert.deepEqual(rec.all.slice(nBefore).map((e) => `${e.type}:${e.data}`), ['message:c', 'message:d'],
      'exactly the events after b, no herald-gap, no duplicate');
  } finally {
    rec.close();
    const res = await h.stop();
    assert.deepEqual(res, { code: 0, signal: null });
  }
});
