// docs/PROTOCOL.md §4 requests as the server reads them: imbus::parse_client_request, without sockets.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"

using kind = imbus::client_request::kind;

TEST_CASE("a subscribe: channels in order, last clamped at 0, null or absent last is 0") {
    auto r = imbus::parse_client_request(R"({"event_name":"subscribe","data":{"channels":["b","a","b"],"last":42}})");
    CHECK(r.what == kind::subscribe);
    CHECK(r.channels == std::vector<std::string>{"b", "a", "b"});
    CHECK(r.last == 42);
    CHECK(r.error.empty());
    CHECK(imbus::parse_client_request(R"({"event_name":"subscribe","data":{"channels":[],"last":-5}})").last == 0);
    CHECK(imbus::parse_client_request(R"({"event_name":"subscribe","data":{"channels":[],"last":null}})").last == 0);
    auto no_last = imbus::parse_client_request(R"({"event_name":"subscribe","data":{"channels":["x"]}})");
    CHECK(no_last.what == kind::subscribe);
    CHECK(no_last.last == 0);
    // Above any id the store will ever give: a far future, which the server treats as a first poll.
    CHECK(
        imbus::parse_client_request(R"({"event_name":"subscribe","data":{"channels":[],"last":18446744073709551615}})")
            .last == INT64_MAX);
}

TEST_CASE("a subscribe of the wrong shape is invalid, with the reason") {
    const std::pair<const char*, const char*> cases[] = {
        {R"({"event_name":"subscribe"})", "data.channels must be an array of strings"},
        {R"({"event_name":"subscribe","data":[]})", "data.channels must be an array of strings"},
        {R"({"event_name":"subscribe","data":{"channels":"a"}})", "data.channels must be an array of strings"},
        {R"({"event_name":"subscribe","data":{"channels":["a",1]}})", "channels sent by a client must be strings"},
        {R"({"event_name":"subscribe","data":{"channels":[["a"]]}})", "channels sent by a client must be strings"},
        {R"({"event_name":"subscribe","data":{"channels":[],"last":"7"}})", "data.last must be an integer"},
        {R"({"event_name":"subscribe","data":{"channels":[],"last":1.5}})", "data.last must be an integer"},
    };
    for (const auto& c : cases) {  // no structured binding: clang 14 cannot capture one (CAPTURE)
        const char* text = c.first;
        const char* why = c.second;
        CAPTURE(text);
        auto r = imbus::parse_client_request(text);
        CHECK(r.what == kind::invalid);
        CHECK(r.error == why);
        CHECK(r.channels.empty());
    }
}

TEST_CASE("any other event name is an event with its data, null when absent") {
    auto r = imbus::parse_client_request(R"({"event_name":"update_presence","data":{"inactivity_period":3}})");
    CHECK(r.what == kind::event);
    CHECK(r.event_name == "update_presence");
    CHECK(r.data == imbus::json{{"inactivity_period", 3}});
    auto bare = imbus::parse_client_request(R"({"event_name":"ping"})");
    CHECK(bare.what == kind::event);
    CHECK(bare.data.is_null());
}

TEST_CASE("what is not {event_name: string, ...} is invalid") {
    for (const char* text : {"", "not json", "[]", "42", "null", R"({"data":{}})", R"({"event_name":7})",
                             R"({"event_name":null})", "{\"event_name\":\"x\"", "\xff\xfe"}) {
        CAPTURE(text);
        auto r = imbus::parse_client_request(text);
        CHECK(r.what == kind::invalid);
        CHECK(!r.error.empty());
    }
}

// Found by reasoning about tests/fuzz/fuzz_http_routes (same cause as the routes' crash): a
// json value nested N deep is copied and printed with N nested calls, so a 1 MiB message of
// "[[[[..." could overflow the stack of whoever copies the data. Refused before parsing now.
TEST_CASE("a request nested deeper than max_depth is invalid, whatever its size") {
    auto nested = [](std::size_t levels) {  // the request object itself is one level
        return R"({"event_name":"x","data":)" + std::string(levels - 1, '[') + std::string(levels - 1, ']') + "}";
    };
    auto at_limit = imbus::parse_client_request(nested(IMBUS_MAX_JSON_DEPTH));
    REQUIRE(at_limit.what == kind::event);
    const imbus::json copy = at_limit.data;
    CHECK(copy.dump().size() == 2 * (IMBUS_MAX_JSON_DEPTH - 1));

    auto over = imbus::parse_client_request(nested(IMBUS_MAX_JSON_DEPTH + 1));
    CHECK(over.what == kind::invalid);
    CHECK(over.error == "a request is nested deeper than " + std::to_string(IMBUS_MAX_JSON_DEPTH) + " levels");
    CHECK(imbus::parse_client_request(nested(500000)).what == kind::invalid);
    CHECK(imbus::parse_client_request(nested(3), 2).what == kind::invalid);
    CHECK(imbus::parse_client_request(nested(2), 2).what == kind::event);

    // Brackets inside strings, escaped quotes included, are text, not nesting.
    const std::string brackets(IMBUS_MAX_JSON_DEPTH + 10, '[');
    auto in_string = imbus::parse_client_request(R"({"event_name":"x","data":"\")" + brackets + R"("})");
    CHECK(in_string.what == kind::event);
    CHECK(in_string.data == "\"" + brackets);
}
