// PostgreSQL helpers for the tests: a database of its own per test (so test processes can run
// in parallel, ctest -j), created on the server named by IMBUS_PG_CONNINFO and dropped after.
// Needs imbus.hpp included first.
#pragma once

#include <doctest/doctest.h>
#include <libpq-fe.h>

#include "test_helpers.hpp"  // wait_until

#include <atomic>
#include <cstdlib>
#include <string>
#include <unistd.h>

namespace imbus_test {

// The key=value conninfo of the test server; fails the test (never skips it) when unset.
inline std::string pg_base_conninfo() {
    const char* base = std::getenv("IMBUS_PG_CONNINFO");
    if (!base || !*base)
        FAIL(
            "IMBUS_PG_CONNINFO is not set: these tests need a PostgreSQL server (key=value conninfo, "
            "e.g. from `eval \"$(bash scripts/pg_cluster.sh start)\"`; scripts/test.sh does it)");
    return base;
}

// A connection for the test's own statements.
struct test_connection {
    PGconn* c = nullptr;
    explicit test_connection(const std::string& conninfo) : c(PQconnectdb(conninfo.c_str())) {
        REQUIRE_MESSAGE(PQstatus(c) == CONNECTION_OK, PQerrorMessage(c));
        PQsetNoticeProcessor(
            c, [](void*, const char*) {}, nullptr);  // "does not exist, skipping"
    }
    ~test_connection() { PQfinish(c); }
    test_connection(const test_connection&) = delete;
    test_connection& operator=(const test_connection&) = delete;
    operator PGconn*() const { return c; }

    // Runs sql; returns the first column of the first row ("" if none). Fails the test on error.
    std::string exec(const std::string& sql) {
        PGresult* r = PQexec(c, sql.c_str());
        const auto status = PQresultStatus(r);
        std::string error = PQresultErrorMessage(r);
        std::string value = status == PGRES_TUPLES_OK && PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "";
        PQclear(r);
        REQUIRE_MESSAGE((status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK), (sql + ": " + error));
        return value;
    }
    std::int64_t scalar(const std::string& sql) {
        auto v = exec(sql);
        return v.empty() ? 0 : std::stoll(v);
    }
};

struct pg_test_database {
    std::string base = pg_base_conninfo();
    std::string name;
    std::string conninfo;  // to the new database

    pg_test_database() {
        static std::atomic<int> counter{0};
        name = "imbus_test_" + std::to_string(getpid()) + "_" + std::to_string(++counter);
        test_connection admin(base);
        admin.exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)");
        admin.exec("CREATE DATABASE " + name);
        conninfo = base + " dbname=" + name;
    }
    ~pg_test_database() {
        PGconn* admin = PQconnectdb(base.c_str());
        PQsetNoticeProcessor(
            admin, [](void*, const char*) {}, nullptr);
        PQclear(PQexec(admin, ("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)").c_str()));
        PQfinish(admin);
    }
};

}  // namespace imbus_test
