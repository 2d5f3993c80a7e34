// A connection's feed (detail::connection_feed) without a socket: what one connection is sent,
// and when. test_link stands where basic_server puts a websocketpp connection: frames land in a
// list, the test says when they have been written, and it runs the slices a shard would run.
// Built without websocketpp: the core (imbus::imbus) only.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include "imbus.hpp"
#include "support/faulty_store.hpp"
#include "support/test_helpers.hpp"

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace std::chrono_literals;
using imbus::json;
using imbus_test::ids_of;

// One connection as the feed sees it, recording every request the feed makes of it.
struct test_link : imbus::detail::feed_link {
    bool is_open = true;
    bool valid = true;                                   // what the policy says of the session
    std::size_t queued = 0;                              // bytes given to the socket and not yet written
    std::uint64_t others_queued = 0;                     // what every other connection holds
    std::vector<json> frames;                            // each frame's JSON, in order
    std::vector<imbus::detail::shared_wire_frame> sent;  // the frames themselves
    int flushes = 0;                                     // flush_after_slice calls
    bool catch_up_asked = false;                         // a catch-up frame waits for a slice
    bool resume_asked = false;                           // waiting for its queue to drain
    std::vector<std::chrono::milliseconds> retries;      // delays asked after failed reads
    std::optional<std::uint16_t> closed;
    std::vector<imbus::direct_message> greeting_messages;
    int greetings = 0;

    bool open() const override { return is_open; }
    std::size_t shard() const override { return 0; }
    std::string peer() const override { return "test peer"; }
    std::size_t queued_bytes() const override { return queued; }
    std::uint64_t all_queued_bytes() const override { return queued + others_queued; }
    bool queue(imbus::detail::shared_wire_frame frame) override {
        if (!is_open) return false;
        queued += frame->size();
        frames.push_back(json::parse(frame->bytes.substr(imbus::detail::wire_frame::header_room)));
        sent.push_back(std::move(frame));
        return true;
    }
    void flush_after_slice() override { ++flushes; }
    void catch_up_in_a_slice() override { catch_up_asked = true; }
    void resume_when_drained() override { resume_asked = true; }
    void retry_after(std::chrono::milliseconds delay) override { retries.push_back(delay); }
    void close(std::uint16_t code, const std::string&) override {
        closed = code;
        is_open = false;
    }
    bool still_valid() override {
        if (!valid) close(4001, "SESSION_EXPIRED");
        return valid;
    }
    std::vector<imbus::direct_message> greeting(const std::vector<imbus::channel>&) override {
        ++greetings;
        return greeting_messages;
    }

    // The notification elements received so far (markers and direct messages left out).
    std::vector<json> rows() const {
        std::vector<json> out;
        for (const auto& frame : frames)
            for (const auto& element : frame)
                if (element.at("message").at("type") == "test/row") out.push_back(element);
        return out;
    }
};

// One connection: its feed state, its link and its dispatcher subscription.
struct session {
    imbus::detail::feed_state state;
    test_link link;
    imbus::dispatcher::subscription subscription;
};

struct fixture {
    imbus::manual_clock clock;
    imbus::memory_store memory{[this] {
        imbus::memory_store_options o;
        o.clock = std::ref(clock);
        o.log = imbus_test::quiet();
        return o;
    }()};
    imbus_test::faulty_store store{memory};
    imbus::dispatcher dispatcher;
    imbus::bus bus{store, dispatcher, [] {
                       imbus::bus_options o;
                       o.db = "db";
                       o.log = imbus_test::quiet();
                       return o;
                   }()};
    imbus_test::log_capture log;
    imbus::server_options options = [this] {
        imbus::server_options o;
        o.log = log.logger();
        return o;
    }();
    imbus::server_metrics metrics;
    imbus::detail::connection_feed feed{store, dispatcher, options, metrics};
    bool lane_posted = false;
    imbus::dispatcher::lane lane{[this] { lane_posted = true; }};

    // What basic_server::on_subscribe does: the dispatcher first, then the feed.
    void subscribe(session& c, const std::vector<std::string>& names, std::int64_t last, bool greet = false) {
        std::vector<imbus::channel> channels;
        for (const auto& n : names) channels.push_back(bus.channel_for(n));
        if (!c.subscription)
            c.subscription =
                dispatcher.subscribe([this, &c](imbus::wakeup& w) { feed.on_wakeup(c.state, c.link, w); }, lane);
        c.subscription.set_channels(channels);
        feed.subscribe(c.state, c.link, channels, last, greet);
    }

    // What a shard's loop does: the catch-up slices and the wake-up slices, until both are idle.
    void run_slices(std::vector<session*> sessions) {
        for (int turns = 0; turns < 10000; ++turns) {
            bool ran = false;
            for (auto* c : sessions)
                if (std::exchange(c->link.catch_up_asked, false)) feed.catch_up_frame(c->state, c->link), ran = true;
            if (std::exchange(lane_posted, false)) lane.run(32), ran = true;
            if (!ran) return;
        }
        FAIL("the slices never went idle");
    }

    // Publishes rows of `bytes` until the connection's queue is full (nobody writes): the ids.
    std::vector<std::int64_t> fill_until_lagging(session& c, std::size_t bytes) {
        std::vector<std::int64_t> sent;
        while (!c.link.resume_asked) {
            sent.push_back(send("news", {{"text", std::string(bytes, 'x')}}));
            run_slices({&c});
            REQUIRE(sent.size() < 100);
        }
        return sent;
    }

    // Everything the socket held has been written: a lagging connection resumes.
    void drain(session& c) {
        c.link.queued = 0;
        if (std::exchange(c.link.resume_asked, false)) feed.resume(c.state, c.link);
    }

    std::int64_t send(const std::string& name, const json& payload = {{"n", 1}}) {
        imbus::transaction tx(bus);
        tx.send(name, "test/row", payload);
        const auto stored = tx.commit();
        return stored.back();
    }
};

}  // namespace

TEST_CASE_FIXTURE(fixture,
                  "feed: a first subscribe gets the last 50 s from the store, then live wake-ups continue it") {
    const auto old = send("news");
    clock.advance(51s);
    const auto recent = send("news");
    session c;
    subscribe(c, {"news"}, 0);
    CHECK(c.link.catch_up_asked);  // the history waits for a catch-up slice
    CHECK(c.link.frames.empty());
    run_slices({&c});
    CHECK(ids_of(c.link.rows()) == std::vector<std::int64_t>{recent});  // `old` is outside the window
    CHECK(old < recent);
    const auto live = send("news");
    run_slices({&c});
    CHECK(ids_of(c.link.rows()) == std::vector<std::int64_t>{recent, live});
    CHECK(c.link.frames.size() == 2);
    CHECK(c.link.flushes == 2);  // one write per slice that gave it frames
    CHECK(metrics.notifications_sent() == 2);
    CHECK(metrics.frames_sent() == 2);
}

TEST_CASE_FIXTURE(fixture, "feed: an event wholly for each recipient goes as one frame shared by all of them") {
    session a, b, partial;
    subscribe(a, {"news"}, 0);
    subscribe(b, {"news"}, 0);
    subscribe(partial, {"other"}, 0);
    run_slices({&a, &b, &partial});
    imbus::transaction tx(bus);
    tx.send("news", "test/row", {{"n", 1}});
    tx.send("other", "test/row", {{"n", 2}});
    const auto stored = tx.commit();
    imbus::transaction tx2(bus);
    tx2.send("news", "test/row", {{"n", 3}});
    const auto news_only = tx2.commit().back();
    run_slices({&a, &b, &partial});
    // The mixed commit: a and b have one row of it each, in frames of their own.
    REQUIRE(a.link.sent.size() == 2);
    REQUIRE(b.link.sent.size() == 2);
    CHECK(a.link.sent[0] != b.link.sent[0]);
    CHECK(ids_of(a.link.frames[0]) == std::vector<std::int64_t>{stored[0]});
    CHECK(ids_of(partial.link.rows()) == std::vector<std::int64_t>{stored[1]});
    // The commit on "news" alone: the very same frame object for both.
    CHECK(a.link.sent[1] == b.link.sent[1]);
    CHECK(ids_of(a.link.frames[1]) == std::vector<std::int64_t>{news_only});
}

TEST_CASE_FIXTURE(fixture,
                  "feed: a full queue stops live frames; once drained the client is caught up from the store, "
                  "nothing lost or twice") {
    options.max_outbound_bytes = 4096;
    options.catch_up_bytes = 1024;
    session c;
    subscribe(c, {"news"}, 0);
    run_slices({&c});
    const std::string text(200, 'x');
    std::vector<std::int64_t> sent = fill_until_lagging(c, text.size());
    CHECK(c.state.lagging);
    CHECK(metrics.slow_consumer_catch_ups.load() == 1);
    CHECK(log.contains("test peer is slow"));
    CHECK(c.link.queued >= options.max_outbound_bytes);
    const std::size_t frames_when_full = c.link.frames.size();
    for (int i = 0; i < 20; ++i) sent.push_back(send("news", {{"text", text}}));
    run_slices({&c});
    CHECK(c.link.frames.size() == frames_when_full);  // a lagging client costs no more work
    // The socket drains a few times; each catch-up frame fits the room left in the queue.
    for (int round = 0; c.link.resume_asked || c.state.lagging; ++round) {
        REQUIRE(round < 100);
        const std::size_t before = c.link.frames.size();
        drain(c);
        run_slices({&c});
        for (std::size_t i = before; i < c.link.sent.size(); ++i)
            CHECK(c.link.sent[i]->size() <= options.catch_up_bytes + 16);
    }
    CHECK(ids_of(c.link.rows()) == sent);
    CHECK(c.link.queued <= options.max_outbound_bytes);
    CHECK(metrics.outbound_peak.load() >= c.link.queued);
}

TEST_CASE_FIXTURE(fixture,
                  "feed: past max_outbound_total, a client holding catch_up_bytes waits; one holding less "
                  "keeps flowing") {
    options.max_outbound_total = 10000;
    options.catch_up_bytes = 1000;
    session holding, small;
    subscribe(holding, {"news"}, 0);
    subscribe(small, {"news"}, 0);
    run_slices({&holding, &small});
    holding.link.queued = 2000;  // above catch_up_bytes
    small.link.queued = 10;
    holding.link.others_queued = small.link.others_queued = 20000;  // the total is over its bound
    const auto id = send("news");
    run_slices({&holding, &small});
    CHECK(holding.link.resume_asked);
    CHECK(holding.link.frames.empty());
    CHECK(metrics.outbound_total_lags.load() == 1);
    CHECK(ids_of(small.link.rows()) == std::vector<std::int64_t>{id});
    holding.link.others_queued = 0;
    drain(holding);
    run_slices({&holding, &small});
    CHECK(ids_of(holding.link.rows()) == std::vector<std::int64_t>{id});
}

TEST_CASE_FIXTURE(fixture,
                  "feed: a failed read is tried again after a doubling delay; after store_retries more "
                  "failures the connection is closed 1011") {
    options.store_retries = 3;
    options.store_retry_delay = 100ms;
    send("news");
    session c;
    store.fail(imbus_test::faulty_store::fetch_op);
    subscribe(c, {"news"}, 0);
    run_slices({&c});
    for (int attempt = 0; attempt < 3; ++attempt) {
        REQUIRE(c.link.retries.size() == std::size_t(attempt + 1));
        CHECK(c.state.retrying);
        feed.retry(c.state, c.link);
        run_slices({&c});
    }
    CHECK(c.link.retries == std::vector<std::chrono::milliseconds>{100ms, 200ms, 400ms});
    CHECK(c.link.closed == std::optional<std::uint16_t>(1011));
    CHECK(metrics.store_errors.load() == 4);
    CHECK(log.contains("failed 4 times in a row; closing (1011)"));
    CHECK(c.link.frames.empty());
}

TEST_CASE_FIXTURE(fixture,
                  "feed: once a read succeeds the position stands and the next failure waits the first "
                  "delay again") {
    options.store_retry_delay = 100ms;
    const auto first = send("news");
    session c;
    store.fail(imbus_test::faulty_store::fetch_op, 2);
    subscribe(c, {"news"}, 0);
    run_slices({&c});
    feed.retry(c.state, c.link);
    run_slices({&c});
    feed.retry(c.state, c.link);
    run_slices({&c});
    CHECK(ids_of(c.link.rows()) == std::vector<std::int64_t>{first});
    CHECK(c.link.retries == std::vector<std::chrono::milliseconds>{100ms, 200ms});
    // A live event that does not continue the position makes the wake-up poll; that poll fails.
    c.state.follow->set_channels({bus.channel_for("news")});  // forgets the epoch: only a poll vouches
    send("other");                                            // a gap in the ids before the next event
    store.fail(imbus_test::faulty_store::fetch_op, 1);
    const auto second = send("news");
    run_slices({&c});
    CHECK(c.link.retries.size() == 3);
    CHECK(c.link.retries.back() == 100ms);
    feed.retry(c.state, c.link);
    run_slices({&c});
    CHECK(ids_of(c.link.rows()) == std::vector<std::int64_t>{first, second});
    CHECK_FALSE(c.link.closed);
}

TEST_CASE_FIXTURE(fixture,
                  "feed: the policy's greeting ends the history's last frame, asked once the history is read") {
    options.catch_up_bytes = 300;
    std::vector<std::int64_t> sent;
    for (int i = 0; i < 10; ++i) sent.push_back(send("news", {{"text", std::string(100, 'x')}}));
    session c;
    c.link.greeting_messages = {{"hello", {{"who", "me"}}}};
    subscribe(c, {"news"}, 0, true);
    run_slices({&c});
    REQUIRE(c.link.frames.size() > 1);  // the history took several frames
    CHECK(c.link.greetings == 1);
    const json& last_frame = c.link.frames.back();
    const json& greeting = last_frame.back();
    CHECK(greeting.at("message").at("type") == "hello");
    CHECK(greeting.at("message").at("payload") == json{{"who", "me"}});
    CHECK(greeting.at("id") == sent.back());  // numbered after the history it follows
    for (std::size_t i = 0; i + 1 < c.link.frames.size(); ++i)
        for (const auto& element : c.link.frames[i]) CHECK(element.at("message").at("type") == "test/row");
    CHECK(ids_of(c.link.rows()) == sent);
    // A later subscribe without greeting asks nothing.
    subscribe(c, {"news", "more"}, 0, false);
    run_slices({&c});
    CHECK(c.link.greetings == 1);
}

TEST_CASE_FIXTURE(fixture, "feed: a greeting that throws is logged and counted; the history still goes") {
    struct throwing_link : test_link {
        std::vector<imbus::direct_message> greeting(const std::vector<imbus::channel>&) override {
            throw std::runtime_error("no greeting today");
        }
    };
    const auto id = send("news");
    imbus::detail::feed_state state;
    throwing_link link;
    std::vector<imbus::channel> channels{bus.channel_for("news")};
    feed.subscribe(state, link, channels, 0, true);
    REQUIRE(std::exchange(link.catch_up_asked, false));
    feed.catch_up_frame(state, link);
    CHECK(ids_of(link.rows()) == std::vector<std::int64_t>{id});
    CHECK(metrics.event_errors.load() == 1);
    CHECK(log.contains("policy.on_subscribe failed: no greeting today"));
}

TEST_CASE_FIXTURE(fixture,
                  "feed: rows collected while a client lagged are reported by a missed marker before the rest") {
    options.max_outbound_bytes = 2048;
    options.catch_up_bytes = 512;
    session c;
    subscribe(c, {"news"}, 0);
    run_slices({&c});
    fill_until_lagging(c, 200);
    const std::int64_t position = c.state.follow->position();
    for (int i = 0; i < 5; ++i) send("news");
    clock.advance(std::chrono::seconds(IMBUS_RETENTION_SECONDS + 1));
    memory.collect_garbage();  // everything after the position is gone
    const auto kept = send("news");
    drain(c);
    run_slices({&c});
    const std::size_t frames = c.link.frames.size();
    REQUIRE(frames >= 1);
    // The first frame after the drain starts with the marker, carrying the client's position.
    json resumed;
    for (const auto& frame : c.link.frames)
        for (const auto& element : frame)
            if (element.at("message").at("type") == "bus/missed_notifications") resumed = element;
    REQUIRE(!resumed.is_null());
    CHECK(resumed.at("id") == position);
    CHECK(resumed.at("message").at("payload").at("last") == position);
    CHECK(metrics.missed_signals.load() == 1);
    CHECK(c.link.rows().back().at("id") == kept);
}

TEST_CASE_FIXTURE(fixture, "feed: a session the policy no longer finds valid is closed 4001 and sent nothing more") {
    session c;
    subscribe(c, {"news"}, 0);
    run_slices({&c});
    c.link.valid = false;
    send("news");
    run_slices({&c});
    CHECK(c.link.closed == std::optional<std::uint16_t>(4001));
    CHECK(c.link.frames.empty());
}

TEST_CASE_FIXTURE(fixture, "feed: a resubscribe keeps the position and catches up only the new channel's history") {
    const auto before = send("more");
    session c;
    subscribe(c, {"news"}, 0);
    run_slices({&c});
    const auto news = send("news");
    run_slices({&c});
    subscribe(c, {"news", "more"}, 0);
    run_slices({&c});
    // "more"'s row is older than the position: the server cursor does not go back for it.
    CHECK(ids_of(c.link.rows()) == std::vector<std::int64_t>{news});
    CHECK(before < news);
    const auto later = send("more");
    run_slices({&c});
    CHECK(ids_of(c.link.rows()) == std::vector<std::int64_t>{news, later});
}
