// LiveClient against a real stack: methods as promises, topic handlers, refusals, a gateway
// restart (subscriptions come back), and an in-band refresh.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { LiveClient, LiveError } from '../pgws.js';
import { Stack, eventually, now, record, sleep, token, unique } from './stack.mjs';

const EVENTS = ['open', 'close', 'reconnecting', 'gap', 'error', 'token', 'event'];

let stack;
before(async () => {
  stack = await Stack.start();
});
after(async () => {
  await stack?.stop();
});

test('methods are promises; events reach the topic handlers; refusals reject', async (t) => {
  const sub = unique('ann-');
  // Requests made before the socket opened wait for it.
  const client = new LiveClient({ url: stack.url, token: token({ sub }) });
  t.after(() => client.close());
  const topic = unique('room-');
  const created = await client.createTopic(topic);
  assert.equal(created.name, topic);
  assert.equal(created.owner, sub);
  const events = [];
  await client.subscribe(topic, (e) => events.push(e));
  const reply = await client.publish(topic, { text: 'Hello!' });
  assert.deepEqual(reply, { topic });
  await eventually('the event', () => events.length === 1);
  assert.equal(events[0].event, 'new-message');
  assert.equal(events[0].source, sub);
  assert.deepEqual(events[0].data, { text: 'Hello!' });
  assert.ok((await client.listTopics()).includes(topic));
  assert.equal((await client.getTopic(topic)).subscribers, 1);
  await client.ping();

  await assert.rejects(client.subscribe(unique('absent-')), (err) => {
    assert.ok(err instanceof LiveError);
    assert.equal(err.method, 'subscribe');
    assert.match(err.message, /subscribe: /);
    return true;
  });
  await assert.rejects(client.request('no-such-method'), LiveError);

  // Another socket's view: the topic is private.
  const other = new LiveClient({ url: stack.url, token: token({ sub: unique('bob-') }) });
  t.after(() => other.close());
  await assert.rejects(other.subscribe(topic), LiveError);
  await client.destroyTopic(topic);
});

test('a gateway restart: requests made meanwhile wait, subscriptions come back, a gap is signalled', async (t) => {
  const sub = unique('carl-');
  const client = new LiveClient({ url: stack.url, token: token({ sub }), initialDelay: 100, maxDelay: 500 });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const topic = unique('room-');
  await client.createTopic(topic);
  const events = [];
  await client.subscribe(topic, (e) => events.push(e.data));

  await stack.killGateway();
  // Failed reconnection attempts add closes of their own (wasOpen false) soon after.
  await eventually('the close', () => seen.of('close').length >= 1);
  assert.equal(seen.of('close')[0].wasOpen, true);
  // A request made while the gateway is down waits for the reconnection.
  const queued = client.ping();
  await sleep(1_000);
  await stack.startGateway();
  await queued;
  await eventually('the gap', () => seen.of('gap').length === 1, 5_000);
  assert.deepEqual(seen.of('gap'), [{ reason: 'reconnect' }]);
  // The client subscribed again: a message published by another socket arrives.
  const publisher = new LiveClient({ url: stack.url, token: token({ sub }) });
  t.after(() => publisher.close());
  await publisher.publish(topic, 'after the restart');
  await eventually('the event after the restart', () => events.includes('after the restart'), 5_000);
  assert.deepEqual(seen.of('error'), []);
});

test('a token near expiry is refreshed with the refresh method: the socket never closes', async (t) => {
  const sub = unique('dora-');
  const asked = [];
  const client = new LiveClient({
    url: stack.url,
    getToken: ({ reason }) => {
      asked.push(reason);
      return token({ sub, exp: now() + (reason === 'connect' ? 4 : 60) });
    },
    refreshBefore: 2,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  await client.ping();
  await eventually('the refresh', () => seen.of('token').length === 1, 6_000);
  assert.equal(seen.of('token')[0].inBand, true);
  assert.deepEqual(asked, ['connect', 'refresh']);
  await sleep(3_500);
  assert.deepEqual(seen.of('close'), []);
  await client.ping();
});

test('close() rejects what is pending and stops for good', async () => {
  const client = new LiveClient({ url: stack.url, token: token({ sub: unique('eve-') }) });
  await client.ping();
  const pending = client.ping();
  client.close();
  await assert.rejects(pending, (err) => err.code === 'closed');
  await assert.rejects(client.ping(), (err) => err.code === 'closed');
  assert.equal(client.state, 'closed');
});

test('resubscribing from the last position: events missed while away are replayed, no gap', async (t) => {
  const sub = unique('dora-');
  // Opens sockets to a closed port while `blocked`: the client keeps retrying.
  let blocked = false;
  class Gate extends WebSocket {
    constructor(url, protocols) {
      super(blocked ? 'ws://127.0.0.1:1/live' : url, protocols);
    }
  }
  const client = new LiveClient({
    url: stack.url, token: token({ sub }), initialDelay: 100, maxDelay: 300, WebSocket: Gate,
  });
  t.after(() => client.close());
  const seen = record(client, EVENTS);
  const topic = unique('room-');
  await client.createTopic(topic);
  const events = [];
  await client.subscribe(topic, (e) => events.push(e.data));
  const publisher = new LiveClient({ url: stack.url, token: token({ sub }), initialDelay: 100, maxDelay: 300 });
  t.after(() => publisher.close());
  await publisher.publish(topic, 'm0');
  await eventually('the first event', () => events.length === 1);
  assert.match(client.position(topic), /^[0-9a-f]+-[0-9a-f]{12,}$/);

  blocked = true;
  await stack.killGateway();
  await stack.startGateway();
  for (const m of ['m1', 'm2', 'm3']) await publisher.publish(topic, m);
  blocked = false;
  await eventually('the missed events', () => events.length === 4, 10_000);
  await publisher.publish(topic, 'm4');
  await eventually('the live event', () => events.length === 5, 5_000);
  assert.deepEqual(events, ['m0', 'm1', 'm2', 'm3', 'm4']);
  assert.deepEqual(seen.of('gap'), [], 'everything was given back');
  assert.deepEqual(seen.of('error'), []);
});
