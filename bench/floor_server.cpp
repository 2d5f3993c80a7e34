// floor_server: the baseline of the WebSocket bench ("the most this machine can deliver").
//
// One thread, one io_context. It accepts WebSocket handshakes on any path, reads and discards
// whatever clients send afterwards, and on each `POST /bus/send` builds one text frame
//   [{"id":N,"message":{"type":"b","payload":<the posted payload>}}]
// once, answers {"ids":[N]} (Connection: close), and writes that shared buffer to every
// connected socket: frames go to one shared log, each socket has a cursor into it, and one
// flush pass after each round of ready handlers starts the writes, so that a socket gets the
// frames that accumulated meanwhile in one gather write (websocketpp batches its send queue
// too).
// A slow socket just queues. No store, no JSON parsing beyond a scan for the "payload" value,
// no auth policy, no limits.
// Channels (the bench's many-channels scenario): a handshake path with `channel=C` in its
// query puts the socket on channel C only; a POST whose body has "channel":"C" then goes to
// the sockets of C (a map lookup, a per-socket queue of the shared frame) and to every socket
// that named no channel.
//
//   floor_server [--host 127.0.0.1] [--port 8090] [--api-key KEY]
#ifndef ASIO_STANDALONE
#define ASIO_STANDALONE
#endif
#include <asio.hpp>

#include "ws_mini.hpp"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <iostream>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

using asio::ip::tcp;
using frame_ptr = std::shared_ptr<const std::string>;
constexpr std::size_t npos = std::size_t(-1);

namespace {

struct ws_session {
    explicit ws_session(tcp::socket s) : sock(std::move(s)) {}
    tcp::socket sock;
    std::string handshake;                    // the 101 answer, written before any frame
    std::uint64_t next = 0;                   // log index of the next frame to write
    std::uint64_t done = 0;                   // log index up to which writes completed (frames still needed from here)
    std::vector<asio::const_buffer> buffers;  // of the current gather write
    std::size_t index = 0;        // position in server::sessions_ (or its channel's list), npos once removed
    std::string channel;          // empty: every frame (the shared log); else only this channel's
    std::deque<frame_ptr> own;    // a channel socket's frames not yet written
    std::size_t own_writing = 0;  // how many of `own` the current write carries
    bool dirty = false;           // in server::dirty_
    bool writing = false;
    bool alive = true;
};

// End of the JSON value starting at s[i] (exclusive), by a scan that only knows strings and nesting.
std::size_t value_end(std::string_view s, std::size_t i) {
    if (i >= s.size()) return i;
    if (s[i] == '"') {
        for (++i; i < s.size(); ++i) {
            if (s[i] == '\\') ++i;
            else if (s[i] == '"') return i + 1;
        }
        return s.size();
    }
    if (s[i] == '{' || s[i] == '[') {
        int depth = 0;
        for (; i < s.size(); ++i) {
            const char c = s[i];
            if (c == '"') {
                i = value_end(s, i) - 1;
            } else if (c == '{' || c == '[') {
                ++depth;
            } else if (c == '}' || c == ']') {
                if (--depth == 0) return i + 1;
            }
        }
        return s.size();
    }
    while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']' && s[i] != ' ' && s[i] != '\r' && s[i] != '\n')
        ++i;
    return i;
}

// The value of the first "channel":"..." in a body (no escapes expected), or "".
std::string_view channel_of(std::string_view body) {
    const std::size_t key = body.find("\"channel\":\"");
    if (key == std::string_view::npos) return {};
    const std::size_t start = key + 11;
    const std::size_t end = body.find('"', start);
    return end == std::string_view::npos ? std::string_view() : body.substr(start, end - start);
}

// The value of `name` in the query of a request target, or "".
std::string_view query_value(std::string_view target, std::string_view name) {
    std::size_t q = target.find('?');
    while (q != std::string_view::npos) {
        const std::size_t start = q + 1;
        const std::size_t amp = target.find('&', start);
        const std::string_view pair =
            target.substr(start, (amp == std::string_view::npos ? target.size() : amp) - start);
        if (pair.size() > name.size() && pair.substr(0, name.size()) == name && pair[name.size()] == '=')
            return pair.substr(name.size() + 1);
        q = amp;
    }
    return {};
}

std::string_view payload_of(std::string_view body) {
    const std::size_t key = body.find("\"payload\"");
    if (key == std::string_view::npos) return "null";
    std::size_t i = body.find(':', key + 9);
    if (i == std::string_view::npos) return "null";
    ++i;
    while (i < body.size() && (body[i] == ' ' || body[i] == '\t' || body[i] == '\r' || body[i] == '\n')) ++i;
    const std::size_t end = value_end(body, i);
    if (end <= i) return "null";
    return body.substr(i, end - i);
}

class server {
public:
    server(asio::io_context& io, const std::string& host, std::uint16_t port, std::string key)
        : acceptor_(io), retry_(io), api_key_(std::move(key)) {
        tcp::endpoint ep(asio::ip::make_address(host), port);
        acceptor_.open(ep.protocol());
        acceptor_.set_option(asio::socket_base::reuse_address(true));
        acceptor_.bind(ep);
        acceptor_.listen(asio::socket_base::max_listen_connections);
        accept();
    }
    std::uint16_t port() const { return acceptor_.local_endpoint().port(); }
    void stop() {
        asio::error_code ec;
        acceptor_.close(ec);
        for (auto& s : sessions_) s->sock.close(ec);
        sessions_.clear();
        for (auto& [name, list] : routed_)
            for (auto& s : list) s->sock.close(ec);
        routed_.clear();
    }

private:
    struct http_conn {
        explicit http_conn(tcp::socket s) : sock(std::move(s)) {}
        tcp::socket sock;
        std::string buf;
        std::size_t header_end = 0;  // after "\r\n\r\n", 0 while unknown
        std::size_t content_length = 0;
        std::string out;
    };

    void accept() {
        acceptor_.async_accept([this](const asio::error_code& ec, tcp::socket sock) {
            if (ec == asio::error::operation_aborted) return;
            if (ec) {  // e.g. out of file descriptors: try again shortly
                retry_.expires_after(std::chrono::milliseconds(50));
                retry_.async_wait([this](const asio::error_code& e) {
                    if (!e) accept();
                });
                return;
            }
            asio::error_code ignored;
            sock.set_option(tcp::no_delay(true), ignored);
            read_request(std::make_shared<http_conn>(std::move(sock)));
            accept();
        });
    }

    void read_request(std::shared_ptr<http_conn> c) {
        const std::size_t old = c->buf.size();
        c->buf.resize(old + 4096);
        c->sock.async_read_some(
            asio::buffer(&c->buf[old], 4096), [this, c, old](const asio::error_code& ec, std::size_t n) {
                c->buf.resize(old + (ec ? 0 : n));
                if (ec) return;
                if (c->header_end == 0) {
                    const std::size_t e = c->buf.find("\r\n\r\n");
                    if (e == std::string::npos) {
                        if (c->buf.size() > 65536) return;  // drop
                        return read_request(c);
                    }
                    c->header_end = e + 4;
                    const std::string_view head(c->buf.data(), c->header_end);
                    const auto cl = wsmini::header_value(head, "Content-Length");
                    c->content_length = cl.empty() ? 0 : std::strtoull(std::string(cl).c_str(), nullptr, 10);
                }
                if (c->buf.size() < c->header_end + c->content_length) return read_request(c);
                handle_request(c);
            });
    }

    void respond(const std::shared_ptr<http_conn>& c, const std::string& status, const std::string& body) {
        c->out = "HTTP/1.1 " + status +
                 "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                 "\r\nConnection: close\r\n\r\n" + body;
        asio::async_write(c->sock, asio::buffer(c->out), [c](const asio::error_code&, std::size_t) {
            asio::error_code ignored;
            c->sock.shutdown(tcp::socket::shutdown_both, ignored);
            c->sock.close(ignored);
        });
    }

    void handle_request(const std::shared_ptr<http_conn>& c) {
        const std::string_view head(c->buf.data(), c->header_end);
        const std::size_t sp1 = head.find(' ');
        const std::size_t sp2 = head.find(' ', sp1 + 1);
        const std::string_view method = head.substr(0, sp1);
        const std::string_view target = head.substr(sp1 + 1, sp2 - sp1 - 1);
        const std::string_view path = target.substr(0, target.find('?'));
        const auto key = wsmini::header_value(head, "Sec-WebSocket-Key");
        if (method == "GET" && !key.empty()) return upgrade(c, key, query_value(target, "channel"));
        if (method == "POST" && path == "/bus/send") {
            if (!api_key_.empty()) {
                const auto auth = wsmini::header_value(head, "Authorization");
                if (auth.substr(0, 7) != "Bearer ") return respond(c, "401 Unauthorized", "{\"error\":\"no key\"}");
                if (auth.substr(7) != api_key_) return respond(c, "403 Forbidden", "{\"error\":\"wrong key\"}");
            }
            const std::string_view body(c->buf.data() + c->header_end, c->content_length);
            const std::uint64_t id = ++next_id_;
            respond(c, "200 OK", "{\"ids\":[" + std::to_string(id) + "]}");  // answer first, like a commit
            return broadcast(id, payload_of(body), channel_of(body));
        }
        if (method == "GET" && path == "/websocket/health") return respond(c, "200 OK", "{\"status\":\"pass\"}");
        respond(c, "404 Not Found", "{\"error\":\"not found\"}");
    }

    void upgrade(const std::shared_ptr<http_conn>& c, std::string_view key, std::string_view channel) {
        auto s = std::make_shared<ws_session>(std::move(c->sock));
        s->handshake =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: " +
            wsmini::accept_key(key) + "\r\n\r\n";
        s->next = s->done = log_base_ + log_.size();  // only frames published from now on
        s->channel = std::string(channel);
        auto& list = s->channel.empty() ? sessions_ : routed_[s->channel];
        s->index = list.size();
        list.push_back(s);
        s->writing = true;
        asio::async_write(s->sock, asio::buffer(s->handshake), [this, s](const asio::error_code& ec, std::size_t) {
            s->writing = false;
            std::string().swap(s->handshake);
            if (ec || !s->alive) return remove(s);
            if (s->channel.empty()) write(s);
            else write_own(s);
        });
        discard(s);
    }

    // Closes a session; it leaves sessions_ once no write uses the log's frames any more.
    void remove(const std::shared_ptr<ws_session>& s) {
        if (s->alive) {
            s->alive = false;
            asio::error_code ignored;
            s->sock.close(ignored);
        }
        if (s->writing || s->index == npos) return;
        auto routed = s->channel.empty() ? routed_.end() : routed_.find(s->channel);
        auto& list = routed == routed_.end() ? sessions_ : routed->second;
        auto& last = list.back();
        last->index = s->index;
        std::swap(list[s->index], last);
        list.pop_back();
        s->index = npos;
        s->own.clear();
        if (routed != routed_.end() && list.empty()) routed_.erase(routed);
    }

    // Reads and throws away what the client sends (its subscribe, probes, pongs...).
    void discard(std::shared_ptr<ws_session> s) {
        s->sock.async_read_some(asio::buffer(scratch_), [this, s](const asio::error_code& ec, std::size_t) {
            if (ec) return remove(s);
            discard(s);
        });
    }

    // Appends one frame to the shared log; one flush pass, after the handlers already queued
    // (other POSTs among them), starts the writes: a socket gets all frames that accumulated
    // in one gather write, as websocketpp does with its send queue.
    void broadcast(std::uint64_t id, std::string_view payload, std::string_view channel) {
        std::string text = "[{\"id\":" + std::to_string(id) + ",\"message\":{\"type\":\"b\",\"payload\":";
        text += payload;
        text += "}}]";
        auto frame = std::make_shared<const std::string>(wsmini::frame_header(1, text.size()) + text);
        if (!sessions_.empty()) log_.push_back(frame);
        if (!channel.empty() && !routed_.empty()) {
            auto it = routed_.find(std::string(channel));
            if (it != routed_.end())
                for (const auto& s : it->second) {
                    s->own.push_back(frame);
                    mark_dirty(s);
                }
        }
        flush_due_ = true;
    }

    void mark_dirty(const std::shared_ptr<ws_session>& s) {
        if (!s->dirty) s->dirty = true, dirty_.push_back(s);
    }

public:
    bool flush_due() const { return flush_due_; }

    // Starts a gather write on every idle socket that has frames to write. main() calls it
    // once the handlers that were ready (all POSTs that had arrived) have run.
    void flush() {
        flush_due_ = false;
        std::uint64_t needed = log_base_ + log_.size();
        for (const auto& s : sessions_) {
            write(s);
            needed = std::min(needed, s->done);
        }
        while (log_base_ < needed) log_.pop_front(), ++log_base_;  // frames every socket has written
        auto dirty = std::move(dirty_);
        dirty_.clear();
        for (const auto& s : dirty) {
            s->dirty = false;
            write_own(s);
        }
    }

private:
    void write(const std::shared_ptr<ws_session>& s) {
        const std::uint64_t end = log_base_ + log_.size();
        if (s->writing || s->next >= end || !s->alive) return;
        s->writing = true;
        s->buffers.clear();
        const std::uint64_t n = std::min<std::uint64_t>(end - s->next, 64);
        for (std::uint64_t i = 0; i < n; ++i) s->buffers.push_back(asio::buffer(*log_[s->next - log_base_ + i]));
        s->next += n;
        asio::async_write(s->sock, s->buffers, [this, s](const asio::error_code& ec, std::size_t) {
            s->writing = false;
            s->done = s->next;
            if (ec || !s->alive) return remove(s);
            if (s->next < log_base_ + log_.size()) flush_due_ = true;  // more in the next flush
        });
    }

    // A channel socket: one gather write of its queued frames.
    void write_own(const std::shared_ptr<ws_session>& s) {
        if (s->writing || s->own.empty() || !s->alive) return;
        s->writing = true;
        s->buffers.clear();
        s->own_writing = std::min<std::size_t>(s->own.size(), 64);
        for (std::size_t i = 0; i < s->own_writing; ++i) s->buffers.push_back(asio::buffer(*s->own[i]));
        asio::async_write(s->sock, s->buffers, [this, s](const asio::error_code& ec, std::size_t) {
            s->writing = false;
            if (ec || !s->alive) return remove(s);
            s->own.erase(s->own.begin(), s->own.begin() + std::ptrdiff_t(s->own_writing));
            if (!s->own.empty()) mark_dirty(s), flush_due_ = true;
        });
    }

    tcp::acceptor acceptor_;
    asio::steady_timer retry_;
    std::string api_key_;
    std::vector<std::shared_ptr<ws_session>> sessions_;                                 // sockets that take every frame
    std::unordered_map<std::string, std::vector<std::shared_ptr<ws_session>>> routed_;  // by channel
    std::vector<std::shared_ptr<ws_session>> dirty_;  // channel sockets with frames to write
    std::deque<frame_ptr> log_;                       // frames some socket still has to write
    std::uint64_t log_base_ = 0;                      // log index of log_.front()
    bool flush_due_ = false;
    std::uint64_t next_id_ = 0;
    char scratch_[65536];
};

}  // namespace

int main(int argc, char** argv) {
    std::string host = "127.0.0.1", key;
    std::uint16_t port = 8090;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (i + 1 >= argc) {
            std::cerr << "usage: floor_server [--host ADDR] [--port N] [--api-key KEY]\n";
            return 2;
        }
        const std::string v = argv[++i];
        if (a == "--host") host = v;
        else if (a == "--port") port = static_cast<std::uint16_t>(std::stoul(v));
        else if (a == "--api-key") key = v;
        else {
            std::cerr << "floor_server: unknown option " << a << "\n";
            return 2;
        }
    }
    std::signal(SIGPIPE, SIG_IGN);
    try {
        asio::io_context io(1);
        server srv(io, host, port, key);
        asio::signal_set signals(io, SIGINT, SIGTERM);
        signals.async_wait([&](const asio::error_code& ec, int) {
            if (!ec) {
                srv.stop();
                io.stop();
            }
        });
        std::cout << "floor server on ws://" << host << ":" << srv.port() << std::endl;
        // Run every ready handler (a non-blocking epoll included), then flush: POSTs that
        // arrived together reach each socket in one write.
        while (!io.stopped()) {
            if (io.run_one() == 0) break;
            io.poll();
            if (srv.flush_due()) srv.flush();
        }
    } catch (const std::exception& e) {
        std::cerr << "floor_server: " << e.what() << std::endl;
        return 1;
    }
}
