// imbus::client, the bus client for C++ programs, against a server in this process: subscribe
// and receive; go away, let notifications pass, come back with the saved last_id() and get
// exactly what was missed; then ride out a server restart, which it reconnects after by itself.
// Exits 0 when nothing was lost and nothing came twice.
#include "imbus.hpp"

#include <iostream>

using namespace std::chrono_literals;

static void check(bool ok, const char* what) {
    if (!ok) std::cerr << "FAILED: " << what << "\n", std::exit(1);
}

// The ids of received notifications {"id": N, "message": {"type": T, "payload": P}}.
static std::vector<std::int64_t> ids_of(const std::vector<imbus::json>& received) {
    std::vector<std::int64_t> ids;
    for (const auto& n : received) {
        std::cout << "  received " << n.dump() << "\n";
        ids.push_back(n["id"].get<std::int64_t>());
    }
    return ids;
}

int main() {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"demo"});
    auto start_server = [&](std::uint16_t port) {
        auto server = std::make_unique<imbus::server>(bus, imbus::public_policy());
        server->listen("127.0.0.1", port);  // port 0: any free port
        server->start();                    // serves on a background thread
        return server;
    };
    auto server = start_server(0);
    const std::uint16_t port = server->port();
    const std::string url = "ws://127.0.0.1:" + std::to_string(port) + "/websocket";
    auto publish = [&](int n) { return bus.send("news", "news/item", {{"n", n}}).at(0); };

    std::int64_t saved = 0;
    {
        imbus::client client;
        client.connect(url);            // blocks until the socket is open; throws if refused
        client.subscribe({"news"}, 0);  // last 0: what the store has from the last 50 s, then live
        const std::vector<std::int64_t> sent{publish(1), publish(2)};
        std::cout << "first client:\n";
        // take() waits for 2 (at most 5 s); or on_notification(handler), called on the client's thread
        check(ids_of(client.take(2, 5s)) == sent, "live notifications");
        saved = client.last_id();  // what an application keeps to resume later
    }                              // the client closes and goes away

    const std::vector<std::int64_t> missed{publish(3), publish(4), publish(5)};
    imbus::client_options options;
    options.reconnect_delay = 50ms;  // reconnect soon after a drop (then 1.5x per failed try)
    imbus::client client(options);
    client.connect(url);
    client.subscribe({"news"}, saved);  // resume: everything after `saved`, then live
    std::cout << "second client, resuming after id " << saved << ":\n";
    check(ids_of(client.take(3, 5s)) == missed, "what was missed, once, in order");

    // The server goes down (its clients get 1001) and comes back on the same port. The client
    // retries by itself and subscribes again from its last_id().
    server->stop();
    server->wait();
    const std::vector<std::int64_t> while_down{publish(6), publish(7)};
    server = start_server(port);
    std::cout << "after the server restarted:\n";
    check(ids_of(client.take(2, 5s)) == while_down, "what was published while the server was down");
    check(client.connects() == 2, "one reconnect");
    const auto live = publish(8);
    check(ids_of(client.take(1, 5s)) == std::vector<std::int64_t>{live}, "live again");
    check(client.take(1, 0ms).empty(), "nothing twice");
    std::cout << "nothing lost, nothing twice\n";
}
