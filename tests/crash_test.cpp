// Crash safety of the real example_server on a SQLite file: SIGKILL while publishers POST to
// /bus/send at full speed and reconnecting clients are subscribed; the server restarts on the
// same file and port, several times. Afterwards every publish that was answered with ids is in
// the database, and every client received every id of its channels exactly once, ascending,
// resuming after each restart from the last id it had (0 lost, 0 duplicated). One more
// publisher sends arrays of 200 notifications (one transaction each): each is all or nothing.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"
#include "support/raw_socket.hpp"
#include "support/test_helpers.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef IMBUS_EXAMPLE_SERVER
#error "IMBUS_EXAMPLE_SERVER must be the path of the example_server executable"
#endif

extern char** environ;

using namespace std::chrono_literals;
using imbus::json;
using imbus_test::wait_until;
using ms = std::chrono::milliseconds;
using steady = std::chrono::steady_clock;

namespace {

const std::string api_key = "crash-test-key";

struct temp_dir {
    std::string path;
    temp_dir() {
        char name[] = "/tmp/imbus-crash-test-XXXXXX";
        REQUIRE(mkdtemp(name) != nullptr);
        path = name;
    }
    ~temp_dir() {
        for (const char* f : {"/bus.db", "/bus.db-wal", "/bus.db-shm", "/server.log"}) std::remove((path + f).c_str());
        ::rmdir(path.c_str());
    }
};

// One example_server process: its stdout is a pipe (the first line names the port), its stderr
// goes to a log file that failures print.
class server_process {
public:
    server_process(const std::string& db, const std::string& log, std::uint16_t port) : log_(log) {
        int out[2];
        REQUIRE(::pipe(out) == 0);
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, out[1], 1);
        posix_spawn_file_actions_addclose(&actions, out[0]);
        posix_spawn_file_actions_addclose(&actions, out[1]);
        posix_spawn_file_actions_addopen(&actions, 2, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        const std::string port_text = std::to_string(port);
        const std::string store = "sqlite:" + db;
        std::vector<std::string> args = {IMBUS_EXAMPLE_SERVER, "--port", port_text, "--store", store,
                                         "--api-key",          api_key};
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        const int rc = posix_spawn(&pid_, IMBUS_EXAMPLE_SERVER, &actions, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&actions);
        ::close(out[1]);
        out_ = out[0];
        REQUIRE_MESSAGE(rc == 0, "cannot start " IMBUS_EXAMPLE_SERVER);
        port_ = read_port(10s);
    }
    ~server_process() {
        if (pid_ > 0) kill_now(SIGKILL);
        if (out_ >= 0) ::close(out_);
    }
    server_process(const server_process&) = delete;
    server_process& operator=(const server_process&) = delete;

    std::uint16_t port() const { return port_; }  // 0: it did not start (see log())
    pid_t pid() const { return pid_; }

    // Sends `signal` and reaps the process.
    void kill_now(int signal) {
        if (pid_ <= 0) return;
        ::kill(pid_, signal);
        int status = 0;
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
    }

    std::string log() const {
        std::ifstream f(log_);
        std::stringstream s;
        s << f.rdbuf();
        return s.str();
    }

private:
    // "imbus server on ws://127.0.0.1:PORT/websocket ..." is the first line.
    std::uint16_t read_port(ms timeout) {
        const auto deadline = steady::now() + timeout;
        std::string line;
        while (line.find('\n') == std::string::npos) {
            const auto left = std::chrono::duration_cast<ms>(deadline - steady::now()).count();
            if (left <= 0) return 0;
            pollfd p{out_, POLLIN, 0};
            if (::poll(&p, 1, int(left)) <= 0) continue;
            char buf[256];
            const ssize_t n = ::read(out_, buf, sizeof buf);
            if (n <= 0) return 0;  // exited: it could not listen
            line.append(buf, std::size_t(n));
        }
        const auto at = line.find("127.0.0.1:");
        if (at == std::string::npos) return 0;
        return std::uint16_t(std::stoul(line.substr(at + 10)));
    }

    std::string log_;
    pid_t pid_ = -1;
    int out_ = -1;
    std::uint16_t port_ = 0;
};

// What the publishers were told: id -> channel name, for every answered publish.
struct answered_ids {
    std::mutex mutex;
    std::map<std::int64_t, std::string> ids;
    std::atomic<std::size_t> count{0};
    std::atomic<std::size_t> failed{0};     // refused, reset or unanswered: the outcome is unknown
    std::atomic<std::size_t> malformed{0};  // a 200 whose ids do not match the batch

    void add(std::int64_t id, const std::string& channel) {
        std::lock_guard<std::mutex> lock(mutex);
        ids.emplace(id, channel);
        count.fetch_add(1);
    }
};

const std::vector<std::string> channel_names = {"a", "b"};

// Posts batches of 1-5 notifications on random channels as fast as the server answers; with
// `big`, batches of 200 on channel "big", which nobody follows.
void publisher(int who, std::atomic<std::uint16_t>& port, std::atomic<bool>& stop, answered_ids& answered,
               bool big = false) {
    std::mt19937 rng(std::uint32_t(1000 + who));
    for (int n = 0; !stop; ++n) {
        const int size = big ? 200 : 1 + int(rng() % 5);
        json batch = json::array();
        std::vector<std::string> names;
        for (int i = 0; i < size; ++i) {
            names.push_back(big ? "big" : channel_names[rng() % channel_names.size()]);
            batch.push_back(
                {{"channel", names.back()}, {"type", "crash"}, {"payload", {{"p", who}, {"n", n}, {"i", i}}}});
        }
        try {
            const auto reply = imbus_test::http_request(
                port, "POST", "/bus/send", batch.dump(),
                {{"Authorization", "Bearer " + api_key}, {"Content-Type", "application/json"}}, 2s);
            if (reply.status != 200) throw std::runtime_error("HTTP " + std::to_string(reply.status));
            const json ids = json::parse(reply.body).at("ids");
            if (ids.size() != names.size()) {
                answered.malformed.fetch_add(1);
                continue;
            }
            for (std::size_t i = 0; i < names.size(); ++i) answered.add(ids[i].get<std::int64_t>(), names[i]);
        } catch (const std::exception&) {
            answered.failed.fetch_add(1);
            std::this_thread::sleep_for(1ms);  // the server is down: do not spin
        }
    }
}

// A reconnecting imbus::client that keeps every id it receives, in arrival order.
struct subscriber {
    std::vector<std::string> channels;
    mutable std::mutex mutex;
    std::vector<std::int64_t> received;
    std::unique_ptr<imbus::client> client;  // last: destroyed first, its handler uses the above

    subscriber(std::vector<std::string> names, std::uint16_t port) : channels(std::move(names)) {
        imbus::client_options o;
        o.reconnect = true;
        o.reconnect_delay = 20ms;
        o.log = [](imbus::log_level, const std::string&) {};
        client = std::make_unique<imbus::client>(o);
        client->on_notification([this](const json& n) {
            std::lock_guard<std::mutex> lock(mutex);
            received.push_back(n.at("id").get<std::int64_t>());
        });
        client->connect("ws://127.0.0.1:" + std::to_string(port) + "/websocket");
        client->subscribe(channels, 0);
    }
    std::vector<std::int64_t> ids() const {
        std::lock_guard<std::mutex> lock(mutex);
        return received;
    }
    bool has_all(const std::set<std::int64_t>& wanted) const {
        const auto got = ids();
        const std::set<std::int64_t> have(got.begin(), got.end());
        return std::includes(have.begin(), have.end(), wanted.begin(), wanted.end());
    }
};

// id -> channel name of every row in the database file (read through SQLite, WAL included);
// `big` gets the number of rows of each stored batch of channel "big", by batch number.
std::map<std::int64_t, std::string> stored_rows(const std::string& db, std::map<int, int>& big) {
    sqlite3* conn = nullptr;
    REQUIRE(sqlite3_open_v2(db.c_str(), &conn, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
    sqlite3_busy_timeout(conn, 5000);
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(conn, "SELECT id, channel, message FROM bus_bus ORDER BY id", -1, &st, nullptr) ==
            SQLITE_OK);
    std::map<std::int64_t, std::string> rows;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const json channel = json::parse(reinterpret_cast<const char*>(sqlite3_column_text(st, 1)));
        rows.emplace(sqlite3_column_int64(st, 0), channel.at(1).get<std::string>());
        if (channel.at(1) == "big") {
            const json message = json::parse(reinterpret_cast<const char*>(sqlite3_column_text(st, 2)));
            big[message.at("payload").at("n").get<int>()]++;
        }
    }
    sqlite3_finalize(st);
    sqlite3_close(conn);
    return rows;
}

std::set<std::int64_t> ids_on(const std::map<std::int64_t, std::string>& rows, const std::vector<std::string>& names) {
    std::set<std::int64_t> out;
    for (const auto& [id, name] : rows)
        if (std::find(names.begin(), names.end(), name) != names.end()) out.insert(id);
    return out;
}

}  // namespace

TEST_CASE("SIGKILL during full-speed publishing: every answered id is stored and reaches every client once, in order") {
    constexpr int kills = 5;
    constexpr int publishers = 3;
    constexpr std::size_t per_round = 1000;  // answered notifications between two kills, at least

    temp_dir dir;
    const std::string db = dir.path + "/bus.db";
    const std::string log = dir.path + "/server.log";
    // A port below the ephemeral range: while the server is down, no client's connect can take
    // it as its own source port (a TCP self-connect) and keep the restart from binding it.
    std::mt19937 pick(std::random_device{}());
    std::unique_ptr<server_process> server;
    for (int attempt = 0; attempt < 20 && (!server || server->port() == 0); ++attempt)
        server = std::make_unique<server_process>(db, log, std::uint16_t(20000 + pick() % 12000));
    REQUIRE_MESSAGE(server->port() != 0, server->log());
    std::atomic<std::uint16_t> port{server->port()};

    std::vector<std::unique_ptr<subscriber>> subs;
    subs.push_back(std::make_unique<subscriber>(std::vector<std::string>{"a"}, port));
    subs.push_back(std::make_unique<subscriber>(std::vector<std::string>{"b"}, port));
    subs.push_back(std::make_unique<subscriber>(std::vector<std::string>{"a", "b"}, port));

    answered_ids answered;
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int p = 0; p < publishers; ++p) threads.emplace_back([&, p] { publisher(p, port, stop, answered); });
    answered_ids answered_big;
    threads.emplace_back([&] { publisher(publishers, port, stop, answered_big, true); });

    for (int round = 0; round < kills; ++round) {
        const std::size_t before = answered.count;
        // Kill while publishes flow and every client is connected.
        REQUIRE_MESSAGE(wait_until([&] { return answered.count >= before + per_round; }, 30s), server->log());
        REQUIRE(wait_until(
            [&] { return std::all_of(subs.begin(), subs.end(), [](const auto& s) { return s->client->is_open(); }); },
            30s));
        server->kill_now(SIGKILL);
        // Same file, same port.
        server = std::make_unique<server_process>(db, log, port);
        REQUIRE_MESSAGE(server->port() == port, server->log());
    }
    REQUIRE(wait_until([&] { return answered.count >= per_round * kills + per_round; }, 30s));
    stop = true;
    for (auto& t : threads) t.join();

    std::map<std::int64_t, std::string> answered_map;
    {
        std::lock_guard<std::mutex> lock(answered.mutex);
        answered_map = answered.ids;
    }
    std::map<int, int> big;
    const auto rows = stored_rows(db, big);
    std::size_t lost_in_store = 0;
    for (const auto& [id, name] : answered_map) {
        const auto it = rows.find(id);
        if (it == rows.end() || it->second != name) ++lost_in_store;
    }
    {
        std::lock_guard<std::mutex> lock(answered_big.mutex);
        for (const auto& entry : answered_big.ids) lost_in_store += rows.count(entry.first) ? 0 : 1;
    }
    CHECK(lost_in_store == 0);
    CHECK(answered.malformed == 0);
    CHECK(answered_big.malformed == 0);
    std::size_t partial = 0;
    for (const auto& entry : big) partial += entry.second == 200 ? 0 : 1;
    CHECK(partial == 0);  // a transaction of 200 is all or nothing
    CHECK(answered_big.count >= 200);

    // Every client ends with exactly the stored rows of its channels (the answered ones and any
    // committed by a server killed before it could answer), each once, ascending.
    std::size_t delivered = 0, lost = 0, duplicated = 0, out_of_order = 0;
    for (const auto& s : subs) {
        const auto want = ids_on(rows, s->channels);
        CHECK_MESSAGE(wait_until([&] { return s->has_all(want); }, 30s), "a client is missing ids");
        const auto got = s->ids();
        const std::set<std::int64_t> have(got.begin(), got.end());
        delivered += got.size();
        duplicated += got.size() - have.size();
        for (std::size_t i = 1; i < got.size(); ++i) out_of_order += got[i] <= got[i - 1] ? 1 : 0;
        for (const auto id : want) lost += have.count(id) ? 0 : 1;
        for (const auto id : have)
            CHECK_MESSAGE(want.count(id) == 1, "id " << id << " is not a stored row of its channels");
        CHECK(s->client->connects() >= std::size_t(kills) + 1);  // it reconnected after every kill
    }
    MESSAGE(kills << " kills: " << answered_map.size() << " notifications answered (" << answered.failed.load()
                  << " publishes refused or unanswered), " << rows.size() << " stored, " << delivered
                  << " delivered to 3 clients; lost " << lost << " (store " << lost_in_store << "), duplicated "
                  << duplicated << ", out of order " << out_of_order << "; " << big.size() << " batches of 200 stored ("
                  << answered_big.count / 200 << " answered), " << partial << " partial");
    CHECK(lost == 0);
    CHECK(duplicated == 0);
    CHECK(out_of_order == 0);
    subs.clear();
    server->kill_now(SIGTERM);
}
