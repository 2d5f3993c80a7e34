// The server of the browser tests (tests/browser/run.mjs): an imbus::server with the public
// policy (`broadcast` plus the client's string channels), a SQLite store that survives a
// restart, the repository served as static files (so /js/bus_service.js and
// /tests/browser/page.html load from the bus's own origin), and one test-only route:
//
//   GET /test/stats  ->  {"connections": N}   (open WebSocket connections)
//
//   browser_harness [--port N] [--data PATH] [--version V] [--api-key K] [--root DIR]
//                   [--tls-cert PEM --tls-key PEM]   (https:// and wss://)
//
// --port 0 (the default) picks a free port. Once listening, it prints `PORT <n>` on one line
// of stdout (flushed) for the test runner. SIGTERM or SIGINT stops it (close 1001 to clients).
#include "imbus.hpp"

#include <csignal>
#include <cstdlib>
#include <iostream>

#ifndef IMBUS_SOURCE_DIR
#define IMBUS_SOURCE_DIR "."
#endif

namespace {

struct settings {
    std::uint16_t port = 0;
    std::string data;  // empty: an in-memory store
    std::string root = IMBUS_SOURCE_DIR;
    imbus::server_options server;
};

[[noreturn]] void usage(const std::string& problem) {
    std::cerr << "browser_harness: " << problem << "\n"
              << "usage: browser_harness [--port N] [--data PATH] [--version V] [--api-key K] [--root DIR]\n"
              << "                       [--tls-cert PEM --tls-key PEM]\n";
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
            else usage("unknown option " + flag);
        } catch (const std::logic_error&) {
            usage("bad value for " + flag + ": " + value);
        }
    }
    return s;
}

template <class Transport> void serve(const settings& s, imbus::bus& bus) {
    imbus::basic_server<imbus::public_policy, Transport> server(bus, imbus::public_policy({bus.channel_for("broadcast")}),
                                                                s.server);
    auto files = imbus::static_files(s.root);
    server.on_http([&server, files](const imbus::http_request& request, imbus::http_response& response) {
        if (request.method == "GET" && request.path == "/test/stats") {
            response.set_json(200, {{"connections", server.connection_count()}});
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

} // namespace

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
