// Time to resume: one socket comes back with its last position after N notifications were
// sent while it was away, and reads all N (replayed from the history), in order. A stack of
// the built binaries (a gateway and a bridge on the machine's NATS and PostgreSQL, as the
// JavaScript client's tests start it); build them in release first.
//
//   cargo build --release --workspace
//   PGWS_BIN_DIR=$CARGO_TARGET_DIR/release node --experimental-websocket bench/resume.mjs OUT.json
//
// Env: RESUME_MESSAGES (10000), RESUME_RUNS (3). Prints one line per run and writes the runs
// as JSON to OUT.json (when given).

import { writeFileSync } from 'node:fs';
import { Stack, token, unique } from '../clients/js/test/stack.mjs';

const N = Number(process.env.RESUME_MESSAGES ?? 10_000);
const RUNS = Number(process.env.RESUME_RUNS ?? 3);
const out = process.argv[2];

/** A socket whose text frames can be awaited one by one. */
function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const frames = [];
    let wake = null;
    ws.onmessage = (e) => {
      frames.push(e.data);
      wake?.();
    };
    ws.onerror = () => reject(new Error(`cannot open ${url}`));
    ws.onopen = () =>
      resolve({
        ws,
        async next(ms = 30_000) {
          const deadline = Date.now() + ms;
          while (frames.length === 0) {
            if (Date.now() > deadline) throw new Error('no frame in time');
            await new Promise((r) => {
              wake = r;
              setTimeout(r, 50);
            });
          }
          return frames.shift();
        },
      });
  });
}

const stack = await Stack.start({ PGWS_LOG: 'warn' });
const runs = [];
try {
  for (let run = 1; run <= RUNS; run += 1) {
    const channel = unique('resume-');
    const jwt = token({ mode: 'r' });
    const base = `${stack.url}/${channel}/${jwt}`;
    // A position, then away.
    const first = await open(`${base}?resume=`);
    await stack.notify({ channel, n: 0 });
    const position = JSON.parse(await first.next()).position;
    first.ws.close();
    // N while away; a plain socket on the channel tells when the bridge has published them all.
    const plain = await open(base);
    await stack.sql(
      `SELECT count(pg_notify('${stack.listenChannel}', json_build_object('channel', '${channel}', 'n', n)::text)) ` +
        `FROM generate_series(1, ${N}) AS n`,
    );
    for (let i = 0; i < N; i += 1) await plain.next();
    plain.ws.close();
    // Back: time from the handshake's start to the last missed message.
    const start = performance.now();
    const back = await open(`${base}?resume=${position}`);
    const opened = performance.now();
    let expected = 1;
    for (let i = 0; i < N; i += 1) {
      const frame = JSON.parse(await back.next());
      if (frame.message?.n !== expected) throw new Error(`run ${run}: got ${JSON.stringify(frame)}, expected n=${expected}`);
      expected += 1;
    }
    const end = performance.now();
    back.ws.close();
    const result = {
      run,
      messages: N,
      handshake_ms: +(opened - start).toFixed(1),
      resume_ms: +(end - start).toFixed(1),
      messages_per_s: Math.round(N / ((end - start) / 1000)),
    };
    console.log(JSON.stringify(result));
    runs.push(result);
  }
} finally {
  await stack.stop();
}
if (out) writeFileSync(out, `${JSON.stringify({ bench: 'resume', date: new Date().toISOString(), runs }, null, 2)}\n`);
