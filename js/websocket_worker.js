// The imbus browser worker: ONE WebSocket per origin, shared by every tab (docs/PROTOCOL.md §6).
// Runs as a SharedWorker, or as a dedicated Worker per tab where SharedWorker is missing.
// Tabs send {action, data}; the worker answers with {type, data} events.

const PROBE = new Uint8Array([0]);  // the 1-byte liveness probe the server ignores
const SUBSCRIBE_DEBOUNCE_MS = 300;
const PROBE_AFTER_MS = 60000;
const INITIAL_RETRY_MS = 1000;
const MAX_RETRY_MS = 60000;
// The server closes with 1013 past 10 frames in 2 s (server_options rate_burst, rate_delay):
// the worker sends at most 8 in any 2.2 s, leaving room for the browser's pongs and jitter.
const RATE_FRAMES = 8;
const RATE_WINDOW_MS = 2200;
const MAX_QUEUED = 50;  // requests waiting for the socket; past it the oldest are dropped

export const WORKER_STATE = Object.freeze({
    IDLE: "IDLE",
    CONNECTING: "CONNECTING",
    CONNECTED: "CONNECTED",
    DISCONNECTED: "DISCONNECTED",
});

export class WebsocketWorker {
    constructor() {
        this.websocketURL = "";
        this.version = "";
        this.uid = undefined;         // the identity of the tabs (Odoo: user id and database)
        this.db = undefined;
        this.websocket = null;        // the socket open or opening, else null
        this.opened = false;          // whether `websocket` ever opened
        this.state = WORKER_STATE.IDLE;
        this.active = true;           // false after OUTDATED_VERSION: nothing reconnects
        // Why the worker waits for a tab's start() instead of reconnecting: "offline", "closed"
        // (a clean close by the server), "session" (4001), "refused" (401/403), or null.
        this.halted = null;
        this.outage = false;          // an unclean close not yet recovered: one disconnect per outage
        this.clients = new Set();     // MessagePorts (SharedWorker) or the worker scope itself
        this.startedClients = new Set();    // tabs that called start() and not stop()
        this.channelsByClient = new Map();  // client -> Map(channel -> count of adds)
        this.subscribedChannels = null;     // what the server was last told, sorted
        this.pendingSubscribe = false;      // a subscribe waits for the rate limit
        this.forceSubscribe = false;
        this.lastNotificationId = 0;
        this.everConnected = false;
        this.messageWaitQueue = [];   // requests waiting for the socket: {slot, text}
        this.sentTimes = [];          // when the current socket's last frames were sent
        this.retryDelay = INITIAL_RETRY_MS;
        this.retryTimer = null;
        this.subscribeTimer = null;
        this.flushTimer = null;
        this.probeTimer = null;
        this.probingSocket = null;    // a failed handshake whose refusal status is being asked
        this.lastTraffic = Date.now();
    }

    // --- tabs -----------------------------------------------------------------------------

    registerClient(client) {
        this.clients.add(client);
        this.channelsByClient.set(client, new Map());
        client.onmessage = (event) => this._onClientMessage(client, event.data);
    }

    sendToClient(client, type, data) {
        client.postMessage({ type, data });
    }

    broadcast(type, data) {
        for (const client of this.clients) this.sendToClient(client, type, data);
    }

    _onClientMessage(client, { action, data }) {
        switch (action) {
            case "initialize_connection":
                return this.initializeConnection(client, data);
            case "add_channel":
                return this._addChannel(client, data);
            case "delete_channel":
                return this._deleteChannel(client, data);
            case "force_update_channels":
                return this._updateChannels({ force: true });
            case "send":
                return this._sendToServer(data);
            case "start":
                return this._startClient(client);
            case "stop":
                return this._stopClient(client);
            case "leave":
                return this._leave(client);
            case "offline":
                return this._halt("offline");
            case "set_last_notification_id":
                this.lastNotificationId = Math.max(this.lastNotificationId, Number(data) || 0);
                return;
        }
    }

    // The first tab decides the URL (tabs of another version get a worker of their own, see
    // bus_service.js); every tab brings the last id it knows, kept across reloads. A tab of
    // another identity (uid, db) takes the worker over, as Odoo's initialize_connection does.
    initializeConnection(client, { websocketURL, version, lastNotificationId, uid, db }) {
        this.sendToClient(client, "initialized", { state: this.state, active: this.active });
        if (!this.active) return this.sendToClient(client, "outdated");
        if (!this.websocketURL) {
            this.websocketURL = websocketURL;
            this.version = version;
            this.uid = uid;
            this.db = db;
        } else if ((uid !== undefined && this.uid !== undefined && uid !== this.uid) || (db ?? null) !== (this.db ?? null)) {
            return this._changeIdentity({ websocketURL, lastNotificationId, uid, db });
        } else if (this.uid === undefined) {
            this.uid = uid;  // the first tab that knows its user
        }
        if (!this.everConnected) {
            this.lastNotificationId = Math.max(this.lastNotificationId, Number(lastNotificationId) || 0);
        }
        if (this.state === WORKER_STATE.CONNECTED) this.sendToClient(client, "connect");
    }

    // Nothing of the old identity may reach the new one: its channels and queued requests go,
    // and the socket is reopened (with the new tab's URL, which may carry its credentials).
    _changeIdentity({ websocketURL, lastNotificationId, uid, db }) {
        this._halt(null, "identity changed");
        this.websocketURL = websocketURL;
        this.uid = uid;
        this.db = db;
        this.lastNotificationId = Number(lastNotificationId) || 0;
        for (const counts of this.channelsByClient.values()) counts.clear();
        this.messageWaitQueue = [];
        this.subscribedChannels = null;
        if (this.halted !== "offline") this.halted = null;  // a refusal was the old identity's
        if (this.halted === null && this.startedClients.size) this._start();
    }

    _addChannel(client, channel) {
        const counts = this.channelsByClient.get(client);
        if (!counts) return;
        counts.set(channel, (counts.get(channel) || 0) + 1);
        this._updateChannels();
    }

    _deleteChannel(client, channel) {
        const counts = this.channelsByClient.get(client);
        if (!counts || !counts.has(channel)) return;
        const left = counts.get(channel) - 1;
        if (left > 0) counts.set(channel, left);
        else counts.delete(channel);
        this._updateChannels();
    }

    _startClient(client) {
        if (!this.clients.has(client)) return;
        this.startedClients.add(client);
        this.halted = null;
        this._updateChannels();
        this._start();
    }

    // This tab leaves the socket: its channels are released, the others keep it; the last
    // started tab to stop closes it.
    _stopClient(client) {
        this.startedClients.delete(client);
        if (this.startedClients.size) this._updateChannels();
        else this._halt(null, "stopped");
    }

    // A closing tab (pagehide, not kept in the back-forward cache) is gone for good.
    _leave(client) {
        this.clients.delete(client);
        this.channelsByClient.delete(client);
        this._stopClient(client);
    }

    _allChannels() {
        const all = new Set();
        for (const client of this.startedClients) for (const channel of this.channelsByClient.get(client).keys()) all.add(channel);
        return [...all].sort();
    }

    // Trailing debounce: many adds in a row become one subscribe, sent only if the set changed
    // (or a tab forced it).
    _updateChannels({ force = false } = {}) {
        this.forceSubscribe ||= force;
        clearTimeout(this.subscribeTimer);
        this.subscribeTimer = setTimeout(() => {
            if (this.state !== WORKER_STATE.CONNECTED) return;  // the next open subscribes anyway
            const channels = this._allChannels();
            const same = this.subscribedChannels && channels.join("\n") === this.subscribedChannels.join("\n");
            if (same && !this.forceSubscribe) return;
            this.forceSubscribe = false;
            this._subscribe(channels);
        }, SUBSCRIBE_DEBOUNCE_MS);
    }

    // Sent before any queued request, with the last id known when it leaves.
    _subscribe(channels) {
        this.subscribedChannels = channels;
        this.pendingSubscribe = true;
        this._flush();
    }

    // --- requests and the rate limit --------------------------------------------------------

    // {event_name, data, key}: a request with a `key` (update_presence: always) replaces the
    // queued one of the same event name and key, so only the latest state waits for the socket.
    _sendToServer({ key, ...message }) {
        if (key === undefined && message.event_name === "update_presence") key = "";
        const slot = key === undefined ? null : JSON.stringify([message.event_name, String(key)]);
        if (slot !== null) this.messageWaitQueue = this.messageWaitQueue.filter((queued) => queued.slot !== slot);
        this.messageWaitQueue.push({ slot, text: JSON.stringify(message) });
        if (this.messageWaitQueue.length > MAX_QUEUED) this.messageWaitQueue.shift();
        this._flush();
    }

    // Sends the subscribe, then the queued requests, as fast as the rate limit allows.
    _flush() {
        clearTimeout(this.flushTimer);
        this.flushTimer = null;
        if (this.state !== WORKER_STATE.CONNECTED) return;
        while (this.pendingSubscribe || this.messageWaitQueue.length) {
            const wait = this._rateWait();
            if (wait > 0) {
                this.flushTimer = setTimeout(() => this._flush(), wait);
                return;
            }
            if (this.pendingSubscribe) {
                this.pendingSubscribe = false;
                const data = { channels: this.subscribedChannels, last: this.lastNotificationId };
                this._write(JSON.stringify({ event_name: "subscribe", data }));
            } else {
                this._write(this.messageWaitQueue.shift().text);
            }
        }
    }

    // Milliseconds until one more frame fits in the rate window.
    _rateWait() {
        const now = Date.now();
        while (this.sentTimes.length && now - this.sentTimes[0] >= RATE_WINDOW_MS) this.sentTimes.shift();
        return this.sentTimes.length < RATE_FRAMES ? 0 : this.sentTimes[0] + RATE_WINDOW_MS - now;
    }

    _write(data) {
        this.lastTraffic = Date.now();
        this.sentTimes.push(this.lastTraffic);
        this.websocket.send(data);
    }

    // --- the socket ---------------------------------------------------------------------------

    _setState(state) {
        if (this.state === state) return;
        this.state = state;
        this.broadcast("worker_state_updated", state);
    }

    // Connects now unless the socket is open or opening (a pending retry is brought forward).
    _start() {
        if (!this.active || !this.websocketURL || this.websocket) return;
        clearTimeout(this.retryTimer);
        this.retryTimer = null;
        this.probingSocket = null;
        this._connect();
    }

    // Closes the socket with 1000 and cancels retries; `why` (if any) keeps it closed until a
    // tab starts again. Ends an outage: the next open is a `connect`.
    _halt(why, reason = why) {
        if (why) this.halted = why;
        clearTimeout(this.retryTimer);
        this.retryTimer = null;
        this.probingSocket = null;
        this.retryDelay = INITIAL_RETRY_MS;
        const socket = this.websocket;
        if (socket) {
            this.websocket = null;
            socket.close(1000, reason);
            this._closed();
            if (!this.outage) this.broadcast("disconnect", { code: 1000, reason });
        }
        this.outage = false;
    }

    _connect() {
        const url = new URL(this.websocketURL, self.location.href);
        if (this.version) url.searchParams.set("version", this.version);
        this._setState(WORKER_STATE.CONNECTING);
        const socket = new WebSocket(url.toString());
        socket.binaryType = "arraybuffer";
        this.websocket = socket;
        this.opened = false;
        socket.addEventListener("open", () => this._onWebsocketOpen(socket));
        socket.addEventListener("message", (event) => this._onWebsocketMessage(event));
        socket.addEventListener("close", (event) => this._onWebsocketClose(socket, event));
        socket.addEventListener("error", () => {});  // a close event always follows
    }

    _onWebsocketOpen(socket) {
        if (socket !== this.websocket) return;
        this.opened = true;
        this.everConnected = true;
        this.retryDelay = INITIAL_RETRY_MS;
        this.sentTimes = [];
        this._setState(WORKER_STATE.CONNECTED);
        // subscribe is always the first message of a connection; queued requests follow it
        clearTimeout(this.subscribeTimer);
        this.forceSubscribe = false;
        this._subscribe(this._allChannels());
        this._scheduleProbe();
        this.broadcast(this.outage ? "reconnect" : "connect");
        this.outage = false;
    }

    _onWebsocketMessage(event) {
        this.lastTraffic = Date.now();
        if (typeof event.data !== "string") return;
        let notifications;
        try {
            notifications = JSON.parse(event.data);
        } catch {
            return;
        }
        if (!Array.isArray(notifications)) return;
        const delivered = [];
        for (const n of notifications) {
            if (n?.message?.type === "bus/missed_notifications") {
                this.broadcast("missed_notifications", n.message.payload);
                continue;
            }
            if (n?.message?.type === "bus/request_refused") {  // a request of ours was malformed
                console.warn("imbus: the server refused a request:", n.message.payload);
                this.broadcast("request_refused", n.message.payload);
                continue;
            }
            delivered.push(n);
            // The server's ids are the truth: after a store reset they start over, lower.
            if (typeof n.id === "number") this.lastNotificationId = n.id;
        }
        // A stopped tab has left: it hears the socket's state, not its notifications.
        if (delivered.length) for (const client of this.startedClients) this.sendToClient(client, "notification", delivered);
    }

    _closed() {
        clearTimeout(this.probeTimer);
        clearTimeout(this.flushTimer);
        this.flushTimer = null;
        this.pendingSubscribe = false;
        this.subscribedChannels = null;
        this._setState(WORKER_STATE.DISCONNECTED);
    }

    _onWebsocketClose(socket, { code, reason }) {
        if (socket !== this.websocket) return;
        this.websocket = null;
        this._closed();
        if (reason === "OUTDATED_VERSION") {
            this.broadcast("disconnect", { code, reason });
            this.active = false;  // a newer server: only a reload of the page helps
            this.outage = false;
            return this.broadcast("outdated");
        }
        if (this.opened || code === 1000) return this._onLost(code, reason);
        // The handshake failed: the browser does not say why, a plain GET of the URL does.
        this.probingSocket = socket;
        probeHandshake(socket.url).then((refusal) => {
            if (this.probingSocket !== socket) return;  // a start, stop or new identity came first
            this.probingSocket = null;
            if (!refusal) return this._onLost(code, reason);
            if (!this.outage) this.broadcast("disconnect", { code, reason });
            this.halted = "refused";  // retrying cannot help: wait for start() or a new identity
            this.broadcast("refused", refusal);
        });
    }

    // Tabs hear `disconnect` and `reconnecting` once per outage, not once per failed attempt.
    _onLost(code, reason) {
        const first = !this.outage;
        if (first) this.broadcast("disconnect", { code, reason });
        if (code === 1000) {  // a clean close is final
            this.halted = "closed";
            this.outage = false;
            return;
        }
        this.outage = true;
        if (code === 4001) {
            this.halted = "session";  // a tab starts us again once the user has a session
            return;
        }
        if (first) this.broadcast("reconnecting", { closeCode: code });
        // 4002 (lifetime): at once; anything else: back off with jitter
        const delay = code === 4002 ? 0 : this.retryDelay;
        if (code !== 4002) {
            this.retryDelay = Math.min(this.retryDelay * 1.5, MAX_RETRY_MS) + Math.random() * 1000;
        }
        this.retryTimer = setTimeout(() => {
            this.retryTimer = null;
            if (this.halted === null && this.startedClients.size) this._start();
        }, delay);
    }

    // Without traffic for a minute, a probe keeps proxies from closing an idle socket.
    _scheduleProbe() {
        clearTimeout(this.probeTimer);
        const wait = Math.max(0, this.lastTraffic + PROBE_AFTER_MS - Date.now());
        this.probeTimer = setTimeout(() => {
            if (this.state !== WORKER_STATE.CONNECTED) return;
            if (Date.now() - this.lastTraffic >= PROBE_AFTER_MS && this._rateWait() === 0) this._write(PROBE);
            this._scheduleProbe();
        }, wait);
    }
}

// Asks the server what a failed handshake got (docs/PROTOCOL.md §5: a plain GET of the socket's
// URL answers the handshake's status). Resolves {status, reason} for 401 and 403, else null:
// 426 (the handshake would pass), another status, or no answer all mean "retry as usual".
async function probeHandshake(socketURL) {
    try {
        const response = await fetch(socketURL.replace(/^ws/, "http"), { credentials: "include", cache: "no-store" });
        if (response.status !== 401 && response.status !== 403) return null;
        const body = await response.json().catch(() => ({}));
        return { status: response.status, reason: typeof body?.error === "string" ? body.error : "" };
    } catch {
        return null;
    }
}

// Started by the worker scope itself: a SharedWorker gets one port per tab, a dedicated Worker
// is its own (only) client.
const worker = new WebsocketWorker();
if (typeof SharedWorkerGlobalScope !== "undefined" && self instanceof SharedWorkerGlobalScope) {
    self.addEventListener("connect", (event) => {
        const port = event.ports[0];
        worker.registerClient(port);
        port.start();
    });
} else {
    worker.registerClient(self);
}
