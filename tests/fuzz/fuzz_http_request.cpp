// libFuzzer target: the http_request helpers a policy uses (header, cookie, param,
// bearer_token, detail::query_param). Checks: a percent-encoded name=value round-trips through
// param(), a cookie value never spans a ';', a bearer token is trimmed and only comes from
// "Bearer " (any case), and header names match case-insensitively.
#include "imbus.hpp"

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "fuzz_http_request: invariant broken: %s\n", what);
        std::abort();
    }
}

std::string percent_encode(std::string_view s) {
    static constexpr char hex[] = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : s) out += {'%', hex[c >> 4], hex[c & 15]};
    return out;
}

std::string lower(std::string s) {
    for (auto& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    // Four fields separated by '\n': a name, a value, a Cookie header, an Authorization header.
    std::string_view text(reinterpret_cast<const char*>(data), size);
    std::string fields[4];
    for (auto& f : fields) {
        const auto end = text.find('\n');
        f = std::string(text.substr(0, end));
        text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    }
    const std::string& name = fields[0];
    const std::string& value = fields[1];

    imbus::http_request r;
    r.query = "x=1&" + percent_encode(name) + "=" + percent_encode(value) + "&" + std::string(text);
    r.headers.emplace_back("cookie", fields[2]);
    r.headers.emplace_back("AUTHORIZATION", fields[3]);

    if (name != "x") check(r.param(name) == value, "param() decodes what was percent-encoded");
    check(imbus::detail::query_param(r.query, name) == r.param(name), "param() is query_param()");
    check(imbus::detail::query_param(text, name).size() <= text.size(), "decoding never grows the text");

    check(r.header("Cookie") == fields[2] && r.has_header("COOKIE"), "header names are case-insensitive");
    check(r.cookie(name).find(';') == std::string::npos, "a cookie value never spans a ';'");

    const std::string token = r.bearer_token();
    if (!token.empty()) {
        check(lower(fields[3].substr(0, 7)) == "bearer ", "a token only comes from \"Bearer \"");
        check(token.front() != ' ' && token.front() != '\t' && token.back() != ' ' && token.back() != '\t',
              "a token is trimmed");
        check(fields[3].find(token) != std::string::npos, "a token is part of the header");
    }
    return 0;
}
