// libFuzzer target: the JSON bodies of the bus's HTTP routes (docs/PROTOCOL.md §5) through serve_http on
// a server that never listens; byte 0 picks route, auth header and JSON-RPC envelope. Checks:
// never a 500, only 200/400/401/403/404, 200 bodies are the documented JSON, and the ids a
// /bus/send answers with are in the store.
#include "imbus.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

namespace {

using imbus::json;

constexpr std::size_t max_rows = 64;  // the store never holds more: memory stays bounded
const std::string api_key = "fuzz-key";

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz_http_routes: invariant broken: %s\n", what);
        std::abort();
    }
}

struct fixture {
    imbus::memory_store store{[] {
        imbus::memory_store_options o;
        o.max_notifications = max_rows;
        o.log = nullptr;
        return o;
    }()};
    imbus::dispatcher dispatcher;
    imbus::bus bus{store, dispatcher, {"fuzzdb", nullptr}};
    imbus::server server{bus, imbus::public_policy({imbus::channel("fuzzdb", "always")}), [] {
                             imbus::server_options o;
                             o.api_key = api_key;
                             o.gc_interval = std::chrono::seconds(0);
                             o.log = nullptr;
                             return o;
                         }()};
};

fixture& the_fixture() {
    static auto* f = new fixture;  // built once, never destroyed: no teardown at exit
    return *f;
}

// A 200 body, unwrapped from its JSON-RPC envelope when the request was JSON-RPC (an object
// with "jsonrpc", whatever the first byte said).
json result_of(const std::string& body, const std::string& request_body) {
    const json request = json::parse(request_body, nullptr, false);
    const bool rpc = request.is_object() && request.contains("jsonrpc");
    json j = json::parse(body, nullptr, false);
    check(!j.is_discarded(), "a 200 body is JSON");
    if (!rpc) return j;
    check(j.is_object() && j.value("jsonrpc", "") == "2.0" && j.contains("id") && j.contains("result"),
          "a JSON-RPC request gets a JSON-RPC answer");
    return j["result"];
}

void check_send(fixture& f, const imbus::http_response& r, int auth) {
    if (auth == 1) return check(r.status == 403, "a wrong key is 403");
    if (auth == 2) return check(r.status == 401, "no key is 401");
    check(r.status == 200 || r.status == 400, "/bus/send with the key: 200 or 400");
    if (r.status != 200) return;
    const json j = result_of(r.body, "");
    check(j.is_object() && j.contains("ids") && j["ids"].is_array() && !j["ids"].empty(), "{\"ids\": [...]}");
    const auto& ids = j["ids"];
    check(ids.back().get<std::int64_t>() == f.store.newest_id(), "the last id is the newest");
    for (std::size_t i = 1; i < ids.size(); ++i)
        check(ids[i].get<std::int64_t>() == ids[i - 1].get<std::int64_t>() + 1, "one batch: consecutive ids");
    if (ids.size() <= max_rows)  // a bigger batch pushes its own first rows out
        for (const auto& id : ids) check(f.store.contains(id.get<std::int64_t>()), "sent ids are in the store");
}

void check_peek(const imbus::http_response& r, const std::string& request_body) {
    check(r.status == 200 || r.status == 400, "peek_notifications: 200 or 400");
    if (r.status != 200) return;
    const json j = result_of(r.body, request_body);
    check(j.is_object() && j["channels"].is_array() && j["notifications"].is_array(), "{channels, notifications}");
    bool always = false;
    for (const auto& c : j["channels"]) {
        const auto key = c.dump(-1, ' ', true);
        std::error_code ec;
        check(imbus::channel::from_key(key, ec).key() == key && !ec, "answered channels are canonical");
        always = always || key == R"(["fuzzdb","always"])";
    }
    check(always, "the policy's own channel is always there");
    std::int64_t previous = 0;
    for (const auto& n : j["notifications"]) {
        check(n.is_object() && n["id"].is_number_integer() && n["message"].is_object(), "{id, message}");
        check(n["id"].get<std::int64_t>() > previous, "ascending ids");
        previous = n["id"].get<std::int64_t>();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    fixture& f = the_fixture();
    const unsigned pick = data[0];
    const int route = pick & 3;        // send, peek, has_missed, send again (more weight)
    const int auth = (pick >> 2) & 3;  // /bus/send: the key, a wrong key, none, "bearer" lowercase
    const bool rpc = (pick >> 4) & 1;  // wrap the body in a JSON-RPC envelope
    const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);

    imbus::http_request request;
    request.method = "POST";
    request.remote = "127.0.0.1:1";
    request.headers.emplace_back("Content-Type", "application/json");
    if (rpc) request.body = R"({"jsonrpc":"2.0","method":"call","id":7,"params":)" + std::string(body) + "}";
    else request.body = std::string(body);

    if (route == 0 || route == 3) {
        request.path = "/bus/send";
        if (auth == 0) request.headers.emplace_back("Authorization", "Bearer " + api_key);
        if (auth == 1) request.headers.emplace_back("Authorization", "Bearer not-" + api_key);
        if (auth == 3) request.headers.emplace_back("authorization", "bearer  " + api_key + " ");
        const auto r = f.server.serve_http(request);
        check(r.status != 500, "/bus/send: never a 500");
        check_send(f, r, auth == 3 ? 0 : auth);
    } else if (route == 1) {
        request.path = "/websocket/peek_notifications";
        const auto r = f.server.serve_http(request);
        check(r.status != 500, "peek_notifications: never a 500");
        check_peek(r, request.body);
    } else {
        request.path = "/bus/has_missed_notifications";
        const auto r = f.server.serve_http(request);
        check(r.status == 200 || r.status == 400, "has_missed_notifications: 200 or 400");
        if (r.status == 200)
            check(result_of(r.body, request.body).is_boolean(), "has_missed_notifications answers a boolean");
    }
    return 0;
}
