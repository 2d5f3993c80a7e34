// libFuzzer target: the server's request framing (detail::ws_request, websocketpp's parser
// behind imbus's strict header check). Input: one byte choosing a chunk size, then the bytes of
// a request as a client would send them. Checks:
// - the outcome (refused with a status, incomplete, or parsed: method, target, headers, body)
//   is the same whether the bytes arrive at once or in chunks;
// - a refusal is 400, 413, 431 or 501;
// - a parsed request has at most one Content-Length, made of digits, a body of exactly that
//   length, no Transfer-Encoding, and no header name with whitespace or a control character.
#include "imbus.hpp"

#include <algorithm>
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
        std::fprintf(stderr, "fuzz_http_framing: invariant broken: %s\n", what);
        std::abort();
    }
}

struct outcome {
    int refused = 0;  // the HTTP status of a refusal; 0 when not refused
    bool ready = false;
    std::size_t consumed = 0;
    std::string parsed;  // method, target, headers and body, when ready
};

outcome feed(std::string_view bytes, std::size_t chunk, imbus::detail::ws_request& request) {
    outcome out;
    try {
        for (std::size_t at = 0; at < bytes.size() && !request.ready(); at += chunk) {
            const auto piece = bytes.substr(at, chunk);
            out.consumed += request.consume(piece.data(), piece.size());
        }
    } catch (const websocketpp::http::exception& e) {
        out.refused = int(e.m_error_code);
        return out;
    }
    out.ready = request.ready();
    if (out.ready) {
        out.parsed = request.get_method() + " " + request.get_uri() + " " + request.get_version() + "\n";
        for (const auto& h : request.get_headers()) out.parsed += h.first + ": " + h.second + "\n";
        out.parsed += "\n" + request.get_body();
    }
    return out;
}

bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
           });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const std::size_t chunk = 1 + data[0] % 16;
    const std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);

    imbus::detail::ws_request whole_request, chunked_request;
    const outcome whole = feed(bytes, std::max<std::size_t>(bytes.size(), 1), whole_request);
    const outcome chunked = feed(bytes, chunk, chunked_request);
    check(whole.refused == chunked.refused, "chunking changes whether a request is refused");
    check(whole.ready == chunked.ready, "chunking changes whether a request is complete");
    check(whole.parsed == chunked.parsed, "chunking changes what is parsed");
    check(whole.refused || whole.consumed == chunked.consumed, "chunking changes how many bytes are taken");
    if (whole.refused)
        check(whole.refused == 400 || whole.refused == 413 || whole.refused == 431 || whole.refused == 501,
              "a refusal is 400, 413, 431 or 501");
    if (!whole.ready) return 0;

    // Accepted: read the header section again, as a proxy in front would.
    const std::string_view head = bytes.substr(0, bytes.find("\r\n\r\n") + 2);
    int lengths = 0;
    std::size_t declared = 0;
    for (std::size_t at = head.find("\r\n"); at != std::string_view::npos && at + 2 < head.size();) {
        const std::size_t start = at + 2, end = head.find("\r\n", start);
        const std::string_view line = head.substr(start, end - start);
        at = end;
        const std::string_view name = line.substr(0, line.find(':'));
        for (const char c : name)
            check(!std::isspace(static_cast<unsigned char>(c)) && !std::iscntrl(static_cast<unsigned char>(c)),
                  "an accepted header name has no whitespace or control character");
        check(!iequals(name, "Transfer-Encoding"), "an accepted request has no Transfer-Encoding");
        if (iequals(name, "Content-Length")) {
            ++lengths;
            std::string_view value = line.substr(name.size() + 1);
            while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
            while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
            check(!value.empty() && value.find_first_not_of("0123456789") == std::string_view::npos,
                  "an accepted Content-Length is digits");
            declared = std::stoull(std::string(value));
        }
    }
    check(lengths <= 1, "an accepted request has at most one Content-Length");
    check(whole_request.get_body().size() == declared, "the body has the declared length");
    return 0;
}
