// Delivery through a real server over real sockets (127.0.0.1, port 0): catch-up by last id,
// no gap and no duplicate under concurrent commits and resubscribes, channel filtering,
// fan-out, frame shape, slow consumers, the missed-notifications signal, the HTTP routes,
// graceful stop and client reconnects. Store-dependent cases run on memory_store and on
// sqlite_store (a temporary file).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"
#include "support/faulty_store.hpp"
#include "support/raw_socket.hpp"
#include "support/store_helpers.hpp"
#include "support/test_helpers.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using imbus::channel;
using imbus::json;
using imbus_test::ids_of;
using imbus_test::log_capture;
using imbus_test::quiet;
using imbus_test::raw_ws;
using imbus_test::temp_db;
using imbus_test::wait_until;
using ms = std::chrono::milliseconds;
using steady = std::chrono::steady_clock;

namespace {

// --- environment ----------------------------------------------------------------------------

struct store_config {
    std::chrono::seconds retention{86400};
    std::size_t max_notifications = 0;                    // memory_store only
    std::size_t max_pending = IMBUS_MAX_PENDING_WAKEUPS;  // the dispatcher's
};

// Both stores read a manual clock that tests move by hand (it never moves by itself, so a
// first poll with last == 0 sees every row unless the test advanced the clock).
struct memory_env {
    imbus::manual_clock clock;
    imbus::memory_store store;
    explicit memory_env(store_config c) : store(options(clock, c)) {}
    static imbus::memory_store_options options(imbus::manual_clock& clock, store_config c) {
        imbus::memory_store_options o;
        o.clock = std::ref(clock);
        o.retention = c.retention;
        o.max_notifications = c.max_notifications;
        o.log = quiet();
        return o;
    }
};

struct sqlite_env {
    imbus::manual_clock clock;
    temp_db file;
    imbus::sqlite_store store;
    explicit sqlite_env(store_config c) : store(file.path, options(clock, c)) {}
    static imbus::sqlite_store_options options(imbus::manual_clock& clock, store_config c) {
        imbus::sqlite_store_options o;
        o.clock = std::ref(clock);
        o.retention = c.retention;
        o.log = quiet();
        return o;
    }
};

imbus::dispatcher_options quiet_dispatcher(std::size_t max_pending) {
    imbus::dispatcher_options o;
    o.max_pending = max_pending;
    o.log = quiet();
    return o;
}

imbus::bus_options bus_options() {
    imbus::bus_options o;
    o.db = "db";
    o.log = quiet();
    return o;
}

// A store, a dispatcher, a bus on database "db" and (once started) a server on it.
template <class Env> struct harness {
    Env env;
    log_capture logs;
    imbus::dispatcher dispatcher;
    imbus::bus bus{env.store, dispatcher, bus_options()};
    std::unique_ptr<imbus::server> server;

    explicit harness(store_config c = {}) : env(c), dispatcher(quiet_dispatcher(c.max_pending)) {}

    imbus::server_options options() {
        imbus::server_options o;
        o.threads = 1;
        o.log = logs.logger();
        o.rate_burst = 1000;  // delivery tests resubscribe freely
        o.close_handshake_timeout = 1000ms;
        o.gc_interval = std::chrono::seconds(0);
        return o;
    }

    imbus::server& start(imbus::server_options o, imbus::public_policy policy = imbus::public_policy(),
                         imbus::http_route route = {}, std::uint16_t port = 0) {
        server = std::make_unique<imbus::server>(bus, std::move(policy), std::move(o));
        if (route) server->on_http(std::move(route));
        server->listen("127.0.0.1", port);
        server->start();
        return *server;
    }
    imbus::server& start() { return start(options()); }

    std::uint16_t port() const { return server->port(); }
    std::string url() const { return "ws://127.0.0.1:" + std::to_string(port()) + "/websocket"; }

    // One notification in its own transaction; type "test/<channel>", payload {"i": i}.
    std::int64_t send(const std::string& name, int i) {
        const auto ids = bus.send(name, "test/" + name, json{{"i", i}});
        REQUIRE(ids.size() == 1);
        return ids[0];
    }

    // The ids the store holds on these string channels after `last` (0: the first-poll window).
    std::vector<std::int64_t> stored(const std::vector<std::string>& names, std::int64_t last = 0) {
        std::vector<channel> channels;
        for (const auto& n : names) channels.emplace_back("db", n);
        std::vector<std::int64_t> ids;
        for (const auto& n : env.store.poll(channels, last)) ids.push_back(n.id);
        return ids;
    }

    bool wait_subscribers(const std::string& name, std::size_t count) {
        const channel c("db", name);
        return wait_until([&] { return dispatcher.subscribers_of(c) >= count; });
    }
};

// --- clients --------------------------------------------------------------------------------

std::unique_ptr<imbus::client> connect_client(const std::string& url, bool reconnect = false,
                                              ms reconnect_delay = 1000ms) {
    imbus::client_options o;
    o.reconnect = reconnect;
    o.reconnect_delay = reconnect_delay;
    o.log = quiet();
    auto c = std::make_unique<imbus::client>(o);
    c->connect(url);
    return c;
}

// A client that does not reconnect and logs nothing, with `tweak` applied to its options.
imbus::client_options quiet_client(void (*tweak)(imbus::client_options&)) {
    imbus::client_options o;
    o.reconnect = false;
    o.log = quiet();
    tweak(o);
    return o;
}

std::int64_t max_id(const std::vector<json>& notifications) {
    std::int64_t m = 0;
    for (const auto& n : notifications) m = std::max(m, n.at("id").get<std::int64_t>());
    return m;
}

// Takes what `c` receives into `into` until an id >= `until` arrived; false at the deadline.
bool collect_until(imbus::client& c, std::vector<json>& into, std::int64_t until, ms timeout = 5000ms) {
    const auto deadline = steady::now() + timeout;
    while (max_id(into) < until) {
        const auto now = steady::now();
        if (now >= deadline) return false;
        auto got = c.take(1, std::chrono::duration_cast<ms>(deadline - now) + 1ms);
        into.insert(into.end(), got.begin(), got.end());
        auto rest = c.take(std::numeric_limits<std::size_t>::max(), 0ms);
        into.insert(into.end(), rest.begin(), rest.end());
    }
    return true;
}

// Takes from `c` into `into` until a notification of `type` is among them.
bool collect_until_type(imbus::client& c, std::vector<json>& into, const std::string& type, ms timeout = 5000ms) {
    const auto deadline = steady::now() + timeout;
    auto seen = [&] {
        return std::any_of(into.begin(), into.end(), [&](const json& n) { return n["message"]["type"] == type; });
    };
    while (!seen()) {
        const auto now = steady::now();
        if (now >= deadline) return false;
        auto got = c.take(1, std::chrono::duration_cast<ms>(deadline - now) + 1ms);
        into.insert(into.end(), got.begin(), got.end());
    }
    return true;
}

// Nothing more arrives within a short while (proving a negative: the one fixed wait allowed).
bool nothing_more(imbus::client& c, ms wait = 200ms) { return c.take(1, wait).empty(); }

bool strictly_ascending(const std::vector<std::int64_t>& ids) {
    for (std::size_t i = 1; i < ids.size(); ++i)
        if (ids[i] <= ids[i - 1]) return false;
    return true;
}

std::string subscribe_text(const std::vector<std::string>& channels, std::int64_t last) {
    return json{{"event_name", "subscribe"}, {"data", {{"channels", channels}, {"last", last}}}}.dump();
}

// Checks one server frame: a non-empty JSON array of {"id", "message": {"type", "payload"}},
// ascending ids. Returns the ids.
std::vector<std::int64_t> check_frame(const json& frame) {
    REQUIRE_MESSAGE(frame.is_array(), frame.dump().substr(0, 200));
    CHECK_FALSE(frame.empty());
    std::vector<std::int64_t> ids;
    bool shaped = true;
    for (const auto& n : frame) {
        shaped = shaped && n.is_object() && n.size() == 2 && n.contains("id") && n["id"].is_number_integer() &&
                 n.contains("message") && n["message"].is_object() && n["message"].size() == 2 &&
                 n["message"].contains("type") && n["message"]["type"].is_string() && n["message"].contains("payload");
        if (!shaped) break;
        ids.push_back(n["id"].get<std::int64_t>());
    }
    CHECK_MESSAGE(shaped, frame.dump().substr(0, 200));
    CHECK(strictly_ascending(ids));
    return ids;
}
std::vector<std::int64_t> check_frame(const std::string& text) { return check_frame(json::parse(text)); }

// Reads frames until one carries an id >= `until`; returns all of them, parsed.
std::vector<json> read_frames_until(raw_ws& ws, std::int64_t until, ms timeout = 5000ms) {
    const auto deadline = steady::now() + timeout;
    std::vector<json> frames;
    std::int64_t seen = 0;
    while (seen < until) {
        const auto left = std::chrono::duration_cast<ms>(deadline - steady::now());
        REQUIRE_MESSAGE(left.count() > 0, "no frame with id " << until << " in time; last id seen " << seen);
        frames.push_back(json::parse(ws.read_text(left), nullptr, false));
        REQUIRE(frames.back().is_array());
        for (const auto& n : frames.back()) seen = std::max(seen, n.at("id").get<std::int64_t>());
    }
    return frames;
}

std::vector<std::int64_t> filter(const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& among) {
    std::vector<std::int64_t> out;
    for (auto id : ids)
        if (std::binary_search(among.begin(), among.end(), id)) out.push_back(id);
    return out;
}

// A writer waits at each of its milestones until the test releases it.
class gate {
public:
    void release() {
        std::lock_guard<std::mutex> lock(mutex_);
        ++released_;
        changed_.notify_all();
    }
    void wait_for(int count) {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return released_ >= count; });
    }
    void open_all() {
        std::lock_guard<std::mutex> lock(mutex_);
        released_ = std::numeric_limits<int>::max() / 2;
        changed_.notify_all();
    }

private:
    std::mutex mutex_;
    std::condition_variable changed_;
    int released_ = 0;
};

}  // namespace

namespace doctest {
template <> struct StringMaker<std::vector<std::int64_t>> {
    static String convert(const std::vector<std::int64_t>& ids) {
        std::string out = "[";
        for (std::size_t i = 0; i < ids.size(); ++i) {
            if (i == 40 && ids.size() > 50) {  // long lists: the head and the tail
                out += " ...";
                i = ids.size() - 5;
            }
            out += (i ? " " : "") + std::to_string(ids[i]);
        }
        return (out + "] (" + std::to_string(ids.size()) + " ids)").c_str();
    }
};
}  // namespace doctest

#define STORES memory_env, sqlite_env

// --- catch-up --------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("catch-up: rows stored before connecting arrive after subscribe with last, none at or below it", Env,
                   STORES) {
    harness<Env> h;
    std::vector<std::int64_t> a_ids;
    std::map<std::int64_t, int> payload_of;
    for (int i = 0; i < 12; ++i) {
        const bool on_a = i % 3 != 0;
        const auto id = h.send(on_a ? "a" : "b", i);
        if (on_a) a_ids.push_back(id);
        payload_of[id] = i;
    }
    h.start();
    const std::int64_t last = a_ids[3];
    const std::vector<std::int64_t> expected(a_ids.begin() + 4, a_ids.end());
    REQUIRE(h.stored({"a"}, last) == expected);

    auto c = connect_client(h.url());
    c->subscribe({"a"}, last);
    const std::vector<json> got = c->take(expected.size(), 5s);
    CHECK(ids_of(got) == expected);
    for (const auto& n : got) {
        CHECK(n["message"]["type"] == "test/a");
        CHECK(n["message"]["payload"] == json{{"i", payload_of[n["id"].get<std::int64_t>()]}});
    }
    CHECK(nothing_more(*c));
    CHECK(c->last_id() == expected.back());

    // Then live rows follow, still only of channel a.
    h.send("b", 100);
    const auto live = h.send("a", 101);
    CHECK(ids_of(c->take(1, 5s)) == std::vector<std::int64_t>{live});
    CHECK(nothing_more(*c));

    SUBCASE("last at the newest id: nothing until something new") {
        auto d = connect_client(h.url());
        d->subscribe({"a", "b"}, h.env.store.newest_id());
        CHECK(nothing_more(*d));
        const auto next = h.send("b", 102);
        CHECK(ids_of(d->take(1, 5s)) == std::vector<std::int64_t>{next});
    }
}

TEST_CASE_TEMPLATE("catch-up: a first subscribe with last 0 gets the first-poll window only", Env, STORES) {
    harness<Env> h;
    for (int i = 0; i < 3; ++i) h.send("a", i);
    h.env.clock.advance(51s);  // those three are now older than the 50 s window
    std::vector<std::int64_t> recent{h.send("a", 3), h.send("b", 4), h.send("a", 5)};
    h.start();
    auto c = connect_client(h.url());
    c->subscribe({"a", "b"}, 0);
    CHECK(ids_of(c->take(3, 5s)) == recent);
    CHECK(nothing_more(*c));
}

// --- no gap, no duplicate ---------------------------------------------------------------------

TEST_CASE_TEMPLATE("no duplicate and no gap while notifications commit during subscribes and resubscribes", Env,
                   STORES) {
    harness<Env> h;
    auto o = h.options();
    o.threads = 2;
    h.start(o);

    constexpr int total = 2000;
    const std::vector<int> milestones{150, 400, 650, 900, 1150, 1400, 1650};
    gate writer_gate;
    std::thread writer([&] {
        std::mt19937 rng(20240611);
        std::size_t next = 0;
        int i = 0;
        while (i < total) {
            while (next < milestones.size() && i >= milestones[next]) writer_gate.wait_for(int(++next));
            const unsigned r = rng() % 16;
            if (r == 0) {  // one commit on two channels, shared in part by most clients
                imbus::transaction tx(h.bus);
                tx.send("a", "test/a", json{{"i", i}});
                tx.send("c", "test/c", json{{"i", i + 1}});
                tx.send("a", "test/a", json{{"i", i + 2}});
                tx.commit();
                i += 3;
            } else if (r == 1) {
                imbus::transaction tx(h.bus);
                tx.send("b", "test/b", json{{"i", i}});
                tx.send("c", "test/c", json{{"i", i + 1}});
                tx.commit();
                i += 2;
            } else {
                const char* names[] = {"a", "b", "c"};
                h.send(names[r % 3], i);
                ++i;
            }
        }
    });
    struct finish_writer {  // also when an assertion below throws: never leave it waiting
        gate& g;
        std::thread& t;
        ~finish_writer() {
            g.open_all();
            if (t.joinable()) t.join();
        }
    } finish{writer_gate, writer};

    // Each step subscribes while the writer is held, then lets it go on at once, so the
    // server handles the subscribe while commits land.
    auto c1 = connect_client(h.url());
    c1->subscribe({"a"}, 0);
    writer_gate.release();
    auto c2 = connect_client(h.url());
    c2->subscribe({"b", "c"}, 0);
    writer_gate.release();
    auto c3 = connect_client(h.url());
    c3->subscribe({"a"}, 0);
    writer_gate.release();
    auto c4 = connect_client(h.url());
    auto c5 = connect_client(h.url());
    c4->subscribe({"a", "b", "c"}, 0);
    c5->subscribe({"a", "b"}, 0);
    writer_gate.release();
    // c5 drops b below. A subscribe's history is sent in a later turn of the server's loop,
    // so without this wait both subscribes could be handled first and c5 never get a b row.
    std::vector<json> r1, r2, r3, r4, r5;
    REQUIRE(collect_until_type(*c5, r5, "test/b"));
    c3->subscribe({"a", "b", "c"});  // adds b and c: from the server's cursor on
    c4->subscribe({"c", "b", "a"});  // the same set again
    writer_gate.release();
    c4->subscribe({"b", "a", "c"});
    c5->subscribe({"a"});  // drops b
    writer_gate.release();
    c4->subscribe({"a", "b", "c"});
    writer_gate.release();
    writer.join();
    // The subscribes are asynchronous: a slow server (sanitizers) may handle c3's second one
    // after the last commit. One more b row after everything is one it must get either way.
    h.send("b", total);

    const auto all_a = h.stored({"a"});
    const auto all_b = h.stored({"b"});
    const auto all_bc = h.stored({"b", "c"});
    const auto all_abc = h.stored({"a", "b", "c"});
    REQUIRE(all_abc.size() >= std::size_t(total));
    REQUIRE(all_abc.size() == all_a.size() + all_bc.size());

    CHECK(collect_until(*c1, r1, all_a.back()));
    CHECK(collect_until(*c2, r2, all_bc.back()));
    CHECK(collect_until(*c3, r3, all_abc.back()));
    CHECK(collect_until(*c4, r4, all_abc.back()));
    CHECK(collect_until(*c5, r5, all_a.back()));
    std::this_thread::sleep_for(200ms);  // then nothing more arrives
    for (auto* c : {c1.get(), c2.get(), c3.get(), c4.get(), c5.get()})
        CHECK(c->take(std::numeric_limits<std::size_t>::max(), 0ms).empty());

    CHECK(ids_of(r1) == all_a);
    CHECK(ids_of(r2) == all_bc);
    CHECK(ids_of(r4) == all_abc);

    // c3: all of a; b and c from some point on, without a hole after it.
    const auto ids3 = ids_of(r3);
    CHECK(strictly_ascending(ids3));
    CHECK(filter(ids3, all_abc) == ids3);
    CHECK(filter(ids3, all_a) == all_a);
    const auto bc3 = filter(ids3, all_bc);
    REQUIRE_FALSE(bc3.empty());
    CHECK(bc3 == std::vector<std::int64_t>(std::lower_bound(all_bc.begin(), all_bc.end(), bc3.front()), all_bc.end()));
    CHECK(bc3.size() < all_bc.size());  // it did join late

    // c5: all of a; b up to some point, without a hole before it; never c.
    const auto ids5 = ids_of(r5);
    CHECK(strictly_ascending(ids5));
    CHECK(filter(ids5, all_a) == all_a);
    const auto b5 = filter(ids5, all_b);
    REQUIRE_FALSE(b5.empty());
    CHECK(b5 == std::vector<std::int64_t>(all_b.begin(), std::upper_bound(all_b.begin(), all_b.end(), b5.back())));
    CHECK(b5.size() < all_b.size());
    CHECK(ids5.size() == all_a.size() + b5.size());
}

// --- channels ----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("many channels: a client on A gets exactly A's rows while B and C commits interleave", Env, STORES) {
    harness<Env> h;
    h.start();
    auto on_a = connect_client(h.url());
    auto on_bc = connect_client(h.url());
    on_a->subscribe({"A"}, 0);
    on_bc->subscribe({"B", "C"}, 0);
    REQUIRE(h.wait_subscribers("A", 1));
    REQUIRE(h.wait_subscribers("C", 1));

    for (int i = 0; i < 300; ++i) {
        switch (i % 6) {
        case 0: h.send("A", i); break;
        case 1: h.send("B", i); break;
        case 2: h.send("C", i); break;
        case 3: {  // one commit touching A and B: A's client takes its part only
            imbus::transaction tx(h.bus);
            tx.send("B", "test/B", json{{"i", i}});
            tx.send("A", "test/A", json{{"i", i}});
            tx.send("C", "test/C", json{{"i", i}});
            tx.commit();
            break;
        }
        case 4: {  // a commit without A at all
            imbus::transaction tx(h.bus);
            tx.send("B", "test/B", json{{"i", i}});
            tx.send("C", "test/C", json{{"i", i}});
            tx.commit();
            break;
        }
        default: h.send("other", i);
        }
    }
    const auto a_ids = h.stored({"A"});
    const auto bc_ids = h.stored({"B", "C"});
    REQUIRE(a_ids.size() == 100);

    std::vector<json> got_a, got_bc;
    CHECK(collect_until(*on_a, got_a, a_ids.back()));
    CHECK(collect_until(*on_bc, got_bc, bc_ids.back()));
    CHECK(nothing_more(*on_a));
    CHECK(nothing_more(*on_bc, 10ms));
    CHECK(ids_of(got_a) == a_ids);
    CHECK(ids_of(got_bc) == bc_ids);
    for (const auto& n : got_a) CHECK(n["message"]["type"] == "test/A");
    for (const auto& n : got_bc) CHECK(n["message"]["type"] != "test/A");
}

// --- fan-out ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("fan-out: 50 clients on one channel each get all 200 sends in order, and whole transactions", Env,
                   STORES) {
    harness<Env> h;
    auto o = h.options();
    SUBCASE("two shards: each with its own loop, listener and connections") { o.threads = 2; }
    SUBCASE("one shard: wake-ups served 3 connections per turn of the loop") {
        o.threads = 1;
        o.delivery_slice = 3;
    }
    h.start(o);
    constexpr std::size_t clients = 50;
    std::vector<std::unique_ptr<imbus::client>> c;
    for (std::size_t i = 0; i < clients; ++i) {
        c.push_back(connect_client(h.url()));
        // Half of them also listen to "side", the second channel of the transactions below.
        if (i % 2) c.back()->subscribe({"fan", "side"}, 0);
        else c.back()->subscribe({"fan"}, 0);
    }
    REQUIRE(h.wait_subscribers("fan", clients));
    REQUIRE(h.wait_subscribers("side", clients / 2));

    std::vector<std::int64_t> sent;
    for (int i = 0; i < 200; ++i) sent.push_back(h.send("fan", i));
    for (std::size_t i = 0; i < clients; ++i) {
        CAPTURE(i);
        auto got = c[i]->take(200, 5s);
        CHECK(ids_of(got) == sent);
        bool payloads_in_order = true;
        for (std::size_t k = 0; k < got.size(); ++k)
            payloads_in_order = payloads_in_order && got[k]["message"]["payload"]["i"] == int(k);
        CHECK(payloads_in_order);
    }

    // Transactions with 3 sends on 2 channels: complete and ascending for clients of both,
    // the "fan" part for the others.
    std::vector<std::int64_t> both, fan_only;
    for (int t = 0; t < 5; ++t) {
        imbus::transaction tx(h.bus);
        tx.send("fan", "test/fan", json{{"t", t}});
        tx.send("side", "test/side", json{{"t", t}});
        tx.send("fan", "test/fan", json{{"t", t}});
        const auto ids = tx.commit();
        REQUIRE(ids.size() == 3);
        CHECK(ids[1] == ids[0] + 1);
        CHECK(ids[2] == ids[1] + 1);
        both.insert(both.end(), ids.begin(), ids.end());
        fan_only.push_back(ids[0]);
        fan_only.push_back(ids[2]);
    }
    for (std::size_t i = 0; i < clients; ++i) {
        CAPTURE(i);
        const auto& expected = i % 2 ? both : fan_only;
        CHECK(ids_of(c[i]->take(expected.size(), 5s)) == expected);
    }
    std::this_thread::sleep_for(200ms);  // a negative: nothing more arrives (no event to wait for)
    for (std::size_t i = 0; i < clients; ++i) CHECK(c[i]->take(1, 0ms).empty());
}

// --- frames ----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("frames are non-empty ascending JSON arrays and a commit of the connection's rows is one frame", Env,
                   STORES) {
    harness<Env> h;
    std::vector<std::int64_t> before;
    for (int i = 0; i < 5; ++i) before.push_back(h.send("a", i));  // ids 1..5
    for (int i = 0; i < 2; ++i) before.push_back(h.send("b", i));  // ids 6..7
    auto o = h.options();
    o.catch_up_rows = 4;  // a catch-up comes in frames of at most 4 rows
    h.start(o);

    auto ws = raw_ws::connect(h.port());
    ws.send_text(subscribe_text({"a", "b"}, 2));
    const std::vector<std::int64_t> expected(before.begin() + 2, before.end());  // 3..7
    std::vector<std::int64_t> caught;
    for (const auto& frame : read_frames_until(ws, expected.back())) {
        const auto ids = check_frame(frame);
        CHECK(ids.size() <= 4);
        caught.insert(caught.end(), ids.begin(), ids.end());
    }
    CHECK(caught == expected);
    REQUIRE(h.wait_subscribers("b", 1));

    // A transaction whose rows all concern the connection: one frame, exactly its rows.
    {
        imbus::transaction tx(h.bus);
        tx.send("a", "test/a", json{{"k", 1}});
        tx.send("b", "test/b", json{{"k", 2}});
        tx.send("a", "test/a", json{{"k", 3}});
        const auto ids = tx.commit();
        const std::string text = ws.read_text();
        CHECK(check_frame(text) == ids);
        const json frame = json::parse(text);
        CHECK(frame[1]["message"] == json{{"type", "test/b"}, {"payload", {{"k", 2}}}});
    }
    // A single send: a frame of one.
    {
        const auto id = h.send("b", 9);
        const std::string text = ws.read_text();
        CHECK(check_frame(text) == std::vector<std::int64_t>{id});
        CHECK(json::parse(text)[0] == json{{"id", id}, {"message", {{"type", "test/b"}, {"payload", {{"i", 9}}}}}});
    }
    // A transaction partly on another channel: only this connection's rows.
    {
        imbus::transaction tx(h.bus);
        tx.send("a", "test/a", json{{"k", 4}});
        tx.send("zzz", "test/zzz", json{{"k", 5}});
        tx.send("a", "test/a", json{{"k", 6}});
        const auto ids = tx.commit();
        CHECK(check_frame(ws.read_text()) == std::vector<std::int64_t>{ids[0], ids[2]});
    }
    // A burst from another thread: whatever the framing, ascending across frames, nothing twice.
    std::vector<std::int64_t> burst;
    std::thread writer([&] {
        for (int i = 0; i < 200; ++i) {
            const auto id = h.send(i % 3 == 0 ? "zzz" : (i % 3 == 1 ? "a" : "b"), i);
            if (i % 3 != 0) burst.push_back(id);
        }
    });
    writer.join();
    std::vector<std::int64_t> got;
    for (const auto& frame : read_frames_until(ws, burst.back())) {
        const auto ids = check_frame(frame);
        got.insert(got.end(), ids.begin(), ids.end());
    }
    CHECK(got == burst);
    ws.close();
}

// --- slow consumers --------------------------------------------------------------------------

TEST_CASE_TEMPLATE("slow consumer: a client that does not read is caught up from the store, nothing lost or twice", Env,
                   STORES) {
    harness<Env> h;
    auto o = h.options();
    o.max_outbound_bytes = 64 * 1024;
    o.catch_up_rows = 200;
    h.start(o);

    auto slow = raw_ws::connect(h.port());
    slow.send_text(subscribe_text({"bulk"}, 0));
    auto normal = connect_client(h.url());
    normal->subscribe({"bulk"}, 0);
    REQUIRE(h.wait_subscribers("bulk", 2));

    // About 8 MB, well past the ~4 MB that loopback socket buffers take from a reader that
    // stopped. Paced by the normal client, so that every commit is its own wake-up.
    const std::string filler(25000, 'x');
    constexpr int count = 320;
    std::vector<std::int64_t> sent;
    std::vector<json> normal_got;
    for (int i = 0; i < count; ++i) {
        sent.push_back(h.bus.send("bulk", "test/bulk", json{{"i", i}, {"pad", filler}})[0]);
        auto got = normal->take(1, 5s);
        normal_got.insert(normal_got.end(), got.begin(), got.end());
        if (got.empty()) break;
    }
    CHECK(ids_of(normal_got) == sent);
    CHECK(wait_until([&] { return h.logs.contains("is slow"); }));

    // Now the slow client reads: every id once, ascending, and no missed marker.
    std::vector<std::int64_t> got;
    bool marker = false;
    for (const auto& frame : read_frames_until(slow, sent.back(), 10000ms)) {
        for (const auto& n : frame) marker = marker || n["message"]["type"] == "bus/missed_notifications";
        const auto ids = check_frame(frame);
        got.insert(got.end(), ids.begin(), ids.end());
    }
    CHECK_FALSE(marker);
    CHECK(got.size() == sent.size());
    CHECK(got == sent);

    // Caught up, it is live again.
    const auto next = h.send("bulk", -1);
    CHECK(check_frame(slow.read_text()) == std::vector<std::int64_t>{next});
    CHECK(ids_of(normal->take(1, 5s)) == std::vector<std::int64_t>{next});
    slow.close();
}

// Holds the server's only I/O thread inside an HTTP route until released, so that wake-ups
// pile up for a connection exactly as they do behind a busy thread.
class io_pause {
public:
    imbus::http_route route() {
        return [this](const imbus::http_request& r, imbus::http_response& out) {
            if (r.path != "/pause") return false;
            entered_ = true;
            gate_.wait_for(1);
            out.status = 200;
            return true;
        };
    }
    // Sends the request from a helper thread and waits until the route holds the thread.
    bool hold(std::uint16_t port) {
        thread_ = std::thread([port] {
            try {
                imbus_test::http_request(port, "GET", "/pause", "", {}, 20s);
            } catch (const std::exception&) {}
        });
        return wait_until([&] { return entered_.load(); });
    }
    void release() {
        if (released_) return;
        released_ = true;
        gate_.release();
    }
    ~io_pause() {
        release();
        if (thread_.joinable()) thread_.join();
    }

private:
    gate gate_;
    std::atomic<bool> entered_{false};
    bool released_ = false;
    std::thread thread_;
};

// The outbound bound must hold per frame, not per wake-up: one wake-up may carry up to
// dispatcher max_pending commits. Here 700 commits of 16 KB reach a client that reads
// nothing in one wake-up; max_outbound_bytes is 64 KiB and the store keeps only the newest
// 100 rows. A server that stops queueing past the bound (plus the ~4 MB the kernel buffers)
// must tell the client it missed rows (they are gone from the store); one that queued all
// 11 MB delivers every row and no marker.
TEST_CASE("slow consumer: the outbound bound holds within one wake-up and rows collected meanwhile give the marker") {
    harness<memory_env> h(store_config{std::chrono::seconds(86400), 100});
    auto o = h.options();
    o.threads = 1;
    o.max_outbound_bytes = 64 * 1024;
    o.catch_up_rows = 50;
    io_pause pause;
    h.start(o, imbus::public_policy(), pause.route());

    auto slow = raw_ws::connect(h.port());
    slow.send_text(subscribe_text({"bulk"}, 0));
    REQUIRE(h.wait_subscribers("bulk", 1));
    REQUIRE(pause.hold(h.port()));

    const std::string filler(16000, 'x');
    std::int64_t newest = 0;
    for (int i = 0; i < 700; ++i) newest = h.bus.send("bulk", "test/bulk", json{{"i", i}, {"pad", filler}})[0];
    REQUIRE(h.env.store.size() == 100);  // the store kept only the newest 100
    const std::int64_t oldest = h.env.store.oldest_id();
    pause.release();

    std::vector<std::int64_t> got;
    std::vector<std::int64_t> markers;
    for (const auto& frame : read_frames_until(slow, newest, 10000ms)) {
        for (const auto& n : frame) {
            if (n["message"]["type"] == "bus/missed_notifications") {
                CHECK(n["message"]["payload"] == json{{"last", n["id"]}});
                markers.push_back(n["id"].get<std::int64_t>());
            } else {
                got.push_back(n["id"].get<std::int64_t>());
            }
        }
    }
    CHECK(strictly_ascending(got));
    const auto split = std::upper_bound(got.begin(), got.end(), markers.empty() ? newest : markers[0]);
    const std::size_t before_marker = std::size_t(split - got.begin());
    INFO("rows delivered before any marker: " << before_marker << " (" << before_marker * 16
                                              << " KB; the store "
                                                 "no longer held ids below "
                                              << oldest << ")");
    REQUIRE(markers.size() == 1);
    // Before the marker: a gap-free prefix from id 1; after it: what the store still held.
    for (std::size_t i = 0; i < before_marker; ++i) CHECK(got[i] == std::int64_t(i) + 1);
    CHECK(std::int64_t(before_marker) == markers[0]);
    std::vector<std::int64_t> rest(split, got.end());
    REQUIRE_FALSE(rest.empty());
    CHECK(rest == h.stored({"bulk"}, oldest - 1));
    slow.close();
}

// A follower whose cursor is still 0 (it subscribed to a brand-new, empty store) must treat
// a later catch-up as "every row after id 0", not as a first poll limited to the 50 s window:
// rows committed after its subscribe are its own to receive.
TEST_CASE_TEMPLATE("a client subscribed to an empty store gets every later row even when caught up by a poll", Env,
                   STORES) {
    store_config config;
    config.max_pending = 4;  // the wake-ups below overflow: the connection must poll the store
    harness<Env> h(config);
    auto o = h.options();
    o.threads = 1;
    io_pause pause;
    h.start(o, imbus::public_policy(), pause.route());

    auto c = connect_client(h.url());
    c->subscribe({"a"}, 0);
    REQUIRE(h.wait_subscribers("a", 1));
    REQUIRE(pause.hold(h.port()));  // after the subscribe's own poll: same thread
    std::vector<std::int64_t> sent{h.send("a", 0)};
    h.env.clock.advance(60s);  // the first row is now older than the first-poll window
    for (int i = 1; i < 7; ++i) sent.push_back(h.send("a", i));
    pause.release();

    CHECK(ids_of(c->take(sent.size(), 2s)) == sent);
    CHECK(nothing_more(*c));
}

// --- missed notifications ----------------------------------------------------------------------

TEST_CASE_TEMPLATE("missed notifications: a gone `last` gives a first frame starting with the marker", Env, STORES) {
    harness<Env> h(store_config{std::chrono::seconds(60)});
    for (int i = 0; i < 5; ++i) h.send("a", i);  // ids 1..5
    h.env.clock.advance(120s);
    std::vector<std::int64_t> kept{h.send("a", 5), h.send("b", 6), h.send("a", 7)};  // ids 6..8
    h.env.store.collect_garbage();
    REQUIRE_FALSE(h.env.store.contains(2));
    REQUIRE(h.env.store.contains(6));
    REQUIRE(h.env.store.oldest_id() == 6);
    h.start();

    auto marker = [](std::int64_t last) {
        return json{{"id", last}, {"message", {{"type", "bus/missed_notifications"}, {"payload", {{"last", last}}}}}};
    };

    SUBCASE("row gone: the marker, then what is left") {
        auto ws = raw_ws::connect(h.port());
        ws.send_text(subscribe_text({"a", "b"}, 2));
        const json frame = json::parse(ws.read_text());
        REQUIRE(frame.size() == 4);
        CHECK(frame[0] == marker(2));
        CHECK(ids_of(std::vector<json>(frame.begin() + 1, frame.end())) == kept);
        ws.close();
    }
    SUBCASE("rows gone on other channels only: no marker (a quiet channel is no loss)") {
        auto ws = raw_ws::connect(h.port());
        ws.send_text(subscribe_text({"b"}, 2));
        const std::string text = ws.read_text();
        CHECK(check_frame(text) == std::vector<std::int64_t>{kept[1]});
        CHECK(text.find("bus/missed_notifications") == std::string::npos);
        ws.close();
    }
    SUBCASE("row still there: no marker") {
        auto ws = raw_ws::connect(h.port());
        ws.send_text(subscribe_text({"a", "b"}, 6));
        const std::string text = ws.read_text();
        CHECK(check_frame(text) == std::vector<std::int64_t>{7, 8});
        CHECK(text.find("bus/missed_notifications") == std::string::npos);
        ws.close();
    }
    SUBCASE("last beyond the newest id (a reset store): the marker, then the first-poll window") {
        auto ws = raw_ws::connect(h.port());
        ws.send_text(subscribe_text({"a", "b"}, 1000));
        const json frame = json::parse(ws.read_text());
        REQUIRE(frame.size() == 4);
        CHECK(frame[0] == marker(1000));
        CHECK(ids_of(std::vector<json>(frame.begin() + 1, frame.end())) == kept);
        ws.close();
    }
    SUBCASE("through imbus::client: the marker comes first, and only on the first subscribe") {
        auto c = connect_client(h.url());
        c->subscribe({"a"}, 3);
        auto got = c->take(3, 5s);
        REQUIRE(got.size() == 3);
        CHECK(got[0] == marker(3));
        CHECK(ids_of(std::vector<json>(got.begin() + 1, got.end())) == std::vector<std::int64_t>{6, 8});
        c->subscribe({"a", "b"});  // a later subscribe keeps the cursor: neither marker nor repeats
        CHECK(nothing_more(*c));
        const auto live = h.send("b", 9);
        CHECK(ids_of(c->take(1, 5s)) == std::vector<std::int64_t>{live});
    }
}

TEST_CASE("missed notifications: memory_store max_notifications drops rows and the marker tells") {
    harness<memory_env> h(store_config{std::chrono::seconds(86400), 5});
    for (int i = 0; i < 10; ++i) h.send("a", i);  // ids 1..10, 6..10 kept
    REQUIRE(h.env.store.oldest_id() == 6);
    h.start();

    auto gone = raw_ws::connect(h.port());
    gone.send_text(subscribe_text({"a"}, 3));
    const json frame = json::parse(gone.read_text());
    REQUIRE(frame.size() == 6);
    CHECK(frame[0]["message"] == json{{"type", "bus/missed_notifications"}, {"payload", {{"last", 3}}}});
    CHECK(frame[0]["id"] == 3);
    CHECK(ids_of(std::vector<json>(frame.begin() + 1, frame.end())) == std::vector<std::int64_t>{6, 7, 8, 9, 10});

    auto present = raw_ws::connect(h.port());
    present.send_text(subscribe_text({"a"}, 7));
    CHECK(check_frame(present.read_text()) == std::vector<std::int64_t>{8, 9, 10});
    gone.close();
    present.close();
}

// --- HTTP routes -----------------------------------------------------------------------------

// --- frame sizes and the client's bounds -------------------------------------------------------

// A client sizes its frame limit on the server's largest frame: a commit bigger than
// catch_up_bytes goes out in pieces of at most that (a single larger row alone).
TEST_CASE("frames: a commit larger than catch_up_bytes arrives in frames of at most catch_up_bytes") {
    harness<memory_env> h;
    auto o = h.options();
    o.catch_up_bytes = 4096;
    h.start(o);
    auto ws = raw_ws::connect(h.port());
    ws.send_text(subscribe_text({"a"}, 0));
    REQUIRE(h.wait_subscribers("a", 1));
    imbus::transaction tx(h.bus);
    for (int i = 0; i < 20; ++i) tx.send("a", "t", json{{"i", i}, {"pad", std::string(900, 'x')}});
    tx.send("a", "t", json{{"big", std::string(6000, 'y')}});  // one row past the cap: alone
    const auto ids = tx.commit();
    std::vector<std::int64_t> got;
    std::size_t frames = 0, largest = 0;
    while (got.size() < ids.size()) {
        const std::string text = ws.read_text();
        const auto in_frame = check_frame(text);
        ++frames;
        if (in_frame.size() > 1) largest = std::max(largest, text.size());
        if (in_frame.back() == ids.back()) CHECK(in_frame.size() == 1);
        got.insert(got.end(), in_frame.begin(), in_frame.end());
    }
    CHECK(got == ids);
    CHECK(frames >= 6);
    CHECK(largest <= 4096);
}

TEST_CASE("client: take()'s queue keeps max_received notifications, the newest, and counts the rest") {
    harness<memory_env> h;
    h.start();
    imbus::client c(quiet_client([](imbus::client_options& o) { o.max_received = 3; }));
    c.connect(h.url());
    c.subscribe({"a"}, 0);
    REQUIRE(h.wait_subscribers("a", 1));
    std::vector<std::int64_t> sent;
    for (int i = 0; i < 5; ++i) sent.push_back(h.send("a", i));
    REQUIRE(wait_until([&] { return c.last_id() == sent.back(); }));
    CHECK(ids_of(c.take(10, 0ms)) == std::vector<std::int64_t>(sent.end() - 3, sent.end()));
    CHECK(c.dropped() == 2);
}

TEST_CASE("client: a frame above max_message_bytes is refused (1009), a default client takes it") {
    harness<memory_env> h;
    h.start();
    imbus::client small(quiet_client([](imbus::client_options& o) { o.max_message_bytes = 2000; }));
    small.connect(h.url());
    small.subscribe({"a"}, 0);
    auto big = connect_client(h.url());
    big->subscribe({"a"}, 0);
    REQUIRE(h.wait_subscribers("a", 2));
    const auto id = h.bus.send("a", "t", json{{"pad", std::string(5000, 'z')}});
    std::vector<json> got;
    CHECK(collect_until(*big, got, id.front()));
    const auto closed = small.wait_closed(5000ms);
    REQUIRE(closed);
    CHECK(closed->code == 1009);
    CHECK(small.take(1, 0ms).empty());
}

// --- store failures ---------------------------------------------------------------------------

// The environment's store behind one that fails on demand.
template <class Inner> struct faulty_env {
    Inner inner;
    imbus_test::faulty_store store{inner.store};
    explicit faulty_env(store_config c) : inner(c) {}
};

std::uint64_t store_errors(const imbus::server& s) { return s.metrics().store_errors.load(); }

// A database restarting under a catch-up must neither end the I/O thread nor lose a row: the
// read is tried again after a backoff, and the other clients are served meanwhile.
TEST_CASE_TEMPLATE("store failures: a catch-up whose reads fail is tried again, nothing lost, others served", Env,
                   faulty_env<memory_env>, faulty_env<sqlite_env>) {
    harness<Env> h;
    auto o = h.options();
    o.store_retry_delay = 2ms;
    o.store_retries = 20;
    h.start(o);
    const std::vector<std::int64_t> history{h.send("a", 1), h.send("a", 2), h.send("a", 3)};
    auto other = connect_client(h.url());
    other->subscribe({"b"}, history.back());
    std::vector<json> other_got;
    const auto b1 = h.send("b", 1);
    REQUIRE(collect_until(*other, other_got, b1));  // its own catch-up is over

    h.env.store.fail(imbus_test::faulty_store::reads, 3);  // the subscribe's history fails three times
    auto c = connect_client(h.url());
    c->subscribe({"a"}, 0);
    std::vector<json> got;
    REQUIRE(collect_until(*c, got, history.back()));
    CHECK(ids_of(got) == history);
    CHECK(h.env.store.failures() == 3);
    CHECK(store_errors(*h.server) == 3);
    CHECK(h.logs.contains("trying again"));
    const auto b2 = h.send("b", 2);
    REQUIRE(collect_until(*other, other_got, b2));
    CHECK(ids_of(other_got) == std::vector<std::int64_t>{b1, b2});

    // A live wake-up that has to poll (a row stored without a notify) fails and retries alike.
    const auto quiet_row = h.env.inner.store.append(imbus_test::batch_of({{channel("db", "a"), 4}}));
    h.env.store.fail(imbus_test::faulty_store::fetch_op, 2);
    const auto last = h.send("a", 5);  // does not continue what the client saw: a poll
    REQUIRE(collect_until(*c, got, last));
    CHECK(ids_of(got) == std::vector<std::int64_t>{1, 2, 3, quiet_row.front().id, last});
    CHECK(store_errors(*h.server) == 5);
    CHECK(nothing_more(*c));
}

// /metrics is how an outage is watched: while the store cannot answer, the scrape still
// succeeds and says so (imbus_store_up 0) instead of failing with 500.
TEST_CASE_TEMPLATE("store failures: /metrics answers while the store is down", Env, faulty_env<memory_env>) {
    harness<Env> h;
    h.start(h.options());
    h.send("a", 1);
    auto scrape = [&] { return imbus_test::http_request(h.port(), "GET", "/metrics"); };
    auto up = scrape();
    REQUIRE(up.status == 200);
    CHECK(up.body.find("imbus_store_up 1") != std::string::npos);
    CHECK(up.body.find("imbus_store_newest_id 1") != std::string::npos);
    h.env.store.fail(imbus_test::faulty_store::newest_op);
    auto down = scrape();
    REQUIRE(down.status == 200);
    CHECK(down.body.find("imbus_store_up 0") != std::string::npos);
    CHECK(down.body.find("imbus_store_newest_id") == std::string::npos);
    CHECK(down.body.find("imbus_connections_open") != std::string::npos);  // the rest is there
    CHECK(h.logs.contains("/metrics could not read the store"));
    h.env.store.heal();
    CHECK(scrape().body.find("imbus_store_up 1") != std::string::npos);
}

// The other two ways into a catch-up, a wake-up that overflowed (the I/O thread was busy) and
// a slow client's resume after its queue drained, retry alike.
TEST_CASE_TEMPLATE("store failures: catch-ups after an overflow and after a slow client's drain are retried", Env,
                   faulty_env<memory_env>, faulty_env<sqlite_env>) {
    store_config config;
    config.max_pending = 2;
    harness<Env> h(config);
    auto o = h.options();
    o.store_retry_delay = 2ms;
    o.max_outbound_bytes = 64 * 1024;
    io_pause pause;
    h.start(o, imbus::public_policy(), pause.route());
    auto c = connect_client(h.url());
    c->subscribe({"a"}, 0);
    std::vector<json> got;
    const auto first = h.send("a", 0);
    REQUIRE(collect_until(*c, got, first));

    // Overflow: five commits while the I/O thread is held; the wake-up says "catch up".
    REQUIRE(pause.hold(h.port()));
    std::vector<std::int64_t> sent{first};
    for (int i = 1; i <= 5; ++i) sent.push_back(h.send("a", i));
    h.env.store.fail(imbus_test::faulty_store::reads, 2);
    pause.release();
    REQUIRE(collect_until(*c, got, sent.back()));
    CHECK(ids_of(got) == sent);
    CHECK(store_errors(*h.server) == 2);

    // Slow: a client that stops reading is held back past 64 KiB; once it reads again its
    // resume reads the store, which fails twice first.
    auto slow = raw_ws::connect(h.port());
    slow.send_text(subscribe_text({"bulk"}, 0));
    REQUIRE(h.wait_subscribers("bulk", 1));
    const std::string filler(25000, 'x');
    std::vector<std::int64_t> bulk;
    for (int i = 0; i < 320 && h.server->metrics().slow_consumer_catch_ups.load() == 0; ++i)
        bulk.push_back(h.bus.send("bulk", "test/bulk", json{{"i", i}, {"pad", filler}})[0]);
    REQUIRE(wait_until([&] { return h.server->metrics().slow_consumer_catch_ups.load() == 1; }));
    for (int i = 0; i < 20; ++i) bulk.push_back(h.bus.send("bulk", "test/bulk", json{{"i", -i}, {"pad", filler}})[0]);
    h.env.store.fail(imbus_test::faulty_store::reads, 2);
    std::vector<std::int64_t> slow_got;
    for (const auto& frame : read_frames_until(slow, bulk.back(), 10000ms)) {
        const auto ids = check_frame(frame);
        slow_got.insert(slow_got.end(), ids.begin(), ids.end());
    }
    CHECK(slow_got == bulk);
    CHECK(store_errors(*h.server) == 4);
    slow.close();
}

// A store that stays down costs the client a 1011 after store_retries tries (it resumes from
// its last id later), and the server goes on serving once the store is back.
TEST_CASE("store failures: a store that stays down closes the connection with 1011, the server goes on") {
    harness<faulty_env<memory_env>> h;
    auto o = h.options();
    o.store_retry_delay = 1ms;
    o.store_retries = 3;
    h.start(o);
    const auto first = h.send("a", 1);
    h.env.store.fail(imbus_test::faulty_store::reads);  // until healed
    auto ws = raw_ws::connect(h.port());
    ws.send_text(subscribe_text({"a"}, 0));
    CHECK(ws.wait_close().code == 1011);
    CHECK(store_errors(*h.server) == 4);                                       // the first read and three more
    CHECK(wait_until([&] { return h.server->metrics().closes(1011) == 1; }));  // counted once the close completes
    CHECK(h.logs.contains("closing (1011)"));

    h.env.store.heal();
    auto c = connect_client(h.url());
    c->subscribe({"a"}, 0);
    std::vector<json> got;
    REQUIRE(collect_until(*c, got, first));
    CHECK(ids_of(got) == std::vector<std::int64_t>{first});
}

TEST_CASE_TEMPLATE("HTTP routes: health, peek_notifications, has_missed_notifications, /bus/send, 404, on_http", Env,
                   STORES) {
    using imbus_test::http_request;
    harness<Env> h(store_config{std::chrono::seconds(60)});
    h.send("a", 0);  // id 1, collected below
    h.env.clock.advance(120s);
    const auto a2 = h.send("a", 1), b3 = h.send("b", 2), always4 = h.send("always", 3);
    h.env.store.collect_garbage();
    REQUIRE_FALSE(h.env.store.contains(1));

    auto o = h.options();
    o.api_key = "the-api-key";
    std::atomic<int> route_calls{0};
    imbus::http_route route = [&](const imbus::http_request& r, imbus::http_response& out) {
        ++route_calls;
        if (r.path != "/custom%20path" || r.decoded_path() != "/custom path") return false;
        out.status = 201;
        out.headers.emplace_back("Content-Type", "text/plain");
        out.body = r.method + " " + r.param("x") + " " + r.body;
        return true;
    };
    h.start(o, imbus::public_policy({channel("db", "always")}), route);
    const std::uint16_t port = h.port();
    const imbus_test::header_list json_type{{"Content-Type", "application/json"}};

    SUBCASE("health") {
        auto r = http_request(port, "GET", "/websocket/health");
        CHECK(r.status == 200);
        CHECK(json::parse(r.body) == json{{"status", "pass"}});
        CHECK(r.header("cache-control") == "no-store");
        CHECK(r.headers.count("set-cookie") == 0);
    }

    SUBCASE("peek_notifications, plain") {
        auto r = http_request(port, "POST", "/websocket/peek_notifications",
                              R"({"channels":["a","b","a"],"last":0,"is_first_poll":true})", json_type);
        REQUIRE(r.status == 200);
        const json body = json::parse(r.body);
        CHECK(body["channels"] == json::parse(R"([["db","a"],["db","b"],["db","always"]])"));
        CHECK(ids_of(body["notifications"].get<std::vector<json>>()) == std::vector<std::int64_t>{a2, b3, always4});
        CHECK(body["notifications"][0] == json{{"id", a2}, {"message", {{"type", "test/a"}, {"payload", {{"i", 1}}}}}});

        const json after =
            json::parse(http_request(port, "POST", "/websocket/peek_notifications",
                                     R"({"channels":["a","b"],"last":)" + std::to_string(a2) + "}", json_type)
                            .body);
        CHECK(ids_of(after["notifications"].get<std::vector<json>>()) == std::vector<std::int64_t>{b3, always4});

        // The first poll sees only the 50 s window.
        h.env.clock.advance(51s);
        const auto a5 = h.send("a", 4);
        const json first =
            json::parse(http_request(port, "POST", "/websocket/peek_notifications",
                                     R"({"channels":["a","b"],"last":0,"is_first_poll":true})", json_type)
                            .body);
        CHECK(ids_of(first["notifications"].get<std::vector<json>>()) == std::vector<std::int64_t>{a5});
        CHECK(first["channels"] == json::parse(R"([["db","a"],["db","b"],["db","always"]])"));
    }

    SUBCASE("peek_notifications, paged: at most catch_up_rows rows or catch_up_bytes bytes, then more from last") {
        // A second server on the same bus with small pages (the harness's has the defaults).
        imbus::server_options small = o;
        small.catch_up_rows = 2;
        small.catch_up_bytes = 1 << 20;
        small.log = {};
        imbus::basic_server<imbus::public_policy> paged(h.bus, imbus::public_policy({channel("db", "always")}), small);
        paged.listen("127.0.0.1", 0);
        paged.start();
        std::vector<std::int64_t> all;
        for (int i = 0; i < 5; ++i) all.push_back(h.send("a", 10 + i));
        std::vector<std::int64_t> seen;
        std::int64_t last = a2;
        int pages = 0;
        for (bool more = true; more; ++pages) {
            REQUIRE(pages < 10);
            const auto r = http_request(paged.port(), "POST", "/websocket/peek_notifications",
                                        R"({"channels":["a"],"last":)" + std::to_string(last) + "}", json_type);
            REQUIRE(r.status == 200);
            const json page = json::parse(r.body);
            const auto ids = ids_of(page["notifications"].get<std::vector<json>>());
            CHECK(ids.size() <= 2);
            seen.insert(seen.end(), ids.begin(), ids.end());
            last = page["last"].get<std::int64_t>();
            more = page["more"].get<bool>();
        }
        std::vector<std::int64_t> expected{always4};
        expected.insert(expected.end(), all.begin(), all.end());
        CHECK(seen == expected);
        // A byte cap: one row whose message is bigger than it still comes, alone.
        small.catch_up_rows = 1000;
        small.catch_up_bytes = 16;
        imbus::basic_server<imbus::public_policy> tiny(h.bus, imbus::public_policy(), small);
        tiny.listen("127.0.0.1", 0);
        tiny.start();
        const json one = json::parse(http_request(tiny.port(), "POST", "/websocket/peek_notifications",
                                                  R"({"channels":["a"],"last":)" + std::to_string(a2) + "}", json_type)
                                         .body);
        CHECK(ids_of(one["notifications"].get<std::vector<json>>()) == std::vector<std::int64_t>{all[0]});
        CHECK(one["more"] == true);
        CHECK(one["last"] == all[0]);
        // More channels than max_channels is a 400.
        small.max_channels = 2;
        imbus::basic_server<imbus::public_policy> narrow(h.bus, imbus::public_policy(), small);
        narrow.listen("127.0.0.1", 0);
        narrow.start();
        CHECK(http_request(narrow.port(), "POST", "/websocket/peek_notifications",
                           R"({"channels":["a","b","c"],"last":0})", json_type)
                  .status == 400);
        for (auto* s : {&paged, &tiny, &narrow}) {
            s->stop();
            s->wait();
        }
    }

    SUBCASE("peek_notifications, JSON-RPC") {
        auto r = http_request(port, "POST", "/websocket/peek_notifications",
                              R"({"jsonrpc":"2.0","method":"call","id":7,"params":{"channels":["b"],"last":)" +
                                  std::to_string(a2) + R"(,"is_first_poll":false}})",
                              json_type);
        REQUIRE(r.status == 200);
        const json body = json::parse(r.body);
        CHECK(body["jsonrpc"] == "2.0");
        CHECK(body["id"] == 7);
        REQUIRE(body.contains("result"));
        CHECK(body["result"]["channels"] == json::parse(R"([["db","b"],["db","always"]])"));
        CHECK(ids_of(body["result"]["notifications"].get<std::vector<json>>()) ==
              std::vector<std::int64_t>{b3, always4});
    }

    SUBCASE("peek_notifications, bad bodies") {
        for (std::string bad : {"not json", R"({"last":0})", R"({"channels":"a"})", R"({"channels":[1]})",
                                R"({"channels":["a"],"last":"x"})", "[]"}) {
            CAPTURE(bad);
            CHECK(http_request(port, "POST", "/websocket/peek_notifications", bad, json_type).status == 400);
        }
    }

    SUBCASE("has_missed_notifications, plain and JSON-RPC") {
        auto ask = [&](const std::string& body) {
            auto r = http_request(port, "POST", "/bus/has_missed_notifications", body, json_type);
            CHECK(r.status == 200);
            return json::parse(r.body);
        };
        CHECK(ask(R"({"last_notification_id":1})") == true);
        CHECK(ask(R"({"last_notification_id":)" + std::to_string(a2) + "}") == false);
        CHECK(ask(R"({"last_notification_id":0})") == false);
        CHECK(ask(R"({"last_notification_id":1000})") == true);  // beyond the newest id: a reset store
        // Read as subscribe reads `last`: above int64 is the largest id, below 0 is 0.
        CHECK(ask(R"({"last_notification_id":9223372036854775807})") == true);
        CHECK(ask(R"({"last_notification_id":18446744073709551615})") == true);
        CHECK(ask(R"({"last_notification_id":-5})") == false);
        CHECK(http_request(port, "POST", "/bus/has_missed_notifications", R"({"last_notification_id":1.5})", json_type)
                  .status == 400);
        const json rpc_true = ask(R"({"jsonrpc":"2.0","id":3,"params":{"last_notification_id":1}})");
        CHECK(rpc_true == json{{"jsonrpc", "2.0"}, {"id", 3}, {"result", true}});
        const json rpc_false =
            ask(R"({"jsonrpc":"2.0","id":4,"params":{"last_notification_id":)" + std::to_string(b3) + "}}");
        CHECK(rpc_false == json{{"jsonrpc", "2.0"}, {"id", 4}, {"result", false}});
        CHECK(http_request(port, "POST", "/bus/has_missed_notifications", "{}", json_type).status == 400);
        CHECK(http_request(port, "POST", "/bus/has_missed_notifications", "nope", json_type).status == 400);
    }

    SUBCASE("/bus/send") {
        auto c = connect_client(h.url());
        c->subscribe({"a", "b"}, h.env.store.newest_id());
        REQUIRE(h.wait_subscribers("b", 1));
        auto post = [&](const std::string& body, const std::string& auth = "Bearer the-api-key") {
            imbus_test::header_list headers = json_type;
            if (!auth.empty()) headers.emplace_back("Authorization", auth);
            return http_request(port, "POST", "/bus/send", body, headers);
        };
        const std::string one = R"({"channel":"a","type":"t/x","payload":{"k":1}})";
        const auto newest = h.env.store.newest_id();

        CHECK(post(one, "").status == 401);
        CHECK(post(one, "Basic dXNlcjpwYXNz").status == 401);
        CHECK(post(one, "Bearer wrong-key").status == 403);
        CHECK(post(one, "Bearer the-api-ke").status == 403);
        for (std::string bad : {"not json", "[]", R"({"channel":"a"})", R"({"channel":"a","type":5})",
                                R"({"type":"t"})", R"({"channel":5,"type":"t"})", R"({"channel":["db"],"type":"t"})",
                                R"({"channel":[],"type":"t"})", R"({"channel":["db","x",{}],"type":"t"})",
                                R"([{"channel":"a","type":"t"},{"channel":7,"type":"t"}])", "[1]"}) {
            CAPTURE(bad);
            CHECK(post(bad).status == 400);
        }
        CHECK(h.env.store.newest_id() == newest);  // nothing of a refused batch was stored
        CHECK(nothing_more(*c, 50ms));

        auto single = post(one);
        REQUIRE(single.status == 200);
        const json single_ids = json::parse(single.body).at("ids");
        REQUIRE(single_ids.size() == 1);
        const auto id = single_ids[0].get<std::int64_t>();
        CHECK(id == newest + 1);
        auto got = c->take(1, 5s);
        REQUIRE(got.size() == 1);
        CHECK(got[0] == json{{"id", id}, {"message", {{"type", "t/x"}, {"payload", {{"k", 1}}}}}});

        auto batch = post(R"([{"channel":"a","type":"t/1","payload":1},)"
                          R"({"channel":["db","b"],"type":"t/2","payload":[2]},)"
                          R"({"channel":["db","res.partner",3],"type":"t/3"},)"
                          R"({"channel":"b","type":"t/4","payload":"four"}])");
        REQUIRE(batch.status == 200);
        const json batch_ids = json::parse(batch.body).at("ids");
        const auto ids = batch_ids.get<std::vector<std::int64_t>>();
        REQUIRE(ids.size() == 4);
        for (std::size_t i = 1; i < ids.size(); ++i) CHECK(ids[i] == ids[i - 1] + 1);  // one transaction
        got = c->take(3, 5s);
        CHECK(ids_of(got) == std::vector<std::int64_t>{ids[0], ids[1], ids[3]});
        REQUIRE(got.size() == 3);
        CHECK(got[1]["message"] == json{{"type", "t/2"}, {"payload", {2}}});
        CHECK(got[2]["message"] == json{{"type", "t/4"}, {"payload", "four"}});
        auto record_rows = h.env.store.poll({channel("db", "res.partner", 3)}, 0);
        REQUIRE(record_rows.size() == 1);
        CHECK(record_rows[0].id == ids[2]);
        CHECK(record_rows[0].type() == "t/3");
        CHECK(nothing_more(*c));
    }

    SUBCASE("/bus/send without a configured key refuses everybody") {
        auto o2 = h.options();  // api_key empty
        h.server.reset();
        h.start(o2);
        auto r = http_request(h.port(), "POST", "/bus/send", R"({"channel":"a","type":"t"})",
                              {{"Authorization", "Bearer "}, {"Content-Type", "application/json"}});
        CHECK(r.status == 401);
        r = http_request(h.port(), "POST", "/bus/send", R"({"channel":"a","type":"t"})",
                         {{"Authorization", "Bearer anything"}});
        CHECK(r.status == 403);
    }

    SUBCASE("unknown paths are 404; on_http answers its own") {
        CHECK(http_request(port, "GET", "/nope").status == 404);
        CHECK(http_request(port, "POST", "/websocket/nope", "{}").status == 404);
        CHECK(http_request(port, "POST", "/websocket", "{}").status == 404);  // GET is the handshake probe
        const int calls = route_calls;
        auto r = http_request(port, "POST", "/custom%20path?x=a%26b", "hello");
        CHECK(r.status == 201);
        CHECK(r.body == "POST a&b hello");
        CHECK(r.header("content-type") == "text/plain");
        CHECK(route_calls == calls + 1);
        // Routes of the bus come first.
        CHECK(http_request(port, "GET", "/websocket/health").status == 200);
        CHECK(route_calls == calls + 1);
    }
}

// signed_token_policy holds a mutex, so the server gets it through a reference (as examples/chat does).
struct token_policy_ref {
    using identity = imbus::signed_identity;
    imbus::signed_token_policy* tokens;
    imbus::admission<identity> authenticate(const imbus::http_request& r) const { return tokens->authenticate(r); }
    std::vector<channel> channels(const identity& who, std::vector<channel> asked) const {
        return tokens->channels(who, std::move(asked));
    }
    bool still_valid(const identity& who) const { return tokens->still_valid(who); }
};

// Found while writing tests/fuzz/fuzz_http_routes (a directed input: the fuzzer's default 4 KiB
// inputs nest too shallow to reach it): copying or printing a json value recurses once per
// level, so one unauthenticated POST of ~100 KB of "[[[[...]]]]" to peek_notifications
// overflowed the stack and took the server down. The routes now refuse such bodies unparsed.
TEST_CASE("HTTP routes answer 400 to JSON nested deeper than max_json_depth, not a stack overflow") {
    imbus::memory_store_options so;
    so.log = {};
    imbus::memory_store store(so);
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"db", {}});
    imbus::server_options o;
    o.api_key = "k";
    o.gc_interval = 0s;
    o.log = {};
    imbus::server server(bus, imbus::public_policy(), o);  // never listens: serve_http only
    auto post = [&](const std::string& path, const std::string& body) {
        imbus::http_request r;
        r.method = "POST";
        r.path = path;
        r.body = body;
        r.headers.emplace_back("Authorization", "Bearer k");
        return server.serve_http(r);
    };
    auto arrays = [](std::size_t levels) { return std::string(levels, '[') + std::string(levels, ']'); };
    const std::string too_deep = "the body is nested deeper than " + std::to_string(IMBUS_MAX_JSON_DEPTH) + " levels";
    for (const std::string path : {"/websocket/peek_notifications", "/bus/has_missed_notifications", "/bus/send"}) {
        CAPTURE(path);
        for (const std::string& body :
             {arrays(200000), R"({"jsonrpc":"2.0","id":)" + arrays(200000) + "}", arrays(IMBUS_MAX_JSON_DEPTH + 1)}) {
            const auto r = post(path, body);
            CHECK(r.status == 400);
            CHECK(json::parse(r.body) == json{{"error", too_deep}});
        }
    }
    // At the limit (the body's own object is one level) the routes still serve.
    const auto nested = arrays(IMBUS_MAX_JSON_DEPTH - 1);
    const auto peek = post("/websocket/peek_notifications", R"({"channels":["a"],"last":0,"x":)" + nested + "}");
    CHECK(peek.status == 200);
    const auto sent = post("/bus/send", R"({"channel":"a","type":"t","payload":)" + nested + "}");
    REQUIRE(sent.status == 200);
    CHECK(store.poll({channel("db", "a")}, 0).at(0).payload().dump() == nested);
    const auto missed = post("/bus/has_missed_notifications", R"({"last_notification_id":1,"x":)" + nested + "}");
    CHECK(missed.status == 200);
    CHECK(missed.body == "false");
}

TEST_CASE("peek_notifications is authenticated by the server's policy and gets its channels") {
    using imbus_test::http_request;
    harness<memory_env> h;
    imbus::signed_token_options so;
    so.clock = std::ref(h.env.clock);
    so.own_channels = [](const imbus::signed_identity& who) {
        return std::vector<channel>{channel("db", "res.users", who.subject == "alice" ? 1 : 2)};
    };
    so.may_subscribe = [](const imbus::signed_identity&, const channel& c) { return c.key() != R"(["db","secret"])"; };
    imbus::signed_token_policy tokens("a-test-secret-of-enough-bytes", so);
    const auto own = h.bus.send(channel("db", "res.users", 1), "t/own", json{{"k", 1}})[0];
    h.bus.send(channel("db", "res.users", 2), "t/other", json{{"k", 2}});
    h.send("secret", 0);
    const auto a = h.send("a", 1);

    imbus::basic_server<token_policy_ref> srv(h.bus, token_policy_ref{&tokens}, h.options());
    srv.listen("127.0.0.1", 0);
    srv.start();
    const std::string body = R"({"channels":["a","secret"],"last":0,"is_first_poll":true})";
    const std::string path = "/websocket/peek_notifications";
    CHECK(http_request(srv.port(), "POST", path, body).status == 401);
    CHECK(http_request(srv.port(), "POST", path, body, {{"Authorization", "Bearer not-a-token"}}).status == 403);
    for (const auto& auth :
         std::vector<imbus_test::header_list>{{{"Cookie", "imbus_session=" + tokens.issue("alice", 60s)}},
                                              {{"Authorization", "Bearer " + tokens.issue("alice", 60s)}}}) {
        auto r = http_request(srv.port(), "POST", path, body, auth);
        REQUIRE(r.status == 200);
        const json reply = json::parse(r.body);
        CHECK(reply["channels"] == json::parse(R"([["db","a"],["db","res.users",1]])"));
        CHECK(ids_of(reply["notifications"].get<std::vector<json>>()) == std::vector<std::int64_t>{own, a});
    }
    tokens.revoke("alice");
    CHECK(http_request(srv.port(), "POST", path, body, {{"Cookie", "imbus_session=" + tokens.issue("alice", 60s)}})
              .status == 403);
    srv.stop();
    srv.wait();
}

// --- graceful stop and reconnect -----------------------------------------------------------------

TEST_CASE_TEMPLATE("graceful stop: 1001 to every client, wait() returns, a new server resumes from the same store", Env,
                   STORES) {
    harness<Env> h;
    h.start();
    auto c = connect_client(h.url());
    c->subscribe({"a"}, 0);
    auto ws = raw_ws::connect(h.port());
    ws.send_text(subscribe_text({"a"}, 0));
    REQUIRE(h.wait_subscribers("a", 2));
    std::vector<std::int64_t> first{h.send("a", 0), h.send("a", 1), h.send("a", 2)};
    CHECK(ids_of(c->take(3, 5s)) == first);
    CHECK(check_frame(ws.read_text()).front() == first[0]);  // [1] live, or [1..3] if its poll came late

    const auto stop_started = steady::now();
    h.server->stop();
    auto closed = c->wait_closed(5s);
    REQUIRE(closed);
    CHECK(closed->code == 1001);
    CHECK(ws.wait_close().code == 1001);  // the frames still queued before it are dropped
    h.server->wait();
    CHECK(steady::now() - stop_started < 3s);
    CHECK(h.server->connection_count() == 0);
    CHECK(h.dispatcher.subscriber_count() == 0);
    const auto last = c->last_id();
    CHECK(last == first.back());

    // Committed while no server runs.
    std::vector<std::int64_t> missed;
    for (int i = 0; i < 4; ++i) {
        missed.push_back(h.send("a", 10 + i));
        h.send("b", 20 + i);
    }

    h.server.reset();
    h.start();
    auto again = connect_client(h.url());
    again->subscribe({"a"}, last);
    CHECK(ids_of(again->take(missed.size(), 5s)) == missed);
    CHECK(nothing_more(*again));
    const auto live = h.send("a", 99);
    CHECK(ids_of(again->take(1, 5s)) == std::vector<std::int64_t>{live});
}

// An I/O thread cannot join itself: wait() from a handler is a clear error, not a destroyed
// joinable std::thread (std::terminate without a word) or a hang.
TEST_CASE("wait() from a handler throws std::logic_error, the server goes on") {
    harness<memory_env> h;
    std::string caught;
    imbus::http_route route = [&](const imbus::http_request& r, imbus::http_response& out) {
        if (r.path != "/wait") return false;
        try {
            h.server->wait();
        } catch (const std::logic_error& e) {
            caught = e.what();
        }
        out.status = 200;
        return true;
    };
    h.start(h.options(), imbus::public_policy(), route);
    CHECK(imbus_test::http_request(h.port(), "GET", "/wait").status == 200);
    CHECK(caught.find("own I/O threads") != std::string::npos);
    auto c = connect_client(h.url());
    c->subscribe({"a"}, 0);
    REQUIRE(h.wait_subscribers("a", 1));
    const auto id = h.send("a", 1);
    std::vector<json> got;
    CHECK(collect_until(*c, got, id));
}

TEST_CASE_TEMPLATE("reconnect: imbus::client comes back to a new server on the same port, no gap, no duplicate", Env,
                   STORES) {
    harness<Env> h;
    h.start();
    const auto port = h.port();
    auto c = connect_client(h.url(), /*reconnect=*/true, /*reconnect_delay=*/50ms);
    c->subscribe({"a"}, 0);
    REQUIRE(h.wait_subscribers("a", 1));
    std::vector<std::int64_t> before{h.send("a", 0), h.send("b", 1), h.send("a", 2)};
    CHECK(ids_of(c->take(2, 5s)) == std::vector<std::int64_t>{before[0], before[2]});
    CHECK(c->connects() == 1);

    h.server->stop();
    h.server->wait();
    auto closed = c->wait_closed(5s);
    REQUIRE(closed);
    CHECK(closed->code == 1001);

    std::vector<std::int64_t> while_down;
    for (int i = 0; i < 5; ++i) {
        while_down.push_back(h.send("a", 10 + i));
        h.send("b", 20 + i);
    }

    h.server.reset();
    h.start(h.options(), imbus::public_policy(), {}, port);
    REQUIRE(h.port() == port);
    CHECK(wait_until([&] { return c->connects() == 2; }));
    CHECK(ids_of(c->take(while_down.size(), 5s)) == while_down);
    CHECK(nothing_more(*c));
    const auto live = h.send("a", 99);
    CHECK(ids_of(c->take(1, 5s)) == std::vector<std::int64_t>{live});
    CHECK(c->last_id() == live);
    CHECK(c->connects() == 2);
}
