// herald's JWT authentication against the npm `eventsource` package (v4): tokens minted by
// npm `jose` with a fresh ES256 key pair whose public key herald reads as PEM (--auth-keys).
// The token goes in an `Authorization: Bearer` header through the package's `fetch` option,
// the way a page that cannot use cookies would send it.
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/auth.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { EventSource } from 'eventsource';
import {
  startHerald, publish, waitFor, sleep, makeEs256Issuer, fetchHead, HERALD_BIN, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 15000; // every wait is bounded: a broken server fails, never hangs
const MAX_STREAMS = 2; // --max-streams-per-user
const NOTICE_S = 2; // --auth-expiry-notice
// The package's reconnection delay when the server sent no `retry:` (eventsource v4: 3 s).
// Used only to watch for a reconnect that must NOT happen: an absence has no event to wait for.
const PACKAGE_RECONNECT_MS = 3000;

let issuer;
let herald;
let subSeq = 0;
/** A subject of its own for each test, so per-user stream counts never mix. */
const newSub = (p) => `${p}${process.pid}x${++subSeq}`;

before(async () => {
  issuer = await makeEs256Issuer();
  herald = await startHerald({
    extraArgs: ['--auth-keys', issuer.pemPath,
      '--auth-expiry-notice', `${NOTICE_S}s`,
      '--max-streams-per-user', String(MAX_STREAMS)],
  });
});
after(async () => {
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

/**
 * Open an EventSource whose every request carries `Authorization: Bearer <getToken()>`
 * (read at each request, so a page can swap the token before the package reconnects).
 * Records events, errors (with the time, status code and readyState), requests and responses.
 */
function open(url, { getToken, types = [] } = {}) {
  const rec = { all: [], onmessage: [], typed: {}, opens: 0, errors: [], requests: [], responses: [] };
  const es = new EventSource(url, {
    fetch: async (input, init) => {
      const h = { ...(init.headers || {}) };
      const token = getToken?.();
      if (token) h.Authorization = `Bearer ${token}`;
      rec.requests.push({ at: Date.now(), headers: h });
      const res = await fetch(input, { ...init, headers: h });
      rec.responses.push({ status: res.status, headers: Object.fromEntries(res.headers) });
      return res;
    },
  });
  rec.es = es;
  es.onopen = () => { rec.opens++; };
  es.onerror = (e) => {
    rec.errors.push({ at: Date.now(), code: e?.code, message: e?.message, readyState: es.readyState });
  };
  es.onmessage = (e) => {
    rec.onmessage.push({ data: e.data, id: e.lastEventId, at: Date.now() });
    rec.all.push({ type: 'message', data: e.data, id: e.lastEventId, opens: rec.opens });
  };
  for (const t of new Set(['herald-gap', 'herald-auth-expiring', ...types])) {
    rec.typed[t] = [];
    es.addEventListener(t, (e) => {
      rec.typed[t].push({ data: e.data, id: e.lastEventId, at: Date.now() });
      rec.all.push({ type: t, data: e.data, id: e.lastEventId, opens: rec.opens });
    });
  }
  rec.close = () => es.close();
  return rec;
}

const show = (rec) => JSON.stringify({ all: rec.all, errors: rec.errors, responses: rec.responses.map((r) => r.status) });
const waitOpen = (rec, what = 'EventSource open') => waitFor(() => rec.es.readyState === EventSource.OPEN, WAIT,
  `${what} (${show(rec)})\n--- herald ---\n${herald.logs()}`);
const waitData = (rec, data, what) => waitFor(() => rec.onmessage.some((m) => m.data === data), WAIT,
  `${what}: message ${JSON.stringify(data)}, got ${show(rec)}`);
const waitClosed = (rec, what) => waitFor(() => rec.es.readyState === EventSource.CLOSED, WAIT,
  `${what}: readyState CLOSED (${show(rec)})`);

/** The parameters of a `WWW-Authenticate: Bearer k="v", ...` challenge: {scheme, realm, error, ...}. */
function bearerChallenge(value) {
  assert.ok(value, 'WWW-Authenticate header present');
  const m = /^\s*(\S+)\s*(.*)$/.exec(value);
  const out = { scheme: m[1] };
  for (const p of m[2].matchAll(/([A-Za-z_]+)="((?:[^"\\]|\\.)*)"/g)) out[p[1]] = p[2];
  return out;
}

test(`[${HERALD_BACKEND}] statuses: 401 without a token, 401 invalid_token for a bad one, 403 insufficient_scope, CORS on refusals (${HERALD_BIN})`, { timeout: 30000 }, async () => {
  const sub = newSub('st');
  const url = (topic) => `${herald.base}/events/${topic}`;
  const origin = { Origin: 'http://page.example' };
  const good = await issuer.mint({ sub });

  // No token at all: a challenge, no error code.
  const none = await fetchHead(url(`user/${sub}/orders`), { headers: origin });
  assert.equal(none.status, 401, `no token: ${JSON.stringify(none)}`);
  const c0 = bearerChallenge(none.headers['www-authenticate']);
  assert.equal(c0.scheme, 'Bearer');
  assert.equal(c0.realm, 'herald', `realm: ${none.headers['www-authenticate']}`);
  assert.equal(c0.error, undefined, `no error= when no token was sent: ${none.headers['www-authenticate']}`);
  assert.equal(none.headers['access-control-allow-origin'], '*', 'a 401 carries the CORS header a 200 would (default *)');

  // Tokens herald must refuse as invalid_token.
  const now = Math.floor(Date.now() / 1000);
  const bad = {
    'signed by another key': (await issuer.mint({ sub, key: issuer.strangerKey })).token,
    'expired a minute ago': (await issuer.mint({ sub, iat: now - 120, exp: now - 60 })).token,
    'exp is now (must be strictly in the future)': (await issuer.mint({ sub, iat: now - 60, exp: now })).token,
    'not before a minute from now': (await issuer.mint({ sub, nbf: now + 60 })).token,
    'no exp': (await issuer.mint({ sub, exp: null })).token,
    'alg none': issuer.mintNone({ sub }),
    'tampered payload': (() => {
      const [h, , s] = good.token.split('.');
      const p = Buffer.from(JSON.stringify({ sub, herald: { subscribe: ['*'] }, exp: now + 600 })).toString('base64url');
      return `${h}.${p}.${s}`;
    })(),
    'garbage': 'not-a-jwt',
  };
  for (const [what, token] of Object.entries(bad)) {
    const r = await fetchHead(url(`user/${sub}/orders`), { headers: { ...origin, Authorization: `Bearer ${token}` } });
    assert.equal(r.status, 401, `${what}: ${JSON.stringify(r)}`);
    const c = bearerChallenge(r.headers['www-authenticate']);
    assert.equal(c.scheme, 'Bearer', what);
    assert.equal(c.realm, 'herald', `${what}: ${r.headers['www-authenticate']}`);
    assert.equal(c.error, 'invalid_token', `${what}: ${r.headers['www-authenticate']}`);
    assert.ok(c.error_description, `${what}: an error_description: ${r.headers['www-authenticate']}`);
    assert.equal(r.headers['access-control-allow-origin'], '*', `${what}: CORS on the 401`);
  }

  // A valid token, a topic it does not grant (someone else's, and one outside the pattern).
  for (const topic of [`user/${sub}x/orders`, `admin/${sub}`, 'user/other/orders']) {
    const r = await fetchHead(url(topic), { headers: { ...origin, Authorization: `Bearer ${good.token}` } });
    assert.equal(r.status, 403, `${topic}: ${JSON.stringify(r)}`);
    const c = bearerChallenge(r.headers['www-authenticate']);
    assert.equal(c.scheme, 'Bearer');
    assert.equal(c.error, 'insufficient_scope', `${topic}: ${r.headers['www-authenticate']}`);
    assert.equal(r.headers['access-control-allow-origin'], '*', `${topic}: CORS on the 403`);
  }
  // Several topics: all must be granted.
  const multi = await fetchHead(`${herald.base}/events?topic=user/${sub}/a&topic=user/nope/a`,
    { headers: { Authorization: `Bearer ${good.token}` } });
  assert.equal(multi.status, 403, `one topic of two not granted: ${JSON.stringify(multi)}`);

  // And the granted topic streams.
  const ok = await fetchHead(url(`user/${sub}/orders`), { headers: { ...origin, Authorization: `Bearer ${good.token}` } });
  assert.equal(ok.status, 200, JSON.stringify(ok));
  assert.match(ok.headers['content-type'] || '', /^text\/event-stream/);
  assert.equal(ok.headers['access-control-allow-origin'], '*');
});

test(`[${HERALD_BACKEND}] (a) Bearer header through the fetch option: events on the granted topic user/{sub}/*`, { timeout: 30000 }, async () => {
  const sub = newSub('a');
  const topic = `user/${sub}/orders`;
  const { token } = await issuer.mint({ sub, subscribe: ['user/{sub}/*'] });
  const rec = open(`${herald.base}/events/${topic}`, { getToken: () => token, types: ['order'] });
  try {
    await waitOpen(rec);
    assert.equal(rec.responses[0].status, 200);
    assert.equal(rec.requests[0].headers.Authorization, `Bearer ${token}`);
    const reply = await publish(herald.ingestPort, [
      { topic, data: 'first' },
      { topic: `user/${sub}x/orders`, data: 'not mine' },
      { topic, event: 'order', data: 'a\nb' },
      { topic, data: 'last' },
    ]);
    assert.equal(reply.trim(), '', 'valid ingest lines get no error reply');
    await waitData(rec, 'last', 'granted topic');
    assert.deepEqual(rec.all.map((e) => `${e.type}:${e.data}`), ['message:first', 'order:a\nb', 'message:last']);
    assert.equal(rec.errors.length, 0, `no error: ${show(rec)}`);
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] (b) a bad token: error with status 401, CLOSED, never a second request`, { timeout: 30000 }, async () => {
  const sub = newSub('b');
  const { token } = await issuer.mint({ sub, key: issuer.strangerKey });
  const rec = open(`${herald.base}/events/user/${sub}/orders`, { getToken: () => token });
  try {
    await waitClosed(rec, 'bad token');
    assert.equal(rec.errors.length, 1, `exactly one error event: ${show(rec)}`);
    assert.equal(rec.errors[0].code, 401, `the error carries the status: ${show(rec)}`);
    assert.equal(rec.errors[0].readyState, EventSource.CLOSED, 'the error fails the connection for good');
    assert.equal(rec.responses[0].status, 401);
    assert.equal(bearerChallenge(rec.responses[0].headers['www-authenticate']).error, 'invalid_token');
    // The package would retry after its reconnection delay: watch past it, and more.
    await sleep(PACKAGE_RECONNECT_MS + 1000);
    assert.equal(rec.requests.length, 1, `a 401 ends the EventSource: one request only, saw ${rec.requests.length}`);
    assert.equal(rec.es.readyState, EventSource.CLOSED);
    assert.equal(rec.opens, 0);
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] (c) expiry: herald-auth-expiring with exp, a clean end before exp, the page refreshes the token, the package resumes with Last-Event-ID: every event once, in order`, { timeout: 60000 }, async () => {
  const sub = newSub('c');
  const topic = `user/${sub}/feed`;
  const LIFETIME = 6;
  const first = await issuer.mint({ sub, lifetime: LIFETIME });
  // The page's token variable, read by the fetch option at every (re)connect.
  let token = first.token;
  let refreshed = null;
  const rec = open(`${herald.base}/events/${topic}`, { getToken: () => token });
  rec.es.addEventListener('herald-auth-expiring', async () => {
    // What a page does on the notice: get a new token before herald ends the stream.
    refreshed = await issuer.mint({ sub, lifetime: 120 });
    token = refreshed.token;
  });

  await waitOpen(rec);
  let n = 0;
  let publishing = true;
  const publisher = (async () => {
    while (publishing) {
      await publish(herald.ingestPort, { topic, data: `e${n++}` });
      await sleep(100);
    }
  })();
  try {
    // Publish across the notice, the end and the reconnect, until the second stream delivered.
    const deadlineMs = (first.exp + 20) * 1000 - Date.now();
    await waitFor(() => rec.opens >= 2 && rec.all.filter((e) => e.opens >= 2 && e.type === 'message').length >= 5,
      deadlineMs, `a second stream with events (${show(rec)})\n--- herald ---\n${herald.logs()}`);
  } finally {
    publishing = false;
    await publisher;
  }
  try {
    const sentinel = `e${n}`;
    await publish(herald.ingestPort, { topic, data: sentinel });
    await waitData(rec, sentinel, 'sentinel after the reconnect');

    // The notice: once, on the first stream, with the first token's exp, ~NOTICE_S before the end.
    const notices = rec.typed['herald-auth-expiring'];
    assert.equal(notices.length, 1, `one herald-auth-expiring: ${show(rec)}`);
    let data;
    assert.doesNotThrow(() => { data = JSON.parse(notices[0].data); }, `notice data is JSON: ${notices[0].data}`);
    assert.equal(data.exp, first.exp, `notice names the token's exp: ${notices[0].data}`);
    assert.equal(rec.all.find((e) => e.type === 'herald-auth-expiring').opens, 1, 'notice on the first stream');

    // The end: the package saw the stream end (error while reconnecting, not a failure) before exp.
    const end = rec.errors[0];
    assert.ok(end, `the first stream ended: ${show(rec)}`);
    assert.equal(end.readyState, EventSource.CONNECTING, `a reconnectable end, not a failed connection: ${show(rec)}`);
    assert.equal(end.code, undefined, `no HTTP status on the end of a 200 stream: ${show(rec)}`);
    const expMs = first.exp * 1000;
    const SLACK = 150; // the event loop's delay between herald's close and the error event
    assert.ok(end.at < expMs + SLACK, `stream ended ${end.at - expMs} ms after exp, must end before it`);
    // Not much earlier either: the end is spread over the last tenth of the lifetime, plus at
    // most a small safety margin before exp.
    assert.ok(end.at >= expMs - (LIFETIME * 1000) / 10 - 1500,
      `stream ended ${expMs - end.at} ms before exp: expected within the last tenth of the lifetime (${LIFETIME * 100} ms) and a margin`);
    const lead = end.at - notices[0].at;
    assert.ok(lead >= NOTICE_S * 1000 - 700 && lead <= NOTICE_S * 1000 + 700,
      `herald-auth-expiring came ${lead} ms before the end, expected ~${NOTICE_S * 1000} ms (--auth-expiry-notice)`);
    assert.equal(rec.errors.length, 1, `one end, no failed attempt: ${show(rec)}`);

    // The reconnect: by the package itself, with the refreshed token and the last id seen.
    assert.ok(refreshed, 'the page refreshed its token');
    assert.equal(rec.requests.length, 2, `one reconnect: ${rec.requests.length} requests`);
    assert.deepEqual(rec.responses.map((r) => r.status), [200, 200]);
    const lastBefore = rec.all.filter((e) => e.opens === 1 && e.type === 'message').at(-1);
    assert.ok(lastBefore, 'events on the first stream');
    assert.equal(rec.requests[1].headers['Last-Event-ID'], lastBefore.id, 'reconnect carries Last-Event-ID');
    assert.equal(rec.requests[1].headers.Authorization, `Bearer ${refreshed.token}`, 'reconnect carries the new token');
    assert.ok(rec.requests[1].at > end.at, 'the reconnect follows the end');

    // Every event published across the reconnect, exactly once, in order, no herald-gap.
    assert.equal(rec.typed['herald-gap'].length, 0, `no herald-gap: ${show(rec)}`);
    const datas = rec.onmessage.map((m) => m.data);
    assert.deepEqual(datas, Array.from({ length: n + 1 }, (_, i) => `e${i}`),
      'every event once, in publish order, across the expiry reconnect');
    assert.equal(new Set(rec.onmessage.map((m) => m.id)).size, datas.length, 'distinct ids');
    assert.equal(rec.es.readyState, EventSource.OPEN);
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] revocation: ingest {"control":"disconnect","sub"} and {"jti"} end those streams at once and refuse their tokens`, { timeout: 60000 }, async () => {
  const now = Math.floor(Date.now() / 1000);
  // Issued two seconds ago, so "issued before the revocation" holds whatever the clock's second.
  const mk = async (p) => {
    const sub = newSub(p);
    return { sub, topic: `user/${sub}/t`, ...(await issuer.mint({ sub, iat: now - 2, lifetime: 600 })) };
  };
  const bySub = await mk('rs');
  const byJti = await mk('rj');
  const bystander = await mk('rb');
  const streams = [bySub, byJti, bystander].map((t) => ({ t, rec: open(`${herald.base}/events/${t.topic}`, { getToken: () => t.token }) }));
  const [s1, s2, s3] = streams;
  try {
    for (const { rec } of streams) await waitOpen(rec);
    await publish(herald.ingestPort, streams.map(({ t }) => ({ topic: t.topic, data: 'before' })));
    for (const { rec } of streams) await waitData(rec, 'before', 'event before revocation');

    // By sub.
    const t0 = Date.now();
    assert.equal((await publish(herald.ingestPort, { control: 'disconnect', sub: bySub.sub })).trim(), '',
      'a control line gets no error reply');
    await waitFor(() => s1.rec.errors.length >= 1, 2000, `the revoked sub's stream ends at once (${show(s1.rec)})`);
    assert.ok(s1.rec.errors[0].at - t0 < 2000);
    // The package reconnects with the same token: refused from now on, so CLOSED with 401.
    await waitClosed(s1.rec, 'reconnect with a revoked sub');
    assert.equal(s1.rec.responses.at(-1).status, 401, `revoked token refused: ${show(s1.rec)}`);
    assert.equal(bearerChallenge(s1.rec.responses.at(-1).headers['www-authenticate']).error, 'invalid_token');
    const again = await fetchHead(`${herald.base}/events/${bySub.topic}`, { headers: { Authorization: `Bearer ${bySub.token}` } });
    assert.equal(again.status, 401, 'the revoked sub\'s token stays refused');

    // By jti.
    assert.equal((await publish(herald.ingestPort, { control: 'disconnect', jti: byJti.jti })).trim(), '');
    await waitClosed(s2.rec, 'reconnect with a revoked jti');
    assert.equal(s2.rec.responses.at(-1).status, 401, `revoked jti refused: ${show(s2.rec)}`);
    // Another token of the same sub (other jti) is still fine.
    const sibling = await issuer.mint({ sub: byJti.sub });
    const sib = await fetchHead(`${herald.base}/events/${byJti.topic}`, { headers: { Authorization: `Bearer ${sibling.token}` } });
    assert.equal(sib.status, 200, 'a jti revocation refuses that token only');

    // The bystander never noticed.
    await publish(herald.ingestPort, { topic: bystander.topic, data: 'after' });
    await waitData(s3.rec, 'after', 'bystander stream');
    assert.equal(s3.rec.errors.length, 0, `bystander untouched: ${show(s3.rec)}`);
    assert.equal(s3.rec.opens, 1);
  } finally {
    for (const { rec } of streams) rec.close();
  }
});

test(`[${HERALD_BACKEND}] --max-streams-per-user: 429 with Retry-After beyond the limit, a slot frees when a stream leaves`, { timeout: 60000 }, async () => {
  const sub = newSub('m');
  const { token } = await issuer.mint({ sub });
  const url = (i) => `${herald.base}/events/user/${sub}/s${i}`;
  const recs = [];
  try {
    for (let i = 0; i < MAX_STREAMS; i++) {
      recs.push(open(url(i), { getToken: () => token }));
      await waitOpen(recs[i], `stream ${i} within the limit`);
    }
    const over = await fetchHead(url('x'), { headers: { Authorization: `Bearer ${token}`, Origin: 'http://page.example' } });
    assert.equal(over.status, 429, `stream ${MAX_STREAMS + 1}: ${JSON.stringify(over)}`);
    assert.match(over.headers['retry-after'] || '', /^\d+$/, `Retry-After in seconds: ${JSON.stringify(over.headers)}`);
    assert.equal(over.headers['access-control-allow-origin'], '*', 'CORS on the 429');

    const extra = open(url('y'), { getToken: () => token });
    try {
      await waitClosed(extra, 'EventSource beyond the limit');
      assert.equal(extra.errors[0].code, 429, show(extra));
    } finally {
      extra.close();
    }
    // Other users are not limited by this one.
    const other = await issuer.mint({ sub: newSub('m') });
    const o = await fetchHead(`${herald.base}/events/user/${other.sub}/s`, { headers: { Authorization: `Bearer ${other.token}` } });
    assert.equal(o.status, 200);

    recs.shift().close();
    await waitFor(async () => (await fetchHead(url('z'), { headers: { Authorization: `Bearer ${token}` } })).status === 200,
      WAIT, 'a slot to free after a stream left', 200);
  } finally {
    for (const r of recs) r.close();
  }
});
