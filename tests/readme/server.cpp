// The README's server snippets (a server in a few lines, a policy of your own, presence),
// compiled; the policy's server is run: it listens on a free port of 127.0.0.1 and a plain
// GET of its WebSocket path answers what the handshake would (401 without a session).
// check.sh finds each README block here, line for line.
#define IMBUS_WITH_PRESENCE
#define IMBUS_WITH_WEBSOCKETPP  // websocketpp + standalone Asio (link -pthread)
#include "imbus.hpp"

#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

// The application's side of the policy: a session store, users, a typing indicator.
struct session_store {
    std::map<std::string, std::string> users_by_sid{{"s1", "alice"}};
    std::optional<std::string> lookup(const std::string& sid) const {
        auto it = users_by_sid.find(sid);
        return it == users_by_sid.end() ? std::nullopt : std::optional<std::string>(it->second);
    }
    bool active(const std::string& user) const { return user == "alice"; }
};
struct typing_notes {
    std::set<std::string> who;
    void note(const std::string& user, const imbus::json&) { who.insert(user); }
};
static session_store sessions;
static typing_notes typing;
static std::int64_t user_id(const std::string& who) { return who == "alice" ? 7 : 0; }
static std::string display_name(const std::string& who) { return "User " + who; }

// "A server in a few lines": compiled, not run (it serves port 8080 until stopped).
[[maybe_unused]] static void a_server_in_a_few_lines() {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"mydb"});
    imbus::server server(bus, imbus::public_policy({bus.channel_for("broadcast")}));
    server.listen("127.0.0.1", 8080);  // ws://127.0.0.1:8080/websocket?version=19.0-2
    server.run();                      // stop() from any thread: every client gets 1001
}

// "Your own policy"
struct staff_policy {
    using identity = std::string;  // who the connection is
    imbus::admission<identity> authenticate(const imbus::http_request& r) {
        auto user = sessions.lookup(r.cookie("sid"));  // your session store
        if (!user) return imbus::admission<identity>::reject(401, "log in first");
        return imbus::admission<identity>::accept(*user);
    }
    // optional: the strings the client asked for that it may hear, plus this identity's records
    std::vector<imbus::channel> channels(const identity& who, std::vector<imbus::channel> asked) {
        std::vector<imbus::channel> granted;
        for (auto& c : asked)
            if (c == imbus::channel("mydb", "broadcast")) granted.push_back(std::move(c));  // public
        granted.push_back(imbus::channel("mydb", "res.users", user_id(who)));               // private
        return granted;
    }
    bool still_valid(const identity& who) { return sessions.active(who); }  // else 4001
    void on_event(const identity& who, const std::string& name, const imbus::json& data) {
        if (name == "myapp/typing") typing.note(who, data);  // Odoo: _serve_ir_websocket
    }
    // optional: messages for this client alone, after the history it asked for
    std::vector<imbus::direct_message> on_subscribe(const identity& who, const std::vector<imbus::channel>& /*granted*/) {
        return {{"myapp/hello", {{"name", display_name(who)}}}};  // Odoo: _after_subscribe_data
    }
};

// "Presence": a tracker, and the hooks of a policy whose identity is a signed token's.
static std::shared_ptr<imbus::presence_tracker> make_tracker(imbus::bus& bus) {
    // every transition on [db, "presence"]; or options.channel_of(who), e.g. the user's record channel
    auto presence = std::make_shared<imbus::presence_tracker>(bus, bus.channel_for("presence"));
    return presence;
}
// in the policy (it is copied by the server: hold the tracker by shared_ptr):
struct presence_policy {
    using identity = imbus::signed_identity;
    std::shared_ptr<imbus::presence_tracker> presence;
    imbus::admission<identity> authenticate(const imbus::http_request&) {
        return imbus::admission<identity>::reject(401, "no tokens in this test");
    }
    void on_open(const identity& who) { presence->on_open(who.subject); }
    void on_close(const identity& who) { presence->on_close(who.subject); }
    void on_event(const identity& who, const std::string& name, const imbus::json& data) {
        presence->on_event(who.subject, name, data);  // takes "update_presence"
    }
};

int main() {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"mydb"});
    imbus::server_options options;
    imbus::basic_server<staff_policy> server(bus, staff_policy{}, options);
    server.listen("127.0.0.1", 0);
    imbus::http_request probe;
    probe.method = "GET";
    probe.path = "/websocket";
    const imbus::http_response refused = server.serve_http(probe);
    probe.headers.emplace_back("Cookie", "sid=s1");
    const imbus::http_response welcome = server.serve_http(probe);

    auto presence = make_tracker(bus);
    presence_policy with_presence{presence};
    with_presence.on_open({"bob", {}});
    const bool online = presence->local_size() == 1;  // bob has a connection here
    with_presence.on_close({"bob", {}});
    const bool gone = presence->local_size() == 0;

    int failures = 0;
    auto expect = [&](bool ok, const char* what) {
        if (!ok) std::fprintf(stderr, "README server snippet: %s\n", what), ++failures;
    };
    expect(refused.status == 401, "no session: 401");
    expect(welcome.status == 426, "a session: the handshake would be accepted (426 to a plain GET)");
    expect(online && gone, "presence: bob is counted while his connection is open");
    if (failures == 0) std::puts("README server snippets: ok");
    return failures == 0 ? 0 : 1;
}
