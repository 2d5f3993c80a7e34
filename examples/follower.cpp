// A consumer outside the WebSocket server: a worker thread mirrors channel "orders" into a log,
// each notification once and in id order, resuming from where its log ended and catching up
// from the store after it fell behind and its wake-ups were dropped. Exits 0 when it did.
#include "imbus.hpp"

#include <condition_variable>
#include <future>
#include <iostream>

// The mirror: appended on the worker's thread, read by main.
struct order_log {
    std::mutex mutex;
    std::condition_variable grew;
    std::vector<std::int64_t> ids;
    void append(const imbus::notification& n) {
        std::lock_guard<std::mutex> lock(mutex);
        std::cout << "log: #" << n.id << " " << n.type() << " " << n.payload().dump() << "\n";
        ids.push_back(n.id);
        grew.notify_all();
    }
    std::vector<std::int64_t> wait_for(std::size_t count) {
        std::unique_lock<std::mutex> lock(mutex);
        grew.wait_for(lock, std::chrono::seconds(5), [&] { return ids.size() >= count; });
        return ids;
    }
};

static void check(bool ok, const char* what) {
    if (!ok) std::cerr << "FAILED: " << what << "\n", std::exit(1);
}

int main() {
    imbus::memory_store store;
    imbus::dispatcher_options small;
    small.max_pending = 4;  // wake-ups queued for a busy subscriber before they are dropped
    imbus::dispatcher dispatcher(small);
    imbus::bus bus(store, dispatcher, {"shop"});
    std::vector<std::int64_t> expected;  // every id on "orders" after the saved position
    auto order = [&](int n) {
        for (auto id : bus.send("orders", "order/new", {{"n", n}})) expected.push_back(id);
    };

    // Before the worker runs: its log (from an earlier run) ends at order 1's id.
    const std::int64_t saved = bus.send("orders", "order/new", {{"n", 1}})[0];
    order(2), order(3);
    bus.send("invoices", "invoice/new", {{"n", 1}});  // another channel: never in the log

    order_log log;
    std::atomic<bool> fell_behind{false};
    auto mirror = [&](const imbus::notification& n, std::string_view /*wire*/) { log.append(n); };
    // Ids up to `saved` count as seen (0 would mean a first poll: the store's last 50 s only).
    imbus::follower follower(store, dispatcher, {bus.channel_for("orders")}, saved);
    imbus::task_thread worker;  // after the follower, before the subscription: its tasks end first
    auto subscription = dispatcher.subscribe(
        [&](imbus::wakeup& w) {
            if (w.overflowed) fell_behind = true;  // take() then reads the store instead
            follower.take(w, mirror);
        },
        worker.as_executor());  // wake-ups run on the worker's thread, one at a time
    // Subscribe before reading, so a commit in between comes as an event (take() skips repeats).
    subscription.set_channels(follower.channels());
    worker.post([&] { follower.catch_up(mirror); });
    order(4);  // live: taken from the commit event, no store read
    check(log.wait_for(expected.size()) == expected, "caught up from the saved position, then live");

    // The worker is busy while 10 orders commit: more wake-ups than max_pending are dropped.
    std::promise<void> busy;
    worker.post([done = busy.get_future().share()] { done.wait(); });
    for (int n = 5; n < 15; ++n) order(n);
    busy.set_value();
    check(log.wait_for(expected.size()) == expected, "every order once, in id order, after falling behind");
    check(fell_behind, "the worker fell behind");
    std::cout << "mirrored " << expected.size() << " orders, caught up from the store after falling behind\n";
}
