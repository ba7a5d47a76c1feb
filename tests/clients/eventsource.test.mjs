// herald against the npm `eventsource` package (a WHATWG EventSource for Node).
// Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll node --test tests/clients/eventsource.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { EventSource } from 'eventsource';
import {
  startHerald, publish, publishHttp, waitFor, topicName, HERALD_BIN, HERALD_BACKEND,
} from './harness.mjs';

const WAIT = 15000; // every wait is bounded: a broken server fails, never hangs

let herald;
before(async () => {
  herald = await startHerald();
});
after(async () => {
  if (herald) {
    const res = await herald.stop();
    assert.deepEqual(res, { code: 0, signal: null }, `herald should exit 0 on SIGTERM\n${herald.logs()}`);
  }
});

/**
 * Open an EventSource and record everything: `all` gets every dispatched event
 * (message + the listed types, in arrival order); `onmessage` only what onmessage saw.
 * `headers` are added to every request through the package's custom-fetch hook;
 * `requests` records the headers of each request the package made.
 */
function open(url, { types = [], headers } = {}) {
  const rec = { all: [], onmessage: [], typed: {}, opens: 0, errors: [], requests: [] };
  const fetchImpl = (input, init) => {
    const h = { ...(init.headers || {}), ...(headers || {}) };
    rec.requests.push(h);
    return fetch(input, { ...init, headers: h });
  };
  const es = new EventSource(url, { fetch: fetchImpl });
  rec.es = es;
  es.onopen = () => { rec.opens++; };
  es.onerror = (e) => { rec.errors.push(e?.message || String(e?.code || 'error')); };
  es.onmessage = (e) => {
    rec.onmessage.push({ data: e.data, id: e.lastEventId });
    rec.all.push({ type: 'message', data: e.data, id: e.lastEventId });
  };
  for (const t of new Set(['herald-gap', ...types])) {
    rec.typed[t] = [];
    es.addEventListener(t, (e) => {
      rec.typed[t].push({ data: e.data, id: e.lastEventId });
      rec.all.push({ type: t, data: e.data, id: e.lastEventId });
    });
  }
  rec.close = () => es.close();
  return rec;
}

const waitOpen = (rec) => waitFor(() => rec.es.readyState === EventSource.OPEN, WAIT,
  `EventSource open (errors: ${JSON.stringify(rec.errors)})`);

const waitMessages = (rec, n, what) => waitFor(() => rec.onmessage.length >= n, WAIT,
  `${what}: ${n} message(s), got ${JSON.stringify(rec.all)}`);

/** Deep search of a parsed JSON value for a string (or number) equal to `want`. */
function jsonMentions(v, want) {
  if (v === want || (typeof v === 'number' && String(v) === want)) return true;
  if (v && typeof v === 'object') return Object.values(v).some((x) => jsonMentions(x, want));
  return false;
}

function checkIds(ids) {
  for (const id of ids) {
    assert.ok(id && id.length <= 128, `id should be 1..128 bytes: ${JSON.stringify(id)}`);
  }
  assert.equal(new Set(ids).size, ids.length, `ids should be distinct: ${JSON.stringify(ids)}`);
  if (ids.every((id) => /^\d+$/.test(id))) {
    for (let i = 1; i < ids.length; i++) {
      assert.ok(BigInt(ids[i]) > BigInt(ids[i - 1]), `ids should increase: ${JSON.stringify(ids)}`);
    }
  }
}

test(`[${HERALD_BACKEND}] plain messages, multi-line data (${HERALD_BIN})`, { timeout: 30000 }, async () => {
  const topic = topicName('plain');
  const rec = open(`${herald.base}/events/${topic}`);
  try {
    await waitOpen(rec);
    const reply = await publish(herald.ingestPort, [
      { topic, data: 'hello' },
      { topic, data: 'a\nb\nc' },
      { topic, data: 'x\r\ny\rz' },
      { topic, data: '' },
    ]);
    assert.equal(reply.trim(), '', 'valid ingest lines should get no error reply');
    await waitMessages(rec, 4, 'plain messages');
    assert.deepEqual(rec.onmessage.map((m) => m.data), ['hello', 'a\nb\nc', 'x\ny\nz', '']);
    checkIds(rec.onmessage.map((m) => m.id));
    assert.equal(rec.typed['herald-gap'].length, 0, 'no herald-gap on a fresh subscription');
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] typed event goes to addEventListener, not onmessage`, { timeout: 30000 }, async () => {
  const topic = topicName('typed');
  const rec = open(`${herald.base}/events/${topic}`, { types: ['goal'] });
  try {
    await waitOpen(rec);
    await publish(herald.ingestPort, [
      { topic, event: 'goal', data: 'El Shaarawy' },
      { topic, data: 'sentinel' },
    ]);
    await waitMessages(rec, 1, 'sentinel after typed event');
    assert.deepEqual(rec.typed.goal.map((e) => e.data), ['El Shaarawy']);
    assert.deepEqual(rec.onmessage.map((m) => m.data), ['sentinel'],
      'onmessage must not see the typed event');
    assert.deepEqual(rec.all.map((e) => e.type), ['goal', 'message'], 'order kept');
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] lastEventId equals the publisher's id`, { timeout: 30000 }, async () => {
  const topic = topicName('ids');
  const rec = open(`${herald.base}/events/${topic}`);
  try {
    await waitOpen(rec);
    // 1. ingest with an explicit id
    await publish(herald.ingestPort, { topic, data: 'one', id: 'pub-ev-7' });
    await waitMessages(rec, 1, 'ingest event with id');
    assert.equal(rec.onmessage[0].id, 'pub-ev-7');
    // 2. HTTP publish with ?id=
    const r2 = await publishHttp(herald.base, topic, 'two', { id: 'pub-ev-8' });
    assert.equal(r2.id, 'pub-ev-8', 'POST /publish answers the id it used');
    await waitMessages(rec, 2, 'http event with id');
    assert.equal(rec.onmessage[1].id, 'pub-ev-8');
    // 3. HTTP publish without id: herald assigns one and answers it
    const r3 = await publishHttp(herald.base, topic, 'three');
    assert.ok(typeof r3.id === 'string' && r3.id.length > 0, `POST /publish answers {"id":...}: ${JSON.stringify(r3)}`);
    await waitMessages(rec, 3, 'http event with assigned id');
    assert.equal(rec.onmessage[2].data, 'three');
    assert.equal(rec.onmessage[2].id, r3.id, 'lastEventId equals the id POST /publish answered');
  } finally {
    rec.close();
  }
});

test(`[${HERALD_BACKEND}] resume with a Last-Event-ID header: exactly the later events`, { timeout: 30000 }, async () => {
  const topic = topicName('resume');
  const first = open(`${herald.base}/events/${topic}`);
  let x;
  try {
    await waitOpen(first);
    await publish(herald.ingestPort, { topic, data: 'r0' });
    await waitMessages(first, 1, 'r0');
    x = first.onmessage[0].id;
    assert.ok(x, 'r0 has an id');
  } finally {
    first.close();
  }
  await publish(herald.ingestPort, [1, 2, 3].map((i) => ({ topic, data: `r${i}` })));

  const second = open(`${herald.base}/events/${topic}`, { headers: { 'Last-Event-ID': x } });
  try {
    await waitOpen(second);
    // A live sentinel after the replay proves nothing else was replayed (and no duplicate at hand-over).
    await publish(herald.ingestPort, { topic, data: 'live' });
    await waitFor(() => second.onmessage.some((m) => m.data === 'live'), WAIT,
      `live sentinel after replay, got ${JSON.stringify(second.all)}`);
    assert.deepEqual(second.all.map((e) => `${e.type}:${e.data}`),
      ['message:r1', 'message:r2', 'message:r3', 'message:live']);
    checkIds([x, ...second.onmessage.map((m) => m.id)]);
    assert.equal(second.requests[0]['Last-Event-ID'], x);
  } finally {
    second.close();
  }
});

test(`[${HERALD_BACKEND}] unknown Last-Event-ID gets a herald-gap event before the retained events`, { timeout: 30000 }, async () => {
  const topic = topicName('gap');
  await publish(herald.ingestPort, [1, 2, 3].map((i) => ({ topic, data: `g${i}` })));
  for (const unknown of ['0', 'no-such-id-zzz']) {
    const rec = open(`${herald.base}/events/${topic}`, { headers: { 'Last-Event-ID': unknown } });
    try {
      await waitOpen(rec);
      await publish(herald.ingestPort, { topic, data: `live-${unknown}` });
      await waitFor(() => rec.onmessage.some((m) => m.data === `live-${unknown}`), WAIT,
        `live sentinel (Last-Event-ID ${unknown}), got ${JSON.stringify(rec.all)}`);
      assert.ok(rec.all.length >= 2, `events: ${JSON.stringify(rec.all)}`);
      assert.equal(rec.all[0].type, 'herald-gap',
        `first event for Last-Event-ID ${JSON.stringify(unknown)} should be herald-gap, got ${JSON.stringify(rec.all)}`);
      let gap;
      assert.doesNotThrow(() => { gap = JSON.parse(rec.all[0].data); }, `herald-gap data is JSON: ${rec.all[0].data}`);
      assert.ok(jsonMentions(gap, unknown), `herald-gap data names the requested id ${JSON.stringify(unknown)}: ${rec.all[0].data}`);
      const rest = rec.all.slice(1).map((e) => `${e.type}:${e.data}`);
      const previous = unknown === '0' ? [] : ['message:live-0'];
      assert.deepEqual(rest, ['message:g1', 'message:g2', 'message:g3', ...previous, `message:live-${unknown}`],
        'retained events follow the gap, in publish order, then live');
      assert.equal(rec.typed['herald-gap'].length, 1, 'exactly one herald-gap');
    } finally {
      rec.close();
    }
  }
});

test(`[${HERALD_BACKEND}] the package's own reconnect after a herald restart sends Last-Event-ID and gets the new events`, { timeout: 45000 }, async () => {
  const h = await startHerald();
  const topic = topicName('restart');
  const rec = open(`${h.base}/events/${topic}`);
  try {
    await waitOpen(rec);
    await publish(h.ingestPort, { topic, data: 'before' });
    await waitMessages(rec, 1, 'event before restart');
    const x = rec.onmessage[0].id;
    const nBefore = rec.all.length;

    const stopped = await h.restart();
    assert.deepEqual(stopped, { code: 0, signal: null }, `SIGTERM exit status\n${h.logs()}`);

    // Publish after the restart until the client has reconnected and seen a new event.
    let i = 0;
    await waitFor(async () => {
      if (rec.opens >= 2 && rec.onmessage.some((m) => m.data.startsWith('after-'))) return true;
      await publish(h.ingestPort, { topic, data: `after-${i++}` });
      return false;
    }, 20000, `reconnect + post-restart event (opens=${rec.opens}, errors=${JSON.stringify(rec.errors)}, got ${JSON.stringify(rec.all)})`, 300);

    const reconnects = rec.requests.slice(1);
    assert.ok(reconnects.length >= 1, 'the package reconnected');
    assert.equal(reconnects[0]['Last-Event-ID'], x, 'reconnect request carries Last-Event-ID');

    const afterEvents = rec.all.slice(nBefore);
    const gapFirst = afterEvents[0]?.type === 'herald-gap';
    const datas = afterEvents.filter((e) => e.type === 'message').map((e) => e.data);
    assert.ok(datas.every((d) => d.startsWith('after-')), `only post-restart events: ${JSON.stringify(afterEvents)}`);
    const nums = datas.map((d) => Number(d.slice(6)));
    for (let k = 1; k < nums.length; k++) {
      assert.equal(nums[k], nums[k - 1] + 1, `post-restart events in order, no gap/duplicate: ${JSON.stringify(datas)}`);
    }
    assert.ok(gapFirst || nums[0] === 0,
      `events retained since the restart were replayed from after-0, or a herald-gap said why not: ${JSON.stringify(afterEvents)}`);
  } finally {
    rec.close();
    const res = await h.stop();
    assert.deepEqual(res, { code: 0, signal: null });
  }
});
