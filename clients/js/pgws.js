// pgws client: one ES module, no build step, no dependencies (browsers, Node 22+, or Node 20
// with --experimental-websocket, or any WebSocket class passed as `options.WebSocket`).
//
//   PgwsClient    postgres-websockets (and postgrest-ws direct) channels
//   LiveClient    the `/live` API: topics and table topics, methods as promises
//   PubSubClient  wspubsub's API-key topics (a publisher, or a subscriber)
//
// The first two keep the token out of the URL (it travels in `Sec-WebSocket-Protocol`), reconnect with
// exponential backoff and full jitter, ask `getToken` for a new token before the current one
// expires (in-band when the server allows it, by reconnecting otherwise), and tell the
// application what it may have missed (`gap` events) and what went wrong (`error` events).
// Types: pgws.d.ts. Guide: README.md next to this file.

const DEFAULTS = {
  // Backoff between connection attempts: min(maxDelay, initialDelay * factor^n), then a
  // uniformly random delay in [0, that] ("full jitter": clients that lost the same gateway do
  // not come back at the same instant).
  initialDelay: 500,
  maxDelay: 30_000,
  factor: 2,
  // Seconds before a token's `exp` at which `getToken` is asked for the next one (at most
  // half the token's remaining lifetime).
  refreshBefore: 30,
  // `/live` requests not answered within this many ms are rejected.
  requestTimeout: 10_000,
};

// Close codes the gateway uses (README "Connecting", docs/security.md).
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008, // slow consumer, rate limit, send budget
  TOO_BIG: 1009,
  TOKEN_EXPIRED: 3001,
});

/** An error the client reports through `error` events or rejected promises. */
export class PgwsError extends Error {
  constructor(code, message, detail) {
    super(message);
    this.name = 'PgwsError';
    this.code = code;
    if (detail !== undefined) this.detail = detail;
  }
}

/** The claims of a JWT, without verifying it (the server does); null when unreadable. */
export function decodeClaims(token) {
  try {
    const part = String(token).split('.')[1];
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/** Calls each handler with `value`; one that throws stops neither the others nor the socket
 * (its error is thrown again on its own, where the console shows it). */
function callEach(handlers, value) {
  for (const handler of [...(handlers ?? [])]) {
    try {
      handler(value);
    } catch (err) {
      setTimeout(() => {
        throw err;
      });
    }
  }
}

class Emitter {
  #handlers = new Map();

  /** Adds a handler; returns a function that removes it. */
  on(type, handler) {
    if (typeof handler !== 'function') throw new TypeError('handler must be a function');
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    this.#handlers.get(type)?.delete(handler);
  }

  emit(type, value) {
    const set = this.#handlers.get(type);
    if (!set || set.size === 0) {
      // An error nobody listens to is still worth a line in the console.
      if (type === 'error') console.warn('pgws:', value?.message ?? value);
      return;
    }
    callEach(set, value);
  }
}

// Timers longer than this overflow setTimeout (24.8 days).
const MAX_TIMER = 2 ** 31 - 1;

/**
 * The connection both clients share: a socket that comes back, a token that is renewed.
 * Subclasses give the path (`path()`) and read frames (`frame(data)`), and may refresh a
 * token in-band (`refreshInBand(token)`, resolving true when the server took it).
 */
class Connection extends Emitter {
  #ws = null;
  #attempt = 0;
  #timer = null;
  #refreshTimer = null;
  #closed = false;
  #token = null;
  #opened = false; // opened at least once: a later open is a reconnection
  #generation = 0;

  constructor(options) {
    super();
    if (!options || typeof options.url !== 'string') {
      throw new TypeError('options.url is required (e.g. "ws://localhost:3000")');
    }
    if (this.usesTokens() && options.token === undefined && typeof options.getToken !== 'function') {
      throw new TypeError('options.token or options.getToken is required');
    }
    this.options = { ...DEFAULTS, ...options };
    this.url = options.url.replace(/\/+$/, '');
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError(
        'no WebSocket class: pass options.WebSocket (Node 20: run with --experimental-websocket)',
      );
    }
    if (options.connect !== false) queueMicrotask(() => this.connect());
  }

  /** `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    if (this.#closed) return 'closed';
    if (this.#ws && this.#ws.readyState === 1) return 'open';
    return this.#opened ? 'reconnecting' : 'connecting';
  }

  /** The claims of the token in use (not verified here), or null. */
  get claims() {
    return this.#token ? decodeClaims(this.#token) : null;
  }

  /** Opens the socket (done by the constructor unless `connect: false`). */
  connect() {
    if (this.#ws || this.#timer) return;
    this.#closed = false;
    this.#open('connect');
  }

  /** Closes the socket for good: no reconnection, pending work is rejected. */
  close(code = CloseCode.NORMAL, reason = '') {
    this.#closed = true;
    clearTimeout(this.#timer);
    clearTimeout(this.#refreshTimer);
    this.#timer = this.#refreshTimer = null;
    const ws = this.#ws;
    this.#ws = null;
    this.#generation++;
    this.stopped(new PgwsError('closed', 'the client was closed'));
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
      this.emit('close', { code, reason, wasOpen: true, reconnecting: false });
    }
  }

  /** Sends a frame; throws when the socket is not open. */
  sendRaw(data) {
    if (!this.#ws || this.#ws.readyState !== 1) {
      throw new PgwsError('not_open', `cannot send while ${this.state}`);
    }
    this.#ws.send(data);
  }

  // Hooks for subclasses.
  usesTokens() {
    return true;
  }
  path() {
    return '/';
  }
  frame(_data) {}
  opened(_reconnected) {}

  /** Whether the server gives back what a reconnection missed (no `reconnect` gap then). */
  resumes() {
    return false;
  }
  stopped(_error) {}
  async refreshInBand(_token) {
    return false;
  }

  async #nextToken(reason) {
    if (!this.usesTokens()) return null;
    if (typeof this.options.getToken === 'function') {
      const token = await this.options.getToken({ reason, claims: this.claims });
      if (typeof token !== 'string' || token === '') {
        throw new PgwsError('token', 'getToken returned no token');
      }
      return token;
    }
    return this.options.token;
  }

  async #open(reason, given) {
    const generation = ++this.#generation;
    let token = given;
    try {
      if (token === undefined) token = await this.#nextToken(reason);
    } catch (err) {
      if (generation !== this.#generation || this.#closed) return;
      this.emit('error', err instanceof PgwsError ? err : new PgwsError('token', String(err?.message ?? err)));
      this.#retry();
      return;
    }
    if (generation !== this.#generation || this.#closed) return;
    const exp = decodeClaims(token)?.exp;
    if (typeof exp === 'number' && exp * 1000 <= Date.now() && typeof this.options.getToken !== 'function') {
      this.#stop(new PgwsError('token_expired', 'the token has expired and no getToken was given'));
      return;
    }
    this.#token = token;
    let ws;
    try {
      ws = token === null
        ? new this.WebSocket(this.url + this.path())
        : new this.WebSocket(this.url + this.path(), ['pgws', token]);
      ws.binaryType = 'arraybuffer';
    } catch (err) {
      this.#stop(new PgwsError('url', `cannot open ${this.url + this.path()}: ${err?.message ?? err}`));
      return;
    }
    this.#ws = ws;
    let wasOpen = false;
    ws.onopen = () => {
      if (this.#ws !== ws) return;
      wasOpen = true;
      const reconnected = this.#opened;
      this.#opened = true;
      this.#attempt = 0;
      this.emit('open', { reconnected });
      // A resuming socket is told by the server when something could not be given back.
      if (reconnected && !this.resumes()) this.emit('gap', { reason: 'reconnect' });
      this.#scheduleRefresh();
      this.opened(reconnected);
    };
    ws.onmessage = (event) => {
      if (this.#ws !== ws) return;
      this.frame(event.data);
    };
    const closed = (code, reason) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      clearTimeout(this.#refreshTimer);
      this.#refreshTimer = null;
      this.#closedBy(code, reason, wasOpen);
    };
    ws.onclose = (event) => closed(event.code, event.reason || '');
    ws.onerror = () => {
      // A close event says more and normally follows; some implementations (Node 20's) fire
      // none when the connection could not be made, so the error stands for it after a while.
      setTimeout(() => closed(1006, ''), wasOpen ? 1_000 : 0);
    };
  }

  #closedBy(code, reason, wasOpen) {
    this.stopped(new PgwsError('disconnected', `the socket closed (${code}${reason ? ` ${reason}` : ''})`));
    if (this.#closed) return;
    if (code === CloseCode.TOKEN_EXPIRED && typeof this.options.getToken !== 'function') {
      this.emit('close', { code, reason, wasOpen, reconnecting: false });
      this.#stop(new PgwsError('token_expired', 'the token expired and no getToken was given'));
      return;
    }
    this.emit('close', { code, reason, wasOpen, reconnecting: true });
    if (code === CloseCode.TOKEN_EXPIRED) {
      // Not a failure of the server: come back at once with a new token.
      this.#open('expired');
      return;
    }
    this.#retry();
  }

  #retry() {
    if (this.#closed) return;
    const { initialDelay, maxDelay, factor, maxAttempts } = this.options;
    this.#attempt++;
    if (typeof maxAttempts === 'number' && this.#attempt > maxAttempts) {
      this.#stop(new PgwsError('gave_up', `no connection after ${maxAttempts} attempts`));
      return;
    }
    const ceiling = Math.min(maxDelay, initialDelay * factor ** (this.#attempt - 1));
    const delay = Math.round(Math.random() * ceiling);
    this.emit('reconnecting', { attempt: this.#attempt, delay });
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#open('reconnect');
    }, delay);
  }

  #stop(error) {
    this.#closed = true;
    this.stopped(error);
    this.emit('error', error);
  }

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    const exp = decodeClaims(this.#token)?.exp;
    if (typeof exp !== 'number' || typeof this.options.getToken !== 'function') return;
    const left = exp * 1000 - Date.now();
    const ahead = Math.min(this.options.refreshBefore * 1000, left / 2);
    const delay = Math.max(1_000, Math.min(left - ahead, MAX_TIMER));
    this.#refreshTimer = setTimeout(() => this.#refresh(), delay);
  }

  async #refresh() {
    this.#refreshTimer = null;
    const ws = this.#ws;
    if (!ws || this.#closed) return;
    let token;
    try {
      token = await this.#nextToken('refresh');
    } catch (err) {
      this.emit('error', err instanceof PgwsError ? err : new PgwsError('token', String(err?.message ?? err)));
      // Try again a little later; the socket closes with 3001 if nothing works before exp.
      this.#refreshTimer = setTimeout(() => this.#refresh(), 5_000);
      return;
    }
    if (this.#ws !== ws) return;
    let taken = false;
    try {
      taken = await this.refreshInBand(token);
    } catch (err) {
      this.emit('error', err instanceof PgwsError ? err : new PgwsError('refresh', String(err?.message ?? err)));
    }
    if (this.#ws !== ws) return;
    if (taken) {
      this.#token = token;
      this.emit('token', { expiresAt: decodeClaims(token)?.exp ?? null, inBand: true });
      this.#scheduleRefresh();
      return;
    }
    // No in-band refresh: reconnect with the new token now, before the old one expires.
    this.#ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    ws.close(CloseCode.NORMAL, 'token refresh');
    this.stopped(new PgwsError('disconnected', 'reconnecting with a new token'));
    this.emit('close', { code: CloseCode.NORMAL, reason: 'token refresh', wasOpen: true, reconnecting: true });
    this.emit('token', { expiresAt: decodeClaims(token)?.exp ?? null, inBand: false });
    this.#open('refresh', token);
  }
}

/**
 * A postgres-websockets socket: `channel` names one channel, or none for every channel of the
 * token. Messages are the server's JSON envelopes (or, on postgrest-ws direct channels, the
 * raw payloads).
 */
export class PgwsClient extends Connection {
  #channels = new Map(); // channel -> Set of handlers
  #refreshing = null; // {resolve, reject, timer}
  #position = ''; // the last position received (resume: true)

  path() {
    const channel = this.options.channel;
    const path = channel ? `/${encodeURIComponent(channel)}` : '/';
    return this.resumes() ? `${path}?resume=${encodeURIComponent(this.#position)}` : path;
  }

  resumes() {
    return this.options.resume === true;
  }

  /** With `resume: true`: the position of the last message received (`''` before the first). */
  get position() {
    return this.#position;
  }

  /** Handlers for one channel's messages; returns a function that removes the handler. */
  channel(name, handler) {
    if (!this.#channels.has(name)) this.#channels.set(name, new Set());
    this.#channels.get(name).add(handler);
    return () => this.#channels.get(name)?.delete(handler);
  }

  /** Sends a message to the socket's channels (each becomes a NOTIFY). */
  send(payload) {
    if (typeof payload !== 'string') throw new TypeError('payload must be a string');
    if (payload.includes('\u0000')) {
      throw new PgwsError('invalid', 'a message cannot hold a NUL character (PostgreSQL text cannot)');
    }
    this.sendRaw(payload);
  }

  frame(data) {
    let parsed = null;
    if (typeof data === 'string') {
      try {
        parsed = JSON.parse(data);
      } catch {
        // not JSON: a raw payload (postgrest-ws direct channel)
      }
    }
    let isObject = parsed && typeof parsed === 'object' && !Array.isArray(parsed);
    if (isObject && this.resumes() && typeof parsed.position === 'string' && 'message' in parsed) {
      // {"position":..., "message":...}: a postgres-websockets notification as its JSON value,
      // a direct channel's payload as a string.
      this.#position = parsed.position;
      const inner = parsed.message;
      data = typeof inner === 'string' ? inner : JSON.stringify(inner);
      parsed = inner;
      if (typeof parsed === 'string') {
        try {
          parsed = JSON.parse(parsed);
        } catch {
          // a raw payload
        }
      }
      isObject = parsed && typeof parsed === 'object' && !Array.isArray(parsed);
      this.#message(parsed, isObject, data);
      return;
    }
    if (isObject && parsed.event === 'Gap' && typeof parsed.reason === 'string' && !('channel' in parsed)) {
      this.emit('gap', { reason: parsed.reason });
      return;
    }
    if (isObject && parsed.event === 'TokenRefreshed' && !('channel' in parsed)) {
      this.#settleRefresh(true, parsed);
      return;
    }
    if (isObject && parsed.event === 'Error' && typeof parsed.error === 'string' && !('channel' in parsed)) {
      if (parsed.request === 'refresh') {
        this.#settleRefresh(false, parsed);
        return;
      }
      this.emit('error', new PgwsError('server', parsed.error, parsed));
      return;
    }
    this.#message(parsed, isObject, data);
  }

  #message(parsed, isObject, data) {
    const routed = isObject && typeof parsed.channel === 'string';
    const message = {
      channel: routed ? parsed.channel : this.options.channel ?? null,
      event: isObject && typeof parsed.event === 'string' ? parsed.event : null,
      payload: routed && 'payload' in parsed ? parsed.payload : isObject ? parsed : data,
      claims: isObject && parsed.claims && typeof parsed.claims === 'object' ? parsed.claims : null,
      data,
    };
    this.emit('message', message);
    callEach(this.#channels.get(message.channel), message);
  }

  refreshInBand(token) {
    if (this.claims?.refresh !== true) return Promise.resolve(false);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#refreshing = null;
        reject(new PgwsError('refresh', 'the server did not answer the token refresh'));
      }, this.options.requestTimeout);
      this.#refreshing = { resolve, reject, timer };
      try {
        this.sendRaw(`\u0000refresh ${token}`);
      } catch (err) {
        clearTimeout(timer);
        this.#refreshing = null;
        reject(err);
      }
    });
  }

  #settleRefresh(ok, frame) {
    const pending = this.#refreshing;
    if (!pending) return;
    this.#refreshing = null;
    clearTimeout(pending.timer);
    if (ok) {
      pending.resolve(true);
    } else {
      pending.reject(new PgwsError('refresh', frame.error, frame));
    }
  }

  stopped(error) {
    this.#settleRefresh(false, { error: error.message });
  }
}

/** A `/live` request the server refused (`ok: false`). */
export class LiveError extends PgwsError {
  constructor(method, message, response) {
    super('refused', message, response);
    this.name = 'LiveError';
    this.method = method;
  }
}

/**
 * The `/live` API: every method is a promise of the reply's `data` (rejected with a
 * `LiveError` carrying the server's reason). Subscriptions survive reconnections: the client
 * subscribes again, from the position of the last event of each topic when the server gives
 * positions (a server keeping a history), so missed events are replayed; it emits `gap`
 * (with the topic) only for what could not be given back.
 */
export class LiveClient extends Connection {
  #nextId = 1;
  #pending = new Map(); // id -> {method, resolve, reject, timer}
  #waiting = []; // requests made before the socket opened
  #topics = new Map(); // topic -> Set of handlers (subscribed topics)
  #positions = new Map(); // topic -> the position of its last event

  resumes() {
    return this.#positions.size > 0;
  }

  /** The position of `topic`'s last event (a server keeping a history), if any came. */
  position(topic) {
    return this.#positions.get(topic);
  }

  path() {
    return '/live';
  }

  /** Sends any method; resolves with the reply's `data`. */
  request(method, attributes = {}) {
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        this.#waiting = this.#waiting.filter((w) => w.id !== id);
        reject(new PgwsError('timeout', `${method}: no reply within ${this.options.requestTimeout} ms`));
      }, this.options.requestTimeout);
      const entry = { id, method, attributes, resolve, reject, timer };
      if (this.state === 'open') this.#send(entry);
      else if (this.state === 'closed') {
        clearTimeout(timer);
        reject(new PgwsError('closed', `${method}: the client is closed`));
      } else this.#waiting.push(entry);
    });
  }

  #send(entry) {
    this.#pending.set(entry.id, entry);
    try {
      this.sendRaw(JSON.stringify({ id: entry.id, method: entry.method, attributes: entry.attributes }));
    } catch (err) {
      this.#pending.delete(entry.id);
      clearTimeout(entry.timer);
      entry.reject(err);
    }
  }

  /** Subscribes to a topic (or table topic); `handler` gets its events. */
  async subscribe(topic, handler) {
    if (handler) this.topic(topic, handler);
    else if (!this.#topics.has(topic)) this.#topics.set(topic, new Set());
    try {
      return await this.request('subscribe', { topicName: topic });
    } catch (err) {
      if (err instanceof LiveError) this.#topics.delete(topic);
      throw err;
    }
  }

  /** Stops a topic's events and forgets its handlers. */
  unsubscribe(topic) {
    this.#topics.delete(topic);
    this.#positions.delete(topic);
    return this.request('unsubscribe', { topicName: topic });
  }

  /** Adds a handler for a topic's events (without subscribing); returns its remover. */
  topic(name, handler) {
    if (!this.#topics.has(name)) this.#topics.set(name, new Set());
    this.#topics.get(name).add(handler);
    return () => this.#topics.get(name)?.delete(handler);
  }

  publish(topic, message) {
    return this.request('new-message', { topicName: topic, message });
  }
  createTopic(name, { public: open = false } = {}) {
    return this.request('create-topic', open ? { name, public: true } : { name });
  }
  destroyTopic(name) {
    return this.request('destroy-topic', { name });
  }
  listTopics() {
    return this.request('list-topic').then((data) => data.topics);
  }
  getTopic(name) {
    return this.request('get-topic', { topicName: name });
  }
  ping() {
    return this.request('ping');
  }

  async refreshInBand(token) {
    await this.request('refresh', { token });
    return true;
  }

  opened(reconnected) {
    const waiting = this.#waiting;
    this.#waiting = [];
    if (reconnected) {
      const resuming = this.resumes();
      for (const topic of this.#topics.keys()) {
        const since = this.#positions.get(topic);
        const attributes = since ? { topicName: topic, since } : { topicName: topic };
        this.request('subscribe', attributes).then(
          (data) => {
            // Without positions the connection said `reconnect` once, for every topic.
            if (resuming && data?.recovered !== true) {
              this.emit('gap', { reason: since ? 'history' : 'reconnect', topic });
            }
          },
          (err) => this.emit('error', new PgwsError('resubscribe', `${topic}: ${err.message}`, err)),
        );
      }
    }
    for (const entry of waiting) this.#send(entry);
  }

  stopped(error) {
    for (const entry of this.#pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(new PgwsError(error.code, `${entry.method}: ${error.message}`));
    }
    this.#pending.clear();
    // Requests still waiting for a socket wait on, unless none will come.
    if (this.state === 'closed') {
      for (const entry of this.#waiting) {
        clearTimeout(entry.timer);
        entry.reject(new PgwsError(error.code, `${entry.method}: ${error.message}`));
      }
      this.#waiting = [];
    }
  }

  frame(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.emit('error', new PgwsError('protocol', 'the server sent a frame that is not JSON', data));
      return;
    }
    if (msg?.type === 'response') {
      const entry = this.#pending.get(msg.id);
      if (!entry) return;
      this.#pending.delete(msg.id);
      clearTimeout(entry.timer);
      if (msg.ok) entry.resolve(msg.data);
      else entry.reject(new LiveError(entry.method, `${entry.method}: ${msg.error}`, msg));
      return;
    }
    if (msg?.type === 'event') {
      if (typeof msg.position === 'string' && this.#topics.has(msg.topic)) {
        this.#positions.set(msg.topic, msg.position);
      }
      this.emit('event', msg);
      callEach(this.#topics.get(msg.topic), msg);
      return;
    }
    this.emit('error', new PgwsError('protocol', 'unexpected frame from the server', msg));
  }
}

/**
 * wspubsub's API-key topics: with `key`, the topic's publisher (`send` text or binary); without,
 * a subscriber (`message` events with the frames, text as strings and binary as ArrayBuffers).
 * The key is part of wspubsub's URL. A subscriber whose topic has no publisher (refused with
 * 404, or closed with 4004 when its publisher left) keeps retrying with backoff, so it is back
 * when a publisher is; a second publisher (409) does the same until the topic is free.
 */
export class PubSubClient extends Connection {
  constructor(options) {
    for (const name of ['domain', 'topic']) {
      if (typeof options?.[name] !== 'string' || options[name] === '') {
        throw new TypeError(`options.${name} is required`);
      }
    }
    super(options);
  }

  usesTokens() {
    return false;
  }

  /** True for a publisher (an API key was given). */
  get publisher() {
    return typeof this.options.key === 'string';
  }

  path() {
    const e = encodeURIComponent;
    const { key, domain, topic } = this.options;
    return this.publisher ? `/ws/pub/${e(key)}/${e(domain)}/${e(topic)}` : `/ws/sub/${e(domain)}/${e(topic)}`;
  }

  /** Publishes a frame (publishers only): a string, an ArrayBuffer or a typed array. */
  send(data) {
    if (!this.publisher) throw new PgwsError('invalid', 'a subscriber cannot publish (give options.key)');
    this.sendRaw(data);
  }

  frame(data) {
    this.emit('message', { data });
  }
}
