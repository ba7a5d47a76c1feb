// herald over HTTP/2 against a real browser: Debian's Chromium (/usr/bin/chromium) driven by
// playwright-core, trusting a test CA made fresh for this run through an NSS database (as in
// browser-tls.test.mjs; no --ignore-certificate-errors).
//
// Over https (ALPN h2) one page opens 20 EventSources to one origin, each to its own topic: all 20
// must open on one connection and get their own events. The HTTP/1.1 contrast: the same page over
// herald's plaintext --listen (http://, where Chromium speaks only HTTP/1.1) opens 6 and the 7th
// stays CONNECTING (Chromium's 6 connections per host) until one of the 6 is closed.
// The protocol of every event-stream response is read from Chromium's own network events (CDP
// Network.responseReceived: protocol and connectionId), so an HTTP/1.1 fallback fails the h2 test.
// A third test restarts herald (--history-file) under 20 open h2 EventSources: Chromium reconnects
// them all over h2 and each resumes with Last-Event-ID exactly.
//
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/browser-h2.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  startHerald, publish, waitFor, withTimeout, topicName, makePki, makeNssHome, tempDir, metrics, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 20000;
const N = 20;
const H1_LIMIT = 6; // Chromium's connections per host (and per proxy-less group) for HTTP/1.1
const NEGATIVE_WAIT = 3000; // how long the 7th EventSource must stay unopened over HTTP/1.1
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

let pki;
let browser;
let herald;

before(async () => {
  pki = makePki();
  browser = await withTimeout(chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    env: { ...process.env, HOME: makeNssHome(pki.ca) },
  }), 30000, 'chromium to launch');
  herald = await startHerald({ tls: { pairs: [pki.localhost] } });
});

after(async () => {
  if (browser) await withTimeout(browser.close(), 10000, 'chromium to close').catch(() => {});
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

/** A fresh context and page at `origin`/healthz, with Chromium's network events recorded:
 * {context, page, streams: [{url, protocol, connectionId, status}], nav}. */
async function openPage(origin) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  const streams = [];
  cdp.on('Network.responseReceived', (e) => {
    if (e.type === 'EventSource' || (e.response.mimeType || '').startsWith('text/event-stream')) {
      streams.push({ url: e.response.url, protocol: e.response.protocol, connectionId: e.response.connectionId, status: e.response.status });
    }
  });
  await cdp.send('Network.enable');
  const resp = await page.goto(`${origin}/healthz`, { timeout: WAIT });
  assert.equal(resp.status(), 200);
  const nav = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  return { context, page, streams, nav };
}

/** Open one EventSource per topic in the page; window.__h2 records opens, errors and messages per index. */
function openMany(page, topics) {
  return page.evaluate((topics) => {
    window.__h2 = topics.map((t) => {
      const st = { topic: t, opens: 0, errors: 0, msgs: [] };
      const es = new EventSource(`/events/${t}`);
      st.es = es;
      es.onopen = () => { st.opens++; };
      es.onerror = () => { st.errors++; };
      es.onmessage = (e) => { st.msgs.push({ data: e.data, id: e.lastEventId }); };
      return st;
    });
  }, topics);
}

const state = (page) => page.evaluate(() => window.__h2.map((s) => ({
  topic: s.topic, opens: s.opens, errors: s.errors, msgs: s.msgs, readyState: s.es.readyState,
})));

async function waitState(page, pred, what) {
  let last;
  try {
    await waitFor(async () => { last = await state(page); return pred(last); }, WAIT, what, 100);
    return last;
  } catch (e) {
    throw new Error(`${e.message}\nlast state: ${JSON.stringify(last?.map((s) => [s.readyState, s.opens, s.msgs.length]))}`);
  }
}

const openCount = (s) => s.filter((x) => x.readyState === 1 && x.opens >= 1).length;

test(`[${HERALD_BACKEND}] https (ALPN h2): one page, ${N} EventSources to one origin, all open on one connection and get their own events`, { timeout: 90000 }, async () => {
  const { context, page, streams, nav } = await openPage(herald.tlsBase);
  try {
    assert.equal(nav, 'h2', `the page itself came over h2 (nextHopProtocol ${nav})`);
    const prefix = topicName('bh2');
    const topics = Array.from({ length: N }, (_, i) => `${prefix}-${i}`);
    await openMany(page, topics);
    await waitState(page, (s) => openCount(s) === N, `all ${N} EventSources open`);
    await waitFor(() => streams.length >= N, WAIT, `${N} event-stream responses seen by CDP`);
    assert.deepEqual([...new Set(streams.map((s) => s.protocol))], ['h2'], `every event stream over h2: ${JSON.stringify(streams)}`);
    assert.equal(new Set(streams.map((s) => s.connectionId)).size, 1, `one connection for all: ${JSON.stringify(streams)}`);
    assert.ok(streams.every((s) => s.status === 200), JSON.stringify(streams));
    assert.ok((await metrics(herald.base)).get('herald_streams_open') >= N, 'herald holds all the streams');

    // Publish in reverse order, two events per topic: each EventSource gets exactly its own.
    const events = [];
    for (const t of [...topics].reverse()) events.push({ topic: t, data: `${t}:one` }, { topic: t, data: `${t}:two` });
    await publish(herald.ingestPort, events);
    const s = await waitState(page, (st) => st.every((x) => x.msgs.length >= 2), `all ${N} got two events`);
    for (const x of s) {
      assert.deepEqual(x.msgs.map((m) => m.data), [`${x.topic}:one`, `${x.topic}:two`], `EventSource for ${x.topic}`);
      assert.ok(x.msgs.every((m) => m.id), `ids on ${x.topic}: ${JSON.stringify(x.msgs)}`);
      assert.equal(x.errors, 0, `no error event on ${x.topic}`);
    }
  } finally {
    await context.close();
  }
});

test(`[${HERALD_BACKEND}] http:// (HTTP/1.1 in cleartext): the same page opens only ${H1_LIMIT} EventSources; the 7th waits for a free connection`, { timeout: 90000 }, async () => {
  const { context, page, streams, nav } = await openPage(herald.base);
  try {
    assert.equal(nav, 'http/1.1', `Chromium speaks HTTP/1.1 in cleartext (nextHopProtocol ${nav})`);
    const prefix = topicName('bh1');
    const topics = Array.from({ length: N }, (_, i) => `${prefix}-${i}`);
    await openMany(page, topics);
    await waitState(page, (s) => openCount(s) === H1_LIMIT, `${H1_LIMIT} EventSources open`);
    await publish(herald.ingestPort, topics.map((t) => ({ topic: t, data: `${t}:one` })));
    await waitState(page, (s) => s.filter((x) => x.msgs.length === 1).length === H1_LIMIT, `the ${H1_LIMIT} open ones got their event`);

    // The negative check needs a bounded wait: nothing else opens or receives in NEGATIVE_WAIT ms.
    const deadline = Date.now() + NEGATIVE_WAIT;
    let s;
    while (Date.now() < deadline) {
      s = await state(page);
      assert.equal(openCount(s), H1_LIMIT, `no more than ${H1_LIMIT} open over HTTP/1.1: ${JSON.stringify(s.map((x) => x.readyState))}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    s = await state(page);
    const waiting = s.filter((x) => !(x.readyState === 1 && x.opens >= 1));
    assert.equal(waiting.length, N - H1_LIMIT);
    assert.ok(waiting.every((x) => x.readyState === 0 && x.msgs.length === 0),
      `the others are still CONNECTING and got nothing: ${JSON.stringify(waiting.map((x) => [x.readyState, x.msgs.length]))}`);
    assert.equal(streams.length, H1_LIMIT, `CDP saw ${H1_LIMIT} event-stream responses: ${JSON.stringify(streams)}`);
    assert.deepEqual([...new Set(streams.map((x) => x.protocol))], ['http/1.1'], JSON.stringify(streams));

    // It is the connection limit, not a failure: close one of the open ones and a waiting one opens.
    const closed = s.findIndex((x) => x.readyState === 1);
    await page.evaluate((i) => window.__h2[i].es.close(), closed);
    await waitState(page, (st) => openCount(st) === H1_LIMIT && st[closed].readyState === 2,
      `a waiting EventSource opens once one of the ${H1_LIMIT} is closed`);
  } finally {
    await context.close();
  }
});

test(`[${HERALD_BACKEND}] h2: after a herald restart Chromium reconnects all ${N} EventSources over h2 and resumes each exactly`, { timeout: 90000 }, async () => {
  const history = path.join(tempDir('herald-hist-'), 'history.bin');
  const h = await startHerald({ tls: { pairs: [pki.localhost] }, extraArgs: ['--history-file', history, '--retry', '300', '--drain-window', '300ms'] });
  const { context, page, streams } = await openPage(h.tlsBase);
  try {
    const prefix = topicName('bh2rc');
    const topics = Array.from({ length: N }, (_, i) => `${prefix}-${i}`);
    await openMany(page, topics);
    await waitState(page, (s) => openCount(s) === N, `all ${N} open`);
    await publish(h.ingestPort, topics.map((t) => ({ topic: t, data: `${t}:a` })));
    await waitState(page, (s) => s.every((x) => x.msgs.length === 1), 'one event each before the restart');

    const stopped = await h.restart();
    assert.deepEqual(stopped, { code: 0, signal: null }, `exit status on SIGTERM\n${h.logs()}`);
    await publish(h.ingestPort, topics.flatMap((t) => [{ topic: t, data: `${t}:b` }, { topic: t, data: `${t}:c` }]));
    const s = await waitState(page, (st) => st.every((x) => x.opens >= 2 && x.readyState === 1 && x.msgs.length >= 3),
      `all ${N} reconnected and got b and c`);
    for (const x of s) {
      assert.deepEqual(x.msgs.map((m) => m.data), [`${x.topic}:a`, `${x.topic}:b`, `${x.topic}:c`],
        `${x.topic}: exactly the events after a, nothing missing, nothing twice`);
    }
    await waitFor(() => streams.length >= 2 * N, WAIT, `${2 * N} event-stream responses seen by CDP`);
    assert.deepEqual([...new Set(streams.map((x) => x.protocol))], ['h2'], `reconnects over h2 too: ${JSON.stringify(streams)}`);
    const before = new Set(streams.slice(0, N).map((x) => x.connectionId));
    assert.equal(before.size, 1, `one connection before the restart: ${JSON.stringify(streams.slice(0, N))}`);
    assert.ok(streams.slice(N).every((x) => !before.has(x.connectionId)), 'the reconnects use a new connection');
  } finally {
    await context.close();
    const res = await h.stop();
    assert.deepEqual(res, { code: 0, signal: null });
  }
});
