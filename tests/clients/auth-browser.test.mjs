// herald's JWT authentication against a real browser EventSource: Debian's Chromium
// (/usr/bin/chromium) driven by playwright-core. A native EventSource cannot set headers, so
// the token travels in the `herald_token` cookie: same origin, and cross origin with
// `withCredentials: true` against herald's `--cors-origins ... --cors-credentials true`.
// Tokens: ES256, minted by npm `jose`; herald reads the public key as PEM (--auth-keys).
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/auth-browser.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  startHerald, publish, waitFor, withTimeout, freePort, makeEs256Issuer, makePki, makeNssHome, tempDir, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 20000; // upper bound for every wait
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

let browser;
let herald;
let issuer;
// Two pages on other origins than herald's, both on the site "localhost": `allowed` is in
// --cors-origins, `stranger` is not.
let allowed;
let stranger;

/**
 * A tiny server for a blank page at http://localhost:PORT/ (or https://HOST:PORT/ with `tls`:
 * {cert, key, host}). `/cookie` answers, with CORS for `corsOrigin`, the Cookie header it got.
 */
async function pageServer({ tls, corsOrigin } = {}) {
  const port = await freePort();
  const handler = (req, res) => {
    if (req.url === '/cookie') {
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Access-Control-Allow-Origin': corsOrigin || '*',
        ...(corsOrigin ? { 'Access-Control-Allow-Credentials': 'true' } : {}) });
      res.end(req.headers.cookie || '');
      return;
    }
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>page</title><body>page</body>');
  };
  const server = tls
    ? https.createServer({ cert: fs.readFileSync(tls.cert), key: fs.readFileSync(tls.key) }, handler)
    : http.createServer(handler);
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return {
    port,
    origin: tls ? `https://${tls.host}:${port}` : `http://localhost:${port}`,
    close: () => new Promise((r) => { server.close(() => r()); server.closeAllConnections?.(); }),
  };
}

before(async () => {
  issuer = await makeEs256Issuer();
  allowed = await pageServer();
  stranger = await pageServer();
  browser = await withTimeout(chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // herald and the page servers listen on 127.0.0.1 only.
      '--host-resolver-rules=MAP localhost 127.0.0.1'],
  }), 30000, 'chromium to launch');
  herald = await startHerald({
    extraArgs: ['--auth-keys', issuer.pemPath,
      '--cors-origins', allowed.origin,
      '--cors-credentials', 'true'],
  });
});

after(async () => {
  if (browser) await withTimeout(browser.close(), 10000, 'chromium to close').catch(() => {});
  for (const s of [allowed, stranger]) await s?.close();
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

/** In the page: open an EventSource and record everything into window.__t. */
async function openInPage(page, url, init) {
  await page.evaluate(({ url, init }) => {
    const st = { opens: 0, errors: 0, all: [], onmessage: [], states: [] };
    window.__t = st;
    const es = init ? new EventSource(url, init) : new EventSource(url);
    window.__es = es;
    const rec = (type) => (e) => {
      const ev = { type, data: e.data, id: e.lastEventId, opens: st.opens };
      st.all.push(ev);
      if (type === 'message') st.onmessage.push(ev);
    };
    es.onopen = () => { st.opens++; st.states.push('open'); };
    es.onerror = () => { st.errors++; st.states.push(`error:${es.readyState}`); };
    es.onmessage = rec('message');
    es.addEventListener('herald-gap', rec('herald-gap'));
  }, { url, init });
}

const pageState = (page) => page.evaluate(() => ({
  ...window.__t, readyState: window.__es.readyState, url: window.__es.url, withCredentials: window.__es.withCredentials,
}));

async function waitPage(page, pred, what) {
  let last;
  try {
    await waitFor(async () => { last = await pageState(page); return pred(last); }, WAIT, what, 100);
    return last;
  } catch (e) {
    throw new Error(`${e.message}\nlast page state: ${JSON.stringify(last)}\n--- herald ---\n${herald.logs()}`);
  }
}

/**
 * Record the requests the page makes to URLs starting with `prefix`; the returned function
 * resolves one entry per request: {status, headers} of its response, or {failed} without one.
 * (A body load the browser aborts after the head, as it does for a refused EventSource,
 * is still one request with its response.)
 */
function watchResponses(page, prefix) {
  const seen = [];
  page.on('request', (r) => {
    if (r.url().startsWith(prefix)) seen.push(r);
  });
  const outcome = async (r) => {
    const res = await r.response();
    if (!res) return { failed: r.failure()?.errorText ?? 'no response' };
    return { status: res.status(), headers: await res.allHeaders() };
  };
  return () => withTimeout(Promise.all(seen.map(outcome)), 5000, 'response headers');
}

test(`[${HERALD_BACKEND}] same origin: the herald_token cookie authorizes the demo page's EventSource; without it, error and CLOSED`, { timeout: 60000 }, async () => {
  const { token } = await issuer.mint({ sub: '42', subscribe: ['user/{sub}/*'] });
  const topic = 'user/42/x';

  const context = await browser.newContext();
  await context.addCookies([{ name: 'herald_token', value: token, url: herald.base, httpOnly: true, sameSite: 'Lax' }]);
  const page = await context.newPage();
  const responses = watchResponses(page, `${herald.base}/events/${topic}`);
  try {
    const resp = await page.goto(`${herald.base}/`, { timeout: WAIT });
    assert.equal(resp.status(), 200, 'GET / serves the demo page with auth on');
    await openInPage(page, `/events/${topic}`);
    await waitPage(page, (s) => s.opens >= 1 && s.readyState === 1, 'cookie-authorized EventSource open');
    await publish(herald.ingestPort, [
      { topic, data: 'c1' }, { topic, data: 'c2\nmulti' }, { topic: 'user/43/x', data: 'not mine' }, { topic, data: 'c3' },
    ]);
    const s = await waitPage(page, (st) => st.onmessage.some((m) => m.data === 'c3'), 'events through the cookie');
    assert.deepEqual(s.all.map((e) => e.data), ['c1', 'c2\nmulti', 'c3']);
    assert.equal(s.errors, 0);
    const [r0] = await responses();
    assert.equal(r0.status, 200);
  } finally {
    await context.close();
  }

  // A fresh context: no cookie, so 401 and the browser gives up (a non-200 fails an EventSource).
  const bare = await browser.newContext();
  const page2 = await bare.newPage();
  const responses2 = watchResponses(page2, `${herald.base}/events/${topic}`);
  try {
    await page2.goto(`${herald.base}/`, { timeout: WAIT });
    await openInPage(page2, `/events/${topic}`);
    const s = await waitPage(page2, (st) => st.errors >= 1 && st.readyState === 2, 'no cookie: error and CLOSED');
    assert.equal(s.opens, 0);
    assert.deepEqual(s.states, ['error:2'], `failed at once, no reconnect: ${JSON.stringify(s)}`);
    await publish(herald.ingestPort, { topic, data: 'unseen' });
    const r = await responses2();
    assert.equal(r.length, 1, `one request: ${JSON.stringify(r)}`);
    assert.equal(r[0].status, 401, JSON.stringify(r[0]));
    assert.match(r[0].headers['www-authenticate'] || '', /^Bearer realm="herald"/);
    assert.deepEqual((await pageState(page2)).all, [], 'no event without the cookie');
  } finally {
    await bare.close();
  }
});

test(`[${HERALD_BACKEND}] cross origin with credentials: a listed origin gets events with withCredentials; without credentials, 401; an unlisted origin is blocked`, { timeout: 90000 }, async () => {
  const { token } = await issuer.mint({ sub: '42', subscribe: ['user/{sub}/*'] });
  const heraldByName = `http://localhost:${herald.listenPort}`;
  const topic = 'user/42/cross';
  const eventsUrl = `${heraldByName}/events/${topic}`;

  const context = await browser.newContext();
  // The cookie belongs to herald's host ("localhost", any port). The pages are other origins
  // on the same site, so a SameSite=Lax cookie goes along with a credentialed request.
  await context.addCookies([{ name: 'herald_token', value: token, url: heraldByName, httpOnly: true, sameSite: 'Lax' }]);
  const pAllowed = await context.newPage();
  const pPlain = await context.newPage();
  const pStranger = await context.newPage();
  const rAllowed = watchResponses(pAllowed, eventsUrl);
  const rPlain = watchResponses(pPlain, eventsUrl);
  const rStranger = watchResponses(pStranger, eventsUrl);
  try {
    await pAllowed.goto(`${allowed.origin}/`, { timeout: WAIT });
    await pPlain.goto(`${allowed.origin}/`, { timeout: WAIT });
    await pStranger.goto(`${stranger.origin}/`, { timeout: WAIT });

    // Listed origin, credentials: the cookie goes, herald answers with the origin and
    // Access-Control-Allow-Credentials, the browser delivers.
    await openInPage(pAllowed, eventsUrl, { withCredentials: true });
    await waitPage(pAllowed, (s) => s.opens >= 1 && s.readyState === 1, 'listed origin, withCredentials: open');

    // Listed origin, no credentials: no cookie, so herald refuses; the browser fails the EventSource.
    await openInPage(pPlain, eventsUrl);
    const sPlain = await waitPage(pPlain, (s) => s.errors >= 1 && s.readyState === 2, 'listed origin, no credentials: error, CLOSED');
    assert.equal(sPlain.opens, 0);

    // Unlisted origin, credentials: herald may stream, but without Access-Control-Allow-Origin
    // for that origin the browser must not hand over a single event.
    await openInPage(pStranger, eventsUrl, { withCredentials: true });
    // (Chromium fails an EventSource whose CORS check fails: error, CLOSED, no retry.)
    const sStranger = await waitPage(pStranger, (s) => s.errors >= 1 && s.readyState === 2, 'unlisted origin: error, CLOSED');
    assert.equal(sStranger.opens, 0, `the browser must not open a stream for an unlisted origin: ${JSON.stringify(sStranger)}`);

    await publish(herald.ingestPort, [{ topic, data: 'x1' }, { topic, data: 'x2' }, { topic, data: 'x3' }]);
    const sA = await waitPage(pAllowed, (s) => s.onmessage.some((m) => m.data === 'x3'), 'listed origin: events');
    assert.deepEqual(sA.all.map((e) => e.data), ['x1', 'x2', 'x3']);
    assert.equal(sA.errors, 0);
    assert.equal(sA.withCredentials, true);

    // The allowed page has the last event: by then the others would have had theirs.
    for (const [what, p] of [['no credentials', pPlain], ['unlisted origin', pStranger]]) {
      const s = await pageState(p);
      assert.deepEqual(s.all, [], `${what}: no event: ${JSON.stringify(s)}`);
      assert.notEqual(s.readyState, 1, `${what}: never OPEN`);
    }

    const [a0] = await rAllowed();
    assert.equal(a0.status, 200, JSON.stringify(a0));
    assert.equal(a0.headers['access-control-allow-origin'], allowed.origin, JSON.stringify(a0.headers));
    assert.equal(a0.headers['access-control-allow-credentials'], 'true', JSON.stringify(a0.headers));
    const p = await rPlain();
    assert.equal(p.length, 1, `no reconnect after the 401: ${JSON.stringify(p)}`);
    assert.equal(p[0].status, 401, JSON.stringify(p[0]));
    assert.equal(p[0].headers['access-control-allow-origin'], allowed.origin, 'the 401 carries the CORS headers a 200 would');
    assert.equal(p[0].headers['access-control-allow-credentials'], 'true', 'the 401 carries the CORS headers a 200 would');
    const st = await rStranger();
    for (const r of st) {
      if (r.headers) {
        assert.notEqual(r.headers['access-control-allow-origin'], stranger.origin, `herald must not allow ${stranger.origin}`);
        assert.notEqual(r.headers['access-control-allow-origin'], '*', 'no wildcard with credentials');
      }
    }
  } finally {
    await context.close();
  }
});

test(`[${HERALD_BACKEND}] cross site over TLS: a SameSite=None; Secure cookie with withCredentials from https://other.test; a Lax cookie stays home`, { timeout: 90000 }, async (t) => {
  // Fully cross-site: the page is https://other.test:P (a node server with the fixture's
  // other.test certificate), herald is https://localhost:P1. Chromium trusts the fresh test
  // CA through an NSS database; its profile allows third-party cookies (a preference, since
  // a headless Chromium blocks them by default), and a probe against a plain node server
  // shows it does before herald is judged.
  const pki = makePki();
  const { token } = await issuer.mint({ sub: '42', subscribe: ['user/{sub}/*'] });
  const page = await pageServer({ tls: { ...pki.other, host: 'other.test' } });
  const probe = await pageServer({ tls: { ...pki.localhost, host: 'localhost' }, corsOrigin: page.origin });
  const h = await startHerald({
    tls: { pairs: [pki.localhost] },
    extraArgs: ['--auth-keys', issuer.pemPath, '--cors-origins', page.origin, '--cors-credentials', 'true'],
  });
  const profile = tempDir('herald-profile-');
  fs.mkdirSync(path.join(profile, 'Default'));
  fs.writeFileSync(path.join(profile, 'Default', 'Preferences'), JSON.stringify({
    profile: { cookie_controls_mode: 0, block_third_party_cookies: false, default_content_setting_values: { cookies: 1 } },
  }));
  const context = await withTimeout(chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    env: { ...process.env, HOME: makeNssHome(pki.ca) },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--host-resolver-rules=MAP other.test 127.0.0.1, MAP localhost 127.0.0.1'],
  }), 30000, 'chromium (persistent profile) to launch');
  const heraldUrl = `https://localhost:${h.tlsPort}`;
  const cookie = (sameSite) => [
    { name: 'herald_token', value: token, url: heraldUrl, secure: true, httpOnly: true, sameSite },
    { name: 'probe', value: sameSite, url: probe.origin, secure: true, sameSite },
  ];
  try {
    await context.addCookies(cookie('None'));
    const p = await context.newPage();
    await p.goto(`${page.origin}/`, { timeout: WAIT });
    const seen = await p.evaluate((u) => fetch(u, { credentials: 'include' }).then((r) => r.text()), `${probe.origin}/cookie`);
    if (!seen.includes('probe=None')) {
      t.skip(`this Chromium sends no third-party cookie even with its profile allowing them (probe got ${JSON.stringify(seen)})`);
      return;
    }
    const topic = 'user/42/cross-site';
    const url = `${heraldUrl}/events/${topic}`;
    const responses = watchResponses(p, url);
    await openInPage(p, url, { withCredentials: true });
    await waitPage(p, (st) => st.opens >= 1 && st.readyState === 1, 'cross-site, SameSite=None cookie: open');
    await publish(h.ingestPort, [{ topic, data: 's1' }, { topic, data: 's2' }]);
    const st = await waitPage(p, (x) => x.onmessage.some((m) => m.data === 's2'), 'cross-site events');
    assert.deepEqual(st.all.map((e) => e.data), ['s1', 's2']);
    const [r0] = await responses();
    assert.equal(r0.status, 200);
    assert.equal(r0.headers['access-control-allow-origin'], page.origin);
    assert.equal(r0.headers['access-control-allow-credentials'], 'true');

    // The same token in a SameSite=Lax cookie: not sent cross-site, so 401, error, CLOSED.
    await context.clearCookies();
    await context.addCookies(cookie('Lax'));
    const p2 = await context.newPage();
    await p2.goto(`${page.origin}/`, { timeout: WAIT });
    const responses2 = watchResponses(p2, url);
    await openInPage(p2, url, { withCredentials: true });
    const st2 = await waitPage(p2, (x) => x.errors >= 1 && x.readyState === 2, 'cross-site, Lax cookie: error, CLOSED');
    assert.equal(st2.opens, 0);
    const r2 = await responses2();
    assert.equal(r2[0].status, 401, JSON.stringify(r2));
    assert.equal(r2[0].headers['access-control-allow-origin'], page.origin, 'CORS on the 401');
    assert.equal(r2[0].headers['access-control-allow-credentials'], 'true', 'CORS on the 401');
  } finally {
    await withTimeout(context.close(), 10000, 'chromium to close').catch(() => {});
    await page.close();
    await probe.close();
    const res = await h.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${h.logs()}`);
  }
});
