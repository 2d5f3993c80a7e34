// The imbus bus service of one tab (docs/PROTOCOL.md §6). It talks to the shared worker that holds the
// origin's single WebSocket, and hands notifications to the handlers subscribed by type.
//
//     import { BusService } from "/js/bus_service.js";
//     const bus = new BusService({ websocketURL: "/websocket" });
//     bus.subscribe("chat/message", (payload, { id }) => show(payload));
//     bus.addEventListener("connect", () => console.log("live"));
//     bus.addChannel("room:42");
//     bus.start();

const LAST_ID_KEY = "imbus.last_notification_id";  // shared by the tabs, kept across reloads
const DEFAULT_VERSION = "19.0-2";
// Back online, the network is often not usable yet: a retry at once would fail and back off.
export const BACK_ONLINE_RECONNECT_DELAY = 5000;

export class BusService extends EventTarget {
    constructor({
        websocketURL = "/websocket",
        workerURL = new URL("./websocket_worker.js", import.meta.url).href,
        version = DEFAULT_VERSION,
        storage = globalThis.localStorage,
        useSharedWorker = true,
        uid = undefined,  // who the page is (Odoo: the user id; undefined: not known)
        db = undefined,   // and where (Odoo: the database name)
        backOnlineDelay = BACK_ONLINE_RECONNECT_DELAY,  // ms from `online` to the restart
    } = {}) {
        super();
        this.uid = uid;
        this.db = db;
        this.websocketURL = new URL(websocketURL, location.href).href.replace(/^http/, "ws");
        this.workerURL = workerURL;
        this.version = version;
        this.storage = storage;
        this.useSharedWorker = useSharedWorker && typeof SharedWorker !== "undefined";
        this.handlers = new Map();  // type -> Set(handler)
        this.worker = null;
        this.port = null;  // where the tab posts: a MessagePort, or the dedicated Worker
        this.workerState = null;
        this.isOutdated = false;
        this.channelCounts = new Map();  // this tab's adds, replayed if the worker is replaced
        this.started = false;
        this.queued = [];  // posts made before start(): nothing connects until the page says so
        this.backOnlineTimer = null;
        this.backOnlineDelay = backOnlineDelay;
        this.listening = false;
    }

    // --- the tab API ----------------------------------------------------------------------------

    /** Calls handler(payload, {id, type}) for each notification of `type`; returns an unsubscribe. */
    subscribe(type, handler) {
        if (!this.handlers.has(type)) this.handlers.set(type, new Set());
        this.handlers.get(type).add(handler);
        return () => this.unsubscribe(type, handler);
    }

    unsubscribe(type, handler) {
        this.handlers.get(type)?.delete(handler);
    }

    addChannel(channel) {
        channel = String(channel);
        this.channelCounts.set(channel, (this.channelCounts.get(channel) || 0) + 1);
        this._post("add_channel", channel);
    }

    deleteChannel(channel) {
        channel = String(channel);
        const left = (this.channelCounts.get(channel) || 0) - 1;
        if (left < 0) return;
        if (left === 0) this.channelCounts.delete(channel);
        else this.channelCounts.set(channel, left);
        this._post("delete_channel", channel);
    }

    /**
     * Any request to the server, e.g. send("update_presence", {inactivity_period: 0}). With a
     * `key`, a request still waiting for the socket is replaced by a later one of the same event
     * name and key (e.g. send("typing", {room, on}, {key: room})); update_presence always is.
     */
    send(eventName, data, { key } = {}) {
        this._post("send", key === undefined ? { event_name: eventName, data } : { event_name: eventName, data, key });
    }

    start() {
        this.started = true;
        if (!this.port) this.startWorker();
        this._post("start");
    }

    /** This tab leaves the socket (its channels are released); the last tab to stop closes it. */
    stop() {
        this.started = false;
        clearTimeout(this.backOnlineTimer);
        this._post("stop");
    }

    /** Subscribes again even if the channels did not change (debounced with the channel changes). */
    forceUpdateChannels() {
        this._post("force_update_channels");
    }

    get lastNotificationId() {
        return Number(this.storage?.getItem(LAST_ID_KEY)) || 0;
    }

    // --- the worker ----------------------------------------------------------------------------

    // One SharedWorker per origin; a dedicated Worker where SharedWorker is missing or fails.
    // Called by start(): a page that is not logged in yet has no reason to connect.
    startWorker() {
        this._attachWorker();
        for (const message of this.queued.splice(0)) this.port.postMessage(message);
        if (this.listening) return;
        this.listening = true;
        addEventListener("pagehide", (event) => {
            // A page kept in the back-forward cache may come back: it stays registered.
            if (!event.persisted) this._post("leave");
        });
        addEventListener("pageshow", (event) => {
            if (event.persisted) this._reattach();
        });
        addEventListener("online", () => {
            clearTimeout(this.backOnlineTimer);
            this.backOnlineTimer = setTimeout(() => {
                if (this.started) this._post("start");
            }, this.backOnlineDelay);
        });
        addEventListener("offline", () => {
            clearTimeout(this.backOnlineTimer);
            this._post("offline");
        });
        addEventListener("storage", (event) => {
            if (event.key === LAST_ID_KEY) this._post("set_last_notification_id", Number(event.newValue) || 0);
        });
    }

    _attachWorker() {
        if (this.useSharedWorker) {
            try {
                // One worker per protocol version: tabs of an old deploy must not pull new ones
                // into their OUTDATED_VERSION state, nor the other way round.
                const worker = new SharedWorker(this.workerURL, { type: "module", name: `imbus@${this.version}` });
                worker.addEventListener("error", () => {
                    if (worker === this.worker) this._fallBackToWorker();
                });
                this.worker = worker;
                this.port = worker.port;
                this.port.addEventListener("message", this._onPortMessage);
                this.port.start();
                this._initialize();
            } catch {
                // Nothing reached a worker yet: the queue carries every post made so far.
                this.useSharedWorker = false;
                this._startDedicatedWorker();
                this._initialize();
            }
        } else {
            this._startDedicatedWorker();
            this._initialize();
        }
    }

    _onPortMessage = (event) => this._onWorkerMessage(event.data);

    _startDedicatedWorker() {
        this.worker = new Worker(this.workerURL, { type: "module", name: "imbus" });
        this.port = this.worker;
        this.port.addEventListener("message", this._onPortMessage);
    }

    _fallBackToWorker() {
        if (!this.useSharedWorker) return;  // already on a dedicated worker
        this.port.removeEventListener("message", this._onPortMessage);
        this.useSharedWorker = false;
        this._startDedicatedWorker();
        this._initialize();
        this._replay();  // what was posted to the failed SharedWorker is lost
    }

    // Back from the back-forward cache: the worker may have dropped this tab, or ended (and its
    // port with it) while the page was frozen. Join afresh, then leave the old port.
    _reattach() {
        if (!this.port) return;
        const [oldPort, oldWorker, wasShared] = [this.port, this.worker, this.useSharedWorker];
        oldPort.removeEventListener("message", this._onPortMessage);
        this._attachWorker();
        this._replay();
        // after the new port's start: a worker kept alive by this tab alone keeps its socket
        if (wasShared) oldPort.postMessage({ action: "leave" });
        else oldWorker.terminate();
    }

    // This tab's state, for a worker that does not know it.
    _replay() {
        for (const [channel, count] of this.channelCounts)
            for (let i = 0; i < count; ++i) this.port.postMessage({ action: "add_channel", data: channel });
        if (this.started) this.port.postMessage({ action: "start" });
    }

    _initialize() {
        this.port.postMessage({
            action: "initialize_connection",
            data: { websocketURL: this.websocketURL, version: this.version, lastNotificationId: this.lastNotificationId,
                    uid: this.uid, db: this.db },
        });
    }

    _post(action, data) {
        if (!this.port) return this.queued.push({ action, data });
        this.port.postMessage({ action, data });
    }

    _emit(type, detail) {
        this.dispatchEvent(new CustomEvent(type, { detail }));
    }

    _onWorkerMessage({ type, data }) {
        switch (type) {
            case "notification":
                return this._onNotifications(data);
            case "worker_state_updated":
                this.workerState = data;
                return this._emit(type, data);
            case "outdated":
                this.isOutdated = true;
                return this._emit(type, data);
            case "initialized":
                this.workerState = data.state;
                return;
            default:  // connect, disconnect, reconnecting, reconnect, refused, missed_notifications, request_refused
                return this._emit(type, data);
        }
    }

    _onNotifications(notifications) {
        let last = this.lastNotificationId;
        for (const { id, message } of notifications) {
            last = id;  // ascending, and after a store reset lower than before: assign
            for (const handler of this.handlers.get(message.type) || []) {
                try {
                    handler(message.payload, { id, type: message.type });
                } catch (error) {
                    console.error("imbus: a notification handler failed", error);
                }
            }
        }
        this.storage?.setItem(LAST_ID_KEY, String(last));
        this._emit("notification", notifications);
    }
}
