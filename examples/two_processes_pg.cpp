// Two processes on one PostgreSQL database, played by two buses in this program: each has its
// own pg_store (its own connections), dispatcher and pg_listener, as each process of a
// deployment would. A transaction committed through bus A reaches a subscriber of bus B: the
// commit NOTIFYs, B's listener reads the new rows once and hands them to B's dispatcher.
// Needs a server: IMBUS_PG_CONNINFO (a libpq conninfo); creates the bus_bus table if missing.
#include "imbus.hpp"

#include <iostream>

// What each process sets up once.
struct process {
    imbus::pg_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus;
    imbus::pg_listener listener;  // LISTENs before the constructor returns
    explicit process(const std::string& conninfo)
        : store(conninfo), bus(store, dispatcher, options()), listener(store, dispatcher) {}
    static imbus::bus_options options() {
        imbus::bus_options o;
        o.db = "app";
        o.dispatch_on_commit = false;  // the listener brings every commit, this process's own too
        return o;
    }
};

// A subscriber in one process: a follower fed by that process's dispatcher. With no executor
// its handler runs on the listener's thread.
struct subscriber {
    const char* name;
    std::mutex mutex;
    std::condition_variable arrived;
    std::vector<std::int64_t> ids;
    imbus::follower follower;
    imbus::dispatcher::subscription subscription;  // last: closed before the rest goes

    subscriber(const char* who, process& p, const imbus::channel& c)
        // From the newest id: rows of an earlier run of this program are not news.
        : name(who), follower(p.store, p.dispatcher, {c}, p.store.newest_id()) {
        subscription = p.dispatcher.subscribe([this](imbus::wakeup& w) {
            follower.take(w, [this](const imbus::notification& n, std::string_view wire) {
                std::lock_guard<std::mutex> lock(mutex);
                std::cout << std::string(name) + " received " + std::string(wire) +
                                 "\n";  // one write: two threads print
                ids.push_back(n.id);
                arrived.notify_all();
            });
        });
        subscription.set_channels(follower.channels());
    }
    std::vector<std::int64_t> wait_for(std::size_t count) {
        std::unique_lock<std::mutex> lock(mutex);
        arrived.wait_for(lock, std::chrono::seconds(10), [&] { return ids.size() >= count; });
        return ids;
    }
};

static void check(bool ok, const char* what) {
    if (!ok) std::cerr << "FAILED: " << what << "\n", std::exit(1);
}

int main() {
    const char* conninfo = std::getenv("IMBUS_PG_CONNINFO");
    if (!conninfo || !*conninfo) {
        std::cerr
            << "set IMBUS_PG_CONNINFO, e.g. 'host=127.0.0.1 dbname=app' (scripts/pg_cluster.sh start gives one)\n";
        return 2;
    }
    process a(conninfo), b(conninfo);
    subscriber on_a("subscriber on A", a, a.bus.channel_for("orders"));
    subscriber on_b("subscriber on B", b, b.bus.channel_for("orders"));

    imbus::transaction tx(a.bus);  // through bus A: two notifications, one commit
    tx.send("orders", "order/new", {{"order", 1}});
    tx.send("orders", "order/paid", {{"order", 1}});
    std::vector<std::int64_t> expected = tx.commit();
    check(on_b.wait_for(2) == expected, "B's subscriber received A's commit");
    check(on_a.wait_for(2) == expected, "A's subscriber received it too, through A's listener");

    // And the other way: a commit through bus B reaches A.
    expected.push_back(b.bus.send("orders", "order/shipped", {{"order", 1}}).at(0));
    check(on_a.wait_for(3) == expected, "A's subscriber received B's commit");
    check(on_b.wait_for(3) == expected, "B's subscriber received its own commit");
    std::cout << "both processes saw every commit once, in id order\n";
}
