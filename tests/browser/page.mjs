// Drives the `serve` page in the system's headless Chromium (no browser download), for
// tests/serve.rs. Talks to the Rust test through stdout lines:
//   READY <total good>      the page shows cfs and radar; the test now publishes more
//   CHANGED <old> <new>     the pushed update changed the number, without a reload
//   BIG rows=<n> maxApplyMs=<ms> maxRenderMs=<ms>   after the test added 5000 clients
//   DONE
// Exits 1 (with the reason on stderr) on a console error, a page error or a time-out.
// Usage: node page.mjs <url> <screenshot.png> <screenshot-5000.png>
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [url, shot, shotBig] = process.argv.slice(2);
const T = 60_000;
const errors = [];
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "pumpwatch-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1500, height: 950 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

async function main() {
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (m) => { if (m.type() === "error") errors.push("console: " + m.text()); });
  page.on("pageerror", (e) => errors.push("page error: " + e.message));
  await page.goto(url, { waitUntil: "load", timeout: T });
  await page.waitForSelector('.row[data-kind="client"][data-name="cfs"]', { timeout: T });
  await page.waitForSelector('.row[data-kind="source"][data-name="radar"]', { timeout: T });
  await page.waitForFunction(() => document.getElementById("total-good").textContent !== "0", null, { timeout: T });
  const before = await page.textContent("#total-good");
  console.log("READY " + before);
  await page.waitForFunction(
    (b) => document.getElementById("total-good").textContent !== b, before, { timeout: T, polling: 100 });
  const after = await page.textContent("#total-good");
  // Charts drawn: a uPlot canvas in the cfs row and in the totals.
  await page.waitForSelector('.row[data-name="cfs"] .c-chart canvas', { timeout: T });
  await page.waitForSelector("#total-chart canvas", { timeout: T });
  await page.screenshot({ path: shot });
  console.log("CHANGED " + before + " " + after);

  // 5 000 clients: the list stays virtual and the updates stay cheap.
  await page.waitForFunction(
    () => Number(document.getElementById("count-clients").textContent.replace(/,/g, "")) >= 5000,
    null, { timeout: T, polling: 200 });
  const rows = await page.$$eval(".row", (els) => els.length);
  await page.evaluate(() => { const l = document.getElementById("list"); l.scrollTop = l.scrollHeight; });
  await page.waitForFunction(() => [...document.querySelectorAll(".row")]
    .some((r) => r.style.display !== "none" && (r.dataset.name || "").startsWith("load")), null, { timeout: T });
  await page.fill("#filter", "load4321");
  await page.waitForFunction(() => document.getElementById("count-shown").textContent === "1", null, { timeout: T });
  await page.waitForSelector('.row[data-name="load4321"]', { timeout: T });
  await page.fill("#filter", "");
  await page.evaluate(() => { document.getElementById("list").scrollTop = 0; });
  const st = await page.evaluate(() => window.__pw);
  await page.screenshot({ path: shotBig });
  console.log(`BIG rows=${rows} maxApplyMs=${st.maxApplyMs.toFixed(1)} maxRenderMs=${st.maxRenderMs.toFixed(1)} events=${st.events}`);
  if (errors.length) throw new Error(errors.join("\n"));
  console.log("DONE");
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
