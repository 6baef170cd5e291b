// PgwsClient against a real stack: channels, errors, a gateway restart, tokens near expiry.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { PgwsClient, PgwsError } from '../pgws.js';
import { Stack, eventually, now, record, sleep, token, unique } from './stack.mjs';

const EVENTS = ['open', 'close', 'reconnecting', 'gap', 'error', 'token', 'message'];

let stack;
before(async () => {
  stack = await Stack.start({ PGWS_DIRECT_CHANNELS: 'raw-direct' });
});
after(async () => {
  await stack?.stop();
});

/** A WebSocket class that remembers the URLs and protocols it was opened with. */
function spyingWebSocket() {
  const opened = [];
  class Spy extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      opened.push({ url: String(url), protocols });
    }
  }
  return { Spy, opened };
}

test('channels: the token stays out of the URL, messages reach their channel handlers', async (t) => {
  const jwt = token({ mode: 'rw', channels: ['chat', 'news'], sub: 'ann' });
  const { Spy, opened } = spyingWebSocket();
  const client = new PgwsClient({ url: stack.url, token: jwt, WebSocket: Spy });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const chat = [];
  const news = [];
  client.channel('chat', (m) => chat.push(m));
  client.channel('news', (m) => news.push(m));
  await eventually('open', () => client.state === 'open');
  assert.equal(opened.length, 1);
  assert.ok(!opened[0].url.includes(jwt), `the token is in the URL ${opened[0].url}`);
  assert.deepEqual(opened[0].protocols, ['pgws', jwt]);

  await stack.notify({ channel: 'news', payload: 'from SQL' });
  await eventually('the news message', () => news.length === 1);
  assert.equal(news[0].payload, 'from SQL');
  assert.equal(news[0].channel, 'news');
  assert.equal(chat.length, 0, 'a news message reached the chat handler');

  // What the socket sends goes to each of its channels, and comes back as envelopes.
  client.send('hello');
  await eventually('the echo on both channels', () => chat.length === 1 && news.length === 2);
  assert.equal(chat[0].payload, 'hello');
  assert.equal(chat[0].event, 'WebsocketMessage');
  assert.equal(chat[0].claims.sub, 'ann');
  assert.equal(seen.of('message').length, 3);
  assert.deepEqual(seen.of('error'), []);
  assert.throws(() => client.send('a\u0000b'), PgwsError);
});

test('a refused message surfaces as an error event and the socket stays', async (t) => {
  const client = new PgwsClient({ url: stack.url, channel: 'chat', token: token({ mode: 'r' }) });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  await eventually('open', () => client.state === 'open');
  client.send('from a read-only socket');
  await eventually('an error', () => seen.of('error').length === 1);
  const err = seen.of('error')[0];
  assert.equal(err.code, 'server');
  assert.match(err.message, /read-only/);
  await stack.notify({ channel: 'chat', payload: 'still here' });
  await eventually('a message after the error', () => seen.of('message').length === 1);
  assert.equal(client.state, 'open');
});

test('direct channels hand over the raw payload', async (t) => {
  const client = new PgwsClient({ url: stack.url, channel: 'raw-direct', token: token({ mode: 'r' }) });
  t.after(() => client.close());
  const got = [];
  client.channel('raw-direct', (m) => got.push(m));
  await eventually('open', () => client.state === 'open');
  await stack.sql(`NOTIFY "raw-direct", 'plain text, no envelope'`);
  await eventually('the raw payload', () => got.length === 1);
  assert.equal(got[0].payload, 'plain text, no envelope');
});

test('a gateway restart: backoff with jitter, a gap signal, and the channels work again', async (t) => {
  const client = new PgwsClient({
    url: stack.url,
    channel: 'restart',
    token: token({ mode: 'rw' }),
    initialDelay: 100,
    maxDelay: 800,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const got = [];
  client.channel('restart', (m) => got.push(m.payload));
  await eventually('open', () => client.state === 'open');

  await stack.killGateway();
  // Failed reconnection attempts add closes of their own (wasOpen false) soon after.
  await eventually('the close', () => seen.of('close').length >= 1);
  assert.equal(seen.of('close')[0].wasOpen, true);
  assert.equal(seen.of('close')[0].reconnecting, true);
  assert.equal(client.state, 'reconnecting');
  assert.throws(() => client.send('while down'), (e) => e.code === 'not_open');
  await sleep(2_500); // several failed attempts
  const attempts = seen.of('reconnecting');
  assert.ok(attempts.length >= 3, `${attempts.length} attempts in 2.5 s`);
  attempts.forEach((a, i) => {
    assert.equal(a.attempt, i + 1);
    assert.ok(a.delay >= 0 && a.delay <= Math.min(800, 100 * 2 ** i), `attempt ${a.attempt}: ${a.delay} ms`);
  });
  assert.ok(new Set(attempts.map((a) => a.delay)).size > 1, 'every delay was the same: no jitter');

  await stack.startGateway();
  await eventually('the reconnection', () => seen.of('open').length === 2, 5_000);
  assert.deepEqual(seen.of('open')[1], { reconnected: true });
  assert.deepEqual(seen.of('gap'), [{ reason: 'reconnect' }]);
  client.send('after the restart');
  await eventually('the echo', () => got.includes('after the restart'));
});

test("the server's gap signals reach the application; the socket stays", async (t) => {
  const client = new PgwsClient({ url: stack.url, channel: 'gaps', token: token({ mode: 'r', gaps: true }) });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const got = [];
  client.channel('gaps', (m) => got.push(m.payload));
  await eventually('open', () => client.state === 'open');
  // A new bridge LISTENs again: notifications sent meanwhile were lost, the socket is told.
  await stack.killBridge();
  await stack.startBridge();
  await eventually('the gap signal', () => seen.of('gap').length >= 1, 15_000);
  assert.equal(seen.of('gap')[0].reason, 'listener');
  assert.deepEqual(seen.of('close'), []);
  assert.deepEqual(seen.of('message'), [], 'the gap signal was handed over as a message');
  await stack.notify({ channel: 'gaps', payload: 'after the gap' });
  await eventually('a message after the gap', () => got.length === 1);
});

test('a token near expiry is refreshed in-band: the socket never closes', async (t) => {
  const sub = unique('refresh-');
  const asked = [];
  const mint = (ttl) => token({ mode: 'rw', channels: ['fresh'], sub, refresh: true, exp: now() + ttl });
  const client = new PgwsClient({
    url: stack.url,
    channel: 'fresh',
    getToken: ({ reason }) => {
      asked.push(reason);
      return mint(reason === 'connect' ? 4 : 60);
    },
    refreshBefore: 2,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const got = [];
  client.channel('fresh', (m) => got.push(m.payload));
  await eventually('open', () => client.state === 'open');
  await eventually('the refresh', () => seen.of('token').length === 1, 6_000);
  assert.equal(seen.of('token')[0].inBand, true);
  assert.deepEqual(asked, ['connect', 'refresh']);
  await sleep(3_500); // past the first token's exp
  assert.deepEqual(seen.of('close'), [], 'the socket closed');
  client.send('after the first token expired');
  await eventually('the echo', () => got.length === 1);
});

test('without the refresh claim the client reconnects with the new token before expiry', async (t) => {
  const mint = (ttl) => token({ mode: 'rw', channels: ['plain'], exp: now() + ttl });
  const client = new PgwsClient({
    url: stack.url,
    channel: 'plain',
    getToken: ({ reason }) => mint(reason === 'connect' ? 4 : 60),
    refreshBefore: 2,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  await eventually('open', () => client.state === 'open');
  await eventually('the second open', () => seen.of('open').length === 2, 6_000);
  assert.deepEqual(seen.of('token').map((e) => e.inBand), [false]);
  assert.deepEqual(seen.of('close').map((c) => c.code), [1000], 'closed otherwise than for the refresh');
  await sleep(3_000);
  assert.equal(seen.of('close').length, 1, 'the socket closed again (3001?)');
  assert.equal(client.state, 'open');
});

test('a refused in-band refresh is reported, and a reconnection with the token follows', async (t) => {
  let first = true;
  const client = new PgwsClient({
    url: stack.url,
    channel: 'chat',
    getToken: () => {
      const claims = { mode: 'rw', channels: ['chat'], refresh: true, exp: now() + (first ? 4 : 60) };
      // The second token names someone else: the server refuses it in-band.
      if (!first) claims.sub = 'someone-else';
      first = false;
      return token(claims);
    },
    refreshBefore: 2,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  await eventually('the reconnection', () => seen.of('open').length === 2, 8_000);
  const errors = seen.of('error');
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 'refresh');
  assert.match(errors[0].message, /claims/);
  assert.deepEqual(seen.of('token').map((e) => e.inBand), [false]);
});

test('a fixed token that expires: close 3001, an error, no reconnection', async (t) => {
  const client = new PgwsClient({ url: stack.url, channel: 'chat', token: token({ mode: 'r', exp: now() + 2 }) });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  await eventually('open', () => client.state === 'open');
  await eventually('the close', () => seen.of('close').length === 1, 5_000);
  assert.equal(seen.of('close')[0].code, 3001);
  assert.equal(seen.of('close')[0].reconnecting, false);
  assert.equal(seen.of('error')[0].code, 'token_expired');
  assert.equal(client.state, 'closed');
  await sleep(1_000);
  assert.equal(seen.of('reconnecting').length, 0);
});

test('resume: what was notified while the gateway was down comes back, once each, in order, with no gap', async (t) => {
  const channel = unique('resume-');
  const client = new PgwsClient({
    url: stack.url,
    channel,
    token: token({ mode: 'r' }),
    resume: true,
    initialDelay: 100,
    maxDelay: 400,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const got = [];
  client.channel(channel, (m) => got.push(m.payload));
  await eventually('open', () => client.state === 'open');
  await stack.notify({ channel, payload: 'before' });
  await eventually('the first message', () => got.length === 1);
  assert.match(client.position, /^[0-9a-f]+-[0-9a-f]{12,}$/);

  await stack.killGateway();
  await eventually('the close', () => seen.of('close').length >= 1);
  for (let i = 0; i < 5; i += 1) {
    await stack.notify({ channel, payload: `missed ${i}` });
  }
  await stack.startGateway();
  await eventually('the reconnection', () => seen.of('open').length === 2, 10_000);
  await stack.notify({ channel, payload: 'after' });
  await eventually('every message', () => got.length === 7);
  assert.deepEqual(got, ['before', 'missed 0', 'missed 1', 'missed 2', 'missed 3', 'missed 4', 'after']);
  assert.deepEqual(seen.of('gap'), [], 'nothing was missed: no gap');
});
