// Real-browser test of the example chat page (examples/chat) served by ws-gateway.
//
// Usage: node tests/browser/chat.mjs <gatewayBaseUrl> <tokenA> <tokenB>
//   e.g. node tests/browser/chat.mjs http://127.0.0.1:3000 "$JWT" "$JWT"
// Both tokens must allow mode rw (or r for B) on channel `chat`.
//
// Launches Debian's Chromium (/usr/bin/chromium, or $PGWS_CHROMIUM) headless through
// playwright-core, opens two pages on <base>/#token=<token>, connects each to channel `chat`
// by clicking Connect, sends a unique message from page A through the page's form, and checks
// that both pages list it (the envelope's payload) within 10 s.
// Exit status 0 on success, 1 on failure (reason on stderr), 2 on bad usage.
// Env: PGWS_BROWSER_SCREENSHOT=<file.png>  screenshot of page A there (page B next to it,
//      as <file>-b.png), taken on success and on failure.
//
// Setup: scripts/browser-test-setup.sh (installs chromium and playwright-core).

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import process from 'node:process';
import { chromium } from 'playwright-core';

const TIMEOUT_MS = 10_000;
const CHANNEL = 'chat';

const [base, tokenA, tokenB] = process.argv.slice(2);
if (!base || !tokenA || !tokenB) {
  console.error('usage: node tests/browser/chat.mjs <gatewayBaseUrl> <tokenA> <tokenB>');
  process.exit(2);
}
const baseUrl = base.replace(/\/+$/, '');
const redact = (s) => String(s).split(tokenA).join('<tokenA>').split(tokenB).join('<tokenB>');
const log = (msg) => console.error(`browser-test: ${redact(msg)}`);

async function screenshot(pages) {
  const file = process.env.PGWS_BROWSER_SCREENSHOT;
  if (!file) return;
  const parsed = path.parse(file);
  const fileB = path.join(parsed.dir, `${parsed.name}-b${parsed.ext || '.png'}`);
  for (const [page, target] of [[pages[0], file], [pages[1], fileB]]) {
    if (!page) continue;
    try {
      await page.screenshot({ path: target, fullPage: true });
      log(`screenshot: ${target}`);
    } catch (err) {
      log(`screenshot ${target} failed: ${err.message}`);
    }
  }
}

async function describe(page, name) {
  try {
    const status = await page.locator('#status').textContent();
    const payloads = await page.locator('#messages .payload').allTextContents();
    return `${name}: status ${JSON.stringify(status)}, messages ${JSON.stringify(payloads.slice(0, 5))}`;
  } catch (err) {
    return `${name}: (cannot read the page: ${err.message})`;
  }
}

async function openAndConnect(context, name, token) {
  const page = await context.newPage();
  page.on('pageerror', (err) => log(`${name}: page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') log(`${name}: console error: ${msg.text()}`);
  });
  const url = `${baseUrl}/#token=${encodeURIComponent(token)}`;
  const response = await page.goto(url, { waitUntil: 'load', timeout: TIMEOUT_MS });
  if (!response || !response.ok()) {
    throw new Error(`${name}: GET ${baseUrl}/ answered ${response ? response.status() : 'nothing'}`);
  }
  const prefilled = await page.locator('#token').inputValue();
  if (prefilled !== token) throw new Error(`${name}: the page did not take the token from #token=`);
  await page.locator('#channel').fill(CHANNEL);
  await page.locator('#connect').click();
  try {
    await page.locator('#status.open, #status.error').waitFor({ timeout: TIMEOUT_MS });
  } catch {
    throw new Error(`${name}: not connected within ${TIMEOUT_MS / 1000} s; ${await describe(page, name)}`);
  }
  if (!(await page.locator('#status.open').count())) {
    throw new Error(`${name}: could not connect; ${await describe(page, name)}`);
  }
  log(`${name}: ${await page.locator('#status').textContent()}`);
  return page;
}

async function waitForPayload(page, name, text, deadline) {
  const remaining = Math.max(1, deadline - Date.now());
  try {
    await page.waitForFunction(
      (t) => [...document.querySelectorAll('#messages .payload')].some((e) => e.textContent === t),
      text,
      { timeout: remaining },
    );
  } catch {
    throw new Error(`${name} did not show ${JSON.stringify(text)} within ${TIMEOUT_MS / 1000} s; ` +
      `${await describe(page, name)}`);
  }
  log(`${name}: shows ${JSON.stringify(text)}`);
}

async function main() {
  const userDataDir = await mkdtemp(path.join(tmpdir(), 'pgws-chromium-'));
  const executablePath = process.env.PGWS_CHROMIUM || '/usr/bin/chromium';
  let context;
  const pages = [];
  try {
    // A persistent context on a fresh, throw-away profile directory.
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-quic',
        '--no-first-run',
        '--disable-component-update',
        '--disable-sync',
      ],
      timeout: 30_000,
    });
    log(`chromium ${context.browser()?.version() ?? ''} started (${executablePath})`);

    pages.push(await openAndConnect(context, 'page A', tokenA));
    pages.push(await openAndConnect(context, 'page B', tokenB));

    const text = `hello from page A ${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
    const deadline = Date.now() + TIMEOUT_MS;
    await pages[0].locator('#message').fill(text);
    await pages[0].locator('#send').click();
    log(`page A: sent ${JSON.stringify(text)}`);

    await Promise.all([
      waitForPayload(pages[0], 'page A', text, deadline),
      waitForPayload(pages[1], 'page B', text, deadline),
    ]);
    await screenshot(pages);
    log('PASS: both pages received the message');
    return 0;
  } catch (err) {
    log(`FAIL: ${err.message}`);
    await screenshot(pages);
    return 1;
  } finally {
    if (context) await context.close().catch(() => {});
    await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
  }
}

process.exit(await main());
