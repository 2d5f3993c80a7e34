// The outbox pattern in one minute: an application writes its own row and a notification in
// one SQLite transaction; a subscriber hears of it only after the commit, and a rollback
// leaves no trace anywhere.
#define IMBUS_WITH_SQLITE
#include "imbus.hpp"

#include <iostream>

static void exec(sqlite3* db, const char* sql) {
    if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) throw std::runtime_error(sqlite3_errmsg(db));
}

static long long count(sqlite3* db, const char* table) {
    sqlite3_stmt* st = nullptr;
    sqlite3_prepare_v2(db, (std::string("SELECT count(*) FROM ") + table).c_str(), -1, &st, nullptr);
    sqlite3_step(st);
    const long long n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

int main() {
    sqlite3* db = nullptr;
    sqlite3_open(":memory:", &db);
    exec(db, "CREATE TABLE chat_message (id INTEGER PRIMARY KEY, room TEXT, body TEXT)");
    {
        imbus::sqlite_store store(db);  // bus_bus lives next to the application's tables
        imbus::dispatcher dispatcher;
        imbus::bus bus(store, dispatcher, {"demo"});

        // A live subscriber: a follower turns wake-ups into notifications, gap-free.
        imbus::follower follower(store, {bus.channel_for("room:general")});
        auto subscription = dispatcher.subscribe([&](imbus::wakeup& w) {
            follower.take(w, [](const imbus::notification& n, std::string_view wire) {
                std::cout << "subscriber received on " << n.channel.key() << ": " << wire << "\n";
            });
        });
        subscription.set_channels(follower.channels());

        {  // committed: the row and the notification, together
            imbus::transaction tx(bus);
            exec(db, "INSERT INTO chat_message (room, body) VALUES ('general', 'hello')");
            tx.send("room:general", "chat/message", {{"body", "hello"}});
            std::cout << "before commit: nothing was sent yet\n";
            tx.commit();
        }
        {  // rolled back: neither the row nor the notification exist
            imbus::transaction tx(bus);
            exec(db, "INSERT INTO chat_message (room, body) VALUES ('general', 'never mind')");
            tx.send("room:general", "chat/message", {{"body", "never mind"}});
            tx.rollback();
        }
        std::cout << "after rollback: chat_message has " << count(db, "chat_message") << " row, bus_bus has "
                  << count(db, "bus_bus") << "\n";

        // A client that reconnects with last = 0 gets the last 50 seconds from the store.
        for (const auto& n : store.poll({bus.channel_for("room:general")}, 0))
            std::cout << "poll(last=0) -> " << n.wire() << "\n";
    }
    sqlite3_close(db);
}
