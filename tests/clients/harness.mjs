// Test harness for herald's real-client tests: start/stop the binary on free
// ports, publish over the ingest socket or HTTP, small bounded-wait helpers.
//
// Env: HERALD_BIN (path to the binary), HERALD_BACKEND (auto|uring|epoll).
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');

function defaultBin() {
  if (process.env.HERALD_BIN) return path.resolve(process.env.HERALD_BIN);
  for (const p of ['target/release/herald', 'target/debug/herald']) {
    const abs = path.join(ROOT, p);
    if (fs.existsSync(abs)) return abs;
  }
  return path.join(ROOT, 'target/release/herald');
}

export const HERALD_BIN = defaultBin();
export const HERALD_BACKEND = process.env.HERALD_BACKEND || 'auto';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolve with `promise`, or reject after `ms` with a message naming `what`. */
export function withTimeout(promise, ms, what) {
  let t;
  const timer = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timer]).finally(() => clearTimeout(t));
}

/** Poll `fn` (sync or async) until it returns a truthy value; reject after `ms`. */
export async function waitFor(fn, ms, what, interval = 50) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for: ${what}` +
        (last instanceof Error ? ` (last error: ${last.message})` : ''));
    }
    await sleep(interval);
  }
}

/** A free TCP port on 127.0.0.1 (bind port 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Plain HTTP GET with no keep-alive; resolves {status, headers, body}. */
export function httpGet(url, { headers = {}, timeout = 2000 } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, headers, timeout }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url} timed out`)));
    req.on('error', reject);
  });
}

const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

/**
 * Start herald on free ports (or the given ones) and wait for GET /healthz == 200.
 * Returns {base, listenPort, ingestPort, stop(), kill9(), restart(), logs(), child}.
 * stop() sends SIGTERM and resolves {code, signal} once the process has exited.
 */
export async function startHerald({
  bin = HERALD_BIN,
  backend = HERALD_BACKEND,
  extraArgs = [],
  listenPort,
  ingestPort,
  tls, // optional {pairs: [{cert, key}, ...] (the first is the default), hsts: '1d'}
  readyTimeout = 10000,
} = {}) {
  const used = new Set();
  const pick = async (p) => {
    p = p || await freePort();
    while (used.has(p)) p = await freePort();
    used.add(p);
    return p;
  };
  listenPort = await pick(listenPort);
  ingestPort = await pick(ingestPort);
  const tlsPort = tls ? await pick() : undefined;
  const args = ['serve',
    '--listen', `127.0.0.1:${listenPort}`,
    '--ingest', `127.0.0.1:${ingestPort}`,
    '--backend', backend,
    '--workers', '2'];
  if (tls) {
    args.push('--tls-listen', `127.0.0.1:${tlsPort}`);
    for (const { cert, key } of tls.pairs) args.push('--tls-cert', cert, '--tls-key', key);
    if (tls.hsts) args.push('--hsts', tls.hsts);
  }
  args.push(...extraArgs);

  const h = {
    base: `http://127.0.0.1:${listenPort}`,
    tlsBase: tls ? `https://127.0.0.1:${tlsPort}` : undefined,
    listenPort,
    ingestPort,
    tlsPort,
    bin,
    args,
    child: null,
    exit: null, // promise of {code, signal} for the current child
    output: '',
    logs() { return h.output.slice(-8000); },
    async stop({ timeout = 10000 } = {}) {
      return terminate(h, 'SIGTERM', timeout);
    },
    async kill9() {
      return terminate(h, 'SIGKILL', 5000);
    },
    /** SIGTERM, wait for exit, start again on the same ports. Resolves the stop result. */
    async restart({ timeout = 10000 } = {}) {
      const res = await h.stop({ timeout });
      await launch(h, readyTimeout);
      return res;
    },
  };
  await launch(h, readyTimeout);
  return h;
}

function spawnOnce(h) {
  const child = spawn(h.bin, h.args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { RUST_BACKTRACE: '1', ...process.env },
  });
  live.add(child);
  const onData = (c) => {
    h.output += c.toString();
    if (h.output.length > 200000) h.output = h.output.slice(-100000);
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  const exit = new Promise((resolve) => {
    child.on('exit', (code, signal) => { live.delete(child); resolve({ code, signal }); });
    child.on('error', (err) => {
      live.delete(child);
      h.output += `\n[spawn error] ${err.message}\n`;
      resolve({ code: null, signal: null, error: err });
    });
  });
  h.child = child;
  h.exit = exit;
  return { child, exit };
}

async function launch(h, readyTimeout) {
  const deadline = Date.now() + readyTimeout;
  let attempt = 0;
  for (;;) {
    attempt++;
    const { exit } = spawnOnce(h);
    let exited = null;
    exit.then((r) => { exited = r; });
    // Poll /healthz until 200 or the process dies.
    while (Date.now() < deadline && !exited) {
      try {
        const r = await httpGet(`${h.base}/healthz`, { timeout: 1000 });
        if (r.status === 200) return h;
      } catch { /* not listening yet */ }
      await sleep(50);
    }
    if (!exited) {
      await terminate(h, 'SIGKILL', 3000).catch(() => {});
      throw new Error(`herald not ready after ${readyTimeout} ms: ${h.bin} ${h.args.join(' ')}\n--- herald output ---\n${h.logs()}`);
    }
    // Died during start-up (e.g. port still held right after a restart): retry until the deadline.
    if (Date.now() >= deadline || exited.error) {
      throw new Error(`herald exited during start-up (${JSON.stringify(exited)}) after ${attempt} attempt(s): ${h.bin} ${h.args.join(' ')}\n--- herald output ---\n${h.logs()}`);
    }
    await sleep(200);
  }
}

async function terminate(h, signal, timeout) {
  const child = h.child;
  if (!child) return { code: null, signal: null };
  if (child.exitCode === null && child.signalCode === null) {
    try { child.kill(signal); } catch { /* gone */ }
  }
  let res;
  try {
    res = await withTimeout(h.exit, timeout, `herald to exit after ${signal}`);
  } catch (e) {
    try { child.kill('SIGKILL'); } catch { /* gone */ }
    await withTimeout(h.exit, 5000, 'herald to exit after SIGKILL').catch(() => {});
    h.child = null;
    throw new Error(`${e.message}\n--- herald output ---\n${h.logs()}`);
  }
  h.child = null;
  return res;
}

/**
 * Publish one event or an array of events as NDJSON over the ingest TCP socket,
 * half-close, and resolve with everything the server wrote back (error lines)
 * once it closes the connection.
 */
export function publish(ingestPort, events, { timeout = 10000, host = '127.0.0.1' } = {}) {
  const list = Array.isArray(events) ? events : [events];
  const payload = list.map((e) => (typeof e === 'string' ? e : JSON.stringify(e)) + '\n').join('');
  return new Promise((resolve, reject) => {
    let reply = '';
    let done = false;
    const sock = net.connect({ port: ingestPort, host });
    const finish = (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err); else resolve(reply);
    };
    const timer = setTimeout(() => finish(new Error(
      `publish: server did not close the ingest connection within ${timeout} ms (reply so far: ${JSON.stringify(reply)})`)), timeout);
    sock.setEncoding('utf8');
    sock.on('connect', () => { sock.end(payload); });
    sock.on('data', (c) => { reply += c; });
    sock.on('end', () => finish());
    sock.on('close', () => finish());
    sock.on('error', (e) => finish(e));
  });
}

/** POST /publish/{topic}; resolves the parsed JSON answer ({id}). Throws on non-200. */
export async function publishHttp(base, topic, data, { event, id, retry, timeout = 5000 } = {}) {
  const u = new URL(`${base}/publish/${topic.split('/').map(encodeURIComponent).join('/')}`);
  if (event !== undefined) u.searchParams.set('event', event);
  if (id !== undefined) u.searchParams.set('id', id);
  if (retry !== undefined) u.searchParams.set('retry', String(retry));
  const res = await fetch(u, { method: 'POST', body: data, signal: AbortSignal.timeout(timeout) });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`POST ${u} -> ${res.status}: ${text}`);
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`POST ${u} answered non-JSON: ${JSON.stringify(text)}`);
  }
}

/** A unique-ish topic name for one test. */
let topicSeq = 0;
export function topicName(prefix = 't') {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${++topicSeq}`;
}

/** GET /metrics: a Map of the unlabelled (process-wide) samples, name -> number. */
export async function metrics(base) {
  const r = await httpGet(`${base}/metrics`, { timeout: 5000 });
  if (r.status !== 200) throw new Error(`GET /metrics -> ${r.status}`);
  const out = new Map();
  for (const line of r.body.split('\n')) {
    if (!line || line.startsWith('#') || line.includes('{')) continue;
    const [name, value] = line.split(' ');
    out.set(name, Number(value));
  }
  return out;
}

// ---------------------------------------------------------------- TLS test PKI

const tempDirs = [];
process.on('exit', () => {
  for (const d of tempDirs) {
    try { fs.rmSync(d, { recursive: true, force: true }); } catch { /* best effort */ }
  }
});

/** A temporary directory removed when the process exits. */
export function tempDir(prefix) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.push(d);
  return d;
}

/**
 * A fresh test CA and leaves (tests/clients/tls-fixture.sh) in a temporary directory:
 * {dir, ca, caPem, localhost: {cert, key}, other: {...}, reloaded: {...}, serials: {LOCALHOST_SERIAL, ...}}.
 */
export function makePki() {
  const dir = tempDir('herald-pki-');
  execFileSync(path.join(HERE, 'tls-fixture.sh'), [dir], { stdio: ['ignore', 'ignore', 'inherit'], timeout: 60000 });
  const pair = (n) => ({ cert: path.join(dir, `${n}.pem`), key: path.join(dir, `${n}.key`) });
  const serials = Object.fromEntries(fs.readFileSync(path.join(dir, 'serials.env'), 'utf8')
    .split('\n').filter(Boolean).map((l) => l.split('=')));
  const ca = path.join(dir, 'ca.pem');
  return { dir, ca, caPem: fs.readFileSync(ca, 'utf8'), localhost: pair('localhost'), other: pair('other'), reloaded: pair('reloaded'), serials };
}

/**
 * A temporary HOME whose NSS database ($HOME/.pki/nssdb, what Chromium on Linux reads)
 * trusts `caFile` as a TLS CA, made with NSS's own certutil. Without a CA: an empty database.
 */
export function makeNssHome(caFile) {
  const home = tempDir('herald-home-');
  const db = path.join(home, '.pki', 'nssdb');
  fs.mkdirSync(db, { recursive: true });
  const certutil = (...a) => execFileSync('certutil', ['-d', `sql:${db}`, ...a], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 30000 });
  certutil('-N', '--empty-password');
  if (caFile) {
    certutil('-A', '-n', 'herald test CA', '-t', 'C,,', '-i', caFile);
    const list = certutil('-L').toString();
    if (!list.includes('herald test CA')) throw new Error(`certutil did not list the CA:\n${list}`);
  }
  return home;
}

// ---------------------------------------------------------------- authentication (JWT)

/**
 * An ES256 token issuer for the authentication tests: a fresh key pair (npm `jose`), its
 * public key written as PEM (SPKI) to `<dir>/es256.pub.pem` for `--auth-keys`.
 * mint({sub, subscribe, publish, lifetime, iat, exp, nbf, jti, claims, key}) resolves
 * {token, exp, iat, jti, sub}; times are unix seconds, `lifetime` counts from `iat`;
 * `exp: null` leaves exp out, `sub: null` leaves sub out.
 */
export async function makeEs256Issuer(dir = tempDir('herald-auth-')) {
  const jose = await import('jose');
  const { publicKey, privateKey } = await jose.generateKeyPair('ES256', { extractable: true });
  const pemPath = path.join(dir, 'es256.pub.pem');
  fs.writeFileSync(pemPath, await jose.exportSPKI(publicKey));
  // A second key herald does not know: tokens it signs must be refused.
  const { privateKey: strangerKey } = await jose.generateKeyPair('ES256');
  let seq = 0;
  const mint = async ({
    sub = '42', subscribe = ['user/{sub}/*'], publish, lifetime = 600, iat, exp, nbf, jti,
    claims = {}, key = privateKey,
  } = {}) => {
    const now = Math.floor(Date.now() / 1000);
    iat = iat ?? now;
    exp = exp === null ? null : (exp ?? iat + lifetime); // exp: null mints a token without exp
    jti = jti ?? `jti-${process.pid}-${Date.now().toString(36)}-${++seq}`;
    const herald = {};
    if (subscribe) herald.subscribe = subscribe;
    if (publish) herald.publish = publish;
    const jwt = new jose.SignJWT({ herald, ...claims })
      .setProtectedHeader({ alg: 'ES256', typ: 'JWT' })
      .setIssuedAt(iat)
      .setJti(jti);
    if (exp !== null) jwt.setExpirationTime(exp);
    if (sub !== null) jwt.setSubject(sub);
    if (nbf !== undefined) jwt.setNotBefore(nbf);
    return { token: await jwt.sign(key), exp, iat, jti, sub };
  };
  /** An unsigned token (`alg: none`) with the same claims: must always be refused. */
  const mintNone = ({ sub = '42', subscribe = ['user/{sub}/*'], lifetime = 600 } = {}) => {
    const now = Math.floor(Date.now() / 1000);
    return new jose.UnsecuredJWT({ herald: { subscribe } }).setSubject(sub)
      .setIssuedAt(now).setExpirationTime(now + lifetime).encode();
  };
  return { pemPath, publicKey, privateKey, strangerKey, mint, mintNone };
}

/**
 * GET `url` with node's fetch and read only the head unless the body ends by itself
 * (a refused request): {status, headers (lower-case names), body}. A 200 event stream is
 * aborted after its head, so the connection never lingers.
 */
export async function fetchHead(url, { headers = {}, timeout = 5000 } = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(new Error(`GET ${url} timed out after ${timeout} ms`)), timeout);
  try {
    const res = await fetch(url, { headers, signal: ctl.signal, cache: 'no-store' });
    const out = { status: res.status, headers: Object.fromEntries(res.headers), body: '' };
    if ((out.headers['content-type'] || '').startsWith('text/event-stream')) {
      ctl.abort();
    } else {
      out.body = await res.text();
    }
    return out;
  } finally {
    clearTimeout(timer);
  }
}
