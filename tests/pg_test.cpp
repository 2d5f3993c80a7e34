// The PostgreSQL store and listener: outbox commits, commit order without a hold-back, NOTIFY
// payloads, and the one-listener-per-process dispatch path. Every test case gets a database of
// its own on the server named by IMBUS_PG_CONNINFO (scripts/test.sh starts one).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define IMBUS_WITH_POSTGRES
#include "imbus.hpp"

#include "support/pg_database.hpp"
#include "support/store_helpers.hpp"
#include "support/test_helpers.hpp"

#include <algorithm>
#include <cstdio>
#include <optional>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <random>
#include <set>
#include <thread>

std::size_t imbus_second_tu_pg_payloads();  // tests/second_tu_pg.cpp

using namespace std::chrono_literals;
using imbus::channel;
using imbus::pending_message;
using imbus_test::batch_of;
using imbus_test::ids_of;
using imbus_test::log_capture;
using imbus_test::pg_test_database;
using imbus_test::test_connection;
using imbus_test::wait_until;

namespace {

const channel ch_a("db", "a");
const channel ch_b("db", "b");

// Opens a transaction on `c` that holds the bus's advisory lock and has taken one id (returned),
// as a slow bus commit of another process would: every bus commit now waits for c's COMMIT.
std::int64_t hold_bus_lock(test_connection& c) {
    c.exec("BEGIN");
    c.exec("SELECT pg_advisory_xact_lock(" + std::to_string(imbus::pg_store::advisory_lock_key) + ")");
    return c.scalar(
        "INSERT INTO bus_bus (channel, message, create_date) VALUES ('[\"db\",\"a\"]', '{}', now()) RETURNING id");
}

// Bus commits waiting for the advisory lock at the server.
// pg_locks shows the whole cluster: only this test's database counts (ctest -j2 runs others).
std::int64_t waiting_for_bus_lock(test_connection& admin) {
    return admin.scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())");
}

// Follows ch_a and ch_b the way a connection does: polls from its position, then moves the
// position to the poll's horizon. Every id must come once, ascending.
struct horizon_follower {
    explicit horizon_follower(imbus::store& s) : store(s) {}
    imbus::store& store;
    std::int64_t position = -1;
    std::vector<std::int64_t> seen;
    bool ordered = true;

    void read() {
        auto r = store.fetch({ch_a, ch_b}, position);
        for (const auto& n : r.notifications) {
            if (n.id <= position) ordered = false;
            seen.push_back(n.id);
        }
        position = r.horizon;
    }
};

// Every row a subscriber received, and the epoch of each delivery.
struct recorder {
    std::mutex m;
    std::vector<imbus::notification> rows;
    std::vector<std::uint64_t> epochs;
    int runs = 0;
    imbus::dispatcher::handler handler() {
        return [this](imbus::wakeup& w) {
            std::lock_guard<std::mutex> lock(m);
            ++runs;
            for (const auto& d : w.events) {
                epochs.push_back(d.epoch);
                rows.insert(rows.end(), d->notifications.begin(), d->notifications.end());
            }
        };
    }
    std::size_t size() {
        std::lock_guard<std::mutex> lock(m);
        return rows.size();
    }
    std::vector<std::int64_t> ids() {
        std::lock_guard<std::mutex> lock(m);
        return ids_of(rows);
    }
};

imbus::pg_store_options quiet_options(imbus::logger log = {}) {
    imbus::pg_store_options o;
    o.log = std::move(log);
    return o;
}

imbus::pg_listener_options fast_reconnect() {
    imbus::pg_listener_options o;
    o.reconnect_min = 5ms;
    o.reconnect_max = 50ms;
    return o;
}

// Terminates a backend and waits until it is gone, so the next step sees a dead connection.
void terminate_backend(test_connection& admin, const std::string& pid) {
    REQUIRE(!pid.empty());
    admin.exec("SELECT pg_terminate_backend(" + pid + ")");
    CHECK(wait_until([&] { return admin.exec("SELECT count(*) FROM pg_stat_activity WHERE pid = " + pid) == "0"; }));
}

}  // namespace

// The outbox pattern: the store borrows the application's connection, so the application's row
// and the bus rows are one transaction; readers derive their conninfo from that connection.
TEST_CASE("application row and notifications commit together or not at all") {
    pg_test_database db;
    test_connection app(db.conninfo);
    app.exec("CREATE TABLE message (id serial PRIMARY KEY, body text NOT NULL)");
    imbus::pg_store store(app.c, quiet_options());
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"db", {}});
    recorder seen;
    auto sub = dispatcher.subscribe(seen.handler());
    sub.set_channels({bus.channel_for("chat")});

    {
        imbus::transaction tx(bus);
        app.exec("INSERT INTO message (body) VALUES ('hello')");
        tx.send("chat", "chat/message", {{"text", "hello"}});
        tx.send("chat", "chat/typing", false);
        CHECK(tx.commit().size() == 2);
    }
    CHECK(app.scalar("SELECT count(*) FROM message") == 1);
    CHECK(ids_of(store.poll({bus.channel_for("chat")}, -1)) == std::vector<std::int64_t>{1, 2});
    CHECK(seen.ids() == std::vector<std::int64_t>{1, 2});

    {  // rolled back: neither the application's row nor the notification
        imbus::transaction tx(bus);
        app.exec("INSERT INTO message (body) VALUES ('lost')");
        tx.send("chat", "chat/message", {{"text", "lost"}});
        tx.rollback();
    }
    CHECK(app.scalar("SELECT count(*) FROM message") == 1);
    CHECK(store.poll({bus.channel_for("chat")}, 2).empty());

    {  // the application's statement failed: the commit fails and stores nothing
        imbus::transaction tx(bus);
        PQclear(PQexec(app.c, "INSERT INTO message (body) VALUES (NULL)"));
        tx.send("chat", "chat/message", {{"text", "after an error"}});
        std::error_code ec;
        CHECK(tx.commit(ec).empty());
        CHECK(ec == imbus::errc::store_failure);
    }
    CHECK(PQtransactionStatus(app.c) == PQTRANS_IDLE);
    CHECK(app.scalar("SELECT count(*) FROM message") == 1);
    CHECK(store.poll({bus.channel_for("chat")}, 2).empty());
    CHECK(seen.size() == 2);

    // a transaction already open on the connection is a usage error, reported at once
    app.exec("BEGIN");
    CHECK_THROWS_AS(imbus::transaction{bus}, std::system_error);
    app.exec("ROLLBACK");
    imbus::transaction outer(bus);
    CHECK_THROWS_AS(imbus::transaction{bus}, std::system_error);  // nested on one thread: no deadlock
}

// The reason for the advisory lock. A transaction that took its id and has not committed yet
// holds the lock, so a later writer cannot take a higher id and commit first: a reader's
// horizon (the newest id of its snapshot) never passes an id that later appears.
TEST_CASE("a reader's horizon never passes an id that later appears") {
    pg_test_database db;
    imbus::pg_store store(db.conninfo, quiet_options());
    test_connection slow(db.conninfo);  // another process's transaction, stopped between ids and commit
    slow.exec("BEGIN");
    slow.exec("SELECT pg_advisory_xact_lock(" + std::to_string(imbus::pg_store::advisory_lock_key) + ")");
    const std::int64_t slow_id = slow.scalar(
        "INSERT INTO bus_bus (channel, message, create_date) VALUES ('[\"db\",\"a\"]', '{}', now()) RETURNING id");
    CHECK(slow_id == 1);

    std::int64_t fast_id = 0;
    std::thread fast([&] { fast_id = store.append(batch_of({{ch_a, 2}}))[0].id; });
    test_connection admin(db.conninfo);
    CHECK(wait_until([&] { return waiting_for_bus_lock(admin) == 1; }));
    auto before = store.fetch({ch_a}, -1);
    CHECK(before.notifications.empty());
    CHECK(before.horizon < slow_id);  // vouches for nothing the slow transaction may still add

    slow.exec("COMMIT");
    fast.join();
    CHECK(fast_id == slow_id + 1);  // the waiting writer took its id only after the commit
    auto after = store.fetch({ch_a}, before.horizon);
    CHECK(ids_of(after.notifications) == std::vector<std::int64_t>{slow_id, fast_id});
    CHECK(after.horizon == fast_id);

    // Without the lock the hazard is real: ids taken in one order, committed in the other.
    test_connection unlocked(db.conninfo);
    unlocked.exec("BEGIN");
    const std::int64_t early = unlocked.scalar(
        "INSERT INTO bus_bus (channel, message, create_date) VALUES ('[\"db\",\"a\"]', '{}', now()) RETURNING id");
    admin.exec("INSERT INTO bus_bus (channel, message, create_date) VALUES ('[\"db\",\"a\"]', '{}', now())");
    const auto unsafe = store.fetch({ch_a}, after.horizon);
    CHECK(unsafe.horizon > early);  // a horizon past an id that is not visible yet...
    unlocked.exec("COMMIT");
    CHECK(store.contains(early));  // ...which then appears below it
}

// Many writers on separate connections (as separate processes would be): a reader moving its
// position to each poll's horizon ends with every id, none skipped, none twice.
TEST_CASE("writers on separate connections: a reader following horizons sees every id once") {
    pg_test_database db;
    constexpr int writers = 4, batches = 40;
    std::vector<std::unique_ptr<imbus::pg_store>> stores;
    for (int w = 0; w < writers; ++w) stores.push_back(std::make_unique<imbus::pg_store>(db.conninfo, quiet_options()));
    imbus::pg_store reader(db.conninfo, quiet_options());
    std::atomic<int> done{0};
    std::vector<std::vector<std::int64_t>> written(writers);
    std::vector<std::thread> threads;
    for (int w = 0; w < writers; ++w)
        threads.emplace_back([&, w] {
            std::mt19937 rng{static_cast<unsigned>(w)};
            for (int b = 0; b < batches; ++b)
                for (const auto& n :
                     stores[std::size_t(w)]->append(batch_of({{rng() % 2 ? ch_a : ch_b, b}, {ch_a, b}})))
                    written[std::size_t(w)].push_back(n.id);
            ++done;
        });
    horizon_follower follow(reader);
    while (done < writers) follow.read();
    for (auto& t : threads) t.join();
    follow.read();
    CHECK(follow.ordered);
    std::vector<std::int64_t> all;
    for (const auto& w : written) all.insert(all.end(), w.begin(), w.end());
    std::sort(all.begin(), all.end());
    CHECK(all.size() == std::size_t(writers * batches * 2));
    CHECK(follow.seen == all);
}

// One store, many threads: its pool of writer connections commits concurrently, and a reader
// moving its position to each poll's horizon still ends with every id once, in ascending order.
TEST_CASE("writers sharing one store's connection pool: a reader following horizons sees every id once") {
    pg_test_database db;
    constexpr int threads = 8, batches = 40;
    imbus::pg_store_options o = quiet_options();
    o.writers = 4;
    imbus::pg_store store(db.conninfo, o);
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"db", {}});
    std::atomic<int> done{0};
    std::vector<std::vector<std::int64_t>> written(threads);
    std::vector<std::thread> workers;
    for (int w = 0; w < threads; ++w)
        workers.emplace_back([&, w] {
            std::mt19937 rng{static_cast<unsigned>(w)};
            for (int b = 0; b < batches; ++b) {
                if (b % 3 == 0) {  // a transaction of several sends, through the bus's API
                    imbus::transaction tx(bus);
                    tx.send(rng() % 2 ? "a" : "b", "t", b);
                    tx.send("a", "t", b);
                    for (const auto id : tx.commit()) written[std::size_t(w)].push_back(id);
                    continue;
                }
                for (const auto& n : store.append(batch_of({{rng() % 2 ? ch_a : ch_b, b}, {ch_a, b}})))
                    written[std::size_t(w)].push_back(n.id);
            }
            ++done;
        });
    horizon_follower follow(store);
    while (done < threads) follow.read();
    for (auto& t : workers) t.join();
    follow.read();
    CHECK(follow.ordered);
    std::vector<std::int64_t> all;
    for (const auto& w : written) {
        CHECK(std::is_sorted(w.begin(), w.end()));  // one thread's commits, in its order
        all.insert(all.end(), w.begin(), w.end());
    }
    std::sort(all.begin(), all.end());
    CHECK(all.size() == std::size_t(threads * batches * 2));
    CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
    CHECK(follow.seen == all);
    CHECK(all.back() - all.front() + 1 == std::int64_t(all.size()));  // nothing rolled back: no gaps
}

// The pool is what lets commits overlap: while another transaction holds the advisory lock,
// as many of the store's commits wait for it at the server as it has writer connections, and
// no more; each then commits with an id above the holder's, none lost.
TEST_CASE("a store's writer connections wait for the advisory lock side by side, up to options.writers") {
    pg_test_database db;
    imbus::pg_store_options o = quiet_options();
    o.writers = 3;
    imbus::pg_store store(db.conninfo, o);
    test_connection holder(db.conninfo);
    const std::int64_t held_id = hold_bus_lock(holder);
    constexpr int threads = 5;
    std::vector<std::int64_t> ids(threads);
    std::vector<std::thread> workers;
    for (int w = 0; w < threads; ++w)
        workers.emplace_back([&, w] { ids[std::size_t(w)] = store.append(batch_of({{ch_a, w}}))[0].id; });
    test_connection admin(db.conninfo);
    CHECK(wait_until([&] { return waiting_for_bus_lock(admin) == 3; }));
    std::this_thread::sleep_for(100ms);       // a negative: no fourth one shows up
    CHECK(waiting_for_bus_lock(admin) == 3);  // the other two commits wait for a connection, not at the server
    CHECK(wait_until([&] { return store.waiting_commits() == 2; }));
    holder.exec("COMMIT");
    for (auto& t : workers) t.join();
    std::sort(ids.begin(), ids.end());
    CHECK(ids == std::vector<std::int64_t>{held_id + 1, held_id + 2, held_id + 3, held_id + 4, held_id + 5});
    CHECK(ids_of(store.poll({ch_a}, -1)).size() == std::size_t(threads + 1));
}

// Group commit: batches waiting for the one writer connection go together in one transaction.
// When that transaction fails (here one batch's channel key is too long for a NOTIFY), it surely
// rolled back, so each batch is committed again alone: only the bad one fails.
TEST_CASE("group commit: waiting batches share a transaction, and a bad batch fails only its caller") {
    pg_test_database db;
    imbus::pg_store_options o = quiet_options();
    o.writers = 1;
    imbus::pg_store store(db.conninfo, o);
    test_connection holder(db.conninfo);
    const std::int64_t held_id = hold_bus_lock(holder);
    std::int64_t first_id = 0;
    std::thread first([&] { first_id = store.append(batch_of({{ch_a, 0}}))[0].id; });  // at the server
    test_connection admin(db.conninfo);
    CHECK(wait_until([&] { return waiting_for_bus_lock(admin) == 1; }));
    const channel too_long("db", std::string(9000, 'x'));
    std::vector<std::int64_t> ids(3);
    std::vector<std::string> errors(3);
    std::vector<std::thread> queued;  // wait for the connection
    for (int w = 0; w < 3; ++w)
        queued.emplace_back([&, w] {
            try {
                ids[std::size_t(w)] = store.append(batch_of({{w == 1 ? too_long : ch_b, w}}))[0].id;
            } catch (const std::system_error& e) {
                errors[std::size_t(w)] = e.what();
            }
        });
    REQUIRE(wait_until([&] { return store.waiting_commits() == 3; }));  // all three in line
    holder.exec("COMMIT");
    first.join();
    for (auto& t : queued) t.join();
    CHECK(first_id == held_id + 1);
    CHECK(errors[0].empty());
    CHECK(errors[1].find("rolled back") != std::string::npos);
    CHECK_MESSAGE(errors[2].empty(), errors[2]);
    CHECK(ids[1] == 0);
    CHECK(ids[0] > held_id + 4);  // the group's transaction took three ids, then rolled back
    CHECK(ids[2] > held_id + 4);
    std::vector<std::int64_t> good{ids[0], ids[2]};
    std::sort(good.begin(), good.end());
    CHECK(ids_of(store.poll({ch_b}, -1)) == good);
    CHECK(store.poll({too_long}, -1).empty());
}

// docs/PROTOCOL.md §3 over NOTIFY: one transaction on 1,000 channels (and a repeated one) gives several
// payloads, each below 8000 bytes, whose union is the 1,000 keys once each, in send order.
TEST_CASE("NOTIFY payloads are split below 8000 bytes and name every channel once, in order") {
    pg_test_database db;
    imbus::pg_store store(db.conninfo, quiet_options());
    test_connection listener(db.conninfo);
    listener.exec("LISTEN imbus");
    std::vector<pending_message> batch;
    std::vector<std::string> expected;
    for (int i = 0; i < 1000; ++i) {
        channel c("db", "res.partner", 1000000 + i, "presence");
        batch.push_back({c, imbus::make_message("t", i)});
        expected.push_back(c.key());
    }
    batch.push_back({batch.front().channel, imbus::make_message("t", "again")});
    store.append(std::move(batch));

    std::vector<std::string> payloads, keys;
    CHECK(wait_until([&] {
        PQconsumeInput(listener.c);
        while (PGnotify* n = PQnotifies(listener.c)) {
            CHECK(std::string(n->relname) == "imbus");
            payloads.emplace_back(n->extra);
            for (const auto& k : imbus::json::parse(n->extra)) keys.push_back(k.dump());
            PQfreemem(n);
        }
        return keys.size() >= expected.size();
    }));
    CHECK(payloads.size() >= 4);
    for (const auto& p : payloads) CHECK(p.size() < 8000);
    CHECK(keys == expected);
    CHECK(imbus_second_tu_pg_payloads() == 1);
}

// Another process's commits (another store: other connections) reach this process's
// subscribers through the listener: once each, in order, one read per wake-up, one epoch.
TEST_CASE("listener delivers another store's rows once, in order, one read per wake-up") {
    pg_test_database db;
    imbus::pg_store local(db.conninfo, quiet_options());
    imbus::pg_store remote(db.conninfo, quiet_options());
    remote.append(batch_of({{ch_a, 0}}));  // before the listener: not delivered
    imbus::dispatcher dispatcher;
    recorder seen;
    auto sub = dispatcher.subscribe(seen.handler());
    sub.set_channels({ch_a, ch_b});
    imbus::pg_listener listener(local, dispatcher);
    CHECK(listener.cursor() == 1);
    CHECK(listener.connected());

    const auto reads_before = listener.reads();
    remote.append(batch_of({{ch_a, 1}, {ch_b, 2}, {ch_a, 3}}));
    REQUIRE(wait_until([&] { return seen.size() == 3; }));
    CHECK(seen.ids() == std::vector<std::int64_t>{2, 3, 4});
    CHECK(listener.reads() == reads_before + 1);
    const auto epoch = dispatcher.epoch();

    std::vector<std::int64_t> expected{2, 3, 4};
    for (int i = 0; i < 30; ++i)
        for (const auto& n : remote.append(batch_of({{i % 2 ? ch_a : ch_b, i}}))) expected.push_back(n.id);
    REQUIRE(wait_until([&] { return seen.size() == expected.size(); }));
    CHECK(seen.ids() == expected);
    CHECK(listener.reads() <= reads_before + 1 + 30);
    CHECK(dispatcher.epoch() == epoch);  // every event continued the last: nobody had to poll
    CHECK(listener.cursor() == expected.back());
}

// The listener's connection is killed; rows committed while it cannot reconnect arrive once
// it is back, each exactly once, and the loss is logged through the store's logger.
TEST_CASE("listener survives a killed connection and catches up what it missed") {
    pg_test_database db;
    log_capture log;
    imbus::pg_store local(db.conninfo, quiet_options(log.logger()));
    imbus::pg_store remote(db.conninfo, quiet_options());
    imbus::dispatcher dispatcher;
    recorder seen;
    auto sub = dispatcher.subscribe(seen.handler());
    sub.set_channels({ch_a});
    imbus::pg_listener listener(local, dispatcher, fast_reconnect());
    test_connection admin(db.base);  // on another database: it stays while the test database refuses connections
    const std::string listener_pid_sql =
        "SELECT pid FROM pg_stat_activity WHERE application_name = "
        "'imbus-listener' AND datname = '" +
        db.name + "'";

    std::vector<std::int64_t> expected = ids_of(remote.append(batch_of({{ch_a, 1}})));
    REQUIRE(wait_until([&] { return seen.size() == 1; }));

    // Down, and kept down until the missed rows are committed.
    admin.exec("ALTER DATABASE " + db.name + " ALLOW_CONNECTIONS false");
    terminate_backend(admin, admin.exec(listener_pid_sql));
    CHECK(wait_until([&] { return !listener.connected(); }));
    for (int i = 2; i <= 4; ++i) expected.push_back(remote.append(batch_of({{ch_a, i}}))[0].id);
    admin.exec("ALTER DATABASE " + db.name + " ALLOW_CONNECTIONS true");
    REQUIRE(wait_until([&] { return seen.size() == expected.size(); }));
    CHECK(seen.ids() == expected);
    CHECK(listener.reconnects() == 1);
    CHECK(log.contains("pg_listener: connection lost"));

    // Killed again, with commits racing its reconnect: still each row once.
    CHECK(wait_until([&] { return !admin.exec(listener_pid_sql).empty(); }));
    terminate_backend(admin, admin.exec(listener_pid_sql));
    for (int i = 5; i <= 7; ++i) expected.push_back(remote.append(batch_of({{ch_a, i}}))[0].id);
    REQUIRE(wait_until([&] { return seen.size() == expected.size(); }));
    CHECK(seen.ids() == expected);
    CHECK(listener.reconnects() == 2);
}

// An application that installs any signal handler interrupts the listener's poll() during
// its reconnect backoff; that EINTR was read as "stop" and the listener ended without a word.
// SIGUSR1 is blocked in every thread but the listener's, so each one sent lands there.
extern "C" void imbus_test_ignore_signal(int) {}

TEST_CASE("listener: signals during the reconnect backoff do not stop it") {
    pg_test_database db;
    struct sigaction quiet_handler {
    }, previous{};
    quiet_handler.sa_handler = imbus_test_ignore_signal;  // no SA_RESTART: poll() fails with EINTR
    sigemptyset(&quiet_handler.sa_mask);
    REQUIRE(sigaction(SIGUSR1, &quiet_handler, &previous) == 0);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    REQUIRE(pthread_sigmask(SIG_BLOCK, &usr1, nullptr) == 0);

    imbus::pg_store local(db.conninfo, quiet_options());
    imbus::pg_store remote(db.conninfo, quiet_options());
    imbus::dispatcher dispatcher;
    recorder seen;
    auto sub = dispatcher.subscribe(seen.handler());
    sub.set_channels({ch_a});
    imbus::pg_listener_options o;
    o.reconnect_min = o.reconnect_max = 300ms;
    REQUIRE(pthread_sigmask(SIG_UNBLOCK, &usr1, nullptr) == 0);
    std::optional<imbus::pg_listener> listener;
    listener.emplace(local, dispatcher, o);  // its thread is the only one taking SIGUSR1
    REQUIRE(pthread_sigmask(SIG_BLOCK, &usr1, nullptr) == 0);
    test_connection admin(db.base);
    const std::string listener_pid_sql =
        "SELECT pid FROM pg_stat_activity WHERE application_name = "
        "'imbus-listener' AND datname = '" +
        db.name + "'";
    REQUIRE(wait_until([&] { return listener->connected(); }));

    admin.exec("ALTER DATABASE " + db.name + " ALLOW_CONNECTIONS false");
    terminate_backend(admin, admin.exec(listener_pid_sql));
    CHECK(wait_until([&] { return !listener->connected(); }));
    for (int i = 0; i < 60; ++i) {  // through at least two pauses of 300 ms (no attempt count to wait on)
        kill(getpid(), SIGUSR1);
        std::this_thread::sleep_for(10ms);
    }
    const auto expected = ids_of(remote.append(batch_of({{ch_a, 1}})));
    admin.exec("ALTER DATABASE " + db.name + " ALLOW_CONNECTIONS true");
    CHECK(wait_until([&] { return seen.size() == expected.size(); }));
    CHECK(seen.ids() == expected);
    CHECK(listener->reconnects() == 1);

    listener.reset();
    REQUIRE(pthread_sigmask(SIG_UNBLOCK, &usr1, nullptr) == 0);
    sigaction(SIGUSR1, &previous, nullptr);
}

// With dispatch_on_commit = false the listener is the only path to the dispatcher, this
// process's own commits included: each arrives once, and in one epoch.
TEST_CASE("dispatch_on_commit = false with a listener: a local commit arrives exactly once") {
    pg_test_database db;
    imbus::pg_store store(db.conninfo, quiet_options());
    imbus::pg_store remote(db.conninfo, quiet_options());
    imbus::dispatcher dispatcher;
    imbus::bus_options options;
    options.db = "db";
    options.dispatch_on_commit = false;
    imbus::bus bus(store, dispatcher, options);
    recorder seen;
    auto sub = dispatcher.subscribe(seen.handler());
    sub.set_channels({ch_a});
    imbus::pg_listener listener(store, dispatcher);

    std::vector<std::int64_t> expected = bus.send("a", "t", 1);
    REQUIRE(wait_until([&] { return seen.size() == 1; }));
    const auto epoch = dispatcher.epoch();
    for (int i = 0; i < 10; ++i) {  // local and remote commits interleaved
        for (auto id : bus.send("a", "t", i)) expected.push_back(id);
        expected.push_back(remote.append(batch_of({{ch_a, i}}))[0].id);
    }
    REQUIRE(wait_until([&] { return seen.size() == expected.size(); }));
    CHECK(seen.ids() == expected);
    CHECK(dispatcher.epoch() == epoch);
}

// A rolled-back transaction leaves an id gap. The listener's events say they hold every row
// of their range, so the dispatcher keeps its epoch and a follower takes the rows without a poll.
TEST_CASE("rollback gaps in listener events do not bump the dispatcher epoch") {
    pg_test_database db;
    imbus::pg_store store(db.conninfo, quiet_options());
    imbus::pg_store remote(db.conninfo, quiet_options());
    imbus::dispatcher dispatcher;
    recorder seen;
    auto sub = dispatcher.subscribe(seen.handler());
    sub.set_channels({ch_a});
    imbus::pg_listener listener(store, dispatcher);

    const auto first = remote.append(batch_of({{ch_a, 1}}))[0].id;
    REQUIRE(wait_until([&] { return seen.size() == 1; }));
    const auto epoch = dispatcher.epoch();
    {  // takes an id, then rolls back
        imbus::pg_store_options o = quiet_options();
        test_connection app(db.conninfo);
        imbus::pg_store borrowed(app.c, o);
        imbus::bus bus(borrowed, {"db", {}});
        imbus::transaction tx(bus);
        app.exec("SELECT nextval('bus_bus_id_seq')");
        tx.rollback();
    }
    const auto third = remote.append(batch_of({{ch_a, 3}}))[0].id;
    CHECK(third == first + 2);
    REQUIRE(wait_until([&] { return seen.size() == 2; }));
    CHECK(seen.ids() == std::vector<std::int64_t>{first, third});
    CHECK(dispatcher.epoch() == epoch);
    std::lock_guard<std::mutex> lock(seen.m);
    CHECK(seen.epochs.back() == epoch);
}

// A writer or reader connection the server dropped is reopened before the next statement.
TEST_CASE("store connections killed by the server are reopened") {
    pg_test_database db;
    imbus::pg_store store(db.conninfo, quiet_options());
    store.append(batch_of({{ch_a, 1}}));
    CHECK(store.poll({ch_a}, 0).size() == 1);
    test_connection admin(db.conninfo);
    terminate_backend(admin, std::to_string(PQbackendPID(store.connection())));
    // until the end of the connection reached this side (it may trail the backend's exit)
    CHECK(wait_until([&] {
        pollfd waiting{PQsocket(store.connection()), POLLIN, 0};
        return ::poll(&waiting, 1, 0) == 1;
    }));
    CHECK(store.append(batch_of({{ch_a, 2}}))[0].id == 2);
    // every other connection of the store: its pooled readers
    admin.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND pid <> " +
        std::to_string(PQbackendPID(store.connection())));
    CHECK(wait_until([&] {
        return admin.scalar(
                   "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                   "current_database() AND backend_type = 'client backend'") == 2;
    }));
    CHECK(ids_of(store.poll({ch_a}, 0)) == std::vector<std::int64_t>{1, 2});
    CHECK(store.newest_id() == 2);
}

// A connection that ends during COMMIT leaves the outcome unknown: the commit is reported as
// failed with that message and not retried (a retry could store the batch twice); the next
// commit reconnects. Here the backend terminates itself from a trigger deferred to COMMIT.
TEST_CASE("a commit whose connection ends during COMMIT is reported, never retried") {
    pg_test_database db;
    imbus::pg_store store(db.conninfo, quiet_options());
    test_connection admin(db.conninfo);
    admin.exec(
        "CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.message LIKE '%die%' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; "
        "RETURN NEW; END $$");
    admin.exec(
        "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON bus_bus DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION die_at_commit()");
    std::vector<pending_message> dying{{ch_a, imbus::make_message("t", "die")}};
    CHECK_THROWS_WITH_AS(store.append(dying), doctest::Contains("outcome unknown"), std::system_error);
    CHECK_FALSE(store.contains(1));  // here it did not commit, but the store could not know
    CHECK(store.append(batch_of({{ch_a, 2}}))[0].id == 2);
    CHECK(ids_of(store.poll({ch_a}, -1)) == std::vector<std::int64_t>{2});
}

// The table layout: Odoo's bus_bus columns, create_date the injected clock's UTC time.
TEST_CASE("pg bus_bus table layout") {
    pg_test_database db;
    imbus::manual_clock clock(imbus::time_point(std::chrono::seconds(1700000000) + 123456us));
    imbus::pg_store_options o = quiet_options();
    o.clock = std::ref(clock);
    imbus::pg_store store(db.conninfo, o);
    store.append(batch_of({{channel("db", "res.partner", 3), 7}}));
    test_connection c(db.conninfo);
    CHECK(c.exec("SELECT channel FROM bus_bus") == R"(["db","res.partner",3])");
    CHECK(c.exec("SELECT message FROM bus_bus") == R"({"type":"t","payload":7})");
    CHECK(c.exec("SELECT create_date FROM bus_bus") == "2023-11-14 22:13:20.123456");
    CHECK(c.scalar("SELECT count(*) FROM pg_indexes WHERE tablename = 'bus_bus'") == 3);
    CHECK(store.poll({channel("db", "res.partner", 3)}, -1).at(0).created_at == clock());
}
