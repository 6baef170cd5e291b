// pgws chat example: plain browser JavaScript, no build step, no dependencies.
// Opens ws://<this host>/<channel>/<jwt> (postgres-websockets' URL form), sends the text of the
// message box as a frame, and lists what arrives: the parsed `payload` of each envelope plus the
// raw JSON the server sent.
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const tokenEl = $('token');
  const channelEl = $('channel');
  const connectBtn = $('connect');
  const statusEl = $('status');
  const urlEl = $('url');
  const messageEl = $('message');
  const sendBtn = $('send');
  const list = $('messages');

  let ws = null;

  // `#token=<jwt>` (and optionally `&channel=<name>`) in the URL prefill the form.
  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ''));
    if (params.get('token')) tokenEl.value = params.get('token');
    if (params.has('channel')) channelEl.value = params.get('channel');
  }

  function setStatus(text, cls) {
    statusEl.textContent = text;
    statusEl.className = cls || '';
  }

  function setConnected(connected) {
    connectBtn.textContent = connected ? 'Disconnect' : 'Connect';
    messageEl.disabled = !connected;
    sendBtn.disabled = !connected;
    tokenEl.readOnly = connected;
    channelEl.readOnly = connected;
    if (connected) messageEl.focus();
  }

  function socketUrl(channel, jwt) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const path = channel
      ? `/${encodeURIComponent(channel)}/${encodeURIComponent(jwt)}`
      : `/${encodeURIComponent(jwt)}`;
    return `${scheme}://${location.host}${path}`;
  }

  function addMessage(raw) {
    let envelope = null;
    try {
      envelope = JSON.parse(raw);
    } catch (_) {
      // not JSON: shown as is
    }
    const li = document.createElement('li');
    li.className = 'message';
    const meta = document.createElement('span');
    meta.className = 'meta';
    const payload = document.createElement('span');
    payload.className = 'payload';
    const time = new Date().toLocaleTimeString();

    if (envelope && typeof envelope === 'object' && envelope.event === 'Error') {
      li.classList.add('error');
      meta.textContent = `${time} error`;
      payload.textContent = String(envelope.error);
    } else if (envelope && typeof envelope === 'object' && 'payload' in envelope) {
      const who = envelope.claims && (envelope.claims.name || envelope.claims.sub);
      meta.textContent = [time, envelope.event, envelope.channel && `#${envelope.channel}`, who]
        .filter(Boolean).join(' ');
      payload.textContent = typeof envelope.payload === 'string'
        ? envelope.payload
        : JSON.stringify(envelope.payload);
    } else {
      meta.textContent = time;
      payload.textContent = raw;
    }

    const code = document.createElement('code');
    code.className = 'raw';
    code.textContent = raw;

    li.append(meta, payload, code);
    list.prepend(li);
  }

  function connect() {
    const jwt = tokenEl.value.trim();
    const channel = channelEl.value.trim();
    if (!jwt) {
      setStatus('Paste a JWT first.', 'error');
      tokenEl.focus();
      return;
    }
    const url = socketUrl(channel, jwt);
    urlEl.textContent = url;
    setStatus('Connecting…');
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (err) {
      setStatus(`Cannot connect: ${err.message}`, 'error');
      return;
    }
    ws = socket;
    connectBtn.textContent = 'Disconnect';

    socket.onopen = () => {
      if (ws !== socket) return;
      setStatus(channel ? `Connected to channel ${channel}.` : 'Connected to the token\'s channels.', 'open');
      setConnected(true);
    };
    socket.onmessage = (event) => {
      if (typeof event.data === 'string') addMessage(event.data);
    };
    socket.onerror = () => {
      // The browser hides the reason (e.g. the server's HTTP 400 body for a bad token).
      if (ws === socket) setStatus('Connection error (invalid or expired token? server down?).', 'error');
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      setConnected(false);
      const why = event.reason ? `: ${event.reason}` : '';
      const wasError = statusEl.className === 'error';
      setStatus(`${wasError ? statusEl.textContent + ' ' : ''}Closed (code ${event.code}${why}).`,
        event.wasClean && !wasError ? '' : 'error');
    };
  }

  function disconnect() {
    if (ws) ws.close(1000, 'bye');
  }

  $('connect-form').addEventListener('submit', (e) => {
    e.preventDefault();
    if (ws) disconnect(); else connect();
  });

  $('send-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = messageEl.value;
    if (!ws || ws.readyState !== WebSocket.OPEN || text === '') return;
    ws.send(text);
    messageEl.value = '';
    messageEl.focus();
  });

  $('clear').addEventListener('click', () => { list.textContent = ''; });
  window.addEventListener('hashchange', readHash);
  readHash();
})();
