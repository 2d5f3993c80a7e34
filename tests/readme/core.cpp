// The README's core snippets (Quick start, the outbox pattern), compiled and run; check.sh
// finds each README block here, line for line. Lines in between give a fragment its context.
#define IMBUS_WITH_SQLITE  // optional: the SQLite store (link SQLite3)
#include "imbus.hpp"
#include <iostream>

#include <cstdio>
#include <string>

static int failures = 0;
static void expect(bool ok, const char* what) {
    if (!ok) std::fprintf(stderr, "README core snippet: %s\n", what), ++failures;
}

// "The outbox pattern": the application's row and the notification in one SQLite transaction.
static void outbox(sqlite3* app_db) {
    sqlite3_exec(app_db, "CREATE TABLE message (body TEXT)", nullptr, nullptr, nullptr);
    imbus::sqlite_store store(app_db);  // the application's own sqlite3*
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"mydb"});
    const imbus::json payload = {{"text", "hi"}};
    imbus::transaction tx(bus);  // BEGIN IMMEDIATE on app_db
    sqlite3_exec(app_db, "INSERT INTO message (body) VALUES ('hi')", nullptr, nullptr, nullptr);
    tx.send(imbus::record{"chat.room", 7}, "chat/message", payload);  // only buffers
    tx.commit();  // pre-commit: bus rows; COMMIT; post-commit: dispatch
    const auto found = store.fetch({imbus::channel("mydb", "chat.room", 7)}, 0);
    expect(found.notifications.size() == 1, "the outbox notification is stored");
    sqlite3_stmt* count = nullptr;
    sqlite3_prepare_v2(app_db, "SELECT count(*) FROM message", -1, &count, nullptr);
    expect(sqlite3_step(count) == SQLITE_ROW && sqlite3_column_int(count, 0) == 1, "the application's row is stored");
    sqlite3_finalize(count);
}

int main() {
    std::remove("bus.db");
    {
        // "Quick start"
        imbus::sqlite_store store("bus.db");  // or imbus::memory_store
        imbus::dispatcher dispatcher;
        imbus::bus bus(store, dispatcher, {"mydb"});
        imbus::follower follower(store, {bus.channel_for("broadcast")});
        auto sub = dispatcher.subscribe([&](imbus::wakeup& w) {  // after each commit on its channels
            follower.take(w, [](const imbus::notification&, std::string_view wire) { std::cout << wire << '\n'; });
        });
        sub.set_channels(follower.channels());
        bus.send("broadcast", "chat/message", {{"text", "hello"}});  // stored, then dispatched: printed
        expect(follower.position() == store.newest_id() && follower.position() > 0,
               "the quick start's notification reached the follower");
    }
    std::remove("bus.db");

    sqlite3* app_db = nullptr;
    sqlite3_open(":memory:", &app_db);
    outbox(app_db);
    sqlite3_close(app_db);
    if (failures == 0) std::puts("README core snippets: ok");
    return failures == 0 ? 0 : 1;
}
