// A store that forwards to another one and fails on demand: the tests of what the follower and
// the server do when a read of the store throws (PostgreSQL restarting, EMFILE opening a SQLite
// reader). Needs imbus.hpp included first.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <system_error>
#include <vector>

namespace imbus_test {

class faulty_store final : public imbus::store {
public:
    enum operation : unsigned { fetch_op = 1, newest_op = 2, oldest_op = 4, contains_op = 8, lost_op = 16, reads = 31 };

    explicit faulty_store(imbus::store& inner) : inner_(inner) {}

    /// The next `times` calls of the operations in `which` throw (times < 0: until heal()).
    void fail(unsigned which, int times = -1) {
        which_.store(which);
        remaining_.store(times);
    }
    void heal() { remaining_.store(0); }
    /// Calls that threw so far.
    int failures() const { return failures_.load(); }
    /// fetch calls so far, failed ones included.
    int fetches() const { return fetches_.load(); }

    std::unique_ptr<write_transaction> begin() override { return inner_.begin(); }
    imbus::poll_result fetch(const std::vector<imbus::channel>& channels, std::int64_t last, std::size_t limit,
                             std::size_t max_bytes) override {
        ++fetches_;
        maybe_fail(fetch_op);
        return inner_.fetch(channels, last, limit, max_bytes);
    }
    std::int64_t newest_id() override { return maybe_fail(newest_op), inner_.newest_id(); }
    std::int64_t oldest_id() override { return maybe_fail(oldest_op), inner_.oldest_id(); }
    bool contains(std::int64_t id) override { return maybe_fail(contains_op), inner_.contains(id); }
    bool lost_after(const std::vector<imbus::channel>& channels, std::int64_t last) override {
        return maybe_fail(lost_op), inner_.lost_after(channels, last);
    }
    std::size_t collect_garbage() override { return inner_.collect_garbage(); }

private:
    void maybe_fail(unsigned op) {
        if (!(which_.load() & op)) return;
        int left = remaining_.load();
        while (left != 0 && !remaining_.compare_exchange_weak(left, left > 0 ? left - 1 : left)) {}
        if (left == 0) return;
        ++failures_;
        throw std::system_error(std::make_error_code(std::errc::io_error), "faulty_store: injected failure");
    }

    imbus::store& inner_;
    std::atomic<unsigned> which_{0};
    std::atomic<int> remaining_{0};
    std::atomic<int> failures_{0};
    std::atomic<int> fetches_{0};
};

}  // namespace imbus_test
