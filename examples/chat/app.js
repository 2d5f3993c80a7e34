// The imbus chat page: plain DOM, the bus client from /js/bus_service.js, JSON routes under /chat/.
import { BusService } from "/js/bus_service.js";

const AWAY_AFTER_MS = 60000;       // the server's rule too: away after 60 s without activity
const PRESENCE_EVERY_MS = 30000;
const TYPING_SHOWN_MS = 3000;
const TYPING_EVERY_MS = 2000;      // at most one "typing" request per 2 s

const $ = (id) => document.getElementById(id);
const state = {
    me: null,
    rooms: [],                     // joined rooms, sorted
    current: null,                 // the room on screen
    messages: new Map(),           // room -> Map(id -> message)
    unread: new Map(),             // room -> count
    presence: new Map(),           // user -> "online" | "away" | "offline"
    typing: new Map(),             // user -> {room, timer}
};
let bus = null;
const ACTIVITY_KEY = "imbus-chat.last_activity";  // shared by the tabs: one presence per browser
let lastTypingSent = 0;

async function api(method, path, body) {
    const response = await fetch(path, {
        method,
        headers: body ? { "Content-Type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), { status: response.status });
    return data;
}

function element(tag, attributes = {}, text = "") {
    const e = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) e.setAttribute(name, value);
    e.textContent = text;
    return e;
}

function showError(id, error) {
    $(id).textContent = error ? error.message || String(error) : "";
}

// --- rendering ---------------------------------------------------------------------------------

function renderRooms() {
    $("rooms").replaceChildren(...state.rooms.map((room) => {
        const unread = state.unread.get(room) || 0;
        const button = element("button", { type: "button", "data-testid": "room-button", "data-room": room },
                               `#${room}${unread ? ` (${unread})` : ""}`);
        if (room === state.current) button.setAttribute("aria-current", "true");
        button.addEventListener("click", () => selectRoom(room));
        const item = element("li");
        item.append(button);
        return item;
    }));
}

function renderMessages() {
    const list = $("messages");
    const messages = [...(state.messages.get(state.current)?.values() || [])].sort((a, b) => a.id - b.id);
    list.replaceChildren(...messages.map((m) => {
        const item = element("li", { "data-testid": "message", "data-user": m.user, "data-id": m.id });
        if (m.user === state.me) item.classList.add("mine");
        item.append(element("span", { class: "author" }, m.user),
                    element("time", { datetime: new Date(m.at).toISOString() },
                            new Date(m.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })),
                    element("span", { class: "text", "data-testid": "message-text" }, m.text));
        return item;
    }));
    list.scrollTop = list.scrollHeight;
}

function renderPresence() {
    const users = [...state.presence.keys()].sort();
    $("presence").replaceChildren(...users.map((user) => {
        const status = state.presence.get(user);
        return element("li", { "data-testid": "presence-item", "data-user": user, "data-status": status, class: status },
                       `${user}${user === state.me ? " (you)" : ""} · ${status}`);
    }));
}

function renderTyping() {
    const users = [...state.typing].filter(([, t]) => t.room === state.current).map(([user]) => user).sort();
    $("typing").textContent = users.length === 0 ? ""
        : `${users.join(" and ")} ${users.length === 1 ? "is" : "are"} typing…`;
}

function renderRoom() {
    const inRoom = state.current !== null;
    $("room-title").textContent = inRoom ? `#${state.current}` : "Join a room to start";
    $("leave").hidden = !inRoom;
    $("message-input").disabled = $("send-button").disabled = !inRoom;
    renderRooms();
    renderMessages();
    renderTyping();
}

// --- state changes ----------------------------------------------------------------------------

function addMessage(m) {
    if (!state.messages.has(m.room)) state.messages.set(m.room, new Map());
    const known = state.messages.get(m.room).has(m.id);
    state.messages.get(m.room).set(m.id, m);
    return !known;
}

async function loadHistory(room) {
    const { messages } = await api("GET", `/chat/history?room=${encodeURIComponent(room)}`);
    messages.forEach(addMessage);  // de-duplicated by id
    if (state.current === room) renderMessages();
}

async function selectRoom(room) {
    state.current = room;
    state.unread.delete(room);
    renderRoom();
    try {
        await loadHistory(room);
    } catch (error) {
        showError("chat-error", error);
    }
}

// Joined here or in another tab (chat/joined on the user's own channel): idempotent.
function addRoom(room) {
    if (state.rooms.includes(room)) return;
    state.rooms = [...state.rooms, room].sort();
    bus.addChannel(`room:${room}`);
    renderRooms();
    // The worker subscribes after a 300 ms debounce and the server keeps its cursor: a message
    // sent in between reaches this tab through neither the history nor the bus. Ask once more.
    setTimeout(() => loadHistory(room).catch(() => {}), 1000);
}

function removeRoom(room) {
    if (!state.rooms.includes(room)) return;
    state.rooms = state.rooms.filter((r) => r !== room);
    bus.deleteChannel(`room:${room}`);
    if (state.current === room) state.current = null;
    renderRoom();
}

async function loadPresence() {
    const { users } = await api("GET", "/chat/online");
    for (const { user, status } of users) state.presence.set(user, status);
    renderPresence();
}

const lastActivity = () => Number(localStorage.getItem(ACTIVITY_KEY)) || 0;

function reportPresence() {
    bus.send("update_presence", { inactivity_period: Math.max(0, Date.now() - lastActivity()) });
}

function onActivity() {
    const idle = Date.now() - lastActivity();
    if (idle < 1000) return;  // mousemove fires often: remember it once a second
    localStorage.setItem(ACTIVITY_KEY, String(Date.now()));
    if (idle >= AWAY_AFTER_MS) reportPresence();  // was away: say so at once
}

function banner(text) {
    $("connection-banner").textContent = text || "";
    $("connection-banner").hidden = !text || bus.isOutdated;
}

// --- the bus ----------------------------------------------------------------------------------

function startBus() {
    bus = new BusService({ websocketURL: "/websocket" });
    bus.subscribe("chat/message", (m) => {
        if (!addMessage(m)) return;
        state.typing.delete(m.user);
        if (m.room === state.current) renderMessages();
        else if (m.user !== state.me) state.unread.set(m.room, (state.unread.get(m.room) || 0) + 1);
        renderRooms();
        renderTyping();
    });
    bus.subscribe("chat/presence", ({ user, status }) => {
        state.presence.set(user, status);
        renderPresence();
    });
    bus.subscribe("chat/typing", ({ room, user, at }) => {
        // a (re)connection replays the last 50 s: old typing notifications are stale
        if (user === state.me || Date.now() - at > TYPING_SHOWN_MS) return;
        clearTimeout(state.typing.get(user)?.timer);
        const timer = setTimeout(() => { state.typing.delete(user); renderTyping(); }, TYPING_SHOWN_MS);
        state.typing.set(user, { room, timer });
        renderTyping();
    });
    bus.subscribe("chat/joined", ({ room }) => addRoom(room));
    bus.subscribe("chat/left", ({ room }) => removeRoom(room));
    bus.addEventListener("connect", () => { banner(""); reportPresence(); });
    bus.addEventListener("reconnect", () => { banner(""); reportPresence(); loadPresence().catch(() => {}); });
    bus.addEventListener("reconnecting", () => banner("Connection lost, reconnecting…"));
    bus.addEventListener("disconnect", ({ detail }) => {
        if (detail?.code === 4001) banner("Your session has expired: log in again.");
        else if (detail?.code !== 1000) banner("Disconnected.");
    });
    bus.addEventListener("missed_notifications", () => {
        loadPresence().catch(() => {});
        if (state.current) selectRoom(state.current);
    });
    bus.addEventListener("outdated", () => {
        $("outdated-banner").hidden = false;
        $("connection-banner").hidden = true;
    });
    bus.addChannel("presence");
    bus.start();
    setInterval(reportPresence, PRESENCE_EVERY_MS);
    for (const type of ["pointerdown", "keydown", "mousemove", "focus"]) addEventListener(type, onActivity, { passive: true });
}

async function enter({ name, rooms }) {
    state.me = name;
    $("me").textContent = name;
    $("login-form").hidden = true;
    $("chat").hidden = false;
    localStorage.setItem(ACTIVITY_KEY, String(Date.now()));
    startBus();
    rooms.forEach(addRoom);
    loadPresence().catch((error) => showError("chat-error", error));
    renderRoom();
    if (rooms.length) await selectRoom(rooms[0]);
}

// --- forms ------------------------------------------------------------------------------------

$("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
        await api("POST", "/chat/login", { name: $("login-name").value.trim() });
        await enter(await api("GET", "/chat/me"));
    } catch (error) {
        showError("login-error", error);
    }
});

$("join-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const room = $("join-room").value.trim();
    try {
        await api("POST", "/chat/join", { room });
        $("join-room").value = "";
        addRoom(room);
        await selectRoom(room);
        showError("chat-error", null);
    } catch (error) {
        showError("chat-error", error);
    }
});

$("leave").addEventListener("click", async () => {
    const room = state.current;
    try {
        await api("POST", "/chat/leave", { room });
        removeRoom(room);
    } catch (error) {
        showError("chat-error", error);
    }
});

$("send-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("message-input").value;
    if (!text.trim() || !state.current) return;
    try {
        const message = await api("POST", "/chat/send", { room: state.current, text });
        $("message-input").value = "";
        lastTypingSent = 0;
        if (addMessage(message) && message.room === state.current) renderMessages();
        showError("chat-error", null);
    } catch (error) {
        showError("chat-error", error);
    }
});

$("message-input").addEventListener("input", () => {
    if (!state.current || !$("message-input").value || Date.now() - lastTypingSent < TYPING_EVERY_MS) return;
    lastTypingSent = Date.now();
    bus.send("typing", { room: state.current });
});

$("logout").addEventListener("click", async () => {
    await api("POST", "/chat/logout").catch(() => {});
    bus?.stop();
    location.reload();
});

$("reload").addEventListener("click", () => location.reload());

// Already signed in (the session cookie)? Otherwise ask for a name.
api("GET", "/chat/me").then(enter, () => {
    $("login-form").hidden = false;
    $("login-name").focus();
});
