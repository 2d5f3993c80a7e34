// pg_bench.cpp - imbus::pg_store commits and pg_listener latency on a real PostgreSQL server.
//
// Build (from the repository root):
//   g++ -std=c++17 -O2 -DNDEBUG -I. -I/usr/include/postgresql bench/pg_bench.cpp -lpq -pthread -o /tmp/pg_bench
// Run (IMBUS_PG_CONNINFO: a key=value conninfo of a server where the bench may create and drop
// the database imbus_bench; scripts/pg_cluster.sh starts a throwaway one):
//   /tmp/pg_bench                      # 1, 2, 4, 8, 16 writer threads, 2000 latency samples
//   /tmp/pg_bench --quick              # a smoke run of a few seconds
// (-DIMBUS_BENCH_WRITERS=N: the shared store's pg_store_options::writers instead of the default)
//
// 1. Transactional publishes/s, one notification per transaction (append), from N threads:
//    all sharing one pg_store (its pool of writer connections, as one server process would),
//    the same with group_commit off, and each thread with its own pg_store (as separate
//    processes would); the advisory lock orders them all. The baseline, in the same run, is a
//    bare `BEGIN; INSERT; COMMIT` (three round trips, no lock, no NOTIFY) on N connections.
//    p50/p99: the time of one call (append or the baseline's three statements) under that load.
// 2. Publish-to-dispatch latency: one store commits (one row at a time, waiting for each);
//    a pg_listener on a second store (other connections) dispatches it; the subscriber notes
//    the time. The baseline is a bare NOTIFY/LISTEN round trip between two libpq connections.

#define IMBUS_WITH_POSTGRES
#include "imbus.hpp"

#include <libpq-fe.h>
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using steady = std::chrono::steady_clock;

[[noreturn]] void die(const std::string& what) {
    std::fprintf(stderr, "pg_bench: %s\n", what.c_str());
    std::exit(1);
}

void exec(PGconn* c, const std::string& sql) {
    PGresult* r = PQexec(c, sql.c_str());
    const auto status = PQresultStatus(r);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) die(sql + ": " + PQerrorMessage(c));
    PQclear(r);
}

PGconn* connect(const std::string& conninfo) {
    PGconn* c = PQconnectdb(conninfo.c_str());
    if (PQstatus(c) != CONNECTION_OK) die(std::string("cannot connect: ") + PQerrorMessage(c));
    PQsetNoticeProcessor(
        c, [](void*, const char*) {}, nullptr);
    return c;
}

double percentile(std::vector<double> v, double p) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[std::min(v.size() - 1, std::size_t(p * double(v.size())))];
}

struct rate {
    double per_second;
    double p50_ms, p99_ms;  // of one call, under this load
};

// Transactions per second from `threads` threads for `seconds`, each thread running its worker.
template <class MakeWorker> rate throughput(int threads, double seconds, MakeWorker make_worker) {
    std::atomic<bool> stop{false};
    std::vector<std::thread> pool;
    std::vector<std::function<void()>> workers;
    std::vector<std::vector<double>> ms(static_cast<std::size_t>(threads));
    for (int t = 0; t < threads; ++t) workers.push_back(make_worker());
    const auto start = steady::now();
    for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            while (!stop) {
                const auto before = steady::now();
                workers[std::size_t(t)]();
                ms[std::size_t(t)].push_back(std::chrono::duration<double, std::milli>(steady::now() - before).count());
            }
        });
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    stop = true;
    for (auto& th : pool) th.join();
    std::vector<double> all;
    for (const auto& v : ms) all.insert(all.end(), v.begin(), v.end());
    return {double(all.size()) / std::chrono::duration<double>(steady::now() - start).count(), percentile(all, 0.5),
            percentile(all, 0.99)};
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    const char* base = std::getenv("IMBUS_PG_CONNINFO");
    if (!base || !*base) die("set IMBUS_PG_CONNINFO (eval \"$(bash scripts/pg_cluster.sh start)\")");
    const std::string conninfo = std::string(base) + " dbname=imbus_bench";
    {
        PGconn* admin = connect(base);
        exec(admin, "DROP DATABASE IF EXISTS imbus_bench WITH (FORCE)");
        exec(admin, "CREATE DATABASE imbus_bench");
        PQfinish(admin);
    }
    imbus::pg_store_options quiet;
    quiet.log = imbus::stderr_logger(imbus::log_level::error);
    const double seconds = quick ? 0.5 : 2.0;
    const int samples = quick ? 200 : 2000;

#ifdef NDEBUG
    std::printf("# pg_bench (optimized build)\n\n");
#else
    std::printf("# pg_bench (UNOPTIMIZED build: figures are not representative)\n\n");
#endif
    {
        PGconn* c = connect(conninfo);
        PGresult* r = PQexec(c, "SELECT version()");
        std::printf("server: %s\n\n", PQgetvalue(r, 0, 0));
        PQclear(r);
        PQfinish(c);
    }

    // 1. Publishes per second.
    imbus::pg_store schema(conninfo, quiet);  // creates bus_bus
    {
        PGconn* c = connect(conninfo);
        exec(c,
             "CREATE TABLE IF NOT EXISTS baseline (id bigserial PRIMARY KEY, channel text, message text, "
             "create_date timestamp)");
        PQfinish(c);
    }
    std::printf(
        "| writer threads | one pg_store, shared | shared, group_commit off | one pg_store per thread "
        "| baseline BEGIN/INSERT/COMMIT | shared / baseline | shared p50 / p99 ms | baseline p50 / p99 ms "
        "|\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    const imbus::channel ch("bench", "broadcast");
    const std::string message = imbus::make_message("bench/tick", {{"n", 1}});
    imbus::pg_store_options shared_options = quiet;
#ifdef IMBUS_BENCH_WRITERS
    shared_options.writers = IMBUS_BENCH_WRITERS;  // the shared store's writer connections
#endif
    for (int threads : quick ? std::vector<int>{1, 4} : std::vector<int>{1, 2, 4, 8, 16}) {
        // All threads share one store (its writer connections), as one server process would.
        auto shared_store = [&](bool group_commit) {
            imbus::pg_store_options o = shared_options;
            o.group_commit = group_commit;
            imbus::pg_store shared(conninfo, o);
            return throughput(threads, seconds, [&] {
                return std::function<void()>([&shared, &ch, &message] {
                    shared.append({imbus::pending_message{ch, message}});
                });
            });
        };
        const rate shared_rate = shared_store(true);
        const rate ungrouped_rate = shared_store(false);
        // Each thread has its own store, as separate processes would.
        std::vector<std::unique_ptr<imbus::pg_store>> stores;
        const rate bus_rate = throughput(threads, seconds, [&] {
            stores.push_back(std::make_unique<imbus::pg_store>(conninfo, quiet));
            imbus::pg_store* s = stores.back().get();
            return std::function<void()>([s, &ch, &message] { s->append({imbus::pending_message{ch, message}}); });
        });
        stores.clear();
        std::vector<PGconn*> conns;
        const rate base_rate = throughput(threads, seconds, [&] {
            conns.push_back(connect(conninfo));
            PGconn* c = conns.back();
            return std::function<void()>([c] {
                exec(c, "BEGIN");
                exec(c,
                     "INSERT INTO baseline (channel, message, create_date) VALUES ('[\"bench\",\"broadcast\"]', "
                     "'{\"type\":\"bench/tick\",\"payload\":{\"n\":1}}', now())");
                exec(c, "COMMIT");
            });
        });
        for (auto* c : conns) PQfinish(c);
        std::printf("| %d | %.0f | %.0f | %.0f | %.0f | %.2f | %.2f / %.2f | %.2f / %.2f |\n", threads,
                    shared_rate.per_second, ungrouped_rate.per_second, bus_rate.per_second, base_rate.per_second,
                    shared_rate.per_second / base_rate.per_second, shared_rate.p50_ms, shared_rate.p99_ms,
                    base_rate.p50_ms, base_rate.p99_ms);
        std::fflush(stdout);
    }

    // 2. Publish-to-dispatch latency across two stores.
    std::vector<double> bus_ms, notify_ms;
    {
        imbus::pg_store publisher(conninfo, quiet);
        imbus::pg_store local(conninfo, quiet);
        imbus::dispatcher dispatcher;
        std::mutex m;
        std::condition_variable cv;
        steady::time_point arrived{};
        std::int64_t arrived_id = 0;
        auto sub = dispatcher.subscribe([&](imbus::wakeup& w) {
            const auto now = steady::now();
            std::lock_guard<std::mutex> lock(m);
            for (const auto& d : w.events)
                if (d->has_rows()) arrived_id = std::max(arrived_id, d->last_id());
            arrived = now;
            cv.notify_all();
        });
        sub.set_channels({ch});
        imbus::pg_listener listener(local, dispatcher);
        for (int i = 0; i < samples; ++i) {
            const auto sent = steady::now();
            const auto id = publisher.append({imbus::pending_message{ch, message}})[0].id;
            std::unique_lock<std::mutex> lock(m);
            if (!cv.wait_for(lock, std::chrono::seconds(5), [&] { return arrived_id >= id; }))
                die("a row never arrived");
            bus_ms.push_back(std::chrono::duration<double, std::milli>(arrived - sent).count());
        }
    }
    {
        PGconn* sender = connect(conninfo);
        PGconn* receiver = connect(conninfo);
        exec(receiver, "LISTEN bench");
        for (int i = 0; i < samples; ++i) {
            const auto sent = steady::now();
            exec(sender, "NOTIFY bench");
            for (bool got = false; !got;) {
                pollfd p{PQsocket(receiver), POLLIN, 0};
                if (::poll(&p, 1, 5000) != 1) die("a NOTIFY never arrived");
                PQconsumeInput(receiver);
                while (PGnotify* n = PQnotifies(receiver)) {
                    PQfreemem(n);
                    got = true;
                }
            }
            notify_ms.push_back(std::chrono::duration<double, std::milli>(steady::now() - sent).count());
        }
        PQfinish(sender);
        PQfinish(receiver);
    }
    std::printf("\n| %d samples, one at a time | p50 ms | p99 ms |\n|---|---:|---:|\n", samples);
    std::printf("| commit -> listener -> dispatcher handler | %.2f | %.2f |\n", percentile(bus_ms, 0.5),
                percentile(bus_ms, 0.99));
    std::printf("| baseline: NOTIFY -> LISTEN (bare libpq) | %.2f | %.2f |\n", percentile(notify_ms, 0.5),
                percentile(notify_ms, 0.99));

    PGconn* admin = connect(base);
    exec(admin, "DROP DATABASE IF EXISTS imbus_bench WITH (FORCE)");
    PQfinish(admin);
    return 0;
}
