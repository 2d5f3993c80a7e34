// The dispatcher (who is woken, coalescing, overflow, containment, concurrency) and the
// follower (rows from events when they continue, store polls otherwise, no gaps, no repeats).
// Built without IMBUS_WITH_SQLITE; tests/second_tu.cpp is linked in as a second translation unit.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include "imbus.hpp"
#include "support/faulty_store.hpp"
#include "support/test_helpers.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

int imbus_second_tu_uses();  // tests/second_tu.cpp

// Readable failure messages for id lists and channels.
namespace doctest {
template <> struct StringMaker<std::vector<std::int64_t>> {
    static String convert(const std::vector<std::int64_t>& v) {
        std::string s = "[";
        for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
        return (s + "]").c_str();
    }
};
template <> struct StringMaker<imbus::channel> {
    static String convert(const imbus::channel& c) { return c.key().c_str(); }
};
template <> struct StringMaker<std::vector<imbus::channel>> {
    static String convert(const std::vector<imbus::channel>& v) {
        std::string s = "[";
        for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + v[i].key();
        return (s + "]").c_str();
    }
};
}  // namespace doctest

namespace {

using imbus::channel;
using imbus::json;
using imbus_test::ids_of;
using imbus_test::log_capture;
using imbus_test::quiet;
using event_ptr = std::shared_ptr<const imbus::commit_event>;

const channel ca("db", "a");
const channel cb("db", "b");
const channel cc("db", "c");

// An event carrying one fake row per channel, ids from `first` on (no store involved).
event_ptr make_event(std::int64_t first, const std::vector<channel>& channels) {
    std::vector<imbus::notification> rows;
    for (const auto& c : channels)
        rows.push_back(imbus::notification{first++, c, imbus::make_message("t", json{{"n", first}}), {}});
    return imbus::commit_event::from_rows(std::move(rows));
}

// An executor whose tasks wait in a queue until the test runs them by hand.
struct manual_executor {
    std::vector<std::function<void()>> queue;
    imbus::executor get() {
        return [this](std::function<void()> task) { queue.push_back(std::move(task)); };
    }
    // Runs what is queued now (tasks queued while running wait for the next call).
    std::size_t run() {
        auto tasks = std::move(queue);
        queue.clear();
        for (auto& t : tasks) t();
        return tasks.size();
    }
};

// An executor with one worker thread, like a connection's strand.
struct thread_executor {
    std::mutex m;
    std::condition_variable cv;
    std::deque<std::function<void()>> tasks;
    bool stopping = false;
    std::thread worker{[this] {
        for (;;) {
            std::function<void()> task;
            {
                std::unique_lock<std::mutex> lock(m);
                cv.wait(lock, [this] { return stopping || !tasks.empty(); });
                if (tasks.empty()) return;  // stopping, and everything queued has run
                task = std::move(tasks.front());
                tasks.pop_front();
            }
            task();
        }
    }};
    imbus::executor get() {
        return [this](std::function<void()> task) {
            {
                std::lock_guard<std::mutex> lock(m);
                tasks.push_back(std::move(task));
            }
            cv.notify_one();
        };
    }
    // Runs everything queued so far (and what those tasks queue), then joins the worker.
    void finish() {
        {
            std::lock_guard<std::mutex> lock(m);
            stopping = true;
        }
        cv.notify_one();
        if (worker.joinable()) worker.join();
    }
    ~thread_executor() { finish(); }
};

imbus::dispatcher_options options_with(std::size_t max_pending, imbus::logger log = quiet()) {
    imbus::dispatcher_options o;
    o.max_pending = max_pending;
    o.log = std::move(log);
    return o;
}

// A store that counts polls and forwards everything to a memory_store: proves when the
// follower took rows from events and when it had to ask the store.
class counting_store final : public imbus::store {
public:
    explicit counting_store(imbus::store& inner) : inner_(inner) {}
    std::unique_ptr<write_transaction> begin() override { return inner_.begin(); }
    imbus::poll_result fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit = 0,
                             std::size_t max_bytes = 0) override {
        ++fetches;
        return inner_.fetch(channels, last, limit, max_bytes);
    }
    std::int64_t newest_id() override { return inner_.newest_id(); }
    std::int64_t oldest_id() override { return inner_.oldest_id(); }
    bool contains(std::int64_t id) override { return inner_.contains(id); }
    std::size_t collect_garbage() override { return inner_.collect_garbage(); }

    std::atomic<int> fetches{0};

private:
    imbus::store& inner_;
};

imbus::memory_store_options store_options(imbus::manual_clock& clock) {
    imbus::memory_store_options o;
    o.clock = std::ref(clock);
    o.log = quiet();
    return o;
}

imbus::bus_options bus_options() {
    imbus::bus_options o;
    o.db = "db";
    o.log = quiet();
    return o;
}

imbus::pending_message message_on(const channel& c, int n) {
    return imbus::pending_message{c, imbus::make_message("t", json{{"n", n}})};
}

}  // namespace

// --- who is woken -----------------------------------------------------------------------------

// One commit touching several channels must reach a subscriber once, and only its subscribers.
TEST_CASE("a notify wakes each distinct subscriber once, and only subscribers of its channels") {
    imbus::dispatcher d(options_with(1024));
    int runs_ab = 0, runs_b = 0, runs_c = 0, runs_none = 0;
    std::vector<event_ptr> seen_ab;
    auto sub_ab = d.subscribe([&](imbus::wakeup& w) {
        ++runs_ab;
        seen_ab.insert(seen_ab.end(), w.events.begin(), w.events.end());
    });
    auto sub_b = d.subscribe([&](imbus::wakeup&) { ++runs_b; });
    auto sub_c = d.subscribe([&](imbus::wakeup&) { ++runs_c; });
    auto sub_none = d.subscribe([&](imbus::wakeup&) { ++runs_none; });
    sub_ab.set_channels({ca, cb});
    sub_b.set_channels({cb});
    sub_c.set_channels({cc});
    CHECK(d.subscriber_count() == 4);
    CHECK(d.channel_count() == 3);

    const auto event = make_event(1, {ca, cb, ca});  // rows on a, b, a: channels [a, b]
    CHECK(event->channels == std::vector<channel>{ca, cb});
    d.notify(event);
    CHECK(runs_ab == 1);
    REQUIRE(seen_ab.size() == 1);
    CHECK(seen_ab[0] == event);  // the shared event itself, not a copy
    CHECK(runs_b == 1);
    CHECK(runs_c == 0);
    CHECK(runs_none == 0);

    d.notify(make_event(10, {cc}));
    CHECK(runs_ab == 1);
    CHECK(runs_b == 1);
    CHECK(runs_c == 1);

    // a bare wake-up naming a channel twice still wakes once
    d.notify(imbus::commit_event::wake_up({cb, cb, ca}));
    CHECK(runs_ab == 2);
    CHECK(runs_b == 2);

    // nothing, and a wake-up naming no channel, wake nobody
    d.notify(nullptr);
    d.notify(imbus::commit_event::wake_up({}));
    d.notify(make_event(20, {channel("db", "nobody")}));
    CHECK(runs_ab == 2);
    CHECK(runs_b == 2);
    CHECK(runs_c == 1);
    CHECK(runs_none == 0);
}

// set_channels is a replacement (docs/PROTOCOL.md §4 subscribe): left channels stop delivering, and
// the dispatcher's index does not keep empty entries for channels nobody listens to.
TEST_CASE("set_channels replaces the channel set and removes empty entries") {
    imbus::dispatcher d(options_with(1024));
    int runs = 0;
    auto sub = d.subscribe([&](imbus::wakeup&) { ++runs; });
    CHECK(sub);
    CHECK(sub.channels().empty());
    CHECK(d.channel_count() == 0);

    sub.set_channels({ca, cb, ca, channel()});  // duplicates and the empty channel are dropped
    CHECK(sub.channels() == std::vector<channel>{ca, cb});
    CHECK(d.channel_count() == 2);
    CHECK(d.subscribers_of(ca) == 1);
    CHECK(d.subscribers_of(cb) == 1);

    sub.set_channels({cb, cc});
    CHECK(sub.channels() == std::vector<channel>{cb, cc});
    CHECK(d.channel_count() == 2);
    CHECK(d.subscribers_of(ca) == 0);
    CHECK(d.subscribers_of(cb) == 1);
    CHECK(d.subscribers_of(cc) == 1);

    d.notify(make_event(1, {ca}));
    CHECK(runs == 0);  // a left channel is no longer delivered
    d.notify(make_event(2, {cb}));
    d.notify(make_event(3, {cc}));
    CHECK(runs == 2);

    // another subscriber on b keeps b's entry alive when this one leaves it
    int other_runs = 0;
    auto other = d.subscribe([&](imbus::wakeup&) { ++other_runs; });
    other.set_channels({cb});
    CHECK(d.subscribers_of(cb) == 2);
    sub.set_channels({});
    CHECK(sub.channels().empty());
    CHECK(d.channel_count() == 1);
    CHECK(d.subscribers_of(cb) == 1);
    CHECK(d.subscribers_of(cc) == 0);
    d.notify(make_event(4, {cb}));
    CHECK(runs == 2);
    CHECK(other_runs == 1);
    CHECK(d.subscriber_count() == 2);
}

// A connection that goes away must leave every channel, whether closed or destroyed.
TEST_CASE("close and destruction of a subscription leave every channel") {
    imbus::dispatcher d(options_with(1024));
    int runs = 0;
    auto sub = d.subscribe([&](imbus::wakeup&) { ++runs; });
    sub.set_channels({ca, cb});
    CHECK(d.subscriber_count() == 1);
    sub.close();
    CHECK_FALSE(sub);
    CHECK(sub.channels().empty());
    CHECK(d.subscriber_count() == 0);
    CHECK(d.channel_count() == 0);
    CHECK(d.subscribers_of(ca) == 0);
    d.notify(make_event(1, {ca, cb}));
    CHECK(runs == 0);
    sub.close();  // closing twice is harmless
    CHECK(d.subscriber_count() == 0);
    // a closed subscription cannot take channels again
    std::error_code thrown;
    try {
        sub.set_channels({ca});
    } catch (const std::system_error& e) {
        thrown = e.code();
    }
    CHECK(thrown == imbus::errc::subscription_closed);
    CHECK(d.channel_count() == 0);

    {
        auto scoped = d.subscribe([&](imbus::wakeup&) { ++runs; });
        scoped.set_channels({cc});
        CHECK(d.subscribers_of(cc) == 1);
        auto moved = std::move(scoped);  // ownership moves; nothing leaves yet
        CHECK(moved);
        CHECK(d.subscribers_of(cc) == 1);
        CHECK(d.subscriber_count() == 1);
    }
    CHECK(d.subscriber_count() == 0);
    CHECK(d.channel_count() == 0);

    // move-assigning over a live subscription closes the old one
    auto first = d.subscribe([&](imbus::wakeup&) { ++runs; });
    first.set_channels({ca});
    first = d.subscribe([&](imbus::wakeup&) { ++runs; });
    CHECK(d.subscriber_count() == 1);
    CHECK(d.subscribers_of(ca) == 0);
    CHECK(runs == 0);
}

// --- coalescing and overflow --------------------------------------------------------------------

// Wake-ups that arrive before the handler runs are merged: one task, one run, all events in order.
TEST_CASE("notifies before the handler runs coalesce into one task and one run") {
    imbus::dispatcher d(options_with(1024));
    manual_executor ex;
    std::vector<std::vector<std::int64_t>> runs;  // first ids of each run's events
    std::vector<bool> overflowed;
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            runs.emplace_back();
            for (const auto& e : w.events) runs.back().push_back(e->first_id());
            overflowed.push_back(w.overflowed);
        },
        ex.get());
    sub.set_channels({ca, cb});

    d.notify(make_event(1, {ca}));
    d.notify(make_event(2, {cb}));
    d.notify(make_event(3, {ca, cb}));
    CHECK(ex.queue.size() == 1);  // one queued task for three notifies
    CHECK(runs.empty());          // nothing runs before the executor does

    CHECK(ex.run() == 1);
    REQUIRE(runs.size() == 1);
    CHECK(runs[0] == std::vector<std::int64_t>{1, 2, 3});
    CHECK(overflowed[0] == false);
    CHECK(ex.queue.empty());

    // once the run is over, the next notify queues a new task
    d.notify(make_event(5, {ca}));
    CHECK(ex.queue.size() == 1);
    ex.run();
    REQUIRE(runs.size() == 2);
    CHECK(runs[1] == std::vector<std::int64_t>{5});
}

// A notify that lands while the handler runs must lead to another run, never be lost.
TEST_CASE("a notify during a handler run leads to another run") {
    imbus::dispatcher d(options_with(1024));
    manual_executor ex;
    std::vector<std::vector<std::int64_t>> runs;
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            runs.emplace_back();
            for (const auto& e : w.events) runs.back().push_back(e->first_id());
            if (runs.size() == 1) d.notify(make_event(2, {ca}));  // arrives mid-run
        },
        ex.get());
    sub.set_channels({ca});
    d.notify(make_event(1, {ca}));
    REQUIRE(ex.queue.size() == 1);
    ex.run();
    REQUIRE(runs.size() == 2);
    CHECK(runs[0] == std::vector<std::int64_t>{1});
    CHECK(runs[1] == std::vector<std::int64_t>{2});
    CHECK(ex.queue.empty());  // the running task picked it up; no extra task was queued
}

// The same from another thread: the notifier races the end of the run, deterministically
// ordered with promises. Nothing may be lost and the handler never runs twice at once.
TEST_CASE("a notify from another thread while the handler runs is not lost") {
    imbus::dispatcher d(options_with(1024));
    thread_executor ex;
    std::promise<void> in_handler, notified;
    auto notified_future = notified.get_future();
    std::vector<std::int64_t> seen;  // written on the executor thread only
    std::atomic<int> running{0}, overlap{0};
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            if (running.fetch_add(1) != 0) ++overlap;
            for (const auto& e : w.events) seen.push_back(e->first_id());
            if (seen.size() == 1) {
                in_handler.set_value();
                notified_future.wait();  // the other thread notifies while we are here
            }
            running.fetch_sub(1);
        },
        ex.get());
    sub.set_channels({ca});
    std::thread notifier([&] { d.notify(make_event(1, {ca})); });
    in_handler.get_future().wait();
    d.notify(make_event(2, {ca}));
    d.notify(make_event(3, {ca}));
    notified.set_value();
    notifier.join();
    ex.finish();
    CHECK(seen == std::vector<std::int64_t>{1, 2, 3});
    CHECK(overlap == 0);
}

// A connection closed while its task waits on the strand must not get its handler run after
// close() returned (the handler may use state the connection has already torn down).
TEST_CASE("a task queued before close runs no handler") {
    imbus::dispatcher d(options_with(1024));
    manual_executor ex;
    int runs = 0;
    auto sub = d.subscribe([&](imbus::wakeup&) { ++runs; }, ex.get());
    sub.set_channels({ca});
    d.notify(make_event(1, {ca}));
    REQUIRE(ex.queue.size() == 1);
    sub.close();
    ex.run();
    CHECK(runs == 0);
    d.notify(make_event(2, {ca}));
    CHECK(ex.queue.empty());
}

// A subscriber that falls behind must not grow memory: events beyond max_pending are dropped
// and the handler is told to catch up from the store instead.
TEST_CASE("max_pending overflow sets overflowed and bounds the events") {
    imbus::dispatcher d(options_with(2));
    manual_executor ex;
    int runs = 0;
    bool overflowed = false;
    std::vector<std::int64_t> ids;
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            ++runs;
            overflowed = w.overflowed;
            ids.clear();
            for (const auto& e : w.events) ids.push_back(e->first_id());
        },
        ex.get());
    sub.set_channels({ca});
    for (int i = 1; i <= 5; ++i) d.notify(make_event(i, {ca}));
    CHECK(ex.queue.size() == 1);
    ex.run();
    CHECK(runs == 1);
    CHECK(overflowed);
    CHECK(ids.size() <= 2);
    REQUIRE_FALSE(ids.empty());
    CHECK(ids.back() == 5);  // the newest event is kept
    CHECK(std::is_sorted(ids.begin(), ids.end()));

    // after the catch-up signal the subscriber is back to normal
    d.notify(make_event(6, {ca}));
    ex.run();
    CHECK(runs == 2);
    CHECK_FALSE(overflowed);
    CHECK(ids == std::vector<std::int64_t>{6});
}

// --- lanes ---------------------------------------------------------------------------------------

// A lane whose runs wait until the test calls them, counting how often it was posted.
struct manual_lane {
    int posts = 0;
    imbus::dispatcher::lane lane{[this] { ++posts; }};
};

// A server's event loop must get one task per commit, not one per subscriber, and serve the
// subscribers a slice at a time in the order they were woken.
TEST_CASE("a commit posts a lane once, and run serves its subscribers a slice at a time") {
    imbus::dispatcher d(options_with(1024));
    manual_lane ml;
    std::vector<std::vector<std::int64_t>> got(5);
    std::vector<int> order;
    std::vector<imbus::dispatcher::subscription> subs;
    for (int i = 0; i < 5; ++i) {
        subs.push_back(d.subscribe(
            [&, i](imbus::wakeup& w) {
                order.push_back(i);
                for (const auto& e : w.events) got[std::size_t(i)].push_back(e->first_id());
            },
            ml.lane));
        subs.back().set_channels({ca});
    }
    d.notify(make_event(1, {ca}));
    CHECK(ml.posts == 1);
    CHECK(ml.lane.waiting() == 5);
    ml.lane.run(2);
    CHECK(order.size() == 2);
    CHECK(ml.posts == 2);  // more are waiting: posted again
    CHECK(ml.lane.waiting() == 3);
    d.notify(make_event(2, {ca}));  // the three waiting coalesce, the two served queue again
    CHECK(ml.posts == 2);
    CHECK(ml.lane.waiting() == 5);
    ml.lane.run(100);
    CHECK(ml.posts == 2);  // nothing left: not posted again
    CHECK(ml.lane.waiting() == 0);
    CHECK(order.size() == 7);
    for (std::size_t i = 0; i < 5; ++i) CHECK(got[i] == std::vector<std::int64_t>{1, 2});
    d.notify(make_event(3, {ca}));
    CHECK(ml.posts == 3);  // an idle lane is posted by the next commit
    subs[1].close();       // closed while waiting: its handler does not run
    ml.lane.run(100);
    CHECK(got[1] == std::vector<std::int64_t>{1, 2});
    CHECK(got[0] == std::vector<std::int64_t>{1, 2, 3});
}

TEST_CASE("a lane that cannot post is logged and posts again on the next commit") {
    log_capture log;
    imbus::dispatcher d(options_with(1024, log.logger()));
    bool refuse = true;
    int posts = 0, runs = 0;
    imbus::dispatcher::lane lane([&] {
        if (refuse) throw std::runtime_error("loop gone");
        ++posts;
    });
    auto sub = d.subscribe([&](imbus::wakeup&) { ++runs; }, lane);
    sub.set_channels({ca});
    CHECK_NOTHROW(d.notify(make_event(1, {ca})));
    CHECK(log.has(imbus::log_level::error, "loop gone"));
    refuse = false;
    d.notify(make_event(2, {ca}));
    CHECK(posts == 1);
    lane.run(10);
    CHECK(runs == 1);
}

// Each channel's subscribers are a vector in which a leaver's place goes to the last one:
// after any churn, every subscriber is woken for exactly its channels (checked against a model).
TEST_CASE("randomized: subscribe, set_channels and leave keep every channel's subscribers exact") {
    const std::vector<channel> all = {ca, cb, cc, channel("db", "d"), channel("db", "e")};
    imbus::dispatcher d(options_with(1024));
    manual_lane ml;
    constexpr std::size_t n = 40;
    std::vector<imbus::dispatcher::subscription> subs(n);
    std::vector<std::vector<channel>> model(n);
    std::vector<int> woken(n, 0);
    std::mt19937 rng(7);
    for (int round = 0; round < 300; ++round) {
        const std::size_t i = rng() % n;
        if (rng() % 4 == 0) {
            subs[i].close();
            model[i].clear();
        } else {
            if (!subs[i]) subs[i] = d.subscribe([&woken, i](imbus::wakeup&) { ++woken[i]; }, ml.lane);
            std::vector<channel> chans;
            for (const auto& c : all)
                if (rng() % 2) chans.push_back(c);
            subs[i].set_channels(chans);
            model[i] = chans;
        }
        const channel& probe = all[rng() % all.size()];
        std::fill(woken.begin(), woken.end(), 0);
        d.notify(make_event(round + 1, {probe}));
        ml.lane.run(n);
        std::size_t expected_subscribers = 0;
        for (std::size_t k = 0; k < n; ++k) {
            const bool wants = std::find(model[k].begin(), model[k].end(), probe) != model[k].end();
            expected_subscribers += wants;
            CHECK(woken[k] == (wants ? 1 : 0));
        }
        CHECK(d.subscribers_of(probe) == expected_subscribers);
    }
}

// --- containment -------------------------------------------------------------------------------

// One broken handler must neither take down the notifier nor silence anyone, itself included.
TEST_CASE("a throwing handler is contained, logged, and still woken later") {
    log_capture log;
    imbus::dispatcher d(options_with(1024, log.logger()));
    int calls = 0, other_calls = 0;
    auto bad = d.subscribe([&](imbus::wakeup&) {
        ++calls;
        if (calls == 1) throw std::runtime_error("boom");
        if (calls == 2) throw 42;
    });
    auto good = d.subscribe([&](imbus::wakeup&) { ++other_calls; });
    bad.set_channels({ca});
    good.set_channels({ca});

    CHECK_NOTHROW(d.notify(make_event(1, {ca})));
    CHECK(calls == 1);
    CHECK(other_calls == 1);
    CHECK(log.has(imbus::log_level::error, "boom"));

    CHECK_NOTHROW(d.notify(make_event(2, {ca})));
    CHECK(calls == 2);
    CHECK(other_calls == 2);
    CHECK(log.has(imbus::log_level::error, "non-exception"));

    d.notify(make_event(3, {ca}));
    CHECK(calls == 3);
    CHECK(other_calls == 3);
    CHECK(log.count_at_least(imbus::log_level::debug) == 2);
}

// An executor that refuses a task (e.g. a closing strand) is logged; the events are kept and
// the next wake-up schedules again instead of leaving the subscriber stuck.
TEST_CASE("an executor that refuses a task is logged and does not wedge the subscriber") {
    log_capture log;
    imbus::dispatcher d(options_with(1024, log.logger()));
    bool refuse = true;
    std::vector<std::function<void()>> queue;
    std::vector<std::int64_t> seen;
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            for (const auto& e : w.events) seen.push_back(e->first_id());
        },
        [&](std::function<void()> task) {
            if (refuse) throw std::runtime_error("strand closed");
            queue.push_back(std::move(task));
        });
    sub.set_channels({ca});
    CHECK_NOTHROW(d.notify(make_event(1, {ca})));
    CHECK(log.has(imbus::log_level::error, "strand closed"));
    refuse = false;
    d.notify(make_event(2, {ca}));
    REQUIRE(queue.size() == 1);
    queue[0]();
    CHECK(seen == std::vector<std::int64_t>{1, 2});
}

// A connection resubscribing from inside its own handler (inline executor) must not deadlock.
TEST_CASE("a handler may call set_channels or close on its own subscription") {
    imbus::dispatcher d(options_with(1024));
    imbus::dispatcher::subscription sub;
    int calls = 0;
    sub = d.subscribe([&](imbus::wakeup&) {
        ++calls;
        if (calls == 1) sub.set_channels({cb});
        else sub.close();
    });
    sub.set_channels({ca});
    d.notify(make_event(1, {ca}));
    CHECK(calls == 1);
    CHECK(d.subscribers_of(ca) == 0);
    CHECK(d.subscribers_of(cb) == 1);
    d.notify(make_event(2, {ca}));
    CHECK(calls == 1);
    d.notify(make_event(3, {cb}));
    CHECK(calls == 2);
    CHECK_FALSE(sub);
    CHECK(d.subscriber_count() == 0);
    CHECK(d.channel_count() == 0);
    d.notify(make_event(4, {cb}));
    CHECK(calls == 2);
}

// --- concurrency -------------------------------------------------------------------------------

// Notifiers, resubscribers and a steady subscriber at once (run under TSan by CI): the steady
// subscriber sees every event on its channels exactly once, each producer's in order.
TEST_CASE("concurrent notify, set_channels churn and a counting subscriber") {
    constexpr int producers = 4;
    constexpr int per_producer = 1500;
    const std::vector<channel> all = {ca, cb, cc, channel("db", "d"), channel("db", "e")};
    imbus::dispatcher d(options_with(1u << 20));

    // written only by the handler, which the dispatcher never runs twice at once
    std::int64_t received = 0;
    std::int64_t last_seq[producers] = {-1, -1, -1, -1};
    bool in_order = true;
    auto steady = d.subscribe([&](imbus::wakeup& w) {
        for (const auto& e : w.events) {
            ++received;
            const std::int64_t producer = e->first_id() / 1000000, seq = e->first_id() % 1000000;
            if (seq <= last_seq[producer]) in_order = false;
            last_seq[producer] = seq;
        }
    });
    steady.set_channels({ca, cb});

    std::atomic<std::int64_t> expected{0};
    std::atomic<bool> done{false};
    std::atomic<std::int64_t> churn_wakeups{0};
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
            std::mt19937 rng(unsigned(p) + 1);
            for (int i = 0; i < per_producer; ++i) {
                std::vector<channel> chans;
                const int n = 1 + int(rng() % 3);
                for (int k = 0; k < n; ++k) chans.push_back(all[rng() % all.size()]);
                const bool for_steady =
                    std::any_of(chans.begin(), chans.end(), [&](const channel& c) { return c == ca || c == cb; });
                // ids encode producer and sequence; each event's rows share that prefix
                d.notify(make_event(std::int64_t(p) * 1000000 + i * 4, chans));
                if (for_steady) ++expected;
            }
        });
    }
    for (int t = 0; t < 2; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937 rng(unsigned(t) + 100);
            auto sub = d.subscribe([&](imbus::wakeup& w) { churn_wakeups += std::int64_t(w.events.size()); });
            for (int i = 0; !done || i < 200; ++i) {
                std::vector<channel> chans;
                for (const auto& c : all)
                    if (rng() % 2) chans.push_back(c);
                sub.set_channels(chans);
                if (i % 50 == 49) {
                    sub = d.subscribe([&](imbus::wakeup& w) { churn_wakeups += std::int64_t(w.events.size()); });
                }
                if (i > 100000) break;  // a bound, in case the producers are very slow
            }
            sub.close();
        });
    }
    for (int p = 0; p < producers; ++p) threads[std::size_t(p)].join();
    done = true;
    for (std::size_t t = producers; t < threads.size(); ++t) threads[t].join();

    CHECK(received == expected.load());
    CHECK(in_order);
    CHECK(churn_wakeups.load() >= 0);
    CHECK(d.subscriber_count() == 1);
    CHECK(d.channel_count() == 2);
    CHECK(d.subscribers_of(ca) == 1);
    CHECK(d.subscribers_of(cb) == 1);
    for (std::size_t i = 2; i < all.size(); ++i) CHECK(d.subscribers_of(all[i]) == 0);
}

// --- follower -----------------------------------------------------------------------------------

// Live connections must not poll the store per commit: contiguous events carry the rows.
TEST_CASE("a follower takes rows straight from contiguous events without polling") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    counting_store store(memory);
    imbus::dispatcher d(options_with(1024));
    imbus::bus bus(store, d, bus_options());
    imbus::follower f(store, {ca, cb});
    CHECK(f.position() == 0);
    CHECK(f.channels() == std::vector<channel>{ca, cb});

    std::vector<std::int64_t> ids;
    std::vector<std::string> wires;
    auto sub = d.subscribe([&](imbus::wakeup& w) {
        f.take(w, [&](const imbus::notification& n, std::string_view wire) {
            ids.push_back(n.id);
            wires.emplace_back(wire);
            CHECK(wire == n.wire());
        });
    });
    sub.set_channels(f.channels());

    bus.send(ca, "t", 1);  // id 1
    bus.send(cb, "t", 2);  // id 2
    {
        imbus::transaction tx(bus);
        tx.send(ca, "t", 3);  // id 3
        tx.send(cc, "t", 4);  // id 4: not followed, but in a commit that wakes us
        tx.send(cb, "t", 5);  // id 5
        tx.commit();
    }
    bus.send(ca, "t", 6);  // id 6
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 5, 6});
    CHECK(f.position() == 6);
    CHECK(store.fetches == 0);  // every row came from an event
    REQUIRE(wires.size() == 5);
    CHECK(json::parse(wires[3]).at("message").at("payload") == 5);

    // a commit we were not woken for leaves a gap: the next event makes the follower poll
    bus.send(cc, "t", 7);  // id 7: nobody of ours hears of it
    bus.send(ca, "t", 8);  // id 8: not contiguous with position 6
    CHECK(store.fetches == 1);
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 5, 6, 8});
    CHECK(f.position() == 8);
}

// Events may arrive out of commit order (two committers, the later one notifies first): the
// follower must poll rather than skip the earlier row, and must not repeat it later.
TEST_CASE("a follower polls when an event is not contiguous with its position") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    counting_store store(memory);
    imbus::dispatcher d(options_with(1024));
    imbus::follower f(store, {ca});
    std::vector<std::int64_t> ids;
    auto sub = d.subscribe([&](imbus::wakeup& w) {
        f.take(w, [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); });
    });
    sub.set_channels({ca});

    auto first = store.append({message_on(ca, 1)});
    auto second = store.append({message_on(ca, 2)});
    REQUIRE(ids_of(first) == std::vector<std::int64_t>{1});
    REQUIRE(ids_of(second) == std::vector<std::int64_t>{2});
    const auto e1 = imbus::commit_event::from_rows(first);
    const auto e2 = imbus::commit_event::from_rows(second);
    CHECK(e1->contiguous());
    CHECK(e2->contiguous());

    d.notify(e2);  // the later commit is heard first
    CHECK(store.fetches == 1);
    CHECK(ids == std::vector<std::int64_t>{1, 2});
    CHECK(f.position() == 2);
    d.notify(e1);  // the earlier one arrives late: already seen
    d.notify(e2);  // and a repeat is ignored too
    CHECK(store.fetches == 1);
    CHECK(ids == std::vector<std::int64_t>{1, 2});

    // an event whose ids are not contiguous (another commit in between) also means a poll
    auto third = store.append({message_on(ca, 3)});
    auto fourth = store.append({message_on(cb, 4)});
    auto fifth = store.append({message_on(ca, 5)});
    std::vector<imbus::notification> gappy = {third[0], fifth[0]};
    const auto e35 = imbus::commit_event::from_rows(gappy);
    CHECK_FALSE(e35->contiguous());
    d.notify(e35);
    CHECK(store.fetches == 2);
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 5});
    CHECK(f.position() == 5);
    (void)fourth;
}

// After an overflow the events are incomplete: only the store can fill the gap.
TEST_CASE("a follower polls after an overflow and gets every row once") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    counting_store store(memory);
    imbus::dispatcher d(options_with(2));
    imbus::bus bus(store, d, bus_options());
    manual_executor ex;
    imbus::follower f(store, {ca});
    std::vector<std::int64_t> ids;
    bool saw_overflow = false;
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            saw_overflow = saw_overflow || w.overflowed;
            f.take(w, [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); });
        },
        ex.get());
    sub.set_channels({ca});
    for (int i = 0; i < 5; ++i) bus.send(ca, "t", i);
    ex.run();
    CHECK(saw_overflow);
    CHECK(store.fetches == 1);
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 4, 5});
    CHECK(f.position() == 5);

    // and continues from events afterwards
    bus.send(ca, "t", 6);
    ex.run();
    CHECK(store.fetches == 1);
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6});
}

// A bare wake-up (e.g. from another process) names channels only: the rows are in the store.
// A read of the store that throws (a restarting database) must not leave the follower trusting
// the next event of the same epoch: rows 1-4 dropped by the overflow were once skipped for good.
TEST_CASE("a follower whose catch-up failed polls again at the next wake-up") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    imbus_test::faulty_store store(memory);
    log_capture log;
    imbus::dispatcher d(options_with(2, log.logger()));
    imbus::bus bus(store, d, bus_options());
    manual_executor ex;
    bus.send(cb, "t", 0);  // id 1: the dispatcher's sequence starts, and with it an epoch
    imbus::follower f(store, d, {ca});
    std::vector<std::int64_t> ids;
    auto collect = [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); };
    auto sub = d.subscribe([&](imbus::wakeup& w) { f.take(w, collect); }, ex.get());
    sub.set_channels({ca});
    f.catch_up(collect);  // in sync with that epoch
    const auto epoch = d.epoch();
    for (int i = 0; i < 4; ++i) bus.send(ca, "t", i);  // ids 2-5 overflow: the wake-up says "catch up"
    store.fail(imbus_test::faulty_store::fetch_op, 1);
    ex.run();
    CHECK(store.failures() == 1);
    CHECK(log.has(imbus::log_level::error, "injected failure"));
    CHECK(ids.empty());
    CHECK(f.behind());
    bus.send(ca, "t", 4);  // id 6, same epoch: it continues the dispatcher's sequence, not the follower's
    CHECK(d.epoch() == epoch);
    ex.run();
    CHECK(ids == std::vector<std::int64_t>{2, 3, 4, 5, 6});
    CHECK_FALSE(f.behind());

    // The same for a catch-up that a gap in the events asked for, failing twice in a row.
    store.append({message_on(ca, 100)});  // id 7, never notified
    store.fail(imbus_test::faulty_store::fetch_op, 2);
    bus.send(ca, "t", 7);  // id 8: a new epoch, a poll, which fails
    ex.run();
    bus.send(ca, "t", 8);  // id 9: a poll again, which fails again
    ex.run();
    CHECK(store.failures() == 3);
    bus.send(ca, "t", 9);  // id 10: the poll succeeds and brings 7-10
    ex.run();
    CHECK(ids == std::vector<std::int64_t>{2, 3, 4, 5, 6, 7, 8, 9, 10});
}

TEST_CASE("a follower polls for bare wake-up events") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    counting_store store(memory);
    imbus::dispatcher d(options_with(1024));
    imbus::follower f(store, {ca});
    std::vector<std::int64_t> ids;
    auto sub = d.subscribe([&](imbus::wakeup& w) {
        f.take(w, [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); });
    });
    sub.set_channels({ca});
    store.append({message_on(ca, 1), message_on(cb, 2), message_on(ca, 3)});
    const auto wake = imbus::commit_event::wake_up({ca});
    CHECK_FALSE(wake->has_rows());
    d.notify(wake);
    CHECK(store.fetches == 1);
    CHECK(ids == std::vector<std::int64_t>{1, 3});
    CHECK(f.position() == 3);
    d.notify(wake);  // nothing new: a poll, but no repeats
    CHECK(store.fetches == 2);
    CHECK(ids == std::vector<std::int64_t>{1, 3});
}

// set_channels keeps the position (later subscribes keep the server cursor, docs/PROTOCOL.md §4), and
// a follower starting at a position does not repeat what is at or below it.
TEST_CASE("a follower keeps its position across set_channels") {
    imbus::manual_clock clock;
    imbus::memory_store store(store_options(clock));
    store.append({message_on(ca, 1), message_on(cb, 2)});
    imbus::follower f(store, {ca}, 1);
    std::vector<std::int64_t> ids;
    auto collect = [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); };
    CHECK(f.catch_up(collect) == 0);
    CHECK(f.position() == 2);
    store.append({message_on(ca, 3), message_on(cb, 4)});
    f.set_channels({cb, cb});
    CHECK(f.channels() == std::vector<channel>{cb});
    CHECK(f.position() == 2);
    CHECK(f.catch_up(collect) == 1);
    CHECK(ids == std::vector<std::int64_t>{4});
    f.set_position(0);
    CHECK(f.position() == 0);
}

TEST_CASE("a follower from a negative last reads every row the store holds, from 0 only the first-poll window") {
    imbus::manual_clock clock;
    imbus::memory_store store(store_options(clock));
    store.append({message_on(ca, 1)});
    clock.advance(std::chrono::minutes(10));  // far outside the 50 s window
    store.append({message_on(ca, 2)});
    std::vector<std::int64_t> ids;
    auto collect = [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); };
    imbus::follower everything(store, {ca}, -1);
    CHECK(everything.catch_up(collect) == 2);
    CHECK(ids == std::vector<std::int64_t>{1, 2});
    CHECK(everything.position() == 2);
    ids.clear();
    imbus::follower recent(store, {ca}, 0);
    CHECK(recent.catch_up(collect) == 1);
    CHECK(ids == std::vector<std::int64_t>{2});
}

TEST_CASE("a task_thread runs its tasks one at a time, in order, and its destructor runs those already posted") {
    std::vector<int> order;  // touched by the worker's thread only, until it is joined
    std::atomic<int> running{0};
    std::atomic<bool> overlapped{false};
    std::promise<void> gate;
    {
        imbus::task_thread worker(imbus_test::quiet());
        worker.post([done = gate.get_future().share()] { done.wait(); });  // holds the rest back
        for (int i = 0; i < 100; ++i)
            worker.post([&, i] {
                if (running.fetch_add(1) != 0) overlapped = true;
                order.push_back(i);
                running.fetch_sub(1);
            });
        CHECK(worker.pending() == 101);
        gate.set_value();
    }  // joins after all 100
    CHECK_FALSE(overlapped);
    std::vector<int> expected(100);
    for (int i = 0; i < 100; ++i) expected[std::size_t(i)] = i;
    CHECK(order == expected);
}

TEST_CASE("a task_thread logs a task that throws and runs the next one") {
    imbus_test::log_capture log;
    std::atomic<bool> ran{false};
    {
        imbus::task_thread worker(log.logger());
        worker.post([] { throw std::runtime_error("broken task"); });
        worker.post([&] { ran = true; });
    }
    CHECK(ran);
    CHECK(log.contains("task_thread: a task failed: broken task"));
}

TEST_CASE("a follower on a task_thread: the dispatcher posts its wake-ups there, off the committing thread") {
    imbus::manual_clock clock;
    imbus::memory_store store(store_options(clock));
    imbus::dispatcher dispatcher;
    std::mutex mutex;
    std::vector<std::int64_t> ids;
    std::set<std::thread::id> threads;
    imbus::follower follower(store, dispatcher, {ca}, 0);
    imbus::task_thread worker(imbus_test::quiet());  // before the subscription: it ends first
    auto take = [&](const imbus::notification& n, std::string_view) {
        std::lock_guard<std::mutex> lock(mutex);
        ids.push_back(n.id);
        threads.insert(std::this_thread::get_id());
    };
    auto subscription = dispatcher.subscribe([&](imbus::wakeup& w) { follower.take(w, take); }, worker.as_executor());
    subscription.set_channels(follower.channels());
    worker.post([&] { follower.catch_up(take); });
    std::vector<std::int64_t> expected;
    for (int i = 0; i < 20; ++i) {
        auto stored = store.append({message_on(ca, i)});
        dispatcher.notify(imbus::commit_event::from_rows(stored));
        expected.push_back(stored.front().id);
    }
    CHECK(imbus_test::wait_until([&] {
        std::lock_guard<std::mutex> lock(mutex);
        return ids.size() >= expected.size();
    }));
    CHECK(imbus_test::wait_until([&] { return worker.pending() == 0; }));
    std::lock_guard<std::mutex> lock(mutex);
    CHECK(ids == expected);
    CHECK(threads.size() == 1);
    CHECK(threads.count(std::this_thread::get_id()) == 0);
}

// A catch-up in bounded pages (limit) must still deliver every row: the position may only
// move to what the page vouches for. Exposes the horizon of a page that hit the limit.
TEST_CASE("a follower catching up with a limit never skips a row") {
    imbus::manual_clock clock;
    imbus::memory_store store(store_options(clock));
    for (int i = 0; i < 5; ++i) store.append({message_on(ca, i)});
    imbus::follower f(store, {ca});
    std::vector<std::int64_t> ids;
    auto collect = [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); };
    for (int page = 0; page < 10 && f.catch_up(collect, 2) > 0; ++page) {}
    CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 4, 5});
}

// The end-to-end property under concurrency: 2000 notifications over 5 channels committed by
// 4 threads, a follower on 2 of them. Whatever order commits and wake-ups arrive in, including
// overflows, it must see exactly the store's ids for its channels, ascending, once each.
// `on_thread`: the follower runs on an executor thread (a connection's strand); otherwise
// inline on the committing threads, which makes out-of-order events frequent.
static void run_randomized_follower(bool on_thread, std::size_t max_pending, bool with_epochs = false) {
    constexpr int committers = 4;
    constexpr int total = 2000;
    imbus::manual_clock clock;
    imbus::memory_store store(store_options(clock));
    imbus::dispatcher d(options_with(max_pending));
    imbus::bus bus(store, d, bus_options());
    const std::vector<channel> all = {ca, cb, cc, channel("db", "d"), channel("db", "e")};
    const std::vector<channel> followed = {cb, channel("db", "d")};

    thread_executor ex;
    imbus::follower f = with_epochs ? imbus::follower(store, d, followed) : imbus::follower(store, followed);
    // touched only by the handler, which never runs twice at once; read after the joins
    std::vector<std::int64_t> received;
    auto sub = d.subscribe(
        [&](imbus::wakeup& w) {
            f.take(w, [&](const imbus::notification& n, std::string_view) { received.push_back(n.id); });
        },
        on_thread ? ex.get() : imbus::executor());
    sub.set_channels(followed);

    std::vector<std::thread> threads;
    for (int t = 0; t < committers; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937 rng(unsigned(t) * 7919u + 13u);
            int left = total / committers;
            while (left > 0) {
                const int n = std::min(left, 1 + int(rng() % 4));  // 1-4 rows per commit
                imbus::transaction tx(bus);
                for (int k = 0; k < n; ++k) tx.send(all[rng() % all.size()], "t", json{{"t", t}, {"k", left - k}});
                tx.commit();
                left -= n;
                std::this_thread::yield();  // let the others interleave (scheduling only)
            }
        });
    }
    for (auto& t : threads) t.join();
    ex.finish();
    sub.close();

    CHECK(store.newest_id() == total);
    const std::vector<std::int64_t> expected = ids_of(store.poll(followed, 0));
    CHECK_FALSE(expected.empty());
    CHECK(std::is_sorted(received.begin(), received.end()));
    CHECK(std::adjacent_find(received.begin(), received.end()) == received.end());
    CHECK(received.size() == expected.size());
    CHECK(received == expected);
}

TEST_CASE("randomized: a follower on an executor thread never skips or repeats an id") {
    run_randomized_follower(true, 8);  // small max_pending: overflows happen too
}

TEST_CASE("randomized: a follower run inline by concurrent committers never skips or repeats an id") {
    run_randomized_follower(false, 1024);
}

TEST_CASE("randomized: a follower trusting dispatcher epochs never skips or repeats an id") {
    run_randomized_follower(true, 8, true);
    run_randomized_follower(true, 1024, true);
    run_randomized_follower(false, 1024, true);
}

// A connection on one channel must not poll the store because other channels' commits took
// ids in between: within one dispatcher epoch, the gap is vouched for. Rows the dispatcher
// never saw (another process, a plain append) start a new epoch and force one poll.
TEST_CASE("a follower of a dispatcher skips other channels' ids without polling, and polls for unseen rows") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    counting_store store(memory);
    imbus::dispatcher d(options_with(1024));
    imbus::bus bus(store, d, bus_options());
    bus.send(cb, "t", 0);  // id 1: history before the follower exists
    imbus::follower f(store, d, {ca});
    std::vector<std::int64_t> ids;
    auto collect = [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); };
    auto sub = d.subscribe([&](imbus::wakeup& w) { f.take(w, collect); });
    sub.set_channels({ca});
    f.catch_up(collect);  // subscribe, then poll: the server's order
    CHECK(store.fetches == 1);
    CHECK(f.position() == 1);

    for (int i = 0; i < 5; ++i) {
        bus.send(cb, "t", i);  // ids we never hear of
        bus.send(ca, "t", i);
    }
    CHECK(ids == std::vector<std::int64_t>{3, 5, 7, 9, 11});
    CHECK(store.fetches == 1);  // no poll for the gaps

    store.append({message_on(ca, 100)});  // id 12: stored without a notify (as another process would)
    bus.send(cb, "t", 0);                 // id 13: the dispatcher sees the gap, a new epoch
    bus.send(ca, "t", 1);                 // id 14: cannot be trusted to follow 11
    CHECK(store.fetches == 2);
    CHECK(ids == std::vector<std::int64_t>{3, 5, 7, 9, 11, 12, 14});
    bus.send(cb, "t", 2);
    bus.send(ca, "t", 3);  // the poll re-synchronised the follower: skipping again
    CHECK(store.fetches == 2);
    CHECK(ids == std::vector<std::int64_t>{3, 5, 7, 9, 11, 12, 14, 16});
}

// A reader that saw every row of an id range in one snapshot (pg_listener) says so with
// from_range: ids missing from it were rolled back, so the dispatcher keeps its epoch and a
// follower takes the rows without a poll. A range that does not start at the dispatcher's
// sequence is still a gap the followers must poll for.
TEST_CASE("complete ranges with rollback gaps keep the epoch, a range after unseen ids does not") {
    imbus::manual_clock clock;
    imbus::memory_store memory(store_options(clock));
    counting_store store(memory);
    imbus::dispatcher d(options_with(1024));
    imbus::follower f(store, d, {ca});
    std::vector<std::int64_t> ids;
    auto collect = [&](const imbus::notification& n, std::string_view) { ids.push_back(n.id); };
    auto sub = d.subscribe([&](imbus::wakeup& w) { f.take(w, collect); });
    sub.set_channels({ca});
    f.catch_up(collect);
    CHECK(store.fetches == 1);

    auto row = [](std::int64_t id, const channel& c) {
        return imbus::notification{id, c, imbus::make_message("t", id), {}};
    };
    d.notify(imbus::commit_event::from_range(0, {row(1, ca), row(2, cb)}));  // starts the sequence
    const auto epoch = d.epoch();
    auto gappy = imbus::commit_event::from_range(2, {row(4, ca), row(7, ca)});  // 3, 5 and 6 rolled back
    CHECK_FALSE(gappy->contiguous());
    CHECK(gappy->complete());
    CHECK(gappy->after() == 2);
    d.notify(gappy);
    CHECK(d.epoch() == epoch);
    d.notify(imbus::commit_event::from_range(7, {row(9, cb)}));
    CHECK(d.epoch() == epoch);
    CHECK(ids == std::vector<std::int64_t>{1, 4, 7});
    CHECK(store.fetches == 1);  // none of the gaps made the follower poll

    d.notify(imbus::commit_event::from_range(10, {row(11, ca)}));  // id 10 never reached this dispatcher
    CHECK(d.epoch() == epoch + 1);
    CHECK(store.fetches == 2);  // so the follower asked the store

    // a plain commit's rows vouch only for their own ids
    auto plain = imbus::commit_event::from_rows({row(20, ca), row(22, ca)});
    CHECK_FALSE(plain->complete());
    CHECK(plain->complete_after == -1);
}

// --- linkage --------------------------------------------------------------------------------------

// Two translation units include imbus.hpp: a function defined in it without `inline` would
// have failed the link of this executable with a duplicate symbol.
TEST_CASE("the header can be included in two translation units") {
    const imbus::channel c("db", "res.partner", 7);
    const std::string m = imbus::make_message("t", json{{"k", 1}});
    CHECK(imbus_second_tu_uses() == int(c.key().size() + m.size() + imbus::version_string().size()));
}
