// Real-browser test of the demo page (examples/demo, built on clients/js/pgws.js) through a
// gateway restart.
//
// Usage: node tests/browser/demo.mjs     (after cargo build --workspace; scripts/test.sh runs it)
//        node tests/browser/demo.mjs <gatewayBaseUrl> <token>   (a running stack, e.g.
//        scripts/stack.sh --check --browser: the page connects, sees its meta events, and
//        chats; no SQL, no restart)
//
// Without arguments it starts its own stack (clients/js/test/stack.mjs: the built ws-gateway serving examples/demo,
// a pg-bridge, the PostgreSQL of PGWS_TEST_DB_URI (the test command's own) and NATS, meta channel server-info), opens the page in
// headless Chromium (Debian's /usr/bin/chromium or $PGWS_CHROMIUM, through playwright-core)
// with a token in its URL fragment, and checks, as a user would see it on the page: the meta
// channel shows another socket's ConnectionOpen; a message typed in the page comes back marked
// as its own; a NOTIFY from SQL shows up marked sql; after the gateway is killed the page says
// it is reconnecting, and after the gateway is back it reconnects by itself, says messages may
// have been missed, and sends and receives again.
// Exit status 0 on success, 1 on failure (reason on stderr).
// Env: PGWS_BROWSER_SCREENSHOT=<file.png>  a screenshot of the page at the end (and on failure).

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Stack, token, unique } from '../../clients/js/test/stack.mjs';

const TIMEOUT_MS = 10_000;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const log = (msg) => console.error(`demo-test: ${msg}`);

async function listed(page, list, text, what) {
  try {
    await page.waitForFunction(
      ([l, t]) => [...document.querySelectorAll(`#${l} li`)].some((li) => li.textContent.includes(t)),
      [list, text],
      { timeout: TIMEOUT_MS },
    );
  } catch {
    const items = await page.locator(`#${list} li`).allTextContents();
    throw new Error(`${what}: #${list} shows no ${JSON.stringify(text)}; it shows ${JSON.stringify(items.slice(0, 8))}`);
  }
  log(`${what}: ok`);
}

async function status(page, state, what) {
  try {
    await page.locator(`#status.${state}`).waitFor({ timeout: TIMEOUT_MS });
  } catch {
    throw new Error(`${what}: the status is ${JSON.stringify(await page.locator('#status').textContent())}, not ${state}`);
  }
  log(`${what}: ${await page.locator('#status').textContent()}`);
}

async function send(page, text) {
  await page.locator('#message').fill(text);
  await page.locator('#send').click();
}

async function main() {
  const [externalBase, externalToken] = process.argv.slice(2);
  const stack = externalBase
    ? null
    : await Stack.start({
        PGWS_ROOT_PATH: path.join(ROOT, 'examples/demo'),
        PGWS_META_CHANNEL: 'server-info',
      });
  const userDataDir = await mkdtemp(path.join(tmpdir(), 'pgws-chromium-'));
  let context;
  let page;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: process.env.PGWS_CHROMIUM || '/usr/bin/chromium',
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
        '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
      timeout: 30_000,
      viewport: { width: 1280, height: 900 },
    });
    page = await context.newPage();
    page.on('pageerror', (err) => log(`page error: ${err.message}`));
    const jwt = externalToken ?? token({ mode: 'rw', channels: ['chat', 'server-info'], sub: 'ann' });
    const base = (externalBase ?? `http://127.0.0.1:${stack.port}`).replace(/\/+$/, '');
    const listen = stack ? `&listen=${stack.listenChannel}` : '';
    const response = await page.goto(`${base}/#token=${jwt}${listen}`);
    if (!response?.ok()) throw new Error(`GET ${base}/ answered ${response?.status()}`);
    await status(page, 'open', 'the page connects by itself');
    const sql = await page.locator('#sql-notify').textContent();
    if (stack && !sql.includes(stack.listenChannel)) {
      throw new Error(`the SQL shown does not name the listen channel: ${sql}`);
    }

    // Another socket's connection shows on the meta channel (after the page's meta socket is open).
    await listed(page, 'events', 'server-info connected', 'the meta socket opens');
    const other = new WebSocket(`${base.replace(/^http/, 'ws')}/chat`, ['pgws', externalToken ?? token({ mode: 'r', sub: 'bob' })]);
    await new Promise((resolve, reject) => {
      other.onopen = resolve;
      other.onerror = reject;
    });
    await listed(page, 'meta', externalToken ? 'chat' : 'chat (bob)', 'the meta channel shows ConnectionOpen');

    const mine = unique('typed in the page ');
    await send(page, mine);
    await listed(page, 'messages', `you${mine}`, 'a message from the page comes back as its own');
    if (!stack) {
      other.close();
      log('PASS');
      return 0;
    }
    const fromSql = unique('from SQL ');
    await stack.notify({ channel: 'chat', payload: fromSql });
    await listed(page, 'messages', `sql${fromSql}`, 'a NOTIFY from SQL');

    await stack.killGateway();
    await status(page, 'reconnecting', 'the gateway is down');
    await listed(page, 'events', 'attempt 2', 'the page retries');
    await stack.startGateway();
    await status(page, 'open', 'the gateway is back');
    await listed(page, 'events', 'messages may have been missed (reconnect)', 'the gap is shown');
    const again = unique('after the restart ');
    await send(page, again);
    await listed(page, 'messages', `you${again}`, 'the page sends again');
    const sqlAgain = unique('from SQL after the restart ');
    await stack.notify({ channel: 'chat', payload: sqlAgain });
    await listed(page, 'messages', `sql${sqlAgain}`, 'a NOTIFY reaches the page again');
    other.close();
    log('PASS');
    return 0;
  } catch (err) {
    log(`FAIL: ${err.message}`);
    return 1;
  } finally {
    if (page && process.env.PGWS_BROWSER_SCREENSHOT) {
      await page.screenshot({ path: process.env.PGWS_BROWSER_SCREENSHOT, fullPage: true }).catch(() => {});
      log(`screenshot: ${process.env.PGWS_BROWSER_SCREENSHOT}`);
    }
    if (context) await context.close().catch(() => {});
    await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
    await stack?.stop();
  }
}

process.exit(await main());
