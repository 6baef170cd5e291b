// The Node.js peer of the load tool: what many users would write today with `pg` and `ws`.
// One PostgreSQL connection LISTENs on PGWS_LISTEN_CHANNEL; a notification whose payload is
// a JSON object with a string `channel` is sent verbatim to every socket on that channel, as
// pgws does. Sockets pick their channel with the first path segment (`/<channel>/<anything>`,
// so pgws URLs work unchanged); the token is not checked (that only makes the peer cheaper).
//
//   PORT=3010 PGWS_DB_URI=postgres://... PGWS_LISTEN_CHANNEL=... node server.js
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');
const { Client } = require('pg');

const port = Number(process.env.PORT || 3010);
const host = process.env.HOST || '127.0.0.1';
const listen = process.env.PGWS_LISTEN_CHANNEL || 'postgres-websockets-listener';
const dbUri = process.env.PGWS_DB_URI || 'postgres://postgres@127.0.0.1:5432/postgres';

const channels = new Map(); // channel -> Set of sockets

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain' });
  res.end('ok\n');
});
const wss = new WebSocketServer({ server, perMessageDeflate: false, clientTracking: false });

wss.on('connection', (ws, req) => {
  const first = (req.url || '/').split('?')[0].split('/')[1] || '';
  const channel = decodeURIComponent(first);
  let set = channels.get(channel);
  if (!set) {
    set = new Set();
    channels.set(channel, set);
  }
  set.add(ws);
  ws.on('close', () => {
    set.delete(ws);
    if (set.size === 0 && channels.get(channel) === set) channels.delete(channel);
  });
  ws.on('error', () => {});
});

async function main() {
  const db = new Client({ connectionString: dbUri });
  db.on('notification', (n) => {
    let channel;
    try {
      channel = JSON.parse(n.payload).channel;
    } catch {
      return;
    }
    if (typeof channel !== 'string') return;
    const set = channels.get(channel);
    if (!set) return;
    for (const ws of set) ws.send(n.payload);
  });
  db.on('error', (e) => {
    console.error(`node-peer: database: ${e.message}`);
    process.exit(1);
  });
  await db.connect();
  await db.query(`LISTEN "${listen.replace(/"/g, '""')}"`);
  server.listen(port, host, () => {
    console.error(`node-peer: listening on ${host}:${port}, LISTEN ${listen}`);
  });
}

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
main().catch((e) => {
  console.error(`node-peer: ${e.message}`);
  process.exit(1);
});
