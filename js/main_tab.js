// One main tab per browser (Odoo: the multi-tab service's main tab): the tab that does the
// once-per-browser work, such as playing a sound, showing a desktop notification or checking
// for missed notifications, so that ten open tabs do not do it ten times.
//
//   import { MainTab } from "/js/main_tab.js";
//   const mainTab = new MainTab();
//   mainTab.addEventListener("change", (e) => console.log(e.detail.isMain, e.detail.main));
//   mainTab.start();
//   if (mainTab.isMain) new Audio("/ding.mp3").play();
//
// The main tab holds a Web Lock (navigator.locks), so the browser itself guarantees there is
// exactly one and hands the lock to a waiting tab the moment the holder closes. A tab that is
// frozen (the Page Lifecycle "freeze" event) or enters the back-forward cache lets go first and
// queues again when it comes back. Where Web Locks are missing (pages served over plain http
// to another machine are not a secure context), tabs elect through localStorage heartbeats
// instead: the same events, but a hand-over takes up to HEARTBEAT_TIMEOUT_MS and two tabs
// racing for it may both be main for one heartbeat.
//
// It does not use the bus worker, so it works the same with the SharedWorker and with the
// dedicated-Worker fallback. Events: "change" {isMain, main} whenever this tab becomes or
// stops being main, and when another tab announces that it is main (main: its id; a tab that
// starts asks, and the main tab answers).

const HEARTBEAT_MS = 1000;
const HEARTBEAT_TIMEOUT_MS = 3000;

export class MainTab extends EventTarget {
    /** name: the lock (and storage key) name; tabs with the same name elect one main. */
    constructor({ name = "imbus-main-tab" } = {}) {
        super();
        this.name = name;
        this.id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
        this.isMain = false;
        this.main = null;  // the main tab's id, when known
        this.started = false;
        this._useLocks = typeof navigator !== "undefined" && !!navigator.locks;
        this._abort = null;    // cancels a lock request still waiting
        this._release = null;  // lets go of a lock held
        this._timer = null;    // the heartbeat fallback's tick
        this._channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(name) : null;
        if (this._channel) this._channel.onmessage = (event) => this._onAnnounce(event.data);
        this._onFreeze = () => this._pause();
        this._onResume = () => this._resume();
        this._onPageHide = (event) => { if (event.persisted) this._pause(); else this.stop(); };
        this._onPageShow = (event) => { if (event.persisted) this._resume(); };
        this._onStorage = (event) => { if (event.key === this.name) this._tick(); };
    }

    /** Joins the election: this tab becomes main now if no other is, or waits its turn. */
    start() {
        if (this.started) return;
        this.started = true;
        document.addEventListener("freeze", this._onFreeze);
        document.addEventListener("resume", this._onResume);
        window.addEventListener("pagehide", this._onPageHide);
        window.addEventListener("pageshow", this._onPageShow);
        if (!this._useLocks) window.addEventListener("storage", this._onStorage);
        if (this._channel) this._channel.postMessage({ who: true });  // the main tab answers
        this._resume();
    }

    /** Leaves the election for good; another tab takes over if this one was main. */
    stop() {
        if (!this.started) return;
        this._pause();
        this.started = false;
        document.removeEventListener("freeze", this._onFreeze);
        document.removeEventListener("resume", this._onResume);
        window.removeEventListener("pagehide", this._onPageHide);
        window.removeEventListener("pageshow", this._onPageShow);
        window.removeEventListener("storage", this._onStorage);
    }

    // Queues for the lock (or starts the heartbeat), unless already there.
    _resume() {
        if (!this.started || this._abort || this._release || this._timer) return;
        if (!this._useLocks) {
            this._timer = setInterval(() => this._tick(), HEARTBEAT_MS);
            return this._tick();
        }
        const abort = new AbortController();
        this._abort = abort;
        navigator.locks.request(this.name, { signal: abort.signal }, () => {
            this._abort = null;
            return new Promise((release) => {
                this._release = release;
                this._become(true, this.id);
            });
        }).catch(() => {});  // AbortError: stopped or paused while waiting
    }

    // Lets go of the lock, or stops waiting for it; a frozen tab must not keep the others waiting.
    _pause() {
        if (this._abort) this._abort.abort();
        this._abort = null;
        if (this._release) this._release();
        this._release = null;
        if (this._timer) {
            clearInterval(this._timer);
            this._timer = null;
            if (this.isMain) localStorage.removeItem(this.name);  // the next tab need not wait
        }
        if (this.isMain) this._become(false, null);
    }

    // The heartbeat fallback: the main tab refreshes its stamp; another takes over a stale one.
    _tick() {
        if (!this._timer) return;
        let stamp = null;
        try { stamp = JSON.parse(localStorage.getItem(this.name)); } catch { /* garbled: stale */ }
        const now = Date.now();
        const stale = !stamp || typeof stamp.at !== "number" || now - stamp.at > HEARTBEAT_TIMEOUT_MS;
        if (stamp && stamp.id === this.id || stale) {
            localStorage.setItem(this.name, JSON.stringify({ id: this.id, at: now }));
            if (!this.isMain) this._become(true, this.id);
        } else if (this.isMain) {
            this._become(false, stamp.id);  // another tab claimed it at the same time and won
        }
    }

    _become(isMain, main) {
        this.isMain = isMain;
        this.main = main;
        if (isMain && this._channel) this._channel.postMessage({ main: this.id });
        this.dispatchEvent(new CustomEvent("change", { detail: { isMain, main } }));
    }

    _onAnnounce(data) {
        if (data && data.who === true) {
            if (this.isMain) this._channel.postMessage({ main: this.id });
            return;
        }
        if (!data || typeof data.main !== "string" || data.main === this.main) return;
        if (this.isMain && !this._useLocks) return this._tick();  // the stamp decides
        this.main = data.main;
        this.dispatchEvent(new CustomEvent("change", { detail: { isMain: this.isMain, main: data.main } }));
    }
}
