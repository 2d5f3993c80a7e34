// store_bench.cpp - append and poll costs of imbus::memory_store and imbus::sqlite_store at
// growing table sizes, each figure printed next to a baseline measured in the same run.
//
// Build (from the repository root):
//   g++ -std=c++17 -O2 -DNDEBUG -I. bench/store_bench.cpp -lsqlite3 -pthread -o /tmp/store_bench
// Run:
//   /tmp/store_bench                      # 10k, 100k, 1M rows (about a minute or two)
//   /tmp/store_bench --quick              # 1k, 10k rows: a smoke run of a few seconds
//   /tmp/store_bench --sizes 10000,100000
// See bench/README.md for what every row means.

#define IMBUS_WITH_SQLITE
#include "imbus.hpp"

#include <sqlite3.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using steady = std::chrono::steady_clock;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

struct config {
    std::vector<std::size_t> sizes{10000, 100000, 1000000};
    std::size_t channels = 1000;     // bulk rows go to ["bench","user",i], i < channels
    std::size_t poll_channels = 10;  // a poll asks for this many of them
    std::size_t batch = 100;         // rows per store.append in the batch phase
    std::size_t recent = 100;        // rows appended after the clock jump (first-poll window)
    std::size_t singles_max = 5000;  // rows per one-per-transaction phase (and per size step)
    double poll_seconds = 0.5;       // minimum measuring time per poll figure
    std::string dir;                 // parent of the temporary directory
    bool keep = false;               // keep the SQLite files
};

[[noreturn]] void usage(int code) {
    std::fprintf(code ? stderr : stdout,
                 "usage: store_bench [--quick] [--sizes N,N,...] [--poll-seconds S] [--dir PATH] [--keep]\n"
                 "  --quick          sizes 1000,10000 and short poll loops (a smoke run)\n"
                 "  --sizes          table sizes to measure at, ascending (default 10000,100000,1000000)\n"
                 "  --poll-seconds   minimum time spent measuring each poll figure (default 0.5)\n"
                 "  --dir            where the temporary SQLite directory is made (default: $TMPDIR or /tmp)\n"
                 "  --keep           keep the SQLite files and print where they are\n");
    std::exit(code);
}

config parse_args(int argc, char** argv) {
    config c;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(2);
            return argv[++i];
        };
        if (a == "--quick") {
            c.sizes = {1000, 10000};
            c.poll_seconds = 0.1;
        } else if (a == "--sizes") {
            c.sizes.clear();
            std::stringstream ss(value());
            std::string item;
            while (std::getline(ss, item, ',')) {
                if (item.empty()) continue;
                char* end = nullptr;
                const unsigned long long n = std::strtoull(item.c_str(), &end, 10);
                if (!end || *end) usage(2);
                c.sizes.push_back(std::size_t(n));
            }
        } else if (a == "--poll-seconds") {
            c.poll_seconds = std::atof(value().c_str());
        } else if (a == "--dir") {
            c.dir = value();
        } else if (a == "--keep") {
            c.keep = true;
        } else if (a == "-h" || a == "--help") {
            usage(0);
        } else {
            std::fprintf(stderr, "unknown argument: %s\n", a.c_str());
            usage(2);
        }
    }
    std::sort(c.sizes.begin(), c.sizes.end());
    c.sizes.erase(std::unique(c.sizes.begin(), c.sizes.end()), c.sizes.end());
    if (c.sizes.empty()) usage(2);
    if (c.sizes.front() < 1000) {
        std::fprintf(stderr, "sizes must be at least 1000\n");
        std::exit(2);
    }
    return c;
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

double seconds_since(steady::time_point t0) { return std::chrono::duration<double>(steady::now() - t0).count(); }

std::string read_first_line_with(const char* path, const char* prefix) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line))
        if (line.rfind(prefix, 0) == 0) {
            auto colon = line.find(':');
            std::string v = colon == std::string::npos ? line : line.substr(colon + 1);
            v.erase(0, v.find_first_not_of(" \t"));
            return v;
        }
    return "unknown";
}

std::string read_file_line(const char* path) {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    return line.empty() ? "unknown" : line;
}

std::string grouped(double v) {  // 1234567.8 -> "1,234,568"
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.0f", v);
    std::string s = buf, out;
    const std::size_t start = (s[0] == '-') ? 1 : 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (i > start && (s.size() - i) % 3 == 0) out += ',';
        out += s[i];
    }
    return out;
}

std::string size_label(std::size_t n) {
    if (n % 1000000 == 0) return std::to_string(n / 1000000) + "M";
    if (n % 1000 == 0) return std::to_string(n / 1000) + "k";
    return std::to_string(n);
}

std::string fmt(const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

// Bytes this process has passed to write(2)/pwrite(2) so far (/proc/self/io wchar); 0 if unknown.
// SQLite runs no background threads here, so the delta over a phase is that phase's writes.
double written_bytes() {
    std::ifstream in("/proc/self/io");
    std::string key;
    double v = 0;
    while (in >> key >> v)
        if (key == "wchar:") return v;
    return 0;
}

std::uint64_t splitmix64(std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// ---------------------------------------------------------------------------------------------
// The workload: channels, the one message, which row goes where
// ---------------------------------------------------------------------------------------------

struct workload {
    std::vector<imbus::channel> channels;
    std::vector<char> is_poll;             // per channel index
    std::vector<std::size_t> poll_index;   // the polled channel indices
    std::vector<imbus::channel> poll_set;  // the polled channels
    imbus::json payload;
    std::string message;  // ~100 bytes, built once with make_message

    explicit workload(const config& c) {
        channels.reserve(c.channels);
        for (std::size_t i = 0; i < c.channels; ++i) channels.emplace_back("bench", "user", std::int64_t(i));
        is_poll.assign(c.channels, 0);
        for (std::size_t j = 0; j < c.poll_channels; ++j) {
            const std::size_t i = j * (c.channels / c.poll_channels);
            poll_index.push_back(i);
            poll_set.push_back(channels[i]);
            is_poll[i] = 1;
        }
        payload = {{"text", std::string(56, 'x')}, {"seq", 123456}, {"ok", true}};
        message = imbus::make_message("bench/event", payload);
    }
    // The channel of the k-th bulk row of a store: uniform over all channels, the same
    // sequence for every store so their tables have the same content.
    std::size_t bulk_channel(std::uint64_t k) const { return std::size_t(splitmix64(k) % channels.size()); }
    std::size_t recent_channel(std::uint64_t j) const { return poll_index[j % poll_index.size()]; }
};

std::int64_t micros(imbus::time_point t) {
    return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
}

// ---------------------------------------------------------------------------------------------
// Targets. Every target gets the same sequence of rows; `rows` counts what it holds.
//   append_batch(n, chan):  n rows in one store call / one transaction
//   append_single(chan):    one row in one store call / one transaction
// ---------------------------------------------------------------------------------------------

using chan_fn = std::function<std::size_t(std::uint64_t)>;

struct target {
    virtual ~target() = default;
    virtual void append_batch(std::size_t n, std::uint64_t k0, const chan_fn& chan) = 0;
    virtual void append_single(std::size_t ch) = 0;
    std::uint64_t rows = 0;
};

// imbus store (memory or SQLite), through store.append; singles also through bus.send.
struct imbus_target final : target {
    imbus::store& store;
    imbus::bus bus;
    const workload& w;
    std::vector<std::int64_t> poll_ids;  // ids stored on the polled channels, ascending
    bool via_bus = false;                // append_single through bus.send instead of store.append

    imbus_target(imbus::store& s, const workload& w) : store(s), bus(s, imbus::bus_options{"bench", {}}), w(w) {}

    void append_batch(std::size_t n, std::uint64_t k0, const chan_fn& chan) override {
        std::vector<imbus::pending_message> batch;
        batch.reserve(n);
        for (std::size_t i = 0; i < n; ++i)
            batch.push_back(imbus::pending_message{w.channels[chan(k0 + i)], w.message});
        const auto stored = store.append(std::move(batch));
        for (std::size_t i = 0; i < n; ++i)
            if (w.is_poll[chan(k0 + i)]) poll_ids.push_back(stored[i].id);
        rows += n;
    }
    void append_single(std::size_t ch) override {
        std::int64_t id;
        if (via_bus) {
            id = bus.send(w.channels[ch], "bench/event", w.payload).at(0);
        } else {
            std::vector<imbus::pending_message> batch;
            batch.push_back(imbus::pending_message{w.channels[ch], w.message});
            id = store.append(std::move(batch)).at(0).id;
        }
        if (w.is_poll[ch]) poll_ids.push_back(id);
        rows += 1;
    }
};

// Memory baseline: the same rows pushed into a std::vector, no index, no locking.
struct vector_target final : target {
    struct row {
        std::int64_t id;
        std::string key;
        std::string message;
        std::int64_t created_us;
    };
    std::vector<row> table;
    const workload& w;
    imbus::clock_function clock;
    std::int64_t next_id = 0;

    vector_target(const workload& w, imbus::clock_function clock) : w(w), clock(std::move(clock)) {}

    void append_batch(std::size_t n, std::uint64_t k0, const chan_fn& chan) override {
        const std::int64_t now = micros(clock());  // one clock read per batch, as the store does
        for (std::size_t i = 0; i < n; ++i)
            table.push_back(row{++next_id, w.channels[chan(k0 + i)].key(), w.message, now});
        rows += n;
    }
    void append_single(std::size_t ch) override {
        const std::int64_t now = micros(clock());
        table.push_back(row{++next_id, w.channels[ch].key(), w.message, now});
        rows += 1;
    }
};

// Raw sqlite3: prepared INSERT, BEGIN IMMEDIATE/COMMIT per batch, WAL, synchronous=NORMAL.
struct raw_sqlite_target final : target {
    sqlite3* db = nullptr;
    sqlite3_stmt* begin = nullptr;
    sqlite3_stmt* commit = nullptr;
    sqlite3_stmt* insert = nullptr;
    const workload& w;
    imbus::clock_function clock;

    static void check(sqlite3* db, int rc, const char* what) {
        if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
            throw std::runtime_error(std::string("sqlite: ") + what + ": " + sqlite3_errmsg(db));
    }
    void exec(const char* sql) {
        char* err = nullptr;
        if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK) {
            std::string e = err ? err : "?";
            sqlite3_free(err);
            throw std::runtime_error(std::string("sqlite: ") + sql + ": " + e);
        }
    }
    sqlite3_stmt* prepare(const char* sql) {
        sqlite3_stmt* s = nullptr;
        check(db, sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &s, nullptr), sql);
        return s;
    }
    void step(sqlite3_stmt* s) {
        const int rc = sqlite3_step(s);
        sqlite3_reset(s);
        if (rc != SQLITE_DONE && rc != SQLITE_ROW) check(db, rc, sqlite3_sql(s));
    }

    raw_sqlite_target(const std::string& path, const char* schema, const workload& w, imbus::clock_function clock)
        : w(w), clock(std::move(clock)) {
        if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                            nullptr) != SQLITE_OK)
            throw std::runtime_error("cannot open " + path);
        sqlite3_busy_timeout(db, 5000);
        exec("PRAGMA journal_mode=WAL");
        exec("PRAGMA synchronous=NORMAL");
        exec(schema);
        begin = prepare("BEGIN IMMEDIATE");
        commit = prepare("COMMIT");
        insert = prepare("INSERT INTO bus_bus (channel, message, create_date) VALUES (?1, ?2, ?3)");
    }
    ~raw_sqlite_target() override {
        sqlite3_finalize(begin);
        sqlite3_finalize(commit);
        sqlite3_finalize(insert);
        sqlite3_close_v2(db);
    }
    void put(std::size_t ch, std::int64_t now) {
        const std::string& key = w.channels[ch].key();
        sqlite3_bind_text(insert, 1, key.data(), int(key.size()), SQLITE_STATIC);
        sqlite3_bind_text(insert, 2, w.message.data(), int(w.message.size()), SQLITE_STATIC);
        sqlite3_bind_int64(insert, 3, now);
        step(insert);
    }
    void append_batch(std::size_t n, std::uint64_t k0, const chan_fn& chan) override {
        const std::int64_t now = micros(clock());
        step(begin);
        for (std::size_t i = 0; i < n; ++i) put(chan(k0 + i), now);
        step(commit);
        rows += n;
    }
    void append_single(std::size_t ch) override {
        const std::int64_t now = micros(clock());
        step(begin);
        put(ch, now);
        step(commit);
        rows += 1;
    }
};

const char* const baseline_schema =
    "CREATE TABLE IF NOT EXISTS bus_bus ("
    " id INTEGER PRIMARY KEY,"
    " channel TEXT NOT NULL,"
    " message TEXT NOT NULL,"
    " create_date INTEGER NOT NULL);";

// The schema imbus creates (sqlite_store::create_schema), for the attribution row.
const char* const imbus_schema =
    "CREATE TABLE IF NOT EXISTS bus_bus ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " channel TEXT NOT NULL,"
    " message TEXT NOT NULL,"
    " create_date INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS bus_bus_channel_id ON bus_bus (channel, id);"
    "CREATE INDEX IF NOT EXISTS bus_bus_create_date ON bus_bus (create_date);";

// ---------------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------------

struct rate {
    double per_second = 0;
    double bytes_per_row = 0;  // written to files by the process during the phase
};

// Appends `count` bulk rows in batches.
rate time_bulk(target& t, std::size_t count, std::size_t batch, const workload& w) {
    const chan_fn chan = [&w](std::uint64_t k) { return w.bulk_channel(k); };
    const double w0 = written_bytes();
    const auto t0 = steady::now();
    std::size_t done = 0;
    while (done < count) {
        const std::size_t n = std::min(batch, count - done);
        t.append_batch(n, t.rows, chan);
        done += n;
    }
    const double secs = seconds_since(t0);
    return {double(count) / secs, (written_bytes() - w0) / double(count)};
}

// Appends `count` rows one per call/transaction.
rate time_singles(target& t, std::size_t count, const workload& w) {
    const double w0 = written_bytes();
    const auto t0 = steady::now();
    for (std::size_t i = 0; i < count; ++i) t.append_single(w.bulk_channel(t.rows));
    const double secs = seconds_since(t0);
    return {double(count) / secs, (written_bytes() - w0) / double(count)};
}

struct loop_stats {
    double mean_us = 0;
    double p50_us = 0;
    std::size_t iterations = 0;
    std::size_t rows = 0;  // rows one call returned
};

// Runs f() repeatedly (after 5 warm-up calls) and times every call.
template <class F> loop_stats time_loop(F&& f, double min_seconds) {
    loop_stats s;
    for (int i = 0; i < 5; ++i) s.rows = f();
    std::vector<double> samples;
    samples.reserve(4096);
    const auto start = steady::now();
    double total = 0;
    // Enough: min_seconds and 50 calls, or 4 x min_seconds and 5 calls (slow calls).
    while (!((total >= min_seconds && samples.size() >= 50) || (total >= 4 * min_seconds && samples.size() >= 5)) &&
           samples.size() < 5000000) {
        const auto t0 = steady::now();
        s.rows = f();
        const double us = std::chrono::duration<double, std::micro>(steady::now() - t0).count();
        samples.push_back(us);
        total = seconds_since(start);
    }
    double sum = 0;
    for (double v : samples) sum += v;
    s.iterations = samples.size();
    s.mean_us = sum / double(samples.size());
    std::nth_element(samples.begin(), samples.begin() + std::ptrdiff_t(samples.size() / 2), samples.end());
    s.p50_us = samples[samples.size() / 2];
    return s;
}

// ---------------------------------------------------------------------------------------------
// Results and printing
// ---------------------------------------------------------------------------------------------

struct append_row {
    std::string store, mode, baseline;
    std::size_t size = 0, timed = 0;
    rate r, base;
    double target = 0;  // notifications/s; 0 = none
};

struct poll_row {
    std::string store;
    std::size_t size = 0;
    loop_stats s;
};

struct lookup_row {
    std::size_t size = 0;
    loop_stats as_is, plus_id;
};

const char* verdict(bool ok) { return ok ? "PASS" : "MISS"; }

void print_machine(const config& c, const std::string& dir) {
    std::printf("# imbus store benchmark\n\n");
    std::printf("| machine | |\n|---|---|\n");
    std::printf("| nproc | %ld |\n", sysconf(_SC_NPROCESSORS_ONLN));
    std::printf("| CPU | %s |\n", read_first_line_with("/proc/cpuinfo", "model name").c_str());
    std::printf("| load average at start | %s |\n", read_file_line("/proc/loadavg").c_str());
#if defined(__clang__)
    std::printf("| compiler | clang %s |\n", __VERSION__);
#elif defined(__GNUC__)
    std::printf("| compiler | g++ %s |\n", __VERSION__);
#else
    std::printf("| compiler | unknown |\n");
#endif
#ifdef NDEBUG
    const char* ndebug = "NDEBUG";
#else
    const char* ndebug = "assertions on";
#endif
#ifdef __OPTIMIZE__
    const char* opt = "optimized";
#else
    const char* opt = "NOT optimized";
#endif
    std::printf("| build | %s, %s, C++ %ld |\n", opt, ndebug, long(__cplusplus));
    std::printf("| SQLite | %s (header %s) |\n", sqlite3_libversion(), SQLITE_VERSION);
    std::printf("| imbus | %s |\n", imbus::version_string().c_str());
    std::printf("| SQLite files in | %s |\n", dir.c_str());
    std::string sizes;
    for (auto n : c.sizes) sizes += (sizes.empty() ? "" : ", ") + size_label(n);
    std::printf("| sizes | %s |\n", sizes.c_str());
    std::printf("| workload | %zu channels [\"bench\",\"user\",i]; %zu-row batches; polls of %zu channels |\n\n",
                c.channels, c.batch, c.poll_channels);
    std::fflush(stdout);
}

int run(const config& cfg, const fs::path& dir, steady::time_point run_start) {
    print_machine(cfg, dir.string());

    const workload w(cfg);
    imbus::manual_clock clock;
    const imbus::clock_function clock_fn = std::ref(clock);
    const auto quiet = imbus::logger{};

    // The stores under test.
    imbus::memory_store_options mopt;
    mopt.clock = clock_fn;
    mopt.retention = std::chrono::hours(24 * 365);  // the clock jumps must never reach it
    mopt.log = quiet;
    imbus::memory_store mem(mopt);

    imbus::sqlite_store_options sopt;  // the store's defaults: WAL, synchronous=NORMAL
    sopt.clock = clock_fn;
    sopt.retention = std::chrono::hours(24 * 365);
    sopt.log = quiet;
    imbus::sqlite_store sql((dir / "imbus.db").string(), sopt);

    imbus_target mem_t(mem, w), sql_t(sql, w);
    vector_target vec_t(w, clock_fn);
    raw_sqlite_target raw_t((dir / "baseline.db").string(), baseline_schema, w, clock_fn);
    raw_sqlite_target rawi_t((dir / "raw_imbus_schema.db").string(), imbus_schema, w, clock_fn);
    std::vector<target*> all{&mem_t, &vec_t, &sql_t, &raw_t, &rawi_t};

    std::vector<append_row> appends;
    std::vector<poll_row> polls, first_polls;
    std::vector<lookup_row> lookups;

    // A read-only connection on the imbus database for the window-lookup diagnosis.
    sqlite3* diag = nullptr;
    sqlite3_open_v2((dir / "imbus.db").string().c_str(), &diag, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, nullptr);
    sqlite3_stmt* q_as_is = nullptr;
    sqlite3_stmt* q_plus = nullptr;
    sqlite3_prepare_v2(diag, "SELECT min(id) FROM bus_bus WHERE create_date >= ?1", -1, &q_as_is, nullptr);
    sqlite3_prepare_v2(diag, "SELECT min(+id) FROM bus_bus WHERE create_date >= ?1", -1, &q_plus, nullptr);
    auto run_lookup = [&](sqlite3_stmt* q, std::int64_t since) -> std::size_t {
        sqlite3_bind_int64(q, 1, since);
        std::size_t r = 0;
        if (sqlite3_step(q) == SQLITE_ROW) r = std::size_t(sqlite3_column_int64(q, 0) != 0);
        sqlite3_reset(q);
        return r;
    };

    std::size_t have = 0;
    for (const std::size_t size : cfg.sizes) {
        const std::size_t increment = size - have;
        const std::size_t singles = std::min(cfg.singles_max, increment / 10);
        if (increment < 2 * singles + cfg.recent + cfg.batch) {
            std::fprintf(stderr, "sizes too close together: %zu after %zu\n", size, have);
            return 2;
        }
        const std::size_t bulk = increment - 2 * singles - cfg.recent;
        std::fprintf(stderr, "[%6.1fs] size %s: %zu bulk rows in batches of %zu, 2x%zu single rows, %zu recent rows\n",
                     seconds_since(run_start), size_label(size).c_str(), bulk, cfg.batch, singles, cfg.recent);

        // 1. Bulk rows in batches (all at the current clock time).
        const rate r_mem = time_bulk(mem_t, bulk, cfg.batch, w);
        const rate r_vec = time_bulk(vec_t, bulk, cfg.batch, w);
        std::fprintf(stderr, "[%6.1fs]   memory done\n", seconds_since(run_start));
        const rate r_sql = time_bulk(sql_t, bulk, cfg.batch, w);
        std::fprintf(stderr, "[%6.1fs]   sqlite imbus done\n", seconds_since(run_start));
        const rate r_raw = time_bulk(raw_t, bulk, cfg.batch, w);
        const rate r_rawi = time_bulk(rawi_t, bulk, cfg.batch, w);
        std::fprintf(stderr, "[%6.1fs]   sqlite baselines done\n", seconds_since(run_start));
        const std::string b = std::to_string(cfg.batch);
        appends.push_back(
            {"memory", "store.append, " + b + "/call", "std::vector push_back", size, bulk, r_mem, r_vec, 1e6});
        appends.push_back(
            {"sqlite", "store.append, " + b + "/tx", "raw INSERT, no index", size, bulk, r_sql, r_raw, 1e5});
        appends.push_back({"sqlite (raw)", "raw INSERT, imbus schema, " + b + "/tx", "raw INSERT, no index", size, bulk,
                           r_rawi, r_raw, 0});

        // 2. One row per call / per transaction: store.append, then bus.send.
        mem_t.via_bus = false;
        sql_t.via_bus = false;
        const rate s_mem = time_singles(mem_t, singles, w);
        const rate s_sql = time_singles(sql_t, singles, w);
        mem_t.via_bus = true;
        sql_t.via_bus = true;
        const rate s_mem_bus = time_singles(mem_t, singles, w);
        const rate s_sql_bus = time_singles(sql_t, singles, w);
        const rate s_vec = time_singles(vec_t, 2 * singles, w);
        const rate s_raw = time_singles(raw_t, 2 * singles, w);
        const rate s_rawi = time_singles(rawi_t, 2 * singles, w);
        std::fprintf(stderr, "[%6.1fs]   singles done\n", seconds_since(run_start));
        appends.push_back({"memory", "store.append, 1/call", "std::vector push_back", size, singles, s_mem, s_vec, 0});
        appends.push_back(
            {"memory", "bus.send (transaction), 1/call", "std::vector push_back", size, singles, s_mem_bus, s_vec, 0});
        appends.push_back({"sqlite", "store.append, 1/tx", "raw INSERT, no index", size, singles, s_sql, s_raw, 1e4});
        appends.push_back(
            {"sqlite", "bus.send (transaction), 1/tx", "raw INSERT, no index", size, singles, s_sql_bus, s_raw, 1e4});
        appends.push_back({"sqlite (raw)", "raw INSERT, imbus schema, 1/tx", "raw INSERT, no index", size, 2 * singles,
                           s_rawi, s_raw, 0});

        // 3. Jump the clock past the first-poll window, then the recent rows on the polled channels.
        clock.advance(std::chrono::minutes(10));
        const chan_fn recent = [&w](std::uint64_t j) { return w.recent_channel(j); };
        for (target* t : all) t->append_batch(cfg.recent, 0, recent);
        have = size;
        for (target* t : all)
            if (t->rows != size) {
                std::fprintf(stderr, "internal error: a target holds %llu rows, expected %zu\n",
                             (unsigned long long)t->rows, size);
                return 1;
            }

        // 4. Polls: the newest ~100 rows on the polled channels, then a first poll (last = 0).
        for (imbus_target* t : {&mem_t, &sql_t}) {
            const std::string name = t == &mem_t ? "memory" : "sqlite";
            const std::size_t back = std::min<std::size_t>(cfg.recent + 1, t->poll_ids.size());
            const std::int64_t last = t->poll_ids[t->poll_ids.size() - back];
            polls.push_back(
                {name, size,
                 time_loop([&] { return t->store.fetch(w.poll_set, last).notifications.size(); }, cfg.poll_seconds)});
            first_polls.push_back(
                {name, size,
                 time_loop([&] { return t->store.fetch(w.poll_set, 0).notifications.size(); }, cfg.poll_seconds)});
        }
        const std::int64_t since = micros(clock() - sopt.first_poll_window);
        lookups.push_back({size, time_loop([&] { return run_lookup(q_as_is, since); }, cfg.poll_seconds / 2),
                           time_loop([&] { return run_lookup(q_plus, since); }, cfg.poll_seconds / 2)});
        std::fprintf(stderr, "[%6.1fs]   polls done\n", seconds_since(run_start));
    }

    sqlite3_finalize(q_as_is);
    sqlite3_finalize(q_plus);
    sqlite3_close_v2(diag);

    // ---- Tables ----
    std::printf("## 1-2. Append throughput (notifications/s)\n\n");
    std::printf(
        "Rows timed = the rows appended while growing the table to the size shown. "
        "Ratio = imbus rate / baseline rate (1.00 = as fast as the baseline). "
        "Bytes written/row = bytes the process handed to write(2) during the phase (WAL frames, checkpoints), "
        "divided by the rows timed.\n\n");
    std::printf(
        "| store | mode | table size | rows timed | notifications/s | baseline | baseline notifications/s | ratio | "
        "target | result | bytes written/row (baseline) |\n");
    std::printf("|---|---|---:|---:|---:|---|---:|---:|---|---|---:|\n");
    auto print_appends = [&](const std::string& store, const std::string& mode_prefix) {
        for (const auto& r : appends) {
            if (r.store != store || r.mode.rfind(mode_prefix, 0) != 0) continue;
            std::string tgt = r.target > 0 ? "≥ " + grouped(r.target) + "/s" : "—";
            std::string res = r.target > 0 ? verdict(r.r.per_second >= r.target) : "—";
            std::string io =
                r.store == "memory" ? "—" : grouped(r.r.bytes_per_row) + " (" + grouped(r.base.bytes_per_row) + ")";
            std::printf("| %s | %s | %s | %s | %s | %s | %s | %.2f | %s | %s | %s |\n", r.store.c_str(), r.mode.c_str(),
                        size_label(r.size).c_str(), grouped(double(r.timed)).c_str(), grouped(r.r.per_second).c_str(),
                        r.baseline.c_str(), grouped(r.base.per_second).c_str(), r.r.per_second / r.base.per_second,
                        tgt.c_str(), res.c_str(), io.c_str());
        }
    };
    const std::string bs = std::to_string(cfg.batch);
    print_appends("memory", "store.append, " + bs);
    print_appends("memory", "store.append, 1/");
    print_appends("memory", "bus.send");
    print_appends("sqlite", "store.append, " + bs);
    print_appends("sqlite (raw)", "raw INSERT, imbus schema, " + bs);
    print_appends("sqlite", "store.append, 1/");
    print_appends("sqlite", "bus.send");
    print_appends("sqlite (raw)", "raw INSERT, imbus schema, 1/");
    std::printf("\n");

    auto print_polls = [&](const std::vector<poll_row>& rows, const char* title, const char* what) {
        std::printf("## %s\n\n%s Ratio = mean at this size / mean at the smallest size (%s), same store.\n\n", title,
                    what, size_label(cfg.sizes.front()).c_str());
        std::printf(
            "| store | table size | rows returned | mean µs/poll | p50 µs/poll | polls timed | ratio vs %s | target | "
            "result |\n",
            size_label(cfg.sizes.front()).c_str());
        std::printf("|---|---:|---:|---:|---:|---:|---:|---|---|\n");
        for (const char* store : {"memory", "sqlite"}) {
            double base = 0;
            for (const auto& r : rows) {
                if (r.store != store) continue;
                if (base == 0) base = r.s.mean_us;
                const double ratio = r.s.mean_us / base;
                const bool largest = r.size == cfg.sizes.back() && cfg.sizes.size() > 1;
                std::printf("| %s | %s | %zu | %s | %s | %zu | %.2f | %s | %s |\n", store, size_label(r.size).c_str(),
                            r.s.rows, fmt("%.1f", r.s.mean_us).c_str(), fmt("%.1f", r.s.p50_us).c_str(), r.s.iterations,
                            ratio, largest ? "≤ 2.00" : "—", largest ? verdict(ratio <= 2.0) : "—");
            }
        }
        std::printf("\n");
    };
    print_polls(polls, "3. Poll: 10 channels, the newest ~100 notifications (last = an id ~100 rows back)",
                "store.fetch(10 channels, last) with `last` the id 101 rows back on those channels.");
    print_polls(first_polls, "4. First poll: last = 0, 50-second window, only the newest 100 rows inside it",
                "store.fetch(10 channels, 0); every older row was stored 10 minutes (manual_clock) earlier.");

    std::printf("## Diagnosis: the SQLite first-poll window lookup, raw SQL on the imbus database\n\n");
    std::printf(
        "`as is` = the statement sqlite_store runs (`SELECT min(id) FROM bus_bus WHERE create_date >= ?`); "
        "`min(+id)` = the same with the min/max optimisation disabled so SQLite uses the create_date index. "
        "Ratio = as is / min(+id).\n\n");
    std::printf("| table size | as is µs | min(+id) µs | ratio |\n|---:|---:|---:|---:|\n");
    for (const auto& l : lookups)
        std::printf("| %s | %s | %s | %.1f |\n", size_label(l.size).c_str(), fmt("%.1f", l.as_is.mean_us).c_str(),
                    fmt("%.1f", l.plus_id.mean_us).c_str(), l.as_is.mean_us / l.plus_id.mean_us);
    std::printf("\n");

    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const config cfg = parse_args(argc, argv);
    const auto run_start = steady::now();

    // Temporary directory for the SQLite files.
    const fs::path parent = cfg.dir.empty() ? fs::temp_directory_path() : fs::path(cfg.dir);
    std::string templ = (parent / "imbus-bench-XXXXXX").string();
    std::vector<char> tbuf(templ.begin(), templ.end());
    tbuf.push_back('\0');
    if (!mkdtemp(tbuf.data())) {
        std::perror("mkdtemp");
        return 1;
    }
    const fs::path dir = tbuf.data();

    int rc = 1;
    try {
        rc = run(cfg, dir, run_start);  // every store and connection is closed when it returns
    } catch (const std::exception& e) {
        std::fprintf(stderr, "store_bench: %s\n", e.what());
    }

    struct rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    std::printf("Total time %.1f s; peak RSS %.0f MiB; load average at end %s.\n", seconds_since(run_start),
                double(ru.ru_maxrss) / 1024.0, read_file_line("/proc/loadavg").c_str());
    std::error_code ec;
    if (cfg.keep) std::printf("SQLite files kept in %s\n", dir.string().c_str());
    else fs::remove_all(dir, ec);
    return rc;
}
