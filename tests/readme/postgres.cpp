// The README's PostgreSQL snippet, compiled and run against IMBUS_PG_CONNINFO (registered only
// where the PostgreSQL tests run): a commit through the bus reaches a subscriber through the
// listener, the one dispatch path. check.sh finds the README block here, line for line.
#define IMBUS_WITH_POSTGRES  // pg_store and pg_listener (link libpq)
#include "imbus.hpp"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>

int main() {
    const char* conninfo = std::getenv("IMBUS_PG_CONNINFO");
    if (!conninfo) return std::fputs("README postgres snippet: IMBUS_PG_CONNINFO is not set\n", stderr), 1;
    PGconn* app_conn = PQconnectdb(conninfo);
    if (PQstatus(app_conn) != CONNECTION_OK) return std::fputs(PQerrorMessage(app_conn), stderr), 1;
    bool woken = false;
    {
        imbus::pg_store store(app_conn);  // the application's PGconn*: the outbox pattern
                                          // (or pg_store("host=... dbname=app") for its own)
        imbus::dispatcher dispatcher;
        imbus::bus_options options;
        options.db = "readme";
        options.dispatch_on_commit = false;  // the listener is this process's one dispatch path
        imbus::bus bus(store, dispatcher, options);
        imbus::pg_listener listener(store, dispatcher);  // one per process: one thread, one connection
        std::mutex mutex;
        std::condition_variable cv;
        auto sub = dispatcher.subscribe([&](imbus::wakeup&) {
            std::lock_guard<std::mutex> lock(mutex);
            woken = true;
            cv.notify_all();
        });
        sub.set_channels({bus.channel_for("broadcast")});
        bus.send("broadcast", "chat/message", {{"text", "hello"}});
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait_for(lock, std::chrono::seconds(30), [&] { return woken; });
    }
    PQfinish(app_conn);
    if (!woken) return std::fputs("README postgres snippet: the commit never reached the subscriber\n", stderr), 1;
    std::puts("README postgres snippet: ok");
    return 0;
}
