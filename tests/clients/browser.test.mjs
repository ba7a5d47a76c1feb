// herald against a real browser EventSource: Debian's Chromium (/usr/bin/chromium)
// driven by playwright-core. Never downloads a browser.
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/browser.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { chromium } from 'playwright-core';
import {
  startHerald, publish, publishHttp, waitFor, withTimeout, freePort, topicName, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 20000; // upper bound for every wait
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

let browser;
let herald;

before(async () => {
  browser = await withTimeout(chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  }), 30000, 'chromium to launch');
  herald = await startHerald();
});

after(async () => {
  if (browser) await withTimeout(browser.close(), 10000, 'chromium to close').catch(() => {});
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

/** In the page: open an EventSource and record everything into window.__t. */
async function openInPage(page, url, types = []) {
  await page.evaluate(({ url, types }) => {
    const st = { opens: 0, errors: 0, all: [], onmessage: [], states: [] };
    window.__t = st;
    const es = new EventSource(url);
    window.__es = es;
    const rec = (type) => (e) => {
      const ev = { type, data: e.data, id: e.lastEventId, opens: st.opens };
      st.all.push(ev);
      if (type === 'message') st.onmessage.push(ev);
    };
    es.onopen = () => { st.opens++; st.states.push('open'); };
    es.onerror = () => { st.errors++; st.states.push(`error:${es.readyState}`); };
    es.onmessage = rec('message');
    for (const t of new Set(['herald-gap', ...types])) es.addEventListener(t, rec(t));
  }, { url, types });
}

const pageState = (page) => page.evaluate(() => ({
  ...window.__t, readyState: window.__es.readyState, url: window.__es.url,
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

test(`[${HERALD_BACKEND}] same origin: demo page, onopen, onmessage, typed events, multi-line data, lastEventId`, { timeout: 60000 }, async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  const foreign = [];
  page.on('request', (r) => { if (!r.url().startsWith(herald.base)) foreign.push(r.url()); });
  try {
    const resp = await page.goto(`${herald.base}/`, { timeout: WAIT });
    assert.equal(resp.status(), 200, 'GET / serves the demo page');
    assert.match(resp.headers()['content-type'] || '', /text\/html/);
    const demo = await page.evaluate(() => ({
      inputs: document.querySelectorAll('input').length,
      buttons: document.querySelectorAll('button').length,
      text: document.body ? document.body.innerText : '',
    }));
    assert.ok(demo.inputs >= 1 && demo.buttons >= 1, `demo page has a topic field and buttons: ${JSON.stringify(demo)}`);
    assert.match(demo.text, /publish/i, 'demo page shows a publish hint');

    await openInPage(page, '/events/t1', ['goal']);
    await waitPage(page, (s) => s.opens >= 1 && s.readyState === 1, 'onopen / readyState OPEN');

    await publish(herald.ingestPort, [
      { topic: 't1', data: 'hello' },
      { topic: 't1', data: 'a\nb\nc' },
      { topic: 't1', event: 'goal', data: 'El Shaarawy' },
    ]);
    const last = await publishHttp(herald.base, 't1', 'via-http');
    assert.ok(last.id, `POST /publish answers an id: ${JSON.stringify(last)}`);

    const s = await waitPage(page, (st) => st.onmessage.some((m) => m.data === 'via-http'), 'all events in the page');
    assert.deepEqual(s.all.map((e) => [e.type, e.data]), [
      ['message', 'hello'], ['message', 'a\nb\nc'], ['goal', 'El Shaarawy'], ['message', 'via-http']]);
    assert.ok(!s.onmessage.some((m) => m.data === 'El Shaarawy'), 'typed event not delivered to onmessage');
    assert.equal(s.onmessage.at(-1).id, last.id, 'lastEventId equals the id herald answered');
    const ids = s.all.map((e) => e.id);
    assert.equal(new Set(ids).size, ids.length, `distinct ids: ${ids}`);
    assert.equal(s.errors, 0, 'no error event');
    assert.deepEqual(foreign, [], 'the demo page loads no external resources');
  } finally {
    await context.close();
  }
});

test(`[${HERALD_BACKEND}] cross origin: EventSource to herald's absolute URL, CORS header present`, { timeout: 60000 }, async () => {
  const blankPort = await freePort();
  const blank = http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>blank</title><body>blank</body>');
  });
  await new Promise((r) => blank.listen(blankPort, '127.0.0.1', r));
  const context = await browser.newContext();
  const page = await context.newPage();
  const topic = topicName('xo');
  const eventsUrl = `${herald.base}/events/${topic}`;
  const responses = [];
  page.on('response', (r) => { if (r.url().startsWith(eventsUrl)) responses.push(r); });
  try {
    await page.goto(`http://127.0.0.1:${blankPort}/`, { timeout: WAIT });
    await openInPage(page, eventsUrl, ['goal']);
    await waitPage(page, (s) => s.opens >= 1 && s.readyState === 1, 'cross-origin EventSource open');
    await publish(herald.ingestPort, [
      { topic, data: 'x\ny' },
      { topic, event: 'goal', data: 'typed', id: 'xo-id-1' },
      { topic, data: 'end' },
    ]);
    const s = await waitPage(page, (st) => st.onmessage.some((m) => m.data === 'end'), 'cross-origin events');
    assert.deepEqual(s.all.map((e) => [e.type, e.data]), [['message', 'x\ny'], ['goal', 'typed'], ['message', 'end']]);
    assert.equal(s.all[1].id, 'xo-id-1');

    // The EventSource response as the browser saw it carries Access-Control-Allow-Origin.
    assert.ok(responses.length >= 1, 'saw the EventSource response');
    const hdrs = await withTimeout(responses[0].allHeaders(), 5000, 'response headers');
    const acao = hdrs['access-control-allow-origin'];
    assert.ok(acao === '*' || acao === `http://127.0.0.1:${blankPort}`, `Access-Control-Allow-Origin on the stream: ${acao}`);

    // A cross-origin fetch() of a stream from the page succeeds only if CORS allows it. The
    // Cache-Control request header is not CORS-safelisted, so this also needs herald's OPTIONS
    // preflight to allow Last-Event-ID and Cache-Control.
    const streamHeaders = await page.evaluate(async (url) => {
      const ctl = new AbortController();
      const t = setTimeout(() => ctl.abort(), 5000);
      try {
        const r = await fetch(url, {
          signal: ctl.signal,
          headers: { 'Cache-Control': 'no-cache', 'Last-Event-ID': 'x-1' },
        });
        const out = { status: r.status, contentType: r.headers.get('content-type'), cacheControl: r.headers.get('cache-control') };
        ctl.abort();
        return out;
      } catch (e) {
        return { error: String(e) };
      } finally {
        clearTimeout(t);
      }
    }, `${herald.base}/events/${topic}-fetch`);
    assert.equal(streamHeaders.error, undefined,
      `cross-origin fetch of a stream (with a preflight for Cache-Control + Last-Event-ID) failed (CORS?): ${streamHeaders.error}`);
    assert.equal(streamHeaders.status, 200);
    assert.match(streamHeaders.contentType || '', /^text\/event-stream/);
  } finally {
    await context.close();
    await new Promise((r) => { blank.close(() => r()); blank.closeAllConnections?.(); });
  }
});

test(`[${HERALD_BACKEND}] reconnection after a herald restart carries Last-Event-ID and gets the new events`, { timeout: 90000 }, async () => {
  const h = await startHerald();
  const context = await browser.newContext();
  const page = await context.newPage();
  const topic = topicName('rc');
  const streamRequests = [];
  page.on('request', (r) => {
    if (r.url().includes(`/events/${topic}`)) streamRequests.push(r.allHeaders().catch(() => r.headers()));
  });
  try {
    await page.goto(`${h.base}/healthz`, { timeout: WAIT });
    await openInPage(page, `/events/${topic}`);
    await waitPage(page, (s) => s.opens >= 1 && s.readyState === 1, 'initial open');
    await publish(h.ingestPort, { topic, data: 'before' });
    const s0 = await waitPage(page, (s) => s.onmessage.some((m) => m.data === 'before'), 'event before restart');
    const x = s0.onmessage.find((m) => m.data === 'before').id;
    assert.ok(x, 'the event before the restart has an id');
    const nBefore = s0.all.length;

    const stopped = await h.restart();
    assert.deepEqual(stopped, { code: 0, signal: null }, `exit status on SIGTERM\n${h.logs()}`);

    // Keep publishing until the browser is OPEN again and has received a post-restart event.
    let i = 0;
    let last;
    try {
      await waitFor(async () => {
        last = await pageState(page);
        if (last.opens >= 2 && last.readyState === 1 && last.onmessage.some((m) => m.data.startsWith('after-'))) return true;
        await publish(h.ingestPort, { topic, data: `after-${i++}` });
        return false;
      }, WAIT, 'browser reconnected and received a post-restart event', 300);
    } catch (e) {
      throw new Error(`${e.message}\nlast page state: ${JSON.stringify(last)}\n--- herald ---\n${h.logs()}`);
    }
    const s = await pageState(page);
    const afterEvents = s.all.slice(nBefore);
    const gapFirst = afterEvents[0]?.type === 'herald-gap';
    const datas = afterEvents.filter((e) => e.type === 'message').map((e) => e.data);
    assert.ok(datas.length >= 1 && datas.every((d) => d.startsWith('after-')), `post-restart events only: ${JSON.stringify(afterEvents)}`);
    const nums = datas.map((d) => Number(d.slice('after-'.length)));
    for (let k = 1; k < nums.length; k++) {
      assert.equal(nums[k], nums[k - 1] + 1, `post-restart events in order, no gap/duplicate: ${JSON.stringify(datas)}`);
    }
    assert.ok(gapFirst || nums[0] === 0,
      `retained post-restart events replayed from after-0, or a herald-gap first: ${JSON.stringify(afterEvents)}`);

    // The reconnect request carried Last-Event-ID = x.
    const headers = await withTimeout(Promise.all(streamRequests), 5000, 'request headers');
    const reconnects = headers.slice(1);
    if (reconnects.length > 0) {
      assert.equal(reconnects[0]['last-event-id'], x, `reconnect request headers: ${JSON.stringify(reconnects[0])}`);
    } else {
      // The network log missed the reconnect: the herald-gap, if any, must name x.
      assert.ok(gapFirst && afterEvents[0].data.includes(x),
        `could not observe the reconnect request, and no herald-gap naming ${x}: ${JSON.stringify(afterEvents)}`);
    }
    if (gapFirst) {
      const gap = JSON.parse(afterEvents[0].data);
      assert.ok(JSON.stringify(gap).includes(x), `herald-gap names the requested id ${x}: ${afterEvents[0].data}`);
    }
  } finally {
    await context.close();
    const res = await h.stop();
    assert.deepEqual(res, { code: 0, signal: null });
  }
});
