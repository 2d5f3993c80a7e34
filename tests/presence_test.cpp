// Presence (imbus.hpp "Presence"): the transitions a presence_tracker publishes, driven by a
// manual clock (no sleeps), in one process and across two: two trackers on one memory store
// stand for two processes, and, when the PostgreSQL tests run, two buses on one database with
// a listener each, as two servers have.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define IMBUS_WITH_PRESENCE
#include "imbus.hpp"

#ifdef IMBUS_TEST_POSTGRES  // set by CMake when the PostgreSQL tests run
#include "support/pg_database.hpp"
#endif

#include <functional>
#include <memory>
#include <thread>

using namespace std::chrono_literals;
using imbus::presence_status;

namespace {

const imbus::channel presence_channel("db", "presence");

// Waits for a condition with a deadline: the trackers publish on their own threads.
bool wait_until(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(2ms);
    }
    return true;
}

imbus::presence_options options_with(imbus::manual_clock& clock) {
    imbus::presence_options o;
    o.clock = std::ref(clock);
    o.tick_every = 0ms;  // the test calls tick()
    return o;
}

// Two "processes" sharing one store and one dispatcher.
struct memory_fixture {
    imbus::manual_clock clock;
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus{store, dispatcher, {"db"}};
    imbus::bus& bus_a() { return bus; }
    imbus::bus& bus_b() { return bus; }
};

#ifdef IMBUS_TEST_POSTGRES
// One server process: its store, dispatcher, listener and bus, as examples/server builds them.
struct pg_process {
    explicit pg_process(const std::string& conninfo) : store(conninfo), bus(store, dispatcher, options()) {}
    static imbus::bus_options options() {
        imbus::bus_options o;
        o.db = "db";
        o.dispatch_on_commit = false;  // the listener dispatches every commit
        return o;
    }
    imbus::pg_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus;
    imbus::pg_listener listener{store, dispatcher};
};

struct pg_fixture {
    imbus::manual_clock clock;
    imbus_test::pg_test_database database;
    pg_process a{database.conninfo}, b{database.conninfo};
    imbus::store& store = a.store;
    imbus::bus& bus_a() { return a.bus; }
    imbus::bus& bus_b() { return b.bus; }
};
#define PRESENCE_FIXTURES memory_fixture, pg_fixture
#else
#define PRESENCE_FIXTURES memory_fixture
#endif

using published_list = std::vector<std::pair<std::string, std::string>>;

// The transitions on the presence channel, in id order.
published_list published(imbus::store& store) {
    published_list out;
    for (const auto& n : store.poll({presence_channel}, -1)) {
        CHECK(n.type() == "imbus/presence");
        out.emplace_back(n.payload().at("who").get<std::string>(), n.payload().at("status").get<std::string>());
    }
    return out;
}

// Waits until every tracker has read (and published for) every row of the internal channel.
void settle(imbus::store& store, std::initializer_list<const imbus::presence_tracker*> trackers) {
    const auto rows = store.poll({(*trackers.begin())->sync_channel()}, -1);
    const std::int64_t newest = rows.empty() ? 0 : rows.back().id;
    REQUIRE(wait_until([&] {
        for (auto* t : trackers)
            if (t->processed() < newest) return false;
        return true;
    }));
}

}  // namespace

TEST_CASE("open, idle, active, close: online, away, online, offline") {
    memory_fixture f;
    imbus::presence_tracker t(f.bus, presence_channel, options_with(f.clock));
    t.on_open("u");
    settle(f.store, {&t});
    CHECK(published(f.store) == published_list{{"u", "online"}});
    CHECK(t.status("u") == presence_status::online);

    f.clock.advance(29min);  // Odoo's default: away after 30 minutes
    t.tick();
    settle(f.store, {&t});
    CHECK(published(f.store).size() == 1);

    f.clock.advance(1min);
    t.tick();
    settle(f.store, {&t});
    CHECK(published(f.store) == published_list{{"u", "online"}, {"u", "away"}});
    CHECK(t.status("u") == presence_status::away);
    t.tick();  // still away: no transition, nothing published
    settle(f.store, {&t});
    CHECK(published(f.store).size() == 2);

    CHECK(t.on_event("u", "update_presence", {{"inactivity_period", 1000}}));
    settle(f.store, {&t});
    CHECK(published(f.store).back() == std::make_pair(std::string("u"), std::string("online")));
    CHECK(t.on_event("u", "update_presence", {{"inactivity_period", 2000}}));  // still online
    settle(f.store, {&t});
    CHECK(published(f.store).size() == 3);

    t.on_close("u");
    settle(f.store, {&t});
    CHECK(published(f.store) == published_list{{"u", "online"}, {"u", "away"}, {"u", "online"}, {"u", "offline"}});
    CHECK(t.status("u") == presence_status::offline);
    CHECK(t.local_size() == 0);
    CHECK(t.size() == 0);
}

TEST_CASE("two connections: offline only after both closed") {
    memory_fixture f;
    imbus::presence_tracker t(f.bus, presence_channel, options_with(f.clock));
    t.on_open("u");
    t.on_open("u");
    t.on_open("w");
    CHECK(t.local_size() == 2);  // the bound: identities with a connection
    t.on_close("u");
    settle(f.store, {&t});
    CHECK(published(f.store) == published_list{{"u", "online"}, {"w", "online"}});
    t.on_close("u");
    t.on_close("u");  // one close too many: ignored
    settle(f.store, {&t});
    CHECK(published(f.store) == published_list{{"u", "online"}, {"w", "online"}, {"u", "offline"}});
    CHECK(t.local_size() == 1);
}

TEST_CASE("update_presence: a report beyond away_after is away at once, other events are left alone") {
    memory_fixture f;
    auto options = options_with(f.clock);
    options.away_after = 10s;
    options.channel_of = [](const std::string& who) { return imbus::channel("db", "presence", who == "u" ? 1 : 2); };
    imbus::presence_tracker t(f.bus, options);
    t.on_open("u");
    CHECK(t.on_event("u", "update_presence", {{"inactivity_period", 10000}}));
    CHECK_FALSE(t.on_event("u", "subscribe", {}));
    CHECK(t.on_event("u", "update_presence", {{"inactivity_period", "soon"}}));  // malformed: ignored
    CHECK(t.on_event("nobody", "update_presence", {{"inactivity_period", 0}}));  // no connection: ignored
    settle(f.store, {&t});
    std::vector<std::string> statuses;
    for (const auto& n : f.store.poll({imbus::channel("db", "presence", 1)}, -1))
        statuses.push_back(n.payload().at("status").get<std::string>());
    CHECK(statuses == std::vector<std::string>{"online", "away"});
    CHECK(f.store.poll({imbus::channel("db", "presence", 2)}, -1).empty());
}

TEST_CASE_TEMPLATE("two processes: offline only after both closed, away only when idle on both", F, PRESENCE_FIXTURES) {
    F f;
    auto options = options_with(f.clock);
    options.away_after = 30s;  // within 3 * refresh: neither tracker expires while the clock jumps
    imbus::presence_tracker a(f.bus_a(), presence_channel, options);
    imbus::presence_tracker b(f.bus_b(), presence_channel, options);
    settle(f.store, {&a, &b});
    CHECK(a.trackers() == 2);
    CHECK(b.trackers() == 2);

    a.on_open("u");
    settle(f.store, {&a, &b});
    b.on_open("u");
    settle(f.store, {&a, &b});
    CHECK(published(f.store) == published_list{{"u", "online"}});
    CHECK(b.status("u") == presence_status::online);

    f.clock.advance(31s);
    a.tick();  // idle on A, but B has not said so yet: still online
    settle(f.store, {&a, &b});
    CHECK(published(f.store).size() == 1);
    b.tick();
    settle(f.store, {&a, &b});
    CHECK(published(f.store) == published_list{{"u", "online"}, {"u", "away"}});
    a.update("u", 0ms);  // active on A again
    settle(f.store, {&a, &b});
    CHECK(published(f.store) == published_list{{"u", "online"}, {"u", "away"}, {"u", "online"}});

    a.on_close("u");
    settle(f.store, {&a, &b});
    // B still holds a connection, idle there: away, not offline
    CHECK(published(f.store) == published_list{{"u", "online"}, {"u", "away"}, {"u", "online"}, {"u", "away"}});
    CHECK(b.status("u") == presence_status::away);
    b.on_close("u");
    settle(f.store, {&a, &b});
    CHECK(published(f.store) ==
          published_list{{"u", "online"}, {"u", "away"}, {"u", "online"}, {"u", "away"}, {"u", "offline"}});
    CHECK(a.size() == 0);
    CHECK(b.size() == 0);
}

TEST_CASE_TEMPLATE("a crashed process's contribution expires and a new process learns the others'", F,
                   PRESENCE_FIXTURES) {
    F f;
    imbus::presence_tracker a(f.bus_a(), presence_channel, options_with(f.clock));  // refresh 15 s
    auto b = std::make_unique<imbus::presence_tracker>(f.bus_b(), presence_channel, options_with(f.clock));
    b->on_open("v");
    settle(f.store, {&a, b.get()});  // each process publishes its own: one at a time keeps the order
    a.on_open("w");
    settle(f.store, {&a, b.get()});
    CHECK(published(f.store) == published_list{{"v", "online"}, {"w", "online"}});

    b.reset();  // B dies without closing its connections
    f.clock.advance(44s);
    a.tick();  // B's contribution is still within 3 * refresh
    settle(f.store, {&a});
    CHECK(a.status("v") == presence_status::online);
    CHECK(a.trackers() == 2);
    f.clock.advance(2s);
    a.tick();  // now it is not: A withdraws it, and publishes what follows
    settle(f.store, {&a});
    CHECK(published(f.store) == published_list{{"v", "online"}, {"w", "online"}, {"v", "offline"}});
    CHECK(a.trackers() == 1);
    a.tick();  // withdrawn once
    settle(f.store, {&a});
    CHECK(published(f.store).size() == 3);

    // A new process reads A's contribution from the store: w stays online until both closed.
    imbus::presence_tracker c(f.bus_b(), presence_channel, options_with(f.clock));
    settle(f.store, {&a, &c});
    CHECK(c.status("w") == presence_status::online);
    c.on_open("w");
    a.on_close("w");
    settle(f.store, {&a, &c});
    CHECK(published(f.store).size() == 3);
    c.on_close("w");
    settle(f.store, {&a, &c});
    CHECK(published(f.store) == published_list{{"v", "online"}, {"w", "online"}, {"v", "offline"}, {"w", "offline"}});
}
