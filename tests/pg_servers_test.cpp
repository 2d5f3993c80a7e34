// Several imbus server processes on one PostgreSQL database (issue 6): examples/server started
// twice with --store postgres:CONNINFO, clients on one, publishes on the other, and the
// database restarted under load. Each test starts its own throwaway cluster, so restarting it
// disturbs no other test. Needs PostgreSQL's initdb/pg_ctl (IMBUS_PG_BIN) and example_server
// (IMBUS_EXAMPLE_SERVER), both given by CMake.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"
#include "support/raw_socket.hpp"
#include "support/test_helpers.hpp"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <set>
#include <thread>

extern char** environ;

using namespace std::chrono_literals;
using json = nlohmann::json;
using imbus_test::ids_of;
using imbus_test::wait_until;

namespace {

int run(const std::string& command) {
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::uint16_t free_port() {
    asio::io_context io;
    asio::ip::tcp::acceptor a(io, {asio::ip::make_address("127.0.0.1"), 0});
    return a.local_endpoint().port();
}

// A PostgreSQL cluster under a temporary directory, on its own loopback port.
class throwaway_cluster {
public:
    throwaway_cluster() : port_(free_port()) {
        char dir[] = "/tmp/imbus-pg-servers.XXXXXX";
        REQUIRE(mkdtemp(dir) != nullptr);
        dir_ = dir;
        // initdb refuses to run as root: the cluster then belongs to the postgres user.
        as_ = geteuid() == 0 ? "runuser -u postgres -- " : "";
        if (geteuid() == 0) REQUIRE(run("chown postgres: " + dir_) == 0);
        REQUIRE(run(as_ + bin("initdb") + " -D " + dir_ +
                    "/data -U postgres -A trust --no-sync -E UTF8 --locale=C.UTF-8 > " + dir_ + "/initdb.log 2>&1") ==
                0);
        start();
    }
    ~throwaway_cluster() {
        run(as_ + bin("pg_ctl") + " -D " + dir_ + "/data -m immediate -w stop > /dev/null 2>&1");
        run("rm -rf " + dir_);
    }
    void start() {
        REQUIRE(run(as_ + bin("pg_ctl") + " -D " + dir_ + "/data -l " + dir_ + "/log -w -o \"-p " +
                    std::to_string(port_) + " -k " + dir_ +
                    " -c listen_addresses=127.0.0.1 -c fsync=off\" start > /dev/null") == 0);
    }
    void stop() { REQUIRE(run(as_ + bin("pg_ctl") + " -D " + dir_ + "/data -m fast -w stop > /dev/null") == 0); }
    std::string conninfo() const {
        return "host=127.0.0.1 port=" + std::to_string(port_) + " user=postgres dbname=postgres";
    }

private:
    static std::string bin(const char* name) { return std::string(IMBUS_PG_BIN) + "/" + name; }
    std::uint16_t port_;
    std::string dir_, as_;
};

// examples/server as a child process; its first line of output names the port it got.
class server_process {
public:
    explicit server_process(const std::string& store, std::vector<std::string> extra = {}) {
        int out[2];
        REQUIRE(pipe(out) == 0);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, out[1], 1);
        posix_spawn_file_actions_addclose(&actions, out[0]);
        std::vector<std::string> args = {IMBUS_EXAMPLE_SERVER, "--port", "0", "--store", store, "--api-key", "k"};
        args.insert(args.end(), extra.begin(), extra.end());
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        REQUIRE(posix_spawn(&pid_, IMBUS_EXAMPLE_SERVER, &actions, nullptr, argv.data(), environ) == 0);
        posix_spawn_file_actions_destroy(&actions);
        close(out[1]);
        std::string line;
        char c;
        while (read(out[0], &c, 1) == 1 && c != '\n') line += c;
        close(out[0]);
        const auto at = line.find("127.0.0.1:");
        REQUIRE_MESSAGE(at != std::string::npos, "example_server did not start: " << line);
        port_ = static_cast<std::uint16_t>(std::stoul(line.substr(at + 10)));
    }
    ~server_process() {
        kill(pid_, SIGTERM);
        int status = 0;
        waitpid(pid_, &status, 0);
    }
    std::uint16_t port() const { return port_; }
    std::string url() const { return "ws://127.0.0.1:" + std::to_string(port_) + "/websocket"; }

    // POST /bus/send; the ids it answered, or none when the publish failed.
    std::vector<std::int64_t> publish(const std::string& channel, int i, const std::string& pad = {}) const {
        try {
            json payload{{"i", i}};
            if (!pad.empty()) payload["pad"] = pad;
            const auto reply = imbus_test::http_request(
                port_, "POST", "/bus/send", json{{"channel", channel}, {"type", "test"}, {"payload", payload}}.dump(),
                {{"Authorization", "Bearer k"}, {"Content-Type", "application/json"}}, 5s);
            if (reply.status != 200) return {};
            return json::parse(reply.body).at("ids").get<std::vector<std::int64_t>>();
        } catch (const std::exception&) {
            return {};
        }
    }

private:
    pid_t pid_ = 0;
    std::uint16_t port_ = 0;

public:
    // A counter from GET /metrics (0 when absent).
    std::uint64_t metric(const std::string& name) const {
        const auto reply = imbus_test::http_request(port_, "GET", "/metrics", "", {}, 5s);
        const auto at = reply.body.find("\n" + name + " ");
        return at == std::string::npos ? 0 : std::stoull(reply.body.substr(at + name.size() + 2));
    }
    bool alive() const { return kill(pid_, 0) == 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
};

std::unique_ptr<imbus::client> subscribed_client(const server_process& s, const server_process& publisher,
                                                 const std::string& channel) {
    imbus::client_options o;
    o.reconnect = true;
    auto c = std::make_unique<imbus::client>(o);
    c->connect(s.url());
    c->subscribe({channel}, 0);
    // Published before or after the subscribe lands, this notification reaches the client (a
    // first subscribe reads the 50-second window, so earlier clients' ones may come first).
    const auto ids = publisher.publish(channel, -1);
    REQUIRE(ids.size() == 1);
    std::int64_t seen = 0;
    while (seen < ids[0]) {
        const auto got = c->take(1, 10s);
        REQUIRE(got.size() == 1);
        seen = got[0]["id"].get<std::int64_t>();
    }
    REQUIRE(seen == ids[0]);
    return c;
}

}  // namespace

TEST_CASE("two server processes on one database: a publish on either reaches clients of both, once, in order") {
    throwaway_cluster pg;
    server_process a("postgres:" + pg.conninfo()), b("postgres:" + pg.conninfo());
    auto on_a = subscribed_client(a, b, "news");
    auto on_b = subscribed_client(b, a, "news");
    const auto warm_up = on_a->take(1, 10s);  // on_b's warm-up, published on a, reaches on_a too
    REQUIRE(warm_up.size() == 1);
    CHECK(warm_up[0]["id"] == on_b->last_id());

    std::vector<std::int64_t> sent;
    for (int i = 0; i < 100; ++i) {
        const auto ids = (i % 2 ? a : b).publish("news", i);
        REQUIRE(ids.size() == 1);
        sent.push_back(ids[0]);
    }
    CHECK(std::is_sorted(sent.begin(), sent.end()));
    CHECK(ids_of(on_a->take(100, 10s)) == sent);
    CHECK(ids_of(on_b->take(100, 10s)) == sent);
    std::this_thread::sleep_for(200ms);  // a negative: no copy arrives late (no event to wait for)
    CHECK(on_a->take(1, 0ms).empty());
    CHECK(on_b->take(1, 0ms).empty());
}

TEST_CASE("PostgreSQL restarted under load: every answered publish is delivered exactly once to every client") {
    throwaway_cluster pg;
    server_process a("postgres:" + pg.conninfo()), b("postgres:" + pg.conninfo());
    std::vector<std::unique_ptr<imbus::client>> clients;
    clients.push_back(subscribed_client(a, b, "feed"));
    clients.push_back(subscribed_client(a, a, "feed"));
    clients.push_back(subscribed_client(b, a, "feed"));
    std::vector<std::int64_t> firsts;
    for (auto& c : clients) firsts.push_back(c->last_id());

    std::atomic<bool> publishing{true};
    std::vector<std::int64_t> answered;  // ids of publishes the servers confirmed
    std::atomic<std::size_t> answered_count{0}, failed{0};
    std::thread publisher([&] {
        for (int i = 0; publishing; ++i) {
            const auto ids = (i % 2 ? a : b).publish("feed", i);
            if (ids.empty()) ++failed, std::this_thread::sleep_for(20ms);
            answered.insert(answered.end(), ids.begin(), ids.end());
            answered_count = answered.size();
        }
    });
    // Each phase lasts until the publisher has seen it, not a fixed time (checked below).
    wait_until([&] { return answered_count > 20; }, 30s);
    pg.stop();
    // Ten refused publishes, five on each server, 20 ms apart: the listeners' reconnects
    // (50 ms apart) meet the database down too.
    wait_until([&] { return failed >= 10; }, 30s);
    pg.start();
    const std::size_t answered_before_start = answered_count;
    wait_until([&] { return answered_count > answered_before_start + 20; }, 30s);
    publishing = false;
    publisher.join();
    MESSAGE(answered.size() << " publishes answered, " << failed.load() << " failed while the database was down");
    REQUIRE(answered.size() > 20);
    REQUIRE(failed.load() > 0);  // the restart really interrupted publishing

    // The answered ids, plus any whose answer was lost in the restart: all in order, none twice.
    for (std::size_t k = 0; k < clients.size(); ++k) {
        CAPTURE(k);
        std::vector<std::int64_t> got;
        const auto deadline = std::chrono::steady_clock::now() + 20s;
        while (got.empty() || got.back() < answered.back()) {
            REQUIRE(std::chrono::steady_clock::now() < deadline);
            const auto more = ids_of(clients[k]->take(1, 1s));
            got.insert(got.end(), more.begin(), more.end());
        }
        const auto rest = ids_of(clients[k]->take(1000, 300ms));
        got.insert(got.end(), rest.begin(), rest.end());
        CHECK(std::adjacent_find(got.begin(), got.end(), [](auto x, auto y) { return x >= y; }) == got.end());
        std::set<std::int64_t> received(got.begin(), got.end());
        std::size_t missing = 0;
        for (auto id : answered) missing += received.count(id) == 0;
        CHECK(missing == 0);
    }
}

// A slow client held back from live frames is caught up from the store once it reads again.
// Here the database is down at that moment: the catch-up fails, is retried with a backoff, and
// succeeds after the restart. Before, the store's exception ended the server's I/O thread.
TEST_CASE("PostgreSQL down while a lagging client drains: its catch-up is retried, nothing lost, the server lives") {
    throwaway_cluster pg;
    server_process a("postgres:" + pg.conninfo(), {"--max-outbound-bytes", "65536", "--send-buffer-bytes", "16384"});
    auto slow = imbus_test::raw_ws::connect(a.port());
    slow.send_text(json{{"event_name", "subscribe"}, {"data", {{"channels", {"bulk"}}, {"last", 0}}}}.dump());
    const std::string pad(25000, 'x');
    std::vector<std::int64_t> sent;
    for (int i = 0; i < 400 && a.metric("imbus_slow_consumer_catch_ups_total") == 0; ++i) {
        const auto ids = a.publish("bulk", i, pad);
        REQUIRE(ids.size() == 1);
        sent.push_back(ids[0]);
    }
    REQUIRE(a.metric("imbus_slow_consumer_catch_ups_total") == 1);
    for (int i = 0; i < 10; ++i) sent.push_back(a.publish("bulk", -i, pad).at(0));  // held back: from the store

    pg.stop();
    std::vector<std::int64_t> got;
    std::thread restart([&] {
        // The drain's catch-up meets the database down. Not observable: /metrics reads the store.
        std::this_thread::sleep_for(1s);
        pg.start();
    });
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while ((got.empty() || got.back() < sent.back()) && std::chrono::steady_clock::now() < deadline) {
        const auto frame = json::parse(slow.read_text(30s));
        for (const auto& n : frame) got.push_back(n.at("id").get<std::int64_t>());
    }
    restart.join();
    CHECK(got == sent);
    CHECK(a.alive());
    CHECK(a.metric("imbus_store_errors_total") >= 1);
}
