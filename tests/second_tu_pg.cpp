// A second translation unit including imbus.hpp with the PostgreSQL store, linked into the pg
// test: a function of the PostgreSQL part defined without `inline` would fail that link with a
// duplicate symbol.
#define IMBUS_WITH_POSTGRES
#include "imbus.hpp"

// The NOTIFY payloads of two channels: one JSON array.
std::size_t imbus_second_tu_pg_payloads() {
    return imbus::detail::notify_payloads({imbus::channel("db", "a"), imbus::channel("db", "b")}).size();
}
