// ws_loadgen: a lean WebSocket load generator for the imbus protocol (PROTOCOL.md §4-5).
//
// One thread, one io_context, many connections; hand-written client framing (handshake with
// Sec-WebSocket-Key, masked client frames, server frames of any length), so that the load
// generator is not the bottleneck. Subscribers bind to 127.0.0.1..127.0.0.k before connecting
// (IP_BIND_ADDRESS_NO_PORT), publishers to 127.0.1.1..127.0.1.16: ephemeral ports do not run out.
//
//   ws_loadgen fanout  --port P --api-key K --subscribers N --seconds S [--window W]
//   ws_loadgen latency --port P --api-key K --subscribers N --rate R --seconds S
//   ws_loadgen idle    --port P [--api-key K] --connections N --server-pid PID
//
// Each subscriber sends {"event_name":"subscribe","data":{"channels":["bench"],"last":0}}.
// The publisher POSTs /bus/send (a new TCP connection per POST, P of them at once) with
// {"channel":"bench","type":"b","payload":{"t":<CLOCK_MONOTONIC ns>,"pad":"xx..."}}.
// Frames are not parsed as JSON: elements are found by `{"id":`, the latency by the first
// `"t":` after it. Before the timed phase, one warm-up notification must reach every
// subscriber (this proves that every subscribe was processed); only ids above it count.
//
// Output: one JSON line (starts with '{') and one human line (starts with '#') on stdout;
// progress on stderr. Exit status 0 when the run completed (fanout/latency: every subscriber
// got every published notification exactly once), 1 otherwise, 2 on bad usage.
#ifndef ASIO_STANDALONE
#define ASIO_STANDALONE
#endif
#include <asio.hpp>

#include "ws_mini.hpp"

#include <netinet/in.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

using asio::ip::tcp;

namespace {

std::int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Log-linear histogram of microseconds: exact below 1024, then 512 sub-buckets per power of 2.
struct histogram {
    std::vector<std::uint64_t> buckets = std::vector<std::uint64_t>(1024 + 54 * 512);
    std::uint64_t count = 0, max = 0;
    static std::size_t index(std::uint64_t v) {
        if (v < 1024) return std::size_t(v);
        const int msb = 63 - __builtin_clzll(v);
        const int shift = msb - 9;
        return 1024 + std::size_t(shift - 1) * 512 + std::size_t((v >> shift) & 511);
    }
    static std::uint64_t value(std::size_t i) {  // the bucket's lower bound
        if (i < 1024) return i;
        const std::size_t k = i - 1024;
        return (512 + k % 512) << (k / 512 + 1);
    }
    void add(std::uint64_t us) {
        buckets[std::min(index(us), buckets.size() - 1)]++;
        ++count;
        max = std::max(max, us);
    }
    std::uint64_t percentile(double p) const {
        if (count == 0) return 0;
        const std::uint64_t rank = std::uint64_t(p / 100.0 * double(count - 1)) + 1;
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < buckets.size(); ++i) {
            seen += buckets[i];
            if (seen >= rank) return std::min(value(i), max);
        }
        return max;
    }
};

struct options {
    std::string mode;
    std::string host = "127.0.0.1";
    std::uint16_t port = 8080;
    std::string target = "/websocket?version=19.0-2";
    std::string channel = "bench";
    std::string api_key;
    std::string label;
    std::size_t connections = 1000;  // --subscribers / --connections
    double seconds = 10;
    double rate = 1000;
    std::size_t publishers = 4;
    std::size_t payload_bytes = 100;
    std::size_t window = 100;  // fanout: notifications published but not yet delivered everywhere
    std::size_t sources = 4;
    std::size_t connect_concurrency = 256;
    double drain = 3;       // give up after this long without a delivery...
    double drain_max = 300;  // ...or this long after the last publish answer
    double settle = 2;
    double warmup_timeout = 60;
    long server_pid = 0;
    bool window_given = false;
};

[[noreturn]] void usage(const std::string& problem) {
    std::cerr << "ws_loadgen: " << problem << "\n"
              << "usage: ws_loadgen fanout  --subscribers N --seconds S [--window W] [common]\n"
              << "       ws_loadgen latency --subscribers N --rate R --seconds S [common]\n"
              << "       ws_loadgen idle    --connections N --server-pid PID [--settle S] [common]\n"
              << "common: --host ADDR --port N --api-key KEY --target /websocket?version=19.0-2 --channel bench\n"
              << "        --publishers 4 --payload-bytes 100 --sources 4 --connect-concurrency 256\n"
              << "        --drain 3 --drain-max 300 --warmup-timeout 60 --label TEXT --server-pid PID (fanout/latency: its CPU time)\n"
              << "--window W (fanout, default 100; 0 = unlimited): publish only while fewer than W\n"
              << "  notifications per subscriber are published but not yet delivered.\n";
    std::exit(2);
}

options parse(int argc, char** argv) {
    if (argc < 2) usage("missing mode");
    options o;
    o.mode = argv[1];
    if (o.mode != "fanout" && o.mode != "latency" && o.mode != "idle") usage("unknown mode " + o.mode);
    for (int i = 2; i < argc; ++i) {
        const std::string f = argv[i];
        if (i + 1 >= argc) usage("missing value after " + f);
        const std::string v = argv[++i];
        try {
            if (f == "--host") o.host = v;
            else if (f == "--port") o.port = std::uint16_t(std::stoul(v));
            else if (f == "--target") o.target = v;
            else if (f == "--channel") o.channel = v;
            else if (f == "--api-key") o.api_key = v;
            else if (f == "--label") o.label = v;
            else if (f == "--subscribers" || f == "--connections") o.connections = std::stoul(v);
            else if (f == "--seconds") o.seconds = std::stod(v);
            else if (f == "--rate") o.rate = std::stod(v);
            else if (f == "--publishers") o.publishers = std::max<std::size_t>(1, std::stoul(v));
            else if (f == "--payload-bytes") o.payload_bytes = std::stoul(v);
            else if (f == "--window") o.window = std::stoul(v), o.window_given = true;
            else if (f == "--sources") o.sources = std::clamp<std::size_t>(std::stoul(v), 1, 254);
            else if (f == "--connect-concurrency") o.connect_concurrency = std::max<std::size_t>(1, std::stoul(v));
            else if (f == "--drain") o.drain = std::stod(v);
            else if (f == "--drain-max") o.drain_max = std::stod(v);
            else if (f == "--settle") o.settle = std::stod(v);
            else if (f == "--warmup-timeout") o.warmup_timeout = std::stod(v);
            else if (f == "--server-pid") o.server_pid = std::stol(v);
            else usage("unknown option " + f);
        } catch (const std::logic_error&) {
            usage("bad value for " + f + ": " + v);
        }
    }
    if (o.mode != "idle" && o.api_key.empty()) usage(o.mode + " needs --api-key");
    if (o.mode == "idle" && o.server_pid <= 0) usage("idle needs --server-pid");
    if (o.mode == "latency" && !o.window_given) o.window = 0;
    return o;
}

long rss_kib(long pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
    return -1;
}

// CPU seconds (user + system, all threads) of a process, from /proc/PID/stat; -1 if unknown.
double cpu_seconds(long pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const std::size_t paren = all.rfind(')');
    if (paren == std::string::npos) return -1;
    std::istringstream fields(all.substr(paren + 2));
    std::string v;
    double ticks = 0;
    for (int i = 3; i <= 15 && fields >> v; ++i)
        if (i == 14 || i == 15) ticks += std::strtod(v.c_str(), nullptr);  // utime, stime
    return ticks / double(sysconf(_SC_CLK_TCK));
}

double self_cpu_seconds() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

void raise_nofile() {
    rlimit r{};
    if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

std::string json_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\', out += c;
        else if (std::uint8_t(c) < 0x20) out += ' ';
        else out += c;
    }
    return out;
}

// Opens `sock` and binds it to `source`:0 without reserving a port until connect().
void open_bound(tcp::socket& sock, const asio::ip::address_v4& source) {
    sock.open(tcp::v4());
    const int one = 1;
    ::setsockopt(sock.native_handle(), IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    sock.bind(tcp::endpoint(source, 0));
}

std::int64_t parse_int(const char*& p, const char* end) {
    while (p < end && *p == ' ') ++p;
    bool neg = false;
    if (p < end && *p == '-') neg = true, ++p;
    std::int64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
    return neg ? -v : v;
}

const char* find(const char* p, const char* end, std::string_view what) {
    if (p >= end) return nullptr;
    return static_cast<const char*>(memmem(p, std::size_t(end - p), what.data(), what.size()));
}

struct subscriber {
    explicit subscriber(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string in;       // bytes not yet consumed (partial frame, handshake answer)
    std::string message;  // a fragmented message being assembled
    std::string out, pending;
    std::string key;
    std::int64_t last_id = 0;
    std::int64_t first_run_id = 0;
    std::uint32_t run_count = 0;
    std::uint32_t dups = 0;
    enum : std::uint8_t { connecting, handshaking, open, closed } state = connecting;
    bool writing = false;
    bool warm = false;  // got at least one notification
    bool message_text = false;
};

struct publish_request {
    explicit publish_request(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string request, response;
    std::int64_t start = 0;  // before connect
    bool warm = false;
};

class loadgen {
public:
    explicit loadgen(options o)
        : o_(std::move(o)), server_(asio::ip::make_address(o_.host), o_.port), poll_(io_), deadline_(io_), pacer_(io_),
          rng_(std::random_device{}()) {
        subs_.reserve(o_.connections);
        for (std::size_t i = 0; i < o_.connections; ++i) subs_.push_back(std::make_unique<subscriber>(io_));
        subscribe_text_ = "{\"event_name\":\"subscribe\",\"data\":{\"channels\":[\"" + o_.channel + "\"],\"last\":0}}";
        const std::string bare = "{\"t\":" + std::to_string(now_ns()) + ",\"pad\":\"\"}";
        pad_ = std::string(o_.payload_bytes > bare.size() ? o_.payload_bytes - bare.size() : 0, 'x');
    }

    int run() {
        if (o_.mode == "idle") rss_before_ = rss_kib(o_.server_pid);
        progress("connecting " + std::to_string(o_.connections) + " subscribers");
        connect_start_ = now_ns();
        open_more();
        wait_until([this] { return opened_ + failed_ == o_.connections; }, 60 + double(o_.connections) / 200,
                   [this](bool) { connected(); });
        io_.run();
        return exit_code_;
    }

private:
    // --- phases ---------------------------------------------------------------------------
    void connected() {
        connect_seconds_ = double(now_ns() - connect_start_) / 1e9;
        progress("connected " + std::to_string(opened_) + ", failed " + std::to_string(failed_) + " in " +
                 fmt(connect_seconds_, 2) + " s");
        if (o_.api_key.empty()) return settle();  // idle without a key: no warm-up possible
        progress("warm-up publish");
        warm_start_ = now_ns();
        publish(true);
        wait_until([this] { return warm_id_ != 0 && warm_subs_ >= opened_ - closed_unexpected_ && inflight_ == 0; },
                   o_.warmup_timeout, [this](bool ok) {
                       warm_ok_ = ok;
                       warm_seconds_ = double(now_ns() - warm_start_) / 1e9;
                       progress("warm-up " + std::string(ok ? "reached" : "did NOT reach") + " " +
                                std::to_string(warm_subs_) + "/" + std::to_string(opened_) + " subscribers in " +
                                fmt(warm_seconds_, 2) + " s");
                       if (o_.mode == "idle") return settle();
                       if (!ok) return finish();
                       start_run();
                   });
    }

    void settle() {
        poll_.expires_after(std::chrono::milliseconds(std::int64_t(o_.settle * 1000)));
        poll_.async_wait([this](const asio::error_code&) {
            rss_after_ = rss_kib(o_.server_pid);
            finish();
        });
    }

    void start_run() {
        progress("publishing for " + fmt(o_.seconds, 1) + " s");
        run_phase_ = true;
        publishing_ = true;
        run_start_ = now_ns();
        self_cpu_start_ = self_cpu_seconds();
        if (o_.server_pid > 0) server_cpu_start_ = cpu_seconds(o_.server_pid);
        deadline_.expires_after(std::chrono::nanoseconds(std::int64_t(o_.seconds * 1e9)));
        deadline_.async_wait([this](const asio::error_code&) {
            publishing_ = false;
            backlog_ = 0;
            run_end_ = now_ns();
            progress("publishing stopped: " + std::to_string(published_ok_) + " published, waiting for answers");
            wait_until([this] { return inflight_ == 0; }, 30, [this](bool) {
                answers_done_ = now_ns();
                drain();
            });
        });
        if (o_.mode == "latency") {
            next_due_ = std::chrono::steady_clock::now();
            pace();
        } else {
            maybe_publish();
        }
    }

    // Waits for stragglers: until everything is delivered, or nothing arrived for --drain
    // seconds (late deliveries are not lost ones: a backlog may take long), or --drain-max.
    void drain() {
        const std::uint64_t expected = published_ok_ * (opened_ - closed_unexpected_);
        const std::int64_t now = now_ns();
        const std::int64_t quiet_since = std::max(last_delivery_, answers_done_);
        if (delivered_run_ >= expected || now - quiet_since > std::int64_t(o_.drain * 1e9) ||
            now - answers_done_ > std::int64_t(o_.drain_max * 1e9))
            return finish();
        poll_.expires_after(std::chrono::milliseconds(5));
        poll_.async_wait([this](const asio::error_code&) { drain(); });
    }

    void pace() {
        if (!publishing_) return;
        const auto now = std::chrono::steady_clock::now();
        const auto period = std::chrono::nanoseconds(std::int64_t(1e9 / o_.rate));
        while (next_due_ <= now) {
            if (inflight_ < o_.publishers) publish(false);
            else backlog_++, late_++, max_backlog_ = std::max(max_backlog_, backlog_);
            next_due_ += period;
        }
        pacer_.expires_at(next_due_);
        pacer_.async_wait([this](const asio::error_code& ec) {
            if (!ec) pace();
        });
    }

    void maybe_publish() {
        if (!publishing_) return;
        if (o_.mode == "latency") {
            while (backlog_ > 0 && inflight_ < o_.publishers) backlog_--, publish(false);
            return;
        }
        const std::uint64_t live = opened_ - closed_unexpected_;
        while (inflight_ < o_.publishers) {
            if (o_.window != 0 && (requested_ - publish_errors_) * live >= delivered_run_ + o_.window * live) break;
            publish(false);
        }
    }

    // Calls then(true) once pred() holds, or then(false) after timeout seconds.
    void wait_until(std::function<bool()> pred, double timeout, std::function<void(bool)> then) {
        const std::int64_t until = now_ns() + std::int64_t(timeout * 1e9);
        auto step = std::make_shared<std::function<void()>>();
        *step = [this, pred = std::move(pred), then = std::move(then), until, step]() {
            if (pred()) return then(true);
            if (now_ns() >= until) return then(false);
            poll_.expires_after(std::chrono::milliseconds(5));
            poll_.async_wait([step](const asio::error_code&) { (*step)(); });
        };
        (*step)();
    }

    // --- subscribers ----------------------------------------------------------------------
    void open_more() {
        while (next_open_ < o_.connections && connecting_ < o_.connect_concurrency) start_subscriber(next_open_++);
    }

    void start_subscriber(std::size_t i) {
        subscriber* s = subs_[i].get();
        connecting_++;
        try {
            open_bound(s->sock, asio::ip::address_v4((127u << 24) | std::uint32_t(1 + i % o_.sources)));
        } catch (const std::system_error& e) {
            note_error("subscriber socket: " + std::string(e.what()));
            return asio::post(io_, [this, s] { fail(s); });
        }
        s->sock.async_connect(server_, [this, s](const asio::error_code& ec) {
            if (ec) {
                note_error("subscriber connect: " + ec.message());
                return fail(s);
            }
            asio::error_code ignored;
            s->sock.set_option(tcp::no_delay(true), ignored);
            s->sock.non_blocking(true, ignored);
            std::string raw(16, '\0');
            for (auto& c : raw) c = char(rng_());
            s->key = wsmini::base64(raw);
            s->state = subscriber::handshaking;
            send(s, "GET " + o_.target + " HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
                        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + s->key +
                        "\r\nSec-WebSocket-Version: 13\r\n\r\n");
            arm_read(s);
        });
    }

    void fail(subscriber* s) {
        if (s->state == subscriber::closed) return;
        s->state = subscriber::closed;
        asio::error_code ignored;
        s->sock.close(ignored);
        connecting_--;
        failed_++;
        open_more();
    }

    void lost(subscriber* s, const std::string& why) {
        if (s->state != subscriber::open) return fail(s);
        s->state = subscriber::closed;
        closed_unexpected_++;
        note_error("subscriber lost: " + why);
        asio::error_code ignored;
        s->sock.close(ignored);
    }

    void send(subscriber* s, std::string bytes) {
        if (s->writing) {
            s->pending += bytes;
            return;
        }
        s->writing = true;
        s->out = std::move(bytes);
        asio::async_write(s->sock, asio::buffer(s->out), [this, s](const asio::error_code& ec, std::size_t) {
            s->writing = false;
            if (ec) return;  // the read side notices
            if (!s->pending.empty()) send(s, std::exchange(s->pending, std::string()));
        });
    }

    void arm_read(subscriber* s) {
        s->sock.async_wait(tcp::socket::wait_read, [this, s](const asio::error_code& ec) {
            if (ec) {
                if (ec != asio::error::operation_aborted) lost(s, ec.message());
                return;
            }
            readable(s);
        });
    }

    void readable(subscriber* s) {
        const std::int64_t now = now_ns();
        for (int round = 0; round < 16; ++round) {
            if (s->state == subscriber::closed) return;
            asio::error_code ec;
            const std::size_t n = s->sock.read_some(asio::buffer(buf_), ec);
            if (ec == asio::error::would_block || ec == asio::error::try_again) return arm_read(s);
            if (ec) return lost(s, ec.message());
            feed(s, buf_, n, now);
            // A short read emptied the socket: the next arrival is a new edge, reported to the
            // wait armed here (before this handler returns). Saves the EAGAIN read.
            if (n < sizeof buf_) {
                if (s->state != subscriber::closed) arm_read(s);
                return;
            }
        }
        asio::post(io_, [this, s] { readable(s); });  // let the other connections run
    }

    void feed(subscriber* s, const char* data, std::size_t n, std::int64_t now) {
        if (s->state == subscriber::handshaking) {
            s->in.append(data, n);
            const std::size_t end = s->in.find("\r\n\r\n");
            if (end == std::string::npos) {
                if (s->in.size() > 16384) note_error("handshake answer too long"), fail(s);
                return;
            }
            const std::string_view head(s->in.data(), end + 2);
            if (head.rfind("HTTP/1.1 101", 0) != 0 || wsmini::header_value(head, "Sec-WebSocket-Accept") != wsmini::accept_key(s->key)) {
                note_error("handshake refused: " + std::string(head.substr(0, head.find("\r\n"))));
                return fail(s);
            }
            s->in.erase(0, end + 4);
            s->state = subscriber::open;
            connecting_--;
            opened_++;
            send(s, wsmini::masked_frame(1, subscribe_text_, std::uint32_t(rng_())));
            open_more();
            const std::size_t used = frames(s, s->in.data(), s->in.size(), now);
            s->in.erase(0, used);
            return;
        }
        if (s->in.empty()) {
            const std::size_t used = frames(s, data, n, now);
            if (used < n && s->state == subscriber::open) s->in.assign(data + used, n - used);
        } else {
            s->in.append(data, n);
            const std::size_t used = frames(s, s->in.data(), s->in.size(), now);
            s->in.erase(0, used);
            if (s->in.empty() && s->in.capacity() > 65536) std::string().swap(s->in);
        }
    }

    // Handles the complete frames in d[0, n); returns the bytes consumed.
    std::size_t frames(subscriber* s, const char* d, std::size_t n, std::int64_t now) {
        std::size_t off = 0;
        while (n - off >= 2 && s->state == subscriber::open) {
            const auto b0 = std::uint8_t(d[off]), b1 = std::uint8_t(d[off + 1]);
            std::uint64_t len = b1 & 0x7f;
            std::size_t h = 2;
            if (len == 126) {
                if (n - off < 4) break;
                len = std::uint64_t(std::uint8_t(d[off + 2])) << 8 | std::uint8_t(d[off + 3]);
                h = 4;
            } else if (len == 127) {
                if (n - off < 10) break;
                len = 0;
                for (int i = 0; i < 8; ++i) len = len << 8 | std::uint8_t(d[off + 2 + i]);
                h = 10;
            }
            const std::size_t mask = (b1 & 0x80) ? 4 : 0;
            if (n - off < h + mask + len) break;
            const char* p = d + off + h + mask;
            std::string unmasked;
            if (mask) {  // servers must not mask, but be lenient
                unmasked.assign(p, len);
                for (std::size_t i = 0; i < len; ++i) unmasked[i] ^= d[off + h + i % 4];
                p = unmasked.data();
            }
            frame(s, (b0 & 0x80) != 0, b0 & 0x0f, p, std::size_t(len), now);
            off += h + mask + len;
        }
        return off;
    }

    void frame(subscriber* s, bool fin, int opcode, const char* p, std::size_t len, std::int64_t now) {
        switch (opcode) {
        case 0x1:
        case 0x2:
            if (fin) {
                if (opcode == 1) text(s, p, len, now);
            } else {
                s->message.assign(p, len);
                s->message_text = opcode == 1;
            }
            break;
        case 0x0:
            s->message.append(p, len);
            if (fin) {
                if (s->message_text) text(s, s->message.data(), s->message.size(), now);
                std::string().swap(s->message);
            }
            break;
        case 0x8: {
            const int code = len >= 2 ? (std::uint8_t(p[0]) << 8 | std::uint8_t(p[1])) : 1005;
            send(s, wsmini::masked_frame(8, std::string_view(p, std::min<std::size_t>(len, 2)), std::uint32_t(rng_())));
            lost(s, "server closed with " + std::to_string(code) + " " + std::string(p + std::min<std::size_t>(len, 2), len > 2 ? len - 2 : 0));
            break;
        }
        case 0x9:
            send(s, wsmini::masked_frame(0xA, std::string_view(p, len), std::uint32_t(rng_())));
            break;
        default:
            break;
        }
    }

    // One text message: a JSON array of {"id":N,"message":{...}} elements.
    void text(subscriber* s, const char* p, std::size_t len, std::int64_t now) {
        static constexpr std::string_view id_key = "{\"id\":";
        const char* end = p + len;
        const char* e = find(p, end, id_key);
        bool counted_frame = false;
        while (e) {
            const char* q = e + id_key.size();
            const std::int64_t id = parse_int(q, end);
            const char* next = find(q, end, id_key);
            const char* element_end = next ? next : end;
            if (!s->warm) s->warm = true, warm_subs_++;
            if (id <= s->last_id) {
                if (find(q, element_end, "bus/missed_notifications")) missed_markers_++;
                else s->dups++, dups_++;
            } else {
                s->last_id = id;
                if (run_phase_ && id > warm_id_) {
                    if (!counted_frame) counted_frame = true, frames_++;
                    s->run_count++;
                    if (s->first_run_id == 0) s->first_run_id = id;
                    delivered_run_++;
                    last_delivery_ = now;
                    if (const char* t = find(q, element_end, "\"t\":")) {
                        t += 4;
                        const std::int64_t sent = parse_int(t, element_end);
                        latency_.add(std::uint64_t(std::max<std::int64_t>(0, now - sent)) / 1000);
                    }
                }
            }
            e = next;
        }
        if (run_phase_ && publishing_ && o_.mode == "fanout") maybe_publish();
    }

    // --- publisher ------------------------------------------------------------------------
    void publish(bool warm) {
        inflight_++;
        if (!warm) requested_++;
        auto r = std::make_shared<publish_request>(io_);
        r->warm = warm;
        r->start = now_ns();
        try {
            open_bound(r->sock, asio::ip::address_v4((127u << 24) | (1u << 8) | std::uint32_t(1 + publish_counter_++ % 16)));
        } catch (const std::system_error& e) {
            // Later, so that a failing socket() cannot recurse through maybe_publish().
            return asio::post(io_, [this, r, what = std::string(e.what())] { published(r, "publisher socket: " + what); });
        }
        r->sock.async_connect(server_, [this, r](const asio::error_code& ec) {
            if (ec) return published(r, "publisher connect: " + ec.message());
            asio::error_code ignored;
            r->sock.set_option(tcp::no_delay(true), ignored);
            const std::string body = "{\"channel\":\"" + o_.channel + "\",\"type\":\"b\",\"payload\":{\"t\":" +
                                     std::to_string(now_ns()) + ",\"pad\":\"" + pad_ + "\"}}";
            r->request = "POST /bus/send HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
                         "\r\nAuthorization: Bearer " + o_.api_key +
                         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                         "\r\n\r\n" + body;
            asio::async_write(r->sock, asio::buffer(r->request), [this, r](const asio::error_code& ec, std::size_t) {
                if (ec) return published(r, "publisher write: " + ec.message());
                read_answer(r);
            });
        });
    }

    void read_answer(std::shared_ptr<publish_request> r) {
        const std::size_t old = r->response.size();
        r->response.resize(old + 4096);
        r->sock.async_read_some(asio::buffer(&r->response[old], 4096), [this, r, old](const asio::error_code& ec, std::size_t n) {
            r->response.resize(old + (ec ? 0 : n));
            if (ec) return published(r, "");  // EOF: the server closed after its answer
            // Keep-alive answers are complete once Content-Length bytes are in.
            const std::size_t end = r->response.find("\r\n\r\n");
            if (end != std::string::npos) {
                const std::string_view head(r->response.data(), end + 2);
                const auto connection = wsmini::header_value(head, "Connection");
                const auto length = wsmini::header_value(head, "Content-Length");
                if (connection != "close" && !length.empty() &&
                    r->response.size() >= end + 4 + std::strtoull(std::string(length).c_str(), nullptr, 10))
                    return published(r, "");
            }
            read_answer(r);
        });
    }

    void published(const std::shared_ptr<publish_request>& r, const std::string& error) {
        inflight_--;
        asio::error_code ignored;
        r->sock.close(ignored);
        std::int64_t id = 0;
        if (error.empty()) {
            const std::size_t ids = r->response.find("\"ids\":[");
            if (r->response.rfind("HTTP/1.1 200", 0) == 0 && ids != std::string::npos) {
                const char* p = r->response.data() + ids + 7;
                id = parse_int(p, r->response.data() + r->response.size());
            }
        }
        if (id <= 0) {
            if (!r->warm) publish_errors_++;
            note_error(error.empty() ? "publish answered: " + r->response.substr(0, r->response.find("\r\n")) : error);
        } else if (r->warm) {
            warm_id_ = id;
        } else {
            published_ok_++;
            post_latency_.add(std::uint64_t(now_ns() - r->start) / 1000);
            min_published_ = min_published_ == 0 ? id : std::min(min_published_, id);
            max_published_ = std::max(max_published_, id);
        }
        maybe_publish();
    }

    // --- report ---------------------------------------------------------------------------
    void note_error(const std::string& what) {
        if (errors_shown_++ < 5) std::cerr << "ws_loadgen: " << what << std::endl;
    }
    void progress(const std::string& what) { std::cerr << "ws_loadgen [" << o_.mode << "] " << what << std::endl; }

    static std::string fmt(double v, int digits) {
        char b[64];
        std::snprintf(b, sizeof b, "%.*f", digits, v);
        return b;
    }

    void finish() {
        const double self_cpu = self_cpu_seconds() - self_cpu_start_;
        const double server_cpu = o_.server_pid > 0 && server_cpu_start_ >= 0 ? cpu_seconds(o_.server_pid) - server_cpu_start_ : -1;
        std::ostringstream j, h;
        j << "{\"mode\":\"" << o_.mode << "\",\"label\":\"" << json_escape(o_.label) << "\",\"connections\":" << o_.connections
          << ",\"opened\":" << opened_ << ",\"connect_failures\":" << failed_ << ",\"connect_seconds\":" << fmt(connect_seconds_, 3)
          << ",\"closed_by_server\":" << closed_unexpected_ << ",\"warmup_ok\":" << (warm_ok_ ? "true" : "false")
          << ",\"warmup_seconds\":" << fmt(warm_seconds_, 3);
        bool ok = failed_ == 0 && closed_unexpected_ == 0;
        if (o_.mode == "idle") {
            ok = ok && rss_before_ > 0 && rss_after_ > 0 && (o_.api_key.empty() || warm_ok_);
            const double per = opened_ ? double(rss_after_ - rss_before_) / double(opened_) : 0;
            j << ",\"rss_before_kib\":" << rss_before_ << ",\"rss_after_kib\":" << rss_after_
              << ",\"kib_per_connection\":" << fmt(per, 2);
            h << "# idle " << o_.label << ": " << opened_ << " connections, server RSS " << rss_before_ << " -> "
              << rss_after_ << " KiB = " << fmt(per, 2) << " KiB/connection";
        } else {
            const std::uint64_t live = opened_ - closed_unexpected_;
            const std::uint64_t expected = published_ok_ * live;
            std::uint64_t incomplete = 0;
            for (const auto& s : subs_) {
                if (s->state != subscriber::open) continue;
                const bool exact = s->run_count == published_ok_ && s->dups == 0 &&
                                   (published_ok_ == 0 || (s->first_run_id == min_published_ && s->last_id == max_published_));
                if (!exact) incomplete++;
            }
            const bool contiguous = published_ok_ == 0 || std::uint64_t(max_published_ - min_published_ + 1) == published_ok_;
            ok = ok && warm_ok_ && incomplete == 0 && dups_ == 0 && contiguous && published_ok_ > 0 && publish_errors_ == 0;
            const double publish_s = double(run_end_ - run_start_) / 1e9;
            const double deliver_s = double(std::max(last_delivery_, run_start_ + 1) - run_start_) / 1e9;
            const double dps = double(delivered_run_) / deliver_s;
            const double drain_s = last_delivery_ > answers_done_ ? double(last_delivery_ - answers_done_) / 1e9 : 0.0;
            auto ms = [](std::uint64_t us) { return fmt(double(us) / 1000.0, 3); };
            j << ",\"seconds\":" << fmt(o_.seconds, 1) << ",\"publishers\":" << o_.publishers;
            if (o_.mode == "latency") j << ",\"rate\":" << fmt(o_.rate, 1) << ",\"late_publishes\":" << late_ << ",\"max_backlog\":" << max_backlog_;
            else j << ",\"window\":" << o_.window;
            j << ",\"published\":" << published_ok_ << ",\"publish_errors\":" << publish_errors_
              << ",\"published_per_s\":" << fmt(double(published_ok_) / publish_s, 1) << ",\"expected\":" << expected
              << ",\"delivered\":" << delivered_run_ << ",\"deliveries_per_s\":" << fmt(dps, 1)
              << ",\"drain_after_last_answer_s\":" << fmt(drain_s, 3) << ",\"subscribers_incomplete\":" << incomplete
              << ",\"duplicates\":" << dups_ << ",\"missed_markers\":" << missed_markers_
              << ",\"ids_contiguous\":" << (contiguous ? "true" : "false") << ",\"lat_p50_ms\":" << ms(latency_.percentile(50))
              << ",\"lat_p99_ms\":" << ms(latency_.percentile(99)) << ",\"lat_max_ms\":" << ms(latency_.max)
              << ",\"lat_samples\":" << latency_.count << ",\"post_p50_ms\":" << ms(post_latency_.percentile(50))
              << ",\"post_p99_ms\":" << ms(post_latency_.percentile(99)) << ",\"post_max_ms\":" << ms(post_latency_.max)
              << ",\"frames\":" << frames_
              << ",\"notifications_per_frame\":" << fmt(frames_ ? double(delivered_run_) / double(frames_) : 0.0, 2)
              << ",\"loadgen_cpu_s\":" << fmt(self_cpu, 2) << ",\"server_cpu_s\":" << fmt(server_cpu, 2)
              << ",\"elapsed_s\":" << fmt(double(now_ns() - run_start_) / 1e9, 2);
            h << "# " << o_.mode << " " << o_.label << ": " << live << " subscribers, " << published_ok_ << " published ("
              << fmt(double(published_ok_) / publish_s, 0) << "/s), " << delivered_run_ << "/" << expected << " delivered ("
              << fmt(dps, 0) << "/s, last one " << fmt(drain_s, 2) << " s after the last publish answer), latency p50 " << ms(latency_.percentile(50)) << " ms, p99 "
              << ms(latency_.percentile(99)) << " ms, max " << ms(latency_.max) << " ms, POST answered in p50 "
              << ms(post_latency_.percentile(50)) << " ms, p99 " << ms(post_latency_.percentile(99)) << " ms, "
              << (ok ? "every subscriber got every notification once" : "INCOMPLETE") << " (incomplete " << incomplete
              << ", duplicates " << dups_ << ", publish errors " << publish_errors_ << ", closed " << closed_unexpected_
              << "), " << fmt(frames_ ? double(delivered_run_) / double(frames_) : 0.0, 2) << " notifications/frame, CPU s: loadgen "
              << fmt(self_cpu, 2) << ", server " << fmt(server_cpu, 2);
        }
        j << ",\"ok\":" << (ok ? "true" : "false") << "}";
        std::cout << j.str() << "\n" << h.str() << std::endl;
        exit_code_ = ok ? 0 : 1;
        io_.stop();
    }

    options o_;
    asio::io_context io_{1};
    tcp::endpoint server_;
    asio::steady_timer poll_, deadline_, pacer_;
    std::minstd_rand rng_;
    std::vector<std::unique_ptr<subscriber>> subs_;
    std::string subscribe_text_, pad_;
    char buf_[65536];

    std::size_t next_open_ = 0, connecting_ = 0, opened_ = 0, failed_ = 0, closed_unexpected_ = 0;
    std::size_t warm_subs_ = 0;
    std::int64_t warm_id_ = 0;
    bool warm_ok_ = false, run_phase_ = false, publishing_ = false;
    std::size_t inflight_ = 0, publish_counter_ = 0;
    std::uint64_t requested_ = 0, published_ok_ = 0, publish_errors_ = 0;
    std::int64_t min_published_ = 0, max_published_ = 0;
    std::uint64_t delivered_run_ = 0, dups_ = 0, missed_markers_ = 0;
    std::uint64_t backlog_ = 0, max_backlog_ = 0, late_ = 0;
    std::chrono::steady_clock::time_point next_due_;
    std::int64_t connect_start_ = 0, warm_start_ = 0, run_start_ = 0, run_end_ = 0, answers_done_ = 0, last_delivery_ = 0;
    double connect_seconds_ = 0, warm_seconds_ = 0;
    long rss_before_ = -1, rss_after_ = -1;
    histogram latency_;
    histogram post_latency_;  // publish: connect + POST + answer
    std::uint64_t frames_ = 0;  // text frames with at least one counted notification
    double self_cpu_start_ = 0, server_cpu_start_ = -1;
    std::size_t errors_shown_ = 0;
    int exit_code_ = 1;
};

} // namespace

int main(int argc, char** argv) {
    options o = parse(argc, argv);
    raise_nofile();
    std::signal(SIGPIPE, SIG_IGN);
    try {
        loadgen g(std::move(o));
        return g.run();
    } catch (const std::exception& e) {
        std::cerr << "ws_loadgen: " << e.what() << std::endl;
        return 1;
    }
}
