// herald over TLS against a real browser EventSource: Debian's Chromium (/usr/bin/chromium)
// driven by playwright-core. Chromium trusts a test CA made fresh for this run only through an
// NSS database ($HOME/.pki/nssdb in a temporary HOME, made with certutil); no
// --ignore-certificate-errors, no ignoreHTTPSErrors. A Chromium with an empty NSS database is
// shown to refuse the same certificate.
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/browser-tls.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  startHerald, publish, waitFor, withTimeout, topicName, makePki, makeNssHome, tempDir, metrics, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 20000;
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // other.test is herald's second certificate, nope.test a name none covers: let the
  // browser reach both by name (SNI).
  '--host-resolver-rules=MAP other.test 127.0.0.1, MAP nope.test 127.0.0.1'];

let pki;
let browser;
let herald;

function launch(home) {
  // A fresh HOME per browser: Chromium on Linux reads its trust anchors from $HOME/.pki/nssdb.
  return withTimeout(chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    env: { ...process.env, HOME: home },
  }), 30000, 'chromium to launch');
}

before(async () => {
  pki = makePki();
  browser = await launch(makeNssHome(pki.ca));
  herald = await startHerald({ tls: { pairs: [pki.localhost, pki.other], hsts: '1d' } });
});

after(async () => {
  if (browser) await withTimeout(browser.close(), 10000, 'chromium to close').catch(() => {});
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

async function openInPage(page, url) {
  await page.evaluate((url) => {
    const st = { opens: 0, errors: 0, all: [], onmessage: [] };
    window.__t = st;
    const es = new EventSource(url);
    window.__es = es;
    const rec = (type) => (e) => {
      const ev = { type, data: e.data, id: e.lastEventId, opens: st.opens };
      st.all.push(ev);
      if (type === 'message') st.onmessage.push(ev);
    };
    es.onopen = () => { st.opens++; };
    es.onerror = () => { st.errors++; };
    es.onmessage = rec('message');
    es.addEventListener('herald-gap', rec('herald-gap'));
  }, url);
}

const pageState = (page) => page.evaluate(() => ({
  ...window.__t, readyState: window.__es.readyState, url: window.__es.url, origin: location.origin,
}));

async function waitPage(page, pred, what) {
  let last;
  try {
    await waitFor(async () => { last = await pageState(page); return pred(last); }, WAIT, what, 100);
    return last;
  } catch (e) {
    throw new Error(`${e.message}\nlast page state: ${JSON.stringify(last)}`);
  }
}

/** Open an EventSource at `url` in `page`, publish `datas`, return the page state once all arrived. */
async function roundTrip(page, url, topic, datas, what) {
  await openInPage(page, url);
  await waitPage(page, (s) => s.opens >= 1 && s.readyState === 1, `${what}: EventSource open`);
  await publish(herald.ingestPort, datas.map((data) => ({ topic, data })));
  const s = await waitPage(page, (st) => st.onmessage.some((m) => m.data === datas.at(-1)), `${what}: events`);
  assert.deepEqual(s.all.map((e) => e.data), datas, `${what}: events in order`);
  const ids = s.all.map((e) => e.id);
  assert.ok(ids.every(Boolean) && new Set(ids).size === ids.length, `${what}: distinct ids ${ids}`);
  assert.equal(s.errors, 0, `${what}: no error event`);
  return s;
}

test(`[${HERALD_BACKEND}] a Chromium without the test CA in its NSS database refuses herald's certificate`, { timeout: 60000 }, async () => {
  const untrusting = await launch(makeNssHome(null));
  try {
    const page = await untrusting.newPage();
    let err;
    try {
      await page.goto(`${herald.tlsBase}/healthz`, { timeout: WAIT });
    } catch (e) { err = e; }
    assert.ok(err, 'page.goto must fail without the CA');
    assert.match(err.message, /ERR_CERT_AUTHORITY_INVALID/, err.message);
  } finally {
    await withTimeout(untrusting.close(), 10000, 'chromium to close').catch(() => {});
  }
});

test(`[${HERALD_BACKEND}] https demo page (CA from NSS) + native EventSource over TLS; plain http:// still works`, { timeout: 60000 }, async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    const resp = await page.goto(`${herald.tlsBase}/`, { timeout: WAIT });
    assert.equal(resp.status(), 200, 'GET / over https serves the demo page');
    assert.match(resp.headers()['content-type'] || '', /text\/html/);
    assert.equal(resp.headers()['strict-transport-security'], 'max-age=86400', '--hsts 1d');
    const sec = await resp.securityDetails();
    assert.ok(sec, 'the browser reports TLS details');
    assert.equal(sec.protocol, 'TLS 1.3');
    assert.match(sec.issuer, /herald test CA/, `issued by the test CA: ${JSON.stringify(sec)}`);
    assert.match(sec.subjectName, /herald test localhost/, `the default (localhost) certificate: ${JSON.stringify(sec)}`);
    assert.equal(await page.evaluate(() => window.isSecureContext), true);

    const topic = topicName('btls');
    const s = await roundTrip(page, `/events/${topic}`, topic, ['tls-1', 'tls\nmulti', 'tls-3'], 'https same origin');
    assert.equal(s.origin, herald.tlsBase);
    assert.ok(s.url.startsWith('https://'), s.url);

    // The same browser, plain HTTP, as before TLS existed.
    const resp2 = await page.goto(`${herald.base}/`, { timeout: WAIT });
    assert.equal(resp2.status(), 200);
    assert.equal(resp2.headers()['strict-transport-security'], undefined, 'no HSTS over plain HTTP');
    const topic2 = topicName('bplain');
    const s2 = await roundTrip(page, `/events/${topic2}`, topic2, ['plain-1', 'plain-2'], 'http same origin');
    assert.ok(s2.url.startsWith('http://'), s2.url);
  } finally {
    await context.close();
  }
});

test(`[${HERALD_BACKEND}] SNI from the browser: https://other.test gets herald's second certificate and streams`, { timeout: 60000 }, async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    const origin = `https://other.test:${herald.tlsPort}`;
    const resp = await page.goto(`${origin}/healthz`, { timeout: WAIT });
    assert.equal(resp.status(), 200);
    const sec = await resp.securityDetails();
    assert.match(sec.subjectName, /herald test other\.test/, `SNI other.test selects its certificate: ${JSON.stringify(sec)}`);
    const topic = topicName('bsni');
    await roundTrip(page, `${origin}/events/${topic}`, topic, ['sni-1', 'sni-2'], 'https://other.test');

    // A name no certificate covers: herald refuses the handshake (an alert, counted), so the
    // browser gets a TLS error, not a certificate it could be asked to accept.
    const unknownBefore = (await metrics(herald.base)).get('herald_tls_unknown_name_total');
    let err;
    try {
      await page.goto(`https://nope.test:${herald.tlsPort}/healthz`, { timeout: WAIT });
    } catch (e) { err = e; }
    assert.ok(err, 'an unknown name must not load');
    assert.match(err.message, /ERR_SSL_|ERR_CONNECTION_/, err.message);
    assert.doesNotMatch(err.message, /ERR_CERT_/, 'refused in the handshake, before any certificate');
    await waitFor(async () => (await metrics(herald.base)).get('herald_tls_unknown_name_total') > unknownBefore,
      WAIT, 'herald_tls_unknown_name_total to grow');
  } finally {
    await context.close();
  }
});

test(`[${HERALD_BACKEND}] the browser's own reconnect over TLS after a herald restart resumes exactly`, { timeout: 90000 }, async () => {
  const history = path.join(tempDir('herald-hist-'), 'history.bin');
  const h = await startHerald({ tls: { pairs: [pki.localhost] }, extraArgs: ['--history-file', history, '--retry', '300'] });
  const context = await browser.newContext();
  const page = await context.newPage();
  const topic = topicName('brc');
  const streamRequests = [];
  page.on('request', (r) => {
    if (r.url().includes(`/events/${topic}`)) streamRequests.push(r.allHeaders().catch(() => r.headers()));
  });
  try {
    await page.goto(`${h.tlsBase}/healthz`, { timeout: WAIT });
    await openInPage(page, `/events/${topic}`);
    await waitPage(page, (s) => s.opens >= 1 && s.readyState === 1, 'initial open');
    await publish(h.ingestPort, [{ topic, data: 'a' }, { topic, data: 'b' }]);
    const s0 = await waitPage(page, (s) => s.onmessage.some((m) => m.data === 'b'), 'events before the restart');
    const x = s0.onmessage.find((m) => m.data === 'b').id;
    const nBefore = s0.all.length;

    const stopped = await h.restart();
    assert.deepEqual(stopped, { code: 0, signal: null }, `exit status on SIGTERM\n${h.logs()}`);
    await publish(h.ingestPort, [{ topic, data: 'c' }, { topic, data: 'd' }]);
    const s = await waitPage(page, (st) => st.opens >= 2 && st.readyState === 1 && st.onmessage.some((m) => m.data === 'd'),
      'browser reconnected over TLS and got "d"');
    assert.deepEqual(s.all.slice(nBefore).map((e) => `${e.type}:${e.data}`), ['message:c', 'message:d'],
      'exactly the events after b: no herald-gap, nothing missing, nothing twice');
    const headers = await withTimeout(Promise.all(streamRequests), 5000, 'request headers');
    if (headers.length >= 2) assert.equal(headers.at(-1)['last-event-id'], x, `reconnect headers: ${JSON.stringify(headers.at(-1))}`);
  } finally {
    await context.close();
    const res = await h.stop();
    assert.deepEqual(res, { code: 0, signal: null });
  }
});
