// End-to-end tests of the browser client (js/bus_service.js, js/websocket_worker.js) against a
// real imbus server (browser_harness), in headless Chromium driven by playwright-core.
//
//   node tests/browser/run.mjs --harness build/tests/browser/browser_harness [--root DIR]
//                              [--chat build/example_chat] [--only NAME]... [--chromium PATH]
//
// Each test gets its own harness (fresh SQLite file, port 0; --root: the tree it serves) and its
// own browser context. A chat test (`test("chat_...", { chat: true }, ...)`) gets no harness but
// starts the chat demo (examples/chat, --chat PATH) itself, as often as it needs; without --chat
// it is skipped (exit 77, which ctest reports as skipped when no other test ran).
// ctest registers one entry per `test("name", ...)` line below (browser/<name>, running
// `--only name`). Without --only, all tests run.
// Waits are on conditions (events, ids, server stats) with timeouts; the only fixed sleeps are
// short ones that prove a negative (nothing reconnects during them).
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

// --- command line ------------------------------------------------------------------------------

const options = { harness: process.env.IMBUS_BROWSER_HARNESS, only: [], chromium: "/usr/bin/chromium", root: undefined,
                  chat: process.env.IMBUS_BROWSER_CHAT };
for (let i = 2; i < process.argv.length; ++i) {
    const flag = process.argv[i], value = process.argv[++i];
    if (value === undefined) usage(`missing value after ${flag}`);
    if (flag === "--harness") options.harness = value;
    else if (flag === "--only") options.only.push(value);
    else if (flag === "--chromium") options.chromium = value;
    else if (flag === "--root") options.root = value;
    else if (flag === "--chat") options.chat = value;  // "" (no example_chat target): chat tests skip
    else usage(`unknown option ${flag}`);
}
if (!options.harness) usage("--harness PATH (or IMBUS_BROWSER_HARNESS) is required");

function usage(problem) {
    console.error(`run.mjs: ${problem}\nusage: node run.mjs --harness PATH [--root DIR] [--chat PATH] [--only NAME]... [--chromium PATH]`);
    process.exit(2);
}

const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                       "--disable-component-update", "--disable-sync", "--no-first-run"];
const API_KEY = "test-key";
const WAIT_MS = 10000;       // a condition that should hold soon (connect, delivery)
const RECONNECT_MS = 20000;  // the worker's first retries are 1 s, then 1.5-2.5 s

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class AssertionError extends Error {}
function check(condition, message) {
    if (!condition) throw new AssertionError(message);
}
function checkEqual(actual, expected, message) {
    const a = JSON.stringify(actual), e = JSON.stringify(expected);
    if (a !== e) throw new AssertionError(`${message}\n  expected ${e}\n  actual   ${a}`);
}

// --- the server ---------------------------------------------------------------------------------

// One request on a connection of its own (agent: false sends `Connection: close`): the server
// closes after each response (it says so since http_connection_close), so pooling buys nothing.
// `ca`: the PEM an https:// server's certificate must chain to.
function http(method, url, body, headers = {}, ca = undefined) {
    return new Promise((resolve, reject) => {
        const request = url.startsWith("https:") ? httpsRequest : httpRequest;
        const req = request(url, { method, headers, agent: false, ca }, (res) => {
            let text = "";
            res.setEncoding("utf8");
            res.on("data", (chunk) => { text += chunk; });
            res.on("end", () => resolve({ status: res.statusCode, body: text }));
            res.on("error", reject);
        });
        req.setTimeout(WAIT_MS, () => req.destroy(new Error(`${method} ${url}: no answer in ${WAIT_MS} ms`)));
        req.on("error", reject);
        req.end(body);
    });
}

const running = new Set();  // every server process still running, killed when the run ends

// A server process on 127.0.0.1 (browser_harness, example_chat): started with a port (0: any),
// it prints the port it listens on; stop() sends SIGTERM and wants exit code 0.
class ServerProcess {
    constructor(label, port) {
        this.label = label;
        this.requestedPort = port;
        this.port = 0;
        this.stderr = "";
        this.process = null;
        this.exited = null;
    }

    /** Spawns `path args`; resolves once a stdout line matches `portLine` (port: group 1). */
    async launch(path, args, portLine) {
        const child = spawn(path, args, { stdio: ["ignore", "pipe", "pipe"] });
        this.process = child;
        running.add(this);
        child.stderr.on("data", (chunk) => { this.stderr += chunk; });
        this.exited = new Promise((resolve) => child.on("exit", (code, signal) => {
            running.delete(this);
            resolve({ code, signal });
        }));
        const lines = createInterface({ input: child.stdout });
        const port = await new Promise((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`${this.label} printed no port line in ${WAIT_MS} ms\n${this.stderr}`)), WAIT_MS);
            child.on("error", (error) => { clearTimeout(timer); reject(error); });
            lines.on("line", (line) => {
                const match = portLine.exec(line);
                if (match) { clearTimeout(timer); resolve(Number(match[1])); }
            });
            this.exited.then(({ code, signal }) => {
                clearTimeout(timer);
                reject(new Error(`${this.label} exited (${code ?? signal}) before listening\n${this.stderr}`));
            });
        });
        this.port = port;
        return this;
    }

    /** SIGTERM (unless it has exited already), then the exit: it must be 0 (no crash, no
     *  sanitizer report). The server closes its sockets with 1001 before it exits. */
    async stop() {
        if (!this.process) return;
        if (this.process.exitCode === null && this.process.signalCode === null) this.process.kill("SIGTERM");
        const result = await Promise.race([this.exited, sleep(WAIT_MS).then(() => null)]);
        if (result === null) {
            this.process.kill("SIGKILL");
            throw new Error(`${this.label} did not stop within ${WAIT_MS} ms of SIGTERM\n${this.stderr}`);
        }
        check(result.code === 0, `${this.label} (port ${this.port}) exited with ${result.code ?? result.signal}\n${this.stderr}`);
    }

    url(path) {
        return `http://127.0.0.1:${this.port}${path}`;
    }
}

class Harness extends ServerProcess {
    /** tls: {cert, key} PEM paths to serve https:// and wss:// */
    constructor({ data, port = 0, version, tls, extra = [] }) {
        super("harness", port);
        this.data = data;
        this.version = version;
        this.tls = tls;
        this.extra = extra;  // more flags, e.g. --presence-away-ms
    }

    start() {
        const args = ["--port", String(this.requestedPort), "--data", this.data, "--api-key", API_KEY];
        if (this.version) args.push("--version", this.version);
        if (options.root) args.push("--root", options.root);
        if (this.tls) args.push("--tls-cert", this.tls.cert, "--tls-key", this.tls.key);
        args.push(...this.extra);
        return this.launch(options.harness, args, /^PORT (\d+)$/);
    }

    url(path) {
        return this.tls ? `https://127.0.0.1:${this.port}${path}` : super.url(path);
    }

    request(method, path, body, headers) {
        return http(method, this.url(path), body, headers, this.tls ? readFileSync(this.tls.cert) : undefined);
    }

    page(query = "") {
        return this.url(`/tests/browser/page.html${query ? "?" + query : ""}`);
    }

    /** POST /bus/send: one {channel, type, payload} or an array (one transaction); returns the ids. */
    async publish(items) {
        const { status, body } = await this.request("POST", "/bus/send", JSON.stringify(items),
                                                    { "Content-Type": "application/json", Authorization: `Bearer ${API_KEY}` });
        check(status === 200, `POST /bus/send answered ${status}: ${body}`);
        return JSON.parse(body).ids;
    }

    /** Publishes `count` "test/msg" notifications on `channel`, one transaction each. */
    async publishMany(count, channel = "broadcast", tag = "m") {
        const ids = [];
        for (let i = 0; i < count; ++i) ids.push(...await this.publish({ channel, type: "test/msg", payload: { tag, i } }));
        return ids;
    }

    async connections() {
        const { status, body } = await this.request("GET", "/test/stats");
        check(status === 200, `GET /test/stats answered ${status}`);
        return JSON.parse(body).connections;
    }

    async waitConnections(count, timeout = WAIT_MS) {
        const deadline = Date.now() + timeout;
        let now;
        while ((now = await this.connections()) !== count) {
            if (Date.now() > deadline) throw new AssertionError(`expected ${count} WebSocket connection(s), the server has ${now}`);
            await sleep(50);
        }
    }

    /** GET /test/stats: {connections, handshakes, probes, subscribes} (harness.cpp). */
    async stats() {
        const { status, body } = await this.request("GET", "/test/stats");
        check(status === 200, `GET /test/stats answered ${status}`);
        return JSON.parse(body);
    }

    async waitStat(name, value, timeout = WAIT_MS) {
        const deadline = Date.now() + timeout;
        let now;
        while ((now = (await this.stats())[name]) < value) {
            if (Date.now() > deadline) throw new AssertionError(`expected ${name} >= ${value}, the server has ${now}`);
            await sleep(50);
        }
    }

    /** GET /test/events: the client requests other than subscribe this server received, in order. */
    async clientEvents() {
        const { status, body } = await this.request("GET", "/test/events");
        check(status === 200, `GET /test/events answered ${status}`);
        return JSON.parse(body);
    }
}

// --- the page -----------------------------------------------------------------------------------

async function openPage(context, url, { initScript } = {}) {
    const page = await context.newPage();
    if (initScript) await page.addInitScript(initScript);
    page.consoleLines = [];
    page.on("console", (message) => page.consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => page.consoleLines.push(`pageerror: ${error.message}`));
    await page.goto(url);
    await page.waitForFunction(() => window.ready === true, null, { timeout: WAIT_MS });
    return page;
}

async function waitFor(page, what, fn, arg, timeout = WAIT_MS) {
    try {
        await page.waitForFunction(fn, arg, { timeout, polling: 50 });
    } catch (error) {
        const log = await page.evaluate(() => window.log).catch(() => "(page gone)");
        throw new AssertionError(`timed out after ${timeout} ms waiting for ${what}\n  page log: ${JSON.stringify(log)}\n  ${error.message.split("\n")[0]}`);
    }
}

const waitEvent = (page, name, count = 1, timeout = WAIT_MS) =>
    waitFor(page, `${count} "${name}" event(s)`,
            ([n, c]) => window.log.filter((e) => e.event === n).length >= c, [name, count], timeout);

const waitReceived = (page, ids, timeout = WAIT_MS) =>
    waitFor(page, `notification(s) ${ids.join(",")}`,
            (want) => want.every((id) => window.received.some((r) => r.id === id)), ids, timeout);

const waitCount = (page, count, timeout = WAIT_MS) =>
    waitFor(page, `${count} "test/msg" notifications`, (n) => window.received.length >= n, count, timeout);

const receivedIds = (page) => page.evaluate(() => window.received.map((r) => r.id));
const events = (page) => page.evaluate(() => window.log.map((e) => e.event));
const busCall = (page, method, ...args) => page.evaluate(([m, a]) => window.bus[m](...a), [method, args]);

// The worker sends its subscribe 300 ms after the last channel change. A barrier makes "the
// server has the new channel set" observable instead of sleeping past the debounce: add a fresh
// channel, then publish on it until a notification on it arrives. The subscribe that carried it
// also carried every earlier change.
let barrierCount = 0;
async function barrier(harness, page) {
    const channel = `barrier-${++barrierCount}`;
    await busCall(page, "addChannel", channel);
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
        await harness.publish({ channel, type: "test/barrier", payload: channel });
        try {
            await page.waitForFunction((c) => window.notifications.some((n) => n.payload === c), channel,
                                       { timeout: 250, polling: 25 });
            return;
        } catch {
            if (Date.now() > deadline) throw new AssertionError(`barrier channel ${channel} never subscribed`);
        }
    }
}

// Publishes one notification on `channel`, then one on broadcast (always subscribed), waits for
// the broadcast one; the server sends in id order, so whether the first arrived is now known.
async function deliveredOn(harness, page, channel) {
    const [probe] = await harness.publish({ channel, type: "test/msg", payload: { probe: channel } });
    const [marker] = await harness.publish({ channel: "broadcast", type: "test/msg", payload: { marker: channel } });
    await waitReceived(page, [marker]);
    return (await receivedIds(page)).includes(probe);
}

// --- tests ----------------------------------------------------------------------------------------

// test(name, fn) or test(name, { chat: true }, fn). fn gets {harness, context, restart, browser};
// a chat test gets {browser, newContext, startChat} instead (no harness, see the chat section).
const tests = [];
function test(name, ...args) {
    const fn = args.pop();
    tests.push({ name, fn, chat: Boolean(args[0]?.chat) });
}

test("shared_socket", async ({ harness, context }) => {
    // Two tabs of one browser context: one SharedWorker, one WebSocket, both tabs notified.
    const a = await openPage(context, harness.page());
    await waitEvent(a, "connect");
    const b = await openPage(context, harness.page());
    await waitEvent(b, "connect");
    await harness.waitConnections(1);
    const ids = await harness.publishMany(3);
    await waitReceived(a, ids);
    await waitReceived(b, ids);
    checkEqual(await receivedIds(a), ids, "tab A gets each notification once, in order");
    checkEqual(await receivedIds(b), ids, "tab B gets each notification once, in order");
    checkEqual(await harness.connections(), 1, "still one connection for two tabs");
});

test("wss_shared_socket", async () => {
    // The page over https:// and the SharedWorker's socket over wss://, with a throwaway
    // certificate: a browser of its own trusts that one key (by its SPKI hash), no other.
    const dir = mkdtempSync(join(tmpdir(), "imbus-browser-tls-"));
    const tls = { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") };
    let tlsBrowser, harness;
    try {
        execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1", "-subj", "/CN=imbus-test",
                                 "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", tls.key, "-out", tls.cert], { stdio: "ignore" });
        const spki = execFileSync("sh", ["-c", `openssl x509 -in '${tls.cert}' -pubkey -noout | openssl pkey -pubin -outform der |
                                               openssl dgst -sha256 -binary | base64`]).toString().trim();
        tlsBrowser = await chromium.launch({ executablePath: options.chromium, timeout: 30000,
                                             args: [...CHROMIUM_ARGS, `--ignore-certificate-errors-spki-list=${spki}`] });
        const context = await tlsBrowser.newContext();
        harness = await new Harness({ data: join(dir, "bus.db"), tls }).start();
        const a = await openPage(context, harness.page());
        await waitEvent(a, "connect");
        const b = await openPage(context, harness.page());
        await waitEvent(b, "connect");
        check(a.url().startsWith("https://"), `the page is served over https (${a.url()})`);
        checkEqual(await a.evaluate(() => window.bus.websocketURL?.split(":")[0] ?? null), "wss", "the worker's socket is wss://");
        await harness.waitConnections(1);
        const ids = await harness.publishMany(3);
        await waitReceived(a, ids);
        await waitReceived(b, ids);
        checkEqual(await receivedIds(a), ids, "tab A gets each notification once, in order, over wss");
        checkEqual(await receivedIds(b), ids, "tab B too");
    } finally {
        if (tlsBrowser) await tlsBrowser.close();
        if (harness) await harness.stop();
        rmSync(dir, { recursive: true, force: true });
    }
});

test("channel_refcount", async ({ harness, context }) => {
    // A channel added in both tabs stays subscribed until both deleted it.
    const a = await openPage(context, harness.page("channel=shared"));
    const b = await openPage(context, harness.page("channel=shared"));
    await waitEvent(a, "connect");
    await waitEvent(b, "connect");
    await harness.waitConnections(1);
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "shared"), "both tabs added 'shared': it is subscribed");

    await busCall(b, "deleteChannel", "shared");
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "shared"), "after the first delete (tab B), 'shared' is still subscribed (tab A has it)");
    check(await deliveredOn(harness, b, "shared"), "tab B still hears the shared socket's notifications");

    await busCall(a, "deleteChannel", "shared");
    await barrier(harness, a);
    check(!await deliveredOn(harness, a, "shared"), "after the second delete, 'shared' is unsubscribed");
});

test("channel_refcount_one_tab", async ({ harness, context }) => {
    // One tab adding a channel twice needs two deletes too; a third delete changes nothing.
    const a = await openPage(context, harness.page());
    await waitEvent(a, "connect");
    await busCall(a, "addChannel", "twice");
    await busCall(a, "addChannel", "twice");
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "twice"), "'twice' is subscribed");
    await busCall(a, "deleteChannel", "twice");
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "twice"), "after one of two deletes, 'twice' is still subscribed");
    await busCall(a, "deleteChannel", "twice");
    await barrier(harness, a);
    check(!await deliveredOn(harness, a, "twice"), "after the second delete, 'twice' is unsubscribed");
    await busCall(a, "deleteChannel", "twice");
    await busCall(a, "addChannel", "twice");
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "twice"), "an extra delete did not make the count negative");
});

test("closed_tab_releases_channels", async ({ harness, context }) => {
    const a = await openPage(context, harness.page("channel=keep"));
    const b = await openPage(context, harness.page("channel=gone"));
    await waitEvent(a, "connect");
    await waitEvent(b, "connect");
    await harness.waitConnections(1);
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "gone"), "tab B's channel is subscribed while B is open");

    const closed = new Promise((resolve) => b.once("close", resolve));
    await b.close({ runBeforeUnload: true });  // fires pagehide; does not wait for the close
    await closed;
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "keep"), "tab A keeps receiving on its own channel");
    check(!await deliveredOn(harness, a, "gone"), "the closed tab's channel is no longer subscribed");
    checkEqual(await harness.connections(), 1, "the socket stays open for tab A");
});

test("server_restart", async ({ harness, context, restart }) => {
    // The server goes away (SIGTERM: close 1001) and comes back on the same port with the same
    // SQLite file; notifications are published before the stop, on the restarted server before
    // the page reconnects, and after. The page reconnects by itself and has every id once.
    const page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    const before = await harness.publishMany(4, "broadcast", "before");
    await waitReceived(page, before);

    await harness.stop();
    await waitEvent(page, "disconnect");
    await waitEvent(page, "reconnecting");
    const server = await restart();  // same port, same data file
    const whileAway = await server.publishMany(4, "broadcast", "away");
    const reconnectedEarly = (await events(page)).includes("reconnect");
    check(!reconnectedEarly, "the restarted server published before the page reconnected (the retry waits 1 s)");

    await waitEvent(page, "reconnect", 1, RECONNECT_MS);
    const after = await server.publishMany(3, "broadcast", "after");
    const all = [...before, ...whileAway, ...after];
    await waitReceived(page, all);
    const got = await receivedIds(page);
    checkEqual(got, all, "every id exactly once, ascending");
    for (let i = 1; i < got.length; ++i) check(got[i] === got[i - 1] + 1, `no gap: ${got[i - 1]} then ${got[i]}`);
    const log = await events(page);
    checkEqual(log.filter((e) => e === "connect").length, 1, "one connect, then a reconnect");
    check(!log.includes("outdated"), "not outdated");
});

test("reload_resumes", async ({ harness, context }) => {
    // The last id is kept in localStorage: a reloaded page asks only for what it has not seen.
    let page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    const first = await harness.publishMany(3, "broadcast", "first");
    await waitReceived(page, first);
    checkEqual(await page.evaluate(() => localStorage.getItem("imbus.last_notification_id")), String(first.at(-1)),
               "the last id is stored");

    await page.reload();
    await page.waitForFunction(() => window.ready === true, null, { timeout: WAIT_MS });
    await waitEvent(page, "connect");
    const second = await harness.publishMany(2, "broadcast", "second");
    await waitReceived(page, second);
    checkEqual(await receivedIds(page), second, "after a reload: the new notifications, none of the earlier ones");

    // Away: a same-origin page without the bus; the worker and its socket go away.
    await page.goto(harness.url("/test/stats"));
    await harness.waitConnections(0);
    const away = await harness.publishMany(3, "broadcast", "away");
    await page.goto(harness.page());
    await page.waitForFunction(() => window.ready === true, null, { timeout: WAIT_MS });
    await waitEvent(page, "connect");
    await waitReceived(page, away);
    const after = await harness.publishMany(1, "broadcast", "after");
    await waitReceived(page, after);
    checkEqual(await receivedIds(page), [...away, ...after], "what was published while away arrives, nothing earlier is repeated");
});

test("outdated_version", async ({ harness, context }) => {
    const page = await openPage(context, harness.page("version=0.0-old"));
    await waitEvent(page, "outdated");
    const log = await page.evaluate(() => window.log);
    const disconnect = log.find((e) => e.event === "disconnect");
    checkEqual(disconnect?.detail, { code: 1000, reason: "OUTDATED_VERSION" }, "closed 1000 OUTDATED_VERSION");
    checkEqual(await page.evaluate(() => window.bus.isOutdated), true, "bus.isOutdated");
    // The worker stays down: no connection for 2 s (polled), no reconnect attempt.
    for (let i = 0; i < 10; ++i) {
        checkEqual(await harness.connections(), 0, "no connection after OUTDATED_VERSION");
        await sleep(200);
    }
    // start() from the tab does not revive it either.
    await busCall(page, "start");
    for (let i = 0; i < 5; ++i) {
        checkEqual(await harness.connections(), 0, "start() after OUTDATED_VERSION does not reconnect");
        await sleep(200);
    }
    const names = (await events(page)).filter((e) => e !== "worker_state_updated");
    check(!names.includes("reconnecting") && !names.includes("reconnect"), `no reconnect: ${names.join(",")}`);
    checkEqual(names.filter((e) => e === "outdated").length, 1, "one outdated event");

    // A tab opened later on the same (deactivated) worker is told at once.
    const other = await openPage(context, harness.page("version=0.0-old"));
    await waitEvent(other, "outdated");
    checkEqual(await harness.connections(), 0, "still no connection");
});

test("worker_fallback", async ({ harness, context }) => {
    // No SharedWorker (deleted before the page's scripts run) and useSharedWorker=false: each
    // tab has its own dedicated Worker and its own socket, and still connects and receives.
    const noShared = await openPage(context, harness.page("channel=only-a"),
                                    { initScript: () => { delete window.SharedWorker; } });
    checkEqual(await noShared.evaluate(() => [typeof SharedWorker, window.bus.useSharedWorker]),
               ["undefined", false], "SharedWorker is gone, the bus uses a Worker");
    const optedOut = await openPage(context, harness.page("useSharedWorker=false&channel=only-b"));
    await waitEvent(noShared, "connect");
    await waitEvent(optedOut, "connect");
    await harness.waitConnections(2);

    const ids = await harness.publishMany(2);
    await waitReceived(noShared, ids);
    await waitReceived(optedOut, ids);
    await barrier(harness, noShared);
    await barrier(harness, optedOut);
    check(await deliveredOn(harness, noShared, "only-a"), "tab A's own channel reaches tab A");
    check(!await deliveredOn(harness, noShared, "only-b"), "tab B's channel is not on tab A's socket");
    check(await deliveredOn(harness, optedOut, "only-b"), "tab B's own channel reaches tab B");
    check(!await deliveredOn(harness, optedOut, "only-a"), "tab A's channel is not on tab B's socket");

    await noShared.close();
    await harness.waitConnections(1);  // a dedicated worker (and its socket) ends with its tab
});

test("stop_start", async ({ harness, context }) => {
    // stop() closes the socket with 1000 (no reconnect); start() opens it again and resumes
    // from the last id: what was published in between arrives, nothing is repeated.
    const page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    const first = await harness.publishMany(2, "broadcast", "first");
    await waitReceived(page, first);
    await busCall(page, "stop");
    await waitEvent(page, "disconnect");
    await harness.waitConnections(0);
    const log = await page.evaluate(() => window.log);
    checkEqual(log.find((e) => e.event === "disconnect").detail.code, 1000, "stop() closes with 1000");
    const whileStopped = await harness.publishMany(2, "broadcast", "stopped");
    await sleep(1500);  // longer than the first retry delay: a stopped worker must not reconnect
    checkEqual(await harness.connections(), 0, "a stopped worker does not reconnect");
    await busCall(page, "start");
    await waitEvent(page, "connect", 2);  // a clean close is no outage: `connect`, not `reconnect`
    await waitReceived(page, whileStopped);
    checkEqual(await receivedIds(page), [...first, ...whileStopped], "resumed from the last id, nothing repeated");
});

// --- lifecycle, identity, offline queue, refused login (Odoo 19's worker behaviour) -------------

const countOf = (log, name) => log.filter((e) => e === name).length;

test("tab_stop_leaves_only_that_tab", async ({ harness, context }) => {
    // stop() is this tab leaving the shared socket: its channels are released and it hears no
    // more notifications, while the other tab keeps the socket. The last tab to stop closes it;
    // start() joins again with the tab's channels.
    const a = await openPage(context, harness.page("channel=a-only"));
    const b = await openPage(context, harness.page("channel=b-only"));
    await waitEvent(a, "connect");
    await waitEvent(b, "connect");
    await harness.waitConnections(1);
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "b-only"), "tab B's channel is subscribed while B is started");

    await busCall(b, "stop");
    await barrier(harness, a);
    const heardByB = await receivedIds(b);
    check(!await deliveredOn(harness, a, "b-only"), "tab B's channel is released once B stopped");
    check(await deliveredOn(harness, a, "a-only"), "tab A still receives on its own channel");
    const ids = await harness.publishMany(2);
    await waitReceived(a, ids);
    checkEqual(await receivedIds(b), heardByB, "the stopped tab hears no notification");
    checkEqual(await harness.connections(), 1, "the socket stays open for tab A");
    checkEqual(countOf(await events(a), "disconnect"), 0, "tab A saw no disconnect");

    await busCall(a, "stop");
    await harness.waitConnections(0);  // the last started tab stopped
    await busCall(b, "start");
    await waitEvent(b, "connect", 2);
    await barrier(harness, b);
    check(await deliveredOn(harness, b, "b-only"), "tab B's channel is back once B started again");
});

// Playwright turns the back-forward cache off (--disable-back-forward-cache): these tests run a
// browser of their own with it on.
async function withCacheBrowser(fn) {
    const cacheBrowser = await chromium.launch({ executablePath: options.chromium, args: CHROMIUM_ARGS, timeout: 30000,
                                                ignoreDefaultArgs: ["--disable-back-forward-cache"] });
    try {
        return await fn(await cacheBrowser.newContext());
    } finally {
        await cacheBrowser.close();
    }
}

// How the page came back: restored from the cache, or loaded afresh (and then why not restored).
// Chromium sometimes restarts a restore as a reload (seen about once in 30 runs with a
// ThreadSanitizer server): that says nothing about the page, unlike a back_forward load.
const cameBack = (page) => page.evaluate(() => {
    const entry = performance.getEntriesByType("navigation")[0];
    return { restored: window.restoredFromCache === true, type: entry?.type,
             reasons: (entry?.notRestoredReasons?.reasons ?? []).map((r) => r.reason) };
});
// After a back navigation: the restored page's pageshow, or a fresh page ready with nothing yet.
const backAgain = (page) => waitFor(page, "the page back, restored or loaded afresh",
                                    () => window.restoredFromCache === true || (window.ready === true && window.received.length === 0));

test("bfcache_restore", async ({ harness }) => {
    // A page left for another one may stay in the back-forward cache (pagehide with persisted):
    // it must not leave the worker, and once restored (pageshow with persisted) it must hear the
    // socket again. Before, every pagehide left and a restored tab was deaf. Nothing is published
    // while it is cached (see bfcache_message_evicts: a message would evict it).
    await withCacheBrowser(async (context) => {
        const page = await openPage(context, harness.page("channel=cached"));
        await waitEvent(page, "connect");
        const before = await harness.publishMany(2, "cached", "before");
        await waitReceived(page, before);
        await page.goto(harness.url("/test/stats"));
        await page.goBack({ waitUntil: "commit" });  // a page restored from the cache fires no load
        await backAgain(page);
        const back = await cameBack(page);
        check(back.restored || back.type === "reload", `restored from the back-forward cache: ${JSON.stringify(back)}`);
        if (!back.restored) await waitEvent(page, "connect");
        const after = await harness.publishMany(2, "cached", "after");
        await waitReceived(page, after);
        checkEqual(await receivedIds(page), back.restored ? [...before, ...after] : after,
                   "each notification once, across the cache");
        checkEqual(await harness.connections(), 1, "one socket");
    });
});

test("bfcache_message_evicts", async ({ harness }) => {
    // The worker keeps posting to a cached tab, and Chromium evicts a cached page that gets a
    // SharedWorker message ("sharedworker-message"): on the way back it loads afresh instead of
    // showing a page that missed notifications, hears the socket again and never gets a
    // notification twice. Another tab shows when the worker has posted them.
    await withCacheBrowser(async (context) => {
        const page = await openPage(context, harness.page("channel=cached"));
        const witness = await openPage(context, harness.page("channel=cached"));
        await waitEvent(page, "connect");
        await waitEvent(witness, "connect");
        await page.goto(harness.url("/test/stats"));
        const away = await harness.publishMany(2, "cached", "away");
        await waitReceived(witness, away);  // posted to the cached page's port too
        await page.goBack({ waitUntil: "commit" });
        await backAgain(page);
        const back = await cameBack(page);
        check(!back.restored, `a cached page that got a message is not shown as it was: ${JSON.stringify(back)}`);
        check(back.type === "reload" || back.reasons.includes("sharedworker-message"),
              `evicted for the worker's message: ${JSON.stringify(back)}`);
        await waitEvent(page, "connect");
        const after = await harness.publishMany(2, "cached", "after");
        await waitReceived(page, after);
        checkEqual(await receivedIds(page), after, "the fresh page: what came after it loaded, once");
        checkEqual(await harness.connections(), 1, "one socket for both tabs");
    });
});

test("pagehide_pageshow_persisted", async ({ harness, context }) => {
    // The handlers themselves, with synthetic events: pagehide persisted keeps the tab, pagehide
    // not persisted leaves, pageshow persisted joins again (with the tab's channels).
    const a = await openPage(context, harness.page("channel=stay"));
    const b = await openPage(context, harness.page("channel=hidden"));
    await waitEvent(a, "connect");
    await waitEvent(b, "connect");
    const transition = (page, type, persisted) =>
        page.evaluate(([t, p]) => dispatchEvent(new PageTransitionEvent(t, { persisted: p })), [type, persisted]);

    await transition(b, "pagehide", true);
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "hidden"), "a page kept in the cache keeps its channels");
    await transition(b, "pagehide", false);
    await barrier(harness, a);
    check(!await deliveredOn(harness, a, "hidden"), "a page unloaded for good releases them");
    await transition(b, "pageshow", true);
    await barrier(harness, b);
    check(await deliveredOn(harness, b, "hidden"), "restored: the tab's channel is subscribed again and the tab hears it");
    checkEqual(await harness.connections(), 1, "one socket throughout");
});

test("online_waits_before_restart", async ({ harness, context }) => {
    // `offline` closes the socket; back `online`, the tab restarts it after backOnlineDelay
    // (default 5 s: the network is rarely usable at once, and a retry at once would fail and
    // back off), and only if the tab is started. Before, `online` reconnected at once, started
    // or not. The test shortens the delay to 1 s.
    const page = await openPage(context, harness.page("backOnlineDelay=1000"));
    await waitEvent(page, "connect");
    await page.evaluate(() => dispatchEvent(new Event("offline")));
    await harness.waitConnections(0);
    const online = await page.evaluate(() => { dispatchEvent(new Event("online")); return performance.now(); });
    await waitEvent(page, "connect", 2);  // a clean close: `connect` again, not `reconnect`
    const at = await page.evaluate(() => window.log.filter((e) => e.event === "connect")[1].at);
    check(at - online >= 990 && at - online < 4000, `reconnected ${Math.round(at - online)} ms after online (about 1000 expected)`);

    await page.evaluate(() => dispatchEvent(new Event("offline")));
    await harness.waitConnections(0);
    await busCall(page, "stop");
    await page.evaluate(() => dispatchEvent(new Event("online")));
    await sleep(1500);  // proves a negative: past the 1 s delay, a stopped tab does not restart
    checkEqual(await harness.connections(), 0, "no reconnection for a stopped tab");
    checkEqual(countOf(await events(page), "connect"), 2, "no connect after online while stopped");
});

test("disconnect_once_per_outage", async ({ harness, context, restart }) => {
    // While the server is away the worker fails attempt after attempt; the tabs hear one
    // `disconnect` and one `reconnecting` for the outage, then one `reconnect`. Before, both
    // fired on every failed attempt.
    const page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    await harness.stop();
    await waitEvent(page, "reconnecting");
    // each attempt is CONNECTING then DISCONNECTED: the first DISCONNECTED is the outage's start
    await waitFor(page, "two failed attempts", () =>
        window.log.filter((e) => e.event === "worker_state_updated" && e.detail === "DISCONNECTED").length >= 3, null, RECONNECT_MS);
    await restart();
    await waitEvent(page, "reconnect", 1, RECONNECT_MS);
    const log = await events(page);
    checkEqual(["connect", "disconnect", "reconnecting", "reconnect"].map((name) => countOf(log, name)), [1, 1, 1, 1],
               "connect, disconnect, reconnecting, reconnect: once each");
});

test("reconnect_after_unclean_close_only", async ({ harness, context, restart }) => {
    // `reconnect` means an unclean close was recovered (the server went away: 1001); a socket
    // the tab closed itself (stop) and opened again is a `connect`.
    const page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    await busCall(page, "stop");
    await waitEvent(page, "disconnect");
    await busCall(page, "start");
    await waitEvent(page, "connect", 2);
    checkEqual(countOf(await events(page), "reconnect"), 0, "no reconnect after stop() and start()");
    await harness.stop();
    await restart();
    await waitEvent(page, "reconnect", 1, RECONNECT_MS);
    const log = await events(page);
    checkEqual([countOf(log, "connect"), countOf(log, "reconnect")], [2, 1], "the server's restart is a reconnect");
});

test("identity_change", async ({ harness, context }) => {
    // A tab of another user joins the worker (Odoo's initialize_connection with another uid):
    // the socket is closed cleanly and reopened for the new user, and no channel of the old one
    // stays subscribed. A tab of the same identity just shares the socket.
    const a = await openPage(context, harness.page("uid=1&db=test&channel=user-1"));
    await waitEvent(a, "connect");
    await barrier(harness, a);
    check(await deliveredOn(harness, a, "user-1"), "user 1's channel is subscribed");
    const { handshakes } = await harness.stats();

    const b = await openPage(context, harness.page("uid=2&db=test&channel=user-2"));
    await waitEvent(a, "connect", 2);
    await waitEvent(b, "connect");
    const disconnect = (await a.evaluate(() => window.log)).find((e) => e.event === "disconnect");
    checkEqual(disconnect?.detail, { code: 1000, reason: "identity changed" }, "the old socket was closed cleanly");
    checkEqual((await harness.stats()).handshakes, handshakes + 1, "one new handshake, for the new user");
    await harness.waitConnections(1);
    await barrier(harness, b);
    check(await deliveredOn(harness, b, "user-2"), "the new user's channel is subscribed");
    check(!await deliveredOn(harness, b, "user-1"), "the old user's channel is not");

    const c = await openPage(context, harness.page("uid=2&db=test"));
    await waitEvent(c, "connect");
    checkEqual((await harness.stats()).handshakes, handshakes + 1, "a tab of the same identity shares the socket");
});

test("force_update_channels", async ({ harness, context }) => {
    // forceUpdateChannels() subscribes again although the set did not change; calls in a row
    // are debounced into one subscribe.
    const page = await openPage(context, harness.page("channel=forced"));
    await waitEvent(page, "connect");
    await barrier(harness, page);
    const { subscribes } = await harness.stats();
    await page.evaluate(() => { for (let i = 0; i < 3; ++i) window.bus.forceUpdateChannels(); });
    await harness.waitStat("subscribes", subscribes + 1);
    await busCall(page, "addChannel", "forced");
    await busCall(page, "deleteChannel", "forced");
    await sleep(800);  // past the 300 ms debounce: nothing more was sent
    checkEqual((await harness.stats()).subscribes, subscribes + 1,
               "three forced updates made one subscribe; an unchanged set without force none");
});

test("offline_queue_coalesced", async ({ harness, context, restart }) => {
    // During an outage the page sends 36 presence updates, 36 typing states (key "r1") and 12
    // distinct requests. Replayed as is, 84 frames at once would exceed the server's rate limit
    // (10 frames per 2 s: close 1013, the queue lost). The worker keeps the latest request per
    // event name and key (update_presence always coalesces) and spreads the replay: the
    // restarted server gets exactly the 12 distinct ones and the two latest states, in order.
    const page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    await harness.stop();
    await waitEvent(page, "reconnecting");
    await page.evaluate(() => {
        for (let i = 0; i < 36; ++i) {
            window.bus.send("update_presence", { inactivity_period: i });
            window.bus.send("typing", { room: "r1", i }, { key: "r1" });
            if (i % 3 === 0) window.bus.send("note", { i });
        }
    });
    const expected = [];  // keys sorted, as the server's JSON prints them
    for (let i = 0; i < 36; i += 3) expected.push({ data: { i }, event_name: "note" });
    expected.push({ data: { inactivity_period: 35 }, event_name: "update_presence" },
                  { data: { i: 35, room: "r1" }, event_name: "typing" });

    const server = await restart();
    await waitEvent(page, "reconnect", 1, RECONNECT_MS);
    const deadline = Date.now() + WAIT_MS;
    while ((await server.clientEvents()).length < expected.length && Date.now() < deadline) await sleep(100);
    checkEqual(await server.clientEvents(), expected, "the server got the coalesced requests, in order");
    const log = await page.evaluate(() => window.log);
    checkEqual(log.filter((e) => e.event === "disconnect").map((e) => e.detail.code), [1001],
               "one disconnect (the server's stop), no 1013 after the reconnect");
});

test("refused_login", async ({ harness, context }) => {
    // A handshake the policy refuses (401) reaches the browser as a bare 1006. The worker asks
    // the socket's URL with a plain GET, which answers the refusal: it broadcasts `refused`
    // and stops retrying until start() is called again. Before, it retried forever.
    const page = await openPage(context, harness.page("token=bad"));
    await waitEvent(page, "refused");
    const log = await page.evaluate(() => window.log);
    checkEqual(log.find((e) => e.event === "refused").detail, { status: 401, reason: "bad token" }, "the refusal's status and reason");
    check(!log.some((e) => e.event === "reconnecting"), "no reconnection scheduled");
    const stats = await harness.stats();
    checkEqual([stats.handshakes, stats.probes], [1, 1], "one handshake, one probe");
    await sleep(2500);  // past the first retry delays (1 s, then 1.5-2.5 s)
    checkEqual((await harness.stats()).handshakes, 1, "no handshake after the refusal");
    await busCall(page, "start");  // e.g. after a new login: one more attempt
    await waitEvent(page, "refused", 2);
    checkEqual((await harness.stats()).handshakes, 2, "start() tried once more");
    checkEqual(await harness.connections(), 0, "never connected");
});

// --- regressions: bugs of js/ and imbus.hpp this suite found ------------------------------------

// --- main tab election (js/main_tab.js) ---------------------------------------------------------

// Opens `count` tabs of one browser, each running a MainTab; window.mainLog keeps its events.
async function mainTabs(harness, context, count, initScript) {
    const pages = [];
    for (let i = 0; i < count; ++i) {
        const page = await openPage(context, harness.url("/tests/browser/blank.html"), { initScript });
        await page.evaluate(async () => {
            const { MainTab } = await import("/js/main_tab.js");
            window.mainLog = [];
            window.mainTab = new MainTab({ name: "test-main-tab" });
            window.mainTab.addEventListener("change", (e) => window.mainLog.push(e.detail));
            window.mainTab.start();
        });
        pages.push(page);
    }
    return pages;
}

const isMain = (page) => page.evaluate(() => window.mainTab.isMain);

// Waits until exactly one of `pages` is main and returns it; the others must not be.
async function theMainTab(pages, timeout = WAIT_MS) {
    const deadline = Date.now() + timeout;
    for (;;) {
        const flags = await Promise.all(pages.map(isMain));
        const mains = pages.filter((_, i) => flags[i]);
        if (mains.length === 1) return mains[0];
        if (Date.now() > deadline) throw new AssertionError(`expected one main tab, found ${mains.length}`);
        await sleep(50);
    }
}

test("readme_snippets", async ({ harness, context }) => {
    // The README's js blocks, as written, run together in one page (imports first, then the
    // blocks in order), with the application's functions they call standing in: a notification
    // on room:42 reaches show() and, in the main tab, ding(), and nothing fails in the page.
    check(options.root, "--root (the source tree) is needed to read the README");
    const readme = readFileSync(join(options.root, "README.md"), "utf8");
    const blocks = [...readme.matchAll(/^```js\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
    check(blocks.length >= 3, `the README's js blocks (found ${blocks.length})`);
    const lines = blocks.join("\n").split("\n");
    const imports = lines.filter((l) => l.startsWith("import "));
    const code = lines.filter((l) => !l.startsWith("import "));
    const module = [...imports,
        "window.readme = { shown: [], dings: 0, banners: [], logins: [] };",
        "const show = (...args) => window.readme.shown.push(args);",
        "const banner = (text) => window.readme.banners.push(text);",
        "const reloadState = () => {};",
        "const login = (status) => window.readme.logins.push(status);",
        "const ding = () => ++window.readme.dings;",
        ...code,
        "window.readme.bus = bus; window.readme.mainTab = mainTab; window.readme.presence = presence;",
        "bus.addEventListener(\"connect\", () => { window.readme.connected = true; });"].join("\n");
    const page = await openPage(context, harness.url("/tests/browser/blank.html"));
    await page.addScriptTag({ type: "module", content: module });
    await waitFor(page, "the README's blocks to run", () => window.readme?.connected === true);
    await waitFor(page, "the election of the only tab", () => window.readme.mainTab.isMain);
    await harness.waitConnections(1);
    const deadline = Date.now() + WAIT_MS;  // room:42 goes in the worker's first subscribe
    let shown = [];
    while (shown.length === 0) {
        check(Date.now() < deadline, "a chat/message on room:42 never reached show()");
        await harness.publish({ channel: "room:42", type: "chat/message", payload: { text: "hello" } });
        await sleep(50);
        shown = await page.evaluate(() => window.readme.shown);
    }
    checkEqual(shown[0], [{ text: "hello" }], "show(payload) got the message");
    check(await page.evaluate(() => window.readme.dings) >= 1, "the main tab rang");
    const errors = page.consoleLines.filter((l) => l.startsWith("pageerror") || l.startsWith("error"));
    checkEqual(errors, [], "no error in the page");
});

test("main_tab_election", async ({ harness, context }) => {
    const pages = await mainTabs(harness, context, 3);
    const first = await theMainTab(pages);
    check(pages.indexOf(first) === 0, "the first tab to start is main");
    const firstId = await first.evaluate(() => window.mainTab.id);
    for (const page of pages.slice(1)) {
        await waitFor(page, "the announcement of the main tab", (id) => window.mainTab.main === id, firstId);
        check((await page.evaluate(() => window.mainLog)).every((d) => !d.isMain), "a waiting tab never called itself main");
    }

    // Closing the main tab hands the lock to exactly one of the others, which announces itself.
    await first.close();
    const rest = pages.slice(1);
    const second = await theMainTab(rest);
    const secondId = await second.evaluate(() => window.mainTab.id);
    const other = rest.find((p) => p !== second);
    await waitFor(other, "the new main tab's announcement", (id) => window.mainTab.main === id, secondId);
    await waitFor(second, "a change event saying it is main", () => window.mainLog.some((d) => d.isMain));

    // A frozen main tab lets go (a frozen page runs nothing, so it must not keep the role); on
    // resume it queues again behind the tab that took over.
    await second.evaluate(() => document.dispatchEvent(new Event("freeze")));
    check(!await isMain(second), "a frozen tab is not main");
    check(await theMainTab(rest) === other, "the other tab took over from the frozen one");
    await second.evaluate(() => document.dispatchEvent(new Event("resume")));
    await sleep(200);  // proves a negative: the resumed tab waits its turn
    check(!await isMain(second), "the resumed tab waits while another is main");

    // Into the back-forward cache: let go; back from it: queue again. stop(): leave for good.
    await other.evaluate(() => window.dispatchEvent(new PageTransitionEvent("pagehide", { persisted: true })));
    check(await theMainTab(rest) === second, "the tab waiting took over from the one in the back-forward cache");
    await other.evaluate(() => window.dispatchEvent(new PageTransitionEvent("pageshow", { persisted: true })));
    await second.evaluate(() => window.mainTab.stop());
    check(await theMainTab(rest) === other, "after stop(), the tab back from the cache is main");
});

test("main_tab_without_web_locks", async ({ harness, context }) => {
    // Not a secure context (plain http to another machine): no navigator.locks. The tabs elect
    // through localStorage heartbeats; a closed main tab is replaced once its stamp is stale.
    const noLocks = () => Object.defineProperty(Navigator.prototype, "locks", { get: () => undefined });
    const pages = await mainTabs(harness, context, 2, noLocks);
    check(await pages[0].evaluate(() => !navigator.locks), "the init script hid navigator.locks");
    const first = await theMainTab(pages);
    const other = pages.find((p) => p !== first);
    // A main tab that hangs stops stamping: the other takes over once the stamp is 3 s old.
    await first.evaluate(() => clearInterval(window.mainTab._timer));
    await waitFor(other, "the take-over of a stale stamp", () => window.mainTab.isMain);
    await first.close();
    await other.evaluate(() => window.mainTab.stop());
    check(!await isMain(other), "stop() gives the role up");
    check(await other.evaluate((name) => localStorage.getItem(name), "test-main-tab") === null,
          "stop() removes the stamp, so the next tab need not wait for it to go stale");
});

test("http_connection_close", async ({ harness }) => {
    // websocketpp serves one HTTP request per connection and closes it after the response, but
    // the response does not say `Connection: close`. HTTP/1.1 clients (Node's fetch, keep-alive
    // pools of any backend calling POST /bus/send) then reuse the socket the server is closing,
    // and a request on it fails ("other side closed"): about 2-5 in 1000 sequential fetch() POSTs
    // here. Shown deterministically: a keep-alive request is answered without `Connection: close`
    // and then the socket is closed anyway.
    const { port } = harness;
    const { head, closed } = await new Promise((resolve, reject) => {
        const socket = tcpConnect(port, "127.0.0.1");
        let data = "";
        socket.setEncoding("utf8");
        socket.on("connect", () => socket.write(`GET /websocket/health HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`));
        socket.on("data", (chunk) => { data += chunk; });
        socket.on("error", reject);
        // the server closes at once, or never: 1 s is the negative proof that it keeps the socket
        const timer = setTimeout(() => { socket.destroy(); resolve({ head: data, closed: false }); }, 1000);
        socket.on("end", () => { clearTimeout(timer); socket.destroy(); resolve({ head: data, closed: true }); });
    });
    check(head.startsWith("HTTP/1.1 200"), `answered: ${head.split("\r\n")[0]}`);
    const saysClose = /^connection:\s*close\s*$/im.test(head.split("\r\n\r\n")[0]);
    check(!closed || saysClose, "the server closed a keep-alive connection after the response without `Connection: close`");
});

test("outdated_worker_refuses_current_tab", async ({ harness, context }) => {
    // After a deploy, an old tab (old version) is told OUTDATED_VERSION and the shared worker
    // deactivates. The user reloads one tab (now the server's version) while another old tab is
    // still open: the reloaded tab joins the same SharedWorker (same URL and name), which is
    // still deactivated, so it is told "outdated" too and never connects until every tab of the
    // origin is closed.
    const old = await openPage(context, harness.page("version=0.0-old"));
    await waitEvent(old, "outdated");
    const current = await openPage(context, harness.page());  // the server's version (19.0-2)
    await waitEvent(current, "connect");
    await harness.waitConnections(1);
    const ids = await harness.publishMany(1);
    await waitReceived(current, ids);
});

test("late_tab_version_switches_worker", async ({ harness, context, restart }) => {
    // websocket_worker.js says "the first tab decides the URL", but initializeConnection lets
    // every later tab overwrite websocketURL/version (without reconnecting). A stale tab joining
    // a current one thus makes the next reconnect use the stale version: OUTDATED_VERSION for
    // every tab, the current one included.
    const current = await openPage(context, harness.page());
    await waitEvent(current, "connect");
    const stale = await openPage(context, harness.page("version=0.0-old"));
    // Once the worker answered its initialize_connection, the worker took its version. (The stale
    // tab gets no "connect" either: only a tab with the worker's own URL and version is told.)
    await waitFor(stale, "the stale tab's initialize", () => window.bus.workerState !== null);
    await harness.stop();
    await waitEvent(current, "reconnecting");
    await restart();
    await waitEvent(current, "reconnect", 1, RECONNECT_MS);
    check(!(await events(current)).includes("outdated"), "the current tab is not outdated after a reconnect");
});

test("fallback_after_throw_doubles_channels", async ({ harness, context }) => {
    // new SharedWorker() can throw (e.g. a CSP worker-src refusal). startWorker() then falls back
    // to a dedicated Worker, and _fallBackToWorker() replays this tab's channelCounts; after
    // that, startWorker() also flushes `queued`, which holds the same add_channel posts made
    // before start(). The worker counts each channel twice: one deleteChannel() (the tab's count
    // is then 0) leaves it subscribed for good.
    const page = await openPage(context, harness.page("channel=dup"), {
        initScript: () => { window.SharedWorker = function () { throw new DOMException("refused", "SecurityError"); }; },
    });
    await waitEvent(page, "connect");
    checkEqual(await page.evaluate(() => window.bus.useSharedWorker), false, "fell back to a dedicated Worker");
    await barrier(harness, page);
    check(await deliveredOn(harness, page, "dup"), "'dup' is subscribed");
    await busCall(page, "deleteChannel", "dup");
    await barrier(harness, page);
    check(!await deliveredOn(harness, page, "dup"), "after the tab's only delete, 'dup' is unsubscribed");
});

test("store_reset_stale_cursor", async ({ harness, context, restart }) => {
    // PROTOCOL §2: a `last` above the store's newest id means the store was reset; the server
    // then starts the client over (and sends the missed-notifications marker). The client keeps
    // its old, higher last id (Math.max in websocket_worker.js and bus_service.js), so at the
    // next reconnect it asks for ids above it: what the new store got below that is lost.
    const page = await openPage(context, harness.page());
    await waitEvent(page, "connect");
    const old = await harness.publishMany(5, "broadcast", "old");  // ids 1..5
    await waitReceived(page, old);
    await harness.stop();
    const fresh = await restart({ fresh: true });  // an empty store on the same port
    await waitEvent(page, "reconnect", 1, RECONNECT_MS);
    await waitEvent(page, "missed_notifications");
    const a = await fresh.publishMany(2, "broadcast", "new");  // ids 1, 2 of the new store
    await waitCount(page, old.length + a.length);
    await fresh.stop();
    const again = await restart();  // the same new store
    const b = await again.publishMany(3, "broadcast", "away");  // 3..5, before the page reconnects
    await waitEvent(page, "reconnect", 2, RECONNECT_MS);
    const c = await again.publishMany(1, "broadcast", "after");
    await waitFor(page, "the last notification", (p) => window.received.some((r) => r.payload.tag === p), "after");
    checkEqual((await receivedIds(page)).slice(old.length), [...a, ...b, ...c],
               "after the reset, every notification of the new store exactly once");
});

// --- presence (js/presence.js, imbus::presence_tracker) -------------------------------------------

// Waits until a tab has received exactly these statuses from the tracker, in order; with
// `tail`, until the statuses it received end with them (a tab that joined the shared socket
// later missed the first ones).
const waitStatuses = (page, statuses, timeout = WAIT_MS, tail = false) =>
    waitFor(page, `presence ${statuses.join(",")}`, ([want, tail]) => {
        const got = window.notifications.filter((n) => n.type === "imbus/presence").map((n) => n.payload.status);
        return JSON.stringify(tail ? got.slice(-want.length) : got) === JSON.stringify(want);
    }, [statuses, tail], timeout);
const serverPresenceUpdates = async (server) =>
    JSON.parse((await server.request("GET", "/test/events")).body)
        .filter((e) => e.event_name === "update_presence").map((e) => e.data.inactivity_period);

test("presence_shared_activity", async ({ context }) => {
    // A harness whose tracker says away after 1.5 s idle: activity in tab A is tab B's too
    // (localStorage), both tell the server, and the server publishes online, away, online, away.
    const AWAY_MS = 1500;
    const dir = mkdtempSync(join(tmpdir(), "imbus-browser-presence-"));
    let server;
    try {
        server = await new Harness({ data: join(dir, "bus.db"), extra: ["--presence-away-ms", String(AWAY_MS)] }).start();
        const start = (page) => page.evaluate(async (awayAfter) => {
            const { Presence } = await import("/js/presence.js");
            window.presence = new Presence(window.bus, { awayAfter });
        }, AWAY_MS);
        const a = await openPage(context, server.url("/tests/browser/page.html?channel=presence"));
        const b = await openPage(context, server.url("/tests/browser/page.html?channel=presence"));
        await start(a);
        await start(b);
        await waitStatuses(a, ["online"]);
        await waitStatuses(a, ["online", "away"], AWAY_MS + WAIT_MS);
        await waitStatuses(b, ["away"], WAIT_MS, true);
        check(await b.evaluate((ms) => window.presence.inactivityPeriod() >= ms, AWAY_MS), "tab B is idle too");

        const before = (await serverPresenceUpdates(server)).length;
        const sentByB = await b.evaluate(() => window.presence.sent);
        await a.keyboard.press("Shift");  // activity in tab A only
        await waitStatuses(a, ["online", "away", "online"]);
        await waitStatuses(b, ["away", "online"], WAIT_MS, true);
        check(await b.evaluate(() => window.presence.inactivityPeriod() < 1000), "tab B shares tab A's activity");
        // Tab B, back from away through the storage event, told the server as well.
        await waitFor(b, "tab B's update_presence", (n) => window.presence.sent > n, sentByB);
        const deadline = Date.now() + WAIT_MS;
        let updates;
        while ((updates = (await serverPresenceUpdates(server)).slice(before)).length < 2) {
            check(Date.now() < deadline, `the server got ${updates.length} update_presence after the activity, not 2`);
            await sleep(50);
        }
        check(updates.every((ms) => ms < 1000), `the server sees small inactivity periods: ${updates}`);

        await waitStatuses(a, ["online", "away", "online", "away"], AWAY_MS + WAIT_MS);  // idle again
    } finally {
        if (server) await server.stop();
        rmSync(dir, { recursive: true, force: true });
    }
});

// --- the chat demo (examples/chat, --chat PATH) ----------------------------------------------------
//
// A chat test drives index.html/app.js through their data-testid elements, one browser context
// per user (a context is a browser profile: its own cookie, its own SharedWorker and socket).

const CHAT_SECRET = "imbus-browser-suite-chat-secret";  // >= 16 bytes; kept across restarts

class ChatServer extends ServerProcess {
    constructor({ data, port = 0, extra = [] }) {
        super("example_chat", port);
        this.data = data;
        this.extra = extra;  // more flags, e.g. --presence-away-ms, or another --secret
    }

    start() {
        const args = ["--port", String(this.requestedPort), "--data", this.data, "--secret", CHAT_SECRET];
        if (options.root) args.push("--static", options.root);  // serves examples/chat/ at /, js/ at /js/
        args.push(...this.extra);
        return this.launch(options.chat, args, /^imbus chat on http:\/\/127\.0\.0\.1:(\d+)\//);
    }
}

const tid = (id) => `[data-testid="${id}"]`;

// An init script: records in window.busNotifications every notification the tab's BusService
// gets from its SharedWorker ({type: "notification"} posts on the worker's port), i.e. all that
// the context's one WebSocket delivered (the worker forwards each one to every tab). app.js keeps
// its BusService to itself; this listens next to it without changing what it sees.
function recordBusNotifications() {
    window.busNotifications = [];
    const Native = window.SharedWorker;
    if (!Native) return;
    window.SharedWorker = class extends Native {
        constructor(...args) {
            super(...args);
            this.port.addEventListener("message", ({ data }) => {
                if (data?.type === "notification") window.busNotifications.push(...data.data);
            });
        }
    };
}

// What a chat page shows, for failure messages (runs in the page).
function chatSnapshot() {
    const one = (id) => document.querySelector(`[data-testid="${id}"]`);
    const all = (id) => [...document.querySelectorAll(`[data-testid="${id}"]`)];
    return {
        me: one("me-name")?.textContent,
        room: one("room-title")?.textContent,
        rooms: all("room-button").map((b) => b.dataset.room),
        messages: all("message").map((m) => `${m.dataset.id}:${m.dataset.user}:${m.querySelector('[data-testid="message-text"]')?.textContent}`),
        presence: all("presence-item").map((p) => `${p.dataset.user}:${p.dataset.status}`),
        typing: one("typing-indicator")?.textContent,
        banner: one("connection-banner")?.hidden ? "(hidden)" : one("connection-banner")?.textContent,
        errors: [one("login-error")?.textContent, one("chat-error")?.textContent].filter(Boolean),
        notifications: (window.busNotifications || []).map((n) => `${n.id}:${n.message?.type}`),
    };
}

async function waitChat(page, what, fn, arg, timeout = WAIT_MS) {
    try {
        await page.waitForFunction(fn, arg, { timeout, polling: 50 });
    } catch (error) {
        const shown = await page.evaluate(chatSnapshot).catch(() => "(page gone)");
        throw new AssertionError(`timed out after ${timeout} ms waiting for ${what} (${page.user}'s page)\n  page: ${JSON.stringify(shown)}\n  ${error.message.split("\n")[0]}`);
    }
}

/** A new tab of `context` on the chat, logged in as `name` (the login form, then the chat view). */
async function chatLogin(context, server, name) {
    const page = await context.newPage();
    page.user = name;
    page.setDefaultTimeout(WAIT_MS);
    page.consoleLines = [];
    page.on("console", (message) => page.consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => page.consoleLines.push(`pageerror: ${error.message}`));
    await page.addInitScript(recordBusNotifications);
    await page.goto(server.url("/"));
    await page.locator(tid("login-name")).fill(name);  // waits for the form (shown after GET /chat/me: no name)
    await page.locator(tid("login-submit")).click();
    await waitChat(page, `the chat view for ${name}`,
                   (n) => !document.querySelector('[data-testid="chat-view"]').hidden
                          && document.querySelector('[data-testid="me-name"]').textContent === n, name);
    return page;
}

const urlIs = (response, path, room) => {
    const url = new URL(response.url());
    return url.pathname === path && (room === undefined || url.searchParams.get("room") === room);
};

/** Joins `room` with the join form; returns once its history is loaded and it is on screen. */
async function joinRoom(page, room) {
    const history = page.waitForResponse((r) => urlIs(r, "/chat/history", room));
    await page.locator(tid("join-input")).fill(room);
    await page.locator(tid("join-button")).click();
    checkEqual((await history).status(), 200, `${page.user}: GET /chat/history?room=${room} after the join`);
    await waitChat(page, `#${room} joined and on screen`,
                   (r) => document.querySelector('[data-testid="room-title"]').textContent === `#${r}`
                          && document.querySelector(`[data-testid="room-button"][data-room="${r}"]`) !== null, room);
}

/** Sends `text` in the room on screen; returns {id, user, text} as the server stored it. */
async function sendMessage(page, text) {
    const sent = page.waitForResponse((r) => urlIs(r, "/chat/send"));
    await page.locator(tid("message-input")).fill(text);
    await page.locator(tid("send-button")).click();
    const response = await sent;
    checkEqual(response.status(), 200, `${page.user}: POST /chat/send "${text}"`);
    const { id, user } = await response.json();
    await waitChat(page, `the own message ${id}`, (i) => document.querySelector(`[data-testid="message"][data-id="${i}"]`) !== null, id);
    return { id: String(id), user, text };
}

// The message list as shown: [{id, user, text}], in order.
const shownMessages = (page) => page.evaluate(() =>
    [...document.querySelectorAll('[data-testid="message"]')].map((m) => ({
        id: m.dataset.id, user: m.dataset.user, text: m.querySelector('[data-testid="message-text"]').textContent })));

const waitMessage = (page, { id, user, text }, timeout = WAIT_MS) =>
    waitChat(page, `message ${id} "${text}" from ${user}`, ([i, u, t]) => {
        const item = document.querySelector(`[data-testid="message"][data-id="${i}"]`);
        return item?.dataset.user === u && item.querySelector('[data-testid="message-text"]')?.textContent === t;
    }, [id, user, text], timeout);

const waitPresence = (page, user, status) =>
    waitChat(page, `${user} ${status} in the presence list`,
             ([u, s]) => document.querySelector(`[data-testid="presence-item"][data-user="${u}"]`)?.dataset.status === s,
             [user, status]);

const waitTyping = (page, user, shown = true) =>
    waitChat(page, `"${user}" ${shown ? "in" : "gone from"} the typing indicator`,
             ([u, s]) => document.querySelector('[data-testid="typing-indicator"]').textContent.includes(u) === s,
             [user, shown]);

const waitBanner = (page, shown, timeout = WAIT_MS) =>
    waitChat(page, `the connection banner ${shown ? "shown" : "gone"}`, (s) => {
        const banner = document.querySelector('[data-testid="connection-banner"]');
        return s ? !banner.hidden && banner.textContent !== "" : banner.hidden;
    }, shown, timeout);

// The ids of the chat/message notifications the tab's BusService received.
const busMessageIds = (page) => page.evaluate(() =>
    window.busNotifications.filter((n) => n.message?.type === "chat/message").map((n) => String(n.message.payload.id)));

// Runs in a page: a WebSocket of its own (the page's origin and session cookie, the bus client's
// protocol version) that subscribes to `channels` from the first-poll window (last 0), as a
// hand-written client could, and records what it gets in window.rawNotifications.
async function openRawSocket(channels) {
    const { BusService } = await import("/js/bus_service.js");
    const version = new BusService().version;  // the constructor only reads its options
    window.rawNotifications = [];
    const socket = new WebSocket(`ws://${location.host}/websocket?version=${encodeURIComponent(version)}`);
    window.rawSocket = socket;
    socket.addEventListener("message", ({ data }) => {
        if (typeof data === "string") window.rawNotifications.push(...JSON.parse(data));
    });
    await new Promise((resolve, reject) => {
        socket.addEventListener("open", resolve);
        socket.addEventListener("close", ({ code, reason }) => reject(new Error(`raw socket closed: ${code} ${reason}`)));
    });
    socket.send(JSON.stringify({ event_name: "subscribe", data: { channels, last: 0 } }));
}

test("chat_cross_origin_socket_refused", { chat: true }, async ({ newContext, startChat }) => {
    // A page of another origin (another port: the same site, so the browser sends alice's
    // session cookie along) must not get a socket to the chat: the Origin allow-list refuses it.
    const server = await startChat();
    const context = await newContext();
    const alice = await chatLogin(context, server, "alice");
    const dir = mkdtempSync(join(tmpdir(), "imbus-browser-origin-"));
    let other;
    try {
        other = await new Harness({ data: join(dir, "bus.db") }).start();
        const stranger = await context.newPage();
        await stranger.goto(other.url("/tests/browser/page.html"));
        const tryOpen = (page) => page.evaluate((url) => new Promise((resolve) => {
            const socket = new WebSocket(url);
            socket.onopen = () => { resolve("open"); socket.close(); };
            socket.onclose = ({ code }) => resolve(`closed ${code}`);
        }), `ws://127.0.0.1:${server.port}/websocket`);  // "open" comes before any version check
        checkEqual(await tryOpen(stranger), "closed 1006", "the other origin's handshake is refused");
        checkEqual(await tryOpen(alice), "open", "the chat's own page opens one");
    } finally {
        if (other) await other.stop();
        rmSync(dir, { recursive: true, force: true });
    }
});

test("chat_two_users", { chat: true }, async ({ newContext, startChat }) => {
    // Two users (two contexts): live messages both ways, presence, typing, and offline on close.
    const server = await startChat();
    const alice = await chatLogin(await newContext(), server, "alice");
    const bobContext = await newContext();
    const bob = await chatLogin(bobContext, server, "bob");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    await waitPresence(alice, "bob", "online");
    await waitPresence(bob, "alice", "online");
    await waitPresence(alice, "alice", "online");

    // Typing sends "typing" over the socket (at most every 2 s); the room's other members show
    // it for 3 s. It arriving also proves the receiver's socket has room:lobby by now.
    await alice.locator(tid("message-input")).pressSequentially("hel");
    await waitTyping(bob, "alice");
    check(!(await alice.locator(tid("typing-indicator")).textContent()).includes("alice"), "alice is not shown her own typing");
    await bob.locator(tid("message-input")).pressSequentially("h");
    await waitTyping(alice, "bob");

    // Both histories were loaded at the join, before these were sent: they can only come live.
    const fromAlice = await sendMessage(alice, "hello bob, alice here");
    await waitMessage(bob, fromAlice);
    await waitTyping(bob, "alice", false);  // her message ends her typing at once
    const fromBob = await sendMessage(bob, "hi alice, bob here");
    await waitMessage(alice, fromBob);
    checkEqual(await shownMessages(alice), [fromAlice, fromBob], "alice's list: each message once, in order");
    await waitMessage(bob, fromBob);
    checkEqual(await shownMessages(bob), [fromAlice, fromBob], "bob's list: each message once, in order");
    checkEqual(await busMessageIds(bob), [fromAlice.id, fromBob.id], "bob's socket delivered each message once");

    await bobContext.close();  // bob's tab, worker and socket go away
    await waitPresence(alice, "bob", "offline");
    await waitPresence(alice, "alice", "online");
});

test("chat_room_privacy", { chat: true }, async ({ newContext, startChat }) => {
    // alice and bob are in "lobby", carol only in "other": nothing of the lobby reaches carol.
    // Checked on three levels: (1) every notification carol's WebSocket delivered to her tab
    // (recordBusNotifications: the SharedWorker's socket is out of reach of page.on("websocket"),
    // and app.js does not expose its bus, but the worker forwards each notification to the tab's
    // port, where the init script listens too); (2) a second socket of carol's own that asks for
    // room:lobby outright, from the first-poll window: the server's channel policy must refuse it;
    // (3) her page and the HTTP routes (history, send: 403). The negatives need no sleep: the
    // server sends a connection's notifications in id order, so once carol's later marker (in
    // "other") has arrived, any earlier lobby notification would have arrived before it.
    const server = await startChat();
    const alice = await chatLogin(await newContext(), server, "alice");
    const bob = await chatLogin(await newContext(), server, "bob");
    const carol = await chatLogin(await newContext(), server, "carol");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    await joinRoom(carol, "other");
    await carol.evaluate(openRawSocket, ["room:lobby", "room:other", "presence"]);

    await alice.locator(tid("message-input")).pressSequentially("psst");
    await waitTyping(bob, "alice");  // bob's socket has room:lobby
    const secrets = [await sendMessage(alice, "lobby secret from alice")];
    await waitMessage(bob, secrets[0]);
    secrets.push(await sendMessage(bob, "lobby secret from bob"));
    await waitMessage(alice, secrets[1]);
    checkEqual(await busMessageIds(bob), secrets.map((m) => m.id), "the recorder sees the lobby messages on bob's socket");

    const marker = await sendMessage(carol, "marker in other");
    await waitChat(carol, "the marker on carol's socket", (id) =>
        window.busNotifications.some((n) => n.message?.type === "chat/message" && n.message.payload.id === id), Number(marker.id));
    await waitChat(carol, "the marker on carol's raw socket", (id) =>
        window.rawNotifications.some((n) => n.message?.type === "chat/message" && n.message.payload.id === id), Number(marker.id));

    const received = await carol.evaluate(() => ({ bus: window.busNotifications, raw: window.rawNotifications }));
    for (const [socket, list] of Object.entries(received)) {
        check(list.some((n) => n.message?.type === "chat/presence"), `carol's ${socket} socket got the presence channel`);
        const leaked = list.filter((n) => JSON.stringify(n).includes("lobby"));
        checkEqual(leaked, [], `nothing of the lobby on carol's ${socket} socket (messages, typing)`);
    }
    checkEqual(received.bus.filter((n) => n.message?.type === "chat/message").map((n) => String(n.message.payload.id)),
               [marker.id], "carol's socket delivered her own message only");

    checkEqual(await shownMessages(carol), [marker], "carol's list shows her own message only");
    checkEqual(await carol.locator(`${tid("room-button")}[data-room="lobby"]`).count(), 0, "no lobby button for carol");
    check(!(await carol.evaluate(() => document.body.textContent)).includes("lobby secret"), "no lobby text anywhere on carol's page");
    checkEqual(await carol.locator(tid("typing-indicator")).textContent(), "", "no typing shown to carol");

    // carol cannot open the lobby without joining it: its routes refuse her session.
    const answers = await carol.evaluate(async () => {
        const history = await fetch("/chat/history?room=lobby");
        const send = await fetch("/chat/send", { method: "POST", headers: { "Content-Type": "application/json" },
                                                 body: JSON.stringify({ room: "lobby", text: "carol was here" }) });
        return { history: history.status, send: send.status };
    });
    checkEqual(answers, { history: 403, send: 403 }, "GET /chat/history and POST /chat/send for the lobby, as carol");
    checkEqual(await shownMessages(alice), secrets, "alice's lobby has the two messages only");
});

test("chat_restart_keeps_messages", { chat: true }, async ({ newContext, startChat }) => {
    // The chat server stops (SIGTERM) and comes back on the same port with the same data file and
    // secret: the pages reconnect by themselves (same session cookie), a message sent after the
    // restart arrives live, and nothing is shown or delivered twice.
    const first = await startChat();
    const alice = await chatLogin(await newContext(), first, "alice");
    const bob = await chatLogin(await newContext(), first, "bob");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    const before = [await sendMessage(alice, "before the restart, 1"), await sendMessage(alice, "before the restart, 2")];
    await waitMessage(bob, before[1]);

    await first.stop();  // exit 0 required
    await waitBanner(alice, true);
    await waitBanner(bob, true);
    const second = await startChat({ port: first.port });
    await waitBanner(alice, false, RECONNECT_MS);
    await waitBanner(bob, false, RECONNECT_MS);

    const after = await sendMessage(bob, "after the restart");
    await waitMessage(alice, after);
    const all = [...before, after];
    const shown = await shownMessages(alice);
    checkEqual(new Set(shown.map((m) => m.id)).size, shown.length, "unique data-id values in alice's list");
    checkEqual(shown, all, "alice's list: both earlier messages and the new one, once each");
    checkEqual(await busMessageIds(alice), all.map((m) => m.id), "alice's socket delivered each message once across the restart");
    checkEqual(await shownMessages(bob), all, "bob's list: the same");
    await waitPresence(alice, "bob", "online");
    check(second.port === first.port, "the same port");
});

// The chat's JSON routes from Node, as the user of `session` (no Origin header: not a browser).
async function chatApi(server, session, path, body) {
    const { status, body: text } = await http(body ? "POST" : "GET", server.url(path), body && JSON.stringify(body),
                                              { "Content-Type": "application/json", Cookie: `imbus_session=${session}` });
    return { status, json: JSON.parse(text || "{}") };
}

/** Logs `name` in from Node; returns the session cookie's value. */
function chatSession(server, name) {
    return new Promise((resolve, reject) => {
        const req = httpRequest(server.url("/chat/login"), { method: "POST", agent: false, headers: { "Content-Type": "application/json" } }, (res) => {
            res.resume();
            const cookie = /imbus_session=([^;]+)/.exec((res.headers["set-cookie"] || []).join("; "));
            res.on("end", () => cookie && res.statusCode === 200 ? resolve(cookie[1]) : reject(new Error(`login ${name}: ${res.statusCode}`)));
        });
        req.on("error", reject);
        req.end(JSON.stringify({ name }));
    });
}

/** A bare WebSocket handshake as the user of `session` (no User-Agent: no version check); resolves
 *  with the TCP socket once the server answered 101, i.e. ran on_open (the user is online). */
function openBareSocket(server, session) {
    return new Promise((resolve, reject) => {
        const socket = tcpConnect(server.port, "127.0.0.1");
        let head = "";
        socket.setEncoding("latin1");
        socket.on("connect", () => socket.write(
            `GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:${server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
            `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: imbus_session=${session}\r\n\r\n`));
        socket.on("data", (chunk) => {
            head += chunk;
            if (head.includes("\r\n\r\n")) head.startsWith("HTTP/1.1 101") ? resolve(socket) : reject(new Error(head.split("\r\n")[0]));
        });
        socket.on("error", reject);
    });
}

// Joining a room: app.js loads its history at once, but the worker subscribes to room:<name>
// only 300 ms after addChannel (its debounce), and a re-subscribe keeps the server's cursor
// (PROTOCOL §4). A message sent in between is in neither once another notification (carol
// comes online, on "presence") has moved the cursor past it; app.js therefore asks for the
// history once more a second after joining. This test failed before that.
test("chat_join_sees_message_sent_meanwhile", { chat: true }, async ({ newContext, startChat }) => {
    const server = await startChat();
    const bob = await chatSession(server, "bob");
    const carol = await chatSession(server, "carol");
    checkEqual((await chatApi(server, bob, "/chat/join", { room: "lobby" })).status, 200, "bob joins the lobby");
    const alice = await chatLogin(await newContext(), server, "alice");
    await waitPresence(alice, "alice", "online");  // alice's socket is subscribed (presence)

    const history = alice.waitForResponse((r) => urlIs(r, "/chat/history", "lobby"));
    await alice.locator(tid("join-input")).fill("lobby");
    await alice.locator(tid("join-button")).click();
    checkEqual((await history).status(), 200, "alice's history of the lobby");
    const lost = (await chatApi(server, bob, "/chat/send", { room: "lobby", text: "sent right after alice's history" })).json;
    const carolSocket = await openBareSocket(server, carol);  // chat/presence carol online: alice's socket moves on
    try {
        await waitPresence(alice, "carol", "online");
        const later = (await chatApi(server, bob, "/chat/send", { room: "lobby", text: "a later one" })).json;
        await waitMessage(alice, { id: String(later.id), user: "bob", text: later.text });
        await waitMessage(alice, { id: String(lost.id), user: "bob", text: lost.text });
        checkEqual((await shownMessages(alice)).map((m) => m.id), [String(lost.id), String(later.id)],
                   "alice sees both of bob's messages (the first one was sent after her history, before her subscribe)");
    } finally {
        carolSocket.destroy();
    }
});

// --- the chat demo as a newcomer sees it: phone layout, default room, unread counts, outages ---------

// What a page reports as wrong: console errors, uncaught exceptions and HTTP error answers.
// (Not "requestfailed": playwright reports the SharedWorker's script as aborted when the page
// navigates away, which nobody sees.) Listening starts before the first request.
function watchErrors(page) {
    const errors = [];
    page.on("console", (message) => { if (message.type() === "error") errors.push(`console: ${message.text()}`); });
    page.on("pageerror", (error) => errors.push(`pageerror: ${error.message}`));
    page.on("response", (response) => { if (response.status() >= 400) errors.push(`${response.status()}: ${response.url()}`); });
    return errors;
}

// Runs in a page: what sticks out of the viewport (sideways scroll, cut-off or covered elements
// of `ids`); the elements of `across` (in a scrolled list) need only fit across.
function layoutProblems([ids, across = []]) {
    const problems = [];
    const { clientWidth, clientHeight } = document.documentElement;
    for (const e of [document.documentElement, document.body])
        if (e.scrollWidth > clientWidth) problems.push(`${e.tagName} scrolls sideways: ${e.scrollWidth} > ${clientWidth}`);
    for (const id of ids)
        for (const e of document.querySelectorAll(`[data-testid="${id}"]`)) {
            const r = e.getBoundingClientRect();
            if (r.width === 0 || r.left < 0 || r.top < 0 || r.right > clientWidth || r.bottom > clientHeight)
                problems.push(`${id} at (${r.left},${r.top})-(${r.right},${r.bottom}), viewport ${clientWidth}x${clientHeight}`);
            else if (!e.contains(document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2)))
                problems.push(`${id} is covered`);
        }
    for (const id of across)
        for (const e of document.querySelectorAll(`[data-testid="${id}"]`)) {
            const r = e.getBoundingClientRect();
            if (r.left < 0 || r.right > clientWidth) problems.push(`${id} from x ${r.left} to ${r.right}, viewport ${clientWidth} wide`);
        }
    return problems;
}

test("chat_phone_layout", { chat: true }, async ({ newContext, startChat }) => {
    // At 360x740 (a small phone) nothing is cut off: no sideways scroll, the message box and Send
    // on screen with a long message in the room, the room list one tap away (a drawer).
    const server = await startChat();
    const bob = await chatSession(server, "Bartholomew the Exceedingly Long");
    checkEqual((await chatApi(server, bob, "/chat/join", { room: "engineering-backend-platform-x" })).status, 200, "bob makes a room");
    const alice = await chatLogin(await newContext(), server, "alice");
    await joinRoom(alice, "engineering-backend-platform-x");
    await alice.setViewportSize({ width: 360, height: 740 });
    await sendMessage(alice, `a long word: ${"x".repeat(300)} and a long line ${"lorem ipsum ".repeat(40)}`);
    await chatApi(server, bob, "/chat/send", { room: "engineering-backend-platform-x", text: "y".repeat(500) });
    await waitChat(alice, "bob's message", () => document.querySelectorAll('[data-testid="message"]').length === 2);
    checkEqual(await alice.evaluate(layoutProblems, [["message-input", "send-button", "room-title", "rooms-toggle"], ["message"]]),
               [], "the room at 360x740");

    await alice.locator(tid("rooms-toggle")).click();  // the room list, in a drawer
    await waitChat(alice, "the drawer open", () => {
        const r = document.querySelector('[data-testid="room-list"]').getBoundingClientRect();
        return r.left >= 0 && r.width > 0;
    });
    checkEqual(await alice.evaluate(layoutProblems, [["room-list", "join-input", "join-button"]]), [], "the drawer at 360x740");
    await alice.locator(`${tid("room-button")}[data-room="general"]`).click();
    await waitChat(alice, "#general on screen, the drawer closed", () =>
        document.querySelector('[data-testid="room-title"]').textContent === "#general"
        && document.querySelector('[data-testid="room-list"]').getBoundingClientRect().right <= 0);
    checkEqual(await alice.evaluate(layoutProblems, [["message-input", "send-button", "rooms-toggle"]]), [], "#general at 360x740");
});

test("chat_default_room_and_directory", { chat: true }, async ({ newContext, startChat }) => {
    // A newcomer is in #general from the first login and sees the rooms others made, to join
    // with one click; a bad room name is explained (the characters allowed, the length).
    const server = await startChat();
    const bob = await chatSession(server, "bob");
    checkEqual((await chatApi(server, bob, "/chat/me")).json.rooms, ["general"], "bob is in #general from the start");
    checkEqual((await chatApi(server, bob, "/chat/join", { room: "design" })).status, 200, "bob makes #design");
    const alice = await chatLogin(await newContext(), server, "alice");
    await waitChat(alice, "#general on screen", () =>
        document.querySelector('[data-testid="room-title"]').textContent === "#general"
        && document.querySelector('[data-testid="room-button"][data-room="general"]') !== null);
    const fromBob = (await chatApi(server, bob, "/chat/send", { room: "general", text: "welcome, newcomers" })).json;
    await waitMessage(alice, { id: String(fromBob.id), user: "bob", text: fromBob.text });

    const design = alice.locator(`${tid("directory-room")}[data-room="design"]`);
    await design.click();  // waits for the list of rooms to show it
    await waitChat(alice, "#design joined from the list", () =>
        document.querySelector('[data-testid="room-title"]').textContent === "#design"
        && document.querySelector('[data-testid="room-button"][data-room="design"]') !== null
        && document.querySelector('[data-testid="directory-room"][data-room="design"]') === null);
    checkEqual((await chatApi(server, bob, "/chat/rooms")).json.rooms.map(({ name, members }) => `${name}:${members}`),
               ["design:2", "general:2"], "GET /chat/rooms: each room and its members");

    await alice.locator(tid("join-input")).fill("my room!");
    await alice.locator(tid("join-button")).click();
    await waitChat(alice, "the room name explained", () => {
        const text = document.querySelector('[data-testid="join-error"]').textContent;
        return /letters/.test(text) && /digits/.test(text) && /32/.test(text);
    });
    checkEqual(await alice.locator(`${tid("room-button")}[data-room="my room!"]`).count(), 0, "no room joined");
});

test("chat_unread_kept_across_reload", { chat: true }, async ({ newContext, startChat }) => {
    // alice looks at #general while bob writes in #lobby: the count is on #lobby's button, and
    // a reload keeps it without counting again what the reload replays (socket and history).
    const server = await startChat();
    const bob = await chatSession(server, "bob");
    const aliceApi = await chatSession(server, "alice");
    for (const session of [bob, aliceApi])
        checkEqual((await chatApi(server, session, "/chat/join", { room: "lobby" })).status, 200, "joins #lobby");
    const alice = await chatLogin(await newContext(), server, "alice");
    await waitChat(alice, "#general on screen", () => document.querySelector('[data-testid="room-title"]').textContent === "#general");
    const unread = (room) => alice.evaluate((r) =>
        document.querySelector(`[data-testid="room-button"][data-room="${r}"] [data-testid="unread-count"]`)?.textContent ?? "0", room);
    const waitUnread = (room, count) => waitChat(alice, `${count} unread in #${room}`, ([r, n]) =>
        (document.querySelector(`[data-testid="room-button"][data-room="${r}"] [data-testid="unread-count"]`)?.textContent ?? "0") === n,
        [room, String(count)]);

    const sent = [];
    for (const text of ["one", "two"])
        sent.push((await chatApi(server, bob, "/chat/send", { room: "lobby", text })).json.id);
    await waitUnread("lobby", 2);

    // After the reload: the bus replays the last seconds and #lobby's history is read once
    // more; a third message must make it 3, with both sources done.
    // (app.js asks for a joined room's history 1 s after the page's start: well after the load event.)
    let reloaded = false;
    const replayed = new Promise((resolve) => alice.on("response", (r) => {
        if (reloaded && urlIs(r, "/chat/history", "lobby")) resolve();
    }));
    await alice.reload();
    reloaded = true;
    await waitChat(alice, "the chat view after the reload", () => !document.querySelector('[data-testid="chat-view"]').hidden);
    await waitUnread("lobby", 2);
    sent.push((await chatApi(server, bob, "/chat/send", { room: "lobby", text: "three" })).json.id);
    await waitChat(alice, "the third message on alice's socket", (id) =>
        window.busNotifications.some((n) => n.message?.type === "chat/message" && n.message.payload.id === id), sent[2]);
    await replayed;
    await waitUnread("lobby", 3);
    checkEqual(await unread("general"), "0", "nothing unread in #general");

    await alice.locator(`${tid("room-button")}[data-room="lobby"]`).click();  // read: the count goes, for good
    await waitUnread("lobby", 0);
    await waitChat(alice, "#lobby's messages", () => document.querySelectorAll('[data-testid="message"]').length === 3);
    await alice.reload();
    await waitChat(alice, "#lobby on screen after the reload", () => document.querySelector('[data-testid="room-title"]').textContent === "#lobby");
    checkEqual(await unread("lobby"), "0", "still read after a reload");
});

test("chat_offline_error_and_retry", { chat: true }, async ({ newContext, startChat }) => {
    // A send that cannot reach the server says so in words with "Retry now"; a retry that gets
    // through clears it, and so does the connection coming back. Meanwhile presence is unknown.
    const first = await startChat();
    const alice = await chatLogin(await newContext(), first, "alice");
    await joinRoom(alice, "lobby");
    await waitPresence(alice, "alice", "online");
    const waitError = (shown) => waitChat(alice, `the error line ${shown ? "with Retry now" : "gone"}`, (s) => {
        const alert = document.querySelector('[data-testid="chat-error"]').parentElement;
        const retry = document.querySelector('[data-testid="retry-button"]');
        const text = document.querySelector('[data-testid="chat-error"]').textContent;
        return s ? !alert.hidden && !retry.hidden && !retry.disabled && text.startsWith("Can't reach the server")
                 : alert.hidden && retry.hidden;
    }, shown);

    // The network drops the request (the socket stays up): Retry now sends it once it passes.
    await alice.route("**/chat/send", (route) => route.abort("internetdisconnected"));
    await alice.locator(tid("message-input")).fill("first try");
    await alice.locator(tid("send-button")).click();
    await waitError(true);
    checkEqual(await alice.locator(tid("message-input")).inputValue(), "first try", "the text is kept");
    await alice.unroute("**/chat/send");
    const sent = alice.waitForResponse((r) => urlIs(r, "/chat/send"));
    await alice.locator(tid("retry-button")).click();
    const { id } = await (await sent).json();
    await waitMessage(alice, { id: String(id), user: "alice", text: "first try" });
    await waitError(false);
    checkEqual(await alice.locator(tid("message-input")).inputValue(), "", "the box is empty once sent");

    // The server is down: presence unknown, the same error; back up: both recover by themselves.
    await first.stop();
    await waitBanner(alice, true);
    await waitPresence(alice, "alice", "unknown");
    await alice.locator(tid("message-input")).fill("while down");
    await alice.locator(tid("send-button")).click();
    await waitError(true);
    const failed = alice.waitForEvent("requestfailed", (r) => new URL(r.url()).pathname === "/chat/send");
    await alice.locator(tid("retry-button")).click();
    await failed;
    await waitError(true);  // still down: still said in words
    await startChat({ port: first.port });
    await waitBanner(alice, false, RECONNECT_MS);
    await waitError(false);
    await waitPresence(alice, "alice", "online");
    await sendMessage(alice, "after the outage");
    checkEqual((await shownMessages(alice)).map((m) => m.text), ["first try", "after the outage"], "each message once");
});

test("chat_first_visit_no_console_errors", { chat: true }, async ({ newContext, startChat }) => {
    // A normal visit (the login form, logging in, the chat live, logging out) logs no error and
    // gets no failed request: "not signed in" is an answer, not a 401.
    const server = await startChat();
    const page = await (await newContext()).newPage();
    page.user = "alice";
    const errors = watchErrors(page);
    await page.addInitScript(recordBusNotifications);
    await page.goto(server.url("/"));
    await page.locator(tid("login-name")).fill("alice");
    await page.locator(tid("login-submit")).click();
    await waitPresence(page, "alice", "online");  // logged in, the socket up
    await page.locator(tid("logout-button")).click();
    await waitChat(page, "the login form after logging out", () => !document.querySelector('[data-testid="login-form"]').hidden);
    checkEqual(errors, [], "errors on the page");
});

// --- the chat demo on the library's pieces: presence, on_subscribe, uid, refused, main tab ---------

/** Another tab of `context`, already signed in as `name` (the session cookie): the chat view. */
async function chatTab(context, server, name) {
    const page = await context.newPage();
    page.user = `${name} (tab 2)`;
    page.setDefaultTimeout(WAIT_MS);
    page.consoleLines = [];
    page.on("console", (message) => page.consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => page.consoleLines.push(`pageerror: ${error.message}`));
    await page.addInitScript(recordBusNotifications);
    await page.goto(server.url("/"));
    await waitChat(page, `the chat view for ${name}`,
                   (n) => !document.querySelector('[data-testid="chat-view"]').hidden
                          && document.querySelector('[data-testid="me-name"]').textContent === n, name);
    return page;
}

/** Waits for the sign-in form (the chat hidden) saying `message`. */
const waitSignIn = (page, message, timeout = WAIT_MS) =>
    waitChat(page, `the sign-in form saying "${message}"`, (m) =>
        !document.querySelector('[data-testid="login-form"]').hidden
        && document.querySelector('[data-testid="chat-view"]').hidden
        && document.querySelector('[data-testid="login-error"]').textContent === m, message, timeout);

// The dot before a name in the presence list, as drawn.
const dotColor = (page, user) => page.evaluate((u) =>
    getComputedStyle(document.querySelector(`[data-testid="presence-item"][data-user="${u}"]`), "::before").backgroundColor, user);

test("chat_presence_tabs_and_browsers", { chat: true }, async ({ newContext, startChat }) => {
    // The server's presence_tracker (away after 1.5 s of inactivity here) and js/presence.js:
    // alice has two tabs (one browser), bob another browser. bob sees alice online, then away
    // (a yellow dot); activity in her second tab makes her online for everybody (the tabs share
    // their activity); closing one tab keeps her online, closing her browser makes her offline.
    const AWAY_MS = 1500;
    const server = await startChat({ extra: ["--presence-away-ms", String(AWAY_MS)] });
    const aliceBrowser = await newContext();
    const alice1 = await chatLogin(aliceBrowser, server, "alice");
    const alice2 = await chatTab(aliceBrowser, server, "alice");
    const bob = await chatLogin(await newContext(), server, "bob");
    await waitPresence(bob, "alice", "online");
    await waitPresence(alice1, "bob", "online");
    checkEqual(await dotColor(bob, "alice"), "rgb(64, 192, 87)", "online: a green dot");

    await waitPresence(bob, "alice", "away");  // nobody touched alice's tabs for 1.5 s
    checkEqual(await dotColor(bob, "alice"), "rgb(245, 159, 0)", "away: a yellow dot");
    await waitPresence(alice1, "alice", "away");
    await waitPresence(alice2, "alice", "away");
    await waitPresence(alice2, "bob", "away");

    await alice2.keyboard.press("Shift");  // activity in alice's second tab only
    await waitPresence(bob, "alice", "online");
    await waitPresence(alice1, "alice", "online");

    await alice1.close();  // her other tab keeps the browser's socket
    await bob.keyboard.press("Shift");  // bob online again: a later transition, seen by both
    await waitPresence(alice2, "bob", "online");
    await waitPresence(bob, "bob", "online");
    const aliceSeenByBob = await bob.evaluate(() => window.busNotifications
        .filter((n) => n.message?.type === "chat/presence" && n.message.payload.who === "alice").map((n) => n.message.payload.status));
    check(!aliceSeenByBob.includes("offline"), `alice was never offline for bob: ${aliceSeenByBob}`);

    await aliceBrowser.close();  // her last tab, worker and socket
    await waitPresence(bob, "alice", "offline");
});

test("chat_people_on_subscribe", { chat: true }, async ({ newContext, startChat }) => {
    // A fresh page knows everybody's status at once from the message the policy's on_subscribe
    // sends it alone after its history: bob online (connected), dave offline (known, never
    // connected, so no transition of his is on the bus), alice herself online; no HTTP call for it.
    const server = await startChat();
    await chatSession(server, "dave");
    const bobSocket = await openBareSocket(server, await chatSession(server, "bob"));
    try {
        const context = await newContext();
        const calls = [];
        context.on("request", (r) => calls.push(new URL(r.url()).pathname));
        const alice = await chatLogin(context, server, "alice");
        await waitPresence(alice, "dave", "offline");
        await waitPresence(alice, "bob", "online");
        await waitPresence(alice, "alice", "online");
        const people = await alice.evaluate(() => window.busNotifications
            .filter((n) => n.message?.type === "chat/people").map((n) => n.message.payload.people));
        check(people.length >= 1, "a chat/people message reached alice's page");
        checkEqual(people[0].map(({ user, status }) => `${user}:${status}`), ["alice:online", "bob:online", "dave:offline"],
                   "the first chat/people: everybody known, with their status");
        const routes = calls.filter((path) => path.startsWith("/chat/"));
        checkEqual(routes.filter((path) => !["/chat/me", "/chat/login", "/chat/rooms", "/chat/history"].includes(path)), [],
                   `no HTTP call for presence (the page asked ${routes})`);
    } finally {
        bobSocket.destroy();
    }
});

// The server's count of handshakes it refused, any status (GET /metrics).
async function refusedHandshakes(server) {
    const { body } = await http("GET", server.url("/metrics"));
    return [...body.matchAll(/^imbus_handshakes_refused_total\{status="\d+"\} (\d+)$/gm)].reduce((n, m) => n + Number(m[1]), 0);
}

test("chat_session_refused", { chat: true }, async ({ newContext, startChat }) => {
    // The server comes back with another secret: alice's session cookie is worthless. Her
    // browser's reconnection is refused (401): the page shows the sign-in form saying why, and
    // nothing retries; signing in again brings her back.
    const first = await startChat();
    const alice = await chatLogin(await newContext(), first, "alice");
    await waitPresence(alice, "alice", "online");
    // app.js asks for #general's history again 1 s after the start: once that is done, the
    // socket is the first to meet the new secret (a route's 401 would sign her out as well).
    await waitChat(alice, "#general's history asked twice", () =>
        performance.getEntriesByType("resource").filter((e) => e.name.includes("/chat/history?room=general")).length >= 2);
    await first.stop();
    await waitBanner(alice, true);
    const second = await startChat({ port: first.port, extra: ["--secret", "another-secret-for-the-chat-suite"] });
    await waitSignIn(alice, "Your session has ended: sign in again.", RECONNECT_MS);
    const refused = await refusedHandshakes(second);
    check(refused >= 1, "the server refused alice's handshake");
    await sleep(3000);  // the worker's retries would come after 1 s, then 1.5-2.5 s
    checkEqual(await refusedHandshakes(second), refused, "no handshake since the refusal: no retry loop");
    await waitSignIn(alice, "Your session has ended: sign in again.");

    const reloaded = alice.waitForNavigation().then(() => true, () => false);
    await alice.locator(tid("login-name")).fill("alice");
    await alice.locator(tid("login-submit")).click();
    check(await reloaded, "the page starts afresh for the new session");
    await waitPresence(alice, "alice", "online");
});

test("chat_logout_signs_out_every_tab", { chat: true }, async ({ newContext, startChat }) => {
    // Logging out in one tab ends the browser's session (its cookie): alice's other tab shows
    // the sign-in form too, her socket closes (bob sees her offline), and no tab reconnects.
    const server = await startChat();
    const bob = await chatLogin(await newContext(), server, "bob");
    const context = await newContext();
    const tab1 = await chatLogin(context, server, "alice");
    const tab2 = await chatTab(context, server, "alice");
    await waitPresence(bob, "alice", "online");
    await tab1.locator(tid("logout-button")).click();
    await waitSignIn(tab1, "");
    await waitSignIn(tab2, "You signed out in another tab.");
    await waitPresence(bob, "alice", "offline");
    checkEqual(await refusedHandshakes(server), 0, "no tab tried to reconnect without a session");
});

test("chat_identity_change_other_tab", { chat: true }, async ({ newContext, startChat }) => {
    // alice's tab is open when the browser's cookie goes (cleared here; expired in real life) and
    // another tab signs in as bob: the browser's one socket is reopened for bob (BusService uid),
    // so carol sees alice offline and bob online, and alice's tab follows: it shows bob.
    const server = await startChat();
    const carol = await chatLogin(await newContext(), server, "carol");
    const context = await newContext();
    const tab1 = await chatLogin(context, server, "alice");
    await waitPresence(carol, "alice", "online");
    await context.clearCookies();
    const followed = tab1.waitForNavigation().then(() => true, () => false);  // settled: never an unhandled rejection
    await chatLogin(context, server, "bob");
    await waitPresence(carol, "bob", "online");
    await waitPresence(carol, "alice", "offline");
    check(await followed, "alice's old tab reloaded");
    await waitChat(tab1, "alice's old tab showing bob", () =>
        !document.querySelector('[data-testid="chat-view"]').hidden
        && document.querySelector('[data-testid="me-name"]').textContent === "bob");
    await waitPresence(tab1, "bob", "online");
});

test("chat_main_tab_notifies", { chat: true }, async ({ newContext, startChat }) => {
    // alice has two tabs on #general; bob writes in #lobby: both tabs count it (their titles say
    // "(1)"), but only the browser's main tab (js/main_tab.js) shows the notice and beeps. Once
    // that tab is closed, the other one is main and notifies the next message.
    const server = await startChat();
    const bob = await chatSession(server, "bob");
    const aliceApi = await chatSession(server, "alice");
    for (const session of [bob, aliceApi])
        checkEqual((await chatApi(server, session, "/chat/join", { room: "lobby" })).status, 200, "joins #lobby");
    const context = await newContext();
    const tabs = [await chatLogin(context, server, "alice"), await chatTab(context, server, "alice")];
    for (const tab of tabs) {
        await waitChat(tab, "#general on screen", () => document.querySelector('[data-testid="room-title"]').textContent === "#general");
        await waitPresence(tab, "alice", "online");  // the socket is up
    }
    const notices = () => Promise.all(tabs.map((tab) => tab.isClosed() ? null : tab.evaluate(() =>
        Number(document.querySelector('[data-testid="notice"]').dataset.count ?? 0))));
    const waitTitle = (tab, count) => waitChat(tab, `"(${count})" in the title`, (c) => document.title.startsWith(`(${c}) `), count);

    await chatApi(server, bob, "/chat/send", { room: "lobby", text: "one" });
    await waitTitle(tabs[0], 1);
    await waitTitle(tabs[1], 1);  // both tabs handled it: each would have shown its notice by now
    const first = await notices();
    checkEqual([...first].sort(), [0, 1], "one notice, in one tab");
    const main = first.indexOf(1), other = 1 - main;
    check(!(await tabs[main].locator(tid("notice")).isHidden()), "the main tab's notice is on screen");
    check(await tabs[other].locator(tid("notice")).isHidden(), "no notice in the other tab");

    await tabs[main].close();
    await chatApi(server, bob, "/chat/send", { room: "lobby", text: "two" });
    await waitTitle(tabs[other], 2);
    checkEqual((await notices())[other], 1, "the remaining tab, main now, notified the second message");
});

// --- runner ---------------------------------------------------------------------------------------

const selected = options.only.length ? tests.filter((t) => options.only.includes(t.name))
                                      : tests;
for (const name of options.only)
    if (!tests.some((t) => t.name === name)) usage(`no test named ${name} (have: ${tests.map((t) => t.name).join(", ")})`);

let browser;
let passed = 0, failed = 0, skipped = 0;
const started = Date.now();
try {
    browser = await chromium.launch({ executablePath: options.chromium, args: CHROMIUM_ARGS, timeout: 30000 });
    for (const { name, fn, chat } of selected) {
        if (chat && !options.chat) {
            ++skipped;
            console.log(`skip ${name}: needs the chat demo (--chat PATH; CMake passes it when the example_chat target exists)`);
            continue;
        }
        const dir = mkdtempSync(join(tmpdir(), `imbus-browser-${name}-`));
        let data = join(dir, "bus.db");
        const servers = [];
        const contexts = [];
        const newContext = async () => {
            const context = await browser.newContext();
            contexts.push(context);
            return context;
        };
        const t0 = Date.now();
        try {
            if (chat) {
                // Each start is the demo on the same data file and secret; `port` 0: any.
                const startChat = async ({ port = 0, extra = [] } = {}) => {
                    const server = new ChatServer({ data: join(dir, "chat.db"), port, extra });
                    servers.push(server);
                    return server.start();
                };
                await fn({ browser, newContext, startChat });
            } else {
                const context = await newContext();
                const harness = await new Harness({ data }).start();
                servers.push(harness);
                // Another server on the same port: same SQLite file, or a fresh one (a store reset).
                const restart = async ({ fresh = false } = {}) => {
                    if (fresh) data = join(dir, `bus-${servers.length}.db`);
                    const next = await new Harness({ data, port: harness.port }).start();
                    servers.push(next);
                    return next;
                };
                await fn({ harness, context, restart, browser });
            }
            for (const context of contexts) await context.close();
            for (const s of servers) await s.stop();  // each must exit 0
            ++passed;
            console.log(`ok ${name} (${Date.now() - t0} ms)`);
        } catch (error) {
            ++failed;
            console.log(`not ok ${name} (${Date.now() - t0} ms)\n  ${String(error.stack || error).replace(/\n/g, "\n  ")}`);
            for (const context of contexts)
                for (const page of context.pages())
                    if (page.consoleLines?.length) console.log(`  console of ${page.url()}:\n    ${page.consoleLines.join("\n    ")}`);
            for (const s of servers) if (s.stderr) console.log(`  ${s.label} stderr (port ${s.port}):\n    ${s.stderr.trim().replace(/\n/g, "\n    ")}`);
        } finally {
            for (const context of contexts) await context.close().catch(() => {});
            for (const s of servers) await s.stop().catch(() => {});
            rmSync(dir, { recursive: true, force: true });
        }
    }
} catch (error) {
    ++failed;
    console.log(`not ok (setup): ${error.stack || error}`);
} finally {
    await browser?.close().catch(() => {});
    for (const s of running) s.process.kill("SIGKILL");
}
console.log(`browser suite: ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`browser: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
// 77: ctest's SKIP_RETURN_CODE (tests/browser/CMakeLists.txt): nothing failed and nothing ran.
process.exit(failed ? 1 : skipped && !passed ? 77 : 0);
