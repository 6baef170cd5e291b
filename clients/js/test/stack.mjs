// A real pgws stack for the client's tests: the built ws-gateway and pg-bridge binaries against
// a real PostgreSQL and NATS, on a NATS prefix and listen channel of their own, so several
// stacks share the servers without meeting. The PostgreSQL is PGWS_TEST_DB_URI's (scripts/test.sh
// runs a cluster of its own and sets it; without it, the machine's on 127.0.0.1:5432), the NATS
// the machine's (scripts/ensure-services.sh --nats starts it).
//
// Env: PGWS_BIN_DIR (default $CARGO_TARGET_DIR/debug, CARGO_TARGET_DIR defaulting to
// /var/tmp/pgws-target as in scripts/test.sh), PGWS_TEST_DB_URI, PGWS_TEST_NATS_URL.

import { spawn, execFile } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';

export const SECRET = 'reallyreallyreallyreallyverysafe';
const DB_URI = process.env.PGWS_TEST_DB_URI ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const NATS_URL = process.env.PGWS_TEST_NATS_URL ?? 'nats://127.0.0.1:4222';
const BIN_DIR =
  process.env.PGWS_BIN_DIR ??
  path.join(process.env.CARGO_TARGET_DIR ?? '/var/tmp/pgws-target', 'debug');

const b64url = (value) => Buffer.from(value).toString('base64url');

/** An HS256 token for `claims`, signed with the stacks' secret. */
export function token(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

export const now = () => Math.floor(Date.now() / 1000);
export const unique = (prefix) => `${prefix}${randomBytes(4).toString('hex')}`;
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves once `check()` is truthy (polled), or rejects after `ms` with `what`. */
export async function eventually(what, check, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** Every event of `types` a client emits, in order, with the time it came;
 * `seen.of(type)` lists the values of one type. */
export function record(client, types) {
  const seen = [];
  for (const type of types) {
    client.on(type, (value) => seen.push({ type, value, at: Date.now() }));
  }
  seen.of = (type) => seen.filter((e) => e.type === type).map((e) => e.value);
  return seen;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

class Service {
  constructor(name, env) {
    this.name = name;
    this.env = env;
    this.log = '';
  }

  async start() {
    const bin = path.join(BIN_DIR, this.name);
    if (!existsSync(bin)) throw new Error(`${bin} is missing: run cargo build --workspace first`);
    this.child = spawn(bin, [], { env: { ...process.env, ...this.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (chunk) => {
      this.log = (this.log + chunk).slice(-20_000);
    };
    this.child.stdout.on('data', keep);
    this.child.stderr.on('data', keep);
    this.exited = new Promise((resolve) => this.child.on('exit', resolve));
    const ready = `http://127.0.0.1:${this.env.PGWS_ADMIN_PORT}/readyz`;
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (this.child.exitCode !== null) throw new Error(`${this.name} exited:\n${this.log}`);
      try {
        if ((await fetch(ready)).status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`${this.name} not ready in 30 s:\n${this.log}`);
      await sleep(50);
    }
  }

  async stop(signal = 'SIGTERM') {
    if (!this.child || this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill(signal);
    await this.exited;
  }
}

/** A gateway and a bridge; `extra` settings go to both. */
export class Stack {
  static async start(extra = {}) {
    const stack = new Stack();
    const prefix = unique('jsclient');
    stack.listenChannel = unique('listen-');
    stack.base = {
      PGWS_DB_URI: DB_URI,
      PGWS_JWT_SECRET: SECRET,
      PGWS_NATS_URL: NATS_URL,
      PGWS_NATS_PREFIX: prefix,
      PGWS_LISTEN_CHANNEL: stack.listenChannel,
      PGWS_HOST: '127.0.0.1',
      PGWS_POOL_SIZE: '2',
      PGWS_RETRIES: '2',
      PGWS_CHECK_LISTENER_INTERVAL: '500',
      PGWS_AUDIT: 'false',
      // JetStream reserves a stream's byte limit up front: test stacks keep it small.
      PGWS_HISTORY_MAX_BYTES: String(16 << 20),
      PGWS_LOG: 'warn',
      ...extra,
    };
    stack.port = await freePort();
    stack.bridgeEnv = { ...stack.base, PGWS_ADMIN_PORT: String(await freePort()) };
    await stack.startBridge();
    stack.gatewayEnv = {
      ...stack.base,
      PGWS_PORT: String(stack.port),
      PGWS_ADMIN_PORT: String(await freePort()),
    };
    await stack.startGateway();
    return stack;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}`;
  }

  async startGateway() {
    this.gateway = new Service('ws-gateway', this.gatewayEnv);
    await this.gateway.start();
  }

  async startBridge() {
    this.bridge = new Service('pg-bridge', this.bridgeEnv);
    await this.bridge.start();
  }

  /** Kills the bridge: its LISTEN connection goes with it. */
  async killBridge() {
    await this.bridge.stop('SIGKILL');
  }

  /** Kills the gateway (no close frames: the sockets just drop). */
  async killGateway() {
    await this.gateway.stop('SIGKILL');
  }

  /** Runs SQL with psql against the stacks' database; resolves with its output. */
  static async sqlOnly(statement) {
    const { stdout } = await promisify(execFile)('psql', [DB_URI, '-XAtq', '-v', 'ON_ERROR_STOP=1', '-c', statement]);
    return stdout;
  }

  sql(statement) {
    return Stack.sqlOnly(statement);
  }

  /** NOTIFYs `payload` (an object, sent as JSON) on the stack's listen channel. */
  notify(payload) {
    const text = JSON.stringify(payload).replace(/'/g, "''");
    return this.sql(`SELECT pg_notify('${this.listenChannel}', '${text}')`);
  }

  async stop() {
    await this.gateway?.stop();
    await this.bridge?.stop();
  }
}
