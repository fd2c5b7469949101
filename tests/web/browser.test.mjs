// Browser tests of the built-in page: the real moeserve binary serving a fixture MoE,
// driven in headless Chromium (Debian's `chromium`, through playwright-core; no browser
// download). Screenshots of each view go to the output directory.
//
//   node tests/web/browser.test.mjs [--binary target/release/moeserve]
//       [--model tests/fixtures/models/qwen3_moe] [--out target/web-artifacts]
//       [--chromium /usr/bin/chromium] [--screenshots-only]
//
// Checks: the page loads with no console errors; a message typed into the chat streams
// an answer into the page (with time to first token and tokens/s under it); the stop
// button ends a long answer, and /metrics shows the request aborted and its blocks freed;
// under load the dashboard's numbers rise and the heatmap has a cell per (MoE layer,
// expert) of the model; the chat works at phone width.

import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith("--")) acc.push([a.slice(2), all[i + 1]?.startsWith("--") || all[i + 1] === undefined ? true : all[i + 1]]);
    return acc;
  }, []),
);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
const binary = path.resolve(root, args.binary ?? "target/release/moeserve");
const model = path.resolve(root, args.model ?? "tests/fixtures/models/qwen3_moe");
const out = path.resolve(root, args.out ?? "target/web-artifacts");
const chromiumPath = args.chromium ?? process.env.CHROMIUM ?? "/usr/bin/chromium";
mkdirSync(out, { recursive: true });

let failures = 0;
function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures++;
}

async function until(what, f, ms = 20000) {
  const t = Date.now();
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() - t > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// The server, on a free port.
const server = spawn(binary, ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0"], {
  stdio: ["ignore", "ignore", "pipe"],
  env: { ...process.env, RUST_LOG: "info" },
});
let log = "";
server.stderr.on("data", (d) => (log += d));
process.on("exit", () => server.kill());
const base = await until("the server's address", () => log.match(/listening on (http:\/\/[0-9.:]+)/)?.[1]);
await until("the model", async () => (await fetch(`${base}/ready`).catch(() => ({}))).status === 200, 60000);
const modelId = (await (await fetch(`${base}/v1/models`)).json()).data[0].id;

async function metric(name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + " "));
  return line ? Number(line.split(" ")[1]) : NaN;
}

const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const errors = [];
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  page.on("pageerror", (e) => errors.push(e.message));

  await page.goto(`${base}/`);
  await page.waitForFunction((id) => document.getElementById("model").textContent === id, modelId);
  check(true, `the page loads and names the model (${modelId})`);

  // Chat: a typed message streams an answer.
  await page.click("#settings summary");
  await page.fill("#max-tokens", "40");
  await page.fill("#temperature", "0");
  await page.fill("#system", "You are terse.");
  // Random fixture models end early; the tests want answers of a set length.
  await page.fill("#extra", '{"ignore_eos": true}');
  await page.fill("#prompt", "Tell me about experts.");
  // Count the answer's updates as they land in the page (the fixture model is too fast
  // for polling to see them).
  await page.evaluate(() => {
    window.updates = 0;
    new MutationObserver((records) => {
      for (const r of records) if (r.target.closest?.(".assistant .content") || r.target.parentElement?.closest(".assistant .content")) window.updates++;
    }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
  });
  await page.press("#prompt", "Enter");
  await page.waitForFunction(() => document.querySelector("#messages li.assistant .stats")?.textContent.includes("TTFT"));
  const updates = await page.evaluate(() => window.updates);
  const answer = await page.$eval("#messages li.assistant .content", (e) => e.textContent);
  const stats = await page.$eval("#messages li.assistant .stats", (e) => e.textContent);
  check(answer.length > 0 && updates >= 5, `the answer streamed into the page (${updates} updates on the way)`);
  check(/TTFT \d+ ms · [\d.]+ tokens\/s · 40 tokens/.test(stats), `time to first token and tokens/s under it: "${stats}"`);
  await page.screenshot({ path: path.join(out, "chat.png"), fullPage: true });

  if (!args["screenshots-only"]) {
    // Stop: a long answer ends at the button; the server aborts it and frees its blocks.
    // The click comes from inside the page, as soon as the answer has 20 characters: the
    // fixture model writes all 1900 tokens in well under a second on a fast machine, and a
    // click sent from here (a round trip to the browser) can land after the last token.
    // Should the answer still finish first (a descheduled browser), the attempt is
    // repeated; each attempt checks the whole path.
    await page.fill("#max-tokens", "1900");
    let stopped = null;
    for (let attempt = 1; attempt <= 3 && !stopped; attempt++) {
      const abortedBefore = await metric("moeserve_requests_aborted_total");
      await page.evaluate(() => {
        const answers = () => document.querySelectorAll("#messages li.assistant .content");
        const n = answers().length;
        new MutationObserver((_, observer) => {
          if ((answers()[n]?.textContent.length ?? 0) > 20) {
            observer.disconnect();
            document.getElementById("stop").click();
          }
        }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
      });
      await page.fill("#prompt", "Go on for a long time.");
      await page.press("#prompt", "Enter");
      await page.waitForFunction(() => document.querySelector("#messages li.assistant:last-of-type .stats")?.textContent);
      const full = await page.$eval("#messages li.assistant:last-of-type .stats", (e) => e.textContent);
      if (!full.includes("stopped")) {
        console.log(`     (attempt ${attempt}: the answer finished before the stop, "${full}"; again)`);
        await until("the finished answer's blocks freed", async () => (await metric("moeserve_kv_cache_blocks_used")) === 0);
        await page.click("#clear"); // the 1900 tokens would not fit the next prompt
        continue;
      }
      await until("the abort in /metrics", async () => (await metric("moeserve_requests_aborted_total")) === abortedBefore + 1);
      await until("the blocks freed", async () => (await metric("moeserve_kv_cache_blocks_used")) === 0);
      const kept = await page.$eval("#messages li.assistant:last-of-type .content", (e) => e.textContent.length);
      stopped = { kept, full };
    }
    check(
      stopped && stopped.kept > 20 && !stopped.full.includes("1900 tokens"),
      `stop ended the answer (${stopped?.kept} characters kept; "${stopped?.full}"), the request is aborted and its blocks freed`,
    );

    // Clear empties the conversation.
    await page.click("#clear");
    check((await page.$$("#messages li")).length === 0, "clear empties the conversation");
  }

  if (args["screenshots-only"]) {
    await page.click("#tab-dashboard");
    await page.waitForTimeout(2500);
    await page.screenshot({ path: path.join(out, "dashboard.png"), fullPage: true });
    throw new Error("skip");
  }

  // Dashboard: numbers rise under load; a heatmap cell per (MoE layer, expert).
  await page.click("#tab-dashboard");
  // Load: 8 clients asking one answer after another until the checks are done.
  let loading = true;
  const load = Array.from({ length: 8 }, async (_, i) => {
    while (loading) {
      const r = await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          model: modelId,
          messages: [{ role: "user", content: `Load ${i}` }],
          max_tokens: 500,
          ignore_eos: true,
        }),
      });
      await r.text();
    }
  });
  await page.waitForFunction(() => Number(document.getElementById("d-tps").textContent) > 0, null, { timeout: 20000 });
  const tps = Number(await page.textContent("#d-tps"));
  const seqs = await page.textContent("#d-seqs");
  check(tps > 0, `output tokens/s rises under load (${tps}; running / waiting ${seqs})`);
  await page.waitForTimeout(3000);
  await page.screenshot({ path: path.join(out, "dashboard.png"), fullPage: true });
  loading = false;
  await Promise.all(load);
  await page.waitForTimeout(1500);
  const cells = await page.$eval("#heatmap", (c) => c.dataset.cells);
  const sparse = (await (await fetch(`${base}/ui/stats`)).json()).experts.filter((r) => r.length);
  const want = `${sparse.length}x${Math.max(...sparse.map((r) => r.length))}`;
  check(cells === want, `the heatmap has a cell per (MoE layer, expert): ${cells}, the model has ${want}`);
  const hottest = await page.$$eval("#hottest li", (l) => l.map((e) => e.textContent));
  check(hottest.length > 0, `the hottest experts are named: ${hottest[0]}`);
  const ttft = await page.textContent("#d-ttft");
  check(/\d+ \/ \d+ \/ \d+ ms/.test(ttft), `TTFT percentiles over the last minute: ${ttft}`);

  // Phone width: the chat still fits and works.
  await page.setViewportSize({ width: 390, height: 800 });
  await page.click("#tab-chat");
  await page.fill("#max-tokens", "12");
  await page.fill("#prompt", "Short one.");
  await page.press("#prompt", "Enter");
  await page.waitForFunction(() => [...document.querySelectorAll("#messages li.assistant .stats")].some((s) => s.textContent.includes("TTFT")));
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  check(!overflow, "at phone width nothing overflows sideways");
  await page.screenshot({ path: path.join(out, "chat-phone.png"), fullPage: true });

  check(errors.length === 0, `no console errors${errors.length ? ": " + errors.join("; ") : ""}`);
} catch (e) {
  if (e.message !== "skip") {
    console.log(`FAIL ${e.message}`);
    failures++;
  }
} finally {
  await browser.close();
  server.kill();
}
console.log(`${failures ? "FAILED" : "passed"}; screenshots in ${out}`);
process.exit(failures ? 1 : 0);
