// Logs in to `serve` as one account in the system's headless Chromium (tests/auth.rs) and
// checks that nothing of another account reaches the browser: not in the page's text, not
// in its HTML, not in any response it received (API answers, event stream). Prints
//   CLEAN rows=<n> responses=<n> bytes=<n>
// and saves a screenshot. Exits 1 (the reason on stderr) on a leak, a console or page
// error, or a time-out.
// Usage: PW_USER=.. PW_PASSWORD=.. PW_EXPECT=a,b PW_FORBIDDEN=c,d node login.mjs <url> <png>
// (PW_VIEWPORT=1300x620 sizes the window; PW_EVENTS=N waits for N pushed updates, 3.)
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [url, shot] = process.argv.slice(2);
const expect = (process.env.PW_EXPECT || "").split(",").filter(Boolean);
const forbidden = (process.env.PW_FORBIDDEN || "").split(",").filter(Boolean);
const T = 60_000;
const [vw, vh] = (process.env.PW_VIEWPORT || "1500x700").split("x").map(Number);
const events = Number(process.env.PW_EVENTS || 3);
const errors = [];
const received = [];
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "pumpwatch-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: vw, height: vh },
  httpCredentials: { username: process.env.PW_USER, password: process.env.PW_PASSWORD },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function main() {
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (m) => { if (m.type() === "error") errors.push("console: " + m.text()); });
  page.on("pageerror", (e) => errors.push("page error: " + e.message));
  page.on("response", async (r) => {
    // The event stream never ends: its events are read from the page's state below.
    if (r.url().includes("/api/events")) return;
    try { received.push({ url: r.url(), status: r.status(), body: await r.text() }); } catch { /* gone */ }
  });
  await page.goto(url, { waitUntil: "load", timeout: T });
  for (const name of expect) {
    await page.waitForFunction(
      (n) => [...document.querySelectorAll(".row")].some((r) => r.dataset.name === n), name, { timeout: T });
  }
  await page.waitForFunction(() => document.getElementById("total-good").textContent !== "0", null, { timeout: T });
  await page.waitForSelector("#total-chart canvas", { timeout: T });
  // A few pushed updates, so the stream has delivered more than its snapshot.
  await page.waitForFunction((n) => window.__pw && window.__pw.events >= n, events, { timeout: T, polling: 100 });
  await page.screenshot({ path: shot });
  const html = await page.content();
  const text = await page.evaluate(() => document.body.innerText);
  // Everything the page was told over the stream is in its state: look there too.
  const state = await page.evaluate(() => JSON.stringify(window.__pwState ? window.__pwState() : null));
  const rows = await page.$$eval(".row", (els) => els.filter((e) => e.style.display !== "none").length);
  const leaks = [];
  for (const name of forbidden) {
    if (html.includes(name)) leaks.push(`${name} in the page's HTML`);
    if (text.includes(name)) leaks.push(`${name} in the page's text`);
    if (state.includes(name)) leaks.push(`${name} in what the event stream delivered`);
    for (const r of received) if (r.body.includes(name)) leaks.push(`${name} in ${r.url}`);
  }
  if (state === "null") leaks.push("the page exposes no state to check");
  if (leaks.length) throw new Error("leaked: " + leaks.join("; "));
  for (const name of expect) {
    if (!text.includes(name)) throw new Error(`${name} is not on the page`);
  }
  if (errors.length) throw new Error(errors.join("\n"));
  const bytes = received.reduce((n, r) => n + r.body.length, 0);
  console.log(`CLEAN rows=${rows} responses=${received.length} bytes=${bytes}`);
}

let code = 0;
try {
  await main();
} catch (e) {
  console.error(String(e && e.stack ? e.stack : e));
  for (const x of errors) console.error(x);
  code = 1;
} finally {
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
