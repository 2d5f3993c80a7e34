// Transactions and commit hooks (docs/PROTOCOL.md §3): store at commit, dispatch after it, nothing on rollback.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define IMBUS_WITH_SQLITE
#include "imbus.hpp"
#include "support/test_helpers.hpp"

#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <thread>
#include <unistd.h>

int imbus_second_tu_sqlite_uses();  // tests/second_tu_sqlite.cpp

using imbus::channel;
using imbus_test::log_capture;

namespace {

// Records every wake-up a subscriber gets.
struct recorder {
    std::mutex m;
    std::vector<std::shared_ptr<const imbus::commit_event>> events;
    int runs = 0;
    imbus::dispatcher::handler handler() {
        return [this](imbus::wakeup& w) {
            std::lock_guard<std::mutex> lock(m);
            ++runs;
            events.insert(events.end(), w.events.begin(), w.events.end());
        };
    }
};

std::string temp_path() {
    char name[] = "/tmp/imbus-bus-test-XXXXXX";
    int fd = mkstemp(name);
    REQUIRE(fd >= 0);
    close(fd);
    std::remove(name);
    return name;
}

void remove_db(const std::string& path) {
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) std::remove((path + suffix).c_str());
}

std::int64_t count_rows(sqlite3* db, const char* table) {
    sqlite3_stmt* st = nullptr;
    const std::string sql = std::string("SELECT count(*) FROM ") + table;
    REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(st) == SQLITE_ROW);
    const auto n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

// A memory bus with one recording subscriber on channel "x".
struct subscribed_bus {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus{store, dispatcher, {"db", imbus::stderr_logger()}};
    recorder rec;
    imbus::dispatcher::subscription sub = dispatcher.subscribe(rec.handler());
    subscribed_bus() { sub.set_channels({bus.channel_for("x")}); }
    std::tuple<imbus::memory_store&, imbus::bus&, recorder&> parts() { return {store, bus, rec}; }
};

void exec(sqlite3* db, const char* sql) { REQUIRE(sqlite3_exec(db, sql, nullptr, nullptr, nullptr) == SQLITE_OK); }

}  // namespace

// The example of docs/PROTOCOL.md §3: three rows, and one wake-up naming two channels in order.
TEST_CASE("sends on channel 1, 2, 1 give three rows and one wake-up naming two channels") {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"db", imbus::stderr_logger()});
    recorder rec;
    auto sub = dispatcher.subscribe(rec.handler());
    sub.set_channels({bus.channel_for("channel 1"), bus.channel_for("channel 2")});

    imbus::transaction tx(bus);
    tx.send("channel 1", "t", 1);
    tx.send("channel 2", "t", 2);
    tx.send("channel 1", "t", 3);
    CHECK(tx.pending() == 3);
    CHECK(rec.runs == 0);           // send only buffers
    CHECK(store.newest_id() == 0);  // nothing stored before commit
    auto ids = tx.commit();
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3});
    REQUIRE(rec.events.size() == 1);
    const auto& event = *rec.events[0];
    CHECK(rec.runs == 1);
    std::vector<std::string> keys;
    for (const auto& c : event.channels) keys.push_back(c.key());
    CHECK(keys == std::vector<std::string>{R"(["db","channel 1"])", R"(["db","channel 2"])"});
    REQUIRE(event.notifications.size() == 3);
    CHECK(event.contiguous());
    CHECK(event.wire[2] == R"({"id":3,"message":{"type":"t","payload":3}})");
    CHECK(store.poll({bus.channel_for("channel 1")}, 0).size() == 2);
}

// Rollback, and a transaction dropped without commit, store and send nothing.
TEST_CASE("rollback stores and sends nothing") {
    subscribed_bus f;
    auto [store, bus, rec] = f.parts();
    {
        imbus::transaction tx(bus);
        tx.send("x", "t", 1);
        tx.rollback();
        CHECK_FALSE(tx.open());
        std::error_code ec;
        tx.send("x", "t", 2, ec);
        CHECK(ec == imbus::errc::transaction_finished);
        CHECK(tx.commit(ec).empty());
        CHECK(ec == imbus::errc::transaction_finished);
    }
    {
        imbus::transaction tx(bus);
        tx.send("x", "t", 3);
    }  // destroyed without commit
    CHECK(store.newest_id() == 0);
    CHECK(rec.runs == 0);
    // and the bus still works afterwards
    CHECK(bus.send("x", "t", 4) == std::vector<std::int64_t>{1});
    CHECK(rec.runs == 1);
}

// Hooks run in Odoo's order: pre-commit inside the transaction, post-commit after dispatch.
TEST_CASE("pre-commit and post-commit hooks") {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    log_capture logs;
    imbus::bus bus(store, dispatcher, {"db", logs.logger()});
    std::vector<std::string> order;
    auto sub = dispatcher.subscribe([&](imbus::wakeup&) { order.push_back("dispatch"); });
    sub.set_channels({bus.channel_for("x")});

    SUBCASE("in order") {
        imbus::transaction tx(bus);
        tx.on_postcommit([&] { order.push_back("post"); });
        tx.on_precommit([&] {
            order.push_back("pre");
            CHECK(store.newest_id() == 0);  // the bus rows are not written yet
        });
        tx.send("x", "t", 1);
        tx.commit();
        CHECK(order == std::vector<std::string>{"pre", "dispatch", "post"});
    }
    SUBCASE("a throwing pre-commit hook rolls back") {
        imbus::transaction tx(bus);
        tx.send("x", "t", 1);
        tx.on_precommit([] { throw std::runtime_error("constraint failed"); });
        tx.on_postcommit([&] { order.push_back("post"); });
        std::error_code ec;
        CHECK(tx.commit(ec).empty());
        CHECK(ec == imbus::errc::hook_failed);
        CHECK(store.newest_id() == 0);
        CHECK(order.empty());
        REQUIRE(logs.count_at_least(imbus::log_level::debug) == 1);
        CHECK(logs.contains("constraint failed"));
    }
    SUBCASE("hooks that add hooks (Odoo allows it): the added ones run in the same pass, in order") {
        imbus::transaction tx(bus);
        tx.on_precommit([&] {
            order.push_back("pre");
            for (int i = 0; i < 100; ++i) tx.on_precommit([&order, i] { order.push_back("pre" + std::to_string(i)); });
            tx.send("x", "t", 2);  // a notification from a pre-commit hook is stored with the others
            tx.on_postcommit([&] { order.push_back("post from pre"); });
        });
        tx.on_postcommit([&] {
            order.push_back("post");
            for (int i = 0; i < 100; ++i)
                tx.on_postcommit([&order, i] { order.push_back("post" + std::to_string(i)); });
        });
        tx.send("x", "t", 1);
        CHECK(tx.commit().size() == 2);
        std::vector<std::string> expected{"pre"};
        for (int i = 0; i < 100; ++i) expected.push_back("pre" + std::to_string(i));
        expected.insert(expected.end(), {"dispatch", "post", "post from pre"});
        for (int i = 0; i < 100; ++i) expected.push_back("post" + std::to_string(i));
        CHECK(order == expected);
    }
    SUBCASE("a throwing post-commit hook is logged; the commit stands") {
        imbus::transaction tx(bus);
        tx.send("x", "t", 1);
        tx.on_postcommit([] { throw std::runtime_error("oops"); });
        std::error_code ec;
        CHECK(tx.commit(ec).size() == 1);
        CHECK_FALSE(ec);
        CHECK(order == std::vector<std::string>{"dispatch"});
        REQUIRE(logs.count_at_least(imbus::log_level::debug) == 1);
        CHECK(logs.contains("oops"));
    }
}

// The publish path returns errors as values: bad input stores nothing and is logged.
TEST_CASE("autocommit send reports invalid input without storing") {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    log_capture logs;
    imbus::bus bus(store, dispatcher, {"db", logs.logger()});
    std::error_code ec;
    CHECK(bus.send("x", "t", std::string("bad \xff utf-8"), ec).empty());
    CHECK(ec == imbus::errc::invalid_message);
    CHECK(bus.send(std::string("bad \xc3"), "t", 1, ec).empty());
    CHECK(ec == imbus::errc::invalid_channel);
    CHECK(store.newest_id() == 0);
    CHECK(logs.count_at_least(imbus::log_level::debug) == 2);
    CHECK_THROWS_AS(bus.send("x", "t", std::string("\xff")), std::system_error);
    CHECK(bus.send("x", "t", 1, ec) == std::vector<std::int64_t>{1});
    CHECK_FALSE(ec);
}

// A commit with nothing sent still commits (it is the application's transaction) but wakes nobody.
TEST_CASE("an empty transaction wakes nobody") {
    subscribed_bus f;
    auto [store, bus, rec] = f.parts();
    imbus::transaction tx(bus);
    CHECK(tx.commit().empty());
    CHECK(rec.runs == 0);
}

// A bus without a dispatcher stores and wakes nobody: a publisher-only process.
TEST_CASE("bus without a dispatcher only stores") {
    imbus::memory_store store;
    imbus::bus bus(store, {"db", imbus::stderr_logger()});
    CHECK(bus.send(imbus::record{"res.partner", 3, "presence"}, "t", 1) == std::vector<std::int64_t>{1});
    CHECK(store.poll({channel("db", "res.partner", 3, "presence")}, 0).size() == 1);
}

// With dispatch_on_commit = false (a pg_listener dispatches every row), a commit stores and
// runs its post-commit hooks but leaves the dispatcher alone.
TEST_CASE("dispatch_on_commit = false stores without telling the dispatcher") {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus_options options;
    options.db = "db";
    options.dispatch_on_commit = false;
    imbus::bus bus(store, dispatcher, options);
    recorder rec;
    auto sub = dispatcher.subscribe(rec.handler());
    sub.set_channels({bus.channel_for("a")});
    imbus::transaction tx(bus);
    bool post_commit_ran = false;
    tx.on_postcommit([&] { post_commit_ran = true; });
    tx.send("a", "t", 1);
    CHECK(tx.commit() == std::vector<std::int64_t>{1});
    CHECK(post_commit_ran);
    CHECK(rec.runs == 0);
    CHECK(store.poll({bus.channel_for("a")}, 0).size() == 1);
}

// The outbox pattern: the application's row and the notification commit together or not at all.
TEST_CASE("outbox: application row and notification share one SQLite transaction") {
    for (const bool on_file : {false, true}) {
        CAPTURE(on_file);
        const std::string path = on_file ? temp_path() : ":memory:";
        sqlite3* app = nullptr;
        REQUIRE(sqlite3_open(path.c_str(), &app) == SQLITE_OK);
        exec(app, "CREATE TABLE message (id INTEGER PRIMARY KEY, body TEXT NOT NULL UNIQUE)");
        {
            imbus::sqlite_store store(app);
            imbus::dispatcher dispatcher;
            imbus::bus bus(store, dispatcher, {"db", imbus::stderr_logger()});
            recorder rec;
            auto sub = dispatcher.subscribe(rec.handler());
            sub.set_channels({bus.channel_for("room")});

            {  // commit: both
                imbus::transaction tx(bus);
                exec(app, "INSERT INTO message (body) VALUES ('hello')");
                tx.send("room", "message", {{"body", "hello"}});
                tx.commit();
            }
            CHECK(count_rows(app, "message") == 1);
            CHECK(count_rows(app, "bus_bus") == 1);
            CHECK(rec.runs == 1);

            {  // rollback: neither
                imbus::transaction tx(bus);
                exec(app, "INSERT INTO message (body) VALUES ('draft')");
                tx.send("room", "message", {{"body", "draft"}});
                tx.rollback();
            }
            CHECK(count_rows(app, "message") == 1);
            CHECK(count_rows(app, "bus_bus") == 1);

            {  // the application's own write fails: it rolls back, and nothing is sent
                imbus::transaction tx(bus);
                tx.send("room", "message", {{"body", "hello"}});
                const int rc =
                    sqlite3_exec(app, "INSERT INTO message (body) VALUES ('hello')", nullptr, nullptr, nullptr);
                CHECK(rc == SQLITE_CONSTRAINT);
                if (rc != SQLITE_OK) tx.rollback();
            }
            CHECK(count_rows(app, "message") == 1);
            CHECK(count_rows(app, "bus_bus") == 1);
            CHECK(rec.runs == 1);
            CHECK(store.poll({bus.channel_for("room")}, 0).size() == 1);

            // a connection already inside the application's own transaction is a clear error
            exec(app, "BEGIN");
            CHECK_THROWS_WITH_AS(imbus::transaction{bus}, doctest::Contains("already inside a transaction"),
                                 std::system_error);
            exec(app, "ROLLBACK");
        }
        sqlite3_close(app);
        if (on_file) remove_db(path);
    }
}

// Many threads publishing through one bus: every notification reaches a follower once, in order.
TEST_CASE("concurrent senders, one follower: nothing lost, nothing twice") {
    const std::string path = temp_path();
    {
        imbus::sqlite_store store(path);
        imbus::dispatcher dispatcher;
        imbus::bus bus(store, dispatcher, {"db", imbus::stderr_logger()});
        const std::vector<channel> mine{bus.channel_for("a"), bus.channel_for("b")};
        imbus::follower follower(store, mine, 0);
        follower.catch_up([](const imbus::notification&, std::string_view) {});
        std::vector<std::int64_t> received;
        std::mutex m;  // the inline executor runs the handler on the sending threads, one at a time
        auto sub = dispatcher.subscribe([&](imbus::wakeup& w) {
            std::lock_guard<std::mutex> lock(m);
            follower.take(w, [&](const imbus::notification& n, std::string_view) { received.push_back(n.id); });
        });
        sub.set_channels(mine);

        constexpr int threads = 8, per_thread = 40;
        std::vector<std::int64_t> expected;
        std::mutex em;
        std::vector<std::thread> senders;
        for (int t = 0; t < threads; ++t)
            senders.emplace_back([&, t] {
                for (int i = 0; i < per_thread; ++i) {
                    const char* target = (i % 3 == 0) ? "c" : (i % 3 == 1 ? "a" : "b");
                    auto ids = bus.send(target, "t", t * 1000 + i);
                    if (target[0] != 'c') {
                        std::lock_guard<std::mutex> lock(em);
                        expected.insert(expected.end(), ids.begin(), ids.end());
                    }
                }
            });
        for (auto& s : senders) s.join();
        std::sort(expected.begin(), expected.end());
        CHECK(received == expected);
    }
    remove_db(path);
}

// Application types map to channels through bus_channel, followed to a fixed point.
namespace app {
struct partner {
    std::int64_t id;
};
struct user {
    partner p;
};
inline imbus::record bus_channel(const partner& p) { return {"res.partner", p.id, ""}; }
inline partner bus_channel(const user& u) { return u.p; }
}  // namespace app

// A transaction is movable, so it may end on another thread than the one that began it. The
// writer lock was a recursive_mutex: unlocked by a non-owner it stayed locked (glibc answers
// EPERM) and every later begin() waited forever.
TEST_CASE("a transaction begun on one thread may commit or roll back on another, the next begin goes through") {
    for (const bool on_file : {false, true}) {
        CAPTURE(on_file);
        const std::string path = on_file ? temp_path() : ":memory:";
        {
            imbus::sqlite_store store(path);
            imbus::dispatcher dispatcher;
            imbus::bus bus(store, dispatcher, {"db", imbus::stderr_logger()});
            // Fails the run rather than hanging it when begin() never returns.
            auto begin_send_commit = [&](int n) {
                auto done = std::async(std::launch::async, [&] {
                    imbus::transaction tx(bus);
                    tx.send("room", "t", n);
                    return tx.commit();
                });
                if (done.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
                    std::fprintf(stderr, "begin() still waits for a writer lock released on another thread\n");
                    std::abort();
                }
                return done.get();
            };

            auto tx = std::make_unique<imbus::transaction>(bus);
            tx->send("room", "t", 1);
            std::vector<std::int64_t> ids;
            std::thread([&] {
                ids = tx->commit();
                tx.reset();
            }).join();
            CHECK(ids.size() == 1);
            CHECK(begin_send_commit(2).size() == 1);

            auto dropped = std::make_unique<imbus::transaction>(bus);
            dropped->send("room", "t", 3);
            std::thread([&] { dropped.reset(); }).join();  // rolls back there
            CHECK(begin_send_commit(4).size() == 1);
            CHECK(store.poll({bus.channel_for("room")}, -1).size() == 3);
        }
        if (on_file) remove_db(path);
    }
}

// The server collects garbage from an I/O thread while the application may be inside a
// transaction of its own on the connection it lent: the deletes must not join it (they were
// undone by the application's rollback, or committed by its commit).
TEST_CASE("garbage collection on a borrowed file database never joins the application's transaction") {
    const std::string path = temp_path();
    sqlite3* app = nullptr;
    REQUIRE(sqlite3_open(path.c_str(), &app) == SQLITE_OK);
    exec(app, "PRAGMA journal_mode=WAL");  // readers do not block the writer (what imbus's own files use)
    exec(app, "CREATE TABLE message (id INTEGER PRIMARY KEY, body TEXT)");
    {
        imbus::manual_clock clock;
        imbus::sqlite_store_options o;
        o.clock = std::ref(clock);
        o.retention = std::chrono::seconds(60);
        imbus::sqlite_store store(app, o);
        imbus::dispatcher dispatcher;
        imbus::bus bus(store, dispatcher, {"db", imbus::stderr_logger()});
        for (int i = 0; i < 3; ++i) bus.send("room", "t", i);
        clock.advance(std::chrono::seconds(120));
        const auto kept = bus.send("room", "t", 3);

        // The application's own transaction (not imbus's), still reading: no write lock yet.
        exec(app, "BEGIN");
        CHECK(count_rows(app, "message") == 0);
        std::size_t collected = 0;
        std::thread([&] { collected = store.collect_garbage(); }).join();  // as the server's timer does
        exec(app, "ROLLBACK");
        CHECK(collected == 3);
        CHECK(count_rows(app, "bus_bus") == 1);
        CHECK(store.oldest_id() == kept.front());
    }
    sqlite3_close(app);
    remove_db(path);
}

TEST_CASE("sending to an application type follows bus_channel") {
    imbus::memory_store store;
    imbus::bus bus(store, {"db", imbus::stderr_logger()});
    const app::user u{{42}};
    CHECK(bus.channel_for(u).key() == R"(["db","res.partner",42])");
    CHECK(bus.channel_for(std::make_pair(u, std::string("presence"))).key() == R"(["db","res.partner",42,"presence"])");
    bus.send(u, "t", 1);
    CHECK(store.poll({channel("db", "res.partner", 42)}, 0).size() == 1);
}

// Another translation unit including the header links without duplicate symbols.
TEST_CASE("the header can be included in two translation units") { CHECK(imbus_second_tu_sqlite_uses() == 1); }
