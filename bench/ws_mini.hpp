// Tiny helpers shared by the WebSocket bench tools (ws_loadgen, floor_server): SHA-1, base64,
// the RFC 6455 accept key, and frame headers. Not a general WebSocket library.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace wsmini {

inline std::uint32_t rol(std::uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

// SHA-1 of a short input (the handshake key): 20 raw bytes.
inline std::string sha1(std::string_view in) {
    std::uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
    std::string msg(in);
    const std::uint64_t bits = std::uint64_t(in.size()) * 8;
    msg += char(0x80);
    while (msg.size() % 64 != 56) msg += char(0);
    for (int shift = 56; shift >= 0; shift -= 8) msg += char((bits >> shift) & 0xff);
    for (std::size_t block = 0; block < msg.size(); block += 64) {
        std::uint32_t w[80];
        for (int i = 0; i < 16; ++i) {
            const auto* p = reinterpret_cast<const unsigned char*>(msg.data() + block + 4 * i);
            w[i] = std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 | p[3];
        }
        for (int i = 16; i < 80; ++i) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; ++i) {
            std::uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999u;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1u;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDCu;
            else f = b ^ c ^ d, k = 0xCA62C1D6u;
            const std::uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    std::string out(20, '\0');
    for (int i = 0; i < 20; ++i) out[i] = char((h[i / 4] >> (24 - 8 * (i % 4))) & 0xff);
    return out;
}

inline std::string base64(std::string_view in) {
    static const char* abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    std::size_t i = 0;
    for (; i + 2 < in.size(); i += 3) {
        const std::uint32_t v = std::uint32_t(std::uint8_t(in[i])) << 16 | std::uint32_t(std::uint8_t(in[i + 1])) << 8 |
                                std::uint8_t(in[i + 2]);
        out += abc[v >> 18], out += abc[(v >> 12) & 63], out += abc[(v >> 6) & 63], out += abc[v & 63];
    }
    if (i + 1 == in.size()) {
        const std::uint32_t v = std::uint32_t(std::uint8_t(in[i])) << 16;
        out += abc[v >> 18], out += abc[(v >> 12) & 63], out += "==";
    } else if (i + 2 == in.size()) {
        const std::uint32_t v = std::uint32_t(std::uint8_t(in[i])) << 16 | std::uint32_t(std::uint8_t(in[i + 1])) << 8;
        out += abc[v >> 18], out += abc[(v >> 12) & 63], out += abc[(v >> 6) & 63], out += '=';
    }
    return out;
}

// Sec-WebSocket-Accept for a Sec-WebSocket-Key.
inline std::string accept_key(std::string_view key) {
    return base64(sha1(std::string(key) + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"));
}

// Header of one unmasked (server) frame, FIN set.
inline std::string frame_header(std::uint8_t opcode, std::uint64_t n) {
    std::string h(1, char(0x80 | opcode));
    if (n < 126) {
        h += char(n);
    } else if (n <= 0xffff) {
        h += char(126), h += char(n >> 8), h += char(n & 0xff);
    } else {
        h += char(127);
        for (int shift = 56; shift >= 0; shift -= 8) h += char((n >> shift) & 0xff);
    }
    return h;
}

// One masked (client) frame, FIN set.
inline std::string masked_frame(std::uint8_t opcode, std::string_view payload, std::uint32_t mask) {
    std::string f = frame_header(opcode, payload.size());
    f[1] = char(std::uint8_t(f[1]) | 0x80);
    const char m[4] = {char(mask >> 24), char(mask >> 16), char(mask >> 8), char(mask)};
    f.append(m, 4);
    const std::size_t start = f.size();
    f += payload;
    for (std::size_t i = 0; i < payload.size(); ++i) f[start + i] ^= m[i % 4];
    return f;
}

// Case-insensitive value of one header in a raw HTTP header block ("" when absent).
inline std::string_view header_value(std::string_view head, std::string_view name) {
    std::size_t pos = head.find("\r\n");
    while (pos != std::string_view::npos && pos + 2 < head.size()) {
        const std::size_t line = pos + 2;
        const std::size_t end = head.find("\r\n", line);
        const std::string_view l = head.substr(line, (end == std::string_view::npos ? head.size() : end) - line);
        const std::size_t colon = l.find(':');
        if (colon == name.size()) {
            bool same = true;
            for (std::size_t i = 0; i < colon && same; ++i) same = (l[i] | 0x20) == (name[i] | 0x20);
            if (same) {
                std::string_view v = l.substr(colon + 1);
                while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
                while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
                return v;
            }
        }
        pos = end;
    }
    return {};
}

}  // namespace wsmini
