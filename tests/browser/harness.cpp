// The server of the browser tests (tests/browser/run.mjs): an imbus::server with the public
// policy (`broadcast` plus the client's string channels), a SQLite store that survives a
// restart, the repository served as static files (so /js/bus_service.js and
// /tests/browser/page.html load from the bus's own origin), and two test-only routes:
//
//   GET /test/stats   ->  {"connections": N, "handshakes": N, "probes": N, "subscribes": N}
//                         (open WebSocket connections; upgrade requests the policy saw; plain
//                         GETs of the socket URL it saw; subscribes it granted channels to)
//   GET /test/events  ->  [{"event_name": E, "data": D}, ...]   (every client request other than
//                         subscribe, in arrival order)
//
// The policy is public_policy, except that a socket URL with the query token=bad is refused
// with 401 "bad token" (the refused-login tests). With --presence-away-ms N, a presence_tracker
// (away after N ms, ticking every 50 ms) follows the one public identity, "public", and
// publishes its transitions on the channel `presence` (the presence tests).
//
//   browser_harness [--port N] [--data PATH] [--version V] [--api-key K] [--root DIR]
//                   [--tls-cert PEM --tls-key PEM]   (https:// and wss://)
//                   [--presence-away-ms N]
//
// --port 0 (the default) picks a free port. Once listening, it prints `PORT <n>` on one line
// of stdout (flushed) for the test runner. SIGTERM or SIGINT stops it (close 1001 to clients).
#define IMBUS_WITH_PRESENCE  // --presence-away-ms
#include "imbus.hpp"

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <mutex>

#ifndef IMBUS_SOURCE_DIR
#define IMBUS_SOURCE_DIR "."
#endif

namespace {

// What the test policy saw, shared by its copies and read by the test routes.
struct observed {
    std::mutex mutex;
    std::uint64_t handshakes = 0, probes = 0, subscribes = 0;
    imbus::json events = imbus::json::array();
};

// public_policy plus a refusal to test with and a record of what the server was asked.
struct test_policy {
    using identity = imbus::public_policy::identity;

    imbus::public_policy inner;
    std::shared_ptr<observed> seen;
    std::shared_ptr<imbus::presence_tracker> presence;  // null without --presence-away-ms

    void on_open(const identity&) const {
        if (presence) presence->on_open("public");
    }
    void on_close(const identity&) const {
        if (presence) presence->on_close("public");
    }

    imbus::admission<identity> authenticate(const imbus::http_request& request) const {
        {
            std::lock_guard<std::mutex> lock(seen->mutex);
            ++(request.header("Upgrade").empty() ? seen->probes : seen->handshakes);
        }
        if (request.param("token") == "bad") return imbus::admission<identity>::reject(401, "bad token");
        return inner.authenticate(request);
    }
    std::vector<imbus::channel> channels(const identity& who, std::vector<imbus::channel> requested) const {
        {
            std::lock_guard<std::mutex> lock(seen->mutex);
            ++seen->subscribes;
        }
        return inner.channels(who, std::move(requested));
    }
    void on_event(const identity&, const std::string& name, const imbus::json& data) const {
        if (presence) presence->on_event("public", name, data);
        std::lock_guard<std::mutex> lock(seen->mutex);
        seen->events.push_back({{"event_name", name}, {"data", data}});
    }
};

struct settings {
    std::uint16_t port = 0;
    std::string data;  // empty: an in-memory store
    std::string root = IMBUS_SOURCE_DIR;
    imbus::server_options server;
    std::chrono::milliseconds presence_away{0};  // 0: no presence tracker
};

[[noreturn]] void usage(const std::string& problem) {
    std::cerr << "browser_harness: " << problem << "\n"
              << "usage: browser_harness [--port N] [--data PATH] [--version V] [--api-key K] [--root DIR]\n"
              << "                       [--tls-cert PEM --tls-key PEM] [--presence-away-ms N]\n";
    std::exit(2);
}

settings parse(int argc, char** argv) {
    settings s;
    s.server.api_key = "test-key";
    s.server.gc_interval = std::chrono::seconds(0);
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (i + 1 >= argc) usage("missing value after " + flag);
        const std::string value = argv[++i];
        try {
            if (flag == "--port") s.port = static_cast<std::uint16_t>(std::stoul(value));
            else if (flag == "--data") s.data = value;
            else if (flag == "--version") s.server.version = value;
            else if (flag == "--api-key") s.server.api_key = value;
            else if (flag == "--root") s.root = value;
            else if (flag == "--tls-cert") s.server.tls_certificate_chain_file = value;
            else if (flag == "--tls-key") s.server.tls_private_key_file = value;
            else if (flag == "--presence-away-ms") s.presence_away = std::chrono::milliseconds(std::stoll(value));
            else usage("unknown option " + flag);
        } catch (const std::logic_error&) {
            usage("bad value for " + flag + ": " + value);
        }
    }
    return s;
}

std::shared_ptr<imbus::presence_tracker> presence_for(const settings& s, imbus::bus& bus) {
    if (s.presence_away.count() <= 0) return nullptr;
    imbus::presence_options options;
    options.away_after = s.presence_away;
    options.tick_every = std::chrono::milliseconds(50);  // away is published within 50 ms
    return std::make_shared<imbus::presence_tracker>(bus, bus.channel_for("presence"), options);
}

template <class Transport> void serve(const settings& s, imbus::bus& bus) {
    auto seen = std::make_shared<observed>();
    imbus::basic_server<test_policy, Transport> server(
        bus, test_policy{imbus::public_policy({bus.channel_for("broadcast")}), seen, presence_for(s, bus)}, s.server);
    auto files = imbus::static_files(s.root);
    server.on_http([&server, files, seen](const imbus::http_request& request, imbus::http_response& response) {
        if (request.method == "GET" && request.path == "/test/stats") {
            std::lock_guard<std::mutex> lock(seen->mutex);
            response.set_json(200, {{"connections", server.connection_count()},
                                    {"handshakes", seen->handshakes},
                                    {"probes", seen->probes},
                                    {"subscribes", seen->subscribes}});
            response.headers.emplace_back("Cache-Control", "no-store");
            return true;
        }
        if (request.method == "GET" && request.path == "/test/events") {
            std::lock_guard<std::mutex> lock(seen->mutex);
            response.set_json(200, seen->events);
            response.headers.emplace_back("Cache-Control", "no-store");
            return true;
        }
        return files(request, response);
    });
    server.listen("127.0.0.1", s.port);

    asio::signal_set signals(server.io_context(), SIGINT, SIGTERM);
    signals.async_wait([&](const asio::error_code& ec, int) {
        if (!ec) server.stop();
    });
    std::cout << "PORT " << server.port() << std::endl;  // std::endl flushes
    server.run();
    signals.cancel();
}

}  // namespace

int main(int argc, char** argv) {
    settings s = parse(argc, argv);
    try {
        std::unique_ptr<imbus::store> store;
        if (s.data.empty()) store = std::make_unique<imbus::memory_store>();
        else store = std::make_unique<imbus::sqlite_store>(s.data);
        imbus::dispatcher dispatcher;
        imbus::bus bus(*store, dispatcher, {"imbus"});
        if (s.server.tls_certificate_chain_file.empty()) {
            serve<imbus::plain_transport>(s, bus);
        } else {
#ifdef IMBUS_WITH_TLS
            serve<imbus::tls_transport>(s, bus);
#else
            usage("built without TLS (IMBUS_WITH_TLS)");
#endif
        }
    } catch (const std::exception& e) {
        std::cerr << "browser_harness: " << e.what() << std::endl;
        return 1;
    }
}
