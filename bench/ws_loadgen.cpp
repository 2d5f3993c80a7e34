// ws_loadgen: a lean WebSocket load generator for the imbus protocol (docs/PROTOCOL.md §4-5) and for
// the peers of the bench (bench/peers/): Node `ws`, Socket.IO, uWebSockets.js, nchan.
//
// One thread, one io_context, many connections; hand-written client framing (handshake with
// Sec-WebSocket-Key, masked client frames, server frames of any length), so that the load
// generator is not the bottleneck. Subscribers bind to 127.0.0.1..127.0.0.k before connecting
// (IP_BIND_ADDRESS_NO_PORT), publishers to 127.0.1.1..127.0.1.16: ephemeral ports do not run out.
//
//   ws_loadgen fanout   --protocol P --port N --subscribers N --seconds S [--window W]
//   ws_loadgen latency  --protocol P --port N --subscribers N --rate R --seconds S
//   ws_loadgen channels --protocol P --port N --subscribers N --seconds S [--window W]
//   ws_loadgen idle     --protocol P --port N --connections N --server-pid PID
//   ws_loadgen storm    --protocol P --port N --subscribers N --away M
//   ws_loadgen soak     --port N --connections N --seconds S --server-pid PID   (imbus only)
//   ws_loadgen pingflood   --port N --seconds S --server-pid PID                  (imbus only)
//   ws_loadgen slowreaders --port N --readers N --rate R --seconds S --server-pid PID (imbus only)
//
// Modes: fanout and latency put every subscriber on the channel "bench"; channels gives each
// subscriber its own channel "u<i>" and publishes to random ones; idle measures the server's
// resident memory; storm disconnects every subscriber, publishes M notifications, reconnects
// all of them at once (each resubscribing with its last id where the protocol resumes) and
// measures the time until every one has caught up, and how many notifications were lost.
// soak runs for a long time with N connections, each on a personal channel "p<i>" and on
// "shared", while paced publishers post to random personal channels and to the shared one and
// a churn of abrupt disconnects (no close frame; some with RST) and resuming reconnects goes
// on; it checks that every connection got every id of its channels after its first subscribe
// exactly once, and samples the server's RSS and open fds every second (see run_soak).
// pingflood and slowreaders are hostile clients (see class hostile): one socket that sends empty
// pings as fast as it can and never reads, or N subscribers of the busy channel "broadcast" that
// ask for history and never read while it gets --rate publishes/s; meanwhile an honest canary on
// its own channel gets a publish every 20 ms, and the server's RSS is sampled every 100 ms.
//
// Protocols (--protocol; each is a small adapter: handshake path, subscribe message, publish
// request, where the notification key and the send time are in a frame):
//   imbus    GET /websocket?version=19.0-2, {"event_name":"subscribe","data":{"channels":[C],"last":L}},
//            POST /bus/send (bearer key) -> {"ids":[N]}; frames [{"id":N,"message":{...}}], key = id
//   floor    the same as imbus (bench/floor_server.cpp); channels mode adds &channel=C to the path
//   ws, uws  GET /, the imbus subscribe message, POST /publish {"channel":C,"payload":P};
//            frames {"channel":C,"payload":P}
//   socketio GET /socket.io/?EIO=4&transport=websocket; answers the open packet `0{...}` with
//            `40`, then emits `42["subscribe","C"]`; ping `2` -> pong `3`; frames `42["n",P]`
//   nchan    GET /sub/C (storm: subprotocol ws+meta.nchan and Last-Event-ID to resume), no
//            subscribe message; POST /pub/C with P as the body; frames are P
// Every payload is {"s":<publisher's sequence number>,"t":<CLOCK_MONOTONIC ns>,"pad":"x..."}
// (~100 bytes). The key of a notification is the server's id for imbus and the floor, and the
// publisher's sequence number for the others; keys are checked per subscriber (no gap, no
// duplicate). Frames are not parsed as JSON: the key and the time are found by memmem.
// Before the timed phase, warm-up notifications must reach every subscriber (this proves that
// every subscribe was processed).
//
// Output: one JSON line (starts with '{') and one human line (starts with '#') on stdout;
// progress on stderr. Exit status 0 when the run completed (every subscriber got every
// published notification exactly once; storm: every client is live again, and none lost where
// the protocol resumes), 1 otherwise, 2 on bad usage.
#ifndef ASIO_STANDALONE
#define ASIO_STANDALONE
#endif
#include <asio.hpp>

#include "ws_mini.hpp"

#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
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

enum class protocol { imbus, floor, ws, socketio, uws, nchan };

struct options {
    std::string mode;
    protocol proto = protocol::imbus;
    std::string proto_name = "imbus";
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
    std::size_t window = 100;  // fanout: per subscriber; channels: in all
    std::size_t sources = 4;
    std::size_t connect_concurrency = 256;
    std::size_t away = 1000;            // storm: notifications published while away
    std::size_t storm_concurrency = 0;  // storm: connects at once (0 = all)
    double probe_interval = 0.2;        // storm: seconds between live probes
    double storm_timeout = 120;         // storm: give up after this long
    double drain = 3;                   // give up after this long without a delivery...
    double drain_max = 300;             // ...or this long after the last publish answer
    double settle = 2;
    double warmup_timeout = 60;
    long server_pid = 0;
    double trace_slow_ms = 0;  // print deliveries slower than this (0: none)
    bool window_given = false;
    bool rate_given = false;
    // soak
    double shared_rate = 5;          // shared-channel publishes per second (rate: personal ones)
    double churn = 0;                // abrupt disconnects per second (0: connections / 60)
    double rst_fraction = 0.3;       // of those, closed with RST (SO_LINGER 0) instead of FIN
    double away_max = 1;             // a dropped connection comes back after 0..this many seconds
    double warmup = 0;               // RSS baseline this long into the run (0: a third of it)
    long rss_tolerance_kib = 16384;  // RSS may grow by max(this, rss_tolerance_pct) after warm-up
    double rss_tolerance_pct = 10;
    long fd_tolerance = 0;  // open fds after the run may exceed the idle baseline by this
    // pingflood, slowreaders
    int rcvbuf = 4096;               // SO_RCVBUF of the hostile sockets, set before connecting
    int mss = 1448;                  // TCP_MAXSEG they announce, like a client across a network (0: the route's)
    double canary_interval_ms = 20;  // one canary publish every this many ms
    std::string canary_channel = "canary";
    long rss_cap_mib = 4096;  // end the attack early when the server's RSS passes this
    std::string metrics_path = "/metrics";
    std::size_t history = 1000;  // slowreaders: notifications on the channel before the readers come
    bool seconds_given = false, channel_given = false, payload_given = false, publishers_given = false;
};

bool server_ids(protocol p) { return p == protocol::imbus || p == protocol::floor; }
bool resumes(protocol p) { return p == protocol::imbus || p == protocol::nchan; }

[[noreturn]] void usage(const std::string& problem) {
    std::cerr
        << "ws_loadgen: " << problem << "\n"
        << "usage: ws_loadgen fanout   --subscribers N --seconds S [--window W] [common]\n"
        << "       ws_loadgen latency  --subscribers N --rate R --seconds S [common]\n"
        << "       ws_loadgen channels --subscribers N --seconds S [--window W] [common]\n"
        << "       ws_loadgen idle     --connections N --server-pid PID [--settle S] [common]\n"
        << "       ws_loadgen storm    --subscribers N --away M [--storm-concurrency C] [--probe-interval S]\n"
        << "                           [--storm-timeout S] [common]\n"
        << "       ws_loadgen soak     --connections N --seconds S --server-pid PID [--rate 200 (personal/s)]\n"
        << "                           [--shared-rate 5] [--churn N/60 (drops/s)] [--rst-fraction 0.3] [--away-max 1]\n"
        << "                           [--warmup S/3] [--rss-tolerance-kib 16384] [--rss-tolerance-pct 10]\n"
        << "                           [--fd-tolerance 0] [--drain 3] [--drain-max 300] [common]\n"
        << "       ws_loadgen pingflood   --server-pid PID [--seconds 30] [hostile] [common]\n"
        << "       ws_loadgen slowreaders --server-pid PID [--readers 1000] [--rate 200] [--payload-bytes 1000]\n"
        << "                              [--history 1000] [--channel broadcast] [--seconds 30] [hostile] [common]\n"
        << "hostile: --rcvbuf 4096 --mss 1448 (0: the route's, 65483 on loopback) --canary-interval-ms 20\n"
        << "         --canary-channel canary --rss-cap-mib 4096 --metrics-path /metrics (imbus only)\n"
        << "common: --protocol imbus|floor|ws|socketio|uws|nchan --host ADDR --port N --api-key KEY (imbus, floor)\n"
        << "        --target /websocket?version=19.0-2 (imbus, floor) --channel bench\n"
        << "        --publishers 4 --payload-bytes 100 --sources 4 --connect-concurrency 256\n"
        << "        --drain 3 --drain-max 300 --warmup-timeout 60 --label TEXT --server-pid PID (its CPU time)\n"
        << "        --trace-slow MS (print each delivery slower than MS to stderr)\n"
        << "--window W: publish only while fewer than W notifications per subscriber (fanout, default 100)\n"
        << "  or in all (channels, default 1000) are published but not yet delivered; 0 = unlimited.\n";
    std::exit(2);
}

options parse(int argc, char** argv) {
    if (argc < 2) usage("missing mode");
    options o;
    o.mode = argv[1];
    if (o.mode != "fanout" && o.mode != "latency" && o.mode != "idle" && o.mode != "channels" && o.mode != "storm" &&
        o.mode != "soak" && o.mode != "pingflood" && o.mode != "slowreaders")
        usage("unknown mode " + o.mode);
    for (int i = 2; i < argc; ++i) {
        const std::string f = argv[i];
        if (i + 1 >= argc) usage("missing value after " + f);
        const std::string v = argv[++i];
        try {
            if (f == "--host") o.host = v;
            else if (f == "--protocol") {
                o.proto_name = v;
                if (v == "imbus") o.proto = protocol::imbus;
                else if (v == "floor") o.proto = protocol::floor;
                else if (v == "ws") o.proto = protocol::ws;
                else if (v == "socketio") o.proto = protocol::socketio;
                else if (v == "uws") o.proto = protocol::uws;
                else if (v == "nchan") o.proto = protocol::nchan;
                else usage("unknown protocol " + v);
            } else if (f == "--port") o.port = std::uint16_t(std::stoul(v));
            else if (f == "--target") o.target = v;
            else if (f == "--channel") o.channel = v, o.channel_given = true;
            else if (f == "--api-key") o.api_key = v;
            else if (f == "--label") o.label = v;
            else if (f == "--subscribers" || f == "--connections" || f == "--readers") o.connections = std::stoul(v);
            else if (f == "--seconds") o.seconds = std::stod(v), o.seconds_given = true;
            else if (f == "--rate") o.rate = std::stod(v), o.rate_given = true;
            else if (f == "--publishers")
                o.publishers = std::max<std::size_t>(1, std::stoul(v)), o.publishers_given = true;
            else if (f == "--payload-bytes") o.payload_bytes = std::stoul(v), o.payload_given = true;
            else if (f == "--window") o.window = std::stoul(v), o.window_given = true;
            else if (f == "--sources") o.sources = std::clamp<std::size_t>(std::stoul(v), 1, 254);
            else if (f == "--connect-concurrency") o.connect_concurrency = std::max<std::size_t>(1, std::stoul(v));
            else if (f == "--away") o.away = std::max<std::size_t>(1, std::stoul(v));
            else if (f == "--storm-concurrency") o.storm_concurrency = std::stoul(v);
            else if (f == "--probe-interval") o.probe_interval = std::max(0.01, std::stod(v));
            else if (f == "--storm-timeout") o.storm_timeout = std::stod(v);
            else if (f == "--drain") o.drain = std::stod(v);
            else if (f == "--drain-max") o.drain_max = std::stod(v);
            else if (f == "--settle") o.settle = std::stod(v);
            else if (f == "--warmup-timeout") o.warmup_timeout = std::stod(v);
            else if (f == "--server-pid") o.server_pid = std::stol(v);
            else if (f == "--trace-slow") o.trace_slow_ms = std::stod(v);
            else if (f == "--shared-rate") o.shared_rate = std::stod(v);
            else if (f == "--churn") o.churn = std::stod(v);
            else if (f == "--rst-fraction") o.rst_fraction = std::stod(v);
            else if (f == "--away-max") o.away_max = std::stod(v);
            else if (f == "--warmup") o.warmup = std::stod(v);
            else if (f == "--rss-tolerance-kib") o.rss_tolerance_kib = std::stol(v);
            else if (f == "--rss-tolerance-pct") o.rss_tolerance_pct = std::stod(v);
            else if (f == "--fd-tolerance") o.fd_tolerance = std::stol(v);
            else if (f == "--rcvbuf") o.rcvbuf = std::stoi(v);
            else if (f == "--mss") o.mss = std::stoi(v);
            else if (f == "--canary-interval-ms") o.canary_interval_ms = std::max(1.0, std::stod(v));
            else if (f == "--canary-channel") o.canary_channel = v;
            else if (f == "--rss-cap-mib") o.rss_cap_mib = std::stol(v);
            else if (f == "--metrics-path") o.metrics_path = v;
            else if (f == "--history") o.history = std::stoul(v);
            else usage("unknown option " + f);
        } catch (const std::logic_error&) {
            usage("bad value for " + f + ": " + v);
        }
    }
    if (o.mode != "idle" && server_ids(o.proto) && o.api_key.empty())
        usage(o.mode + " needs --api-key for " + o.proto_name);
    if (o.mode == "idle" && o.server_pid <= 0) usage("idle needs --server-pid");
    if (o.mode == "soak") {
        if (o.proto != protocol::imbus) usage("soak speaks the imbus protocol only");
        if (o.server_pid <= 0) usage("soak needs --server-pid");
        if (!o.rate_given) o.rate = 200;
        if (o.churn <= 0) o.churn = double(o.connections) / 60;
        if (o.warmup <= 0) o.warmup = o.seconds / 3;
        o.publishers = std::max<std::size_t>(o.publishers, 32);
    }
    if (o.mode == "pingflood" || o.mode == "slowreaders") {
        if (o.proto != protocol::imbus) usage(o.mode + " speaks the imbus protocol only");
        if (o.server_pid <= 0) usage(o.mode + " needs --server-pid");
        if (!o.seconds_given) o.seconds = 30;
        if (!o.channel_given) o.channel = "broadcast";
        if (!o.rate_given) o.rate = 200;
        if (!o.payload_given) o.payload_bytes = 1000;
        if (!o.publishers_given) o.publishers = 32;
        if (o.channel == o.canary_channel) usage("--canary-channel must differ from --channel");
    }
    if (o.mode == "latency" && !o.window_given) o.window = 0;
    if (o.mode == "channels" && !o.window_given) o.window = 1000;
    if (o.storm_concurrency == 0) o.storm_concurrency = o.connections;
    return o;
}

// Reads an HTTP answer into r->response until its Content-Length bytes are in or the server
// closes (EOF after the answer), then calls done(r). R has `sock` and `response`.
template <class R, class Done> void read_http_answer(std::shared_ptr<R> r, Done done) {
    const std::size_t old = r->response.size();
    r->response.resize(old + 4096);
    r->sock.async_read_some(asio::buffer(&r->response[old], 4096), [r, old, done](const asio::error_code& ec,
                                                                                  std::size_t n) mutable {
        r->response.resize(old + (ec ? 0 : n));
        if (ec) return done(r);
        const std::size_t end = r->response.find("\r\n\r\n");
        if (end != std::string::npos) {
            const auto length = wsmini::header_value(std::string_view(r->response.data(), end + 2), "Content-Length");
            if (!length.empty() &&
                r->response.size() >= end + 4 + std::strtoull(std::string(length).c_str(), nullptr, 10))
                return done(r);
        }
        read_http_answer(std::move(r), std::move(done));
    });
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

// TcpExt ListenOverflows + ListenDrops (machine-wide): SYNs or handshakes a full accept queue dropped.
long listen_drops() {
    std::ifstream f("/proc/net/netstat");
    std::string names, values;
    while (std::getline(f, names) && std::getline(f, values)) {
        if (names.rfind("TcpExt:", 0) != 0) continue;
        std::istringstream n(names), v(values);
        std::string name, value;
        long sum = 0;
        while (n >> name && v >> value)
            if (name == "ListenOverflows" || name == "ListenDrops") sum += std::strtol(value.c_str(), nullptr, 10);
        return sum;
    }
    return -1;
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

// The integer after `key` in [p, end), or -1.
std::int64_t int_after(const char* p, const char* end, std::string_view key) {
    const char* k = find(p, end, key);
    if (!k) return -1;
    k += key.size();
    return parse_int(k, end);
}

// A growable bitset of keys relative to a base key.
struct keyset {
    std::vector<std::uint64_t> words;
    // Sets bit i; returns false if it was set already.
    bool insert(std::size_t i) {
        if (i / 64 >= words.size()) words.resize(i / 64 + 1 + words.size() / 2);
        const std::uint64_t bit = std::uint64_t(1) << (i % 64);
        if (words[i / 64] & bit) return false;
        words[i / 64] |= bit;
        return true;
    }
    void clear() { std::vector<std::uint64_t>().swap(words); }
};

struct subscriber {
    explicit subscriber(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string in;       // bytes not yet consumed (partial frame, handshake answer)
    std::string message;  // a fragmented message being assembled
    std::string out, pending;
    std::string key;
    std::string resume_id;           // nchan: the id of the last message (ws+meta.nchan)
    keyset seen;                     // fanout/latency: run keys - base; storm: away keys - lo
    std::vector<std::int64_t> got;   // channels: keys received
    std::vector<std::int64_t> want;  // channels: keys published to this subscriber's channel
    std::int64_t last_key = 0;       // highest key received (imbus: the id to resume from)
    std::int64_t max_run_key = 0;
    std::int64_t caught_up_at = 0;  // storm: when it was live again and had what it would get
    std::uint32_t index = 0;
    std::uint32_t gen = 0;        // bumped when the socket is dropped: old handlers ignore themselves
    std::uint32_t run_count = 0;  // fanout/latency: distinct run keys; storm: distinct away keys
    std::uint32_t dups = 0;
    enum : std::uint8_t { connecting, handshaking, subscribing, open, closed } state = connecting;
    bool writing = false;
    bool warm = false;    // got a warm-up notification
    bool probed = false;  // storm: got a notification published after the reconnect
    bool message_text = false;
};

struct publish_request {
    explicit publish_request(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string request, response;
    std::int64_t start = 0;  // before connect
    std::int64_t seq = 0;
    std::size_t target = 0;  // channels: the subscriber whose channel this goes to
    enum kind_t : std::uint8_t { warm, run, away, probe } kind = run;
};

class loadgen {
public:
    explicit loadgen(options o)
        : o_(std::move(o)), server_(asio::ip::make_address(o_.host), o_.port), poll_(io_), deadline_(io_), pacer_(io_),
          prober_(io_), rng_(std::random_device{}()) {
        subs_.reserve(o_.connections);
        for (std::size_t i = 0; i < o_.connections; ++i) {
            subs_.push_back(std::make_unique<subscriber>(io_));
            subs_.back()->index = std::uint32_t(i);
        }
        const std::string bare = "{\"s\":100000,\"t\":" + std::to_string(now_ns()) + ",\"pad\":\"\"}";
        pad_ = std::string(o_.payload_bytes > bare.size() ? o_.payload_bytes - bare.size() : 0, 'x');
        channels_mode_ = o_.mode == "channels";
        latency_mode_ = o_.mode == "latency";
    }

    int run() {
        if (o_.mode == "idle") rss_before_ = rss_kib(o_.server_pid);
        progress("connecting " + std::to_string(o_.connections) + " subscribers (" + o_.proto_name + ")");
        connect_start_ = now_ns();
        open_more();
        wait_until([this] { return opened_ + failed_ == o_.connections; }, 60 + double(o_.connections) / 200,
                   [this](bool) { connected(); });
        io_.run();
        return exit_code_;
    }

private:
    std::string channel_of(std::size_t i) const { return channels_mode_ ? "u" + std::to_string(i) : o_.channel; }

    // --- phases ---------------------------------------------------------------------------
    void connected() {
        connect_seconds_ = double(now_ns() - connect_start_) / 1e9;
        progress("connected " + std::to_string(opened_) + ", failed " + std::to_string(failed_) + " in " +
                 fmt(connect_seconds_, 2) + " s");
        if (o_.mode == "idle" && server_ids(o_.proto) && o_.api_key.empty()) return settle();  // no warm-up possible
        progress("warm-up publish");
        warm_start_ = now_ns();
        warm_round();
        wait_until([this] { return warm_answers_ > 0 && warm_subs_ >= opened_ - closed_unexpected_ && inflight_ == 0; },
                   o_.warmup_timeout,
                   [this](bool ok) {
                       warm_ok_ = ok;
                       warm_seconds_ = double(now_ns() - warm_start_) / 1e9;
                       progress("warm-up " + std::string(ok ? "reached" : "did NOT reach") + " " +
                                std::to_string(warm_subs_) + "/" + std::to_string(opened_) + " subscribers in " +
                                fmt(warm_seconds_, 2) + " s (" + std::to_string(warm_publishes_) +
                                " warm-up publishes)");
                       if (o_.mode == "idle") return settle();
                       if (!ok) return finish();
                       if (o_.mode == "storm") return storm_leave();
                       start_run();
                   });
    }

    // One warm-up notification per channel (one channel but in channels mode), published again
    // every second to the channels whose subscribers have not seen one yet: a subscribe still
    // in flight when a peer without history got the first would otherwise wait forever.
    void warm_round() {
        if (warm_done_) return;
        if (channels_mode_) {
            for (std::size_t i = 0; i < subs_.size(); ++i)
                if (subs_[i]->state == subscriber::open && !subs_[i]->warm) warm_queue_.push_back(i);
            pump_warm();
        } else if (warm_publishes_ == 0 || warm_subs_ < opened_ - closed_unexpected_) {
            publish(publish_request::warm, 0);
        }
        auto t = std::make_shared<asio::steady_timer>(io_, std::chrono::seconds(1));
        t->async_wait([this, t](const asio::error_code&) {
            if (warm_subs_ < opened_ - closed_unexpected_ && warm_queue_.empty() && inflight_ == 0) warm_round();
            else if (!warm_done_) warm_retry();
        });
    }
    void warm_retry() {
        auto t = std::make_shared<asio::steady_timer>(io_, std::chrono::milliseconds(200));
        t->async_wait([this, t](const asio::error_code&) {
            if (warm_done_) return;
            if (warm_subs_ < opened_ - closed_unexpected_ && warm_queue_.empty() && inflight_ == 0) warm_round();
            else warm_retry();
        });
    }
    void pump_warm() {
        while (!warm_queue_.empty() && inflight_ < std::max<std::size_t>(o_.publishers, 16)) {
            const std::size_t i = warm_queue_.back();
            warm_queue_.pop_back();
            publish(publish_request::warm, i);
        }
    }

    void settle() {
        warm_done_ = true;
        poll_.expires_after(std::chrono::milliseconds(std::int64_t(o_.settle * 1000)));
        poll_.async_wait([this](const asio::error_code&) {
            rss_after_ = rss_kib(o_.server_pid);
            finish();
        });
    }

    void begin_measure() {
        warm_done_ = true;
        self_cpu_start_ = self_cpu_seconds();
        if (o_.server_pid > 0) server_cpu_start_ = cpu_seconds(o_.server_pid);
        // Keys at or below the warm-up's are leftovers; the run's keys start above them.
        base_key_ = server_ids(o_.proto) ? warm_key_ + 1 : 1;
    }

    void start_run() {
        begin_measure();
        progress("publishing for " + fmt(o_.seconds, 1) + " s");
        run_phase_ = true;
        publishing_ = true;
        run_start_ = now_ns();
        deadline_.expires_after(std::chrono::nanoseconds(std::int64_t(o_.seconds * 1e9)));
        deadline_.async_wait([this](const asio::error_code&) {
            publishing_ = false;
            backlog_ = 0;
            run_end_ = now_ns();
            progress("publishing stopped: " + std::to_string(published_ok_) + " published, waiting for answers");
            wait_until([this] { return inflight_ == 0; }, 30,
                       [this](bool) {
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
        const std::uint64_t expected = channels_mode_ ? published_ok_ : published_ok_ * (opened_ - closed_unexpected_);
        const std::int64_t now = now_ns();
        const std::int64_t quiet_since = std::max(last_delivery_, answers_done_);
        if (delivered_run_ >= expected || now - quiet_since > std::int64_t(o_.drain * 1e9) ||
            now - answers_done_ > std::int64_t(o_.drain_max * 1e9))
            return finish();
        poll_.expires_after(std::chrono::milliseconds(5));
        poll_.async_wait([this](const asio::error_code&) { drain(); });
    }

    // --- storm ----------------------------------------------------------------------------
    // Every subscriber drops its connection; once the server had time to notice, --away
    // notifications are published; then all reconnect at once.
    void storm_leave() {
        begin_measure();
        progress("disconnecting " + std::to_string(opened_) + " subscribers");
        for (auto& s : subs_) {
            if (s->state != subscriber::open) continue;
            drop(s.get());
            left_++;
        }
        poll_.expires_after(std::chrono::seconds(1));
        poll_.async_wait([this](const asio::error_code&) {
            progress("publishing " + std::to_string(o_.away) + " notifications while they are away");
            away_start_ = now_ns();
            storm_phase_ = 1;
            pump_away();
            wait_until([this] { return away_requested_ == o_.away && inflight_ == 0; }, 300,
                       [this](bool ok) {
                           away_seconds_ = double(now_ns() - away_start_) / 1e9;
                           if (!ok || away_ok_ != o_.away ||
                               (server_ids(o_.proto) && away_hi_ - away_lo_ + 1 != std::int64_t(o_.away))) {
                               note_error("away publishes: " + std::to_string(away_ok_) + " of " +
                                          std::to_string(o_.away) + " answered");
                               away_failed_ = true;
                               return finish();
                           }
                           if (!server_ids(o_.proto)) away_lo_ = 1, away_hi_ = std::int64_t(o_.away);
                           poll_.expires_after(std::chrono::milliseconds(500));
                           poll_.async_wait([this](const asio::error_code&) { storm_return(); });
                       });
        });
    }

    void pump_away() {
        while (away_requested_ < o_.away && inflight_ < o_.publishers)
            away_requested_++, publish(publish_request::away, 0);
    }

    void storm_return() {
        progress("reconnect storm: " + std::to_string(left_) + " subscribers at once (" +
                 std::to_string(std::min(o_.storm_concurrency, left_)) + " connects in flight at most)");
        storm_phase_ = 2;
        listen_drops_start_ = listen_drops();
        if (o_.server_pid > 0) storm_cpu_start_ = cpu_seconds(o_.server_pid);
        storm_start_ = now_ns();
        opened_before_storm_ = opened_;
        failed_before_storm_ = failed_;
        opened_ = failed_ = 0;
        next_open_ = 0;
        reconnecting_ = true;
        open_more();
        wait_until(
            [this] { return opened_ + failed_ == left_; }, o_.storm_timeout,
            [this](bool) {
                storm_ready_ = now_ns();
                progress("reconnected " + std::to_string(opened_) + " (failed " + std::to_string(failed_) + ") in " +
                         fmt(double(storm_ready_ - storm_start_) / 1e9, 2) + " s; probing until every one is live");
                probe();
                // Done when every client caught up, or when every one is live again and nothing
                // more arrived for --drain seconds (what a resuming server did not send is lost).
                wait_until(
                    [this] {
                        const std::size_t live = opened_ - closed_unexpected_;
                        return caught_up_ >= live ||
                               (probed_ >= live &&
                                now_ns() - std::max(last_delivery_, first_all_probed_) > std::int64_t(o_.drain * 1e9));
                    },
                    std::max(1.0, o_.storm_timeout - double(now_ns() - storm_start_) / 1e9),
                    [this](bool) {
                        storm_end_ = now_ns();
                        prober_.cancel();
                        // Let the last probes' answers come in.
                        wait_until([this] { return inflight_ == 0; }, 10, [this](bool) { finish(); });
                    });
            });
    }

    void probe() {
        if (caught_up_ >= opened_ - closed_unexpected_ || probed_ >= opened_ - closed_unexpected_) return;
        if (inflight_ < o_.publishers) probes_++, publish(publish_request::probe, 0);
        prober_.expires_after(std::chrono::nanoseconds(std::int64_t(o_.probe_interval * 1e9)));
        prober_.async_wait([this](const asio::error_code& ec) {
            if (!ec) probe();
        });
    }

    void check_caught_up(subscriber* s, std::int64_t now) {
        if (s->caught_up_at || !s->probed) return;
        if (resumes(o_.proto) && s->run_count < o_.away) return;
        s->caught_up_at = now;
        caught_up_++;
    }

    // --- publishing -----------------------------------------------------------------------
    void pace() {
        if (!publishing_) return;
        const auto now = std::chrono::steady_clock::now();
        const auto period = std::chrono::nanoseconds(std::int64_t(1e9 / o_.rate));
        while (next_due_ <= now) {
            if (inflight_ < o_.publishers) publish(publish_request::run, 0);
            else backlog_++, late_++, max_backlog_ = std::max(max_backlog_, backlog_);
            next_due_ += period;
        }
        pacer_.expires_at(next_due_);
        pacer_.async_wait([this](const asio::error_code& ec) {
            if (!ec) pace();
        });
    }

    void maybe_publish() {
        if (!warm_done_) return pump_warm();
        if (storm_phase_ == 1) return pump_away();
        if (!publishing_) return;
        if (latency_mode_) {
            while (backlog_ > 0 && inflight_ < o_.publishers) backlog_--, publish(publish_request::run, 0);
            return;
        }
        const std::uint64_t live = channels_mode_ ? 1 : opened_ - closed_unexpected_;
        while (inflight_ < o_.publishers) {
            if (o_.window != 0 && (requested_ - publish_errors_) * live >= delivered_run_ + o_.window * live) break;
            publish(publish_request::run, channels_mode_ ? std::size_t(rng_() % subs_.size()) : 0);
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
        const std::size_t limit = reconnecting_ ? o_.storm_concurrency : o_.connect_concurrency;
        while (next_open_ < subs_.size() && connecting_ < limit) {
            subscriber* s = subs_[next_open_++].get();
            if (reconnecting_ && s->state != subscriber::closed) continue;
            if (reconnecting_ && !s->warm) continue;  // was never up: not part of the storm
            start_subscriber(s);
        }
    }

    std::string handshake_request(subscriber* s) {
        std::string path, extra;
        const std::string ch = channel_of(s->index);
        switch (o_.proto) {
        case protocol::imbus: path = o_.target; break;
        case protocol::floor: path = o_.target + (channels_mode_ ? "&channel=" + ch : ""); break;
        case protocol::ws:
        case protocol::uws: path = "/"; break;
        case protocol::socketio: path = "/socket.io/?EIO=4&transport=websocket"; break;
        case protocol::nchan:
            path = "/sub/" + ch;
            if (o_.mode == "storm") {
                extra = "Sec-WebSocket-Protocol: ws+meta.nchan\r\n";
                if (reconnecting_ && !s->resume_id.empty()) extra += "Last-Event-ID: " + s->resume_id + "\r\n";
            }
            break;
        }
        return "GET " + path + " HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
               "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + s->key +
               "\r\nSec-WebSocket-Version: 13\r\n" + extra + "\r\n";
    }

    std::string subscribe_message(subscriber* s) {
        if (o_.proto == protocol::socketio) return "42[\"subscribe\",\"" + channel_of(s->index) + "\"]";
        const std::int64_t last = reconnecting_ && o_.proto == protocol::imbus ? s->last_key : 0;
        return "{\"event_name\":\"subscribe\",\"data\":{\"channels\":[\"" + channel_of(s->index) +
               "\"],\"last\":" + std::to_string(last) + "}}";
    }

    void start_subscriber(subscriber* s) {
        connecting_++;
        s->state = subscriber::connecting;
        s->in.clear();
        s->message.clear();
        s->writing = false;
        s->out.clear();
        s->pending.clear();
        const std::uint32_t gen = s->gen;
        try {
            open_bound(s->sock, asio::ip::address_v4((127u << 24) | std::uint32_t(1 + s->index % o_.sources)));
        } catch (const std::system_error& e) {
            note_error("subscriber socket: " + std::string(e.what()));
            return asio::post(io_, [this, s] { fail(s); });
        }
        s->sock.async_connect(server_, [this, s, gen](const asio::error_code& ec) {
            if (gen != s->gen) return;
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
            send(s, handshake_request(s));
            arm_read(s);
        });
    }

    // The WebSocket is open and the subscribe is sent (Socket.IO: after its connect packet).
    void ready(subscriber* s) {
        s->state = subscriber::open;
        connecting_--;
        opened_++;
        open_more();
    }

    void fail(subscriber* s) {
        if (s->state == subscriber::closed) return;
        s->state = subscriber::closed;
        s->gen++;
        asio::error_code ignored;
        s->sock.close(ignored);
        connecting_--;
        failed_++;
        open_more();
    }

    void lost(subscriber* s, const std::string& why) {
        if (s->state != subscriber::open) return fail(s);
        s->state = subscriber::closed;
        s->gen++;
        closed_unexpected_++;
        note_error("subscriber lost: " + why);
        asio::error_code ignored;
        s->sock.close(ignored);
    }

    // The client goes away on purpose (storm): no close handshake, like a dropped network.
    void drop(subscriber* s) {
        s->state = subscriber::closed;
        s->gen++;
        asio::error_code ignored;
        s->sock.shutdown(tcp::socket::shutdown_both, ignored);
        s->sock.close(ignored);
        std::string().swap(s->in);
        std::string().swap(s->message);
        s->run_count = 0;
        s->seen.clear();
    }

    void send(subscriber* s, std::string bytes) {
        if (s->writing) {
            s->pending += bytes;
            return;
        }
        s->writing = true;
        s->out = std::move(bytes);
        const std::uint32_t gen = s->gen;
        asio::async_write(s->sock, asio::buffer(s->out), [this, s, gen](const asio::error_code& ec, std::size_t) {
            if (gen != s->gen) return;
            s->writing = false;
            if (ec) return;  // the read side notices
            if (!s->pending.empty()) send(s, std::exchange(s->pending, std::string()));
        });
    }

    void send_text(subscriber* s, std::string_view text) {
        send(s, wsmini::masked_frame(1, text, std::uint32_t(rng_())));
    }

    void arm_read(subscriber* s) {
        const std::uint32_t gen = s->gen;
        s->sock.async_wait(tcp::socket::wait_read, [this, s, gen](const asio::error_code& ec) {
            if (gen != s->gen) return;
            if (ec) {
                if (ec != asio::error::operation_aborted) lost(s, ec.message());
                return;
            }
            readable(s);
        });
    }

    void readable(subscriber* s) {
        const std::int64_t now = now_ns();
        const std::uint32_t gen = s->gen;
        for (int round = 0; round < 16; ++round) {
            if (s->state == subscriber::closed || gen != s->gen) return;
            asio::error_code ec;
            const std::size_t n = s->sock.read_some(asio::buffer(buf_), ec);
            if (ec == asio::error::would_block || ec == asio::error::try_again) return arm_read(s);
            if (ec) return lost(s, ec.message());
            feed(s, buf_, n, now);
            // A short read emptied the socket: the next arrival is a new edge, reported to the
            // wait armed here (before this handler returns). Saves the EAGAIN read.
            if (n < sizeof buf_) {
                if (s->state != subscriber::closed && gen == s->gen) arm_read(s);
                return;
            }
        }
        asio::post(io_, [this, s, gen] {
            if (gen == s->gen) readable(s);
        });  // let the other connections run
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
            if (head.rfind("HTTP/1.1 101", 0) != 0 ||
                wsmini::header_value(head, "Sec-WebSocket-Accept") != wsmini::accept_key(s->key)) {
                note_error("handshake refused: " + std::string(head.substr(0, head.find("\r\n"))));
                return fail(s);
            }
            s->in.erase(0, end + 4);
            s->state = subscriber::subscribing;
            if (o_.proto != protocol::socketio) {
                if (o_.proto != protocol::nchan) send_text(s, subscribe_message(s));
                ready(s);
            }
            const std::size_t used = frames(s, s->in.data(), s->in.size(), now);
            s->in.erase(0, used);
            return;
        }
        if (s->in.empty()) {
            const std::size_t used = frames(s, data, n, now);
            if (used < n && s->state != subscriber::closed) s->in.assign(data + used, n - used);
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
        const std::uint32_t gen = s->gen;
        while (n - off >= 2 && (s->state == subscriber::open || s->state == subscriber::subscribing) && gen == s->gen) {
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
            off += h + mask + len;
            frame(s, (b0 & 0x80) != 0, b0 & 0x0f, p, std::size_t(len), now);
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
            lost(s, "server closed with " + std::to_string(code) + " " +
                        std::string(p + std::min<std::size_t>(len, 2), len > 2 ? len - 2 : 0));
            break;
        }
        case 0x9: send(s, wsmini::masked_frame(0xA, std::string_view(p, len), std::uint32_t(rng_()))); break;
        default: break;
        }
    }

    // One text message, by protocol.
    void text(subscriber* s, const char* p, std::size_t len, std::int64_t now) {
        const char* end = p + len;
        switch (o_.proto) {
        case protocol::imbus:
        case protocol::floor: {
            // A JSON array of {"id":N,"message":{...}} elements.
            static constexpr std::string_view id_key = "{\"id\":";
            const char* e = find(p, end, id_key);
            bool counted = false;
            while (e) {
                const char* q = e + id_key.size();
                const std::int64_t id = parse_int(q, end);
                const char* next = find(q, end, id_key);
                const char* element_end = next ? next : end;
                if (id <= s->last_key && find(q, element_end, "bus/missed_notifications")) {
                    missed_markers_++;
                } else {
                    counted |= notification(s, id, q, element_end, now, !counted);
                }
                e = next;
            }
            break;
        }
        case protocol::ws:
        case protocol::uws: notification(s, int_after(p, end, "\"s\":"), p, end, now, true); break;
        case protocol::nchan:
            if (len >= 4 && std::memcmp(p, "id: ", 4) == 0) {  // ws+meta.nchan: "id: X\n[content-type: Y\n]\n<data>"
                const char* nl = static_cast<const char*>(memchr(p, '\n', len));
                if (nl) s->resume_id.assign(p + 4, nl);
            }
            notification(s, int_after(p, end, "\"s\":"), p, end, now, true);
            break;
        case protocol::socketio:
            // Engine.IO packet types: 0 open, 1 close, 2 ping, 3 pong, 4 message (+ Socket.IO type).
            if (len == 0) break;
            if (p[0] == '2') {
                send_text(s, "3");
            } else if (p[0] == '0') {
                send_text(s, "40");  // connect to the main namespace
            } else if (len >= 2 && p[0] == '4' && p[1] == '0') {
                if (s->state == subscriber::subscribing) {
                    send_text(s, subscribe_message(s));
                    ready(s);
                }
            } else if (len >= 2 && p[0] == '4' && p[1] == '2') {
                notification(s, int_after(p, end, "\"s\":"), p, end, now, true);
            } else if (p[0] == '1' || (len >= 2 && p[0] == '4' && (p[1] == '1' || p[1] == '4'))) {
                lost(s, "socket.io closed: " + std::string(p, std::min<std::size_t>(len, 80)));
            }
            break;
        }
    }

    // One notification with key `key`; its payload is somewhere in [p, end).
    // Returns true if it counted as a delivery of the timed phase.
    bool notification(subscriber* s, std::int64_t key, const char* p, const char* end, std::int64_t now,
                      bool new_frame) {
        if (key < 0) return false;
        // A warm-up notification: any id on a fresh imbus (or floor) server, the sequence number 0
        // elsewhere (nchan replays what it buffered to a new subscriber).
        if (!s->warm && (server_ids(o_.proto) || key == 0)) s->warm = true, warm_subs_++;
        const bool in_order = key > s->last_key;
        if (in_order) s->last_key = key;
        if (storm_phase_ == 2) return storm_notification(s, key, now), false;
        if (!run_phase_ || key < base_key_) return false;
        if (channels_mode_) {
            s->got.push_back(key);
        } else {
            if (!s->seen.insert(std::size_t(key - base_key_))) {
                s->dups++, dups_++;
                return false;
            }
            if (!in_order && server_ids(o_.proto)) out_of_order_++;  // imbus promises ascending ids
            s->run_count++;
            s->max_run_key = std::max(s->max_run_key, key);
        }
        if (new_frame) frames_++;
        delivered_run_++;
        last_delivery_ = now;
        const std::int64_t sent = int_after(p, end, "\"t\":");
        if (sent > 0) {
            const std::int64_t took = std::max<std::int64_t>(0, now - sent);
            latency_.add(std::uint64_t(took) / 1000);
            if (o_.trace_slow_ms > 0 && double(took) / 1e6 > o_.trace_slow_ms)
                std::cerr << "slow: key " << key << " subscriber " << s->index << " " << fmt(double(took) / 1e6, 3)
                          << " ms, sent " << fmt(double(sent - run_start_) / 1e6, 3) << " ms after the run's start\n";
        }
        if (publishing_ && !latency_mode_) maybe_publish();
        return true;
    }

    void storm_notification(subscriber* s, std::int64_t key, std::int64_t now) {
        if (key >= away_lo_ && key <= away_hi_) {
            if (!s->seen.insert(std::size_t(key - away_lo_))) {
                s->dups++, dups_++;
                return;
            }
            s->run_count++;
            storm_delivered_++;
        } else if (key > away_hi_ && !s->probed) {
            s->probed = true;
            if (++probed_ == opened_ - closed_unexpected_) first_all_probed_ = now;
        }
        last_delivery_ = now;
        check_caught_up(s, now);
    }

    // --- publisher ------------------------------------------------------------------------
    std::string payload(std::int64_t seq) const {
        return "{\"s\":" + std::to_string(seq) + ",\"t\":" + std::to_string(now_ns()) + ",\"pad\":\"" + pad_ + "\"}";
    }

    std::string publish_request_text(const std::string& channel, std::int64_t seq) const {
        std::string path, auth, body;
        switch (o_.proto) {
        case protocol::imbus:
        case protocol::floor:
            path = "/bus/send";
            auth = "Authorization: Bearer " + o_.api_key + "\r\n";
            body = "{\"channel\":\"" + channel + "\",\"type\":\"b\",\"payload\":" + payload(seq) + "}";
            break;
        case protocol::ws:
        case protocol::socketio:
        case protocol::uws:
            path = "/publish";
            body = "{\"channel\":\"" + channel + "\",\"payload\":" + payload(seq) + "}";
            break;
        case protocol::nchan:
            path = "/pub/" + channel;
            body = payload(seq);
            break;
        }
        return "POST " + path + " HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) + "\r\n" + auth +
               "Content-Type: application/json\r\nConnection: close\r\nContent-Length: " + std::to_string(body.size()) +
               "\r\n\r\n" + body;
    }

    void publish(publish_request::kind_t kind, std::size_t target) {
        inflight_++;
        if (kind == publish_request::run) requested_++;
        if (kind == publish_request::warm) warm_publishes_++;
        auto r = std::make_shared<publish_request>(io_);
        r->kind = kind;
        r->target = target;
        r->seq = kind == publish_request::warm ? 0 : ++seq_;
        r->start = now_ns();
        try {
            open_bound(r->sock,
                       asio::ip::address_v4((127u << 24) | (1u << 8) | std::uint32_t(1 + publish_counter_++ % 16)));
        } catch (const std::system_error& e) {
            // Later, so that a failing socket() cannot recurse through maybe_publish().
            return asio::post(io_,
                              [this, r, what = std::string(e.what())] { published(r, "publisher socket: " + what); });
        }
        r->sock.async_connect(server_, [this, r](const asio::error_code& ec) {
            if (ec) return published(r, "publisher connect: " + ec.message());
            asio::error_code ignored;
            r->sock.set_option(tcp::no_delay(true), ignored);
            r->request = publish_request_text(channel_of(r->target), r->seq);
            asio::async_write(r->sock, asio::buffer(r->request), [this, r](const asio::error_code& ec, std::size_t) {
                if (ec) return published(r, "publisher write: " + ec.message());
                read_answer(r);
            });
        });
    }

    void read_answer(std::shared_ptr<publish_request> r) {
        read_http_answer(std::move(r), [this](const std::shared_ptr<publish_request>& done) { published(done, ""); });
    }

    void published(const std::shared_ptr<publish_request>& r, const std::string& error) {
        inflight_--;
        asio::error_code ignored;
        r->sock.close(ignored);
        std::int64_t key = -1;
        if (error.empty()) {
            if (server_ids(o_.proto)) {
                const std::size_t ids = r->response.find("\"ids\":[");
                if (r->response.rfind("HTTP/1.1 200", 0) == 0 && ids != std::string::npos) {
                    const char* p = r->response.data() + ids + 7;
                    key = parse_int(p, r->response.data() + r->response.size());
                    if (key <= 0) key = -1;
                }
            } else if (r->response.rfind("HTTP/1.1 2", 0) == 0) {
                key = r->seq;
            }
        }
        if (key < 0) {
            if (r->kind == publish_request::run) publish_errors_++;
            if (r->kind == publish_request::away) away_errors_++;
            note_error(error.empty() ? "publish answered: " + r->response.substr(0, r->response.find("\r\n")) : error);
        } else {
            switch (r->kind) {
            case publish_request::warm:
                warm_key_ = std::max(warm_key_, key);
                warm_answers_++;
                break;
            case publish_request::run:
                published_ok_++;
                post_latency_.add(std::uint64_t(now_ns() - r->start) / 1000);
                min_published_ = min_published_ == 0 ? key : std::min(min_published_, key);
                max_published_ = std::max(max_published_, key);
                if (channels_mode_) subs_[r->target]->want.push_back(key);
                break;
            case publish_request::away:
                away_ok_++;
                away_lo_ = away_lo_ == 0 ? key : std::min(away_lo_, key);
                away_hi_ = std::max(away_hi_, key);
                break;
            case publish_request::probe: break;
            }
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
    static std::string ms(std::uint64_t us) { return fmt(double(us) / 1000.0, 3); }

    void finish() {
        const double self_cpu = self_cpu_seconds() - self_cpu_start_;
        const double server_cpu =
            o_.server_pid > 0 && server_cpu_start_ >= 0 ? cpu_seconds(o_.server_pid) - server_cpu_start_ : -1;
        std::ostringstream j, h;
        j << "{\"mode\":\"" << o_.mode << "\",\"protocol\":\"" << o_.proto_name << "\",\"label\":\""
          << json_escape(o_.label) << "\",\"connections\":" << o_.connections
          << ",\"opened\":" << (o_.mode == "storm" ? opened_before_storm_ : opened_)
          << ",\"connect_failures\":" << (o_.mode == "storm" ? failed_before_storm_ : failed_)
          << ",\"connect_seconds\":" << fmt(connect_seconds_, 3) << ",\"closed_by_server\":" << closed_unexpected_
          << ",\"warmup_ok\":" << (warm_ok_ ? "true" : "false") << ",\"warmup_seconds\":" << fmt(warm_seconds_, 3);
        bool ok = failed_ == 0 && closed_unexpected_ == 0;
        if (o_.mode == "idle") {
            ok = ok && rss_before_ > 0 && rss_after_ > 0 &&
                 (o_.api_key.empty() && server_ids(o_.proto) ? true : warm_ok_);
            const double per = opened_ ? double(rss_after_ - rss_before_) / double(opened_) : 0;
            j << ",\"rss_before_kib\":" << rss_before_ << ",\"rss_after_kib\":" << rss_after_
              << ",\"kib_per_connection\":" << fmt(per, 2);
            h << "# idle " << o_.label << ": " << opened_ << " connections, server RSS " << rss_before_ << " -> "
              << rss_after_ << " KiB = " << fmt(per, 2) << " KiB/connection";
        } else if (o_.mode == "storm") {
            report_storm(j, h, ok, server_cpu);
        } else {
            report_run(j, h, ok, self_cpu, server_cpu);
        }
        j << ",\"ok\":" << (ok ? "true" : "false") << "}";
        std::cout << j.str() << "\n" << h.str() << std::endl;
        exit_code_ = ok ? 0 : 1;
        io_.stop();
    }

    void report_run(std::ostringstream& j, std::ostringstream& h, bool& ok, double self_cpu, double server_cpu) {
        const std::uint64_t live = opened_ - closed_unexpected_;
        const std::uint64_t expected = channels_mode_ ? published_ok_ : published_ok_ * live;
        std::uint64_t incomplete = 0, lost = 0;
        bool contiguous = true;
        if (channels_mode_) {
            // Per subscriber: the keys received are exactly those published to its channel.
            for (auto& s : subs_) {
                std::sort(s->got.begin(), s->got.end());
                std::sort(s->want.begin(), s->want.end());
                const std::size_t before = s->got.size();
                s->got.erase(std::unique(s->got.begin(), s->got.end()), s->got.end());
                dups_ += before - s->got.size();
                if (s->got != s->want) {
                    incomplete++;
                    std::vector<std::int64_t> missing;
                    std::set_difference(s->want.begin(), s->want.end(), s->got.begin(), s->got.end(),
                                        std::back_inserter(missing));
                    lost += missing.size();
                }
            }
        } else {
            std::int64_t lo = min_published_, hi = max_published_;
            contiguous = published_ok_ == 0 || std::uint64_t(hi - lo + 1) == published_ok_;
            if (server_ids(o_.proto)) contiguous = contiguous && (published_ok_ == 0 || lo == base_key_);
            else contiguous = contiguous && (published_ok_ == 0 || lo == 1);
            for (const auto& s : subs_) {
                if (s->state != subscriber::open) continue;
                const bool exact =
                    s->run_count == published_ok_ && s->dups == 0 && (published_ok_ == 0 || s->max_run_key == hi);
                if (!exact) incomplete++, lost += published_ok_ > s->run_count ? published_ok_ - s->run_count : 0;
            }
        }
        ok = ok && warm_ok_ && incomplete == 0 && dups_ == 0 && out_of_order_ == 0 && contiguous && published_ok_ > 0 &&
             publish_errors_ == 0;
        const double publish_s = double(run_end_ - run_start_) / 1e9;
        const double deliver_s = double(std::max(last_delivery_, run_start_ + 1) - run_start_) / 1e9;
        const double dps = double(delivered_run_) / deliver_s;
        const double drain_s = last_delivery_ > answers_done_ ? double(last_delivery_ - answers_done_) / 1e9 : 0.0;
        j << ",\"seconds\":" << fmt(o_.seconds, 1) << ",\"publishers\":" << o_.publishers;
        if (o_.mode == "latency")
            j << ",\"rate\":" << fmt(o_.rate, 1) << ",\"late_publishes\":" << late_
              << ",\"max_backlog\":" << max_backlog_;
        else j << ",\"window\":" << o_.window;
        j << ",\"published\":" << published_ok_ << ",\"publish_errors\":" << publish_errors_
          << ",\"published_per_s\":" << fmt(double(published_ok_) / publish_s, 1) << ",\"expected\":" << expected
          << ",\"delivered\":" << delivered_run_ << ",\"deliveries_per_s\":" << fmt(dps, 1)
          << ",\"drain_after_last_answer_s\":" << fmt(drain_s, 3) << ",\"subscribers_incomplete\":" << incomplete
          << ",\"lost\":" << lost << ",\"duplicates\":" << dups_ << ",\"out_of_order\":" << out_of_order_
          << ",\"missed_markers\":" << missed_markers_ << ",\"keys_contiguous\":" << (contiguous ? "true" : "false")
          << ",\"lat_p50_ms\":" << ms(latency_.percentile(50)) << ",\"lat_p99_ms\":" << ms(latency_.percentile(99))
          << ",\"lat_max_ms\":" << ms(latency_.max) << ",\"lat_samples\":" << latency_.count
          << ",\"post_p50_ms\":" << ms(post_latency_.percentile(50))
          << ",\"post_p99_ms\":" << ms(post_latency_.percentile(99)) << ",\"post_max_ms\":" << ms(post_latency_.max)
          << ",\"frames\":" << frames_
          << ",\"notifications_per_frame\":" << fmt(frames_ ? double(delivered_run_) / double(frames_) : 0.0, 2)
          << ",\"loadgen_cpu_s\":" << fmt(self_cpu, 2) << ",\"server_cpu_s\":" << fmt(server_cpu, 2)
          << ",\"elapsed_s\":" << fmt(double(now_ns() - run_start_) / 1e9, 2);
        h << "# " << o_.mode << " " << o_.label << ": " << live << " subscribers, " << published_ok_ << " published ("
          << fmt(double(published_ok_) / publish_s, 0) << "/s), " << delivered_run_ << "/" << expected << " delivered ("
          << fmt(dps, 0) << "/s, last one " << fmt(drain_s, 2) << " s after the last publish answer), latency p50 "
          << ms(latency_.percentile(50)) << " ms, p99 " << ms(latency_.percentile(99)) << " ms, max "
          << ms(latency_.max) << " ms, POST answered in p50 " << ms(post_latency_.percentile(50)) << " ms, p99 "
          << ms(post_latency_.percentile(99)) << " ms, "
          << (ok ? "every subscriber got every notification once" : "INCOMPLETE") << " (incomplete " << incomplete
          << ", lost " << lost << ", duplicates " << dups_ << ", out of order " << out_of_order_ << ", publish errors "
          << publish_errors_ << ", closed " << closed_unexpected_ << "), "
          << fmt(frames_ ? double(delivered_run_) / double(frames_) : 0.0, 2) << " notifications/frame, CPU s: loadgen "
          << fmt(self_cpu, 2) << ", server " << fmt(server_cpu, 2);
    }

    void report_storm(std::ostringstream& j, std::ostringstream& h, bool& ok, double) {
        const std::uint64_t live = opened_ - closed_unexpected_;
        std::uint64_t lost = 0, not_live = 0, not_caught_up = 0;
        std::vector<double> times;
        for (const auto& s : subs_) {
            if (!s->warm) continue;  // never was up
            lost += o_.away > s->run_count ? o_.away - s->run_count : 0;
            if (s->state != subscriber::open || !s->probed) not_live++;
            else if (!s->caught_up_at) not_caught_up++;  // live, but the server did not send all it missed
            else times.push_back(double(s->caught_up_at - storm_start_) / 1e9);
        }
        std::sort(times.begin(), times.end());
        auto pct = [&](double p) {
            return times.empty() ? 0.0 : times[std::size_t(p / 100.0 * double(times.size() - 1))];
        };
        const double all_s = not_live == 0 && not_caught_up == 0 && !times.empty() ? times.back() : -1;
        const double reconnect_s = storm_ready_ > storm_start_ ? double(storm_ready_ - storm_start_) / 1e9 : -1;
        const long drops = listen_drops_start_ >= 0 ? listen_drops() - listen_drops_start_ : -1;
        const double storm_cpu =
            o_.server_pid > 0 && storm_cpu_start_ >= 0 ? cpu_seconds(o_.server_pid) - storm_cpu_start_ : -1;
        const bool resume = resumes(o_.proto);
        ok = ok && warm_ok_ && !away_failed_ && left_ > 0 && live == left_ && not_live == 0 && dups_ == 0 &&
             (!resume || lost == 0);
        j << ",\"away\":" << o_.away << ",\"away_published\":" << away_ok_
          << ",\"away_seconds\":" << fmt(away_seconds_, 3) << ",\"reconnected\":" << opened_
          << ",\"reconnect_failures\":" << failed_ << ",\"reconnect_s\":" << fmt(reconnect_s, 3)
          << ",\"resumes\":" << (resume ? "true" : "false") << ",\"caught_up_p50_s\":" << fmt(pct(50), 3)
          << ",\"caught_up_p99_s\":" << fmt(pct(99), 3) << ",\"caught_up_all_s\":" << fmt(all_s, 3)
          << ",\"not_live\":" << not_live << ",\"not_caught_up\":" << not_caught_up
          << ",\"expected\":" << std::uint64_t(o_.away) * left_ << ",\"delivered\":" << storm_delivered_
          << ",\"lost\":" << lost << ",\"duplicates\":" << dups_ << ",\"probes\":" << probes_
          << ",\"listen_drops\":" << drops << ",\"server_cpu_s\":" << fmt(storm_cpu, 2)
          << ",\"elapsed_s\":" << fmt(double(storm_end_ - storm_start_) / 1e9, 2);
        h << "# storm " << o_.label << ": " << left_ << " clients away while " << away_ok_ << " were published; "
          << opened_ << " reconnected in " << fmt(reconnect_s, 2) << " s (listen drops " << drops << "), caught up p50 "
          << fmt(pct(50), 2) << " s, all "
          << (all_s < 0 ? "NEVER (" + std::to_string(not_live) + " not live, " + std::to_string(not_caught_up) +
                              " live but missing some)"
                        : fmt(all_s, 2) + " s")
          << ", lost " << lost << " of " << std::uint64_t(o_.away) * left_ << (resume ? "" : " (no resume)")
          << ", duplicates " << dups_ << ", server CPU " << fmt(storm_cpu, 2) << " s" << (ok ? "" : "  FAILED");
    }

    options o_;
    asio::io_context io_{1};
    tcp::endpoint server_;
    asio::steady_timer poll_, deadline_, pacer_, prober_;
    std::minstd_rand rng_;
    std::vector<std::unique_ptr<subscriber>> subs_;
    std::string pad_;
    bool channels_mode_ = false, latency_mode_ = false;
    char buf_[65536];

    std::size_t next_open_ = 0, connecting_ = 0, opened_ = 0, failed_ = 0, closed_unexpected_ = 0;
    std::size_t warm_subs_ = 0, warm_answers_ = 0, warm_publishes_ = 0;
    std::vector<std::size_t> warm_queue_;
    std::int64_t warm_key_ = 0, base_key_ = 1, seq_ = 0;
    bool warm_ok_ = false, warm_done_ = false, run_phase_ = false, publishing_ = false;
    std::size_t inflight_ = 0, publish_counter_ = 0;
    std::uint64_t requested_ = 0, published_ok_ = 0, publish_errors_ = 0;
    std::int64_t min_published_ = 0, max_published_ = 0;
    std::uint64_t delivered_run_ = 0, dups_ = 0, out_of_order_ = 0, missed_markers_ = 0;
    std::uint64_t backlog_ = 0, max_backlog_ = 0, late_ = 0;
    std::chrono::steady_clock::time_point next_due_;
    std::int64_t connect_start_ = 0, warm_start_ = 0, run_start_ = 0, run_end_ = 0, answers_done_ = 0,
                 last_delivery_ = 0;
    double connect_seconds_ = 0, warm_seconds_ = 0;
    long rss_before_ = -1, rss_after_ = -1;
    histogram latency_;
    histogram post_latency_;    // publish: connect + POST + answer
    std::uint64_t frames_ = 0;  // text frames with at least one counted notification
    double self_cpu_start_ = 0, server_cpu_start_ = -1;
    std::size_t errors_shown_ = 0;
    int exit_code_ = 1;

    // storm
    int storm_phase_ = 0;  // 1: publishing while away, 2: reconnected
    bool reconnecting_ = false, away_failed_ = false;
    std::size_t left_ = 0, away_requested_ = 0, away_ok_ = 0, away_errors_ = 0, caught_up_ = 0,
                opened_before_storm_ = 0, failed_before_storm_ = 0;
    std::uint64_t probes_ = 0, storm_delivered_ = 0;
    std::size_t probed_ = 0;
    std::int64_t first_all_probed_ = 0;
    std::int64_t away_lo_ = 0, away_hi_ = 0, away_start_ = 0, storm_start_ = 0, storm_ready_ = 0, storm_end_ = 0;
    double away_seconds_ = 0, storm_cpu_start_ = -1;
    long listen_drops_start_ = -1;
};

// --- soak -------------------------------------------------------------------------------------

// Open file descriptors of a process (entries of /proc/PID/fd); -1 if unknown.
long fd_count(long pid) {
    DIR* d = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
    if (!d) return -1;
    long n = 0;
    while (const dirent* e = readdir(d))
        if (e->d_name[0] != '.') ++n;
    closedir(d);
    return n;
}

// A set of ids summarized by order-independent hashing: two sets of distinct ids with the
// same count and the same sum of mixed ids are equal (barring a 2^-64 accident).
std::uint64_t mix(std::int64_t id) {
    std::uint64_t z = std::uint64_t(id) + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

struct soak_connection {
    explicit soak_connection(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string in, message, out, pending, key;
    std::int64_t first_last = 0;  // `last` of its first subscribe: ids above it on its channels are due
    std::int64_t last = 0;        // the highest id received
    std::uint64_t count = 0;      // ids received (distinct, as they must ascend)
    std::uint64_t hash = 0;       // sum of mix(id) over them
    std::uint32_t index = 0, gen = 0, drops = 0;
    enum : std::uint8_t { idle, connecting, handshaking, open, away } state = idle;
    bool writing = false, message_text = false;
};

// Everything of the soak mode; shares only the helpers above with class loadgen.
class soak {
public:
    explicit soak(options o)
        : o_(std::move(o)), server_(asio::ip::make_address(o_.host), o_.port), tick_(io_), churn_timer_(io_),
          sampler_(io_), step_(io_), rng_(std::random_device{}()) {
        for (std::size_t i = 0; i < o_.connections; ++i) {
            conns_.push_back(std::make_unique<soak_connection>(io_));
            conns_.back()->index = std::uint32_t(i);
        }
        personal_ids_.resize(o_.connections);
        pad_ = std::string(std::max<std::size_t>(o_.payload_bytes, 40) - 40, 'x');
    }

    int run() {
        fd_idle_ = fd_count(o_.server_pid);
        rss_idle_ = rss_kib(o_.server_pid);
        progress("server idle: RSS " + std::to_string(rss_idle_) + " KiB, " + std::to_string(fd_idle_) + " fds");
        sample();
        // A first id, so that every first subscribe names a real `last` (0 would mean the
        // 50 s first-poll window, and rows from before the subscribe).
        publish(-2);
        wait_for([this] { return inflight_ == 0; }, 30,
                 [this](bool ok) {
                     if (!ok || newest_answered_ == 0) return fail_early("the first publish was not answered");
                     progress("connecting " + std::to_string(conns_.size()) + " connections");
                     connect_start_ = now_ns();
                     open_more();
                     wait_for([this] { return opened_ == conns_.size(); }, 60 + double(conns_.size()) / 100,
                              [this](bool ok) {
                                  if (!ok) return fail_early("only " + std::to_string(opened_) + " connections opened");
                                  progress("connected in " + fmt(double(now_ns() - connect_start_) / 1e9, 2) +
                                           " s; first shared publish");
                                  publish(-1);  // proves every subscribe was processed
                                  wait_for([this] { return with_data() == conns_.size(); }, 60,
                                           [this](bool ok) {
                                               if (!ok)
                                                   return fail_early(std::to_string(with_data()) +
                                                                     " connections got the first shared notification");
                                               steady();
                                           });
                              });
                 });
        io_.run();
        return exit_code_;
    }

private:
    static std::string fmt(double v, int digits) {
        char b[64];
        std::snprintf(b, sizeof b, "%.*f", digits, v);
        return b;
    }
    void progress(const std::string& what) { std::cerr << "ws_loadgen [soak] " << what << std::endl; }
    void note_error(const std::string& what) {
        if (errors_shown_++ < 10) std::cerr << "ws_loadgen [soak] " << what << std::endl;
    }

    std::size_t with_data() const {
        std::size_t n = 0;
        for (const auto& c : conns_) n += c->count > 0;
        return n;
    }

    // Calls then(true) once pred() holds, or then(false) after timeout seconds.
    void wait_for(std::function<bool()> pred, double timeout, std::function<void(bool)> then) {
        const std::int64_t until = now_ns() + std::int64_t(timeout * 1e9);
        auto step = std::make_shared<std::function<void()>>();
        *step = [this, pred = std::move(pred), then = std::move(then), until, step]() {
            if (pred()) return then(true);
            if (now_ns() >= until) return then(false);
            step_.expires_after(std::chrono::milliseconds(10));
            step_.async_wait([step](const asio::error_code&) { (*step)(); });
        };
        (*step)();
    }

    // --- phases -------------------------------------------------------------------------------
    void steady() {
        progress("soak for " + fmt(o_.seconds, 0) + " s: " + fmt(o_.rate, 0) + " personal + " + fmt(o_.shared_rate, 1) +
                 " shared publishes/s, " + fmt(o_.churn, 1) + " drops/s; RSS baseline at " + fmt(o_.warmup, 0) + " s");
        run_start_ = now_ns();
        running_ = true;
        pace();
        churn();
    }

    void pace() {
        if (!running_) return;
        const double elapsed = double(now_ns() - run_start_) / 1e9;
        if (elapsed >= o_.seconds) return stop_running();
        if (!warm_ && elapsed >= o_.warmup) {
            warm_ = true;
            rss_warm_ = rss_kib(o_.server_pid);
            progress("warm-up over: server RSS " + std::to_string(rss_warm_) + " KiB, " +
                     std::to_string(fd_count(o_.server_pid)) + " fds");
        }
        while (double(personal_requested_) < elapsed * o_.rate ||
               double(shared_requested_) < elapsed * o_.shared_rate) {
            if (inflight_ >= o_.publishers) {
                late_++;
                break;
            }
            if (double(shared_requested_) < elapsed * o_.shared_rate) shared_requested_++, publish(-1);
            else personal_requested_++, publish(long(rng_() % conns_.size()));
        }
        tick_.expires_after(std::chrono::milliseconds(5));
        tick_.async_wait([this](const asio::error_code&) { pace(); });
    }

    void churn() {
        if (!running_) return;
        churn_credit_ += o_.churn / 10;
        for (; churn_credit_ >= 1; churn_credit_ -= 1) {
            soak_connection* c = conns_[rng_() % conns_.size()].get();
            if (c->state == soak_connection::open) drop(c);
        }
        churn_timer_.expires_after(std::chrono::milliseconds(100));
        churn_timer_.async_wait([this](const asio::error_code&) { churn(); });
    }

    void stop_running() {
        running_ = false;
        rss_end_ = rss_kib(o_.server_pid);
        run_seconds_ = double(now_ns() - run_start_) / 1e9;
        progress("publishing and churn stopped after " + fmt(run_seconds_, 1) + " s; server RSS " +
                 std::to_string(rss_end_) + " KiB; waiting for answers, returns and deliveries");
        wait_for([this] { return inflight_ == 0 && not_open() == 0; }, 60,
                 [this](bool) {
                     answers_done_ = now_ns();
                     prepare_expected();
                     drain();
                 });
    }

    std::size_t not_open() const {
        std::size_t n = 0;
        for (const auto& c : conns_) n += c->state != soak_connection::open;
        return n;
    }

    // Until every connection has its due, or nothing arrived for --drain seconds, or --drain-max.
    void drain() {
        const std::int64_t now = now_ns();
        if (complete() || now - std::max(last_delivery_, answers_done_) > std::int64_t(o_.drain * 1e9) ||
            now - answers_done_ > std::int64_t(o_.drain_max * 1e9))
            return close_all();
        step_.expires_after(std::chrono::milliseconds(20));
        step_.async_wait([this](const asio::error_code&) { drain(); });
    }

    // Every connection closes cleanly (FIN); the server's fds must return to the idle baseline.
    void close_all() {
        verify();
        progress("closing every connection; waiting for the server's fds to return to " + std::to_string(fd_idle_));
        closing_ = true;
        for (auto& c : conns_) {
            c->gen++;
            asio::error_code ignored;
            c->sock.close(ignored);
            c->state = soak_connection::idle;
        }
        settle_fds(now_ns() + 30'000'000'000, -1);
    }

    // Until the fd count is within the tolerance and the same for half a second (closes done).
    void settle_fds(std::int64_t until, long previous) {
        fd_end_ = fd_count(o_.server_pid);
        if ((fd_end_ <= fd_idle_ + o_.fd_tolerance && fd_end_ == previous) || now_ns() >= until) {
            rss_closed_ = rss_kib(o_.server_pid);
            return finish();
        }
        step_.expires_after(std::chrono::milliseconds(500));
        step_.async_wait([this, until](const asio::error_code&) { settle_fds(until, fd_end_); });
    }

    void fail_early(const std::string& why) {
        note_error(why);
        early_failure_ = why;
        finish();
    }

    // --- the server's RSS and fds, every second -----------------------------------------------
    void sample() {
        const long rss = rss_kib(o_.server_pid), fds = fd_count(o_.server_pid);
        rss_max_ = std::max(rss_max_, rss);
        fd_max_ = std::max(fd_max_, fds);
        samples_++;
        if (running_ && samples_ % 10 == 0)
            progress("t=" + fmt(double(now_ns() - run_start_) / 1e9, 0) + " s: RSS " + std::to_string(rss) + " KiB, " +
                     std::to_string(fds) + " fds, " + std::to_string(published_) + " published, " +
                     std::to_string(delivered_) + " delivered, " + std::to_string(drops_) + " drops");
        sampler_.expires_after(std::chrono::seconds(1));
        sampler_.async_wait([this](const asio::error_code& ec) {
            if (!ec) sample();
        });
    }

    // --- connections --------------------------------------------------------------------------
    void open_more() {
        while (next_open_ < conns_.size() && connecting_ < o_.connect_concurrency) start(conns_[next_open_++].get());
    }

    void start(soak_connection* c) {
        c->state = soak_connection::connecting;
        connecting_++;
        c->in.clear();
        c->message.clear();
        c->out.clear();
        c->pending.clear();
        c->writing = false;
        const std::uint32_t gen = c->gen;
        try {
            open_bound(c->sock, asio::ip::address_v4((127u << 24) | std::uint32_t(1 + c->index % o_.sources)));
        } catch (const std::system_error& e) {
            note_error("socket: " + std::string(e.what()));
            return asio::post(io_, [this, c, gen] { retry(c, gen); });
        }
        c->sock.async_connect(server_, [this, c, gen](const asio::error_code& ec) {
            if (gen != c->gen) return;
            if (ec) {
                note_error("connect: " + ec.message());
                return retry(c, gen);
            }
            asio::error_code ignored;
            c->sock.set_option(tcp::no_delay(true), ignored);
            c->sock.non_blocking(true, ignored);
            std::string raw(16, '\0');
            for (auto& ch : raw) ch = char(rng_());
            c->key = wsmini::base64(raw);
            c->state = soak_connection::handshaking;
            send(c, "GET " + o_.target + " HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
                        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + c->key +
                        "\r\nSec-WebSocket-Version: 13\r\nUser-Agent: ws_loadgen-soak\r\n\r\n");
            arm_read(c);
        });
    }

    // A failed connect or handshake: try again a little later.
    void retry(soak_connection* c, std::uint32_t gen) {
        if (gen != c->gen || closing_) return;
        c->gen++;
        connect_failures_++;
        asio::error_code ignored;
        c->sock.close(ignored);
        connecting_--;
        auto t = std::make_shared<asio::steady_timer>(io_, std::chrono::milliseconds(200));
        t->async_wait([this, c, t](const asio::error_code&) {
            if (!closing_) start(c);
        });
    }

    void opened(soak_connection* c) {
        c->state = soak_connection::open;
        connecting_--;
        const bool first = c->first_last == 0;
        if (first) c->first_last = newest_answered_, opened_++;
        // The first subscribe names the newest id answered so far; a reconnect resumes after the
        // last id received (or the first `last` when none arrived since).
        const std::int64_t last = std::max(c->first_last, c->last);
        send_text(c, "{\"event_name\":\"subscribe\",\"data\":{\"channels\":[\"p" + std::to_string(c->index) +
                         "\",\"shared\"],\"last\":" + std::to_string(last) + "}}");
        if (first) open_more();
    }

    // Gone without a close frame: a FIN, or a RST when linger is 0. It comes back later.
    void drop(soak_connection* c) {
        c->gen++;
        c->drops++;
        drops_++;
        asio::error_code ignored;
        if (std::uniform_real_distribution<double>(0, 1)(rng_) < o_.rst_fraction) {
            c->sock.set_option(asio::socket_base::linger(true, 0), ignored);
            rsts_++;
        }
        c->sock.close(ignored);
        c->state = soak_connection::away;
        std::string().swap(c->in);
        std::string().swap(c->message);
        const auto delay = std::chrono::milliseconds(
            std::int64_t(std::uniform_real_distribution<double>(0, o_.away_max)(rng_) * 1000));
        auto t = std::make_shared<asio::steady_timer>(io_, delay);
        t->async_wait([this, c, t](const asio::error_code&) {
            if (!closing_) start(c);
        });
    }

    // The server closed or broke a connection (it never should here): resume like a drop.
    void lost(soak_connection* c, const std::string& why) {
        if (c->state != soak_connection::open) return retry(c, c->gen);
        closed_by_server_++;
        note_error("connection " + std::to_string(c->index) + " lost: " + why);
        c->gen++;
        asio::error_code ignored;
        c->sock.close(ignored);
        c->state = soak_connection::away;
        auto t = std::make_shared<asio::steady_timer>(io_, std::chrono::milliseconds(100));
        t->async_wait([this, c, t](const asio::error_code&) {
            if (!closing_) start(c);
        });
    }

    void send(soak_connection* c, std::string bytes) {
        if (c->writing) {
            c->pending += bytes;
            return;
        }
        c->writing = true;
        c->out = std::move(bytes);
        const std::uint32_t gen = c->gen;
        asio::async_write(c->sock, asio::buffer(c->out), [this, c, gen](const asio::error_code& ec, std::size_t) {
            if (gen != c->gen) return;
            c->writing = false;
            if (!ec && !c->pending.empty()) send(c, std::exchange(c->pending, std::string()));
        });
    }

    void send_text(soak_connection* c, std::string_view text) {
        send(c, wsmini::masked_frame(1, text, std::uint32_t(rng_())));
    }

    void arm_read(soak_connection* c) {
        const std::uint32_t gen = c->gen;
        c->sock.async_wait(tcp::socket::wait_read, [this, c, gen](const asio::error_code& ec) {
            if (gen != c->gen) return;
            if (ec) return lost(c, ec.message());
            readable(c);
        });
    }

    void readable(soak_connection* c) {
        const std::uint32_t gen = c->gen;
        for (;;) {
            asio::error_code ec;
            const std::size_t n = c->sock.read_some(asio::buffer(buf_), ec);
            if (ec == asio::error::would_block || ec == asio::error::try_again) return arm_read(c);
            if (ec) return lost(c, ec.message());
            c->in.append(buf_, n);
            consume(c);
            if (gen != c->gen) return;
            if (n < sizeof buf_) return arm_read(c);
        }
    }

    void consume(soak_connection* c) {
        const std::uint32_t gen = c->gen;
        if (c->state == soak_connection::handshaking) {
            const std::size_t end = c->in.find("\r\n\r\n");
            if (end == std::string::npos) return;
            const std::string_view head(c->in.data(), end + 2);
            if (head.rfind("HTTP/1.1 101", 0) != 0 ||
                wsmini::header_value(head, "Sec-WebSocket-Accept") != wsmini::accept_key(c->key)) {
                note_error("handshake refused: " + std::string(head.substr(0, head.find("\r\n"))));
                return retry(c, gen);
            }
            c->in.erase(0, end + 4);
            opened(c);
        }
        std::size_t off = 0;
        const char* d = c->in.data();
        const std::size_t n = c->in.size();
        while (n - off >= 2 && gen == c->gen) {
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
            if (n - off < h + len) break;  // servers do not mask
            const char* p = d + off + h;
            off += h + std::size_t(len);
            frame(c, (b0 & 0x80) != 0, b0 & 0x0f, p, std::size_t(len));
        }
        if (gen == c->gen) c->in.erase(0, off);
    }

    void frame(soak_connection* c, bool fin, int opcode, const char* p, std::size_t len) {
        switch (opcode) {
        case 0x1:
        case 0x2:
            if (fin) {
                if (opcode == 1) text(c, p, p + len);
            } else {
                c->message.assign(p, len);
                c->message_text = opcode == 1;
            }
            break;
        case 0x0:
            c->message.append(p, len);
            if (fin && c->message_text) {
                const std::string m = std::exchange(c->message, std::string());
                text(c, m.data(), m.data() + m.size());
            }
            break;
        case 0x8:
            lost(c, "server closed with " +
                        std::to_string(len >= 2 ? (std::uint8_t(p[0]) << 8 | std::uint8_t(p[1])) : 1005));
            break;
        case 0x9: send(c, wsmini::masked_frame(0xA, std::string_view(p, len), std::uint32_t(rng_()))); break;
        default: break;
        }
    }

    // A frame [{"id":N,"message":{...}}, ...]: ids must ascend on every connection, across
    // reconnects too (a repeat is at or below the last id received).
    void text(soak_connection* c, const char* p, const char* end) {
        static constexpr std::string_view id_key = "{\"id\":";
        for (const char* e = find(p, end, id_key); e;) {
            const char* q = e + id_key.size();
            const std::int64_t id = parse_int(q, end);
            const char* next = find(q, end, id_key);
            if (find(q, next ? next : end, "bus/missed_notifications")) {
                missed_markers_++;
            } else if (id <= c->last) {
                duplicates_++;
                if (duplicates_ <= 5)
                    note_error("connection " + std::to_string(c->index) + ": id " + std::to_string(id) + " after " +
                               std::to_string(c->last));
            } else {
                c->last = id;
                c->count++;
                c->hash += mix(id);
                delivered_++;
            }
            e = next;
        }
        last_delivery_ = now_ns();
    }

    // --- publishing ---------------------------------------------------------------------------
    struct post {
        explicit post(asio::io_context& io) : sock(io) {}
        tcp::socket sock;
        std::string request, response;
        long target = -1;  // a connection's personal channel; -1 shared; -2 neither
    };

    void publish(long target) {
        inflight_++;
        auto r = std::make_shared<post>(io_);
        r->target = target;
        const std::string channel = target >= 0 ? "p" + std::to_string(target) : target == -1 ? "shared" : "soak-start";
        const std::string body = "{\"channel\":\"" + channel +
                                 "\",\"type\":\"soak\",\"payload\":{\"t\":" + std::to_string(now_ns()) + ",\"pad\":\"" +
                                 pad_ + "\"}}";
        r->request = "POST /bus/send HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
                     "\r\nAuthorization: Bearer " + o_.api_key +
                     "\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
                     std::to_string(body.size()) + "\r\n\r\n" + body;
        try {
            open_bound(r->sock,
                       asio::ip::address_v4((127u << 24) | (1u << 8) | std::uint32_t(1 + publish_counter_++ % 16)));
        } catch (const std::system_error& e) {
            return asio::post(io_, [this, r, what = std::string(e.what())] { answered(r, "socket: " + what); });
        }
        r->sock.async_connect(server_, [this, r](const asio::error_code& ec) {
            if (ec) return answered(r, "connect: " + ec.message());
            asio::async_write(r->sock, asio::buffer(r->request), [this, r](const asio::error_code& ec, std::size_t) {
                if (ec) return answered(r, "write: " + ec.message());
                read_answer(r);
            });
        });
    }

    void read_answer(std::shared_ptr<post> r) {
        read_http_answer(std::move(r), [this](const std::shared_ptr<post>& done) { answered(done, ""); });
    }

    void answered(const std::shared_ptr<post>& r, const std::string& error) {
        inflight_--;
        asio::error_code ignored;
        r->sock.close(ignored);
        const std::size_t at = r->response.find("\"ids\":[");
        std::int64_t id = -1;
        if (error.empty() && r->response.rfind("HTTP/1.1 200", 0) == 0 && at != std::string::npos) {
            const char* p = r->response.data() + at + 7;
            id = parse_int(p, r->response.data() + r->response.size());
        }
        if (id <= 0) {
            publish_errors_++;
            note_error("publish failed: " + (error.empty() ? r->response.substr(0, r->response.find("\r\n")) : error));
            return;
        }
        published_++;
        newest_answered_ = std::max(newest_answered_, id);
        if (r->target >= 0) personal_ids_[std::size_t(r->target)].push_back(id);
        else if (r->target == -1) shared_ids_.push_back(id);
    }

    // --- verification -------------------------------------------------------------------------
    // Shared ids ascending with suffix sums of mix(id), so each connection's due is a lookup.
    void prepare_expected() {
        std::sort(shared_ids_.begin(), shared_ids_.end());
        shared_suffix_.assign(shared_ids_.size() + 1, 0);
        for (std::size_t i = shared_ids_.size(); i-- > 0;)
            shared_suffix_[i] = shared_suffix_[i + 1] + mix(shared_ids_[i]);
        expected_ready_ = true;
    }

    // What connection c must have received: count and hash of the ids of its channels above first_last.
    std::pair<std::uint64_t, std::uint64_t> due(const soak_connection& c) const {
        const auto from = std::upper_bound(shared_ids_.begin(), shared_ids_.end(), c.first_last) - shared_ids_.begin();
        std::uint64_t count = shared_ids_.size() - std::size_t(from), hash = shared_suffix_[std::size_t(from)];
        for (const std::int64_t id : personal_ids_[c.index])
            if (id > c.first_last) count++, hash += mix(id);
        return {count, hash};
    }

    bool complete() const {
        if (!expected_ready_) return false;
        for (const auto& c : conns_)
            if (due(*c).first != c->count) return false;
        return true;
    }

    void verify() {
        for (const auto& c : conns_) {
            const auto [count, hash] = due(*c);
            expected_ += count;
            if (c->count < count) lost_ += count - c->count;
            if (c->count != count || c->hash != hash) {
                incomplete_++;
                if (incomplete_ <= 5)
                    note_error("connection " + std::to_string(c->index) + ": " + std::to_string(c->count) + " of " +
                               std::to_string(count) + " ids" + (c->count == count ? " (other ids than due)" : ""));
            }
        }
    }

    void finish() {
        sampler_.cancel();
        tick_.cancel();
        churn_timer_.cancel();
        const long rss_growth = rss_warm_ > 0 && rss_end_ > 0 ? rss_end_ - rss_warm_ : 0;
        const long rss_allowed = std::max(o_.rss_tolerance_kib, long(double(rss_warm_) * o_.rss_tolerance_pct / 100));
        const bool fd_ok = fd_end_ >= 0 && fd_end_ <= fd_idle_ + o_.fd_tolerance;
        const bool rss_ok = rss_warm_ > 0 && rss_end_ > 0 && rss_growth <= rss_allowed;
        const bool ok = early_failure_.empty() && lost_ == 0 && incomplete_ == 0 && duplicates_ == 0 &&
                        missed_markers_ == 0 && publish_errors_ == 0 && closed_by_server_ == 0 && fd_ok && rss_ok &&
                        published_ > 0;
        std::ostringstream j, h;
        j << "{\"mode\":\"soak\",\"protocol\":\"imbus\",\"label\":\"" << json_escape(o_.label)
          << "\",\"connections\":" << conns_.size() << ",\"opened\":" << opened_
          << ",\"seconds\":" << fmt(run_seconds_, 1) << ",\"warmup_s\":" << fmt(o_.warmup, 1)
          << ",\"rate\":" << fmt(o_.rate, 1) << ",\"shared_rate\":" << fmt(o_.shared_rate, 1)
          << ",\"published\":" << published_ << ",\"publish_errors\":" << publish_errors_
          << ",\"late_publishes\":" << late_ << ",\"drops\":" << drops_ << ",\"rst_drops\":" << rsts_
          << ",\"connect_failures\":" << connect_failures_ << ",\"closed_by_server\":" << closed_by_server_
          << ",\"expected\":" << expected_ << ",\"delivered\":" << delivered_ << ",\"lost\":" << lost_
          << ",\"duplicates\":" << duplicates_ << ",\"connections_incomplete\":" << incomplete_
          << ",\"missed_markers\":" << missed_markers_ << ",\"rss_idle_kib\":" << rss_idle_
          << ",\"rss_warm_kib\":" << rss_warm_ << ",\"rss_end_kib\":" << rss_end_ << ",\"rss_max_kib\":" << rss_max_
          << ",\"rss_after_close_kib\":" << rss_closed_ << ",\"rss_growth_kib\":" << rss_growth
          << ",\"rss_allowed_kib\":" << rss_allowed << ",\"fd_idle\":" << fd_idle_ << ",\"fd_max\":" << fd_max_
          << ",\"fd_end\":" << fd_end_ << ",\"fd_tolerance\":" << o_.fd_tolerance << ",\"samples\":" << samples_;
        if (!early_failure_.empty()) j << ",\"failure\":\"" << json_escape(early_failure_) << "\"";
        j << ",\"ok\":" << (ok ? "true" : "false") << "}";
        h << "# soak " << o_.label << ": " << conns_.size() << " connections for " << fmt(run_seconds_, 0) << " s, "
          << published_ << " published, " << delivered_ << "/" << expected_ << " delivered, lost " << lost_
          << ", duplicates " << duplicates_ << ", " << drops_ << " drops (" << rsts_ << " RST), RSS " << rss_warm_
          << " KiB after warm-up -> " << rss_end_ << " KiB at the end (allowed +" << rss_allowed << "), fds idle "
          << fd_idle_ << ", max " << fd_max_ << ", after close " << fd_end_ << (ok ? "" : "  FAILED");
        std::cout << j.str() << "\n" << h.str() << std::endl;
        exit_code_ = ok ? 0 : 1;
        io_.stop();
    }

    options o_;
    asio::io_context io_{1};
    tcp::endpoint server_;
    asio::steady_timer tick_, churn_timer_, sampler_, step_;
    std::minstd_rand rng_;
    std::vector<std::unique_ptr<soak_connection>> conns_;
    std::string pad_;
    char buf_[65536];

    std::size_t next_open_ = 0, connecting_ = 0, opened_ = 0, inflight_ = 0, publish_counter_ = 0, errors_shown_ = 0;
    bool running_ = false, warm_ = false, closing_ = false, expected_ready_ = false;
    double churn_credit_ = 0, run_seconds_ = 0;
    std::int64_t connect_start_ = 0, run_start_ = 0, answers_done_ = 0, last_delivery_ = 0, newest_answered_ = 0;
    std::uint64_t personal_requested_ = 0, shared_requested_ = 0, published_ = 0, publish_errors_ = 0, late_ = 0;
    std::uint64_t drops_ = 0, rsts_ = 0, connect_failures_ = 0, closed_by_server_ = 0;
    std::uint64_t delivered_ = 0, duplicates_ = 0, missed_markers_ = 0, expected_ = 0, lost_ = 0, incomplete_ = 0;
    std::vector<std::vector<std::int64_t>> personal_ids_;
    std::vector<std::int64_t> shared_ids_;
    std::vector<std::uint64_t> shared_suffix_;
    long rss_idle_ = -1, rss_warm_ = -1, rss_end_ = -1, rss_max_ = -1, rss_closed_ = -1;
    long fd_idle_ = -1, fd_max_ = -1, fd_end_ = -1;
    std::uint64_t samples_ = 0;
    std::string early_failure_;
    int exit_code_ = 1;
};

// --- hostile clients: pingflood, slowreaders ----------------------------------------------------

// A hostile socket's receive buffer is small and set before connect(), so that the window it
// advertises stays small too: what the server sends it piles up in the server, not in this
// process's kernel buffer.
// With --mss, the MSS it announces too: the server's send buffer for it then autotunes like
// for a client across a network, not to the megabytes of loopback's 64 KiB segments.
void set_hostile_buffers(tcp::socket& sock, int rcvbuf, int mss) {
    if (rcvbuf > 0) ::setsockopt(sock.native_handle(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (mss > 0) ::setsockopt(sock.native_handle(), IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof mss);
}

// Memory of all TCP sockets of the machine (kernel buffers: not in any process's RSS), from
// /proc/net/sockstat "TCP: ... mem N" (pages); -1 if unknown. On loopback a socket's send
// buffer grows to megabytes, so what a server queued for a client that does not read can sit
// there instead of in the server's RSS.
long tcp_mem_kib() {
    std::ifstream f("/proc/net/sockstat");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("TCP:", 0) != 0) continue;
        const std::size_t at = line.find(" mem ");
        if (at == std::string::npos) return -1;
        return std::strtol(line.c_str() + at + 5, nullptr, 10) * (sysconf(_SC_PAGESIZE) / 1024);
    }
    return -1;
}

// Whether the server still holds a TCP connection, seen without reading from it: after the
// server's FIN the state is CLOSE_WAIT, after a RST it is CLOSE.
bool tcp_established(tcp::socket& sock) {
    if (!sock.is_open()) return false;
    tcp_info info{};
    socklen_t len = sizeof info;
    if (::getsockopt(sock.native_handle(), IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return false;
    return info.tcpi_state == TCP_ESTABLISHED;
}

// The honest client: its own channel, reads everything, answers pings, resumes after a loss.
struct canary_connection {
    explicit canary_connection(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string in, message, out, pending, key;
    std::int64_t last_id = 0;  // the highest id received: a reconnect resumes after it
    std::uint32_t gen = 0;
    enum : std::uint8_t { idle, connecting, handshaking, open } state = idle;
    bool writing = false, message_text = false;
};

// A hostile connection: opens its WebSocket (reads the 101 answer), then never reads again.
struct hostile_connection {
    explicit hostile_connection(asio::io_context& io) : sock(io) {}
    tcp::socket sock;
    std::string in, out, key;
    std::uint32_t index = 0, gen = 0;
    enum : std::uint8_t { idle, connecting, handshaking, open, failed } state = idle;
};

// pingflood: one connection sends empty masked pings as fast as the kernel takes them and
// never reads, so every pong the server owes it stays in the server; when the server drops it
// (a write fails) it connects again, until the attack's time is up.
// slowreaders: N connections subscribe to the busy channel with "last": 1 (history first) and
// never read, while --rate publishes/s of --payload-bytes go to that channel.
// In both, an honest canary on its own channel gets a publish every --canary-interval-ms, and
// the server's RSS is sampled every 100 ms: before the attack (canary connected), its peak,
// at the end of the attack, and after the hostile connections are closed.
class hostile {
public:
    explicit hostile(options o)
        : o_(std::move(o)), server_(asio::ip::make_address(o_.host), o_.port), sampler_(io_), step_(io_),
          canary_timer_(io_), publish_timer_(io_), deadline_(io_), flood_timer_(io_), canary_(io_),
          rng_(std::random_device{}()) {
        flood_mode_ = o_.mode == "pingflood";
        const std::size_t n = flood_mode_ ? 1 : o_.connections;
        for (std::size_t i = 0; i < n; ++i) {
            hostiles_.push_back(std::make_unique<hostile_connection>(io_));
            hostiles_.back()->index = std::uint32_t(i);
        }
        const std::string bare = "{\"s\":100000,\"t\":" + std::to_string(now_ns()) + ",\"pad\":\"\"}";
        pad_ = std::string(o_.payload_bytes > bare.size() ? o_.payload_bytes - bare.size() : 0, 'x');
        // 64 KiB of empty pings (6 bytes each: FIN|ping, MASK|0, a mask key), each its own mask.
        for (std::size_t i = 0; i < 65536 / 6; ++i) ping_block_ += wsmini::masked_frame(0x9, "", std::uint32_t(rng_()));
    }

    int run() {
        rss_idle_ = rss_kib(o_.server_pid);
        progress("server RSS " + std::to_string(rss_idle_) + " KiB; connecting the canary");
        sample();
        canary_connect();
        wait_for([this] { return canary_.state == canary_connection::open; }, 15,
                 [this](bool ok) {
                     if (!ok) return fail_early("the canary did not connect");
                     canary_warm();
                 });
        io_.run();
        return exit_code_;
    }

private:
    static std::string fmt(double v, int digits) {
        char b[64];
        std::snprintf(b, sizeof b, "%.*f", digits, v);
        return b;
    }
    static std::string ms(std::uint64_t us) { return fmt(double(us) / 1000.0, 3); }
    void progress(const std::string& what) { std::cerr << "ws_loadgen [" << o_.mode << "] " << what << std::endl; }
    void note_error(const std::string& what) {
        if (errors_shown_++ < 10) std::cerr << "ws_loadgen [" << o_.mode << "] " << what << std::endl;
    }
    double since_attack() const { return double(now_ns() - attack_start_) / 1e9; }

    // Calls then(true) once pred() holds, or then(false) after timeout seconds.
    void wait_for(std::function<bool()> pred, double timeout, std::function<void(bool)> then) {
        const std::int64_t until = now_ns() + std::int64_t(timeout * 1e9);
        auto step = std::make_shared<std::function<void()>>();
        *step = [this, pred = std::move(pred), then = std::move(then), until, step]() {
            if (pred()) return then(true);
            if (now_ns() >= until) return then(false);
            step_.expires_after(std::chrono::milliseconds(10));
            step_.async_wait([step](const asio::error_code&) { (*step)(); });
        };
        (*step)();
    }

    void after(std::chrono::milliseconds delay, std::function<void()> f) {
        auto t = std::make_shared<asio::steady_timer>(io_, delay);
        t->async_wait([t, f = std::move(f)](const asio::error_code&) { f(); });
    }

    std::string handshake(const std::string& key) const {
        return "GET " + o_.target + " HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
               "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
               "\r\nSec-WebSocket-Version: 13\r\n\r\n";
    }
    std::string new_key() {
        std::string raw(16, '\0');
        for (auto& c : raw) c = char(rng_());
        return wsmini::base64(raw);
    }
    static bool accepted(std::string_view head, const std::string& key) {
        return head.rfind("HTTP/1.1 101", 0) == 0 &&
               wsmini::header_value(head, "Sec-WebSocket-Accept") == wsmini::accept_key(key);
    }

    // --- phases -------------------------------------------------------------------------------
    // A canary notification with sequence number 0, again every 500 ms until it arrives: proves
    // that the canary's subscribe was processed. Then the RSS before the attack.
    void canary_warm() {
        progress("canary connected; warm-up publish");
        auto again = std::make_shared<std::function<void()>>();
        *again = [this, again] {
            if (canary_warm_ || !early_failure_.empty()) return;
            publish(true, 0);
            after(std::chrono::milliseconds(500), [again] { (*again)(); });
        };
        (*again)();
        wait_for([this] { return canary_warm_; }, 15,
                 [this](bool ok) {
                     if (!ok) return fail_early("the canary's warm-up notification did not arrive");
                     if (flood_mode_ || o_.history == 0) return settle();
                     progress("publishing a history of " + std::to_string(o_.history) + " notifications to \"" +
                              o_.channel + "\"");
                     pump_history();
                     wait_for([this] { return history_requested_ == o_.history && broadcast_inflight_ == 0; }, 120,
                              [this](bool ok) {
                                  if (!ok || history_published_ != o_.history)
                                      return fail_early(std::to_string(history_published_) + " of " +
                                                        std::to_string(o_.history) + " history publishes answered");
                                  settle();
                              });
                 });
    }

    // slowreaders: what the readers' "last": 1 asks for is already in the store.
    void pump_history() {
        while (history_requested_ < o_.history && broadcast_inflight_ < o_.publishers)
            publish(false, -std::int64_t(++history_requested_));
        if (history_requested_ < o_.history) after(std::chrono::milliseconds(2), [this] { pump_history(); });
    }

    void settle() {
        after(std::chrono::milliseconds(std::int64_t(o_.settle * 1000)), [this] {
            rss_before_ = rss_kib(o_.server_pid);
            rss_peak_ = rss_before_;
            tcp_mem_before_ = tcp_mem_peak_ = tcp_mem_kib();
            start_attack();
        });
    }

    void start_attack() {
        attack_start_ = now_ns();
        last_canary_ = attack_start_;  // the longest gap counts from the attack's start
        attacking_ = true;
        server_cpu_start_ = cpu_seconds(o_.server_pid);
        if (flood_mode_) {
            progress("ping flood for " + fmt(o_.seconds, 0) + " s; server RSS before " + std::to_string(rss_before_) +
                     " KiB");
            flood_connect();
        } else {
            progress(std::to_string(hostiles_.size()) + " non-reading subscribers of \"" + o_.channel +
                     "\" (last 1), " + fmt(o_.rate, 0) + " publishes/s of " + std::to_string(o_.payload_bytes) +
                     " bytes for " + fmt(o_.seconds, 0) + " s; server RSS before " + std::to_string(rss_before_) +
                     " KiB");
            open_readers();
            pace_broadcast();
        }
        next_canary_ = std::chrono::steady_clock::now();
        pace_canary();
        deadline_.expires_after(std::chrono::nanoseconds(std::int64_t(o_.seconds * 1e9)));
        deadline_.async_wait([this](const asio::error_code& ec) {
            if (!ec) end_attack();
        });
    }

    // The attack stops: no more pings or publishes; the hostile connections stay open (their
    // queues with them) until the canary has everything or gave up.
    void end_attack() {
        if (!attacking_) return;
        attacking_ = false;
        attack_seconds_ = since_attack();
        deadline_.cancel();
        canary_timer_.cancel();
        publish_timer_.cancel();
        flood_timer_.cancel();
        rss_end_ = rss_kib(o_.server_pid);
        rss_peak_ = std::max(rss_peak_, rss_end_);
        tcp_mem_end_ = tcp_mem_kib();
        tcp_mem_peak_ = std::max(tcp_mem_peak_, tcp_mem_end_);
        server_cpu_ = cpu_seconds(o_.server_pid) - server_cpu_start_;
        for (auto& h : hostiles_) hostile_alive_ += tcp_established(h->sock);
        progress("attack over after " + fmt(attack_seconds_, 1) + " s" + (cap_hit_ ? " (RSS cap reached)" : "") +
                 ": server RSS " + std::to_string(rss_end_) + " KiB (peak " + std::to_string(rss_peak_) + "); " +
                 std::to_string(hostile_alive_) + " hostile connections still established; scraping " +
                 o_.metrics_path);
        scrape_metrics([this] {
            wait_for([this] { return canary_inflight_ == 0 && broadcast_inflight_ == 0; }, 30,
                     [this](bool) {
                         answers_done_ = now_ns();
                         drain();
                     });
        });
    }

    // Until the canary has every answered notification, --drain s without one, or --drain-max.
    void drain() {
        const std::int64_t now = now_ns();
        const bool complete = canary_received_ >= canary_published_;
        if (complete || now - std::max(last_canary_, answers_done_) > std::int64_t(o_.drain * 1e9) ||
            now - answers_done_ > std::int64_t(std::min(o_.drain_max, 120.0) * 1e9))
            return close_hostiles();
        step_.expires_after(std::chrono::milliseconds(10));
        step_.async_wait([this](const asio::error_code&) { drain(); });
    }

    void close_hostiles() {
        progress("canary: " + std::to_string(canary_received_) + " of " + std::to_string(canary_published_) +
                 "; closing the hostile connections");
        sampling_peak_ = false;
        for (auto& h : hostiles_) {
            h->gen++;
            asio::error_code ignored;
            h->sock.close(ignored);
        }
        after(std::chrono::milliseconds(1000), [this] {
            rss_after_close_ = rss_kib(o_.server_pid);
            finish();
        });
    }

    void fail_early(const std::string& why) {
        note_error(why);
        early_failure_ = why;
        finish();
    }

    // --- the server's RSS every 100 ms ----------------------------------------------------------
    void sample() {
        const long rss = rss_kib(o_.server_pid);
        samples_++;
        if (rss < 0) server_gone_ = true;
        if (attacking_ || (sampling_peak_ && attack_start_ > 0)) {
            rss_peak_ = std::max(rss_peak_, rss);
            tcp_mem_peak_ = std::max(tcp_mem_peak_, tcp_mem_kib());
        }
        if (attacking_ && samples_ % 50 == 0) {
            const std::string what = flood_mode_ ? ", pings " + std::to_string(flood_bytes_ / 6) + ", reconnects " +
                                                       std::to_string(flood_reconnects_)
                                                 : ", readers open " + std::to_string(readers_open_) + ", published " +
                                                       std::to_string(broadcast_published_);
            progress("t=" + fmt(since_attack(), 0) + " s: server RSS " + std::to_string(rss) + " KiB, canary " +
                     std::to_string(canary_received_) + "/" + std::to_string(canary_published_) + what);
        }
        if (attacking_ && o_.rss_cap_mib > 0 && rss > o_.rss_cap_mib * 1024) {
            cap_hit_ = true;
            note_error("server RSS " + std::to_string(rss) + " KiB passed --rss-cap-mib " +
                       std::to_string(o_.rss_cap_mib) + ": the attack ends now");
            end_attack();
        }
        if (attacking_ && server_gone_) {
            note_error("the server process is gone");
            end_attack();
        }
        // A server that closes the flooder while the flooder's write waits on a zero window gives
        // that write no error: the TCP state tells, without a read.
        if (attacking_ && flood_mode_ && hostiles_[0]->state == hostile_connection::open &&
            !tcp_established(hostiles_[0]->sock))
            flood_lost(hostiles_[0].get(), "the server closed it");
        sampler_.expires_after(std::chrono::milliseconds(100));
        sampler_.async_wait([this](const asio::error_code& ec) {
            if (!ec) sample();
        });
    }

    // --- ping flood ---------------------------------------------------------------------------
    void flood_connect() {
        if (!attacking_) return;
        hostile_connection* f = hostiles_[0].get();
        const std::uint32_t gen = ++f->gen;
        asio::error_code ignored;
        f->sock.close(ignored);
        f->state = hostile_connection::connecting;
        f->in.clear();
        try {
            open_bound(f->sock, asio::ip::address_v4((127u << 24) | 1u));
            set_hostile_buffers(f->sock, o_.rcvbuf, o_.mss);
        } catch (const std::system_error& e) {
            note_error("flood socket: " + std::string(e.what()));
            return flood_retry(gen);
        }
        // A connect or handshake that takes more than 5 s is given up (and tried again).
        flood_timer_.expires_after(std::chrono::seconds(5));
        flood_timer_.async_wait([this, f, gen](const asio::error_code& ec) {
            if (!ec && gen == f->gen && f->state != hostile_connection::open) {
                note_error("flood: no handshake answer in 5 s");
                flood_retry(gen);
            }
        });
        f->sock.async_connect(server_, [this, f, gen](const asio::error_code& ec) {
            if (gen != f->gen) return;
            if (ec) {
                note_error("flood connect: " + ec.message());
                return flood_retry(gen);
            }
            f->key = new_key();
            f->out = handshake(f->key);
            f->state = hostile_connection::handshaking;
            asio::async_write(f->sock, asio::buffer(f->out), [this, f, gen](const asio::error_code& ec, std::size_t) {
                if (gen != f->gen) return;
                if (ec) return flood_retry(gen);
                read_handshake(f, [this, f, gen](bool ok) {
                    if (gen != f->gen) return;
                    if (!ok) return flood_retry(gen);
                    f->state = hostile_connection::open;
                    flood_timer_.cancel();
                    flood_opened_++;
                    if (flood_opened_ == 1) progress("flooding");
                    flood_write(f, gen);
                });
            });
        });
    }

    // A failed connect or handshake: again 100 ms later, while the attack lasts.
    void flood_retry(std::uint32_t gen) {
        hostile_connection* f = hostiles_[0].get();
        if (gen != f->gen) return;
        f->gen++;
        flood_failures_++;
        asio::error_code ignored;
        f->sock.close(ignored);
        f->state = hostile_connection::failed;
        after(std::chrono::milliseconds(100), [this] { flood_connect(); });
    }

    // 64 KiB of pings at a time, as fast as the kernel takes them; never a read.
    void flood_write(hostile_connection* f, std::uint32_t gen) {
        if (!attacking_ || gen != f->gen) return;
        asio::async_write(f->sock, asio::buffer(ping_block_),
                          [this, f, gen](const asio::error_code& ec, std::size_t n) {
                              flood_bytes_ += n;
                              if (gen != f->gen) return;
                              if (ec) return flood_lost(f, ec.message());
                              flood_write(f, gen);
                          });
    }

    // The server dropped the flooder: connect again and go on.
    void flood_lost(hostile_connection* f, const std::string& why) {
        flood_reconnects_++;
        if (flood_reconnects_ <= 3) note_error("flood connection lost (" + why + "); reconnecting");
        f->gen++;
        asio::error_code ignored;
        f->sock.close(ignored);
        f->state = hostile_connection::failed;
        flood_connect();
    }

    // Reads only the handshake answer (and whatever came in the same segments), then stops.
    void read_handshake(hostile_connection* h, std::function<void(bool)> then) {
        const std::uint32_t gen = h->gen;
        const std::size_t old = h->in.size();
        h->in.resize(old + 4096);
        h->sock.async_read_some(
            asio::buffer(&h->in[old], 4096),
            [this, h, gen, old, then = std::move(then)](const asio::error_code& ec, std::size_t n) mutable {
                if (gen != h->gen) return;
                h->in.resize(old + (ec ? 0 : n));
                if (ec) return then(false);
                const std::size_t end = h->in.find("\r\n\r\n");
                if (end == std::string::npos) {
                    if (h->in.size() > 16384) return then(false);
                    return read_handshake(h, std::move(then));
                }
                const bool ok = accepted(std::string_view(h->in.data(), end + 2), h->key);
                if (!ok) note_error("handshake refused: " + h->in.substr(0, h->in.find("\r\n")));
                std::string().swap(h->in);
                then(ok);
            });
    }

    // --- non-reading subscribers --------------------------------------------------------------
    void open_readers() {
        while (next_reader_ < hostiles_.size() && readers_connecting_ < o_.connect_concurrency && attacking_)
            open_reader(hostiles_[next_reader_++].get());
    }

    void reader_done(hostile_connection* r, bool ok) {
        readers_connecting_--;
        if (ok) {
            r->state = hostile_connection::open;
            readers_open_++;
            if (readers_open_ == hostiles_.size())
                progress("all " + std::to_string(readers_open_) + " readers subscribed after " +
                         fmt(since_attack(), 2) + " s");
        } else {
            r->state = hostile_connection::failed;
            r->gen++;
            asio::error_code ignored;
            r->sock.close(ignored);
            readers_failed_++;
        }
        open_readers();
    }

    void open_reader(hostile_connection* r) {
        readers_connecting_++;
        r->state = hostile_connection::connecting;
        const std::uint32_t gen = r->gen;
        try {
            open_bound(r->sock, asio::ip::address_v4((127u << 24) | std::uint32_t(1 + r->index % o_.sources)));
            set_hostile_buffers(r->sock, o_.rcvbuf, o_.mss);
        } catch (const std::system_error& e) {
            note_error("reader socket: " + std::string(e.what()));
            return asio::post(io_, [this, r] { reader_done(r, false); });
        }
        r->sock.async_connect(server_, [this, r, gen](const asio::error_code& ec) {
            if (gen != r->gen) return;
            if (ec) {
                note_error("reader connect: " + ec.message());
                return reader_done(r, false);
            }
            asio::error_code ignored;
            r->sock.set_option(tcp::no_delay(true), ignored);
            r->key = new_key();
            r->out = handshake(r->key);
            r->state = hostile_connection::handshaking;
            asio::async_write(r->sock, asio::buffer(r->out), [this, r, gen](const asio::error_code& ec, std::size_t) {
                if (gen != r->gen) return;
                if (ec) return reader_done(r, false);
                read_handshake(r, [this, r, gen](bool ok) {
                    if (gen != r->gen) return;
                    if (!ok) return reader_done(r, false);
                    // History first ("last": 1), then never a read again.
                    r->out = wsmini::masked_frame(
                        1, "{\"event_name\":\"subscribe\",\"data\":{\"channels\":[\"" + o_.channel + "\"],\"last\":1}}",
                        std::uint32_t(rng_()));
                    asio::async_write(r->sock, asio::buffer(r->out),
                                      [this, r, gen](const asio::error_code& ec, std::size_t) {
                                          if (gen != r->gen) return;
                                          reader_done(r, !ec);
                                      });
                });
            });
        });
    }

    // --- publishing (POST /bus/send, a new connection each) -------------------------------------
    // Paced: what falls due while --publishers requests are in flight goes out later (late).
    void pace_broadcast() {
        if (!attacking_) return;
        const double due = since_attack() * o_.rate;
        while (double(broadcast_requested_) < due) {
            if (broadcast_inflight_ >= o_.publishers) {
                broadcast_late_++;
                break;
            }
            publish(false, ++broadcast_requested_);
        }
        publish_timer_.expires_after(std::chrono::milliseconds(5));
        publish_timer_.async_wait([this](const asio::error_code& ec) {
            if (!ec) pace_broadcast();
        });
    }

    // One canary publish every --canary-interval-ms; at most 64 in flight (else late, later).
    void pace_canary() {
        if (!attacking_) return;
        const auto period = std::chrono::nanoseconds(std::int64_t(o_.canary_interval_ms * 1e6));
        const auto now = std::chrono::steady_clock::now();
        while (next_canary_ <= now) {
            if (canary_inflight_ >= 64) {
                canary_late_++;
                break;
            }
            publish(true, std::int64_t(++canary_requested_));
            next_canary_ += period;
        }
        canary_timer_.expires_at(std::max(next_canary_, now + std::chrono::milliseconds(1)));
        canary_timer_.async_wait([this](const asio::error_code& ec) {
            if (!ec) pace_canary();
        });
    }

    struct post {
        explicit post(asio::io_context& io) : sock(io) {}
        tcp::socket sock;
        std::string request, response;
        std::int64_t start = 0, seq = 0;
        bool canary = false;
    };

    std::string publish_body(bool canary, std::int64_t seq) const {
        if (canary)
            return "{\"channel\":\"" + o_.canary_channel +
                   "\",\"type\":\"canary\",\"payload\":{\"c\":" + std::to_string(seq) +
                   ",\"t\":" + std::to_string(now_ns()) + "}}";
        return "{\"channel\":\"" + o_.channel + "\",\"type\":\"b\",\"payload\":{\"s\":" + std::to_string(seq) +
               ",\"t\":" + std::to_string(now_ns()) + ",\"pad\":\"" + pad_ + "\"}}";
    }

    void publish(bool canary, std::int64_t seq) {
        (canary ? canary_inflight_ : broadcast_inflight_)++;
        auto r = std::make_shared<post>(io_);
        r->canary = canary;
        r->seq = seq;
        r->start = now_ns();
        try {
            open_bound(r->sock,
                       asio::ip::address_v4((127u << 24) | (1u << 8) | std::uint32_t(1 + publish_counter_++ % 16)));
        } catch (const std::system_error& e) {
            return asio::post(io_, [this, r, what = std::string(e.what())] { answered(r, "socket: " + what); });
        }
        r->sock.async_connect(server_, [this, r](const asio::error_code& ec) {
            if (ec) return answered(r, "connect: " + ec.message());
            asio::error_code ignored;
            r->sock.set_option(tcp::no_delay(true), ignored);
            const std::string body = publish_body(r->canary, r->seq);  // "t": after the connect, like the other modes
            r->request = "POST /bus/send HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
                         "\r\nAuthorization: Bearer " + o_.api_key +
                         "\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
                         std::to_string(body.size()) + "\r\n\r\n" + body;
            asio::async_write(r->sock, asio::buffer(r->request), [this, r](const asio::error_code& ec, std::size_t) {
                if (ec) return answered(r, "write: " + ec.message());
                read_answer(r);
            });
        });
    }

    void read_answer(std::shared_ptr<post> r) {
        read_http_answer(std::move(r), [this](const std::shared_ptr<post>& done) { answered(done, ""); });
    }

    void answered(const std::shared_ptr<post>& r, const std::string& error) {
        (r->canary ? canary_inflight_ : broadcast_inflight_)--;
        asio::error_code ignored;
        r->sock.close(ignored);
        const std::size_t at = r->response.find("\"ids\":[");
        std::int64_t id = -1;
        if (error.empty() && r->response.rfind("HTTP/1.1 200", 0) == 0 && at != std::string::npos) {
            const char* p = r->response.data() + at + 7;
            id = parse_int(p, r->response.data() + r->response.size());
        }
        if (id <= 0) {
            (r->canary ? canary_publish_errors_ : broadcast_publish_errors_)++;
            note_error(std::string(r->canary ? "canary" : "broadcast") +
                       " publish failed: " + (error.empty() ? r->response.substr(0, r->response.find("\r\n")) : error));
            return;
        }
        if (!r->canary) {
            (r->seq < 0 ? history_published_ : broadcast_published_)++;
        } else if (r->seq > 0) {
            canary_published_++;
            canary_post_.add(std::uint64_t(now_ns() - r->start) / 1000);
        }
    }

    // --- the canary ---------------------------------------------------------------------------
    void canary_connect() {
        canary_connection* c = &canary_;
        const std::uint32_t gen = ++c->gen;
        c->state = canary_connection::connecting;
        c->in.clear();
        c->message.clear();
        c->out.clear();
        c->pending.clear();
        c->writing = false;
        try {
            open_bound(c->sock, asio::ip::address_v4((127u << 24) | 1u));
        } catch (const std::system_error& e) {
            return canary_lost("socket: " + std::string(e.what()));
        }
        c->sock.async_connect(server_, [this, c, gen](const asio::error_code& ec) {
            if (gen != c->gen) return;
            if (ec) return canary_lost("connect: " + ec.message());
            asio::error_code ignored;
            c->sock.set_option(tcp::no_delay(true), ignored);
            c->sock.non_blocking(true, ignored);
            c->key = new_key();
            c->state = canary_connection::handshaking;
            canary_send(handshake(c->key));
            canary_arm_read();
        });
    }

    // Gone: like imbus::client, connect again and resume after the last id received.
    void canary_lost(const std::string& why) {
        canary_connection* c = &canary_;
        c->gen++;
        asio::error_code ignored;
        c->sock.close(ignored);
        c->state = canary_connection::idle;
        if (finished_) return;
        canary_reconnects_++;
        note_error("canary lost: " + why + "; reconnecting");
        after(std::chrono::milliseconds(100), [this] {
            if (!finished_) canary_connect();
        });
    }

    void canary_send(std::string bytes) {
        canary_connection* c = &canary_;
        if (c->writing) {
            c->pending += bytes;
            return;
        }
        c->writing = true;
        c->out = std::move(bytes);
        const std::uint32_t gen = c->gen;
        asio::async_write(c->sock, asio::buffer(c->out), [this, c, gen](const asio::error_code& ec, std::size_t) {
            if (gen != c->gen) return;
            c->writing = false;
            if (!ec && !c->pending.empty()) canary_send(std::exchange(c->pending, std::string()));
        });
    }

    void canary_arm_read() {
        canary_connection* c = &canary_;
        const std::uint32_t gen = c->gen;
        c->sock.async_wait(tcp::socket::wait_read, [this, c, gen](const asio::error_code& ec) {
            if (gen != c->gen) return;
            if (ec) return canary_lost(ec.message());
            canary_readable();
        });
    }

    void canary_readable() {
        canary_connection* c = &canary_;
        const std::uint32_t gen = c->gen;
        for (int round = 0; round < 16; ++round) {
            asio::error_code ec;
            const std::size_t n = c->sock.read_some(asio::buffer(buf_), ec);
            if (ec == asio::error::would_block || ec == asio::error::try_again) return canary_arm_read();
            if (ec) return canary_lost(ec.message());
            c->in.append(buf_, n);
            canary_consume(now_ns());
            if (gen != c->gen) return;
            if (n < sizeof buf_) return canary_arm_read();
        }
        asio::post(io_, [this, gen] {
            if (gen == canary_.gen) canary_readable();
        });
    }

    void canary_consume(std::int64_t now) {
        canary_connection* c = &canary_;
        const std::uint32_t gen = c->gen;
        if (c->state == canary_connection::handshaking) {
            const std::size_t end = c->in.find("\r\n\r\n");
            if (end == std::string::npos) return;
            if (!accepted(std::string_view(c->in.data(), end + 2), c->key))
                return canary_lost("handshake refused: " + c->in.substr(0, c->in.find("\r\n")));
            c->in.erase(0, end + 4);
            c->state = canary_connection::open;
            canary_send(wsmini::masked_frame(1,
                                             "{\"event_name\":\"subscribe\",\"data\":{\"channels\":[\"" +
                                                 o_.canary_channel + "\"],\"last\":" + std::to_string(c->last_id) +
                                                 "}}",
                                             std::uint32_t(rng_())));
        }
        std::size_t off = 0;
        const char* d = c->in.data();
        const std::size_t n = c->in.size();
        while (n - off >= 2 && gen == c->gen) {
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
            if (n - off < h + len) break;  // servers do not mask
            const char* p = d + off + h;
            off += h + std::size_t(len);
            canary_frame((b0 & 0x80) != 0, b0 & 0x0f, p, std::size_t(len), now);
        }
        if (gen == c->gen) c->in.erase(0, off);
    }

    void canary_frame(bool fin, int opcode, const char* p, std::size_t len, std::int64_t now) {
        canary_connection* c = &canary_;
        switch (opcode) {
        case 0x1:
        case 0x2:
            if (fin) {
                if (opcode == 1) canary_text(p, p + len, now);
            } else {
                c->message.assign(p, len);
                c->message_text = opcode == 1;
            }
            break;
        case 0x0:
            c->message.append(p, len);
            if (fin && c->message_text) {
                const std::string m = std::exchange(c->message, std::string());
                canary_text(m.data(), m.data() + m.size(), now);
            }
            break;
        case 0x8:
            canary_lost("server closed with " +
                        std::to_string(len >= 2 ? (std::uint8_t(p[0]) << 8 | std::uint8_t(p[1])) : 1005));
            break;
        case 0x9: canary_send(wsmini::masked_frame(0xA, std::string_view(p, len), std::uint32_t(rng_()))); break;
        default: break;
        }
    }

    // [{"id":N,"message":{"type":"canary","payload":{"c":seq,"t":ns}}}, ...]; the public
    // identity also follows "broadcast": those are counted, not timed.
    void canary_text(const char* p, const char* end, std::int64_t now) {
        static constexpr std::string_view id_key = "{\"id\":";
        for (const char* e = find(p, end, id_key); e;) {
            const char* q = e + id_key.size();
            const std::int64_t id = parse_int(q, end);
            const char* next = find(q, end, id_key);
            const char* element_end = next ? next : end;
            canary_.last_id = std::max(canary_.last_id, id);
            if (find(q, element_end, "bus/missed_notifications")) {
                canary_missed_markers_++;
            } else if (find(q, element_end, "\"type\":\"canary\"")) {
                const std::int64_t seq = int_after(q, element_end, "\"c\":");
                const std::int64_t sent = int_after(q, element_end, "\"t\":");
                if (seq == 0) {
                    canary_warm_ = true;
                } else if (seq > 0) {
                    if (!canary_seen_.insert(std::size_t(seq))) {
                        canary_duplicates_++;
                    } else {
                        canary_received_++;
                        canary_gap_ns_ = std::max(canary_gap_ns_, now - last_canary_);
                        last_canary_ = now;
                        if (sent > 0) canary_latency_.add(std::uint64_t(std::max<std::int64_t>(0, now - sent)) / 1000);
                    }
                }
            } else {
                canary_other_++;
            }
            e = next;
        }
    }

    // --- GET /metrics at the end of the attack --------------------------------------------------
    void scrape_metrics(std::function<void()> then) {
        auto r = std::make_shared<post>(io_);
        auto done = std::make_shared<std::function<void()>>(std::move(then));
        auto timer = std::make_shared<asio::steady_timer>(io_, std::chrono::seconds(5));
        auto complete = [this, r, done, timer](bool timed_out) {
            if (!*done) return;
            timer->cancel();
            asio::error_code ignored;
            r->sock.close(ignored);
            parse_metrics(r->response, timed_out);
            auto f = std::exchange(*done, nullptr);
            f();
        };
        timer->async_wait([complete](const asio::error_code& ec) {
            if (!ec) complete(true);
        });
        r->request = "GET " + o_.metrics_path + " HTTP/1.1\r\nHost: " + o_.host + ":" + std::to_string(o_.port) +
                     "\r\nConnection: close\r\n\r\n";
        try {
            open_bound(r->sock, asio::ip::address_v4((127u << 24) | (1u << 8) | 17u));
        } catch (const std::system_error&) {
            return asio::post(io_, [complete] { complete(false); });
        }
        auto read = std::make_shared<std::function<void()>>();
        *read = [r, read, complete] {
            const std::size_t old = r->response.size();
            r->response.resize(old + 16384);
            r->sock.async_read_some(
                asio::buffer(&r->response[old], 16384),
                [r, read, complete, old](const asio::error_code& ec, std::size_t n) {
                    r->response.resize(old + (ec ? 0 : n));
                    if (ec) return complete(false);
                    const std::size_t end = r->response.find("\r\n\r\n");
                    if (end != std::string::npos) {
                        const auto length =
                            wsmini::header_value(std::string_view(r->response.data(), end + 2), "Content-Length");
                        if (!length.empty() &&
                            r->response.size() >= end + 4 + std::strtoull(std::string(length).c_str(), nullptr, 10)) {
                            *read = nullptr;  // breaks the cycle
                            return complete(false);
                        }
                    }
                    (*read)();
                });
        };
        r->sock.async_connect(server_, [r, read, complete](const asio::error_code& ec) {
            if (ec) return complete(false);
            asio::async_write(r->sock, asio::buffer(r->request),
                              [read, complete](const asio::error_code& ec, std::size_t) {
                                  if (ec) return complete(false);
                                  (*read)();
                              });
        });
    }

    // Keeps the lines starting with imbus_outbound_bytes or imbus_closes_total: name -> value.
    void parse_metrics(const std::string& response, bool timed_out) {
        metrics_status_ = timed_out          ? "timeout"
                          : response.empty() ? "no answer"
                                             : response.substr(0, response.find("\r\n"));
        if (response.rfind("HTTP/1.1 200", 0) != 0) return;
        const std::size_t body = response.find("\r\n\r\n");
        if (body == std::string::npos) return;
        std::istringstream lines(response.substr(body + 4));
        std::string line;
        while (std::getline(lines, line)) {
            if (!line.empty() && line.back() == '\r') line.pop_back();
            if (line.rfind("imbus_outbound_bytes", 0) != 0 && line.rfind("imbus_closes_total", 0) != 0) continue;
            const std::size_t space = line.rfind(' ');
            if (space == std::string::npos) continue;
            metrics_.emplace_back(line.substr(0, space), line.substr(space + 1));
        }
    }

    static std::string json_number_or_string(const std::string& v) {
        char* end = nullptr;
        const double d = std::strtod(v.c_str(), &end);
        if (!v.empty() && end == v.c_str() + v.size() && std::isfinite(d))
            return fmt(d, d == std::floor(d) && std::fabs(d) < 1e15 ? 0 : 6);
        return "\"" + json_escape(v) + "\"";
    }

    // --- report -------------------------------------------------------------------------------
    void finish() {
        if (finished_) return;
        finished_ = true;
        sampler_.cancel();
        canary_timer_.cancel();
        publish_timer_.cancel();
        deadline_.cancel();
        flood_timer_.cancel();
        const std::size_t n = hostiles_.size();
        const std::size_t opened = flood_mode_ ? (flood_opened_ > 0 ? 1 : 0) : readers_open_;
        const long growth = rss_before_ > 0 && rss_peak_ > 0 ? rss_peak_ - rss_before_ : -1;
        const double per = growth >= 0 && n > 0 ? double(growth) / double(n) : -1;
        const bool canary_ok = canary_published_ > 0 && canary_received_ == canary_published_ &&
                               canary_publish_errors_ == 0 && canary_duplicates_ == 0;
        const bool ok = early_failure_.empty() && !server_gone_ && opened > 0 && canary_ok;
        std::ostringstream j, h;
        j << "{\"mode\":\"" << o_.mode << "\",\"protocol\":\"imbus\",\"label\":\"" << json_escape(o_.label)
          << "\",\"seconds\":" << fmt(o_.seconds, 1) << ",\"attack_s\":" << fmt(attack_seconds_, 2)
          << ",\"rss_cap_hit\":" << (cap_hit_ ? "true" : "false") << ",\"hostile_connections\":" << n
          << ",\"hostile_opened\":" << (flood_mode_ ? flood_opened_ : readers_open_)
          << ",\"hostile_established_at_end\":" << hostile_alive_ << ",\"rcvbuf\":" << o_.rcvbuf
          << ",\"mss\":" << o_.mss;
        if (flood_mode_) {
            j << ",\"pings_sent\":" << flood_bytes_ / 6 << ",\"ping_bytes\":" << flood_bytes_
              << ",\"reconnects\":" << flood_reconnects_ << ",\"connect_failures\":" << flood_failures_;
        } else {
            j << ",\"channel\":\"" << json_escape(o_.channel) << "\",\"readers\":" << n
              << ",\"readers_open\":" << readers_open_ << ",\"readers_failed\":" << readers_failed_
              << ",\"history\":" << history_published_ << ",\"rate\":" << fmt(o_.rate, 1)
              << ",\"payload_bytes\":" << o_.payload_bytes << ",\"published\":" << broadcast_published_
              << ",\"publish_errors\":" << broadcast_publish_errors_ << ",\"late_publishes\":" << broadcast_late_;
        }
        j << ",\"rss_idle_kib\":" << rss_idle_ << ",\"rss_before_kib\":" << rss_before_
          << ",\"rss_peak_kib\":" << rss_peak_ << ",\"rss_end_kib\":" << rss_end_
          << ",\"rss_after_close_kib\":" << rss_after_close_ << ",\"rss_growth_kib\":" << growth
          << ",\"kib_per_hostile_connection\":" << fmt(per, 2) << ",\"rss_samples\":" << samples_
          << ",\"tcp_mem_before_kib\":" << tcp_mem_before_ << ",\"tcp_mem_peak_kib\":" << tcp_mem_peak_
          << ",\"tcp_mem_end_kib\":" << tcp_mem_end_ << ",\"canary_interval_ms\":" << fmt(o_.canary_interval_ms, 1)
          << ",\"canary_published\":" << canary_published_ << ",\"canary_received\":" << canary_received_
          << ",\"canary_publish_errors\":" << canary_publish_errors_ << ",\"canary_late\":" << canary_late_
          << ",\"canary_duplicates\":" << canary_duplicates_ << ",\"canary_reconnects\":" << canary_reconnects_
          << ",\"canary_missed_markers\":" << canary_missed_markers_
          << ",\"canary_other_notifications\":" << canary_other_
          << ",\"canary_p50_ms\":" << ms(canary_latency_.percentile(50))
          << ",\"canary_p99_ms\":" << ms(canary_latency_.percentile(99))
          << ",\"canary_max_ms\":" << ms(canary_latency_.max)
          << ",\"canary_longest_gap_ms\":" << fmt(double(canary_gap_ns_) / 1e6, 3)
          << ",\"canary_post_p99_ms\":" << ms(canary_post_.percentile(99))
          << ",\"server_cpu_s\":" << fmt(server_cpu_, 2) << ",\"metrics_status\":\"" << json_escape(metrics_status_)
          << "\",\"metrics\":{";
        for (std::size_t i = 0; i < metrics_.size(); ++i)
            j << (i ? "," : "") << "\"" << json_escape(metrics_[i].first)
              << "\":" << json_number_or_string(metrics_[i].second);
        j << "}";
        if (!early_failure_.empty()) j << ",\"failure\":\"" << json_escape(early_failure_) << "\"";
        j << ",\"ok\":" << (ok ? "true" : "false") << "}";
        h << "# " << o_.mode << " " << o_.label << ": " << fmt(attack_seconds_, 0) << " s";
        if (flood_mode_)
            h << ", 1 flooding connection: " << flood_bytes_ / 6 << " pings sent, " << flood_reconnects_
              << " reconnects";
        else
            h << ", " << readers_open_ << "/" << n << " non-reading subscribers, " << broadcast_published_
              << " published to " << o_.channel;
        h << "; server RSS " << rss_before_ << " KiB before, peak " << rss_peak_ << ", end " << rss_end_
          << ", after close " << rss_after_close_ << " = " << fmt(per, 1) << " KiB per hostile connection"
          << (cap_hit_ ? " (RSS CAP HIT)" : "") << "; kernel TCP memory (machine) " << tcp_mem_before_ << " -> peak "
          << tcp_mem_peak_ << " KiB"
          << "; canary " << canary_received_ << "/" << canary_published_ << ", latency p50 "
          << ms(canary_latency_.percentile(50)) << " ms, p99 " << ms(canary_latency_.percentile(99)) << " ms, max "
          << ms(canary_latency_.max) << " ms, longest gap " << fmt(double(canary_gap_ns_) / 1e6, 1) << " ms"
          << (ok ? "" : "  FAILED");
        std::cout << j.str() << "\n" << h.str() << std::endl;
        exit_code_ = ok ? 0 : 1;
        // Everything still open goes with the io_context; the process exits next.
        io_.stop();
    }

    options o_;
    asio::io_context io_{1};
    tcp::endpoint server_;
    asio::steady_timer sampler_, step_, canary_timer_, publish_timer_, deadline_, flood_timer_;
    canary_connection canary_;
    std::minstd_rand rng_;
    std::vector<std::unique_ptr<hostile_connection>> hostiles_;
    std::string pad_, ping_block_;
    char buf_[65536];
    bool flood_mode_ = false, attacking_ = false, sampling_peak_ = true, cap_hit_ = false, server_gone_ = false;
    bool canary_warm_ = false, finished_ = false;
    std::chrono::steady_clock::time_point next_canary_;
    std::int64_t attack_start_ = 0, answers_done_ = 0, last_canary_ = 0, canary_gap_ns_ = 0;
    double attack_seconds_ = 0, server_cpu_start_ = 0, server_cpu_ = -1;
    long rss_idle_ = -1, rss_before_ = -1, rss_peak_ = -1, rss_end_ = -1, rss_after_close_ = -1;
    long tcp_mem_before_ = -1, tcp_mem_peak_ = -1, tcp_mem_end_ = -1;
    std::uint64_t samples_ = 0;
    std::size_t errors_shown_ = 0, publish_counter_ = 0, hostile_alive_ = 0;
    // ping flood
    std::uint64_t flood_bytes_ = 0, flood_reconnects_ = 0, flood_failures_ = 0, flood_opened_ = 0;
    // slow readers
    std::size_t next_reader_ = 0, readers_connecting_ = 0, readers_open_ = 0, readers_failed_ = 0;
    std::size_t broadcast_inflight_ = 0;
    std::uint64_t broadcast_requested_ = 0, broadcast_published_ = 0, broadcast_publish_errors_ = 0,
                  broadcast_late_ = 0;
    std::size_t history_requested_ = 0, history_published_ = 0;
    // canary
    std::size_t canary_inflight_ = 0;
    std::uint64_t canary_requested_ = 0, canary_published_ = 0, canary_received_ = 0, canary_publish_errors_ = 0;
    std::uint64_t canary_late_ = 0, canary_duplicates_ = 0, canary_reconnects_ = 0, canary_missed_markers_ = 0,
                  canary_other_ = 0;
    keyset canary_seen_;
    histogram canary_latency_, canary_post_;
    std::string metrics_status_ = "not scraped";
    std::vector<std::pair<std::string, std::string>> metrics_;
    std::string early_failure_;
    int exit_code_ = 1;
};

}  // namespace

int main(int argc, char** argv) {
    options o = parse(argc, argv);
    raise_nofile();
    std::signal(SIGPIPE, SIG_IGN);
    try {
        if (o.mode == "soak") return soak(std::move(o)).run();
        if (o.mode == "pingflood" || o.mode == "slowreaders") return hostile(std::move(o)).run();
        loadgen g(std::move(o));
        return g.run();
    } catch (const std::exception& e) {
        std::cerr << "ws_loadgen: " << e.what() << std::endl;
        return 1;
    }
}
