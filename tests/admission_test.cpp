// Admission without a socket: places under max_connections and max_connections_per_address
// (detail::ledger_ticket) and the frame rate (detail::rate_window), which basic_server applies
// at accept and to every frame. Built without websocketpp: the core (imbus::imbus) only.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include "imbus.hpp"

#include <chrono>
#include <memory>
#include <string>
#include <utility>

using namespace std::chrono_literals;
using imbus::detail::connection_ledger;
using imbus::detail::ledger_ticket;
using imbus::detail::rate_window;

namespace {
std::size_t places_of(const connection_ledger& ledger, const std::string& address) {
    auto it = ledger.by_address.find(address);
    return it == ledger.by_address.end() ? 0 : it->second;
}
}  // namespace

TEST_CASE("admission: a place per connection under the overall and per-address limits, given back with its ticket") {
    auto ledger = std::make_shared<connection_ledger>();
    std::string why;
    auto a1 = ledger_ticket::take(ledger, "10.0.0.1", 3, 2, why);
    auto a2 = ledger_ticket::take(ledger, "10.0.0.1", 3, 2, why);
    REQUIRE(a1);
    REQUIRE(a2);
    CHECK(a1.address() == "10.0.0.1");
    auto a3 = ledger_ticket::take(ledger, "10.0.0.1", 3, 2, why);
    CHECK_FALSE(a3);
    CHECK(why == "too many connections from 10.0.0.1");
    auto b1 = ledger_ticket::take(ledger, "10.0.0.2", 3, 2, why);
    REQUIRE(b1);
    auto c1 = ledger_ticket::take(ledger, "10.0.0.3", 3, 2, why);
    CHECK_FALSE(c1);
    CHECK(why == "too many connections");
    CHECK(ledger->total == 3);
    CHECK(ledger->by_address.count("10.0.0.3") == 0);  // a refusal leaves no entry behind

    b1 = ledger_ticket();  // the connection ended: its place is free
    CHECK(ledger->total == 2);
    CHECK(ledger->by_address.count("10.0.0.2") == 0);
    CHECK(ledger_ticket::take(ledger, "10.0.0.3", 3, 2, why));  // a temporary: taken and given back at once
    CHECK(ledger->total == 2);

    ledger_ticket moved = std::move(a1);  // a moved ticket gives its place back once
    CHECK(places_of(*ledger, "10.0.0.1") == 2);
    moved.release();
    moved.release();
    CHECK(places_of(*ledger, "10.0.0.1") == 1);
    a2 = ledger_ticket();
    CHECK(ledger->total == 0);
    CHECK(ledger->by_address.empty());
}

TEST_CASE("admission: no limit when the limits are 0") {
    auto ledger = std::make_shared<connection_ledger>();
    std::string why;
    std::vector<ledger_ticket> tickets;
    for (int i = 0; i < 100; ++i) tickets.push_back(ledger_ticket::take(ledger, "10.0.0.1", 0, 0, why));
    for (const auto& t : tickets) CHECK(t);
    CHECK(ledger->total == 100);
    CHECK(why.empty());
}

TEST_CASE("admission: at most burst frames in any burst * delay, the window sliding with each frame") {
    rate_window rate;
    const auto t0 = std::chrono::steady_clock::time_point(1h);
    for (int i = 0; i < 3; ++i) CHECK(rate.admit(t0, 3, 100ms));
    CHECK_FALSE(rate.admit(t0 + 299ms, 3, 100ms));  // the first frame is not 300 ms old yet
    CHECK(rate.admit(t0 + 300ms, 3, 100ms));        // now it is: the window moves past it
    CHECK(rate.admit(t0 + 300ms, 3, 100ms));
    CHECK(rate.admit(t0 + 300ms, 3, 100ms));
    CHECK_FALSE(rate.admit(t0 + 300ms, 3, 100ms));  // three at t0 + 300 ms fill the next window
    CHECK(rate.admit(t0 + 600ms, 3, 100ms));
}

TEST_CASE("admission: a steady rate just under the limit is never refused") {
    rate_window rate;
    auto t = std::chrono::steady_clock::time_point(1h);
    for (int i = 0; i < 1000; ++i, t += 200ms) CHECK(rate.admit(t, 10, 200ms));  // Odoo's 10 in 2 s, one per 0.2 s
}
