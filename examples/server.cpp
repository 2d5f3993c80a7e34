// A standalone bus server: browsers connect as the public identity (subscribed to `broadcast`
// plus the string channels they ask for), and any backend publishes with POST /bus/send.
//
//   example_server --port 8080 --store sqlite:bus.db --api-key secret
//   example_server --port 8081 --store 'postgres:host=db.internal dbname=app' (several servers, one bus)
//   example_server --port 8443 --tls-cert chain.pem --tls-key key.pem          (wss://)
//   curl -H 'Authorization: Bearer secret' http://127.0.0.1:8080/bus/send
//        -d '{"channel":"broadcast","type":"hello","payload":1}'
#include "imbus.hpp"

#include <sys/resource.h>

#include <csignal>
#include <cstdlib>
#include <iostream>

namespace {

struct settings {
    std::string host = "127.0.0.1";
    std::uint16_t port = 8080;
    std::string store = "memory";  // or sqlite:PATH, postgres:CONNINFO
    imbus::server_options server;
    std::string db = "imbus";
    std::string static_root;     // serve files from here (e.g. a page and js/)
    long retention_seconds = 0;  // 0: the store's default (24 h)
};

[[noreturn]] void usage(const std::string& problem) {
    (problem.empty() ? std::cout : std::cerr)
        << (problem.empty() ? "" : "example_server: " + problem + "\n")
        << "usage: example_server [--host ADDR] [--port N] [--store memory|sqlite:PATH|postgres:CONNINFO] [--api-key "
           "KEY]\n"
        << "                      [--db NAME] [--version STRING] [--threads N] [--origin URL]...\n"
        << "                      [--static DIR] [--tls-cert PEM --tls-key PEM]\n"
        << "                      [--retention SECONDS] [--gc-interval SECONDS]\n"
        << "                      [--max-outbound-bytes N] [--max-outbound-total N] [--send-buffer-bytes N]\n"
        << "                      [--max-connections N] [--max-connections-per-address N] [--max-channels N]\n"
        << "                      [--metrics-token TOKEN]   (or IMBUS_API_KEY, IMBUS_METRICS_TOKEN in the "
           "environment)\n";
    std::exit(problem.empty() ? 0 : 2);
}

settings parse(int argc, char** argv) {
    settings s;
    s.server.api_key = std::getenv("IMBUS_API_KEY") ? std::getenv("IMBUS_API_KEY") : "";
    s.server.metrics_token = std::getenv("IMBUS_METRICS_TOKEN") ? std::getenv("IMBUS_METRICS_TOKEN") : "";
    // Internet-facing defaults: one host may not hold more than this many sockets.
    s.server.max_connections_per_address = 256;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--help" || flag == "-h") usage("");
        if (i + 1 >= argc) usage("missing value after " + flag);
        const std::string value = argv[++i];
        try {
            if (flag == "--host") s.host = value;
            else if (flag == "--port") s.port = static_cast<std::uint16_t>(std::stoul(value));
            else if (flag == "--store") s.store = value;
            else if (flag == "--api-key") s.server.api_key = value;
            else if (flag == "--db") s.db = value;
            else if (flag == "--version") s.server.version = value;
            else if (flag == "--threads") s.server.threads = std::stoul(value);
            else if (flag == "--origin") s.server.allowed_origins.push_back(value);
            else if (flag == "--static") s.static_root = value;
            else if (flag == "--tls-cert") s.server.tls_certificate_chain_file = value;
            else if (flag == "--tls-key") s.server.tls_private_key_file = value;
            else if (flag == "--retention") s.retention_seconds = std::stol(value);
            else if (flag == "--gc-interval") s.server.gc_interval = std::chrono::seconds(std::stol(value));
            else if (flag == "--max-outbound-bytes") s.server.max_outbound_bytes = std::stoul(value);
            else if (flag == "--max-outbound-total") s.server.max_outbound_total = std::stoull(value);
            else if (flag == "--send-buffer-bytes") s.server.send_buffer_bytes = std::stoul(value);
            else if (flag == "--max-connections") s.server.max_connections = std::stoul(value);
            else if (flag == "--max-connections-per-address") s.server.max_connections_per_address = std::stoul(value);
            else if (flag == "--max-channels") s.server.max_channels = std::stoul(value);
            else if (flag == "--metrics-token") s.server.metrics_token = value;
            else usage("unknown option " + flag);
        } catch (const std::logic_error&) {
            usage("bad value for " + flag + ": " + value);
        }
    }
    if (s.server.tls_certificate_chain_file.empty() != s.server.tls_private_key_file.empty())
        usage("--tls-cert and --tls-key go together");
    return s;
}

std::unique_ptr<imbus::store> open_store(const std::string& spec, long retention_seconds) {
    auto with_retention = [&](auto options) {
        if (retention_seconds > 0) options.retention = std::chrono::seconds(retention_seconds);
        return options;
    };
    if (spec == "memory") return std::make_unique<imbus::memory_store>(with_retention(imbus::memory_store_options()));
    if (spec.rfind("sqlite:", 0) == 0)
        return std::make_unique<imbus::sqlite_store>(spec.substr(7), with_retention(imbus::sqlite_store_options()));
#ifdef IMBUS_WITH_POSTGRES
    if (spec.rfind("postgres:", 0) == 0)
        return std::make_unique<imbus::pg_store>(spec.substr(9), with_retention(imbus::pg_store_options()));
#endif
    usage("unknown store " + spec);
}

template <class Transport> void serve(const settings& s, imbus::bus& bus) {
    imbus::basic_server<imbus::public_policy, Transport> server(
        bus, imbus::public_policy({bus.channel_for("broadcast")}), s.server);
    if (!s.static_root.empty()) server.on_http(imbus::static_files(s.static_root));
    server.listen(s.host, s.port);

    // A server started in the background ignores SIGINT: SIGTERM must stop it too.
    asio::signal_set signals(server.io_context(), SIGINT, SIGTERM);
    signals.async_wait([&](const asio::error_code& ec, int) {
        if (!ec) server.stop();
    });
    const bool tls = std::is_same_v<Transport, imbus::tls_transport>;
    std::cout << "imbus server on " << (tls ? "wss" : "ws") << "://" << s.host << ":" << server.port() << s.server.path
              << " (store " << s.store << ", db " << s.db << ", " << s.server.threads << " thread(s))" << std::endl;
    server.run();
    signals.cancel();
    std::cout << "imbus server stopped" << std::endl;
}

}  // namespace

// Every open socket is a descriptor: take the hard limit (Debian's soft default is 1024).
void raise_descriptor_limit() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

int main(int argc, char** argv) {
    settings s = parse(argc, argv);
    raise_descriptor_limit();
    try {
        auto store = open_store(s.store, s.retention_seconds);
        imbus::dispatcher dispatcher;
        imbus::bus_options bus_options;
        bus_options.db = s.db;
#ifdef IMBUS_WITH_POSTGRES
        // Every server on the database learns of every commit, its own included, through its
        // one listener: one path keeps the dispatcher's rows in id order.
        std::unique_ptr<imbus::pg_listener> listener;
        if (auto* pg = dynamic_cast<imbus::pg_store*>(store.get())) {
            listener = std::make_unique<imbus::pg_listener>(*pg, dispatcher);
            bus_options.dispatch_on_commit = false;
        }
#endif
        imbus::bus bus(*store, dispatcher, bus_options);
        if (s.server.tls_certificate_chain_file.empty()) return serve<imbus::plain_transport>(s, bus), 0;
#ifdef IMBUS_WITH_TLS
        serve<imbus::tls_transport>(s, bus);
#else
        usage("this build has no TLS (configure with IMBUS_WITH_TLS=ON and OpenSSL)");
#endif
    } catch (const std::exception& e) {
        std::cerr << "example_server: " << e.what() << std::endl;
        return 1;
    }
}
