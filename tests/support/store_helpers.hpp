// Helpers shared by the store tests: a temporary SQLite file and batches (ids_of is in
// test_helpers.hpp). Needs doctest (REQUIRE) and imbus.hpp included first.
#pragma once

#include "test_helpers.hpp"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace imbus_test {

// A temporary SQLite file path, removed with its WAL companions.
struct temp_db {
    std::string path;
    temp_db() {
        char name[] = "/tmp/imbus-test-XXXXXX";
        const int fd = mkstemp(name);
        REQUIRE(fd >= 0);
        ::close(fd);
        path = name;
        std::remove(path.c_str());
    }
    ~temp_db() {
        for (const char* suffix : {"", "-wal", "-shm", "-journal"}) std::remove((path + suffix).c_str());
    }
    temp_db(const temp_db&) = delete;
    temp_db& operator=(const temp_db&) = delete;
};

// One notification per (channel, n), with n as its payload.
inline std::vector<imbus::pending_message> batch_of(std::initializer_list<std::pair<imbus::channel, int>> items) {
    std::vector<imbus::pending_message> batch;
    for (const auto& item : items) batch.push_back({item.first, imbus::make_message("t", item.second)});
    return batch;
}

}  // namespace imbus_test
