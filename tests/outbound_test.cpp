// The outbound path's budgets, attacked the way a hostile client would: sockets that never
// read (a 4 KiB receive buffer, so the server's bytes pile up on the server), ping floods,
// and many stalled readers at once. Every bound is checked through the numbers the server
// exposes (queued + in-flight bytes per connection and in total, and its counters), never
// through RSS; an honest client on the same server must get everything meanwhile.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"
#include "support/test_helpers.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using imbus::json;
using imbus_test::wait_until;
using steady = std::chrono::steady_clock;

namespace {

constexpr auto wait_limit = 10000ms;  // how long any expected event may take

// A WebSocket client on a blocking socket that writes what it is told and never reads after
// the handshake: a reader that stopped, with a receive buffer as small as the kernel allows.
class stalled_client {
public:
    explicit stalled_client(std::uint16_t port) : stalled_client(unconnected{}) {
        connect(port);
        handshake();
    }
    // A socket made now (so that it needs no descriptor later); connect() and handshake() follow.
    struct unconnected {};
    explicit stalled_client(unconnected) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
        if (fd_ < 0) throw std::runtime_error("socket() failed");
        const int small = 4096;  // before connect, so that the window it advertises stays small
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    ~stalled_client() { ::close(fd_); }
    stalled_client(const stalled_client&) = delete;
    stalled_client& operator=(const stalled_client&) = delete;

    void connect(std::uint16_t port) {
        sockaddr_in address{};
        address.sin_family = AF_INET;
        address.sin_port = htons(port);
        address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0)
            throw std::runtime_error("connect() failed");
    }
    void handshake() {
        write(
            "GET /websocket?version=19.0-2 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        std::string head;  // the 101 answer, read byte by byte so that nothing after it is taken
        char c = 0;
        while (head.size() < 4 || head.compare(head.size() - 4, 4, "\r\n\r\n") != 0) {
            if (::recv(fd_, &c, 1, 0) != 1) throw std::runtime_error("no handshake answer");
            head += c;
        }
        if (head.compare(0, 12, "HTTP/1.1 101") != 0) throw std::runtime_error("handshake refused: " + head);
    }

    void subscribe(const std::string& name, std::int64_t last = 0) {
        frame(0x1, json{{"event_name", "subscribe"}, {"data", {{"channels", {name}}, {"last", last}}}}.dump());
    }
    // A masked client frame; false once the server has closed the connection.
    bool frame(std::uint8_t opcode, std::string_view payload) { return write(masked(opcode, payload)); }
    // `count` frames in one write: one TCP segment while it fits the server's window, so that
    // all of them arrive without this client needing an ACK back. (A peer that stopped reading
    // drops the server's packets once its receive buffer is full, and on recent kernels the
    // ACKs they carry with them: a client writing on after that waits in retransmission
    // backoff for seconds.)
    bool frames(std::uint8_t opcode, std::string_view payload, int count) {
        const auto one = masked(opcode, payload);
        std::string out;
        out.reserve(one.size() * std::size_t(count));
        for (int i = 0; i < count; ++i) out += one;
        return write(out);
    }

private:
    static std::string masked(std::uint8_t opcode, std::string_view payload) {
        std::string out(1, char(0x80 | opcode));
        if (payload.size() < 126) {
            out += char(0x80 | payload.size());
        } else {
            out += char(0x80 | 126);
            out += char(payload.size() >> 8), out += char(payload.size() & 0xff);
        }
        const char key[4] = {0x12, 0x34, 0x56, 0x78};
        out.append(key, 4);
        for (std::size_t i = 0; i < payload.size(); ++i) out += char(payload[i] ^ key[i % 4]);
        return out;
    }
    bool write(std::string_view bytes) {
        while (!bytes.empty()) {
            const auto n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
            if (n <= 0) return false;
            bytes.remove_prefix(std::size_t(n));
        }
        return true;
    }
    int fd_ = -1;
};

struct fixture {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus{store, dispatcher, bus_options()};
    std::unique_ptr<imbus::server> server;

    static imbus::bus_options bus_options() {
        imbus::bus_options o;
        o.db = "db";
        o.log = {};
        return o;
    }
    static imbus::server_options options() {
        imbus::server_options o;
        o.log = {};
        o.gc_interval = std::chrono::seconds(0);
        o.close_handshake_timeout = 300ms;
        o.send_buffer_bytes = 32 * 1024;  // the kernel holds little: the server's queues fill soon
        return o;
    }
    explicit fixture(imbus::server_options o = options()) {
        server = std::make_unique<imbus::server>(bus, imbus::public_policy(), std::move(o));
        server->listen("127.0.0.1", 0);
        server->start();
    }
    std::uint16_t port() const { return server->port(); }
    const imbus::server_metrics& metrics() const { return server->metrics(); }

    std::unique_ptr<imbus::client> honest_client(const std::string& name) {
        imbus::client_options o;
        o.log = {};
        auto c = std::make_unique<imbus::client>(o);
        c->connect("ws://127.0.0.1:" + std::to_string(port()) + "/websocket");
        c->subscribe({name}, 0);
        REQUIRE(wait_until([&] { return dispatcher.subscribers_of(imbus::channel("db", name)) >= 1; }));
        return c;
    }
    bool wait_subscribers(const std::string& name, std::size_t n) {
        return wait_until([&] { return dispatcher.subscribers_of(imbus::channel("db", name)) >= n; });
    }
    // One notification per commit whose wire form is about `bytes` long; returns the last id.
    std::int64_t publish(const std::string& name, int count, std::size_t bytes) {
        const std::string pad(bytes, 'x');
        std::int64_t last = 0;
        for (int i = 0; i < count; ++i) last = bus.send(name, "test/bulk", json{{"i", i}, {"pad", pad}})[0];
        return last;
    }
};

std::string metrics_text(imbus::server& server) {
    imbus::http_request request;
    request.method = "GET";
    request.path = "/metrics";
    return server.serve_http(request).body;
}

std::int64_t last_id(const std::vector<json>& got) { return got.empty() ? 0 : got.back().at("id").get<std::int64_t>(); }

// Takes from an honest client until it has seen `id`; false if it does not come.
bool receives_up_to(imbus::client& c, std::int64_t id) {
    const auto deadline = steady::now() + wait_limit;
    std::int64_t seen = 0;
    while (seen < id && steady::now() < deadline) {
        auto got = c.take(1, 1000ms);
        if (!got.empty()) seen = std::max(seen, last_id(got));
    }
    return seen >= id;
}

}  // namespace

TEST_CASE("a client that never reads holds at most max_outbound_bytes plus one frame, the others get everything") {
    auto o = fixture::options();
    o.max_outbound_bytes = 64 * 1024;
    fixture f(o);
    auto honest = f.honest_client("bulk");
    std::vector<std::unique_ptr<stalled_client>> stalled;
    for (int i = 0; i < 3; ++i) {
        stalled.push_back(std::make_unique<stalled_client>(f.port()));
        stalled.back()->subscribe("bulk");
    }
    REQUIRE(f.wait_subscribers("bulk", 4));

    // 3 MB: far past what the kernel buffers for a reader that stopped (about 100 KB here).
    constexpr std::size_t row = 10000;
    const std::int64_t last = f.publish("bulk", 300, row);
    CHECK(receives_up_to(*honest, last));
    REQUIRE(wait_until([&] { return f.metrics().slow_consumer_catch_ups.load() >= 3; }));

    const std::size_t one_frame = row + 200;  // a row's wire form, the brackets and the header
    CHECK(f.metrics().outbound_peak.load() >= o.max_outbound_bytes / 2);          // the budget was reached...
    CHECK(f.metrics().outbound_peak.load() <= o.max_outbound_bytes + one_frame);  // ...and never overrun
    CHECK(f.server->largest_outbound_bytes() <= o.max_outbound_bytes + one_frame);
    CHECK(f.server->outbound_bytes() <= 3 * (o.max_outbound_bytes + one_frame));

    // A catch-up (history from id 0) is cut into frames that fit the budget too.
    stalled_client late(f.port());
    late.subscribe("bulk", 1);
    REQUIRE(wait_until([&] { return f.metrics().slow_consumer_catch_ups.load() >= 4; }));
    CHECK(f.metrics().outbound_peak.load() <= o.max_outbound_bytes + one_frame);
    const auto metrics = metrics_text(*f.server);
    CHECK(metrics.find("imbus_outbound_bytes_peak ") != std::string::npos);
    CHECK(metrics.find("imbus_outbound_bytes_limit 65536") != std::string::npos);
}

TEST_CASE("a ping flood from a client that never reads leaves at most one pong waiting") {
    auto o = fixture::options();
    o.rate_burst = 1000000;  // the rate limit is the next case; here only the pong rule holds it
    fixture f(o);
    auto honest = f.honest_client("canary");
    stalled_client flooder(f.port());
    // 400 pings of 125 bytes (52 KB, within the window the server offers a new connection):
    // 50 KB of pongs if each were answered, several times what the kernel takes for this
    // reader with the fixture's send buffer.
    const std::string payload(125, 'p');
    constexpr int pings = 400;
    REQUIRE(flooder.frames(0x9, payload, pings));
    REQUIRE(wait_until([&] { return f.metrics().pings_received.load() >= pings; }));

    const std::size_t pong = 127;                           // 2 header bytes + 125
    CHECK(f.server->largest_outbound_bytes() <= 2 * pong);  // one in flight, one waiting
    CHECK(f.server->outbound_bytes() <= 2 * pong);
    CHECK(f.metrics().pongs_replaced.load() >= pings / 4);
    const auto id = f.bus.send("canary", "test/canary", json{{"i", 1}})[0];
    CHECK(receives_up_to(*honest, id));
}

TEST_CASE("the rate limit counts pings: a flood is closed with 1013 and counted, other clients are not affected") {
    auto o = fixture::options();
    o.rate_burst = 10;
    o.rate_delay = 200ms;
    fixture f(o);
    auto honest = f.honest_client("canary");
    stalled_client flooder(f.port());
    for (int i = 0; i < 100; ++i)
        if (!flooder.frame(0x9, "")) break;
    CHECK(wait_until([&] { return f.metrics().rate_limited.load() == 1; }));
    CHECK(f.metrics().pings_received.load() >= 11);
    // It never answers the close frame: dropped after close_handshake_timeout (counted as 1006).
    CHECK(wait_until([&] { return f.server->connection_count() == 1; }));
    CHECK(metrics_text(*f.server).find("imbus_rate_limited_total 1\n") != std::string::npos);
    const auto id = f.bus.send("canary", "test/canary", json{{"i", 1}})[0];
    CHECK(receives_up_to(*honest, id));
}

TEST_CASE(
    "max_outbound_total: past it the clients holding the most wait; the total stays within it plus a frame or two "
    "each") {
    auto o = fixture::options();
    o.max_outbound_bytes = 4 * 1024 * 1024;
    o.max_outbound_total = 256 * 1024;
    fixture f(o);
    auto honest = f.honest_client("bulk");
    constexpr int readers = 4;
    std::vector<std::unique_ptr<stalled_client>> stalled;
    for (int i = 0; i < readers; ++i) {
        stalled.push_back(std::make_unique<stalled_client>(f.port()));
        stalled.back()->subscribe("bulk");
    }
    REQUIRE(f.wait_subscribers("bulk", readers + 1));

    constexpr std::size_t row = 20000;
    // Past the total, a client may still hold up to catch_up_bytes plus one frame (a live
    // frame is one row here; a catch-up frame at most catch_up_bytes).
    const std::size_t one_frame = std::max(row + 200, o.catch_up_bytes);
    const std::size_t bound = o.max_outbound_total + (readers + 1) * (o.catch_up_bytes + one_frame);
    std::uint64_t highest = 0;
    std::int64_t last = 0;
    for (int round = 0; round < 10; ++round) {  // 10 x 25 rows of 20 KB to each of 5 clients
        last = f.publish("bulk", 25, row);
        highest = std::max(highest, f.server->outbound_bytes());
    }
    CHECK(receives_up_to(*honest, last));  // the one that reads is never held back
    CHECK(wait_until([&] { return f.metrics().outbound_total_lags.load() >= readers; }));
    // Samples for ~100 ms, not until a condition: the upper bound must hold all along.
    for (int i = 0; i < 50; ++i, std::this_thread::sleep_for(2ms))
        highest = std::max(highest, f.server->outbound_bytes());
    CAPTURE(highest);
    CHECK(highest >= o.max_outbound_total / 2);
    CHECK(highest <= bound);
}

TEST_CASE("stop() closes a client whose queue is full without waiting for it to read") {
    auto o = fixture::options();
    o.max_outbound_bytes = 64 * 1024;
    fixture f(o);
    stalled_client stalled(f.port());
    stalled.subscribe("bulk");
    REQUIRE(f.wait_subscribers("bulk", 1));
    f.publish("bulk", 200, 10000);
    REQUIRE(wait_until([&] { return f.metrics().slow_consumer_catch_ups.load() >= 1; }));
    const auto start = steady::now();
    f.server->stop();
    f.server->wait();  // the close frame cannot be written; the close handshake times out
    CHECK(steady::now() - start < wait_limit);
    CHECK(f.server->connection_count() == 0);
    CHECK(f.server->outbound_bytes() == 0);
}

TEST_CASE("two shards: every client gets every notification once, in order") {
    auto o = fixture::options();
    o.threads = 2;
    fixture f(o);
    std::vector<std::unique_ptr<imbus::client>> clients;
    for (int i = 0; i < 8; ++i) clients.push_back(f.honest_client("fan"));
    REQUIRE(f.wait_subscribers("fan", 8));
    std::int64_t last = 0;
    for (int i = 0; i < 50; ++i) last = f.bus.send("fan", "test/fan", json{{"i", i}})[0];
    for (auto& c : clients) {
        std::vector<std::int64_t> ids;
        const auto deadline = steady::now() + wait_limit;
        while ((ids.empty() || ids.back() < last) && steady::now() < deadline)
            for (const auto& n : c->take(1, 1000ms)) ids.push_back(n.at("id").get<std::int64_t>());
        REQUIRE(ids.size() == 50);
        for (std::size_t i = 0; i < ids.size(); ++i) CHECK(ids[i] == last - 49 + std::int64_t(i));
    }
}

// Out of file descriptors, accept fails with EMFILE for as long as none is freed; retrying at
// once would spin a core. The server pauses accepting instead, counts each pause, and takes
// the connections that waited once descriptors are free again.
TEST_CASE("out of file descriptors, accepting pauses instead of spinning and resumes when they are free") {
    fixture f;
    auto honest = f.honest_client("canary");
    constexpr int waiting = 3;
    std::vector<std::unique_ptr<stalled_client>> clients;
    for (int i = 0; i < waiting; ++i)
        clients.push_back(std::make_unique<stalled_client>(stalled_client::unconnected{}));
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
    const int lowest_free = ::open("/dev/null", O_RDONLY);  // every descriptor below it is in use
    REQUIRE(lowest_free >= 0);
    ::close(lowest_free);
    rlimit none_left = saved;
    none_left.rlim_cur = rlim_t(lowest_free);
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &none_left) == 0);
    struct restore {
        rlimit limit;
        ~restore() { ::setrlimit(RLIMIT_NOFILE, &limit); }
    } restore_limit{saved};

    const auto start = steady::now();
    for (auto& c : clients) c->connect(f.port());  // the kernel completes TCP; accept() cannot
    REQUIRE(wait_until([&] { return f.metrics().accept_pauses.load() >= 2; }));
    const auto paused_for = steady::now() - start;
    CHECK(f.server->connection_count() == 1);
    // One failed accept per pause, not a spin: at most one per accept_pause_time elapsed.
    CHECK(f.metrics().accept_pauses.load() <= std::uint64_t(paused_for / imbus::detail::accept_pause_time) + 2);
    CHECK(metrics_text(*f.server).find("imbus_accept_pauses_total ") != std::string::npos);

    REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
    for (auto& c : clients) {
        c->handshake();  // taken after the pause: 101
        c->subscribe("canary");
    }
    CHECK(f.wait_subscribers("canary", 1 + waiting));
    const auto id = f.bus.send("canary", "test/canary", json{{"i", 1}})[0];
    CHECK(receives_up_to(*honest, id));
}
