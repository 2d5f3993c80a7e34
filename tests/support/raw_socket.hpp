// Raw HTTP and WebSocket client for tests that must misbehave in ways a real client
// refuses to: unmasked or reserved-bit frames, bad UTF-8, odd handshakes, no close reply.
//
// Blocking and single-threaded: every call waits at most for its timeout (an Asio async
// operation run with io_context::run_until, cancelled at the deadline), never sleeps.
// Talks to 127.0.0.1:<port>. Needs standalone Asio (ASIO_STANDALONE) and C++17.
//
//   auto ws = imbus_test::raw_ws::connect(port);
//   ws.send_text(R"({"event_name":"subscribe"})");
//   std::string reply = ws.read_text();
//   ws.send_frame(0x1, "\xff", true, /*mask=*/false);   // protocol error on purpose
//   CHECK(ws.wait_close().code == 1002);
#pragma once

#include <asio.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace imbus_test {

using namespace std::chrono_literals;
using header_list = std::vector<std::pair<std::string, std::string>>;

inline constexpr std::chrono::milliseconds default_timeout = 5s;

struct http_reply {
    int status = 0;
    std::string reason;                          // the status line's text after the code
    std::map<std::string, std::string> headers;  // lower-case names; repeats joined by ", "
    std::string body;

    // Value of a header given by its lower-case name, "" when absent.
    std::string header(const std::string& lower_name) const {
        auto it = headers.find(lower_name);
        return it == headers.end() ? std::string() : it->second;
    }
};

namespace detail {

inline std::string to_lower(std::string s) {
    for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    return s;
}

inline std::string trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
    return std::string(s);
}

inline std::string base64(std::string_view in) {
    static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    std::size_t i = 0;
    for (; i + 2 < in.size(); i += 3) {
        std::uint32_t v = std::uint32_t(std::uint8_t(in[i])) << 16 | std::uint32_t(std::uint8_t(in[i + 1])) << 8 |
                          std::uint8_t(in[i + 2]);
        out += alphabet[v >> 18 & 63];
        out += alphabet[v >> 12 & 63];
        out += alphabet[v >> 6 & 63];
        out += alphabet[v & 63];
    }
    if (std::size_t rest = in.size() - i; rest > 0) {
        std::uint32_t v = std::uint32_t(std::uint8_t(in[i])) << 16;
        if (rest == 2) v |= std::uint32_t(std::uint8_t(in[i + 1])) << 8;
        out += alphabet[v >> 18 & 63];
        out += alphabet[v >> 12 & 63];
        out += rest == 2 ? alphabet[v >> 6 & 63] : '=';
        out += '=';
    }
    return out;
}

// SHA-1 (FIPS 180-4), 20-byte binary digest. Only for Sec-WebSocket-Accept.
inline std::string sha1(std::string_view in) {
    auto rotl = [](std::uint32_t x, int n) { return x << n | x >> (32 - n); };
    std::uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};

    std::string msg(in);
    const std::uint64_t bit_length = std::uint64_t(in.size()) * 8;
    msg += '\x80';
    while (msg.size() % 64 != 56) msg += '\0';
    for (int shift = 56; shift >= 0; shift -= 8) msg += char(bit_length >> shift & 0xff);

    for (std::size_t block = 0; block < msg.size(); block += 64) {
        std::uint32_t w[80];
        for (int t = 0; t < 16; ++t) {
            const auto* p = reinterpret_cast<const unsigned char*>(msg.data() + block + 4 * t);
            w[t] =
                std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 | std::uint32_t(p[3]);
        }
        for (int t = 16; t < 80; ++t) w[t] = rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);

        std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int t = 0; t < 80; ++t) {
            std::uint32_t f, k;
            if (t < 20) {
                f = (b & c) | (~b & d);
                k = 0x5A827999;
            } else if (t < 40) {
                f = b ^ c ^ d;
                k = 0x6ED9EBA1;
            } else if (t < 60) {
                f = (b & c) | (b & d) | (c & d);
                k = 0x8F1BBCDC;
            } else {
                f = b ^ c ^ d;
                k = 0xCA62C1D6;
            }
            std::uint32_t next = rotl(a, 5) + f + e + k + w[t];
            e = d;
            d = c;
            c = rotl(b, 30);
            b = a;
            a = next;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
    }

    std::string digest;
    for (std::uint32_t word : h)
        for (int shift = 24; shift >= 0; shift -= 8) digest += char(word >> shift & 0xff);
    return digest;
}

// The Sec-WebSocket-Accept value a server must answer to `key` (RFC 6455 §4.2.2).
inline std::string websocket_accept(std::string_view key) {
    return base64(sha1(std::string(key) + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"));
}

inline std::string random_bytes(std::size_t n) {
    static thread_local std::mt19937 rng{std::random_device{}()};
    std::uniform_int_distribution<int> byte(0, 255);
    std::string out(n, '\0');
    for (char& c : out) c = static_cast<char>(byte(rng));
    return out;
}

// A TCP connection to 127.0.0.1 with deadline-bounded blocking operations and an input
// buffer: bytes read but not yet consumed stay in `in`.
class connection {
public:
    using clock = std::chrono::steady_clock;

    connection(std::uint16_t port, std::chrono::milliseconds timeout) {
        asio::ip::tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), port);
        asio::error_code ec = run(
            [&](auto handler) { socket_.async_connect(ep, [handler](asio::error_code e) mutable { handler(e, 0); }); },
            clock::now() + timeout);
        if (ec) throw std::runtime_error("connect to port " + std::to_string(port) + ": " + ec.message());
    }

    // Writes all of `data`; throws on error or timeout.
    void write(std::string_view data, std::chrono::milliseconds timeout = default_timeout) {
        asio::error_code ec =
            run([&](auto handler) { asio::async_write(socket_, asio::buffer(data.data(), data.size()), handler); },
                clock::now() + timeout);
        if (ec) throw std::runtime_error("write: " + ec.message());
    }

    // Appends what arrives to `in`. False on timeout or end of stream (see `eof`).
    bool read_more(clock::time_point deadline) {
        if (eof) return false;
        std::size_t got = 0;
        asio::error_code ec = run(
            [&](auto handler) {
                socket_.async_read_some(asio::buffer(chunk_),
                                        [handler, &got](asio::error_code e, std::size_t n) mutable {
                                            got = n;
                                            handler(e, n);
                                        });
            },
            deadline);
        in.append(chunk_.data(), got);
        if (ec == asio::error::eof || ec == asio::error::connection_reset) {
            eof = true;
            return got > 0;
        }
        if (ec == asio::error::timed_out) return got > 0;
        if (ec) throw std::runtime_error("read: " + ec.message());
        return true;
    }

    // Reads until `in` holds at least `n` bytes. False on timeout or end of stream.
    bool fill(std::size_t n, clock::time_point deadline) {
        while (in.size() < n)
            if (!read_more(deadline)) return in.size() >= n;
        return true;
    }

    // Reads until the peer closes. False on timeout.
    bool read_to_eof(clock::time_point deadline) {
        while (!eof)
            if (!read_more(deadline) && !eof) return false;
        return true;
    }

    std::string in;    // received, not yet consumed
    bool eof = false;  // the peer closed (or reset) the stream

private:
    // Starts one async operation via `start(handler)` and runs it until it completes or
    // `deadline` passes; then cancels it. Returns its error, asio::error::timed_out if cancelled.
    template <class Start> asio::error_code run(Start start, clock::time_point deadline) {
        bool done = false;
        asio::error_code result;
        start([&done, &result](asio::error_code e, std::size_t) {
            done = true;
            result = e;
        });
        io_.restart();
        io_.run_until(deadline);
        if (!done) {
            asio::error_code ignored;
            socket_.cancel(ignored);
            io_.restart();
            io_.run();  // the handler runs, usually with operation_aborted
        }
        return result == asio::error::operation_aborted ? asio::error::timed_out : result;
    }

    asio::io_context io_;
    asio::ip::tcp::socket socket_{io_};
    std::array<char, 16384> chunk_{};
};

// Reads a status line and headers (through the blank line) from `c`, consuming them.
inline http_reply read_http_head(connection& c, connection::clock::time_point deadline) {
    std::size_t end;
    while ((end = c.in.find("\r\n\r\n")) == std::string::npos)
        if (!c.read_more(deadline)) {
            throw std::runtime_error(c.eof ? "connection closed before the end of the HTTP headers: " + c.in
                                           : "timeout waiting for HTTP headers: " + c.in);
        }
    std::string head = c.in.substr(0, end + 2);
    c.in.erase(0, end + 4);

    http_reply reply;
    std::size_t line_end = head.find("\r\n");
    std::string status_line = head.substr(0, line_end);
    std::size_t sp = status_line.find(' ');
    if (status_line.rfind("HTTP/", 0) != 0 || sp == std::string::npos)
        throw std::runtime_error("bad HTTP status line: " + status_line);
    reply.status = std::atoi(status_line.c_str() + sp + 1);
    const std::size_t reason_at = status_line.find(' ', sp + 1);
    if (reason_at != std::string::npos) reply.reason = status_line.substr(reason_at + 1);

    for (std::size_t pos = line_end + 2; pos < head.size();) {
        std::size_t next = head.find("\r\n", pos);
        std::string line = head.substr(pos, next - pos);
        pos = next + 2;
        std::size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string name = to_lower(trim(line.substr(0, colon)));
        std::string value = trim(line.substr(colon + 1));
        auto [it, inserted] = reply.headers.emplace(name, value);
        if (!inserted) it->second += ", " + value;
    }
    return reply;
}

// Reads the body after read_http_head: by Content-Length, else until the peer closes.
inline void read_http_body(connection& c, http_reply& reply, connection::clock::time_point deadline) {
    std::string length = reply.header("content-length");
    if (!length.empty()) {
        std::size_t n = std::stoul(length);
        if (!c.fill(n, deadline))
            throw std::runtime_error("HTTP body shorter than Content-Length " + length + ": " + c.in);
        reply.body = c.in.substr(0, n);
        c.in.erase(0, n);
    } else {
        if (!c.read_to_eof(deadline))
            throw std::runtime_error("timeout waiting for the end of an HTTP body without Content-Length");
        reply.body = std::move(c.in);
        c.in.clear();
    }
}

inline bool has_body(const std::string& method, int status) {
    return method != "HEAD" && status >= 200 && status != 204 && status != 304;
}

}  // namespace detail

// One HTTP/1.1 request with Host, Content-Length and Connection: close, then the reply.
// `headers` come after those three. Throws on connection errors and timeout.
inline http_reply http_request(std::uint16_t port, const std::string& method, const std::string& target,
                               const std::string& body = "", header_list headers = {},
                               std::chrono::milliseconds timeout = default_timeout) {
    auto deadline = detail::connection::clock::now() + timeout;
    detail::connection c(port, timeout);
    std::string request = method + " " + target + " HTTP/1.1\r\n";
    request += "Host: 127.0.0.1:" + std::to_string(port) + "\r\n";
    request += "Content-Length: " + std::to_string(body.size()) + "\r\n";
    request += "Connection: close\r\n";
    for (const auto& [name, value] : headers) request += name + ": " + value + "\r\n";
    request += "\r\n" + body;
    c.write(request, timeout);

    http_reply reply = detail::read_http_head(c, deadline);
    if (detail::has_body(method, reply.status)) detail::read_http_body(c, reply, deadline);
    return reply;
}

// Sends `bytes` exactly as given (a request of any shape), then reads the reply: its head, and
// its body by Content-Length or to the end of the stream. Throws on connection errors and timeout.
inline http_reply raw_http(std::uint16_t port, std::string_view bytes,
                           std::chrono::milliseconds timeout = default_timeout) {
    auto deadline = detail::connection::clock::now() + timeout;
    detail::connection c(port, timeout);
    c.write(bytes, timeout);
    http_reply reply = detail::read_http_head(c, deadline);
    if (reply.status >= 200 && reply.status != 204 && reply.status != 304) detail::read_http_body(c, reply, deadline);
    return reply;
}

// A WebSocket client connection that does only what it is told.
class raw_ws {
public:
    struct frame {
        std::uint8_t opcode = 0;
        std::string payload;  // unmasked
        bool fin = true;
        std::uint8_t rsv = 0;  // RSV1..3 as bits 4, 2, 1
        bool masked = false;   // the server masked it (it must not)
    };

    struct close_info {
        int code = 0;  // 1005 when the close frame had no code
        std::string reason;
        bool tcp_closed_without_close_frame = false;  // then code is 1006
    };

    enum : std::uint8_t {  // frame opcodes
        op_continuation = 0x0,
        op_text = 0x1,
        op_binary = 0x2,
        op_close = 0x8,
        op_ping = 0x9,
        op_pong = 0xA,
    };

    // Handshake (GET target, Upgrade: websocket, random key, version 13, no Origin),
    // checks 101 and Sec-WebSocket-Accept. An extra header named like a default one
    // replaces it, or removes it when its value is "". Throws std::runtime_error with the
    // status and body on any other reply.
    static raw_ws connect(std::uint16_t port, const std::string& target = "/websocket?version=19.0-2",
                          header_list extra_headers = {}, bool user_agent = true) {
        raw_ws ws(port);
        std::string key = ws.send_handshake(port, target, std::move(extra_headers), user_agent);
        http_reply reply = detail::read_http_head(*ws.conn_, deadline_after(default_timeout));
        if (reply.status != 101) {
            if (detail::has_body("GET", reply.status)) try {
                    detail::read_http_body(*ws.conn_, reply, deadline_after(1s));
                } catch (const std::exception&) {}
            throw std::runtime_error("WebSocket handshake refused: HTTP " + std::to_string(reply.status) + " " +
                                     reply.body);
        }
        if (reply.header("sec-websocket-accept") != detail::websocket_accept(key))
            throw std::runtime_error("bad Sec-WebSocket-Accept: '" + reply.header("sec-websocket-accept") + "'");
        return ws;
    }

    // The same handshake, but returns the server's reply (body included, unless 101)
    // instead of checking it. For tests expecting 400, 401, 403, 404, 426...
    static http_reply handshake_reply(std::uint16_t port, const std::string& target = "/websocket?version=19.0-2",
                                      header_list extra_headers = {}, bool user_agent = true,
                                      std::chrono::milliseconds timeout = default_timeout) {
        raw_ws ws(port);
        ws.send_handshake(port, target, std::move(extra_headers), user_agent);
        auto deadline = deadline_after(timeout);
        http_reply reply = detail::read_http_head(*ws.conn_, deadline);
        if (reply.status != 101 && detail::has_body("GET", reply.status))
            detail::read_http_body(*ws.conn_, reply, deadline);
        return reply;
    }

    // --- Sending ---------------------------------------------------------------------

    void send_text(std::string_view payload) { send_frame(op_text, payload); }
    void send_binary(std::string_view payload) { send_frame(op_binary, payload); }

    // Any frame: `opcode` as given (even reserved ones), FIN bit, masking with a random
    // key or none, `rsv` in the RSV1..3 bits (4 = RSV1, 2 = RSV2, 1 = RSV3).
    void send_frame(std::uint8_t opcode, std::string_view payload, bool fin = true, bool mask = true,
                    std::uint8_t rsv = 0) {
        std::string out;
        out += char((fin ? 0x80 : 0) | (rsv & 7) << 4 | (opcode & 0x0f));
        const std::uint8_t mask_bit = mask ? 0x80 : 0;
        if (payload.size() < 126) {
            out += char(mask_bit | payload.size());
        } else if (payload.size() <= 0xffff) {
            out += char(mask_bit | 126);
            out += char(payload.size() >> 8 & 0xff);
            out += char(payload.size() & 0xff);
        } else {
            out += char(mask_bit | 127);
            for (int shift = 56; shift >= 0; shift -= 8) out += char(std::uint64_t(payload.size()) >> shift & 0xff);
        }
        if (mask) {
            std::string key = detail::random_bytes(4);
            out += key;
            for (std::size_t i = 0; i < payload.size(); ++i) out += char(payload[i] ^ key[i % 4]);
        } else {
            out += payload;
        }
        conn_->write(out);
    }

    // Bytes as they are, no framing.
    void send_raw_bytes(std::string_view bytes) { conn_->write(bytes); }

    // Sends a close frame with `code` (two bytes, big-endian) and `reason`.
    void close(int code = 1000, std::string_view reason = "") {
        send_frame(op_close, close_payload(code, reason));
        close_sent_ = true;
    }

    static std::string close_payload(int code, std::string_view reason = "") {
        std::string p;
        p += char(code >> 8 & 0xff);
        p += char(code & 0xff);
        p += reason;
        return p;
    }

    // --- Receiving -------------------------------------------------------------------

    // The next frame exactly as received (no automatic pong). nullopt on timeout or when
    // the peer closed the TCP stream; closed_by_peer() tells which.
    std::optional<frame> read_frame(std::chrono::milliseconds timeout) {
        return read_frame_until(deadline_after(timeout));
    }

    // True once a read saw the TCP stream end (or reset). Complete frames received
    // before it are still returned by read_frame().
    bool closed_by_peer() const { return conn_->eof; }

    // Answer pings automatically in read_text() and wait_close() (default true).
    void set_auto_pong(bool on) { auto_pong_ = on; }

    // The next text message, fragments reassembled; pings and pongs skipped. Throws on
    // timeout, end of stream, a close frame or a binary message.
    std::string read_text(std::chrono::milliseconds timeout = default_timeout) {
        auto deadline = deadline_after(timeout);
        std::string message;
        bool in_message = false;
        for (;;) {
            std::optional<frame> f = read_frame_until(deadline);
            if (!f)
                throw std::runtime_error(closed_by_peer() ? "read_text: connection closed by peer"
                                                          : "read_text: timeout");
            if (handled_ping_pong(*f)) continue;
            if (f->opcode == op_close)
                throw std::runtime_error("read_text: close frame, code " + std::to_string(parse_close(*f).code));
            if (f->opcode == op_binary) throw std::runtime_error("read_text: got a binary message");
            if (f->opcode == op_text || (f->opcode == op_continuation && in_message)) {
                message += f->payload;
                in_message = true;
                if (f->fin) return message;
                continue;
            }
            throw std::runtime_error("read_text: unexpected opcode " + std::to_string(f->opcode));
        }
    }

    // Reads until a close frame (answered with a close frame echoing its code, unless
    // close() was called first) or the end of the TCP stream (code 1006, flag set). Data
    // frames are dropped. Throws on timeout.
    close_info wait_close(std::chrono::milliseconds timeout = default_timeout) {
        auto deadline = deadline_after(timeout);
        for (;;) {
            std::optional<frame> f = read_frame_until(deadline);
            if (!f) {
                if (!closed_by_peer()) throw std::runtime_error("wait_close: timeout");
                close_info info;
                info.code = 1006;
                info.tcp_closed_without_close_frame = true;
                return info;
            }
            if (handled_ping_pong(*f) || f->opcode != op_close) continue;
            close_info info = parse_close(*f);
            if (!close_sent_) {
                close_sent_ = true;
                try {
                    send_frame(op_close, info.code == 1005 ? std::string() : close_payload(info.code));
                } catch (const std::exception&) {
                    // the server may already have dropped the connection
                }
            }
            return info;
        }
    }

    // True when the peer closes the TCP stream within `timeout`; whatever arrives
    // before is dropped.
    bool wait_eof(std::chrono::milliseconds timeout) {
        auto deadline = deadline_after(timeout);
        conn_->in.clear();
        bool eof = conn_->read_to_eof(deadline);
        conn_->in.clear();
        return eof;
    }

private:
    explicit raw_ws(std::uint16_t port) : conn_(std::make_unique<detail::connection>(port, default_timeout)) {}

    static detail::connection::clock::time_point deadline_after(std::chrono::milliseconds timeout) {
        return detail::connection::clock::now() + timeout;
    }

    // Sends the upgrade request; returns the Sec-WebSocket-Key that was sent.
    std::string send_handshake(std::uint16_t port, const std::string& target, header_list extra_headers,
                               bool user_agent) {
        header_list headers = {
            {"Host", "127.0.0.1:" + std::to_string(port)},
            {"Upgrade", "websocket"},
            {"Connection", "Upgrade"},
            {"Sec-WebSocket-Key", detail::base64(detail::random_bytes(16))},
            {"Sec-WebSocket-Version", "13"},
        };
        if (user_agent) headers.emplace_back("User-Agent", "imbus-test/raw_ws");
        for (auto& [name, value] : extra_headers) {
            bool replaced = false;
            for (auto& header : headers)
                if (detail::to_lower(header.first) == detail::to_lower(name)) {
                    header.second = value;
                    replaced = true;
                }
            if (!replaced) headers.emplace_back(std::move(name), std::move(value));
        }

        std::string key;
        std::string request = "GET " + target + " HTTP/1.1\r\n";
        for (const auto& [name, value] : headers) {
            if (value.empty()) continue;
            if (detail::to_lower(name) == "sec-websocket-key") key = value;
            request += name + ": " + value + "\r\n";
        }
        request += "\r\n";
        conn_->write(request);
        return key;
    }

    // Parses one frame from the input buffer once it is complete.
    std::optional<frame> read_frame_until(detail::connection::clock::time_point deadline) {
        std::string& in = conn_->in;
        auto byte = [&in](std::size_t i) { return std::uint8_t(in[i]); };
        if (!conn_->fill(2, deadline)) return std::nullopt;

        std::uint64_t length = byte(1) & 0x7f;
        const std::size_t length_bytes = length == 126 ? 2 : length == 127 ? 8 : 0;
        const bool masked = byte(1) & 0x80;
        const std::size_t header = 2 + length_bytes + (masked ? 4 : 0);
        if (!conn_->fill(header, deadline)) return std::nullopt;
        if (length_bytes > 0) {
            length = 0;
            for (std::size_t i = 0; i < length_bytes; ++i) length = length << 8 | byte(2 + i);
        }
        if (length > (std::uint64_t(1) << 30))
            throw std::runtime_error("read_frame: absurd payload length " + std::to_string(length));
        if (!conn_->fill(header + length, deadline)) return std::nullopt;

        frame f;
        f.fin = byte(0) & 0x80;
        f.rsv = (byte(0) >> 4) & 7;
        f.opcode = byte(0) & 0x0f;
        f.masked = masked;
        f.payload = in.substr(header, length);
        if (masked)
            for (std::size_t i = 0; i < f.payload.size(); ++i) f.payload[i] ^= in[header - 4 + i % 4];
        in.erase(0, header + length);
        return f;
    }

    // Answers a ping when auto-pong is on; true for pings and pongs.
    bool handled_ping_pong(const frame& f) {
        if (f.opcode == op_ping && auto_pong_ && !close_sent_) send_frame(op_pong, f.payload);
        return f.opcode == op_ping || f.opcode == op_pong;
    }

    static close_info parse_close(const frame& f) {
        close_info info;
        if (f.payload.size() < 2) {
            info.code = 1005;
            return info;
        }
        info.code = std::uint8_t(f.payload[0]) << 8 | std::uint8_t(f.payload[1]);
        info.reason = f.payload.substr(2);
        return info;
    }

    std::unique_ptr<detail::connection> conn_;
    bool auto_pong_ = true;
    bool close_sent_ = false;
};

}  // namespace imbus_test
