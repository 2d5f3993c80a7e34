// libFuzzer target: channels and their canonical keys (docs/PROTOCOL.md §1). Checks that the
// error_code forms of from_key / from_json never throw and agree with the throwing forms,
// that a key parses only when it is byte-identical to the compact ensure_ascii JSON of the
// channel (Python's json.dumps), and that from_key(c.key()) == c for every channel made.
#include "imbus.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace {

using imbus::channel;
using imbus::json;

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz_channel: invariant broken: %s\n", what);
        std::abort();
    }
}

// nlohmann's compact dump with ensure_ascii escapes exactly like Python's json.dumps
// (\uXXXX in lowercase, 0x7f included), so it is an independent reference for keys.
std::string reference_key(const json& j) { return j.dump(-1, ' ', true); }

// The shapes docs/PROTOCOL.md §1 allows, decided without imbus.
bool is_channel_shape(const json& j) {
    if (!j.is_array() || j.size() < 2 || j.size() > 4) return false;
    if (!j[0].is_string() || j[0].get_ref<const std::string&>().empty() || !j[1].is_string()) return false;
    if (j.size() >= 3) {
        if (!j[2].is_number_integer()) return false;
        if (j[2].is_number_unsigned() && j[2].get<std::uint64_t>() > std::uint64_t(INT64_MAX)) return false;
    }
    return j.size() < 4 || j[3].is_string();
}

// nlohmann refuses to print invalid UTF-8 (overlong forms, surrogates, above U+10FFFF).
bool valid_utf8(const std::string& s) {
    try {
        (void)json(s).dump();
        return true;
    } catch (const json::type_error&) {
        return false;
    }
}

void check_made(const channel& c) {
    check(!c.empty() && c.size() >= 2 && c.size() <= 4, "a made channel has 2 to 4 elements");
    std::error_code ec;
    check(channel::from_key(c.key(), ec) == c && !ec, "from_key(c.key()) == c");
    check(channel::from_key(c.key()).key() == c.key(), "the throwing from_key agrees");
    const json j = c.to_json();
    check(j.size() == c.size() && reference_key(j) == c.key(), "the key is the compact ensure_ascii JSON");
    check(channel::from_json(j, ec) == c && !ec, "from_json(c.to_json()) == c");
}

bool throws_invalid_channel(void (*f)(std::string_view), std::string_view text) {
    try {
        f(text);
        return false;
    } catch (const std::system_error& e) {
        check(e.code() == imbus::errc::invalid_channel, "throws invalid_channel, nothing else");
        return true;
    }
}

// The input as canonical key text.
void fuzz_key(std::string_view text) {
    std::error_code ec;
    const channel c = channel::from_key(text, ec);
    check(throws_invalid_channel([](std::string_view t) { (void)channel::from_key(t); }, text) == bool(ec),
          "from_key: throwing and error_code forms agree");
    if (ec) {
        check(c.empty(), "a refused key gives the empty channel");
        return;
    }
    check(c.key() == text, "an accepted key is the key of its channel, byte for byte");
    check_made(c);
}

// The input as any JSON value given to from_json.
void fuzz_json(std::string_view text) {
    const json j = json::parse(text, nullptr, false);
    if (j.is_discarded()) return;
    std::error_code ec;
    const channel c = channel::from_json(j, ec);
    check(!ec == is_channel_shape(j), "from_json accepts exactly the channel shapes");
    bool threw = false;
    try {
        (void)channel::from_json(j);
    } catch (const std::system_error& e) {
        check(e.code() == imbus::errc::invalid_channel, "from_json throws invalid_channel");
        threw = true;
    }
    check(threw == bool(ec), "from_json: throwing and error_code forms agree");
    if (ec) return;
    check(c.key() == reference_key(j), "from_json: the key is the compact ensure_ascii JSON");
    check_made(c);
}

// The input as raw parts (split at NUL) given to the constructors: bytes need not be UTF-8.
void fuzz_parts(std::string_view text) {
    std::vector<std::string> parts;
    for (std::size_t start = 0;;) {
        const auto end = text.find('\0', start);
        parts.emplace_back(text.substr(start, end - start));
        if (end == std::string_view::npos || parts.size() == 3) break;
        start = end + 1;
    }
    parts.resize(3);
    const std::string& db = parts[0];
    const std::string& name = parts[1];
    const std::string& sub = parts[2];
    const std::int64_t id = std::int64_t(std::hash<std::string_view>()(text));
    const bool ok = !db.empty() && valid_utf8(db) && valid_utf8(name);
    try {
        const channel two(db, name);
        check(ok, "channel(db, name) refuses an empty db and invalid UTF-8");
        check(two.key() == reference_key(json::array({db, name})), "[db, name] key");
        check_made(two);
        const channel three(db, name, id);
        check(three.key() == reference_key(json::array({db, name, id})), "[db, model, id] key");
        check_made(three);
        check(three != two, "a record is not a name");
        try {
            const channel four = three.with_sub(sub);
            check(valid_utf8(sub), "with_sub refuses invalid UTF-8");
            check(four == channel(db, name, id, sub), "with_sub == the four-element constructor");
            check(four.key() == reference_key(json::array({db, name, id, sub})), "[db, model, id, sub] key");
            check(four != three, "a sub-channel is another channel");
            check_made(four);
        } catch (const std::system_error& e) {
            check(e.code() == imbus::errc::invalid_channel && !valid_utf8(sub),
                  "with_sub throws only on invalid UTF-8");
        }
        bool threw = false;
        try {
            (void)two.with_sub(sub);
        } catch (const std::system_error& e) {
            threw = e.code() == imbus::errc::invalid_channel;
        }
        check(threw, "only a record channel takes a sub-channel");
    } catch (const std::system_error& e) {
        check(e.code() == imbus::errc::invalid_channel && !ok, "the constructors throw only on invalid input");
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    fuzz_key(text);
    fuzz_json(text);
    fuzz_parts(text);
    return 0;
}
