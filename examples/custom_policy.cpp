// An auth policy of the application's own: the user comes from a session table, by cookie
// (browsers) or bearer token (native clients); each user hears the public "broadcast" channel
// and its own record channel, and any other string channel it asks for is filtered out.
// Two users connect; each receives only its own notification plus the broadcast. Exits 0 then.
#include "imbus.hpp"

#include <iostream>
#include <map>

using namespace std::chrono_literals;

struct user {
    std::int64_t id;
    std::string name;
};

class session_policy {
public:
    using identity = user;                              // what the server keeps for each connection
    using session_table = std::map<std::string, user>;  // session id -> user; read-only here

    session_policy(std::string db, session_table sessions)
        : db_(std::move(db)), sessions_(std::make_shared<const session_table>(std::move(sessions))) {}

    // At the handshake: who is this? Called from every I/O thread, so it only reads.
    imbus::admission<user> authenticate(const imbus::http_request& request) const {
        std::string sid = request.cookie("sid");
        if (sid.empty()) sid = request.bearer_token();
        const auto found = sessions_->find(sid);
        if (found == sessions_->end()) return imbus::admission<user>::reject(401, "log in first");
        return imbus::admission<user>::accept(found->second);
    }

    // At each subscribe: `asked` holds the client's strings as [db, name]. String channels are
    // public, so keep only "broadcast"; private data goes on the user's own record channel.
    std::vector<imbus::channel> channels(const user& who, std::vector<imbus::channel> asked) const {
        std::vector<imbus::channel> granted;
        for (auto& c : asked)
            if (c == imbus::channel(db_, "broadcast")) granted.push_back(std::move(c));
        granted.emplace_back(db_, "res.users", who.id);
        return granted;
    }

private:
    std::string db_;
    std::shared_ptr<const session_table> sessions_;  // shared: the server holds a copy of the policy
};

static void check(bool ok, const char* what) {
    if (!ok) std::cerr << "FAILED: " << what << "\n", std::exit(1);
}

int main() {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"app"});
    const user alice{7, "alice"}, bob{8, "bob"};
    imbus::server_options options;
    options.allowed_origins = {"https://app.example"};  // identities from cookies: check Origin
    imbus::basic_server<session_policy> server(
        bus, session_policy("app", {{"alice-session", alice}, {"bob-token", bob}}), options);
    server.listen("127.0.0.1", 0);
    server.start();
    const std::string url = "ws://127.0.0.1:" + std::to_string(server.port()) + "/websocket";

    auto connect_as = [&](std::pair<std::string, std::string> credential) {
        imbus::client_options o;
        o.headers = {{"Origin", "https://app.example"}, std::move(credential)};
        auto c = std::make_unique<imbus::client>(o);
        std::error_code ec;
        c->connect(url, ec);
        return c;
    };
    auto as_alice = connect_as({"Cookie", "sid=alice-session"});  // as a browser would
    auto as_bob = connect_as({"Authorization", "Bearer bob-token"});
    auto stranger = connect_as({"Cookie", "sid=forged"});
    check(as_alice->is_open() && as_bob->is_open(), "both users admitted");
    check(stranger->handshake_status() == 401, "an unknown session refused with 401");
    as_alice->subscribe({"broadcast", "admin"}, 0);  // "admin" is not granted
    as_bob->subscribe({"broadcast", "res.users"}, 0);

    const auto for_alice =
        bus.send(imbus::record{"res.users", alice.id, ""}, "inbox/new", {{"text", "hi alice"}}).at(0);
    const auto for_bob = bus.send(imbus::record{"res.users", bob.id, ""}, "inbox/new", {{"text", "hi bob"}}).at(0);
    bus.send("admin", "admin/alert", {{"text", "nobody hears this"}});
    bus.send("res.users", "admin/alert", {{"text", "nor this"}});
    const auto everyone = bus.send("broadcast", "news", {{"text", "hello all"}}).at(0);

    // A client gets its rows in id order, so the broadcast, sent last, ends what it may receive.
    auto received = [](imbus::client& c, const char* who) {
        std::vector<std::int64_t> ids;
        for (const auto& n : c.take(2, 5s)) {
            std::cout << who << " received " << n.dump() << "\n";
            ids.push_back(n["id"].get<std::int64_t>());
        }
        return ids;
    };
    check(received(*as_alice, "alice") == std::vector<std::int64_t>{for_alice, everyone},
          "alice: hers and the broadcast");
    check(received(*as_bob, "bob") == std::vector<std::int64_t>{for_bob, everyone}, "bob: his and the broadcast");
    std::cout << "each user heard only its own channel and the broadcast\n";
}
