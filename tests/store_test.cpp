// Store semantics of docs/PROTOCOL.md §2, one test body run against every store.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define IMBUS_WITH_SQLITE
#include "imbus.hpp"
#include "support/store_helpers.hpp"

#ifdef IMBUS_TEST_POSTGRES  // set by CMake when the PostgreSQL tests run
#include "support/pg_database.hpp"
#endif

#include <cstdio>
#include <random>
#include <set>
#include <thread>
#include <unistd.h>

using namespace std::chrono_literals;
using imbus::channel;
using imbus::pending_message;
using imbus_test::batch_of;
using imbus_test::ids_of;
using imbus_test::temp_db;

namespace {

template <class Options> Options options_with(imbus::manual_clock& clock) {
    Options o;
    o.clock = std::ref(clock);
    return o;
}

struct memory_fixture {
    imbus::manual_clock clock;
    imbus::memory_store store{options_with<imbus::memory_store_options>(clock)};
};

struct sqlite_memory_fixture {
    imbus::manual_clock clock;
    imbus::sqlite_store store{":memory:", options_with<imbus::sqlite_store_options>(clock)};
};

struct sqlite_file_fixture {
    imbus::manual_clock clock;
    temp_db file;
    imbus::sqlite_store store{file.path, options_with<imbus::sqlite_store_options>(clock)};
};

#ifdef IMBUS_TEST_POSTGRES
struct pg_fixture {
    imbus::manual_clock clock;
    imbus_test::pg_test_database database;
    imbus::pg_store store{database.conninfo, options_with<imbus::pg_store_options>(clock)};
};
#endif

const channel ch_a("db", "a");
const channel ch_b("db", "b");
const channel ch_c("db", "res.partner", 3);

}  // namespace

#ifdef IMBUS_TEST_POSTGRES
#define STORE_FIXTURES memory_fixture, sqlite_memory_fixture, sqlite_file_fixture, pg_fixture
#else
#define STORE_FIXTURES memory_fixture, sqlite_memory_fixture, sqlite_file_fixture
#endif

// Ids come back ascending, and a batch keeps call order.
TEST_CASE_TEMPLATE("append assigns ascending ids in call order", F, STORE_FIXTURES) {
    F f;
    CHECK(f.store.newest_id() == 0);
    CHECK(f.store.oldest_id() == 0);
    auto rows = f.store.append(batch_of({{ch_a, 1}, {ch_b, 2}, {ch_a, 3}}));
    REQUIRE(rows.size() == 3);
    CHECK(ids_of(rows) == std::vector<std::int64_t>{1, 2, 3});
    CHECK(rows[1].channel == ch_b);
    CHECK(rows[2].payload() == 3);
    CHECK(rows[0].created_at == f.clock());
    CHECK(f.store.newest_id() == 3);
    CHECK(f.store.oldest_id() == 1);
    auto more = f.store.append(batch_of({{ch_c, 4}}));
    CHECK(more[0].id == 4);
}

// A poll returns only the asked channels, after `last`, ascending across channels.
TEST_CASE_TEMPLATE("poll after last id", F, STORE_FIXTURES) {
    F f;
    f.store.append(batch_of({{ch_a, 1}, {ch_b, 2}, {ch_c, 3}}));
    f.store.append(batch_of({{ch_b, 4}, {ch_a, 5}}));
    CHECK(ids_of(f.store.poll({ch_a, ch_b}, 1)) == std::vector<std::int64_t>{2, 4, 5});
    CHECK(ids_of(f.store.poll({ch_c}, 2)) == std::vector<std::int64_t>{3});
    CHECK(f.store.poll({ch_c}, 3).empty());
    CHECK(f.store.poll({channel("db", "nobody")}, 1).empty());
    CHECK(f.store.poll({}, 1).empty());
    // asking for a channel twice must not return its rows twice
    CHECK(ids_of(f.store.poll({ch_a, ch_a, ch_a}, 0)) == std::vector<std::int64_t>{1, 5});
    auto rows = f.store.poll({ch_b}, 0);
    REQUIRE(rows.size() == 2);
    CHECK(rows[0].message == R"({"type":"t","payload":2})");
    CHECK(rows[0].wire() == R"({"id":2,"message":{"type":"t","payload":2}})");
}

// A first poll (last == 0) returns the last 50 seconds, boundary included.
TEST_CASE_TEMPLATE("first poll returns the 50-second window", F, STORE_FIXTURES) {
    F f;
    f.store.append(batch_of({{ch_a, 1}}));  // t0
    f.clock.advance(30s);
    f.store.append(batch_of({{ch_a, 2}}));  // t0 + 30
    f.clock.advance(20s);                   // now = t0 + 50: both inside
    CHECK(ids_of(f.store.poll({ch_a}, 0)) == std::vector<std::int64_t>{1, 2});
    f.clock.advance(1us);  // t0 is now 50 s and 1 µs old
    CHECK(ids_of(f.store.poll({ch_a}, 0)) == std::vector<std::int64_t>{2});
    f.clock.advance(31s);
    CHECK(f.store.poll({ch_a}, 0).empty());
    // a non-first poll still sees old rows
    CHECK(ids_of(f.store.poll({ch_a}, 1)) == std::vector<std::int64_t>{2});
}

// A client whose last id is above the store's newest (the store was reset) starts over.
TEST_CASE_TEMPLATE("last above the newest id counts as a first poll", F, STORE_FIXTURES) {
    F f;
    f.store.append(batch_of({{ch_a, 1}}));
    f.clock.advance(60s);
    f.store.append(batch_of({{ch_a, 2}, {ch_a, 3}}));
    CHECK(ids_of(f.store.poll({ch_a}, 99)) == std::vector<std::int64_t>{2, 3});
    auto r = f.store.fetch({ch_a}, 99);
    CHECK(r.horizon == 3);
}

// A limit returns the oldest rows first and a horizon that lets the next poll continue.
TEST_CASE_TEMPLATE("poll with a limit continues where it stopped", F, STORE_FIXTURES) {
    F f;
    for (int i = 0; i < 4; ++i) f.store.append(batch_of({{ch_a, i}, {ch_b, i}}));
    auto first = f.store.fetch({ch_a, ch_b}, 0, 3);
    CHECK(ids_of(first.notifications) == std::vector<std::int64_t>{1, 2, 3});
    CHECK(first.horizon == 3);
    auto second = f.store.fetch({ch_a, ch_b}, first.horizon, 3);
    CHECK(ids_of(second.notifications) == std::vector<std::int64_t>{4, 5, 6});
    auto third = f.store.fetch({ch_a, ch_b}, second.horizon, 3);
    CHECK(ids_of(third.notifications) == std::vector<std::int64_t>{7, 8});
    CHECK(third.horizon == 8);
}

// A byte cap ends a page with the row whose message reaches it (a lone larger row comes
// alone), so a catch-up reads what it can send, not everything stored.
TEST_CASE_TEMPLATE("poll with a byte cap continues where it stopped", F, STORE_FIXTURES) {
    F f;
    for (int i = 0; i < 4; ++i) f.store.append(batch_of({{ch_a, i}, {ch_b, i}}));
    const std::size_t one = f.store.poll({ch_a}, -1).at(0).message.size();  // every message has this size
    const std::size_t cap = 2 * one + 1;                                    // reached by the third row
    auto first = f.store.fetch({ch_a, ch_b}, -1, 0, cap);
    CHECK(ids_of(first.notifications) == std::vector<std::int64_t>{1, 2, 3});
    CHECK(first.horizon == 3);
    auto second = f.store.fetch({ch_a, ch_b}, first.horizon, 0, cap);
    CHECK(ids_of(second.notifications) == std::vector<std::int64_t>{4, 5, 6});
    auto third = f.store.fetch({ch_a, ch_b}, second.horizon, 0, cap);
    CHECK(ids_of(third.notifications) == std::vector<std::int64_t>{7, 8});  // under the cap: not cut
    CHECK(third.horizon == 8);

    auto lone = f.store.fetch({ch_b}, -1, 0, 1);
    CHECK(ids_of(lone.notifications) == std::vector<std::int64_t>{2});
    CHECK(lone.horizon == 2);
    auto both = f.store.fetch({ch_a, ch_b}, -1, 2, 100 * one);  // the row limit cuts first
    CHECK(ids_of(both.notifications) == std::vector<std::int64_t>{1, 2});
    CHECK(both.horizon == 2);
}

// Garbage collection removes what is older than the retention; "still exists" follows.
TEST_CASE_TEMPLATE("garbage collection and has_missed", F, STORE_FIXTURES) {
    F f;
    f.store.append(batch_of({{ch_a, 1}, {ch_b, 2}}));
    f.clock.advance(23h);
    f.store.append(batch_of({{ch_a, 3}}));
    CHECK(f.store.contains(1));
    CHECK_FALSE(f.store.has_missed(1));
    CHECK_FALSE(f.store.has_missed(0));
    f.clock.advance(1h + 1s);               // rows 1 and 2 are now older than 24 h
    CHECK(f.store.collect_garbage() <= 2);  // the memory store may already have dropped them
    CHECK(f.store.collect_garbage() == 0);
    CHECK_FALSE(f.store.contains(1));
    CHECK_FALSE(f.store.contains(2));
    CHECK(f.store.contains(3));
    CHECK(f.store.has_missed(2));
    CHECK(f.store.oldest_id() == 3);
    CHECK(f.store.newest_id() == 3);  // the newest id ever assigned survives GC
    CHECK(ids_of(f.store.poll({ch_a, ch_b}, 1)) == std::vector<std::int64_t>{3});
    f.clock.advance(24h);
    f.store.collect_garbage();
    CHECK(f.store.oldest_id() == 0);
    CHECK(f.store.newest_id() == 3);
    // ids are never reused after everything was collected
    CHECK(f.store.append(batch_of({{ch_a, 4}}))[0].id == 4);
}

// A client whose last row sits on a channel that has been quiet longer than the retention
// must not be told it missed notifications: only deleted rows of its own channels count.
TEST_CASE_TEMPLATE("lost_after counts only the rows of the client's own channels", F, STORE_FIXTURES) {
    F f;
    f.store.append(batch_of({{ch_a, 1}}));                              // id 1: the client's last row
    for (int i = 0; i < 5; ++i) f.store.append(batch_of({{ch_b, i}}));  // ids 2-6: a busy channel
    f.clock.advance(25h);
    const auto kept = f.store.append(batch_of({{ch_b, 9}}))[0].id;  // id 7
    f.store.collect_garbage();
    REQUIRE(f.store.oldest_id() == kept);
    CHECK_FALSE(f.store.lost_after({ch_a}, 1));  // a's rows after 1: none ever existed
    CHECK(f.store.lost_after({ch_a, ch_b}, 1));  // b's 2-6 are gone
    CHECK(f.store.lost_after({ch_b}, 5));        // 6 is gone
    CHECK_FALSE(f.store.lost_after({ch_b}, 6));  // everything of b after 6 is there
    CHECK_FALSE(f.store.lost_after({ch_c}, 1));
    CHECK_FALSE(f.store.lost_after({ch_a}, 0));   // a first poll misses nothing
    CHECK(f.store.lost_after({ch_a}, kept + 5));  // above the newest id: the store was reset

    // a's own row deleted unread
    f.store.append(batch_of({{ch_a, 2}}));  // id 8
    f.clock.advance(25h);
    f.store.collect_garbage();
    CHECK(f.store.lost_after({ch_a}, 1));
    CHECK_FALSE(f.store.lost_after({ch_a}, 8));
}

// docs/PROTOCOL.md §2 ("commit order"): 8 writers at once; a reader following with its cursor must end
// with every id, which it cannot if any id ever became visible below one it had already seen.
TEST_CASE_TEMPLATE("ids are visible in commit order under concurrent writers", F, STORE_FIXTURES) {
    F f;
    const std::vector<channel> channels{ch_a, ch_b, ch_c};
    constexpr int writers = 8, batches = 60;
    std::atomic<int> done{0};
    std::vector<std::vector<std::int64_t>> written(writers);
    std::vector<std::thread> threads;
    for (int w = 0; w < writers; ++w)
        threads.emplace_back([&, w] {
            std::mt19937 rng{static_cast<unsigned>(w)};
            for (int b = 0; b < batches; ++b) {
                auto batch = batch_of({{channels[rng() % 3], b}, {channels[rng() % 3], b}});
                for (const auto& n : f.store.append(std::move(batch))) written[std::size_t(w)].push_back(n.id);
            }
            ++done;
        });
    std::vector<std::int64_t> seen;
    std::int64_t cursor = 0;
    bool ordered = true;
    auto read = [&] {
        for (const auto& n : f.store.poll(channels, cursor)) {
            if (n.id <= cursor) ordered = false;
            cursor = n.id;
            seen.push_back(n.id);
        }
    };
    while (done < writers) read();
    for (auto& t : threads) t.join();
    read();
    CHECK(ordered);
    std::vector<std::int64_t> all;
    for (const auto& w : written) all.insert(all.end(), w.begin(), w.end());
    std::sort(all.begin(), all.end());
    CHECK(all.size() == std::size_t(writers * batches * 2));
    CHECK(seen == all);  // nothing skipped, nothing twice
}

// Polls from many threads while writing: the SQLite reader pool and the memory store's lock.
TEST_CASE_TEMPLATE("concurrent pollers see consistent snapshots", F, STORE_FIXTURES) {
    F f;
    std::atomic<bool> stop{false};
    std::atomic<int> bad{0};
    std::vector<std::thread> pollers;
    for (int p = 0; p < 3; ++p)
        pollers.emplace_back([&] {
            while (!stop) {
                auto r = f.store.fetch({ch_a, ch_b}, 0);
                // a batch always writes one row to each channel: a snapshot never splits it
                if (r.notifications.size() % 2 != 0) ++bad;
                for (std::size_t i = 1; i < r.notifications.size(); ++i)
                    if (r.notifications[i].id <= r.notifications[i - 1].id) ++bad;
            }
        });
    for (int i = 0; i < 200; ++i) f.store.append(batch_of({{ch_a, i}, {ch_b, i}}));
    stop = true;
    for (auto& t : pollers) t.join();
    CHECK(bad == 0);
    CHECK(f.store.poll({ch_a, ch_b}, 0).size() == 400);
}

// The memory store keeps itself bounded: expired rows go as new ones come.
TEST_CASE("memory store collects garbage as it appends and honours max_notifications") {
    imbus::manual_clock clock;
    imbus::memory_store_options o;
    o.clock = std::ref(clock);
    o.retention = 10s;
    o.max_notifications = 5;
    imbus::memory_store store(o);
    for (int i = 0; i < 8; ++i) store.append(batch_of({{ch_a, i}}));
    CHECK(store.size() == 5);
    CHECK(store.oldest_id() == 4);
    clock.advance(11s);
    store.append(batch_of({{ch_b, 9}}));
    CHECK(store.size() == 1);
    CHECK(store.oldest_id() == 9);
    CHECK(store.poll({ch_a}, 0).empty());
    CHECK(ids_of(store.poll({ch_b}, 0)) == std::vector<std::int64_t>{9});
}

// A clock stepping back must not break the first-poll window's ordering assumption.
TEST_CASE("memory store keeps created_at monotonic when the clock steps back") {
    imbus::manual_clock clock;
    imbus::memory_store_options o;
    o.clock = std::ref(clock);
    imbus::memory_store store(o);
    store.append(batch_of({{ch_a, 1}}));
    const auto first = clock();
    clock.advance(-5s);
    auto rows = store.append(batch_of({{ch_a, 2}}));
    CHECK(rows[0].created_at == first);
    CHECK(store.poll({ch_a}, 0).size() == 2);
}

// A file store survives a restart: rows are there and ids continue after the newest one.
TEST_CASE("sqlite store persists and continues ids across reopen") {
    temp_db file;
    imbus::manual_clock clock;
    imbus::sqlite_store_options o;
    o.clock = std::ref(clock);
    {
        imbus::sqlite_store store(file.path, o);
        store.append(batch_of({{ch_a, 1}, {ch_b, 2}}));
    }
    {
        imbus::sqlite_store store(file.path, o);
        CHECK(store.newest_id() == 2);
        CHECK(ids_of(store.poll({ch_a, ch_b}, 0)) == std::vector<std::int64_t>{1, 2});
        clock.advance(25h);
        CHECK(store.collect_garbage() == 2);
    }
    imbus::sqlite_store store(file.path, o);
    CHECK(store.oldest_id() == 0);
    CHECK(store.append(batch_of({{ch_a, 3}}))[0].id == 3);
}

// The schema matches the documented bus_bus table, and create_date is UTC microseconds.
TEST_CASE("sqlite bus_bus table layout") {
    imbus::manual_clock clock(imbus::time_point(std::chrono::seconds(1700000000)));
    imbus::sqlite_store_options o;
    o.clock = std::ref(clock);
    imbus::sqlite_store store(":memory:", o);
    store.append(batch_of({{ch_c, 7}}));
    sqlite3_stmt* st = nullptr;
    REQUIRE(sqlite3_prepare_v2(store.connection(), "SELECT id, channel, message, create_date FROM bus_bus", -1, &st,
                               nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(st) == SQLITE_ROW);
    CHECK(sqlite3_column_int64(st, 0) == 1);
    CHECK(std::string(reinterpret_cast<const char*>(sqlite3_column_text(st, 1))) == R"(["db","res.partner",3])");
    CHECK(std::string(reinterpret_cast<const char*>(sqlite3_column_text(st, 2))) == R"({"type":"t","payload":7})");
    CHECK(sqlite3_column_int64(st, 3) == 1700000000LL * 1000000);
    sqlite3_finalize(st);
}

// Garbage collection deletes in chunks, so big backlogs do not hold the write lock long.
TEST_CASE("sqlite garbage collection of more rows than one chunk") {
    imbus::manual_clock clock;
    imbus::sqlite_store_options o;
    o.clock = std::ref(clock);
    imbus::sqlite_store store(":memory:", o);
    std::vector<pending_message> big;
    for (int i = 0; i < IMBUS_SQLITE_GC_CHUNK * 2 + 10; ++i) big.push_back({ch_a, imbus::make_message("t", i)});
    store.append(std::move(big));
    clock.advance(25h);
    CHECK(store.collect_garbage() == std::size_t(IMBUS_SQLITE_GC_CHUNK * 2 + 10));
    CHECK(store.oldest_id() == 0);
}

// Opening a store on an unreachable path is a setup error with a clear message.
TEST_CASE("sqlite store reports a path it cannot open") {
    CHECK_THROWS_WITH_AS(imbus::sqlite_store("/nonexistent-dir/x/bus.db"),
                         doctest::Contains("cannot open /nonexistent-dir/x/bus.db"), std::system_error);
}
