// Channels, canonical keys, the channel mapping, notifications and the manual clock
// (docs/PROTOCOL.md §1-2). Built WITHOUT IMBUS_WITH_SQLITE: the core must compile on its own.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include "imbus.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

// The core must not need SQLite or websocketpp: this file is compiled without them.
#ifdef IMBUS_WITH_SQLITE
#error "channel_test must be built without IMBUS_WITH_SQLITE"
#endif
#ifdef SQLITE_VERSION
#error "imbus.hpp pulled in sqlite3.h without IMBUS_WITH_SQLITE"
#endif
#ifdef WEBSOCKETPP_VERSION_HPP
#error "imbus.hpp pulled in websocketpp"
#endif

// Failure messages show a channel by its key.
namespace doctest {
template <> struct StringMaker<imbus::channel> {
    static String convert(const imbus::channel& c) { return c.key().c_str(); }
};
}  // namespace doctest

namespace {

#ifdef IMBUS_WITH_SQLITE
constexpr bool built_with_sqlite = true;
#else
constexpr bool built_with_sqlite = false;
#endif
static_assert(!built_with_sqlite, "the core test runs without the SQLite store");

using imbus::channel;
using imbus::json;

// The error code a call throws as std::system_error; an empty code when it does not throw.
template <class F> std::error_code error_of(F&& f) {
    try {
        f();
    } catch (const std::system_error& e) {
        return e.code();
    }
    return {};
}

// Bytes as hex, for failure messages (the strings themselves are not printable).
std::string hex(const std::string& s) {
    static const char digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : s) {
        out += digits[c >> 4];
        out += digits[c & 15];
        out += ' ';
    }
    return out;
}

// Byte strings that are not valid UTF-8, each for a different reason.
const std::vector<std::string> invalid_utf8 = {
    std::string("\xc0\xaf"),          // overlong 2-byte encoding of '/'
    std::string("\xc1\xbf"),          // overlong 2-byte encoding
    std::string("\xe0\x80\xaf"),      // overlong 3-byte encoding
    std::string("\xf0\x8f\xbf\xbf"),  // overlong 4-byte encoding (U+FFFF)
    std::string("\x80"),              // lone continuation byte
    std::string("a\xbf"
                "b"),                     // continuation byte between ASCII
    std::string("\xed\xa0\x80"),          // surrogate U+D800 encoded in UTF-8
    std::string("\xed\xbf\xbf"),          // surrogate U+DFFF encoded in UTF-8
    std::string("\xf4\x90\x80\x80"),      // U+110000, above U+10FFFF
    std::string("\xf5\x80\x80\x80"),      // lead byte that can only start > U+10FFFF
    std::string("\xf8\x88\x80\x80\x80"),  // old 5-byte form
    std::string("\xff"),                  // never valid
    std::string("\xc3"),                  // truncated at the end
    std::string("\xf0\x9f\x98"),          // truncated 4-byte sequence at the end
    std::string("\xe2\x82"
                "A"),  // truncated, followed by ASCII
};

}  // namespace

// --- canonical keys -------------------------------------------------------------------------

// Keys must match Python's json.dumps(v, separators=(',',':')) byte for byte: a store shared
// with the Odoo bus (or any other implementation) matches rows by this text.
TEST_CASE("canonical keys are byte-identical to Python json.dumps with ensure_ascii") {
    CHECK(channel("db", "caf\xc3\xa9").key() == R"(["db","caf\u00e9"])");
    CHECK(channel("db", "\x7f\x1f\n\t\"\\/").key() == R"(["db","\u007f\u001f\n\t\"\\/"])");
    CHECK(channel("db", "\xf0\x9f\x98\x80 \xe2\x80\xa8").key() == R"(["db","\ud83d\ude00 \u2028"])");
    CHECK(channel("d\xc3\xa9", "res.partner", 3, "presence").key() == R"(["d\u00e9","res.partner",3,"presence"])");
    CHECK(channel("db", "a", std::numeric_limits<std::int64_t>::min()).key() == R"(["db","a",-9223372036854775808])");
    CHECK(channel("db", "a", std::numeric_limits<std::int64_t>::max()).key() == R"(["db","a",9223372036854775807])");
    CHECK(channel("db", "res.partner", 0).key() == R"(["db","res.partner",0])");
    CHECK(channel("db", "broadcast").key() == R"(["db","broadcast"])");
    CHECK(channel("db", "").key() == R"(["db",""])");
}

// The short escapes Python uses (\b \f \r) and \u00XX for every other control byte, NUL included.
TEST_CASE("control characters use Python's short escapes or lowercase \\u00XX") {
    CHECK(channel("db", "\b\f\r").key() == R"(["db","\b\f\r"])");
    CHECK(channel("db", std::string_view("a\0b", 3)).key() == R"(["db","a\u0000b"])");
    CHECK(channel("db", std::string_view("\0", 1)).key() == R"(["db","\u0000"])");
    CHECK(channel("db", "\x01\x0b\x0e\x1b").key() == R"(["db","\u0001\u000b\u000e\u001b"])");
    CHECK(channel("db", " ~").key() == R"(["db"," ~"])");  // the printable range is kept as is
}

// The UTF-8 length boundaries, and code points above U+FFFF as lowercase surrogate pairs.
TEST_CASE("code points at UTF-8 boundaries are escaped like Python does") {
    CHECK(channel("db", "\xc2\x80").key() == R"(["db","\u0080"])");                // U+0080
    CHECK(channel("db", "\xdf\xbf").key() == R"(["db","\u07ff"])");                // U+07FF
    CHECK(channel("db", "\xe0\xa0\x80").key() == R"(["db","\u0800"])");            // U+0800
    CHECK(channel("db", "\xed\x9f\xbf").key() == R"(["db","\ud7ff"])");            // U+D7FF
    CHECK(channel("db", "\xee\x80\x80").key() == R"(["db","\ue000"])");            // U+E000
    CHECK(channel("db", "\xef\xbf\xbf").key() == R"(["db","\uffff"])");            // U+FFFF
    CHECK(channel("db", "\xf0\x90\x80\x80").key() == R"(["db","\ud800\udc00"])");  // U+10000
    CHECK(channel("db", "\xf4\x8f\xbf\xbf").key() == R"(["db","\udbff\udfff"])");  // U+10FFFF
}

// --- shapes -----------------------------------------------------------------------------------

// The three shapes of docs/PROTOCOL.md §1, and with_sub turning a record channel into its sub-channel.
TEST_CASE("the three channel shapes and with_sub") {
    const channel empty;
    CHECK(empty.empty());
    CHECK(empty.size() == 0);
    CHECK(empty.to_json() == json::array());

    const channel name("mydb", "broadcast");
    CHECK(name.size() == 2);
    CHECK_FALSE(name.empty());
    CHECK(name.to_json() == json::parse(R"(["mydb","broadcast"])"));

    const channel rec("mydb", "res.partner", 3);
    CHECK(rec.size() == 3);
    CHECK(rec.to_json() == json::parse(R"(["mydb","res.partner",3])"));

    const channel sub = rec.with_sub("presence");
    CHECK(sub.size() == 4);
    CHECK(sub.key() == R"(["mydb","res.partner",3,"presence"])");
    CHECK(sub == channel("mydb", "res.partner", 3, "presence"));
    CHECK(rec.key() == R"(["mydb","res.partner",3])");  // with_sub does not change its source

    // only a record channel takes a sub-channel
    CHECK(error_of([&] { (void)name.with_sub("x"); }) == imbus::errc::invalid_channel);
    CHECK(error_of([&] { (void)sub.with_sub("x"); }) == imbus::errc::invalid_channel);
    CHECK(error_of([&] { (void)empty.with_sub("x"); }) == imbus::errc::invalid_channel);
}

// A record channel and the same record with a sub-channel must never be confused.
TEST_CASE("a record channel and the same record with a sub-channel are different channels") {
    const channel rec("db", "res.partner", 3);
    const channel sub("db", "res.partner", 3, "presence");
    CHECK(rec != sub);
    CHECK_FALSE(rec == sub);
    CHECK(rec.key() != sub.key());
    CHECK(channel("db", "res.partner", 3) != channel("db", "res.partner", 4));
    CHECK(channel("db", "a") != channel("other", "a"));
    CHECK(rec.with_sub("") != rec);  // even an empty sub-channel is a different channel
    CHECK(rec.with_sub("").key() == R"(["db","res.partner",3,""])");
}

// Identity is the key: equality, ordering and hashing must agree, so channels key containers.
TEST_CASE("equality, ordering and hash follow the canonical key") {
    const channel a("db", "a");
    const channel a2 = channel::from_key(R"(["db","a"])");
    const channel b("db", "b");
    const channel r("db", "a", 1);
    CHECK(a == a2);
    CHECK_FALSE(a != a2);
    CHECK(std::hash<channel>()(a) == std::hash<channel>()(a2));
    CHECK(std::hash<channel>()(a) == std::hash<std::string>()(a.key()));

    std::vector<channel> v{r, b, a, channel("db", "a", 1, "s")};
    std::sort(v.begin(), v.end());
    for (std::size_t i = 1; i < v.size(); ++i) {
        CHECK(v[i - 1] < v[i]);
        CHECK(v[i - 1].key() < v[i].key());
        CHECK_FALSE(v[i] < v[i - 1]);
    }
    CHECK_FALSE(a < a2);
    CHECK_FALSE(a2 < a);
}

// Dispatchers and servers keep channels in hashed containers: duplicates must collapse.
TEST_CASE("channels work as keys of unordered_set and unordered_map") {
    std::unordered_set<channel> set;
    set.insert(channel("db", "a"));
    set.insert(channel::from_key(R"(["db","a"])"));
    set.insert(channel("db", "res.partner", 3));
    set.insert(channel("db", "res.partner", 3, "presence"));
    set.insert(channel("db", "res.partner", 3).with_sub("presence"));
    CHECK(set.size() == 3);
    CHECK(set.count(channel("db", "res.partner", 3, "presence")) == 1);
    CHECK(set.count(channel("db", "b")) == 0);

    std::unordered_map<channel, int> map;
    map[channel("db", "a")] += 1;
    map[channel::from_json(json::parse(R"(["db","a"])"))] += 1;
    map[channel("db", "a", 1)] += 5;
    CHECK(map.size() == 2);
    CHECK(map.at(channel("db", "a")) == 2);
    CHECK(map.at(channel("db", "a", 1)) == 5);

    std::map<channel, int> ordered{{channel("db", "b"), 2}, {channel("db", "a"), 1}};
    CHECK(ordered.begin()->first == channel("db", "a"));
}

// --- validation -------------------------------------------------------------------------------

// Python could never have produced a key from invalid UTF-8: reject it in every position.
TEST_CASE("invalid UTF-8 anywhere in a channel throws invalid_channel") {
    for (const auto& bad : invalid_utf8) {
        const std::string bytes = hex(bad);
        CAPTURE(bytes);
        CHECK(error_of([&] { channel("db", bad); }) == imbus::errc::invalid_channel);
        CHECK(error_of([&] { channel(bad, "name"); }) == imbus::errc::invalid_channel);
        CHECK(error_of([&] { channel("db", bad, 1); }) == imbus::errc::invalid_channel);
        CHECK(error_of([&] { channel("db", "m", 1, bad); }) == imbus::errc::invalid_channel);
        CHECK(error_of([&] { (void)channel("db", "m", 1).with_sub(bad); }) == imbus::errc::invalid_channel);
        CHECK(error_of([&] { (void)channel::from_json(json::array({"db", bad})); }) == imbus::errc::invalid_channel);
        std::error_code ec;
        CHECK(channel::from_json(json::array({"db", "m", 1, bad}), ec).empty());
        CHECK(ec == imbus::errc::invalid_channel);
    }
    // the error belongs to imbus' category
    const auto code = error_of([] { channel("db", "\xff"); });
    CHECK(code.category() == imbus::error_category());
    CHECK(std::string(code.category().name()) == "imbus");
    CHECK(code.message() == "invalid channel");
}

// Every channel starts with its database: an empty one would match across tenants.
TEST_CASE("an empty database name is rejected") {
    CHECK(error_of([] { channel("", "a"); }) == imbus::errc::invalid_channel);
    CHECK(error_of([] { channel("", "m", 1); }) == imbus::errc::invalid_channel);
    CHECK(error_of([] { channel("", "m", 1, "s"); }) == imbus::errc::invalid_channel);
    CHECK(error_of([] { (void)channel::from_json(json::parse(R"(["","a"])")); }) == imbus::errc::invalid_channel);
    CHECK(error_of([] { (void)channel::from_key(R"(["","a"])"); }) == imbus::errc::invalid_channel);
}

// --- from_json / from_key ---------------------------------------------------------------------

// Channels arrive from clients and other processes as JSON: exactly the three shapes pass.
TEST_CASE("from_json accepts exactly the channel shapes") {
    CHECK(channel::from_json(json::parse(R"(["db","a"])")) == channel("db", "a"));
    CHECK(channel::from_json(json::parse(R"(["db","m",3])")) == channel("db", "m", 3));
    CHECK(channel::from_json(json::parse(R"(["db","m",-3])")) == channel("db", "m", -3));
    CHECK(channel::from_json(json::parse(R"(["db","m",3,"s"])")) == channel("db", "m", 3, "s"));
    CHECK(channel::from_json(json::parse(R"(["db","m",-9223372036854775808])")) ==
          channel("db", "m", std::numeric_limits<std::int64_t>::min()));
    CHECK(channel::from_json(json::parse(R"(["db","m",9223372036854775807])")) ==
          channel("db", "m", std::numeric_limits<std::int64_t>::max()));
    // ids held as signed or unsigned JSON integers are the same id
    CHECK(channel::from_json(json::array({"db", "m", std::int64_t(7)})) == channel("db", "m", 7));
    CHECK(channel::from_json(json::array({"db", "m", std::uint64_t(7)})) == channel("db", "m", 7));
    // non-ASCII text in the JSON value is canonicalized
    CHECK(channel::from_json(json::array({"d\xc3\xa9", "x"})).key() == R"(["d\u00e9","x"])");

    const char* rejected[] = {
        R"("db")",
        R"(null)",
        R"(3)",
        R"({"db":"a"})",
        R"([])",
        R"(["db"])",
        R"(["db","m",3,"s","extra"])",  // 5 elements
        R"(["db","m",3,"s",1])",        // 5 elements
        R"([1,"a"])",
        R"([null,"a"])",
        R"(["db",1])",
        R"(["db",null])",
        R"(["db",true])",
        R"(["db","m","3"])",  // id as a string
        R"(["db","m",3.0])",  // float id
        R"(["db","m",3.5])",
        R"(["db","m",1e3])",
        R"(["db","m",true])",  // bool id
        R"(["db","m",null])",
        R"(["db",["a"]])",  // nested arrays
        R"([["db"],"a"])",
        R"(["db","m",[3]])",
        R"(["db","m",3,["s"]])",
        R"(["db",{"a":1}])",  // objects
        R"(["db","m",{"id":3}])",
        R"(["db","m",3,{"s":1}])",
        R"(["db","m",3,4])",                  // sub must be a string
        R"(["db","m",9223372036854775808])",  // unsigned above INT64_MAX
        R"(["db","m",18446744073709551615])",
        R"(["db","m",18446744073709551616])",  // beyond uint64: a float
        R"(["","a"])",
    };
    for (const char* text : rejected) {
        CAPTURE(text);
        const json j = json::parse(text);
        CHECK(error_of([&] { (void)channel::from_json(j); }) == imbus::errc::invalid_channel);
        std::error_code ec;
        channel c;
        CHECK_NOTHROW(c = channel::from_json(j, ec));
        CHECK(ec == imbus::errc::invalid_channel);
        CHECK(c.empty());
    }
    // a discarded value (a failed parse) is rejected too, without throwing
    std::error_code ec;
    CHECK(channel::from_json(json::parse("not json", nullptr, false), ec).empty());
    CHECK(ec == imbus::errc::invalid_channel);
}

// The error_code overload reports through ec only, and clears a stale error on success.
TEST_CASE("from_json with an error_code clears it on success") {
    std::error_code ec = imbus::errc::store_failure;
    const channel c = channel::from_json(json::parse(R"(["db","m",3,"s"])"), ec);
    CHECK_FALSE(ec);
    CHECK(c == channel("db", "m", 3, "s"));
}

// Keys read back from a store must give the same channel, and only canonical text is a key.
TEST_CASE("from_key round-trips canonical keys and rejects other spellings") {
    const std::vector<channel> channels = {
        channel("db", "a"),
        channel("db", "caf\xc3\xa9"),
        channel("db", "\x7f\x1f\n\t\"\\/\b\f\r"),
        channel("db", std::string_view("a\0b", 3)),
        channel("db", "\xf0\x9f\x98\x80 \xe2\x80\xa8"),
        channel("d\xc3\xa9", "res.partner", 3, "presence"),
        channel("db", "a", std::numeric_limits<std::int64_t>::min()),
        channel("db", "a", 0),
    };
    for (const auto& c : channels) {
        CAPTURE(c.key());
        const channel back = channel::from_key(c.key());
        CHECK(back == c);
        CHECK(back.key() == c.key());
        CHECK(back.size() == c.size());
        std::error_code ec = imbus::errc::store_failure;
        CHECK(channel::from_key(c.key(), ec) == c);
        CHECK_FALSE(ec);
    }

    const std::string not_canonical[] = {
        R"(["db", "a"])",  // a space
        R"( ["db","a"])",
        R"(["db","a"] )",
        "[\"db\",\"a\"]\n",
        R"(["d\u00E9","a"])",     // uppercase hex
        "[\"d\xc3\xa9\",\"a\"]",  // raw UTF-8 instead of \u00e9
        R"(["db","\/"])",         // an escape Python does not use
        R"(["db","\u0041"])",     // an escaped printable character
        R"(["db","\u000a"])",     // \n written long
        R"(["db","m",03])",       // not JSON
        R"(["db","m",+3])",
        R"(["db","m",-0])",
        R"(["db","m",3.0])",
        R"(["db","m",1e2])",
        R"(["db","a")",  // truncated
        R"(["db","a"]])",
        "",
        "not json",
        R"(["db","a","b","c","d"])",
        R"(["db","a\ud800"])",  // lone surrogate escape
    };
    for (const auto& text : not_canonical) {
        CAPTURE(text);
        CHECK(error_of([&] { (void)channel::from_key(text); }) == imbus::errc::invalid_channel);
        std::error_code ec;
        channel c;
        CHECK_NOTHROW(c = channel::from_key(text, ec));
        CHECK(ec == imbus::errc::invalid_channel);
        CHECK(c.empty());
    }
}

// --- the channel mapping ----------------------------------------------------------------------

namespace app {
// "send to a user" means "send on that user's partner channel": a chain of two mappings.
struct user {
    int partner_id;
};
struct partner {
    int id;
};
partner bus_channel(const user& u) { return partner{u.partner_id}; }
imbus::record bus_channel(const partner& p) { return imbus::record{"res.partner", p.id, ""}; }

// A type that maps to a plain channel name.
struct room {
    std::string name;
};
std::string bus_channel(const room& r) { return "room/" + r.name; }

// A type that maps straight to a channel (the db is then the channel's own).
struct fixed {};
imbus::channel bus_channel(const fixed&) { return imbus::channel("elsewhere", "fixed"); }
}  // namespace app

// Applications address their own types; the mapping is followed to its fixed point.
TEST_CASE("to_channel follows bus_channel to a fixed point") {
    const app::partner p{7};
    const app::user u{7};
    CHECK(imbus::to_channel("db", p).key() == R"(["db","res.partner",7])");
    CHECK(imbus::to_channel("db", u).key() == R"(["db","res.partner",7])");
    CHECK(imbus::to_channel("db", u) == imbus::to_channel("db", p));

    const std::pair<app::partner, std::string> presence{p, "presence"};
    const channel c = imbus::to_channel("db", presence);
    CHECK(c.size() == 4);
    CHECK(c.key() == R"(["db","res.partner",7,"presence"])");
    CHECK(imbus::to_channel("db", std::pair<app::user, std::string>{u, "presence"}) == c);

    CHECK(imbus::to_channel("db", app::room{"lobby"}).key() == R"(["db","room/lobby"])");
    CHECK(imbus::to_channel("db", app::fixed{}).key() == R"(["elsewhere","fixed"])");
    // a sub-channel only exists under a record
    CHECK(error_of([] {
              (void)imbus::to_channel("db", std::pair<app::room, std::string>{{"x"}, "s"});
          }) == imbus::errc::invalid_channel);
}

// The built-in targets: names in every string form, records with or without a sub-channel.
TEST_CASE("to_channel for names, records and channels") {
    const std::string expected = R"(["db","broadcast"])";
    CHECK(imbus::to_channel("db", "broadcast").key() == expected);
    const char* cstr = "broadcast";
    CHECK(imbus::to_channel("db", cstr).key() == expected);
    const std::string str = "broadcast";
    CHECK(imbus::to_channel("db", str).key() == expected);
    CHECK(imbus::to_channel("db", std::string_view(str)).key() == expected);

    CHECK(imbus::to_channel("db", imbus::record{"res.partner", 3}).key() == R"(["db","res.partner",3])");
    CHECK(imbus::to_channel("db", imbus::record{"res.partner", 3, "presence"}).key() ==
          R"(["db","res.partner",3,"presence"])");
    CHECK(imbus::to_channel("db", std::pair<imbus::record, std::string>{{"res.partner", 3, ""}, "presence"}).key() ==
          R"(["db","res.partner",3,"presence"])");

    // a channel is already a channel: its own db is kept
    CHECK(imbus::to_channel("other", channel("db", "x")) == channel("db", "x"));

    // invalid input surfaces as invalid_channel
    CHECK(error_of([] { (void)imbus::to_channel("db", "\xff"); }) == imbus::errc::invalid_channel);
    CHECK(error_of([] { (void)imbus::to_channel("", "x"); }) == imbus::errc::invalid_channel);
}

// A bus prefixes channels with its own database name.
TEST_CASE("bus::channel_for uses the bus's database") {
    imbus::memory_store store;
    imbus::bus_options options;
    options.db = "mydb";
    imbus::bus bus(store, options);
    CHECK(bus.db() == "mydb");
    CHECK(bus.channel_for("broadcast").key() == R"(["mydb","broadcast"])");
    CHECK(bus.channel_for(app::user{3}).key() == R"(["mydb","res.partner",3])");
    CHECK(bus.channel_for(std::make_pair(app::partner{3}, std::string("presence"))).key() ==
          R"(["mydb","res.partner",3,"presence"])");
}

// --- notifications ----------------------------------------------------------------------------

// Clients parse exactly {"id":N,"message":{"type":T,"payload":P}} (docs/PROTOCOL.md §2, §4).
TEST_CASE("notification wire form, type and payload") {
    imbus::notification n;
    n.id = 42;
    n.channel = channel("db", "broadcast");
    n.message = imbus::make_message("chat/message", json{{"text", "hi"}});
    CHECK(n.message == R"({"type":"chat/message","payload":{"text":"hi"}})");
    CHECK(n.wire() == R"({"id":42,"message":{"type":"chat/message","payload":{"text":"hi"}}})");
    CHECK(n.type() == "chat/message");
    CHECK(n.payload() == json{{"text", "hi"}});
    const json j = n.to_json();
    CHECK(j == json::parse(R"({"id":42,"message":{"type":"chat/message","payload":{"text":"hi"}}})"));
    CHECK(j.at("id").get<std::int64_t>() == 42);

    // every JSON payload kind survives the round trip
    for (const json& payload :
         {json(nullptr), json(true), json(-5), json(2.5), json("text"), json::array({1, "x", nullptr}), json::object(),
          json{{"nested", {{"a", json::array({1, 2})}}}}, json("caf\xc3\xa9 \xf0\x9f\x98\x80")}) {
        CAPTURE(payload.dump());
        imbus::notification m{1, channel("db", "x"), imbus::make_message("t", payload), {}};
        CHECK(m.type() == "t");
        CHECK(m.payload() == payload);
        CHECK(m.to_json().at("message").at("payload") == payload);
    }
    CHECK(imbus::make_message("t", nullptr) == R"({"type":"t","payload":null})");
    CHECK(imbus::make_message("a\"b", json::array({1, "x"})) == R"({"type":"a\"b","payload":[1,"x"]})");
    CHECK(imbus::notification{7, channel("db", "x"), imbus::make_message("t", 1), {}}.wire() ==
          R"({"id":7,"message":{"type":"t","payload":1}})");
}

// Invalid UTF-8 must be refused when the message is made, never reach a store or a socket.
TEST_CASE("make_message rejects invalid UTF-8 with invalid_message") {
    for (const auto& bad : invalid_utf8) {
        CHECK(error_of([&] { (void)imbus::make_message("t", json(bad)); }) == imbus::errc::invalid_message);
        CHECK(error_of([&] { (void)imbus::make_message("t", json{{"k", bad}}); }) == imbus::errc::invalid_message);
        CHECK(error_of([&] { (void)imbus::make_message("t", json{{bad, 1}}); }) == imbus::errc::invalid_message);
        CHECK(error_of([&] {
                  (void)imbus::make_message("t", json::array({1, json::array({bad})}));
              }) == imbus::errc::invalid_message);
        CHECK(error_of([&] { (void)imbus::make_message(bad, 1); }) == imbus::errc::invalid_message);
    }
    CHECK(imbus::make_error_code(imbus::errc::invalid_message).message() == "invalid message");
}

// One dispatch is one frame: a JSON array of wire forms, in the given (ascending) order.
TEST_CASE("make_frame of zero, one and two notifications") {
    const imbus::notification a{5, channel("db", "x"), imbus::make_message("t", 1), {}};
    const imbus::notification b{9, channel("db", "y"), imbus::make_message("u", json{{"k", "v"}}), {}};
    CHECK(imbus::make_frame({}) == "[]");
    CHECK(imbus::make_frame({a}) == "[" + a.wire() + "]");
    CHECK(imbus::make_frame({a}) == R"([{"id":5,"message":{"type":"t","payload":1}}])");
    const std::string two = imbus::make_frame({a, b});
    CHECK(two == "[" + a.wire() + "," + b.wire() + "]");
    const json parsed = json::parse(two);
    REQUIRE(parsed.is_array());
    REQUIRE(parsed.size() == 2);
    CHECK(parsed[0].at("id") == 5);
    CHECK(parsed[1].at("id") == 9);
    CHECK(parsed[1].at("message").at("payload") == json{{"k", "v"}});
}

// --- clocks -----------------------------------------------------------------------------------

// Windows and retention are tested by moving time by hand, never by sleeping.
TEST_CASE("manual_clock moves only when told to") {
    using namespace std::chrono;
    imbus::manual_clock clock;
    const imbus::time_point start = clock();
    CHECK(clock() == start);
    CHECK(start == imbus::manual_clock()());  // the default start is fixed, not "now"
    CHECK(start.time_since_epoch() > imbus::clock_type::duration::zero());

    clock.advance(seconds(50));
    CHECK(clock() - start == seconds(50));
    clock.advance(milliseconds(1));
    CHECK(clock() - start == seconds(50) + milliseconds(1));
    clock.advance(-seconds(1));
    CHECK(clock() - start == seconds(49) + milliseconds(1));

    const imbus::time_point t0{hours(24 * 365)};
    clock.set(t0);
    CHECK(clock() == t0);

    // usable as a clock_function through std::ref: it sees later moves
    imbus::clock_function f = std::ref(clock);
    CHECK(f() == t0);
    clock.advance(hours(1));
    CHECK(f() == t0 + hours(1));

    imbus::manual_clock explicit_start(t0);
    CHECK(explicit_start() == t0);

    const imbus::time_point real = imbus::system_clock()();
    CHECK(real.time_since_epoch() > imbus::clock_type::duration::zero());
}

// Library identity that build scripts and the consumer test rely on.
TEST_CASE("version string") {
    CHECK(imbus::version_string() == std::to_string(IMBUS_VERSION_MAJOR) + "." + std::to_string(IMBUS_VERSION_MINOR) +
                                         "." + std::to_string(IMBUS_VERSION_PATCH));
    CHECK(imbus::version_string() == "0.1.0");
}
