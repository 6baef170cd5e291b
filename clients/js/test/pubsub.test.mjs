// PubSubClient against a real stack: wspubsub's API-key topics, a publisher and subscribers,
// text and binary frames, a subscriber waiting for its publisher, a publisher replaced.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { PubSubClient } from '../pgws.js';
import { Stack, eventually, record, sleep, unique } from './stack.mjs';

const EVENTS = ['open', 'close', 'reconnecting', 'gap', 'error', 'message'];

const KEY = 'f47ac10b-58cc-4372-a567-0e02b2c3d479';
const table = unique('jsclient_apikeys_');
let stack;
before(async () => {
  // wspubsub's DDL, in a table of this run's own.
  await Stack.sqlOnly(
      `CREATE TABLE ${table} (id serial primary key, domain varchar(64) not null unique,
         username varchar(254) not null, apikey varchar(36) not null unique,
         insert_ts timestamp not null default now(), active boolean not null default false);
       INSERT INTO ${table} (domain, username, apikey, active) VALUES ('test', 'hello@world.com', '${KEY}', true);`,
  );
  stack = await Stack.start({ PGWS_PUBSUB_KEYS_TABLE: table, PGWS_PUBSUB_GRACE: '1' });
});
after(async () => {
  await stack?.stop();
  await Stack.sqlOnly(`DROP TABLE IF EXISTS ${table}`);
});

const opts = (topic, extra = {}) => ({ url: stack.url, domain: 'test', topic, initialDelay: 100, maxDelay: 400, ...extra });

test('a publisher reaches every subscriber, text and binary, in order', async (t) => {
  const topic = unique('news-');
  const pub = new PubSubClient(opts(topic, { key: KEY }));
  t.after(() => pub.close());
  await eventually('the publisher', () => pub.state === 'open');
  const subs = [new PubSubClient(opts(topic)), new PubSubClient(opts(topic))];
  const got = subs.map((s) => record(s, EVENTS));
  t.after(() => subs.forEach((s) => s.close()));
  await eventually('the subscribers', () => subs.every((s) => s.state === 'open'));
  pub.send('headline');
  pub.send(new Uint8Array([1, 2, 3]));
  await eventually('both frames at both', () => got.every((g) => g.of('message').length === 2));
  for (const g of got) {
    const [text, binary] = g.of('message').map((m) => m.data);
    assert.equal(text, 'headline');
    assert.deepEqual([...new Uint8Array(binary)], [1, 2, 3]);
  }
  assert.throws(() => subs[0].send('x'), (e) => e.code === 'invalid');
});

test('a subscriber waits for its publisher, and comes back after the publisher is replaced', async (t) => {
  const topic = unique('late-');
  const sub = new PubSubClient(opts(topic));
  t.after(() => sub.close());
  const seen = record(sub, EVENTS);
  await sleep(800); // no publisher: refused (404), retried
  assert.equal(sub.state, 'connecting');
  assert.ok(seen.of('reconnecting').length >= 2, `${seen.of('reconnecting').length} attempts`);
  assert.ok(seen.of('close').every((c) => !c.wasOpen));

  let pub = new PubSubClient(opts(topic, { key: KEY }));
  await eventually('the subscriber', () => sub.state === 'open', 5_000);
  pub.send('first');
  await eventually('the first frame', () => seen.of('message').length === 1);

  // The publisher leaves; after the grace period the subscriber is closed (4004) and waits again.
  pub.close();
  await eventually('the close 4004', () => seen.of('close').some((c) => c.code === 4004), 5_000);
  pub = new PubSubClient(opts(topic, { key: KEY }));
  t.after(() => pub.close());
  await eventually('the subscriber again', () => sub.state === 'open' && seen.of('gap').length === 1, 5_000);
  pub.send('second');
  await eventually('the second frame', () => seen.of('message').length === 2);
  assert.deepEqual(seen.of('message').map((m) => m.data), ['first', 'second']);
});

test('a refused key: no connection, and maxAttempts ends the retries with an error', async (t) => {
  const pub = new PubSubClient(opts(unique('nokey-'), { key: '00000000-0000-0000-0000-000000000000', maxAttempts: 2 }));
  t.after(() => pub.close());
  const seen = record(pub, EVENTS);
  await eventually('giving up', () => pub.state === 'closed', 5_000);
  assert.equal(seen.of('open').length, 0);
  assert.equal(seen.of('error').at(-1).code, 'gave_up');
});
