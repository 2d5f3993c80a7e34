// The imbus chat demo. Users, rooms, memberships and messages live in the application's own
// SQLite database and the bus rows (bus_bus) in the same file, so a message and its notification
// commit together (the outbox pattern). The page (index.html, app.js) and the browser client
// (js/) come from the same origin as the WebSocket. Presence (online, away, offline) is the
// library's imbus::presence_tracker, fed by the policy's hooks and by js/presence.js.
//
//   example_chat --port 8080 --data chat.db        # then open http://127.0.0.1:8080/
//
// Routes (JSON): POST /chat/login {name}, /chat/logout, /chat/join {room}, /chat/leave {room},
// /chat/send {room, text}; GET /chat/me ({"name": null} before logging in), /chat/rooms (every
// room, with its member count), /chat/history?room=NAME. On the bus: chat/message and
// chat/typing on "room:NAME", chat/joined and chat/left on the user's own channel, chat/presence
// {who, status} on "presence", and after each subscribe chat/people (everybody's status) to that
// page alone.
#define IMBUS_WITH_PRESENCE  // imbus::presence_tracker
#include "imbus.hpp"

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <set>
#include <variant>

namespace {

using imbus::json;
constexpr auto session_ttl = std::chrono::hours(24 * 7);
constexpr const char* default_room = "general";  // every new user is in it: nobody starts in an empty list

std::int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(imbus::clock_type::now().time_since_epoch()).count();
}

// The application: its database, the bus, the session tokens and who is online.
struct chat {
    sqlite3* db;
    imbus::bus& bus;
    imbus::signed_token_policy tokens;                  // HMAC-signed session tokens, in the cookie "imbus_session"
    std::vector<std::string> origins;                   // the Origin headers allowed (the page's own origin)
    std::shared_ptr<imbus::presence_tracker> presence;  // publishes chat/presence on "presence"
    std::chrono::milliseconds away_after;               // the tracker's, for the page's js/presence.js

    // Runs one statement with its parameters; on_row sees each result row. db is also the bus's
    // writer connection, and the presence tracker commits on it from its own thread: use it only
    // inside an imbus::transaction, which holds the bus's writer lock (routes and policy hooks
    // run on I/O threads; a transaction that wrote nothing is simply rolled back).
    void sql(const char* text, std::initializer_list<std::variant<std::int64_t, std::string>> params = {},
             const std::function<void(sqlite3_stmt*)>& on_row = {}) {
        sqlite3_stmt* st = nullptr;
        if (sqlite3_prepare_v2(db, text, -1, &st, nullptr) != SQLITE_OK) throw std::runtime_error(sqlite3_errmsg(db));
        int i = 0, rc;
        for (const auto& p : params) {
            if (auto n = std::get_if<std::int64_t>(&p)) sqlite3_bind_int64(st, ++i, *n);
            else sqlite3_bind_text(st, ++i, std::get<std::string>(p).c_str(), -1, SQLITE_TRANSIENT);
        }
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
            if (on_row) on_row(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db));
    }
    static std::string text(sqlite3_stmt* st, int col) {
        return reinterpret_cast<const char*>(sqlite3_column_text(st, col));
    }

    std::int64_t user_id(const std::string& name) {  // creates the user on first sight, in the default room
        std::int64_t id = 0;
        sql("INSERT OR IGNORE INTO users (name) VALUES (?)", {name});
        const bool created = sqlite3_changes(db) == 1;
        sql("SELECT id FROM users WHERE name = ?", {name}, [&](sqlite3_stmt* st) { id = sqlite3_column_int64(st, 0); });
        if (created)
            sql("INSERT OR IGNORE INTO memberships (user_id, room_id) SELECT ?, id FROM rooms WHERE name = ?",
                {id, std::string(default_room)});
        return id;
    }
    imbus::channel user_channel(const std::string& name) {  // ["chat","chat.user",id]: no client can ask for it
        return imbus::channel(bus.db(), "chat.user", user_id(name));
    }
    std::vector<std::string> rooms_of(const std::string& name) {
        std::vector<std::string> rooms;
        sql("SELECT r.name FROM rooms r JOIN memberships m ON m.room_id = r.id JOIN users u ON u.id = m.user_id "
            "WHERE u.name = ? ORDER BY r.name",
            {name}, [&](sqlite3_stmt* st) { rooms.push_back(text(st, 0)); });
        return rooms;
    }
    bool is_member(const std::string& name, const std::string& room) {
        const auto rooms = rooms_of(name);
        return std::find(rooms.begin(), rooms.end(), room) != rooms.end();
    }
    bool origin_ok(const imbus::http_request& r) const {  // no Origin: not a browser (curl)
        const auto origin = r.header("Origin");
        return !r.has_header("Origin") || std::find(origins.begin(), origins.end(), origin) != origins.end();
    }

    // Everybody known, with the tracker's status: [{user, status}], for the page of `me`.
    json people(const std::string& me) {
        std::vector<std::string> names;
        {
            imbus::transaction tx(bus);  // a read: rolled back; closed before asking the tracker
            sql("SELECT name FROM users ORDER BY name", {}, [&](sqlite3_stmt* st) { names.push_back(text(st, 0)); });
        }
        json list = json::array();
        for (const auto& name : names) {
            auto status = presence->status(name);
            // me is connected (this is my subscribe): the tracker may not have read my row yet
            if (name == me && status == imbus::presence_status::offline) status = imbus::presence_status::online;
            list.push_back({{"user", name}, {"status", imbus::to_string(status)}});
        }
        return list;
    }

    bool route(const imbus::http_request& r, imbus::http_response& res);
};

// The bus's auth policy: the session cookie says who a connection is, the membership table
// which rooms it may hear.
struct chat_policy {
    using identity = imbus::signed_identity;
    chat* app;

    imbus::signed_token_policy& tokens() const { return app->tokens; }
    imbus::admission<identity> authenticate(const imbus::http_request& r) const {
        if (!app->origin_ok(r)) return imbus::admission<identity>::reject(403, "origin not allowed");  // for --port 0
        return tokens().authenticate(r);
    }
    bool still_valid(const identity& who) const { return tokens().still_valid(who); }
    std::vector<imbus::channel> channels(const identity& who, std::vector<imbus::channel> asked) const {
        imbus::transaction tx(app->bus);
        std::set<imbus::channel> allowed{app->bus.channel_for("presence")};  // every signed-in user
        for (const auto& room : app->rooms_of(who.subject)) allowed.insert(app->bus.channel_for("room:" + room));
        std::vector<imbus::channel> granted{app->user_channel(who.subject)};
        for (auto& c : asked)
            if (allowed.count(c)) granted.push_back(std::move(c));
        tx.commit();  // user_channel may have created the user
        return granted;
    }
    // Presence is the tracker's: it counts the connections and reads update_presence.
    void on_open(const identity& who) const { app->presence->on_open(who.subject); }
    void on_close(const identity& who) const { app->presence->on_close(who.subject); }
    void on_event(const identity& who, const std::string& name, const json& data) const {
        if (app->presence->on_event(who.subject, name, data)) return;
        if (name != "typing" || !data.is_object() || !data.contains("room") || !data["room"].is_string()) return;
        const std::string room = data["room"];
        imbus::transaction tx(app->bus);
        if (!app->is_member(who.subject, room)) return;
        tx.send("room:" + room, "chat/typing", {{"room", room}, {"user", who.subject}, {"at", now_ms()}});
        tx.commit();
    }
    // After each subscribe's history, to this page alone: everybody's current status, so a
    // fresh page shows the right dots at once; the transitions it hears later keep them right.
    std::vector<imbus::direct_message> on_subscribe(const identity& who,
                                                    const std::vector<imbus::channel>& granted) const {
        if (std::find(granted.begin(), granted.end(), app->bus.channel_for("presence")) == granted.end()) return {};
        return {{"chat/people", {{"people", app->people(who.subject)}}}};
    }
};

bool valid_name(const std::string& s) {  // 1-32 characters (UTF-8 code points), no control character
    const auto chars = std::count_if(s.begin(), s.end(), [](char c) { return (c & 0xC0) != 0x80; });
    return chars >= 1 && chars <= 32 && std::none_of(s.begin(), s.end(), [](char c) { return c >= 0 && c < 0x20; });
}
bool valid_room(const std::string& s) {  // 1-32 ASCII letters, digits, - or _
    auto ok = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_'; };
    return !s.empty() && s.size() <= 32 && std::all_of(s.begin(), s.end(), ok);
}

bool chat::route(const imbus::http_request& r, imbus::http_response& res) {
    if (r.path.rfind("/chat/", 0) != 0) return false;
    const std::string action = r.path.substr(6);
    const bool post = r.method == "POST", get = r.method == "GET";
    auto reply = [&](int status, const json& body) { return res.set_json(status, body), true; };
    if (post && !origin_ok(r)) return reply(403, {{"error", "origin not allowed"}});
    const json body = post ? json::parse(r.body, nullptr, false) : json::object();
    auto field = [&](const char* key) {
        return body.is_object() && body.contains(key) && body[key].is_string() ? body[key].get<std::string>() : "";
    };
    auto set_cookie = [&](const std::string& token, std::chrono::seconds max_age) {
        res.headers.emplace_back("Set-Cookie", "imbus_session=" + token + "; Path=/; HttpOnly; SameSite=Lax; Max-Age=" +
                                                   std::to_string(max_age.count()));
    };
    imbus::transaction tx(bus);  // every route below uses db (see sql)

    if (post && action == "login") {
        std::string name = field("name");
        name.erase(0, name.find_first_not_of(' '));
        name.erase(name.find_last_not_of(' ') + 1);
        if (!valid_name(name)) return reply(400, {{"error", "a name has 1 to 32 characters"}});
        user_id(name);
        tx.commit();
        set_cookie(tokens.issue(name, session_ttl), session_ttl);
        return reply(200, {{"name", name}});
    }
    if (post && action == "logout") {
        set_cookie("", std::chrono::seconds(0));
        return reply(200, json::object());
    }
    auto who = tokens.verify(r.cookie("imbus_session"));
    if (who && !tokens.still_valid(*who)) who.reset();
    // "Who am I?" is a normal question before logging in: 200 with no name, not an error in the console.
    if (get && action == "me")
        return who ? reply(200, {{"name", who->subject},
                                 {"rooms", rooms_of(who->subject)},
                                 {"away_after_ms", away_after.count()}})
                   : reply(200, {{"name", nullptr}, {"rooms", json::array()}});
    if (!who) return reply(401, {{"error", "log in first"}});
    const std::string user = who->subject, room = get ? r.param("room") : field("room");

    if (get && action == "rooms") {  // every room, to pick one to join
        json rooms = json::array();
        sql("SELECT r.name, COUNT(m.user_id) FROM rooms r LEFT JOIN memberships m ON m.room_id = r.id "
            "GROUP BY r.id ORDER BY r.name",
            {}, [&](sqlite3_stmt* st) {
                rooms.push_back({{"name", text(st, 0)}, {"members", sqlite3_column_int64(st, 1)}});
            });
        return reply(200, {{"rooms", rooms}});
    }
    if (!(post && (action == "join" || action == "leave" || action == "send")) && !(get && action == "history"))
        return reply(404, {{"error", "not found"}});
    if (!valid_room(room)) return reply(400, {{"error", "a room name has 1 to 32 letters, digits, - or _"}});
    if (post && (action == "join" || action == "leave")) {  // the user's other tabs hear it on the user's channel
        if (action == "join") {
            sql("INSERT OR IGNORE INTO rooms (name) VALUES (?)", {room});
            sql("INSERT OR IGNORE INTO memberships (user_id, room_id) SELECT ?, id FROM rooms WHERE name = ?",
                {user_id(user), room});
        } else {
            sql("DELETE FROM memberships WHERE user_id = ? AND room_id = (SELECT id FROM rooms WHERE name = ?)",
                {user_id(user), room});
        }
        tx.send(user_channel(user), action == "join" ? "chat/joined" : "chat/left", {{"room", room}});
        tx.commit();
        return reply(200, {{"room", room}});
    }
    if (!is_member(user, room)) return reply(403, {{"error", "not a member of this room"}});
    if (post && action == "send") {
        const std::string message = field("text");
        if (message.empty() || message.size() > 4000) return reply(400, {{"error", "a message has 1 to 4000 bytes"}});
        const std::int64_t at = now_ms();
        // The outbox pattern: the message row and its notification are one SQLite transaction
        // (tx: BEGIN IMMEDIATE on the application's own connection, at the top of route).
        sql("INSERT INTO messages (room_id, user_id, text, at) SELECT id, ?, ?, ? FROM rooms WHERE name = ?",
            {user_id(user), message, at, room});
        const json payload = {
            {"id", sqlite3_last_insert_rowid(db)}, {"room", room}, {"user", user}, {"text", message}, {"at", at}};
        tx.send("room:" + room, "chat/message", payload);  // only buffered until the commit
        tx.commit();  // writes the bus row, COMMITs both rows, then wakes the room's subscribers
        return reply(200, payload);
    }
    // history: the last 50 messages, from the application's own table
    json messages = json::array();
    sql("SELECT * FROM (SELECT m.id, u.name, m.text, m.at FROM messages m JOIN users u ON u.id = m.user_id "
        "JOIN rooms r ON r.id = m.room_id WHERE r.name = ? ORDER BY m.id DESC LIMIT 50) ORDER BY id",
        {room}, [&](sqlite3_stmt* st) {
            messages.push_back({{"id", sqlite3_column_int64(st, 0)},
                                {"room", room},
                                {"user", text(st, 1)},
                                {"text", text(st, 2)},
                                {"at", sqlite3_column_int64(st, 3)}});
        });
    return reply(200, {{"room", room}, {"messages", messages}});
}

struct settings {
    std::string host = "127.0.0.1", data = "chat.db", static_root = IMBUS_CHAT_DIR, secret;
    std::uint16_t port = 8080;
    std::chrono::milliseconds away_after = std::chrono::seconds(60);  // idle this long: away
    imbus::server_options server;
};

[[noreturn]] void usage(const std::string& problem) {
    std::cerr << "example_chat: " << problem << "\n"
              << "usage: example_chat [--host ADDR] [--port N] [--data PATH] [--secret S] [--static DIR]\n"
              << "                    [--version STRING] [--presence-away-ms N]\n"
              << "The secret (16 bytes or more) may also come from IMBUS_CHAT_SECRET.\n";
    std::exit(2);
}

settings parse(int argc, char** argv) {
    settings s;
    if (const char* secret = std::getenv("IMBUS_CHAT_SECRET")) s.secret = secret;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (i + 1 >= argc) usage("missing value after " + flag);
        const std::string value = argv[++i];
        try {
            if (flag == "--host") s.host = value;
            else if (flag == "--port") s.port = static_cast<std::uint16_t>(std::stoul(value));
            else if (flag == "--data") s.data = value;
            else if (flag == "--secret") s.secret = value;
            else if (flag == "--static") s.static_root = value;
            else if (flag == "--version") s.server.version = value;  // the protocol version
            else if (flag == "--presence-away-ms") s.away_after = std::chrono::milliseconds(std::stoul(value));
            else usage("unknown option " + flag);
        } catch (const std::logic_error&) {
            usage("bad value for " + flag + ": " + value);
        }
    }
    if (s.away_after.count() <= 0) usage("--presence-away-ms must be positive");
    if (!s.secret.empty() && s.secret.size() < 16) usage("the secret needs at least 16 bytes");
    if (s.secret.empty()) {  // a random secret: sessions then end with the process
        std::random_device random;
        for (int i = 0; i < 32; ++i) s.secret += "0123456789abcdef"[random() % 16];
    }
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    settings s = parse(argc, argv);
    sqlite3* db = nullptr;
    int status = 0;
    try {
        if (sqlite3_open(s.data.c_str(), &db) != SQLITE_OK) throw std::runtime_error("cannot open " + s.data);
        sqlite3_busy_timeout(db, 5000);
        // WAL: the server's pollers read on their own connections while the application writes.
        if (sqlite3_exec(db,
                         "PRAGMA journal_mode=WAL;"
                         "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
                         "CREATE TABLE IF NOT EXISTS rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
                         "CREATE TABLE IF NOT EXISTS memberships (user_id INTEGER NOT NULL REFERENCES users,"
                         " room_id INTEGER NOT NULL REFERENCES rooms, PRIMARY KEY (user_id, room_id));"
                         "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, room_id INTEGER NOT NULL "
                         "REFERENCES rooms,"
                         " user_id INTEGER NOT NULL REFERENCES users, text TEXT NOT NULL, at INTEGER NOT NULL);",
                         nullptr, nullptr, nullptr) != SQLITE_OK)
            throw std::runtime_error(sqlite3_errmsg(db));
        imbus::sqlite_store store(db);  // bus_bus next to the application's tables, on its connection
        imbus::dispatcher dispatcher;
        imbus::bus bus(store, dispatcher, {"chat"});
        chat app{db, bus, imbus::signed_token_policy(s.secret), {}, {}, s.away_after};
        app.sql("INSERT OR IGNORE INTO rooms (name) VALUES (?)", {std::string(default_room)});  // no other thread yet
        imbus::presence_options presence;
        presence.away_after = s.away_after;
        presence.type = "chat/presence";  // {"who": name, "status": "online" | "away" | "offline"}
        presence.tick_every = std::min<std::chrono::milliseconds>(std::chrono::seconds(1), s.away_after / 10);
        app.presence = std::make_shared<imbus::presence_tracker>(bus, bus.channel_for("presence"), presence);

        // The Origin check is on: the printed URL's origin and localhost. With --port 0
        // the port is known only after listen(), so the policy and the routes check it as well.
        auto origins_for = [&](std::uint16_t port) {
            const std::string host = s.host == "0.0.0.0" || s.host == "::" ? "localhost" : s.host;
            return std::vector<std::string>{"http://" + host + ":" + std::to_string(port),
                                            "http://localhost:" + std::to_string(port)};
        };
        if (s.port != 0) s.server.allowed_origins = origins_for(s.port);
        imbus::basic_server<chat_policy> server(bus, chat_policy{&app}, s.server);
        auto scripts = imbus::static_files(s.static_root + "/js", "/js/");
        auto pages = imbus::static_files(s.static_root + "/examples/chat", "/");
        server.on_http([&](const imbus::http_request& r, imbus::http_response& res) {
            return app.route(r, res) || scripts(r, res) || pages(r, res);
        });
        server.listen(s.host, s.port);
        app.origins = origins_for(server.port());

        // A server started in the background ignores SIGINT: SIGTERM must stop it too.
        asio::signal_set signals(server.io_context(), SIGINT, SIGTERM);
        signals.async_wait([&](const asio::error_code& ec, int) {
            if (!ec) server.stop();
        });
        std::cout << "imbus chat on " << app.origins[0] << "/ (data " << s.data << ")" << std::endl;
        server.run();
        signals.cancel();
        std::cout << "imbus chat stopped" << std::endl;
    } catch (const std::exception& e) {
        std::cerr << "example_chat: " << e.what() << std::endl;
        status = 1;
    }
    sqlite3_close(db);
    return status;
}
