// The user's presence for the server's presence_tracker (imbus.hpp "Presence", docs/PROTOCOL.md
// §6 "Presence"): one per tab, next to the tab's BusService. It notices activity (pointer, keys, wheel,
// the window getting focus), shares the last activity with the other tabs of the browser through
// localStorage, and sends update_presence {inactivity_period: ms} over the bus:
// right after each (re)connect, when the user is back after away_after of inactivity, and
// every updateInterval while connected (the server decides when idle becomes away).
//
//     import { Presence } from "/js/presence.js";
//     const presence = new Presence(bus, { awayAfter: 30 * 60 * 1000 });  // the server's away_after
//     presence.inactivityPeriod();   // ms since the last activity in any tab of this browser
//     presence.stop();               // listeners and timers removed

const LAST_ACTIVITY_KEY = "imbus.presence.last_activity";  // shared by the tabs
const ACTIVITY_EVENTS = ["pointerdown", "keydown", "wheel"];

export class Presence {
    constructor(bus, {
        awayAfter = 30 * 60 * 1000,  // Odoo's AWAY_DELAY; should match the server's away_after
        updateInterval = 60 * 1000,  // Odoo's UPDATE_BUS_PRESENCE_DELAY
        debounce = 250,              // sends asked for within this window go as one
        storage = globalThis.localStorage,
        now = () => Date.now(),
    } = {}) {
        this.bus = bus;
        this.awayAfter = awayAfter;
        this.debounce = debounce;
        this.storage = storage;
        this.now = now;
        this.lastActivity = Math.max(Number(storage?.getItem(LAST_ACTIVITY_KEY)) || 0, now());
        this.lastWritten = 0;
        this.sendTimer = null;
        this.sent = 0;  // update_presence requests handed to the bus so far

        this._onActivity = () => this._activity(this.now());
        this._onStorage = (event) => {
            if (event.key !== LAST_ACTIVITY_KEY) return;
            const at = Number(event.newValue) || 0;
            if (at > this.lastActivity) this._activity(at, false);
        };
        this._onConnect = () => this._schedule();
        for (const name of ACTIVITY_EVENTS) addEventListener(name, this._onActivity, { capture: true, passive: true });
        addEventListener("focus", this._onActivity);
        addEventListener("storage", this._onStorage);
        bus.addEventListener("connect", this._onConnect);
        bus.addEventListener("reconnect", this._onConnect);
        // Periodic while connected; the worker keeps only the latest one while it is not.
        this.interval = setInterval(() => this._schedule(), updateInterval);
        this._schedule();  // the bus may be connected already: its connect event is gone
    }

    /** Milliseconds since the last activity in any tab of this browser. */
    inactivityPeriod() {
        return Math.max(0, this.now() - this.lastActivity);
    }

    /** Sends update_presence now (e.g. after the page's own notion of activity). */
    update() {
        clearTimeout(this.sendTimer);
        this.sendTimer = null;
        ++this.sent;
        this.bus.send("update_presence", { inactivity_period: this.inactivityPeriod() });
    }

    stop() {
        clearTimeout(this.sendTimer);
        clearInterval(this.interval);
        for (const name of ACTIVITY_EVENTS) removeEventListener(name, this._onActivity, { capture: true });
        removeEventListener("focus", this._onActivity);
        removeEventListener("storage", this._onStorage);
        this.bus.removeEventListener("connect", this._onConnect);
        this.bus.removeEventListener("reconnect", this._onConnect);
    }

    // Activity here (share it) or in another tab (it is shared already). Only coming back from
    // away is worth a request: the server needs no word about activity while it says online.
    _activity(at, share = true) {
        const wasAway = at - this.lastActivity >= this.awayAfter;
        this.lastActivity = at;
        if (share && at - this.lastWritten >= 1000) {  // at most one storage event a second
            this.lastWritten = at;
            this.storage?.setItem(LAST_ACTIVITY_KEY, String(at));
        }
        if (wasAway) this._schedule();
    }

    _schedule() {
        if (this.sendTimer === null) this.sendTimer = setTimeout(() => this.update(), this.debounce);
    }
}
