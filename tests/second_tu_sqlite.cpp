// A second translation unit including imbus.hpp with the SQLite store, linked into the bus
// test: a function of the SQLite part defined without `inline` would fail that link with a
// duplicate symbol.
#define IMBUS_WITH_SQLITE
#include "imbus.hpp"

// Opens an in-memory SQLite store and appends one notification; returns its id (1).
int imbus_second_tu_sqlite_uses() {
    imbus::sqlite_store store(":memory:");
    const auto rows = store.append(
        {imbus::pending_message{imbus::channel("db", "broadcast"), imbus::make_message("t", imbus::json{{"k", 1}})}});
    return rows.size() == 1 ? int(rows.front().id) : -1;
}
