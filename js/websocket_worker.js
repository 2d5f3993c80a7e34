// The imbus browser worker: ONE WebSocket per origin, shared by every tab (docs/PROTOCOL.md §6).
// Runs as a SharedWorker, or as a dedicated Worker per tab where SharedWorker is missing.
// Tabs send {action, data}; the worker answers with {type, data} events.

const PROBE = new Uint8Array([0]);  // the 1-byte liveness probe the server ignores
const SUBSCRIBE_DEBOUNCE_MS = 300;
const PROBE_AFTER_MS = 60000;
const INITIAL_RETRY_MS = 1000;
const MAX_RETRY_MS = 60000;

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
        this.websocket = null;
        this.state = WORKER_STATE.IDLE;
        this.active = true;           // false after OUTDATED_VERSION: nothing reconnects
        this.stopped = false;         // a tab asked to stop (offline, logout): no reconnect
        this.waitingForIdentity = false;  // closed with 4001 until a tab starts again
        this.clients = new Set();     // MessagePorts (SharedWorker) or the worker scope itself
        this.channelsByClient = new Map();  // client -> Map(channel -> count of adds)
        this.subscribedChannels = null;     // what the server was last told, sorted
        this.lastNotificationId = 0;
        this.messageWaitQueue = [];   // requests waiting for the socket (after subscribe)
        this.retryDelay = INITIAL_RETRY_MS;
        this.retryTimer = null;
        this.subscribeTimer = null;
        this.probeTimer = null;
        this.lastTraffic = Date.now();
        this.everConnected = false;
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
                return this._start();
            case "stop":
                return this._stop();
            case "leave":
                return this._leave(client);
            case "set_last_notification_id":
                this.lastNotificationId = Math.max(this.lastNotificationId, Number(data) || 0);
                return;
        }
    }

    // The first tab decides the URL; every tab brings the last id it knows (kept across reloads).
    // The first tab decides the URL (tabs of another version get a worker of their own, see
    // bus_service.js); every tab brings the last id it knows, kept across reloads.
    initializeConnection(client, { websocketURL, version, lastNotificationId }) {
        if (!this.everConnected) {
            this.lastNotificationId = Math.max(this.lastNotificationId, Number(lastNotificationId) || 0);
        }
        this.sendToClient(client, "initialized", { state: this.state, active: this.active });
        if (!this.active) return this.sendToClient(client, "outdated");
        if (this.websocketURL) {
            if (this.state === WORKER_STATE.CONNECTED) this.sendToClient(client, "connect");
            return;
        }
        this.websocketURL = websocketURL;
        this.version = version;
        this._start();
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

    // A closing tab (pagehide) leaves: its channels are released.
    _leave(client) {
        this.clients.delete(client);
        this.channelsByClient.delete(client);
        this._updateChannels();
    }

    _allChannels() {
        const all = new Set();
        for (const counts of this.channelsByClient.values()) for (const channel of counts.keys()) all.add(channel);
        return [...all].sort();
    }

    // Trailing debounce: many adds in a row become one subscribe, sent only if the set changed.
    _updateChannels({ force = false } = {}) {
        clearTimeout(this.subscribeTimer);
        this.subscribeTimer = setTimeout(() => {
            const channels = this._allChannels();
            if (!force && this.subscribedChannels && channels.join("\n") === this.subscribedChannels.join("\n")) return;
            if (this.state === WORKER_STATE.CONNECTED) this._subscribe(channels);
        }, SUBSCRIBE_DEBOUNCE_MS);
    }

    _subscribe(channels) {
        this.subscribedChannels = channels;
        this._write(JSON.stringify({ event_name: "subscribe", data: { channels, last: this.lastNotificationId } }));
    }

    // --- the socket ---------------------------------------------------------------------------

    _sendToServer(message) {
        const text = JSON.stringify(message);
        if (this.state === WORKER_STATE.CONNECTED) this._write(text);
        else this.messageWaitQueue.push(text);
    }

    _write(data) {
        this.lastTraffic = Date.now();
        this.websocket.send(data);
    }

    _setState(state) {
        if (this.state === state) return;
        this.state = state;
        this.broadcast("worker_state_updated", state);
    }

    _start() {
        this.stopped = false;
        this.waitingForIdentity = false;
        if (!this.active || !this.websocketURL) return;
        if (this.websocket && this.websocket.readyState <= WebSocket.OPEN) return;
        clearTimeout(this.retryTimer);
        this._connect();
    }

    _stop() {
        this.stopped = true;
        clearTimeout(this.retryTimer);
        if (this.websocket && this.websocket.readyState <= WebSocket.OPEN) this.websocket.close(1000, "stopped");
    }

    _connect() {
        const url = new URL(this.websocketURL, self.location.href);
        if (this.version) url.searchParams.set("version", this.version);
        this._setState(WORKER_STATE.CONNECTING);
        const socket = new WebSocket(url.toString());
        socket.binaryType = "arraybuffer";
        this.websocket = socket;
        socket.addEventListener("open", () => this._onWebsocketOpen(socket));
        socket.addEventListener("message", (event) => this._onWebsocketMessage(event));
        socket.addEventListener("close", (event) => this._onWebsocketClose(socket, event));
        socket.addEventListener("error", () => {});  // a close event always follows
    }

    _onWebsocketOpen(socket) {
        if (socket !== this.websocket) return;
        const reconnected = this.everConnected;
        this.everConnected = true;
        this.retryDelay = INITIAL_RETRY_MS;
        this._setState(WORKER_STATE.CONNECTED);
        // subscribe is always the first message of a connection; queued requests follow it
        clearTimeout(this.subscribeTimer);
        this._subscribe(this._allChannels());
        for (const text of this.messageWaitQueue.splice(0)) this._write(text);
        this._scheduleProbe();
        this.broadcast(reconnected ? "reconnect" : "connect");
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
        if (delivered.length) this.broadcast("notification", delivered);
    }

    _onWebsocketClose(socket, { code, reason }) {
        if (socket !== this.websocket) return;
        this.websocket = null;
        clearTimeout(this.probeTimer);
        this._setState(WORKER_STATE.DISCONNECTED);
        this.broadcast("disconnect", { code, reason });
        if (reason === "OUTDATED_VERSION") {
            this.active = false;  // a newer server: only a reload of the page helps
            return this.broadcast("outdated");
        }
        if (code === 1000 || this.stopped) return;  // a clean close is final
        if (code === 4001) {
            this.waitingForIdentity = true;  // a tab starts us again once the user has a session
            return;
        }
        // 4002 (lifetime): at once; anything else: back off with jitter
        const delay = code === 4002 ? 0 : this.retryDelay;
        if (code !== 4002) {
            this.retryDelay = Math.min(this.retryDelay * 1.5, MAX_RETRY_MS) + Math.random() * 1000;
        }
        this.broadcast("reconnecting", { closeCode: code });
        this.retryTimer = setTimeout(() => this._start(), delay);
    }

    // Without traffic for a minute, a probe keeps proxies from closing an idle socket.
    _scheduleProbe() {
        clearTimeout(this.probeTimer);
        const wait = Math.max(0, this.lastTraffic + PROBE_AFTER_MS - Date.now());
        this.probeTimer = setTimeout(() => {
            if (this.state !== WORKER_STATE.CONNECTED) return;
            if (Date.now() - this.lastTraffic >= PROBE_AFTER_MS) this._write(PROBE);
            this._scheduleProbe();
        }, wait);
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
