// libFuzzer target: imbus::parse_client_request on any text (docs/PROTOCOL.md §4). Checks: it never
// throws; invalid <=> an error; a subscribe has last >= 0 and no data; event data copies and
// prints (bounded nesting); the server can make [db, name] channels of the subscribed strings.
#include "imbus.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace {

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz_request: invariant broken: %s\n", what);
        std::abort();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    using kind = imbus::client_request::kind;
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const imbus::client_request r = imbus::parse_client_request(text);

    check((r.what == kind::invalid) == !r.error.empty(), "invalid <=> non-empty error");
    if (r.what == kind::invalid) {
        check(r.channels.empty(), "an invalid request names no channels");
        return 0;
    }
    if (r.what == kind::event) {
        check(r.event_name != "subscribe", "an event is not a subscribe");
        check(r.channels.empty() && r.last == 0, "an event has no channels and no last");
        // An event hook may copy and print the data: accepted data must be shallow enough.
        const imbus::json copy = r.data;
        check(copy.dump(-1, ' ', false, imbus::json::error_handler_t::replace).size() > 0, "data prints");
        return 0;
    }
    check(r.what == kind::subscribe, "a known kind");
    check(r.event_name == "subscribe", "a subscribe is named subscribe");
    check(r.last >= 0, "subscribe: last >= 0");
    check(r.data.is_null(), "subscribe: data is consumed");
    // What basic_server::build_channels does with the strings, then what a poll matches on.
    for (const auto& name : r.channels) {
        const imbus::channel c("fuzzdb", name);  // the parser gave valid UTF-8: never throws
        check(c.size() == 2 && !c.key().empty(), "a [db, name] channel");
        std::error_code ec;
        check(imbus::channel::from_key(c.key(), ec) == c && !ec, "the key parses back");
        check(c.to_json() == imbus::json::array({"fuzzdb", name}), "the key is the JSON of [db, name]");
    }
    return 0;
}
