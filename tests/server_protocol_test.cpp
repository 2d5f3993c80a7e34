// WebSocket endpoint rules (docs/PROTOCOL.md §4): handshake, version check, requests, subscribe
// semantics, limits, timers and close codes, over real sockets on 127.0.0.1.
//
// Every case builds its own memory store + dispatcher + bus + server (port 0, one I/O thread,
// short timers, a capturing logger) and waits only with deadlines; a short fixed wait is used
// only where a negative has to be shown.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"
#include "support/raw_socket.hpp"
#include "support/test_helpers.hpp"

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using namespace std::chrono_literals;
using imbus::json;
using imbus_test::ids_of;
using imbus_test::log_capture;
using imbus_test::raw_ws;
using imbus_test::wait_until;
using steady = std::chrono::steady_clock;

namespace {

constexpr auto wait_limit = 3000ms;  // how long any expected event may take
constexpr auto quiet_time = 250ms;   // how long we watch for something that must not happen

// --- a test policy: identity from X-User, refusals from X-Reject, revocable, records events ---

struct policy_state {
    std::mutex m;
    std::vector<std::tuple<std::string, std::string, json>> events;  // user, event name, data
    std::set<std::string> invalid;

    std::size_t event_count() {
        std::lock_guard<std::mutex> lock(m);
        return events.size();
    }
    void invalidate(const std::string& user) {
        std::lock_guard<std::mutex> lock(m);
        invalid.insert(user);
    }
};

struct test_policy {
    struct identity {
        std::string user;
    };

    std::shared_ptr<policy_state> state = std::make_shared<policy_state>();

    imbus::admission<identity> authenticate(const imbus::http_request& request) {
        const std::string reject = request.header("X-Reject");
        if (reject == "401") return imbus::admission<identity>::reject(401, "who are you?");
        if (reject == "403") return imbus::admission<identity>::reject(403, "not you");
        return imbus::admission<identity>::accept({request.header("X-User")});
    }
    bool still_valid(const identity& who) {
        std::lock_guard<std::mutex> lock(state->m);
        return state->invalid.count(who.user) == 0;
    }
    void on_event(const identity& who, const std::string& name, const json& data) {
        if (name == "boom") throw std::runtime_error("on_event exploded");
        std::lock_guard<std::mutex> lock(state->m);
        state->events.emplace_back(who.user, name, data);
    }
};

// --- the fixture ------------------------------------------------------------------------------

using tweak_fn = std::function<void(imbus::server_options&)>;

template <class Policy = imbus::public_policy> struct fixture {
    imbus::manual_clock clock;
    log_capture log;
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus;
    imbus::basic_server<Policy> server;

    explicit fixture(const tweak_fn& tweak = {}, Policy policy = Policy())
        : store(store_options()), dispatcher(dispatcher_options()), bus(store, dispatcher, bus_options()),
          server(bus, std::move(policy), server_options(tweak)) {
        server.listen("127.0.0.1", 0);
        server.start();
    }

    std::uint16_t port() const { return server.port(); }
    std::string url() const { return "ws://127.0.0.1:" + std::to_string(server.port()) + "/websocket"; }

    std::int64_t send(const std::string& name, json payload = json::object(), const std::string& type = "test/note") {
        auto ids = bus.send(name, type, payload);
        REQUIRE(ids.size() == 1);
        return ids[0];
    }

    // An imbus::client that does not reconnect; connected, not yet subscribed.
    std::unique_ptr<imbus::client> client(std::vector<std::pair<std::string, std::string>> headers = {},
                                          std::string version = IMBUS_PROTOCOL_VERSION) {
        imbus::client_options o;
        o.reconnect = false;
        o.headers = std::move(headers);
        o.version = std::move(version);
        o.log = {};
        auto c = std::make_unique<imbus::client>(o);
        c->connect(url());
        return c;
    }

    std::size_t subscribers_of(const std::string& name) const {
        return dispatcher.subscribers_of(imbus::channel(bus.db(), name));
    }

private:
    imbus::memory_store_options store_options() {
        imbus::memory_store_options o;
        o.clock = std::ref(clock);
        o.log = log.logger();
        return o;
    }
    imbus::dispatcher_options dispatcher_options() {
        imbus::dispatcher_options o;
        o.log = log.logger();
        return o;
    }
    imbus::bus_options bus_options() {
        imbus::bus_options o;
        o.db = "db";
        o.log = log.logger();
        return o;
    }
    imbus::server_options server_options(const tweak_fn& tweak) {
        imbus::server_options o;
        o.threads = 1;
        o.idle_ping = 60s;  // no pings unless a case asks for them
        o.pong_timeout = 60s;
        o.lifetime = 60s;
        o.lifetime_jitter = 0ms;
        o.open_handshake_timeout = 2000ms;
        o.close_handshake_timeout = 1000ms;
        o.gc_interval = std::chrono::seconds(0);
        o.log = log.logger();
        if (tweak) tweak(o);
        return o;
    }
};

// --- helpers ----------------------------------------------------------------------------------

std::string subscribe_text(const std::vector<std::string>& channels, std::int64_t last) {
    return json({{"event_name", "subscribe"}, {"data", {{"channels", channels}, {"last", last}}}}).dump();
}

// One server frame, parsed; it must be a non-empty JSON array.
json read_frame_json(raw_ws& ws) {
    json frame = json::parse(ws.read_text(wait_limit));
    REQUIRE(frame.is_array());
    REQUIRE(!frame.empty());
    return frame;
}

// `other`, subscribed to "a", still receives a new notification on "a".
template <class F> void check_receives(F& f, imbus::client& other) {
    const auto id = f.send("a", {{"check", "other"}});
    auto got = other.take(1, wait_limit);
    REQUIRE(got.size() == 1);
    CHECK(got[0]["id"] == id);
}

// A client subscribed to "a" that has received everything stored so far (synchronised).
template <class F> std::unique_ptr<imbus::client> subscribed_other(F& f) {
    auto other = f.client({{"X-User", "other"}});
    other->subscribe({"a"}, 0);
    const auto id = f.send("a", {{"sync", "other"}});
    auto got = other->take(1, wait_limit);
    REQUIRE(got.size() == 1);
    REQUIRE(got[0]["id"] == id);
    return other;
}

// The answer to a malformed request: one element shaped like a notification, whose id is the
// client's cursor, saying which event was refused and why.
void check_refused(raw_ws& ws, const json& event_name, std::int64_t id = 0) {
    const json frame = read_frame_json(ws);
    REQUIRE(frame.size() == 1);
    CHECK(frame[0]["id"] == id);
    CHECK(frame[0]["message"]["type"] == "bus/request_refused");
    CHECK(frame[0]["message"]["payload"]["event_name"] == event_name);
    CHECK(!frame[0]["message"]["payload"]["error"].get<std::string>().empty());
}

// After a malformed request on `bad`: `bad` is still open, a valid subscribe on it brings the
// rows already stored, live rows follow, and `other` keeps receiving.
template <class F> void check_both_still_work(F& f, raw_ws& bad, imbus::client& other) {
    const auto stored = f.send("a", {{"n", "stored"}});
    auto got = other.take(1, wait_limit);
    REQUIRE(got.size() == 1);
    CHECK(got[0]["id"] == stored);

    bad.send_text(subscribe_text({"a"}, 0));
    json frame = read_frame_json(bad);
    CHECK(frame.back()["id"] == stored);

    const auto live = f.send("a", {{"n", "live"}});
    frame = read_frame_json(bad);
    CHECK(ids_of(frame) == std::vector<std::int64_t>{live});
    got = other.take(1, wait_limit);
    REQUIRE(got.size() == 1);
    CHECK(got[0]["id"] == live);
}

}  // namespace

// ============================================================================================
// Handshake
// ============================================================================================

TEST_CASE("handshake: a path other than options.path is 404") {
    fixture<> f;
    CHECK(raw_ws::handshake_reply(f.port(), "/nowhere?version=19.0-2").status == 404);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket/x?version=19.0-2").status == 404);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocketx?version=19.0-2").status == 404);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2").status == 101);
}

TEST_CASE("handshake: Sec-WebSocket-Version other than 13 or missing is 426 with Sec-WebSocket-Version: 13") {
    fixture<> f;
    for (const std::string version : {"8", "99", ""}) {
        CAPTURE(version);
        auto reply =
            raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"Sec-WebSocket-Version", version}});
        CHECK(reply.status == 426);
        CHECK(reply.header("sec-websocket-version") == "13");
    }
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"Sec-WebSocket-Version", "13"}}).status ==
          101);
}

TEST_CASE("handshake: Origin allow-list") {
    fixture<> f([](imbus::server_options& o) { o.allowed_origins = {"https://app.example"}; });
    auto ok = raw_ws::connect(f.port(), "/websocket?version=19.0-2", {{"Origin", "https://app.example"}});
    f.send("a", {{"n", 1}});
    ok.send_text(subscribe_text({"a"}, 0));
    CHECK(read_frame_json(ok).size() == 1);

    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"Origin", "https://evil.example"}}).status ==
          403);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"Origin", "https://app.example.evil"}})
              .status == 403);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2").status == 403);  // no Origin
}

TEST_CASE("handshake: a policy rejection answers the policy's status") {
    fixture<test_policy> f;
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"X-Reject", "401"}}).status == 401);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"X-Reject", "403"}}).status == 403);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"X-User", "alice"}}).status == 101);

    imbus::client_options o;
    o.reconnect = false;
    o.log = {};
    o.headers = {{"X-Reject", "401"}};
    imbus::client refused(o);
    std::error_code ec;
    refused.connect(f.url(), ec);
    CHECK(ec);
    CHECK(refused.handshake_status() == 401);
    CHECK(refused.handshake_reason() == "who are you?");  // the policy's reason, not "Invalid HTTP status."
    std::string thrown;
    try {
        refused.connect(f.url());
    } catch (const std::system_error& e) {
        thrown = e.what();
    }
    CHECK(thrown.find("HTTP 401: who are you?") != std::string::npos);
}

TEST_CASE("handshake probe: a plain GET of the WebSocket path answers what the handshake would get") {
    fixture<test_policy> f;
    auto probe = [&](imbus_test::header_list headers) {
        return imbus_test::http_request(f.port(), "GET", "/websocket?version=19.0-2", "", headers);
    };
    const auto refused = probe({{"X-Reject", "401"}});
    CHECK(refused.status == 401);
    CHECK(json::parse(refused.body)["error"] == "who are you?");
    CHECK(probe({{"X-Reject", "403"}}).status == 403);
    const auto accepted = probe({{"X-User", "alice"}});
    CHECK(accepted.status == 426);
    CHECK(accepted.header("upgrade") == "websocket");
    CHECK(json::parse(accepted.body)["error"].get<std::string>().find("Upgrade: websocket") != std::string::npos);
    CHECK(imbus_test::http_request(f.port(), "POST", "/websocket", "{}").status == 404);  // GET only
    CHECK(f.server.connection_count() == 0);
}

// ============================================================================================
// OUTDATED_VERSION
// ============================================================================================

TEST_CASE("version: with a User-Agent, a wrong or missing version is closed 1000 OUTDATED_VERSION") {
    fixture<> f;
    for (const std::string target : {"/websocket?version=18.0-1", "/websocket", "/websocket?other=1"}) {
        CAPTURE(target);
        auto ws = raw_ws::connect(f.port(), target);  // raw_ws sends a User-Agent
        auto closed = ws.wait_close(wait_limit);
        CHECK(closed.code == 1000);
        CHECK(closed.reason == "OUTDATED_VERSION");
    }
    auto old = f.client({}, "18.0-1");  // imbus::client always sends websocketpp's User-Agent
    auto status = old->wait_closed(wait_limit);
    REQUIRE(status);
    CHECK(status->code == 1000);
    CHECK(status->reason == "OUTDATED_VERSION");

    // The right version with a User-Agent stays open.
    auto current = f.client();
    current->subscribe({"a"}, 0);
    check_receives(f, *current);
}

TEST_CASE("version: without a User-Agent the version is not checked") {
    fixture<> f;
    for (const std::string target : {"/websocket?version=18.0-1", "/websocket"}) {
        CAPTURE(target);
        auto ws = raw_ws::connect(f.port(), target, {}, /*user_agent=*/false);
        const auto stored = f.send("a", {{"target", target}});
        ws.send_text(subscribe_text({"a"}, stored - 1));
        CHECK(ids_of(read_frame_json(ws)) == std::vector<std::int64_t>{stored});
        const auto live = f.send("a");
        CHECK(ids_of(read_frame_json(ws)) == std::vector<std::int64_t>{live});
    }
}

// ============================================================================================
// subscribe
// ============================================================================================

TEST_CASE("subscribe: the first subscribe adopts the client's last") {
    fixture<> f;
    const auto a1 = f.send("a"), a2 = f.send("a"), a3 = f.send("a");
    auto c = f.client();
    c->subscribe({"a"}, a1);
    CHECK(ids_of(c->take(2, wait_limit)) == std::vector<std::int64_t>{a2, a3});
    const auto a4 = f.send("a");
    CHECK(ids_of(c->take(1, wait_limit)) == std::vector<std::int64_t>{a4});
    CHECK(c->take(1, quiet_time).empty());
}

TEST_CASE("subscribe: a later subscribe keeps the server's cursor, not the client's last") {
    fixture<> f;
    f.send("a");
    f.send("a");
    f.send("a");
    auto c = f.client();
    c->subscribe({"a"}, 0);
    REQUIRE(c->take(3, wait_limit).size() == 3);  // the server's cursor is now at 3
    const auto b4 = f.send("b");                  // not subscribed to b yet: not delivered
    c->subscribe({"a", "b"}, 1);                  // a lower last: must not repeat 2 and 3
    auto got = c->take(1, wait_limit);            // the re-subscribe's dispatch
    CHECK(ids_of(got) == std::vector<std::int64_t>{b4});
    CHECK(c->take(1, quiet_time).empty());
    const auto a5 = f.send("a");
    CHECK(ids_of(c->take(1, wait_limit)) == std::vector<std::int64_t>{a5});
}

TEST_CASE("subscribe: a channel left is no longer delivered") {
    fixture<> f;
    auto c = f.client();
    c->subscribe({"a", "b"}, 0);
    const auto a1 = f.send("a");
    CHECK(ids_of(c->take(1, wait_limit)) == std::vector<std::int64_t>{a1});
    c->subscribe({"b"});
    REQUIRE(wait_until([&] { return f.subscribers_of("a") == 0; }));
    f.send("a");  // must not arrive
    const auto b3 = f.send("b");
    CHECK(ids_of(c->take(1, wait_limit)) == std::vector<std::int64_t>{b3});
    CHECK(c->take(1, quiet_time).empty());
    CHECK(f.subscribers_of("b") == 1);
}

TEST_CASE("subscribe: every subscribe dispatches at once what the store holds after the cursor") {
    fixture<> f;
    const auto a1 = f.send("a"), a2 = f.send("a");
    auto c = f.client();
    c->subscribe({"a"}, 0);  // first subscribe: rows stored before it arrive without a new send
    CHECK(ids_of(c->take(2, wait_limit)) == std::vector<std::int64_t>{a1, a2});

    const auto b3 = f.send("b"), b4 = f.send("b");  // after the cursor, on a channel not yet followed
    c->subscribe({"a", "b"});                       // a later subscribe: they arrive without a new send
    CHECK(ids_of(c->take(2, wait_limit)) == std::vector<std::int64_t>{b3, b4});
    CHECK(c->take(1, quiet_time).empty());
}

TEST_CASE("subscribe: last == 0 uses the 50 s first-poll window") {
    fixture<> f;
    f.send("a", {{"age", "55 s"}});
    f.clock.advance(10s);
    const auto mid = f.send("a", {{"age", "45 s"}});
    f.clock.advance(45s);
    const auto fresh = f.send("a", {{"age", "0 s"}});
    auto c = f.client();
    c->subscribe({"a"}, 0);
    CHECK(ids_of(c->take(2, wait_limit)) == std::vector<std::int64_t>{mid, fresh});
    const auto next = f.send("a");
    CHECK(ids_of(c->take(1, wait_limit)) == std::vector<std::int64_t>{next});
}

TEST_CASE("subscribe: last above the newest id counts as 0 (first-poll window)") {
    fixture<> f;
    f.send("a", {{"age", "old"}});
    f.clock.advance(60s);
    const auto a2 = f.send("a"), a3 = f.send("a");
    auto ws = raw_ws::connect(f.port());
    ws.send_text(subscribe_text({"a"}, 1000));
    json frame = read_frame_json(ws);
    // The in-band missed signal (brief: last beyond newest) comes first, carrying the client's last.
    REQUIRE(frame.size() == 3);
    CHECK(frame[0]["id"] == 1000);
    CHECK(frame[0]["message"]["type"] == "bus/missed_notifications");
    CHECK(frame[0]["message"]["payload"]["last"] == 1000);
    CHECK(ids_of(json(json::array({frame[1], frame[2]}))) == std::vector<std::int64_t>{a2, a3});
    const auto a4 = f.send("a");
    CHECK(ids_of(read_frame_json(ws)) == std::vector<std::int64_t>{a4});
}

TEST_CASE("subscribe: after a store reset imbus::client resumes from the rows it got, not from the marker's id") {
    fixture<> f;
    const auto a1 = f.send("a"), a2 = f.send("a");
    auto c = f.client();
    c->subscribe({"a"}, 1000);  // a last from before the store was reset
    const auto got = c->take(3, wait_limit);
    REQUIRE(got.size() == 3);
    CHECK(got[0]["message"]["type"] == "bus/missed_notifications");
    CHECK(ids_of(std::vector<json>{got[1], got[2]}) == std::vector<std::int64_t>{a1, a2});
    // The marker carried 1000; resuming from it would ask for a reset store again and again.
    CHECK(c->last_id() == a2);
}

// ============================================================================================
// Requests: probe, malformed requests, events
// ============================================================================================

TEST_CASE("request: the binary 0x00 probe is ignored") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_binary(std::string(1, '\0'));
    ws.send_binary(std::string(1, '\0'));
    // Nothing answers the probes: the first frame is the subscribe's dispatch.
    check_both_still_work(f, ws, *other);
    CHECK(f.log.count_at_least(imbus::log_level::warning) == 0);
}

TEST_CASE("request: invalid JSON is logged and answered bus/request_refused, the connection stays open") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_text("{\"event_name\": \"subscribe\", ");
    ws.send_text("not json at all");
    ws.send_binary("\xff\xfe");  // binary messages are not UTF-8 checked: just not JSON
    for (int i = 0; i < 3; ++i) check_refused(ws, nullptr);
    CHECK(f.log.count_at_least(imbus::log_level::warning) >= 3);
    CHECK(f.server.metrics().requests_refused.load() == 3);
    check_both_still_work(f, ws, *other);
}

TEST_CASE("request: a missing or non-string event_name is answered bus/request_refused, the connection stays open") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_text(R"({"data":{"channels":["a"],"last":0}})");
    ws.send_text(R"({"event_name":7,"data":{"channels":["a"],"last":0}})");
    ws.send_text(R"(["subscribe"])");
    for (int i = 0; i < 3; ++i) check_refused(ws, nullptr);
    CHECK(f.subscribers_of("a") == 1);  // only `other`: nothing was subscribed
    check_both_still_work(f, ws, *other);
}

TEST_CASE("request: a subscribe with a non-string channel is answered bus/request_refused, the connection stays open") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_text(R"({"event_name":"subscribe","data":{"channels":["a",1],"last":0}})");
    ws.send_text(R"({"event_name":"subscribe","data":{"channels":["a",["db","b"]],"last":0}})");
    for (int i = 0; i < 2; ++i) check_refused(ws, "subscribe");
    CHECK(f.subscribers_of("a") == 1);
    check_both_still_work(f, ws, *other);
}

TEST_CASE("request: a subscribe with a non-integer last is answered bus/request_refused, the connection stays open") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_text(R"({"event_name":"subscribe","data":{"channels":["a"],"last":"1"}})");
    ws.send_text(R"({"event_name":"subscribe","data":{"channels":["a"],"last":1.5}})");
    for (int i = 0; i < 2; ++i) check_refused(ws, "subscribe");
    CHECK(f.subscribers_of("a") == 1);
    check_both_still_work(f, ws, *other);
}

TEST_CASE(
    "request: before a subscribe a refusal carries the last the client sent, after it the connection's position") {
    fixture<> f;
    f.send("a");
    f.send("a");
    auto ws = raw_ws::connect(f.port());
    ws.send_text(R"({"event_name":"subscribe","data":{"channels":[7],"last":1}})");
    check_refused(ws, "subscribe", 1);
    ws.send_text(subscribe_text({"a"}, 1));
    CHECK(ids_of(read_frame_json(ws)) == std::vector<std::int64_t>{2});
    ws.send_text(R"({"event_name":"subscribe","data":{"channels":"a","last":0}})");
    check_refused(ws, "subscribe", 2);
    const auto live = f.send("a");
    CHECK(ids_of(read_frame_json(ws)) == std::vector<std::int64_t>{live});
}

TEST_CASE("request: custom events reach policy.on_event with the identity, name and data") {
    fixture<test_policy> f;
    auto state = f.server.policy().state;
    auto alice = f.client({{"X-User", "alice"}});
    alice->send("update_presence", {{"inactivity_period", 1234}});
    alice->send("my_app/typing", json::array({1, "two"}));
    REQUIRE(wait_until([&] { return state->event_count() == 2; }));
    std::lock_guard<std::mutex> lock(state->m);
    CHECK(std::get<0>(state->events[0]) == "alice");
    CHECK(std::get<1>(state->events[0]) == "update_presence");
    CHECK(std::get<2>(state->events[0]) == json({{"inactivity_period", 1234}}));
    CHECK(std::get<1>(state->events[1]) == "my_app/typing");
    CHECK(std::get<2>(state->events[1]) == json::array({1, "two"}));
}

TEST_CASE("request: unknown events with the default policy are accepted silently") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_text(R"({"event_name":"update_presence","data":{"inactivity_period":0}})");
    ws.send_text(R"({"event_name":"no_such_event"})");
    check_both_still_work(f, ws, *other);
    CHECK(f.log.count_at_least(imbus::log_level::warning) == 0);
}

TEST_CASE("request: an exception from policy.on_event is logged and the connection stays (as in Odoo)") {
    fixture<test_policy> f;
    auto other = subscribed_other(f);
    auto alice = f.client({{"X-User", "alice"}});
    alice->send("boom", json::object());
    alice->send("after", json{{"n", 1}});  // handled after the failure, on the same connection
    CHECK(wait_until([&] {
        std::lock_guard<std::mutex> lock(f.server.policy().state->m);
        return !f.server.policy().state->events.empty();
    }));
    CHECK(f.log.contains("on_event exploded"));
    CHECK(f.server.metrics().event_errors.load() == 1);
    CHECK_FALSE(alice->wait_closed(0ms));
    alice->subscribe({"a"}, f.store.newest_id());
    CHECK(wait_until([&] { return f.subscribers_of("a") == 2; }));
    const auto id = f.send("a", {{"to", "both"}});
    for (auto* c : {alice.get(), other.get()}) {
        auto got = c->take(1, wait_limit);
        REQUIRE(got.size() == 1);
        CHECK(got[0]["id"] == id);
    }
}

// ============================================================================================
// Limits and close codes
// ============================================================================================

TEST_CASE("close 1009: a message over max_message_bytes, whole or in fragments") {
    fixture<> f([](imbus::server_options& o) { o.max_message_bytes = 1024; });
    auto other = subscribed_other(f);

    auto whole = raw_ws::connect(f.port());
    whole.send_text(std::string(2000, 'x'));
    CHECK(whole.wait_close(wait_limit).code == 1009);

    auto fragmented = raw_ws::connect(f.port());
    fragmented.send_frame(raw_ws::op_text, std::string(600, ' '), /*fin=*/false);
    fragmented.send_frame(raw_ws::op_continuation, std::string(600, ' '), /*fin=*/true);
    CHECK(fragmented.wait_close(wait_limit).code == 1009);

    // Under the limit, a fragmented request is reassembled and served.
    auto fine = raw_ws::connect(f.port());
    std::string request = subscribe_text({"a"}, 0);
    request += std::string(900 - request.size(), ' ');
    fine.send_frame(raw_ws::op_text, request.substr(0, 450), false);
    fine.send_frame(raw_ws::op_continuation, request.substr(450), true);
    CHECK(read_frame_json(fine).size() >= 1);

    check_receives(f, *other);
}

TEST_CASE("close 1009: a client still sending its too-big message reads the close code, not a reset") {
    // The server stops reading at the frame header; without draining, the client's write
    // blocks on full buffers until the close handshake timeout closes the socket with input
    // unread, and the reset loses the close frame waiting in the client's buffer.
    fixture<> f([](imbus::server_options& o) {
        o.max_message_bytes = 1024;
        o.close_handshake_timeout = 500ms;
        o.close_drain_linger = 60s;  // ends when the client does: no race with a slow drain
    });
    auto other = subscribed_other(f);
    auto big = std::make_unique<raw_ws>(raw_ws::connect(f.port()));
    const std::size_t size = 32u << 20;  // more than loopback's socket buffers hold
    std::string header = {char(0x81), char(0x80 | 127)};
    for (int shift = 56; shift >= 0; shift -= 8) header += char((std::uint64_t(size) >> shift) & 0xff);
    header += std::string("\x11\x22\x33\x44", 4);  // the masking key
    big->send_raw_bytes(header);
    big->send_raw_bytes(std::string(size, 'x'));  // throws on a reset
    CHECK(big->wait_close(wait_limit).code == 1009);
    big.reset();  // the client leaves: the drain ends, the connection closes
    CHECK(wait_until([&] { return f.server.metrics().closes(1009) == 1; }));
    check_receives(f, *other);
}

TEST_CASE("close 1013: more than rate_burst frames within rate_burst * rate_delay") {
    fixture<> f([](imbus::server_options& o) {
        o.rate_burst = 5;
        o.rate_delay = 100ms;  // window 500 ms
    });
    auto other = subscribed_other(f);

    auto ws = raw_ws::connect(f.port());
    const std::string probe(1, '\0');
    for (int i = 0; i < 4; ++i) ws.send_binary(probe);
    ws.send_text(subscribe_text({"a"}, 0));  // the 5th frame is still served
    CHECK(read_frame_json(ws).size() >= 1);
    ws.send_binary(probe);  // the 6th within the window
    CHECK(ws.wait_close(wait_limit).code == 1013);

    // Frames spread over more than the window are fine.
    auto slow = raw_ws::connect(f.port());
    for (int i = 0; i < 5; ++i) slow.send_binary(probe);
    std::this_thread::sleep_for(600ms);  // the window must pass in real time: nothing to observe
    for (int i = 0; i < 4; ++i) slow.send_binary(probe);
    slow.send_text(subscribe_text({"a"}, 0));
    CHECK(read_frame_json(slow).size() >= 1);

    check_receives(f, *other);
}

TEST_CASE("close 1007: invalid UTF-8 in a text message") {
    fixture<> f;
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.send_text("{\"event_name\":\"\xc3\x28\"}");
    CHECK(ws.wait_close(wait_limit).code == 1007);
    check_receives(f, *other);
}

TEST_CASE("close 1007: a text message whose fragments end inside a UTF-8 sequence, or an invalid close reason") {
    fixture<> f;
    auto other = subscribed_other(f);
    // "ab" and the first byte of the euro sign (e2 82 ac), then its second byte with FIN.
    auto cut = raw_ws::connect(f.port());
    cut.send_frame(raw_ws::op_text, "ab\xe2", /*fin=*/false);
    cut.send_frame(raw_ws::op_continuation, "\x82", /*fin=*/true);
    CHECK(cut.wait_close(wait_limit).code == 1007);
    // The same sequence split over fragments but whole is a text message like any other.
    auto whole = raw_ws::connect(f.port());
    whole.send_frame(raw_ws::op_text, "{\"event_name\":\"\xe2", false);
    whole.send_frame(raw_ws::op_continuation, "\x82", false);
    whole.send_frame(raw_ws::op_continuation, "\xac\"}", true);
    whole.send_text(subscribe_text({"a"}, 0));
    const auto id = f.send("a");
    CHECK(ids_of(read_frame_json(whole)).back() == id);
    REQUIRE(other->take(1, wait_limit).size() == 1);
    // A close frame whose reason is not UTF-8.
    auto reason = raw_ws::connect(f.port());
    reason.send_frame(raw_ws::op_close, std::string("\x03\xe8\xc3\x28", 4));
    CHECK(reason.wait_close(wait_limit).code == 1007);
    check_receives(f, *other);
}

TEST_CASE("close 1002: unmasked frame, reserved bits, reserved opcode") {
    fixture<> f;
    auto other = subscribed_other(f);
    const std::string request = subscribe_text({"a"}, 0);

    auto unmasked = raw_ws::connect(f.port());
    unmasked.send_frame(raw_ws::op_text, request, true, /*mask=*/false);
    CHECK(unmasked.wait_close(wait_limit).code == 1002);

    for (std::uint8_t rsv : {4, 2, 1}) {
        CAPTURE(int(rsv));
        auto reserved = raw_ws::connect(f.port());
        reserved.send_frame(raw_ws::op_text, request, true, true, rsv);
        CHECK(reserved.wait_close(wait_limit).code == 1002);
    }

    auto opcode = raw_ws::connect(f.port());
    opcode.send_frame(0x3, request);
    CHECK(opcode.wait_close(wait_limit).code == 1002);

    check_receives(f, *other);
}

TEST_CASE("idle: a ping after idle_ping, no pong within pong_timeout drops TCP without a close frame") {
    fixture<> f([](imbus::server_options& o) {
        o.idle_ping = 200ms;
        o.pong_timeout = 150ms;
    });
    auto other = subscribed_other(f);  // imbus::client answers pings
    const auto start = steady::now();
    auto ws = raw_ws::connect(f.port());
    ws.set_auto_pong(false);
    auto frame = ws.read_frame(wait_limit);
    REQUIRE(frame);
    CHECK(frame->opcode == raw_ws::op_ping);
    CHECK(steady::now() - start >= 200ms);
    auto closed = ws.wait_close(wait_limit);
    CHECK(closed.tcp_closed_without_close_frame);
    CHECK(closed.code == 1006);
    // Measured from before the connection opened, so both bounds hold however late we read.
    CHECK(steady::now() - start >= 200ms + 150ms);
    CHECK(other->is_open());
    check_receives(f, *other);
}

// Exposes a bug: with pong_timeout >= idle_ping, the idle timer sends the next ping before the
// pong deadline, and websocketpp's ping() cancels the pending pong timer, so a peer that never
// answers is never dropped (it lives until its lifetime ends).
TEST_CASE("idle: a peer that never answers is dropped even when pong_timeout > idle_ping") {
    fixture<> f([](imbus::server_options& o) {
        o.idle_ping = 100ms;
        o.pong_timeout = 300ms;
    });
    auto other = subscribed_other(f);
    auto ws = raw_ws::connect(f.port());
    ws.set_auto_pong(false);
    int pings = 0;
    const auto deadline = steady::now() + 1500ms;  // ping at ~100 ms, pong due by ~400 ms
    while (!ws.closed_by_peer() && steady::now() < deadline) {
        auto frame =
            ws.read_frame(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now()) + 1ms);
        if (frame && frame->opcode == raw_ws::op_ping) ++pings;
    }
    CAPTURE(pings);
    CHECK(ws.closed_by_peer());
    check_receives(f, *other);
}

TEST_CASE("idle: a client that answers pings stays open past several idle periods") {
    fixture<> f([](imbus::server_options& o) {
        o.idle_ping = 150ms;
        o.pong_timeout = 100ms;
    });
    auto c = f.client();
    c->subscribe({"a"}, 0);
    auto ws = raw_ws::connect(f.port());
    ws.set_auto_pong(false);  // answered by hand below, to count the pings
    int pings = 0;
    const auto until = steady::now() + 1000ms;
    while (steady::now() < until) {
        auto frame = ws.read_frame(std::chrono::duration_cast<std::chrono::milliseconds>(until - steady::now()) + 1ms);
        if (!frame) {
            REQUIRE_FALSE(ws.closed_by_peer());
            continue;
        }
        REQUIRE(frame->opcode == raw_ws::op_ping);
        ++pings;
        ws.send_frame(raw_ws::op_pong, frame->payload);
    }
    CHECK(pings >= 3);
    ws.set_auto_pong(true);
    const auto stored = f.send("a");
    ws.send_text(subscribe_text({"a"}, 0));
    CHECK(read_frame_json(ws).back()["id"] == stored);
    CHECK(c->is_open());
    CHECK(ids_of(c->take(1, wait_limit)) == std::vector<std::int64_t>{stored});
}

TEST_CASE("close 4002: after the lifetime (jitter 0)") {
    fixture<> f([](imbus::server_options& o) {
        o.lifetime = 300ms;
        o.lifetime_jitter = 0ms;
    });
    const auto start = steady::now();
    auto c = f.client();
    c->subscribe({"a"}, 0);
    auto status = c->wait_closed(wait_limit);
    REQUIRE(status);
    CHECK(status->code == 4002);
    CHECK(status->reason == "KEEP_ALIVE_TIMEOUT");
    CHECK(steady::now() - start >= 290ms);
}

TEST_CASE("close 4001: still_valid false before a request") {
    fixture<test_policy> f;
    auto state = f.server.policy().state;
    auto other = subscribed_other(f);
    auto alice = f.client({{"X-User", "alice"}});
    alice->send("first", json::object());
    REQUIRE(wait_until([&] { return state->event_count() == 1; }));
    state->invalidate("alice");
    alice->send("second", json::object());
    auto status = alice->wait_closed(wait_limit);
    REQUIRE(status);
    CHECK(status->code == 4001);
    CHECK(state->event_count() == 1);  // the request was not served
    check_receives(f, *other);
}

TEST_CASE("close 4001: still_valid false before a dispatch") {
    fixture<test_policy> f;
    auto state = f.server.policy().state;
    auto other = subscribed_other(f);
    auto alice = f.client({{"X-User", "alice"}});
    alice->subscribe({"a"}, 0);
    REQUIRE(alice->take(1, wait_limit).size() == 1);  // the row stored by subscribed_other
    state->invalidate("alice");
    const auto id = f.send("a");
    auto status = alice->wait_closed(wait_limit);
    REQUIRE(status);
    CHECK(status->code == 4001);
    CHECK(alice->take(1, 0ms).empty());  // the row was not sent to alice
    CHECK(ids_of(other->take(1, wait_limit)) == std::vector<std::int64_t>{id});
}

TEST_CASE("close 4001: server.revalidate() closes connections no longer valid") {
    fixture<test_policy> f;
    auto state = f.server.policy().state;
    auto other = subscribed_other(f);
    auto alice = f.client({{"X-User", "alice"}});
    alice->subscribe({"a"}, 0);
    REQUIRE(alice->take(1, wait_limit).size() == 1);
    state->invalidate("alice");
    CHECK_FALSE(alice->wait_closed(quiet_time));  // nothing happens by itself
    f.server.revalidate();
    auto status = alice->wait_closed(wait_limit);
    REQUIRE(status);
    CHECK(status->code == 4001);
    CHECK(other->is_open());
    check_receives(f, *other);
}

TEST_CASE("close: a finished close handshake ends TCP at once, whoever began it, only a protocol-error close drains") {
    // A drain that lasts until the peer ends TCP: only a close the peer may not have read (it
    // is still sending) waits for that; the clients here never end TCP themselves.
    fixture<test_policy> f([](imbus::server_options& o) {
        o.close_drain_linger = 60s;
        o.close_handshake_timeout = 60s;
    });
    auto connections = [&] { return f.server.tcp_connection_count(); };
    // The server closes (4001), the client answers: the server ends the connection.
    auto alice = raw_ws::connect(f.port(), "/websocket?version=19.0-2", {{"X-User", "alice"}});
    alice.send_text(subscribe_text({"a"}, 0));
    f.send("a");
    read_frame_json(alice);
    f.server.policy().state->invalidate("alice");
    f.server.revalidate();
    CHECK(alice.wait_close(wait_limit).code == 4001);
    CHECK(wait_until([&] { return connections() == 0; }));
    // The client closes, the server answers and ends the connection.
    auto bob = raw_ws::connect(f.port(), "/websocket?version=19.0-2", {{"X-User", "bob"}});
    bob.close(1000);
    CHECK(bob.wait_close(wait_limit).code == 1000);
    CHECK(wait_until([&] { return connections() == 0; }));
    // A protocol error: the connection stays, reading, until the client ends TCP.
    auto carol =
        std::make_unique<raw_ws>(raw_ws::connect(f.port(), "/websocket?version=19.0-2", {{"X-User", "carol"}}));
    carol->send_frame(0x3, "x");
    CHECK(carol->wait_close(wait_limit).code == 1002);
    std::this_thread::sleep_for(quiet_time);  // a negative: the connection is not ended
    CHECK(connections() == 1);
    carol.reset();
    CHECK(wait_until([&] { return connections() == 0; }));
}

TEST_CASE("close 1001: stop() closes every connected client") {
    fixture<> f;
    auto c1 = f.client();
    auto c2 = f.client();
    c1->subscribe({"a"}, 0);
    auto ws = raw_ws::connect(f.port());
    REQUIRE(wait_until([&] { return f.server.connection_count() == 3; }));
    f.server.stop();
    CHECK(ws.wait_close(wait_limit).code == 1001);
    for (auto* c : {c1.get(), c2.get()}) {
        auto status = c->wait_closed(wait_limit);
        REQUIRE(status);
        CHECK(status->code == 1001);
    }
    f.server.wait();
    CHECK(f.server.connection_count() == 0);
    CHECK_THROWS(raw_ws::connect(f.port()));
}

// Odoo's _after_subscribe_data: what the policy's on_subscribe returns reaches that client
// alone, after the history it asked for (so it is never older than what precedes it), numbered
// with the position it follows; a later subscribe answers again.
namespace {
struct greeting_policy {
    using identity = imbus::public_policy::identity;
    imbus::admission<identity> authenticate(const imbus::http_request&) {
        return imbus::admission<identity>::accept({});
    }
    std::vector<imbus::direct_message> on_subscribe(const identity&, const std::vector<imbus::channel>& granted) {
        json names = json::array();
        for (const auto& c : granted) names.push_back(c.to_json()[1]);
        if (names.size() == 1 && names[0] == "explode") throw std::runtime_error("on_subscribe exploded");
        if (names.size() == 1 && names[0] == "garbled") return {{"hello", std::string("\xff")}};  // not UTF-8
        return {{"hello", {{"channels", names}}}, {"second", 2}};
    }
};
}  // namespace

TEST_CASE("request: policy.on_subscribe's messages reach that client alone, after its history") {
    fixture<greeting_policy> f;
    const auto old1 = f.send("a"), old2 = f.send("a");
    auto ws = raw_ws::connect(f.port());
    ws.send_text(subscribe_text({"a"}, old1 - 1));
    json got = read_frame_json(ws);
    while (got.size() < 4) {
        const json more = read_frame_json(ws);
        got.insert(got.end(), more.begin(), more.end());
    }
    REQUIRE(got.size() == 4);
    CHECK(ids_of(json::array({got[0], got[1]})) == std::vector<std::int64_t>{old1, old2});
    CHECK(got[2] == json({{"id", old2}, {"message", {{"type", "hello"}, {"payload", {{"channels", {"a"}}}}}}}));
    CHECK(got[3] == json({{"id", old2}, {"message", {{"type", "second"}, {"payload", 2}}}}));

    auto other = raw_ws::connect(f.port());  // gets its own greeting, and nothing of ws's
    other.send_text(subscribe_text({"a"}, old2));
    CHECK(read_frame_json(other).size() == 2);
    ws.send_text(subscribe_text({"a", "b"}, old2));
    const json again = read_frame_json(ws);
    REQUIRE(again.size() == 2);
    CHECK(again[0]["message"]["payload"]["channels"] == json({"a", "b"}));
    const auto next = f.send("a");
    CHECK(ids_of(read_frame_json(other)) == std::vector<std::int64_t>{next});

    // A hook that throws, or a message that cannot be serialized: logged, counted, and the
    // connection goes on.
    ws.send_text(subscribe_text({"explode"}, 0));
    ws.send_text(subscribe_text({"garbled"}, 0));
    CHECK(wait_until([&] { return f.server.metrics().event_errors.load() == 2; }));
    CHECK(f.log.contains("on_subscribe exploded"));
    ws.send_text(subscribe_text({"a"}, 0));
    const auto live = f.send("a");
    auto is_live_row = [&](const json& n) { return n["id"] == live && n["message"]["type"] == "test/note"; };
    json tail = read_frame_json(ws);
    while (std::none_of(tail.begin(), tail.end(), is_live_row)) tail = read_frame_json(ws);
}

// The answer is asked for once the history has been read: a commit racing with the subscribe
// is in the history or after the answer, never in the history and newer than the answer. The
// policy makes the race certain by committing right after it looked at the store.
namespace {
struct racing_policy {
    using identity = imbus::public_policy::identity;
    std::shared_ptr<std::atomic<imbus::bus*>> bus = std::make_shared<std::atomic<imbus::bus*>>(nullptr);
    imbus::admission<identity> authenticate(const imbus::http_request&) {
        return imbus::admission<identity>::accept({});
    }
    std::vector<imbus::direct_message> on_subscribe(const identity&, const std::vector<imbus::channel>&) {
        imbus::bus& b = *bus->load();
        const auto seen = b.store().newest_id();
        b.send("a", "test/note", {{"racing", true}});
        return {{"snapshot", {{"seen", seen}}}};
    }
};
}  // namespace

TEST_CASE("request: policy.on_subscribe is asked after the history is read, so its answer is never older") {
    fixture<racing_policy> f;
    f.server.policy().bus->store(&f.bus);
    const auto old1 = f.send("a"), old2 = f.send("a");
    auto ws = raw_ws::connect(f.port());
    ws.send_text(subscribe_text({"a"}, old1 - 1));
    std::vector<json> got;
    auto snapshot_at = [&] {
        for (std::size_t i = 0; i < got.size(); ++i)
            if (got[i]["message"]["type"] == "snapshot") return i;
        return got.size();
    };
    while (snapshot_at() == got.size() || got.back()["message"]["type"] != "test/note") {
        const json frame = read_frame_json(ws);
        got.insert(got.end(), frame.begin(), frame.end());
    }
    const std::size_t at = snapshot_at();
    const auto seen = got[at]["message"]["payload"]["seen"].get<std::int64_t>();
    CHECK(seen == old2);
    for (std::size_t i = 0; i < at; ++i) CHECK(got[i]["id"].get<std::int64_t>() <= seen);  // nothing newer before it
    CHECK(got.back()["id"].get<std::int64_t>() == old2 + 1);                               // the racing row, after
}

// Exposes a bug: on_message catches std::exception only; anything else thrown by a policy hook
// escapes into the I/O thread's io_context::run() and std::terminate()s the whole server.
// Last in the file: when the bug is present this case aborts the process.
namespace {
struct odd_throw_policy {
    using identity = imbus::public_policy::identity;
    imbus::admission<identity> authenticate(const imbus::http_request&) {
        return imbus::admission<identity>::accept({});
    }
    void on_event(const identity&, const std::string&, const json&) { throw 42; }
};
}  // namespace

TEST_CASE("request: a non-std exception from policy.on_event is contained as well") {
    fixture<odd_throw_policy> f;
    auto other = subscribed_other(f);
    auto c = f.client();
    c->send("anything", json::object());
    CHECK(wait_until([&] { return f.server.metrics().event_errors.load() == 1; }));
    CHECK(f.log.count_at_least(imbus::log_level::error) >= 1);
    CHECK_FALSE(c->wait_closed(0ms));
    check_receives(f, *other);
}

// A subscribe's cost is bounded by max_channels: a client asking for more is closed with 1008
// TOO_MANY_CHANNELS (counted), and one at the limit is served.
TEST_CASE("request: a subscribe over max_channels closes 1008 TOO_MANY_CHANNELS, one at the limit is served") {
    fixture<> f([](imbus::server_options& o) { o.max_channels = 5; });
    auto other = subscribed_other(f);
    std::vector<std::string> five{"a", "b", "c", "d", "e"}, six{"a", "b", "c", "d", "e", "f"};
    auto ok = raw_ws::connect(f.port());
    ok.send_text(json{{"event_name", "subscribe"}, {"data", {{"channels", five}, {"last", 0}}}}.dump());
    auto greedy = raw_ws::connect(f.port());
    greedy.send_text(json{{"event_name", "subscribe"}, {"data", {{"channels", six}, {"last", 0}}}}.dump());
    const auto closed = greedy.wait_close(wait_limit);
    CHECK(closed.code == 1008);
    CHECK(closed.reason == "TOO_MANY_CHANNELS");
    CHECK(f.server.metrics().too_many_channels.load() == 1);
    CHECK(f.log.contains("asked for 6 channels"));
    REQUIRE(wait_until([&] { return f.subscribers_of("e") == 1; }));
    const auto id = f.send("e", {{"n", 1}});
    std::int64_t seen = 0;
    while (seen < id) seen = json::parse(ok.read_text(wait_limit)).back()["id"].get<std::int64_t>();
    CHECK(seen == id);
    check_receives(f, *other);
}

// --- admission limits (issue 7) ------------------------------------------------------------

TEST_CASE("limits: beyond max_connections a handshake is 503, and a closed connection frees its place") {
    fixture<> f([](imbus::server_options& o) { o.max_connections = 2; });
    auto a = raw_ws::connect(f.port());
    auto b = raw_ws::connect(f.port());
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2").status == 503);
    CHECK(f.server.metrics().refusals(503) == 1);
    a.close(1000);
    REQUIRE(wait_until([&] { return f.server.connection_count() == 1; }));
    auto c = raw_ws::connect(f.port());  // a's place
    f.send("a", {{"n", 1}});
    c.send_text(subscribe_text({"a"}, 0));
    CHECK(read_frame_json(c).size() == 1);
}

TEST_CASE("limits: beyond max_connections_per_address a handshake from that address is 503") {
    fixture<> f([](imbus::server_options& o) { o.max_connections_per_address = 2; });
    std::vector<raw_ws> open;
    open.push_back(raw_ws::connect(f.port()));
    open.push_back(raw_ws::connect(f.port()));
    auto refused = raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2");
    CHECK(refused.status == 503);
    CHECK(refused.body.find("too many connections from 127.0.0.1") != std::string::npos);
    CHECK(f.log.contains("refused (503)"));
    open.pop_back();  // dropped without a close frame: the place comes back all the same
    REQUIRE(wait_until([&] { return f.server.connection_count() == 1; }));
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2").status == 101);
}

// A host holding bare TCP connections (no HTTP yet) must not escape the limits: they count
// from accept, and the connection beyond gets its 503 at once, readable before the close.
TEST_CASE("limits: bare TCP connections count against max_connections from accept, the next one gets 503") {
    fixture<> f([](imbus::server_options& o) {
        o.max_connections = 2;
        o.open_handshake_timeout = 10s;  // the bare ones stay for the whole test
    });
    asio::io_context io;
    std::vector<asio::ip::tcp::socket> bare;
    for (int i = 0; i < 2; ++i) {
        bare.emplace_back(io);
        bare.back().connect({asio::ip::make_address("127.0.0.1"), f.port()});
    }
    REQUIRE(wait_until([&] { return f.server.tcp_connection_count() == 2; }));
    const auto refused = raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2");
    CHECK(refused.status == 503);
    CHECK(refused.body.find("too many connections") != std::string::npos);
    CHECK(f.server.metrics().refusals(503) == 1);
    CHECK(f.server.tcp_connection_count() == 2);
    bare.pop_back();  // closed by its client: the place comes back
    REQUIRE(wait_until([&] { return f.server.tcp_connection_count() == 1; }));
    auto ok = raw_ws::connect(f.port());
    f.send("a", {{"n", 1}});
    ok.send_text(subscribe_text({"a"}, 0));
    CHECK(read_frame_json(ok).size() == 1);
}

TEST_CASE("limits: a TCP connection that never completes a handshake is dropped after open_handshake_timeout") {
    fixture<> f([](imbus::server_options& o) { o.open_handshake_timeout = 300ms; });
    for (const std::string& sent : {std::string(), std::string("GET /websocket HTTP/1.1\r\nHost: x\r\n")}) {
        CAPTURE(sent.size());
        asio::io_context io;
        asio::ip::tcp::socket s(io);
        s.connect({asio::ip::make_address("127.0.0.1"), f.port()});
        if (!sent.empty()) asio::write(s, asio::buffer(sent));
        const auto start = steady::now();
        char byte;
        asio::error_code ec;
        // The server answers nothing useful and closes; a blocking read returns at the close.
        while (!ec && steady::now() - start < 5s) s.read_some(asio::buffer(&byte, 1), ec);
        CHECK(ec == asio::error::eof);
        CHECK(steady::now() - start < 3s);
    }
    // Other clients are unaffected.
    auto ok = raw_ws::connect(f.port());
    f.send("a", {{"n", 1}});
    ok.send_text(subscribe_text({"a"}, 0));
    CHECK(read_frame_json(ok).size() == 1);
}

TEST_CASE("limits: a handshake with more than 16000 bytes of headers is refused") {
    fixture<> f;
    auto reply =
        raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2", {{"X-Padding", std::string(17000, 'x')}});
    CHECK(reply.status >= 400);
    CHECK(reply.status < 500);
    CHECK(raw_ws::handshake_reply(f.port(), "/websocket?version=19.0-2").status == 101);
}

// --- HTTP framing (issue 14) ------------------------------------------------------------------

// The value of one sample line "name{labels} value" of a Prometheus text page; -1 when absent.
double metric(const std::string& page, const std::string& sample) {
    const auto at = page.find("\n" + sample + " ");
    if (at == std::string::npos) return -1;
    return std::stod(page.substr(at + sample.size() + 2));
}

// A POST /bus/send that would publish one row on "a" if the server read it as the sender meant.
std::string send_request(const std::string& extra_headers, const std::string& body, bool with_length = true) {
    return "POST /bus/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\n" +
           (with_length ? "Content-Length: " + std::to_string(body.size()) + "\r\n" : std::string()) + extra_headers +
           "\r\n" + body;
}

TEST_CASE("http: ambiguous or malformed framing is refused before routing, logged and counted, nothing is published") {
    fixture<> f([](imbus::server_options& o) { o.api_key = "k"; });
    const std::string body = R"({"channel":"a","type":"t","payload":1})";
    const std::string chunked = "26\r\n" + body + "\r\n0\r\n\r\n";
    struct attempt {
        std::string name, bytes;
        int status;
    };
    const std::vector<attempt> attempts = {
        {"Content-Length and Transfer-Encoding", send_request("Transfer-Encoding: chunked\r\n", chunked), 400},
        {"two Content-Length headers", send_request("Content-Length: 5\r\n", body), 400},
        {"two equal Content-Length headers",
         send_request("Content-Length: " + std::to_string(body.size()) + "\r\n", body), 400},
        {"Content-Length with trailing junk", send_request("Content-Length: 38abc\r\n", body, false), 400},
        {"Content-Length with a sign", send_request("Content-Length: +38\r\n", body, false), 400},
        {"negative Content-Length", send_request("Content-Length: -1\r\n", body, false), 400},
        {"empty Content-Length", send_request("Content-Length: \r\n", body, false), 400},
        {"whitespace before the colon", send_request("Content-Length : 38\r\n", body, false), 400},
        {"whitespace before the colon, other header", send_request("X-Note : 1\r\n", body), 400},
        {"folded header line", send_request("X-Note: 1\r\n continued\r\n", body), 400},
        {"bare LF inside the headers", send_request("X-Note: 1\nContent-Length: 5\r\n", body), 400},
        {"control character in a value", send_request(std::string("X-Note: a\x01b\r\n"), body), 400},
        {"Transfer-Encoding alone", send_request("Transfer-Encoding: chunked\r\n", chunked, false), 501},
    };
    double counted = 0;
    for (const auto& a : attempts) {
        CAPTURE(a.name);
        const auto reply = imbus_test::raw_http(f.port(), a.bytes);
        CHECK(reply.status == a.status);
        CHECK(!reply.reason.empty());
        ++counted;
    }
    // Logged and counted, one each (after the reply is written, so waited for); the store got nothing.
    CHECK(wait_until([&] { return f.server.metrics().bad_requests.load() == counted; }));
    const auto page = imbus_test::http_request(f.port(), "GET", "/metrics").body;
    CHECK(metric(page, "imbus_bad_requests_total") == counted);
    INFO(f.log.dump());
    CHECK(f.log.contains("malformed request from 127.0.0.1"));
    CHECK(f.store.newest_id() == 0);

    // The same request, well framed, publishes; a WebSocket client is served meanwhile.
    const auto ok = imbus_test::raw_http(f.port(), send_request("", body));
    CHECK(ok.status == 200);
    CHECK(f.store.newest_id() == 1);
    auto ws = raw_ws::connect(f.port());
    ws.send_text(subscribe_text({"a"}, 0));
    CHECK(ids_of(read_frame_json(ws)) == std::vector<std::int64_t>{1});
}

TEST_CASE(
    "http: websocketpp's own refusals (headers over 16,000 bytes: 431, a body over max_http_body_bytes: 413) are "
    "counted too") {
    fixture<> f([](imbus::server_options& o) {
        o.api_key = "k";
        o.max_http_body_bytes = 1024;
    });
    const std::string big_body(2000, 'x');
    CHECK(imbus_test::raw_http(f.port(), send_request("", big_body)).status == 413);
    CHECK(imbus_test::raw_http(f.port(), send_request("X-Padding: " + std::string(17000, 'x') + "\r\n", "{}")).status ==
          431);
    CHECK(wait_until([&] { return f.server.metrics().bad_requests.load() == 2; }));
    CHECK(f.store.newest_id() == 0);
}

TEST_CASE("http: routes match the path as sent, a percent-encoded path is not the route") {
    fixture<> f([](imbus::server_options& o) { o.api_key = "k"; });
    const std::string body = R"({"channel":"a","type":"t","payload":1})";
    for (const std::string path : {"/bus%2fsend", "/%62us/send", "/bus/sen%64"}) {
        CAPTURE(path);
        auto r = imbus_test::http_request(f.port(), "POST", path, body, {{"Authorization", "Bearer k"}});
        CHECK(r.status == 404);
    }
    CHECK(imbus_test::http_request(f.port(), "GET", "/%6detrics").status == 404);
    CHECK(raw_ws::handshake_reply(f.port(), "/%77ebsocket?version=19.0-2").status == 404);
    CHECK(f.store.newest_id() == 0);
    CHECK(imbus_test::http_request(f.port(), "GET", "/metrics").status == 200);
}

// --- metrics (issue 7) -----------------------------------------------------------------------

TEST_CASE("metrics: GET /metrics counts connections, subscriptions, sends, closes by code, refusals and latency") {
    fixture<> f;
    auto a = f.client();
    auto b = f.client();
    a->subscribe({"a"}, 0);
    b->subscribe({"a"}, 0);
    REQUIRE(wait_until([&] { return f.subscribers_of("a") == 2; }));
    for (int i = 0; i < 3; ++i) f.send("a", {{"i", i}});
    REQUIRE(a->take(3, wait_limit).size() == 3);
    REQUIRE(b->take(3, wait_limit).size() == 3);
    b->close(1000);
    REQUIRE(wait_until([&] { return f.server.connection_count() == 1; }));
    CHECK(raw_ws::handshake_reply(f.port(), "/nowhere").status == 404);

    const auto reply = imbus_test::http_request(f.port(), "GET", "/metrics");
    REQUIRE(reply.status == 200);
    CHECK(reply.header("content-type").rfind("text/plain", 0) == 0);
    const std::string page = "\n" + reply.body;
    CAPTURE(reply.body);
    CHECK(metric(page, "imbus_connections_open") == 1);
    CHECK(metric(page, "imbus_connections_opened_total") == 2);
    CHECK(metric(page, "imbus_connections_subscribed") == 1);
    CHECK(metric(page, "imbus_channels") == 1);
    CHECK(metric(page, "imbus_notifications_sent_total") == 6);
    CHECK(metric(page, "imbus_frames_sent_total") >= 2);
    CHECK(metric(page, "imbus_closes_total{code=\"1000\"}") == 1);
    CHECK(f.server.metrics().closes(1000) == 1);
    CHECK(metric(page, "imbus_handshakes_refused_total{status=\"404\"}") == 1);
    CHECK(metric(page, "imbus_store_newest_id") == 3);
    CHECK(metric(page, "imbus_missed_notifications_signals_total") == 0);
    CHECK(metric(page, "imbus_slow_consumer_catch_ups_total") == 0);
    // Every frame sent from a live event is in the histogram; the buckets are cumulative.
    const double count = metric(page, "imbus_publish_to_send_seconds_count");
    CHECK(count >= 2);
    CHECK(count <= metric(page, "imbus_frames_sent_total"));
    CHECK(metric(page, "imbus_publish_to_send_seconds_bucket{le=\"+Inf\"}") == count);
    CHECK(metric(page, "imbus_publish_to_send_seconds_bucket{le=\"0.0005\"}") <=
          metric(page, "imbus_publish_to_send_seconds_bucket{le=\"2.5\"}"));
    CHECK(metric(page, "imbus_publish_to_send_seconds_sum") >= 0);
}

TEST_CASE("metrics: with a metrics_token, /metrics wants it, with an empty path there is no route") {
    fixture<> f([](imbus::server_options& o) { o.metrics_token = "scrape"; });
    CHECK(imbus_test::http_request(f.port(), "GET", "/metrics").status == 401);
    CHECK(imbus_test::http_request(f.port(), "GET", "/metrics", "", {{"Authorization", "Bearer nope"}}).status == 401);
    CHECK(imbus_test::http_request(f.port(), "GET", "/metrics", "", {{"Authorization", "Bearer scrape"}}).status ==
          200);

    fixture<> off([](imbus::server_options& o) { o.metrics_path.clear(); });
    CHECK(imbus_test::http_request(off.port(), "GET", "/metrics").status == 404);
}
