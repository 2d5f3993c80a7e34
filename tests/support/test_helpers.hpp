// Small helpers every test shares: a logger that keeps what imbus reports, a wait on a
// condition with a deadline (tests never sleep a fixed time to synchronise), a logger that
// drops everything, and the ids of notifications (stored rows or their JSON form).
//
// Needs imbus.hpp included first (after the test's IMBUS_WITH_* defines) and C++17.
//
//   imbus_test::log_capture log;
//   options.log = log.logger();
//   ...
//   CHECK(imbus_test::wait_until([&] { return log.contains("is slow"); }));
//   CHECK(log.count_at_least(imbus::log_level::warning) == 0);
//   CHECK(imbus_test::ids_of(client.take(2, 5s)) == std::vector<std::int64_t>{a1, a2});
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace imbus_test {

// Built with AddressSanitizer or ThreadSanitizer (g++ and clang say it differently). Only
// exhaustive sweeps use it, to sample their cases instead of trying every one: the plain build
// still tries them all, and the sanitizers look for memory and thread errors, which a sample finds.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool sanitized = true;
#else
inline constexpr bool sanitized = false;
#endif
#else
inline constexpr bool sanitized = false;
#endif

// How long wait_until waits unless told: generous, as sanitizer builds run slowly.
inline constexpr std::chrono::milliseconds default_wait = std::chrono::seconds(10);

// Polls `pred` until it holds (true) or the deadline passes (false).
template <class Pred> bool wait_until(Pred&& pred, std::chrono::milliseconds timeout = default_wait) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
        if (std::chrono::steady_clock::now() >= deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
}

// A logger that drops everything.
inline imbus::logger quiet() {
    return [](imbus::log_level, const std::string&) {};
}

// Keeps every line a component logs, so a test can check that a failure was reported.
// Thread-safe: imbus logs from its own threads. Must outlive whatever holds logger().
// IMBUS_TEST_VERBOSE=1 in the environment also prints each line to stderr.
class log_capture {
public:
    imbus::logger logger() {
        return [this](imbus::log_level level, const std::string& text) {
            if (std::getenv("IMBUS_TEST_VERBOSE")) std::fprintf(stderr, "log: %s\n", text.c_str());
            std::lock_guard<std::mutex> lock(m_);
            lines_.emplace_back(level, text);
        };
    }
    // Whether a line of any level contains `part`.
    bool contains(const std::string& part) const {
        std::lock_guard<std::mutex> lock(m_);
        for (const auto& line : lines_)
            if (line.second.find(part) != std::string::npos) return true;
        return false;
    }
    // Whether a line of exactly this level contains `part`.
    bool has(imbus::log_level level, const std::string& part) const {
        std::lock_guard<std::mutex> lock(m_);
        for (const auto& line : lines_)
            if (line.first == level && line.second.find(part) != std::string::npos) return true;
        return false;
    }
    // How many lines are of this level or a more severe one (debug: all of them).
    std::size_t count_at_least(imbus::log_level level) const {
        std::lock_guard<std::mutex> lock(m_);
        std::size_t n = 0;
        for (const auto& line : lines_) n += line.first >= level ? 1 : 0;
        return n;
    }
    // Every line, "[level] text" each, for failure messages.
    std::string dump() const {
        static const char* const names[] = {"debug", "info", "warning", "error"};
        std::lock_guard<std::mutex> lock(m_);
        std::string out;
        for (const auto& line : lines_)
            out += std::string("[") + names[static_cast<int>(line.first)] + "] " + line.second + "\n";
        return out;
    }

private:
    mutable std::mutex m_;
    std::vector<std::pair<imbus::log_level, std::string>> lines_;
};

// The ids of stored rows, in order.
inline std::vector<std::int64_t> ids_of(const std::vector<imbus::notification>& rows) {
    std::vector<std::int64_t> ids;
    for (const auto& n : rows) ids.push_back(n.id);
    return ids;
}

// The ids of notifications as clients receive them (objects with an "id"), in order.
inline std::vector<std::int64_t> ids_of(const std::vector<imbus::json>& notifications) {
    std::vector<std::int64_t> ids;
    for (const auto& n : notifications) ids.push_back(n.at("id").get<std::int64_t>());
    return ids;
}

// The same for a JSON array of them, such as one server frame.
inline std::vector<std::int64_t> ids_of(const imbus::json& notifications) {
    std::vector<std::int64_t> ids;
    for (const auto& n : notifications) ids.push_back(n.at("id").get<std::int64_t>());
    return ids;
}

}  // namespace imbus_test
