// pgws demo page: built on the JavaScript client (pgws.js, served next to this file).
// `#token=<jwt>&channel=chat&meta=server-info&listen=postgres-websockets-listener` in the URL
// prefill the form (scripts/stack.sh prints such a URL). One client reads and writes the
// channel; a second one reads the meta channel's ConnectionOpen / ConnectionClose events when
// the token allows it.
import { PgwsClient, decodeClaims } from './pgws.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.hash.replace(/^#/, ''));
const meta = params.get('meta') ?? 'server-info';
const listen = params.get('listen') ?? 'postgres-websockets-listener';
if (params.get('token')) $('token').value = params.get('token');
if (params.get('channel')) $('channel').value = params.get('channel');
$('meta-name').textContent = meta;

let client = null;
let metaClient = null;
const sent = new Map(); // payload -> how many of ours are still to come back

const time = () => new Date().toLocaleTimeString();
const sqlText = (s) => `'${String(s).replace(/'/g, "''")}'`;

function item(list, tag, tagClass, text, limit = 200) {
  const li = document.createElement('li');
  const t = document.createElement('span');
  t.className = 'time';
  t.textContent = time();
  const g = document.createElement('span');
  g.className = `tag ${tagClass}`;
  g.textContent = tag;
  const p = document.createElement('span');
  p.className = 'payload';
  p.textContent = text;
  li.append(t, g, p);
  $(list).prepend(li);
  while ($(list).children.length > limit) $(list).lastChild.remove();
  return li;
}

function showSql(channel) {
  $('channel-name').textContent = channel;
  $('sql-notify').textContent =
    `SELECT pg_notify(${sqlText(listen)},\n` +
    `  json_build_object('channel', ${sqlText(channel)}, 'payload', 'hello from SQL')::text);`;
  $('sql-audit').textContent =
    `SELECT received_at, channel, event, payload, claims->>'sub' AS who\n` +
    `FROM pgws_audit.messages\nWHERE channel IN (${sqlText(channel)}, ${sqlText(meta)})\n` +
    `ORDER BY received_at DESC LIMIT 10;`;
}

function setStatus(state, detail = '') {
  $('status').textContent = detail ? `${state}: ${detail}` : state;
  $('status').className = state;
  const open = state === 'open';
  $('message').disabled = !open;
  $('send').disabled = !open;
}

function showClaims(token) {
  const c = decodeClaims(token);
  if (!c) {
    $('claims').textContent = 'This does not look like a JWT.';
    return null;
  }
  const exp = typeof c.exp === 'number' ? new Date(c.exp * 1000).toLocaleString() : 'never';
  const channels = c.channels ?? (c.channel ? [c.channel] : 'any');
  $('claims').textContent =
    `sub ${c.sub ?? '(none)'} · mode ${c.mode ?? '(none)'} · channels ${JSON.stringify(channels)} · expires ${exp}`;
  return c;
}

function clientEvents(c, label) {
  c.on('open', ({ reconnected }) => {
    if (c === client) setStatus('open');
    item('events', 'open', 'you', `${label}${reconnected ? ' reconnected' : ' connected'}`);
  });
  c.on('close', ({ code, reason, wasOpen, reconnecting }) => {
    if (wasOpen) item('events', 'close', 'error', `${label} closed (${code}${reason ? ` ${reason}` : ''})`);
    if (c === client && !reconnecting) setStatus('closed', `code ${code}`);
  });
  c.on('reconnecting', ({ attempt, delay }) => {
    if (c === client) setStatus('reconnecting', `attempt ${attempt} in ${delay} ms`);
    item('events', 'retry', 'other', `${label}: attempt ${attempt} in ${delay} ms`);
  });
  c.on('gap', ({ reason }) => {
    item('events', 'gap', 'gap', `${label}: messages may have been missed (${reason})`);
  });
  c.on('error', (err) => {
    item('events', 'error', 'error', `${label}: ${err.message}`);
    if (c === client && c.state === 'closed') setStatus('closed', err.message);
  });
}

function connect() {
  const token = $('token').value.trim();
  const channel = $('channel').value.trim();
  if (!token || !channel) {
    setStatus('closed', 'a token and a channel are needed');
    return;
  }
  const claims = showClaims(token);
  showSql(channel);
  client = new PgwsClient({ url: `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`, channel, token });
  clientEvents(client, channel);
  client.channel(channel, (m) => {
    let tag = 'socket';
    let cls = 'other';
    if (m.event === 'WebsocketMessage' && typeof m.payload === 'string' && sent.get(m.payload) > 0) {
      sent.set(m.payload, sent.get(m.payload) - 1);
      tag = 'you';
      cls = 'you';
    } else if (!m.claims) {
      tag = 'sql';
      cls = 'sql';
    } else if (m.claims.sub) {
      tag = String(m.claims.sub);
    }
    const text = typeof m.payload === 'string' ? m.payload : JSON.stringify(m.payload);
    item('messages', tag, cls, text);
  });
  client.on('error', (err) => {
    if (err.code === 'server') item('messages', 'error', 'error', err.message);
  });
  setStatus('connecting');
  $('connect').textContent = 'Disconnect';
  $('token').readOnly = $('channel').readOnly = true;

  const allowed = claims?.channels ?? (claims?.channel ? [claims.channel] : null);
  if (allowed && !allowed.includes(meta)) {
    item('meta', 'info', 'other', `the token does not allow the meta channel ${meta}`);
    return;
  }
  metaClient = new PgwsClient({ url: client.url, channel: meta, token });
  clientEvents(metaClient, meta);
  metaClient.channel(meta, (m) => {
    const who = m.claims?.sub ? ` (${m.claims.sub})` : '';
    item('meta', m.event ?? 'event', m.event === 'ConnectionOpen' ? 'you' : 'error', `${m.payload}${who}`);
  });
}

function disconnect() {
  client?.close();
  metaClient?.close();
  client = metaClient = null;
  setStatus('closed', 'disconnected');
  $('connect').textContent = 'Connect';
  $('token').readOnly = $('channel').readOnly = false;
}

$('connect-form').addEventListener('submit', (e) => {
  e.preventDefault();
  if (client) disconnect();
  else connect();
});

$('send-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('message').value;
  if (!client || text === '') return;
  try {
    client.send(text);
    sent.set(text, (sent.get(text) ?? 0) + 1);
    $('message').value = '';
  } catch (err) {
    item('messages', 'error', 'error', err.message);
  }
  $('message').focus();
});

showSql($('channel').value.trim() || 'chat');
if (params.get('token') && params.get('connect') !== 'no') connect();
