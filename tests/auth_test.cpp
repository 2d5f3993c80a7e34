// Auth building blocks without a network: http_request helpers, public_policy and
// signed_token_policy (issue/verify, tampering, expiry, revocation, authenticate, channels).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"

#include <algorithm>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using imbus::channel;
using imbus::http_request;
using imbus::signed_token_options;
using imbus::signed_token_policy;

namespace {

const std::string secret = "0123456789abcdef-a-test-secret";  // 30 bytes

http_request request_with(std::vector<std::pair<std::string, std::string>> headers, std::string query = {}) {
    http_request r;
    r.method = "GET";
    r.path = "/websocket";
    r.query = std::move(query);
    r.headers = std::move(headers);
    return r;
}

signed_token_options options_with(imbus::manual_clock& clock) {
    signed_token_options o;
    o.clock = std::ref(clock);
    return o;
}

// The three dot-separated parts of a token.
struct token_parts {
    std::string subject, expiry, mac;
    explicit token_parts(const std::string& token) {
        const auto dot1 = token.find('.');
        const auto dot2 = token.rfind('.');
        REQUIRE(dot1 != std::string::npos);
        REQUIRE(dot2 != dot1);
        subject = token.substr(0, dot1);
        expiry = token.substr(dot1 + 1, dot2 - dot1 - 1);
        mac = token.substr(dot2 + 1);
    }
    std::string join() const { return subject + "." + expiry + "." + mac; }
};

// Another base64url character in the same position (never the same one).
char other_char(char c) { return c == 'A' ? 'B' : 'A'; }

std::vector<std::string> keys_of(const std::vector<channel>& channels) {
    std::vector<std::string> out;
    for (const auto& c : channels) out.push_back(c.key());
    return out;
}

}  // namespace

// --- http_request helpers ---------------------------------------------------------------------

TEST_CASE("http_request::header and has_header ignore the case of the name") {
    auto r = request_with({{"Content-Type", "application/json"}, {"x-custom", "v1"}, {"X-CUSTOM", "v2"}});
    CHECK(r.header("content-type") == "application/json");
    CHECK(r.header("CONTENT-TYPE") == "application/json");
    CHECK(r.header("X-Custom") == "v1");  // the first of repeated headers
    CHECK(r.has_header("x-CUSTOM"));
    CHECK(r.header("Missing").empty());
    CHECK_FALSE(r.has_header("Missing"));
    CHECK_FALSE(r.has_header("Content-Typ"));  // no prefix match
    CHECK(r.header("Content-Type-X").empty());
}

TEST_CASE("http_request::param percent-decodes names and values") {
    auto r = request_with({}, "version=19.0-2&name=a%20b%2Bc&plus=x+y&empty=&flag&my%20key=v%3D1&pct=100%25");
    CHECK(r.param("version") == "19.0-2");
    CHECK(r.param("name") == "a b+c");
    CHECK(r.param("plus") == "x y");
    CHECK(r.param("empty").empty());
    CHECK(r.param("flag").empty());
    CHECK(r.param("my key") == "v=1");
    CHECK(r.param("pct") == "100%");
    CHECK(r.param("missing").empty());
    CHECK(r.param("vers").empty());  // whole names only

    SUBCASE("the first occurrence wins") { CHECK(request_with({}, "a=1&a=2").param("a") == "1"); }
    SUBCASE("malformed escapes stay as they are") {
        auto bad = request_with({}, "a=%zz&b=%4&c=%");
        CHECK(bad.param("a") == "%zz");
        CHECK(bad.param("b") == "%4");
        CHECK(bad.param("c") == "%");
    }
    SUBCASE("an empty query has no parameters") { CHECK(request_with({}, "").param("a").empty()); }
}

TEST_CASE("http_request::cookie reads one cookie among several, quoted or not") {
    auto r = request_with({{"cookie", "theme=dark; imbus_session=abc.123.xyz;  quoted=\"q v\" ;last=1"}});
    CHECK(r.cookie("theme") == "dark");
    CHECK(r.cookie("imbus_session") == "abc.123.xyz");
    CHECK(r.cookie("quoted") == "q v");
    CHECK(r.cookie("last") == "1");
    CHECK(r.cookie("missing").empty());
    CHECK(r.cookie("imbus").empty());  // whole names only
    CHECK(r.cookie("Theme").empty());  // cookie names are case-sensitive

    SUBCASE("a value may contain '='") { CHECK(request_with({{"Cookie", "t=a=b=c"}}).cookie("t") == "a=b=c"); }
    SUBCASE("a lone quote is kept") { CHECK(request_with({{"Cookie", "t=\""}}).cookie("t") == "\""); }
    SUBCASE("an empty quoted value") { CHECK(request_with({{"Cookie", "t=\"\""}}).cookie("t").empty()); }
    SUBCASE("no Cookie header") { CHECK(request_with({}).cookie("t").empty()); }
}

TEST_CASE("http_request::bearer_token") {
    CHECK(request_with({{"Authorization", "Bearer tok.en-1"}}).bearer_token() == "tok.en-1");
    CHECK(request_with({{"authorization", "bearer   spaced  "}}).bearer_token() == "spaced");
    CHECK(request_with({{"AUTHORIZATION", "BEARER x"}}).bearer_token() == "x");
    CHECK(request_with({{"Authorization", "Basic dXNlcjpwYXNz"}}).bearer_token().empty());
    CHECK(request_with({{"Authorization", "Bearer"}}).bearer_token().empty());
    CHECK(request_with({{"Authorization", "Bearer "}}).bearer_token().empty());
    CHECK(request_with({{"Authorization", "Bearertoken"}}).bearer_token().empty());
    CHECK(request_with({}).bearer_token().empty());
}

// --- public_policy ---------------------------------------------------------------------------

TEST_CASE("public_policy admits everybody and adds its fixed channels") {
    const channel broadcast("db", "broadcast");
    const channel record("db", "res.partner", 3);
    imbus::public_policy policy({broadcast, record});

    auto verdict = policy.authenticate(request_with({}));
    REQUIRE(verdict.accepted());
    CHECK(verdict.status() == 0);

    auto channels = policy.channels(verdict.identity(), {channel("db", "a"), channel("db", "b")});
    CHECK(keys_of(channels) ==
          std::vector<std::string>{R"(["db","a"])", R"(["db","b"])", broadcast.key(), record.key()});

    imbus::public_policy none;
    auto nobody_extra = none.channels({}, {channel("db", "a")});
    CHECK(keys_of(nobody_extra) == std::vector<std::string>{R"(["db","a"])"});
    CHECK(none.channels({}, {}).empty());
}

// --- signed_token_policy ---------------------------------------------------------------------

TEST_CASE("signed_token_policy: a secret shorter than 16 bytes throws") {
    CHECK_THROWS_AS(signed_token_policy(""), std::invalid_argument);
    CHECK_THROWS_AS(signed_token_policy("fifteen-bytes!!"), std::invalid_argument);
    CHECK_NOTHROW(signed_token_policy("sixteen-bytes!!!"));
}

TEST_CASE("signed_token_policy can be handed to basic_server, which takes its policy by value") {
    // basic_server(bus, AuthPolicy policy, options) stores std::move(policy): a policy that can
    // be neither moved nor copied cannot be the server's policy. signed_token_policy holds a
    // std::mutex, so basic_server<signed_token_policy> does not compile.
    CHECK(std::is_move_constructible<signed_token_policy>::value);
    CHECK(std::is_move_constructible<imbus::public_policy>::value);
}

TEST_CASE("signed_token_policy: issue and verify round trip") {
    imbus::manual_clock clock;
    signed_token_policy policy(secret, options_with(clock));

    for (const std::string& subject : std::vector<std::string>{"alice", "", "user:42", "ünïcode ✓",
                                                               std::string("nul\0byte", 8), std::string(200, 'x')}) {
        CAPTURE(subject);
        const std::string token = policy.issue(subject, 3600s);
        CHECK(token.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.") ==
              std::string::npos);
        auto who = policy.verify(token);
        REQUIRE(who);
        CHECK(who->subject == subject);
        CHECK(who->expires == clock() + 3600s);
    }

    // Two tokens for different subjects differ; the same input gives the same token.
    CHECK(policy.issue("alice", 60s) != policy.issue("bob", 60s));
    CHECK(policy.issue("alice", 60s) == policy.issue("alice", 60s));
    // Another ttl gives another expiry.
    CHECK(policy.verify(policy.issue("alice", 10s))->expires == clock() + 10s);
}

TEST_CASE("signed_token_policy: a tampered token is refused, whichever part changed") {
    imbus::manual_clock clock;
    signed_token_policy policy(secret, options_with(clock));
    const std::string token = policy.issue("alice", 3600s);
    REQUIRE(policy.verify(token));
    const token_parts good(token);

    SUBCASE("subject") {
        token_parts t = good;
        t.subject = policy.issue("mallory", 3600s).substr(0, policy.issue("mallory", 3600s).find('.'));
        REQUIRE(t.subject != good.subject);
        CHECK_FALSE(policy.verify(t.join()));
        t = good;
        t.subject[0] = other_char(t.subject[0]);
        CHECK_FALSE(policy.verify(t.join()));
    }
    SUBCASE("expiry") {
        token_parts t = good;
        t.expiry = std::to_string(std::stoll(t.expiry) + 1000000);
        CHECK_FALSE(policy.verify(t.join()));
        t.expiry = "0" + good.expiry;  // same number, other text
        CHECK_FALSE(policy.verify(t.join()));
        t.expiry = "";
        CHECK_FALSE(policy.verify(t.join()));
        t.expiry = "-" + good.expiry;
        CHECK_FALSE(policy.verify(t.join()));
    }
    SUBCASE("mac") {
        for (std::size_t i : {std::size_t(0), good.mac.size() / 2, good.mac.size() - 1}) {
            CAPTURE(i);
            token_parts t = good;
            t.mac[i] = other_char(t.mac[i]);
            CHECK_FALSE(policy.verify(t.join()));
        }
        token_parts t = good;
        t.mac.pop_back();
        CHECK_FALSE(policy.verify(t.join()));
        t = good;
        t.mac += "A";
        CHECK_FALSE(policy.verify(t.join()));
        t.mac = "";
        CHECK_FALSE(policy.verify(t.join()));
    }
    SUBCASE("shape") {
        CHECK_FALSE(policy.verify(""));
        CHECK_FALSE(policy.verify("."));
        CHECK_FALSE(policy.verify(".."));
        CHECK_FALSE(policy.verify("no-dots-at-all"));
        CHECK_FALSE(policy.verify(good.subject + "." + good.mac));  // the expiry left out
        CHECK_FALSE(policy.verify(token + "."));
        CHECK_FALSE(policy.verify("x." + token));
        CHECK_FALSE(policy.verify(token + " "));
    }
}

TEST_CASE("signed_token_policy: a token signed with another secret is refused") {
    imbus::manual_clock clock;
    signed_token_policy mine(secret, options_with(clock));
    signed_token_policy theirs("another-secret-of-enough-bytes", options_with(clock));
    signed_token_policy almost(secret + "x", options_with(clock));
    const std::string token = theirs.issue("alice", 3600s);
    CHECK(theirs.verify(token));
    CHECK_FALSE(mine.verify(token));
    CHECK_FALSE(mine.verify(almost.issue("alice", 3600s)));
    CHECK_FALSE(almost.verify(mine.issue("alice", 3600s)));
}

TEST_CASE("signed_token_policy: tokens expire by the policy's clock") {
    imbus::manual_clock clock;
    signed_token_policy policy(secret, options_with(clock));
    const std::string token = policy.issue("alice", 60s);
    auto who = policy.verify(token);
    REQUIRE(who);
    CHECK(policy.still_valid(*who));

    clock.advance(59s);
    CHECK(policy.verify(token));
    CHECK(policy.still_valid(*who));

    clock.advance(1s);  // exactly at the expiry: no longer valid
    CHECK_FALSE(policy.verify(token));
    CHECK_FALSE(policy.still_valid(*who));
    auto verdict = policy.authenticate(request_with({{"Authorization", "Bearer " + token}}));
    CHECK_FALSE(verdict.accepted());
    CHECK(verdict.status() == 403);

    clock.advance(-120s);  // a clock set back makes it valid again: expiry is a time, not a counter
    CHECK(policy.verify(token));

    CHECK_FALSE(policy.verify(policy.issue("bob", 0s)));  // a zero ttl is born expired
}

TEST_CASE("signed_token_policy: revoke and reinstate a subject") {
    imbus::manual_clock clock;
    signed_token_policy policy(secret, options_with(clock));
    const std::string alice = policy.issue("alice", 3600s);
    const std::string bob = policy.issue("bob", 3600s);
    auto alice_id = *policy.verify(alice);
    auto bob_id = *policy.verify(bob);
    auto with_cookie = [](const std::string& t) { return request_with({{"Cookie", "imbus_session=" + t}}); };

    policy.revoke("alice");
    CHECK_FALSE(policy.still_valid(alice_id));
    CHECK(policy.still_valid(bob_id));
    CHECK(policy.verify(alice));  // the signature is still fine; the session is not
    auto refused = policy.authenticate(with_cookie(alice));
    CHECK_FALSE(refused.accepted());
    CHECK(refused.status() == 403);
    CHECK(policy.authenticate(with_cookie(bob)).accepted());

    policy.revoke("alice");  // twice is harmless
    policy.reinstate("alice");
    CHECK(policy.still_valid(alice_id));
    CHECK(policy.authenticate(with_cookie(alice)).accepted());
    policy.reinstate("nobody");  // never revoked: harmless
    CHECK(policy.still_valid(bob_id));

    // Revocation is per subject, not per token: a fresh token for a revoked subject is refused too.
    policy.revoke("bob");
    CHECK_FALSE(policy.authenticate(with_cookie(policy.issue("bob", 60s))).accepted());
}

TEST_CASE("signed_token_policy::authenticate: cookie or bearer, 401 without, 403 when bad") {
    imbus::manual_clock clock;
    signed_token_policy policy(secret, options_with(clock));
    const std::string token = policy.issue("alice", 3600s);

    SUBCASE("cookie") {
        auto verdict = policy.authenticate(request_with({{"Cookie", "a=1; imbus_session=" + token + "; b=2"}}));
        REQUIRE(verdict.accepted());
        CHECK(verdict.identity().subject == "alice");
    }
    SUBCASE("quoted cookie") {
        auto verdict = policy.authenticate(request_with({{"Cookie", "imbus_session=\"" + token + "\""}}));
        REQUIRE(verdict.accepted());
        CHECK(verdict.identity().subject == "alice");
    }
    SUBCASE("bearer") {
        auto verdict = policy.authenticate(request_with({{"authorization", "Bearer " + token}}));
        REQUIRE(verdict.accepted());
        CHECK(verdict.identity().subject == "alice");
    }
    SUBCASE("nothing: 401") {
        for (auto headers :
             std::vector<std::vector<std::pair<std::string, std::string>>>{{},
                                                                           {{"Cookie", "other=" + token}},
                                                                           {{"Cookie", "imbus_session="}},
                                                                           {{"Authorization", "Basic " + token}},
                                                                           {{"Authorization", "Bearer "}}}) {
            auto verdict = policy.authenticate(request_with(headers));
            CHECK_FALSE(verdict.accepted());
            CHECK(verdict.status() == 401);
            CHECK_FALSE(verdict.reason().empty());
        }
    }
    SUBCASE("bad token: 403") {
        for (auto headers : std::vector<std::vector<std::pair<std::string, std::string>>>{
                 {{"Cookie", "imbus_session=garbage"}},
                 {{"Authorization", "Bearer garbage"}},
                 {{"Cookie", "imbus_session=" + token + "x"}},
                 {{"Authorization",
                   "Bearer " + signed_token_policy("another-secret-of-enough-bytes").issue("alice", 60s)}}}) {
            auto verdict = policy.authenticate(request_with(headers));
            CHECK_FALSE(verdict.accepted());
            CHECK(verdict.status() == 403);
            CHECK_FALSE(verdict.reason().empty());
        }
    }
    SUBCASE("another cookie name") {
        signed_token_options o = options_with(clock);
        o.cookie = "sid";
        signed_token_policy named(secret, o);
        CHECK(named.authenticate(request_with({{"Cookie", "sid=" + token}})).accepted());
        CHECK(named.authenticate(request_with({{"Cookie", "imbus_session=" + token}})).status() == 401);
    }
    SUBCASE("a valid cookie is enough even with a useless Authorization header") {
        auto verdict = policy.authenticate(
            request_with({{"Authorization", "Basic dXNlcjpwYXNz"}, {"Cookie", "imbus_session=" + token}}));
        CHECK(verdict.accepted());
    }
}

TEST_CASE("signed_token_policy::channels applies may_subscribe and own_channels") {
    imbus::manual_clock clock;
    signed_token_options o = options_with(clock);
    o.own_channels = [](const imbus::signed_identity& who) {
        return std::vector<channel>{channel("db", "res.users", who.subject == "alice" ? 1 : 2)};
    };
    o.may_subscribe = [](const imbus::signed_identity& who, const channel& c) {
        return c.key() != R"(["db","secret"])" || who.subject == "admin";
    };
    signed_token_policy policy(secret, o);
    auto alice = *policy.verify(policy.issue("alice", 60s));
    auto admin = *policy.verify(policy.issue("admin", 60s));

    const std::vector<channel> asked{channel("db", "public"), channel("db", "secret")};
    CHECK(keys_of(policy.channels(alice, asked)) ==
          std::vector<std::string>{R"(["db","public"])", R"(["db","res.users",1])"});
    CHECK(keys_of(policy.channels(admin, asked)) ==
          std::vector<std::string>{R"(["db","public"])", R"(["db","secret"])", R"(["db","res.users",2])"});
    CHECK(keys_of(policy.channels(alice, {})) == std::vector<std::string>{R"(["db","res.users",1])"});

    SUBCASE("without the hooks every requested channel passes, and nothing is added") {
        signed_token_policy plain(secret, options_with(clock));
        CHECK(keys_of(plain.channels(alice, asked)) ==
              std::vector<std::string>{R"(["db","public"])", R"(["db","secret"])"});
        CHECK(plain.channels(alice, {}).empty());
    }
}
