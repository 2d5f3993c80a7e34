// The imbus chat page: plain DOM, JSON routes under /chat/, and the library's browser side:
// the bus client (/js/bus_service.js), presence (/js/presence.js) and the main tab (/js/main_tab.js).
import { BusService } from "/js/bus_service.js";
import { MainTab } from "/js/main_tab.js";
import { Presence } from "/js/presence.js";

const TYPING_SHOWN_MS = 3000;      // a "typing" not renewed within this is over (the sender may be gone)
const TYPING_EVERY_MS = 2000;      // at most one "typing" request per 2 s
const DEFAULT_ROOM = "general";    // the server puts every new user in it
const ROOM_NAME = /^[A-Za-z0-9_-]{1,32}$/;  // the server's rule (valid_room in chat.cpp)
const UNREACHABLE = "Can't reach the server. Check your connection; the chat reconnects by itself.";
const SESSION_ENDED = "Your session has ended: sign in again.";
const TITLE = document.title;

const $ = (id) => document.getElementById(id);
const state = {
    me: null,
    rooms: [],                     // joined rooms, sorted
    allRooms: [],                  // every room on the server: [{name, members}]
    current: null,                 // the room on screen
    messages: new Map(),           // room -> Map(id -> message)
    unread: new Map(),             // room -> count
    seen: new Map(),               // room -> the highest message id shown or counted (a replay is not unread)
    presence: new Map(),           // user -> "online" | "away" | "offline"
    connected: false,              // this tab's socket is up: without it presence is unknown
    typing: new Map(),             // user -> {room, timer}
    notified: 0,                   // new-message notices this tab showed (the main tab only)
};
let bus = null, presence = null, mainTab = null;  // while signed in
// The tabs of this browser share one session cookie: signing out or in is news for all of them.
const tabs = new BroadcastChannel("imbus-chat");
let lastTypingSent = 0;
let retryAction = null;            // what "Retry now" runs again

async function api(method, path, body) {
    let response;
    try {
        response = await fetch(path, {
            method,
            headers: body ? { "Content-Type": "application/json" } : {},
            body: body ? JSON.stringify(body) : undefined,
        });
    } catch {  // fetch rejects only when no answer came at all (server down, network gone)
        throw Object.assign(new Error(UNREACHABLE), { unreachable: true });
    }
    const data = await response.json().catch(() => ({}));
    if (response.status === 401) signOut(SESSION_ENDED);  // the cookie expired or the server forgot it
    if (!response.ok) throw Object.assign(new Error(readable(response.status, data.error)), { status: response.status });
    return data;
}

function readable(status, error) {
    if (status === 401) return SESSION_ENDED;
    if (status >= 500 || !error) return `The server could not do that (error ${status}). Try again in a moment.`;
    return error[0].toUpperCase() + error.slice(1) + ".";  // the server's messages are lower-case phrases
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

// The chat's error line; `again` is offered as "Retry now" when the server could not be reached.
function showChatError(error, again) {
    $("chat-error").textContent = error ? error.message || String(error) : "";
    $("chat-alert").hidden = !error;
    retryAction = error?.unreachable ? again : null;
    $("retry").hidden = !retryAction;
}

// Runs a user action: a failure goes to the error line (with a retry), a success clears it.
async function attempt(action) {
    try {
        await action();
        showChatError(null);
    } catch (error) {
        showChatError(error, action);
    }
}

// --- what this browser remembers per user: unread counts and the room on screen -------------------

const savedKey = () => `imbus-chat.user.${state.me}`;

function loadSaved() {
    let saved = {};
    try {
        saved = JSON.parse(localStorage.getItem(savedKey())) || {};
    } catch { /* unreadable: start afresh */ }
    state.unread = new Map(Object.entries(saved.unread || {}));
    state.seen = new Map(Object.entries(saved.seen || {}));
    return saved;
}

function save() {
    localStorage.setItem(savedKey(), JSON.stringify({
        current: state.current, unread: Object.fromEntries(state.unread), seen: Object.fromEntries(state.seen),
    }));
}

// A message arrived (live, replayed or in a history): unread unless on screen, mine, or counted
// before. Returns whether it is newly unread.
function account(m) {
    const unread = m.room !== state.current && m.user !== state.me && m.id > (state.seen.get(m.room) || 0);
    if (unread) state.unread.set(m.room, (state.unread.get(m.room) || 0) + 1);
    if (m.id > (state.seen.get(m.room) || 0)) state.seen.set(m.room, m.id);
    return unread;
}

// --- rendering ---------------------------------------------------------------------------------

function renderRooms() {
    let total = 0;
    $("rooms").replaceChildren(...state.rooms.map((room) => {
        const unread = state.unread.get(room) || 0;
        total += unread;
        const button = element("button", { type: "button", "data-testid": "room-button", "data-room": room });
        button.append(element("span", { class: "name" }, `#${room}`));
        if (unread) button.append(element("span", { class: "badge", "data-testid": "unread-count" }, String(unread)));
        if (room === state.current) button.setAttribute("aria-current", "true");
        button.addEventListener("click", () => { showDrawer(false); selectRoom(room); });
        const item = element("li");
        item.append(button);
        return item;
    }));
    $("unread-total").textContent = String(total);
    $("unread-total").hidden = total === 0;
    document.title = total ? `(${total}) ${TITLE}` : TITLE;  // every tab
    renderDirectory();
}

function renderDirectory() {
    const others = state.allRooms.filter(({ name }) => !state.rooms.includes(name));
    $("directory-title").hidden = others.length === 0;
    $("directory").replaceChildren(...others.map(({ name, members }) => {
        const button = element("button", { type: "button", "data-testid": "directory-room", "data-room": name,
                                            title: `Join #${name}` });
        button.append(element("span", { class: "name" }, `#${name}`),
                      element("span", { class: "count" }, `${members} ${members === 1 ? "member" : "members"}`));
        button.addEventListener("click", () => { showDrawer(false); attempt(() => joinRoom(name)); });
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
                    element("p", { class: "text", "data-testid": "message-text" }, m.text));
        return item;
    }));
    list.scrollTop = list.scrollHeight;
}

function renderPresence() {
    const users = [...state.presence.keys()].sort();
    $("presence-note").hidden = state.connected;
    $("presence").replaceChildren(...users.map((user) => {
        // Disconnected, this tab hears no changes: what it last heard may be wrong by now.
        const status = state.connected ? state.presence.get(user) : "unknown";
        const item = element("li", { "data-testid": "presence-item", "data-user": user, "data-status": status,
                                     class: status, title: status });
        item.append(element("span", { class: "name" }, user + (user === state.me ? " (you)" : "")),
                    element("span", { class: "status" }, status));
        return item;
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
    $("room-title").title = $("room-title").textContent;  // a long name is cut on screen
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
    messages.forEach(account);  // what came while this page was closed counts as unread too
    save();
    if (state.current === room) renderMessages();
    renderRooms();
}

async function selectRoom(room) {
    state.current = room;
    state.unread.delete(room);
    save();
    renderRoom();
    await attempt(() => loadHistory(room));
}

async function loadDirectory() {
    state.allRooms = (await api("GET", "/chat/rooms")).rooms;
    renderDirectory();
}

async function joinRoom(room) {
    await api("POST", "/chat/join", { room });
    addRoom(room);
    await selectRoom(room);
    loadDirectory().catch(() => {});  // its member count changed
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
    state.unread.delete(room);
    if (state.current === room) state.current = state.rooms.includes(DEFAULT_ROOM) ? DEFAULT_ROOM : state.rooms[0] ?? null;
    if (state.current) selectRoom(state.current);
    else renderRoom();
}

// A new message elsewhere: once per browser (the main tab), a notice and a short sound.
function notify(m) {
    if (!mainTab.isMain) return;
    ++state.notified;
    const notice = $("notice");
    notice.textContent = `${m.user} in #${m.room}: ${m.text}`;
    notice.dataset.count = String(state.notified);
    notice.dataset.room = m.room;
    notice.hidden = false;
    clearTimeout(notify.timer);
    notify.timer = setTimeout(() => { notice.hidden = true; }, 5000);
    beep();
}

function beep() {
    try {
        const audio = beep.context ??= new AudioContext();
        const tone = audio.createOscillator(), gain = audio.createGain();
        gain.gain.value = 0.05;
        tone.connect(gain).connect(audio.destination);
        tone.start();
        tone.stop(audio.currentTime + 0.12);
    } catch { /* no sound: the notice is enough */ }
}

function banner(text) {
    $("connection-banner").textContent = text || "";
    $("connection-banner").hidden = !text || bus.isOutdated;
}

function setConnected(connected) {
    state.connected = connected;
    renderPresence();
    if (connected && retryAction) showChatError(null);  // the server is back: "can't reach" is over
}

// Phones: the sidebar is a drawer over the room, opened by the ☰ button.
function showDrawer(open) {
    document.body.classList.toggle("drawer-open", open);
    $("rooms-toggle").setAttribute("aria-expanded", String(open));
}

// --- the bus ----------------------------------------------------------------------------------

function startBus(me, awayAfter) {
    // uid: a tab signed in as someone else reopens the browser's one socket for that user.
    bus = new BusService({ websocketURL: "/websocket", uid: me });
    presence = new Presence(bus, { awayAfter });  // activity, shared by the tabs, to the server
    mainTab = new MainTab();
    mainTab.start();
    bus.subscribe("chat/message", (m) => {
        if (!addMessage(m)) return;
        clearTimeout(state.typing.get(m.user)?.timer);
        state.typing.delete(m.user);
        if (account(m)) notify(m);
        save();
        if (m.room === state.current) renderMessages();
        renderRooms();
        renderTyping();
    });
    bus.subscribe("chat/people", ({ people }) => {  // right after each subscribe, to this page alone
        state.presence = new Map(people.map(({ user, status }) => [user, status]));
        renderPresence();
    });
    bus.subscribe("chat/presence", ({ who, status }) => {  // the server's presence tracker
        state.presence.set(who, status);
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
    // Each (re)connection subscribes, and chat/people follows: presence needs no reload here.
    bus.addEventListener("connect", () => { banner(""); setConnected(true); });
    bus.addEventListener("reconnect", () => {
        banner("");
        setConnected(true);
        loadDirectory().catch(() => {});
    });
    bus.addEventListener("reconnecting", () => { banner("Connection lost, reconnecting…"); setConnected(false); });
    bus.addEventListener("disconnect", ({ detail }) => {
        setConnected(false);
        if (detail?.code === 4001) signOut(SESSION_ENDED);  // the server ended the session
        else if (detail?.reason === "identity changed") followSession();
        else if (detail?.code !== 1000) banner("Disconnected.");
    });
    // The handshake was refused (401/403: an expired or revoked cookie): retrying cannot help.
    bus.addEventListener("refused", () => signOut(SESSION_ENDED));
    bus.addEventListener("missed_notifications", () => {
        if (state.current) selectRoom(state.current);
    });
    bus.addEventListener("outdated", () => {
        $("outdated-banner").hidden = false;
        $("connection-banner").hidden = true;
    });
    bus.addChannel("presence");
    bus.start();
    // A tab that joins a socket already open adds no new channel, so nothing is subscribed and
    // no chat/people comes: subscribe again anyway (for the first tab, the open's own subscribe).
    bus.forceUpdateChannels();
}

// This tab stops (its channels, presence and main-tab role go; the last tab closes the
// socket) and shows the sign-in form, with `message` saying why.
function signOut(message) {
    if (!state.me) return;
    state.me = null;
    bus.stop();
    presence.stop();
    mainTab.stop();
    setConnected(false);
    $("chat").hidden = true;
    $("connection-banner").hidden = true;
    $("notice").hidden = true;
    document.title = TITLE;
    showLogin();
    $("login-error").textContent = message;
}

// Another tab signed in (the session cookie is the browser's): show its user here too. Both
// the other tab's message and the socket's "identity changed" ask: reload once.
let following = false;
async function followSession() {
    const me = await api("GET", "/chat/me").catch(() => null);
    if (!me || me.name === state.me || following) return;
    following = true;
    location.reload();
}

tabs.addEventListener("message", ({ data }) => {
    if (data.signedOut && data.signedOut === state.me) signOut("You signed out in another tab.");
    if (data.signedIn) followSession();
});

async function enter({ name, rooms, away_after_ms }) {
    state.me = name;
    $("me").textContent = name;
    $("login-form").hidden = true;
    $("chat").hidden = false;
    const saved = loadSaved();
    startBus(name, away_after_ms);
    rooms.forEach(addRoom);
    loadDirectory().catch(() => {});
    renderRoom();
    const first = [saved.current, DEFAULT_ROOM, rooms[0]].find((room) => rooms.includes(room));
    if (first) await selectRoom(first);
}

function showLogin() {
    $("login-form").hidden = false;
    $("login-name").focus();
}

// Why a room name is refused, in words (the same rule as the server's), or "" when it is fine.
function roomNameProblem(room) {
    if (ROOM_NAME.test(room)) return "";
    if (!room) return "Type a room name.";
    if (room.length > 32) return "A room name has at most 32 characters.";
    return "Room names use only letters A–Z, digits, - and _ (no spaces or accents), up to 32 characters.";
}

// --- forms ------------------------------------------------------------------------------------

$("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
        const { name } = await api("POST", "/chat/login", { name: $("login-name").value.trim() });
        showError("login-error", null);
        tabs.postMessage({ signedIn: name });
        if (bus) return location.reload();  // this page had a session: start afresh, nothing carries over
        await enter(await api("GET", "/chat/me"));
    } catch (error) {
        showError("login-error", error);
    }
});

function checkRoomName() {
    const problem = $("join-room").value ? roomNameProblem($("join-room").value.trim()) : "";
    $("join-error").textContent = problem;
    $("join-room").setAttribute("aria-invalid", String(Boolean(problem)));
    return !problem;
}

$("join-room").addEventListener("input", checkRoomName);

$("join-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const room = $("join-room").value.trim();
    if (!room) return $("join-room").focus();
    if (!checkRoomName()) return;
    showDrawer(false);
    await attempt(async () => {
        await joinRoom(room);
        $("join-room").value = "";
    });
});

$("leave").addEventListener("click", () => {
    const room = state.current;
    attempt(async () => {
        await api("POST", "/chat/leave", { room });
        removeRoom(room);
        loadDirectory().catch(() => {});
    });
});

$("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message-input").value, room = state.current;
    if (!text.trim() || !room) return;
    attempt(async () => {
        const message = await api("POST", "/chat/send", { room, text });
        if ($("message-input").value === text) $("message-input").value = "";  // unless a new one is being typed
        lastTypingSent = 0;
        account(message);
        if (addMessage(message) && message.room === state.current) renderMessages();
    });
});

$("retry").addEventListener("click", async () => {
    $("retry").disabled = true;
    await attempt(retryAction);
    $("retry").disabled = false;
});

$("rooms-toggle").addEventListener("click", () => showDrawer(!document.body.classList.contains("drawer-open")));
$("backdrop").addEventListener("click", () => showDrawer(false));
addEventListener("keydown", (event) => { if (event.key === "Escape") showDrawer(false); });

$("message-input").addEventListener("input", () => {
    if (!state.current || !$("message-input").value || Date.now() - lastTypingSent < TYPING_EVERY_MS) return;
    lastTypingSent = Date.now();
    bus.send("typing", { room: state.current }, { key: state.current });  // offline: only the latest waits
});

// The cookie is gone for every tab of this browser: they all sign out (and the socket closes).
$("logout").addEventListener("click", async () => {
    await api("POST", "/chat/logout").catch(() => {});
    tabs.postMessage({ signedOut: state.me });
    signOut("");
});

$("reload").addEventListener("click", () => location.reload());
$("notice").addEventListener("click", () => {
    $("notice").hidden = true;
    if (state.rooms.includes($("notice").dataset.room)) selectRoom($("notice").dataset.room);
});

// Already signed in (the session cookie)? Otherwise ask for a name.
api("GET", "/chat/me").then((me) => (me.name ? enter(me) : showLogin()), (error) => {
    showLogin();
    showError("login-error", error);
});
