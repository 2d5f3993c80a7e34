// imbus.hpp - a real-time notification bus for C++17, in one header.
//
// imbus follows the architecture of the Odoo bus: applications send notifications on
// channels inside their own transaction; at commit the notifications are stored and the
// dispatcher wakes the live connections subscribed to those channels; clients poll "what
// happened after my last id" so that nothing is lost across reconnects.
// docs/ARCHITECTURE.md walks through this file: one notification's path, threads, and Odoo.
//
// Contents (each section's declarations are under "N. Title" below, its code under "--- N."
// in the Implementation part, in the same order; the order follows a notification's path):
//     Configuration (macros), Includes, then Declarations:
//      1. Time: clocks, errors, logging        7. Cross-process listener: pg_listener
//      2. Channels                              8. Auth policies: admission, public and signed
//      3. Notifications                            token policies, http_request
//      4. Stores: memory, SQLite, PostgreSQL    9. Client requests (the WebSocket's JSON)
//      5. Bus and transactions                 10. Presence (opt-in)
//      6. Dispatcher and follower              11. Server: basic_server, server_options, metrics
//                                              12. Client: basic_client (native programs)
//
// The path of one notification (docs/ARCHITECTURE.md §2 tells each step, with Odoo's names):
//     transaction::send                  buffers it (Odoo: _sendone)
//     transaction::commit                pre-commit hooks, then the store writes the batch:
//       memory_store / sqlite_store ::write_tx::commit, pg_store via detail::pg_run_commit
//                                        ids in commit order
//     commit_event::from_rows            the rows, encoded once for every recipient
//     bus::publish -> dispatcher::notify wakes each subscriber of the channels once
//       (another process: pg_store's NOTIFY imbus -> pg_listener -> dispatcher::notify)
//     dispatcher::lane::run -> dispatcher::drain      on the connection's I/O thread
//     detail::connection_feed::on_wakeup -> follower::take_into   the rows this connection has
//                                        not had (the feed: what a connection is sent, and when)
//     connection_feed::send -> detail::outbound_connection::flush_outbound   one gather write
//     js/websocket_worker.js -> js/bus_service.js     one socket per browser, one service per tab
//
// Quick start (core only, no network):
//
//     #define IMBUS_WITH_SQLITE            // optional: the SQLite store (link -lsqlite3)
//     #include "imbus.hpp"
//
//     imbus::memory_store store;                       // or imbus::sqlite_store("bus.db")
//     imbus::dispatcher dispatcher;
//     imbus::bus bus(store, dispatcher, {"mydb"});
//     auto sub = dispatcher.subscribe([](imbus::wakeup& w) { /* w.events: committed rows */ });
//     sub.set_channels({bus.channel_for("broadcast")});
//     bus.send("broadcast", "chat/message", {{"text", "hello"}});   // stored, then dispatched
//
// Several processes on one PostgreSQL database: each has one listener that dispatches every
// commit, its own included (docs/PROTOCOL.md §3: NOTIFY imbus at commit):
//
//     #define IMBUS_WITH_POSTGRES
//     imbus::pg_store store("host=... dbname=app");    // or pg_store(app_pgconn) for the outbox
//     imbus::bus_options options;
//     options.dispatch_on_commit = false;              // the listener is the one dispatch path
//     imbus::bus bus(store, dispatcher, options);
//     imbus::pg_listener listener(store, dispatcher);
//
// A server browsers connect to (docs/PROTOCOL.md §4-5), with the public policy or your own:
//
//     #define IMBUS_WITH_WEBSOCKETPP
//     #include "imbus.hpp"
//
//     imbus::server server(bus, imbus::public_policy({bus.channel_for("broadcast")}));
//     server.listen("127.0.0.1", 8080);
//     server.run();                    // server.stop() from any thread closes with 1001
//
// Opt-in parts (each only ADDS code; nothing changes layout when it is off):
//     IMBUS_WITH_SQLITE       sqlite_store                   link: SQLite::SQLite3 / -lsqlite3
//     IMBUS_WITH_POSTGRES     pg_store, pg_listener          link: PostgreSQL::PostgreSQL / -lpq
//     IMBUS_WITH_WEBSOCKETPP  basic_server, client           needs websocketpp + standalone Asio
//                             (defines ASIO_STANDALONE)      link: -pthread
//     IMBUS_WITH_TLS          tls_transport: wss://          with IMBUS_WITH_WEBSOCKETPP; link OpenSSL
//     IMBUS_WITH_PRESENCE     presence_tracker: online/away/offline for any policy (see "Presence")
//
// Configuration macros (define before including to change a compile-time default; each is
// also a runtime option of the class that uses it, except the three marked "compile-time only"):
//     IMBUS_FIRST_POLL_WINDOW_SECONDS   50     a first poll (last == 0) returns this much history
//     IMBUS_RETENTION_SECONDS           86400  notifications older than this are garbage
//     IMBUS_MAX_PENDING_WAKEUPS         1024   per subscriber; beyond it the subscriber re-polls
//     IMBUS_SQLITE_BUSY_TIMEOUT_MS      5000   how long a SQLite connection waits for a lock
//     IMBUS_SQLITE_GC_CHUNK             5000   rows deleted per SQLite garbage-collection transaction
//                                              (compile-time only; pg_store_options::gc_chunk for PostgreSQL)
//     IMBUS_SQLITE_ID_BLOCK             1000   SQLite ids reserved ahead per synced commit (power cuts;
//                                              compile-time only)
//     IMBUS_PROTOCOL_VERSION            "19.0-2"  clients with another version are told OUTDATED_VERSION
//     IMBUS_MAX_MESSAGE_BYTES           1 MiB  a bigger client message closes with 1009
//     IMBUS_MAX_JSON_DEPTH              512    client JSON nested deeper is refused (stack safety)
//     IMBUS_MAX_OUTBOUND_BYTES          1 MiB  queued for one client before it is caught up from the store
//     IMBUS_MAX_OUTBOUND_TOTAL        256 MiB  queued for all clients; above it the largest queues wait
//     IMBUS_READ_BUFFER_BYTES           512    per-connection read buffer (compile-time only: websocketpp;
//                                              an integer literal, part of basic_server's mangled name)
//
// Threading model:
//     channel, notification, commit_event: values; immutable once shared.
//     memory_store, sqlite_store, pg_store, pg_listener, dispatcher, bus: every member
//     function is thread-safe.
//     transaction, follower: one thread at a time (a transaction is the unit of one caller).
//     task_thread: thread-safe; its tasks run on its one thread, in order (an executor).
//     dispatcher handlers run on the subscriber's executor, never concurrently with themselves.
//     Stores and dispatchers must outlive the buses, transactions and subscriptions using them.
//     basic_server, basic_client: thread-safe; a server runs one shard per I/O thread (an event
//     loop that owns the connections it accepted), and the auth policy is called from every
//     I/O thread at once (make it thread-safe).
//
// Dependencies: nlohmann/json (always); SQLite 3 (IMBUS_WITH_SQLITE); libpq 14 or later, for
// pipeline mode (IMBUS_WITH_POSTGRES); websocketpp 0.8 and standalone Asio (IMBUS_WITH_WEBSOCKETPP);
// OpenSSL (IMBUS_WITH_TLS).

#ifndef IMBUS_HPP
#define IMBUS_HPP

// ============================================================================================
// Configuration
// ============================================================================================

#define IMBUS_VERSION_MAJOR 0
#define IMBUS_VERSION_MINOR 1
#define IMBUS_VERSION_PATCH 0

#ifndef IMBUS_FIRST_POLL_WINDOW_SECONDS
#define IMBUS_FIRST_POLL_WINDOW_SECONDS 50
#endif

#ifndef IMBUS_RETENTION_SECONDS
#define IMBUS_RETENTION_SECONDS 86400
#endif

#ifndef IMBUS_MAX_PENDING_WAKEUPS
#define IMBUS_MAX_PENDING_WAKEUPS 1024
#endif

#ifndef IMBUS_SQLITE_BUSY_TIMEOUT_MS
#define IMBUS_SQLITE_BUSY_TIMEOUT_MS 5000
#endif

#ifndef IMBUS_PROTOCOL_VERSION
#define IMBUS_PROTOCOL_VERSION "19.0-2"  // the Odoo 19 bus protocol
#endif

#ifndef IMBUS_MAX_MESSAGE_BYTES
#define IMBUS_MAX_MESSAGE_BYTES 1048576
#endif

#ifndef IMBUS_MAX_JSON_DEPTH
#define IMBUS_MAX_JSON_DEPTH 512
#endif

#ifndef IMBUS_MAX_OUTBOUND_BYTES
#define IMBUS_MAX_OUTBOUND_BYTES 1048576
#endif

#ifndef IMBUS_MAX_OUTBOUND_TOTAL
#define IMBUS_MAX_OUTBOUND_TOTAL 268435456
#endif

#ifndef IMBUS_READ_BUFFER_BYTES
#define IMBUS_READ_BUFFER_BYTES 512
#endif

// A macro that changes a type's layout names the inline namespace that type lives in, so two
// translation units built with different values fail to link (a missing symbol) instead of
// sharing one copy of code that disagrees about the layout. Layout macros must be integer literals.
#define IMBUS_DETAIL_CONCAT2(a, b) a##b
#define IMBUS_DETAIL_CONCAT(a, b) IMBUS_DETAIL_CONCAT2(a, b)
#define IMBUS_ABI_NAMESPACE IMBUS_DETAIL_CONCAT(abi_read_buffer_, IMBUS_READ_BUFFER_BYTES)

#ifndef IMBUS_SQLITE_GC_CHUNK
#define IMBUS_SQLITE_GC_CHUNK 5000
#endif

// SQLite ids reserved ahead per synced commit (sqlite_store::reserve_ids): after a power cut a
// file store continues above the reservation, so no id a client saw is handed out again.
#ifndef IMBUS_SQLITE_ID_BLOCK
#define IMBUS_SQLITE_ID_BLOCK 1000
#endif

// ============================================================================================
// Includes
// ============================================================================================

#include <algorithm>           // sort, lower_bound, partition_point
#include <array>               // digests
#include <cctype>              // case-insensitive header names
#include <cerrno>              // pg_listener's poll()
#include <condition_variable>  // client waits, the SQL stores' writer gate
#include <atomic>              // manual_clock, subscriber state
#include <chrono>              // created_at, windows, retention
#include <cstdint>             // int64_t ids
#include <cstdio>              // snprintf of metric values
#include <deque>               // memory_store rows, trimmed at the front by garbage collection
#include <fstream>             // static_files
#include <functional>          // clocks, loggers, handlers, executors
#include <iostream>            // stderr_logger
#include <limits>
#include <map>     // labelled metrics
#include <memory>  // shared commit events, subscriber entries
#include <mutex>
#include <optional>
#include <random>  // lifetime jitter
#include <stdexcept>
#include <thread>        // server and client I/O threads
#include <shared_mutex>  // many pollers, one appender
#include <string>
#include <string_view>
#include <system_error>  // errc, error_code overloads
#include <type_traits>   // the bus_channel customisation point
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#ifdef IMBUS_WITH_SQLITE
#include <sqlite3.h>
#endif

#ifdef IMBUS_WITH_POSTGRES
#include <libpq-fe.h>
#include <poll.h>         // pg_listener waits on its connection and its stop signal at once
#include <sys/eventfd.h>  // pg_listener's stop signal
#include <unistd.h>
#endif

#ifdef IMBUS_WITH_WEBSOCKETPP
#ifndef ASIO_STANDALONE
#define ASIO_STANDALONE  // websocketpp on standalone Asio, not Boost
#endif
#include <websocketpp/client.hpp>
#include <websocketpp/config/asio_no_tls.hpp>
#include <websocketpp/config/asio_no_tls_client.hpp>
#include <websocketpp/server.hpp>
#ifdef IMBUS_WITH_TLS
#include <websocketpp/config/asio.hpp>  // wss:// (OpenSSL)
#include <websocketpp/config/asio_client.hpp>
#endif
#endif

// ============================================================================================
// Declarations
// ============================================================================================

namespace imbus {

using json = nlohmann::json;

/// "0.1.0"
std::string version_string();

// --------------------------------------------------------------------------------------------
// 1. Time: every store reads time through a clock_function, so tests can move time by hand.
// --------------------------------------------------------------------------------------------

using clock_type = std::chrono::system_clock;
using time_point = clock_type::time_point;
using clock_function = std::function<time_point()>;

/// The real UTC clock.
clock_function system_clock();

/// A clock that moves only when told to, so the 50-second window is tested without sleeping.
/// Thread-safe. Pass `std::ref(clock)` wherever a clock_function is expected.
class manual_clock {
public:
    explicit manual_clock(time_point start = time_point(std::chrono::hours(24 * 20000)));
    time_point operator()() const noexcept;
    void advance(clock_type::duration by) noexcept;
    void set(time_point to) noexcept;

private:
    std::atomic<clock_type::rep> ticks_;
};

// --------------------------------------------------------------------------------------------
// Errors and logging
// --------------------------------------------------------------------------------------------
//
// One rule: setup and misuse throw (std::system_error with an imbus::errc; std::invalid_argument
// for a bad option). What an application calls on its normal path has, in addition, an overload
// taking std::error_code& that never throws: channel parsing (channel::from_json, from_key),
// publishing (bus::send, transaction::send, transaction::commit) and the network entry points
// (basic_server::listen and run, basic_client::connect). Store members only throw: the bus
// turns a store's failure into errc::store_failure on commit, and the server into a retry.

enum class errc {
    invalid_channel = 1,   // not one of the channel shapes, or not valid UTF-8
    invalid_message,       // the type or payload cannot be serialized (invalid UTF-8)
    transaction_finished,  // the transaction was already committed or rolled back
    hook_failed,           // a pre-commit hook threw: the transaction was rolled back
    store_failure,         // the store could not write or read; nothing was committed
    subscription_closed,   // set_channels on a dispatcher subscription that was closed or moved from
};

const std::error_category& error_category() noexcept;
std::error_code make_error_code(errc e) noexcept;

enum class log_level { debug, info, warning, error };

/// Where imbus reports what it contained instead of crashing (bad input, throwing handlers).
using logger = std::function<void(log_level, const std::string&)>;

/// Writes messages at or above `threshold` to std::clog.
logger stderr_logger(log_level threshold = log_level::warning);

}  // namespace imbus

namespace std {
template <> struct is_error_code_enum<imbus::errc> : true_type {};
}  // namespace std

namespace imbus {

// --------------------------------------------------------------------------------------------
// 2. Channels (Odoo: the tuples given to _sendone and their JSON form in bus_bus.channel)
// --------------------------------------------------------------------------------------------

/// A channel: [db, name], [db, model, id] or [db, model, id, sub]. Its identity is its
/// canonical key, the compact JSON text Python's json.dumps(..., separators=(',',':')) prints,
/// so that a store shared with other implementations matches rows byte for byte.
class channel {
public:
    channel() = default;  ///< the empty channel: matches nothing
    channel(std::string_view db, std::string_view name);
    channel(std::string_view db, std::string_view model, std::int64_t id);
    channel(std::string_view db, std::string_view model, std::int64_t id, std::string_view sub);

    /// From a JSON array of one of the three shapes; throws std::system_error(invalid_channel).
    static channel from_json(const json& j);
    static channel from_json(const json& j, std::error_code& ec);
    /// From canonical text; text that is not canonical (spaces, other escapes) is rejected.
    static channel from_key(std::string_view key);
    static channel from_key(std::string_view key, std::error_code& ec);

    /// The same record with a sub-channel: [db, model, id] -> [db, model, id, sub].
    channel with_sub(std::string_view sub) const;

    const std::string& key() const noexcept { return key_; }
    std::size_t size() const noexcept { return size_; }  ///< 2, 3 or 4 elements; 0 when empty
    bool empty() const noexcept { return key_.empty(); }
    json to_json() const;

    friend bool operator==(const channel& a, const channel& b) noexcept { return a.key_ == b.key_; }
    friend bool operator!=(const channel& a, const channel& b) noexcept { return a.key_ != b.key_; }
    friend bool operator<(const channel& a, const channel& b) noexcept { return a.key_ < b.key_; }

private:
    std::string key_;
    std::size_t size_ = 0;
};

/// A record of the application, named like an Odoo record: channel [db, model, id(, sub)].
struct record {
    std::string model;
    std::int64_t id = 0;
    std::string sub = {};  ///< empty: the record's own channel (initialized: record{"m", 7} warns not)
};

// The channel mapping (Odoo: _bus_channel). An application type T becomes a channel by
// declaring `R bus_channel(const T&)` in T's namespace, where R is a channel, a record, a
// channel name, a std::pair<target, sub>, or another type with a bus_channel of its own;
// to_channel follows the chain to its fixed point (a user maps to its partner, the partner
// to a record, the record to a channel).
channel to_channel(std::string_view db, const channel& c);
channel to_channel(std::string_view db, std::string_view name);
channel to_channel(std::string_view db, const std::string& name);
channel to_channel(std::string_view db, const char* name);
channel to_channel(std::string_view db, const record& r);
template <class Target> channel to_channel(std::string_view db, const std::pair<Target, std::string>& target_and_sub);
template <class Target> channel to_channel(std::string_view db, const Target& target);

// --------------------------------------------------------------------------------------------
// 3. Notifications (Odoo: a bus_bus row)
// --------------------------------------------------------------------------------------------

/// A stored notification. `message` keeps the JSON text {"type":T,"payload":P} exactly as it
/// was serialized once at send(), so stores and sockets pass it on without re-encoding.
struct notification {
    std::int64_t id = 0;
    imbus::channel channel;
    std::string message;
    time_point created_at{};

    std::string type() const;  ///< parsed from message
    json payload() const;      ///< parsed from message
    /// The wire form {"id":N,"message":{"type":T,"payload":P}}.
    std::string wire() const;
    json to_json() const;
};

/// The message text of one notification; throws std::system_error(invalid_message).
std::string make_message(std::string_view type, const json& payload);

/// A JSON array of wire forms: what one dispatch sends to a client.
std::string make_frame(const std::vector<notification>& notifications);

/// A notification waiting in a transaction for its id.
struct pending_message {
    imbus::channel channel;
    std::string message;
};

// --------------------------------------------------------------------------------------------
// 4. Stores (Odoo: the bus_bus table and _poll)
// --------------------------------------------------------------------------------------------

struct store_options {
    clock_function clock = system_clock();
    /// A first poll (last == 0) returns what was created this recently.
    std::chrono::seconds first_poll_window{IMBUS_FIRST_POLL_WINDOW_SECONDS};
    /// collect_garbage() deletes what is older than this.
    std::chrono::seconds retention{IMBUS_RETENTION_SECONDS};
    logger log = stderr_logger();
};

/// What a poll found, and how far it can vouch: every id <= horizon that will ever exist on
/// the polled channels is either in `notifications` or at or below `last`.
struct poll_result {
    std::vector<notification> notifications;
    std::int64_t horizon = 0;
};

/// The interface every store implements. Ids are strictly increasing in commit order: a
/// reader that has seen id N never later sees a new id below N. Thread-safe.
class store {
public:
    /// One write transaction. For SQL stores it is a database transaction on the connection
    /// the application writes with, so bus rows commit together with the application's rows.
    class write_transaction {
    public:
        virtual ~write_transaction() = default;
        /// Pre-commit and commit: stores the batch in call order and commits. Returns the
        /// stored rows with their ids. Throws std::system_error and rolls back on failure.
        virtual std::vector<notification> commit(std::vector<pending_message>& batch) = 0;
        virtual void rollback() noexcept = 0;
    };

    virtual ~store() = default;

    /// Opens a write transaction (for SQL stores: BEGIN on the writer connection).
    virtual std::unique_ptr<write_transaction> begin() = 0;

    /// The notifications on `channels` after `last`, ascending ids (docs/PROTOCOL.md §2): `last == 0`
    /// means the first-poll window, a negative `last` every row; `last` above the newest id
    /// (a reset store) counts as 0.
    /// At most `limit` rows when limit > 0 (the oldest ones); with max_bytes > 0, no row after
    /// the one whose message brings the total to max_bytes, so that the cost of a read follows
    /// the bytes a client may be sent, not the rows stored. A cut page's horizon is its last row.
    virtual poll_result fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit = 0,
                              std::size_t max_bytes = 0) = 0;
    std::vector<notification> poll(const std::vector<channel>& channels, std::int64_t last, std::size_t limit = 0);

    virtual std::int64_t newest_id() = 0;  ///< newest id ever assigned; 0 for a new store
    virtual std::int64_t oldest_id() = 0;  ///< oldest id still stored; 0 when empty
    virtual bool contains(std::int64_t id) = 0;
    /// Deletes notifications older than the retention; returns how many.
    virtual std::size_t collect_garbage() = 0;

    /// Odoo's /bus/has_missed_notifications: row `last` is gone, so rows after it may be too.
    bool has_missed(std::int64_t last) { return last > 0 && !contains(last); }

    /// Whether a client that saw every row of `channels` up to `last` missed some: rows of
    /// these channels above `last` were deleted unread (retention, a size cap), or the store
    /// was reset under it (`last` above the newest id). Only the client's own channels count,
    /// so a quiet channel does not look like a loss. The default, for a store that does not
    /// remember what it deleted per channel, answers for every channel at once.
    virtual bool lost_after(const std::vector<channel>& channels, std::int64_t last);

    /// Stores one batch in its own transaction.
    std::vector<notification> append(std::vector<pending_message> batch);
};

struct memory_store_options : store_options {
    /// Keep at most this many notifications (oldest dropped first); 0 = bounded by retention only.
    std::size_t max_notifications = 0;
};

/// Notifications in memory, indexed per channel so a poll never scans other channels' rows.
/// Garbage is collected as it is appended, so memory stays bounded by the retention.
class memory_store final : public store {
public:
    explicit memory_store(memory_store_options options = {});

    std::unique_ptr<write_transaction> begin() override;
    poll_result fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit = 0,
                      std::size_t max_bytes = 0) override;
    std::int64_t newest_id() override;
    std::int64_t oldest_id() override;
    bool contains(std::int64_t id) override;
    std::size_t collect_garbage() override;
    bool lost_after(const std::vector<channel>& channels, std::int64_t last) override;
    std::size_t size();

private:
    struct channel_rows {
        imbus::channel channel;
        std::deque<std::int64_t> ids;  // ascending
    };
    struct row {
        std::int64_t id;
        channel_rows* rows;  // stable: unordered_map nodes never move
        std::string message;
        time_point created_at;
    };
    class write_tx;

    std::vector<notification> commit_locked(std::vector<pending_message>& batch);
    std::size_t collect_locked(time_point now);
    const row& row_at(std::int64_t id) const { return rows_[std::size_t(id - rows_.front().id)]; }

    memory_store_options options_;
    std::shared_mutex mutex_;
    std::deque<row> rows_;  // ids are contiguous: rows_[i].id == rows_.front().id + i
    std::unordered_map<std::string, channel_rows> by_channel_;
    std::int64_t newest_id_ = 0;
    time_point newest_created_{};
    // The newest deleted id of each channel, for lost_after; past detail::dropped_channels_kept
    // channels the map is folded into dropped_floor_ (any channel may have lost up to there).
    std::unordered_map<std::string, std::int64_t> dropped_;
    std::int64_t dropped_floor_ = 0;
};

namespace detail {
/// Channels whose newest deleted id memory_store keeps for lost_after (then folded into one floor).
constexpr std::size_t dropped_channels_kept = 65536;

/// The SQL stores' writer lock, held from BEGIN to COMMIT. Unlike a mutex it may be released by
/// another thread than the one that took it: a transaction is movable and may commit anywhere.
/// The thread that holds it may take it again (its own reads of an in-memory database).
class writer_gate {
public:
    void lock();
    void unlock() noexcept;

private:
    std::mutex mutex_;
    std::condition_variable free_;
    std::thread::id holder_;
    std::size_t depth_ = 0;
};
}  // namespace detail

#ifdef IMBUS_WITH_SQLITE
namespace detail {
class sqlite_statement;
struct sqlite_reader;
struct sqlite_collector;
}  // namespace detail

struct sqlite_store_options : store_options {
    /// For files the store opens itself: journal_mode=WAL, so polls never wait for writers.
    bool wal = true;
    /// For files the store opens itself: PRAGMA synchronous (NORMAL is durable in WAL
    /// except for the last commits before a power cut; FULL survives that too).
    std::string synchronous = "NORMAL";
    std::chrono::milliseconds busy_timeout{IMBUS_SQLITE_BUSY_TIMEOUT_MS};
    /// Reader connections kept open for polls (more are opened under load, then closed).
    std::size_t idle_readers = 4;
    /// For files the store opens itself: the name of a registered sqlite3_vfs for the writer
    /// and the readers (e.g. a test's power-cut shim); empty: SQLite's default.
    std::string vfs;
};

/// Notifications in a SQLite `bus_bus` table (id, channel, message, create_date in
/// microseconds since the Unix epoch, UTC), indexed by (channel, id) and by create_date so a
/// poll costs the same at a million rows as at ten thousand. Either owns its database file,
/// or shares the application's own sqlite3* connection so bus rows commit atomically with the
/// application's rows (the outbox pattern). Thread-safe; polls use separate reader
/// connections when the database is a file. A borrowed connection must outlive the store and
/// must not be used by the application from another thread while an imbus transaction is open.
/// collect_garbage() on a borrowed file database uses a connection of its own, so it never
/// joins a transaction of the application's; a borrowed in-memory database has no other
/// connection: collect its garbage on the thread that uses it (server_options::gc_interval 0).
class sqlite_store final : public store {
public:
    explicit sqlite_store(const std::string& path, sqlite_store_options options = {});
    explicit sqlite_store(sqlite3* application_connection, sqlite_store_options options = {});
    ~sqlite_store() override;
    sqlite_store(const sqlite_store&) = delete;
    sqlite_store& operator=(const sqlite_store&) = delete;

    std::unique_ptr<write_transaction> begin() override;
    poll_result fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit = 0,
                      std::size_t max_bytes = 0) override;
    std::int64_t newest_id() override;
    std::int64_t oldest_id() override;
    bool contains(std::int64_t id) override;
    std::size_t collect_garbage() override;
    bool lost_after(const std::vector<channel>& channels, std::int64_t last) override;

    sqlite3* connection() const noexcept { return db_; }

private:
    class write_tx;
    struct writer_statements;
    template <class F> auto with_reader(F&& f);
    std::unique_ptr<detail::sqlite_reader> open_reader();
    void create_schema();
    bool reserves_ids() const noexcept { return !path_.empty(); }
    void reserve_ids(std::int64_t handed_out);

    sqlite_store_options options_;
    sqlite3* db_ = nullptr;
    bool owns_db_ = false;
    std::string path_;  // empty: an in-memory database; polls go through db_
    detail::writer_gate writer_mutex_;
    std::unique_ptr<writer_statements> writer_;
    std::unique_ptr<detail::sqlite_reader> writer_reader_;  // used when path_ is empty
    std::mutex collector_mutex_;
    std::unique_ptr<detail::sqlite_collector> collector_;  // a borrowed file's garbage goes through it
    std::mutex readers_mutex_;
    std::vector<std::unique_ptr<detail::sqlite_reader>> idle_readers_;
};
#endif  // IMBUS_WITH_SQLITE

#ifdef IMBUS_WITH_POSTGRES
namespace detail {
class pg_connection;
class pg_writer_pool;
}  // namespace detail

struct pg_store_options : store_options {
    /// Where poll connections and pg_listener connect (a libpq conninfo string or URI). Empty:
    /// like the writer connection (a borrowed connection's own parameters, from PQconninfo).
    std::string conninfo;
    /// Reader connections kept open for polls (more are opened under load, then closed).
    std::size_t idle_readers = 4;
    /// Writer connections of a store that owns them (the first at construction, the others when
    /// concurrent commits need them): commits on different ones overlap their round trips and
    /// wait for each other only from the advisory lock to COMMIT. 0 counts as 1. Two suffice
    /// with group_commit (one commit holds the lock while the next is on its way); more only
    /// queue up at the lock (measured in bench/README.md).
    std::size_t writers = 2;
    /// When every writer connection is busy, the next one given back commits all the batches
    /// waiting for one in a single transaction (each keeps its rows together, in call order),
    /// so they share one lock-to-commit section. If that transaction fails and surely rolled
    /// back, each batch is committed again on its own, so one bad batch fails only its caller.
    bool group_commit = true;
    /// Rows deleted per garbage-collection statement, so a big backlog never holds locks long.
    std::size_t gc_chunk = 5000;
};

/// Notifications in a PostgreSQL `bus_bus` table (id bigserial, channel, message, create_date
/// as a UTC timestamp), indexed by (channel, id) and by create_date, created if missing.
/// A commit takes a transaction-level advisory lock before it takes ids, inserts the batch,
/// NOTIFYs `imbus` with its channels and commits, all in one round trip (libpq pipeline
/// mode): bus-writing transactions of every process commit in id order, so a poll vouches up
/// to the newest id of its snapshot and needs no hold-back (anything else writing bus_bus must
/// take the same lock before its ids, as Odoo's own writers do not). Either owns its writer
/// connections (a pool of up to `writers`, its statements prepared once per connection) or
/// borrows the application's PGconn* so bus rows commit atomically with the application's
/// rows (the outbox pattern). Thread-safe: each commit has a writer connection to itself (a
/// borrowed one is used under a mutex), polls use a pool of reader connections. A borrowed
/// connection must outlive the store and must not be used by the application from another
/// thread while an imbus transaction is open; the store never resets it nor prepares
/// statements on it (its own connections are reset when the server dropped them).
class pg_store final : public store {
public:
    /// The key of the advisory lock every bus-writing transaction holds from its ids to its commit.
    static constexpr std::int64_t advisory_lock_key = 0x696d627573;  // "imbus"
    /// The NOTIFY channel; each payload is a JSON array of channel keys below 8000 bytes.
    static constexpr const char* notify_channel = "imbus";

    explicit pg_store(const std::string& conninfo, pg_store_options options = {});
    explicit pg_store(PGconn* application_connection, pg_store_options options = {});
    ~pg_store() override;
    pg_store(const pg_store&) = delete;
    pg_store& operator=(const pg_store&) = delete;

    std::unique_ptr<write_transaction> begin() override;
    poll_result fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit = 0,
                      std::size_t max_bytes = 0) override;
    std::int64_t newest_id() override;
    std::int64_t oldest_id() override;
    bool contains(std::int64_t id) override;
    bool lost_after(const std::vector<channel>& channels, std::int64_t last) override;
    std::size_t collect_garbage() override;

    PGconn* connection() const noexcept;  ///< the borrowed connection, or the first writer connection
    /// What reader connections and pg_listener connect with.
    const std::string& conninfo() const noexcept { return conninfo_; }
    const pg_store_options& options() const noexcept { return options_; }
    /// Commits waiting now for a writer connection (every one busy): the next group's size.
    std::size_t waiting_commits();

private:
    class borrowed_write_tx;
    class owned_write_tx;
    template <class F> auto with_reader(F&& f);
    std::unique_ptr<detail::pg_connection> open_connection() const;
    void create_schema();

    pg_store_options options_;
    std::string conninfo_;
    // Held by a borrowed connection's transaction from BEGIN to its end; recursive, so a second
    // begin() on the same thread gets the "already inside a transaction" error, not a deadlock.
    detail::writer_gate writer_mutex_;
    std::unique_ptr<detail::pg_connection> writer_;  // borrowed: the application's; owned: the first
    // Owned writer connections only, writer_ among them; null when writer_ is the application's.
    std::unique_ptr<detail::pg_writer_pool> writers_;
    std::mutex readers_mutex_;
    std::vector<std::unique_ptr<detail::pg_connection>> idle_readers_;
};

#endif  // IMBUS_WITH_POSTGRES

// --------------------------------------------------------------------------------------------
// 5. Bus and transactions (Odoo: _sendone, _ensure_hooks, precommit and postcommit)
// --------------------------------------------------------------------------------------------

// Declared below: the bus tells the dispatcher what each commit stored.
class dispatcher;
struct commit_event;

struct bus_options {
    std::string db = "imbus";  ///< the first element of every channel this bus makes
    logger log = stderr_logger();
    /// The post-commit step tells the dispatcher. False when a pg_listener dispatches every
    /// row, this process's own included: one path keeps the dispatcher's sequence in id order
    /// (rows from two paths interleave out of order, and each such event makes followers poll).
    bool dispatch_on_commit = true;
};

class transaction;

/// The application's entry point: makes channels, opens transactions, and runs the
/// post-commit step (tell the dispatcher). Thread-safe.
class bus {
public:
    bus(imbus::store& s, dispatcher& d, bus_options options = {});
    explicit bus(imbus::store& s, bus_options options = {});  ///< store only: nobody is woken

    const std::string& db() const noexcept { return options_.db; }
    imbus::store& store() noexcept { return store_; }
    bool has_dispatcher() const noexcept { return dispatcher_ != nullptr; }
    /// The dispatcher the post-commit step tells; throws if the bus was made without one.
    dispatcher& get_dispatcher() const;
    const logger& log() const noexcept { return options_.log; }
    bool dispatches_on_commit() const noexcept { return options_.dispatch_on_commit; }

    template <class Target> channel channel_for(const Target& target) const { return to_channel(options_.db, target); }

    /// Autocommit: one notification in its own transaction. Returns its ids.
    template <class Target> std::vector<std::int64_t> send(const Target& target, std::string_view type,
                                                           const json& payload, std::error_code& ec);
    template <class Target>
    std::vector<std::int64_t> send(const Target& target, std::string_view type, const json& payload);

    /// The post-commit step for rows stored outside a transaction of this bus.
    void publish(std::shared_ptr<const commit_event> event);

private:
    imbus::store& store_;
    dispatcher* dispatcher_ = nullptr;
    bus_options options_;
};

/// The application's transaction with the bus's commit hooks. send() only buffers; commit()
/// runs the pre-commit hooks, stores the buffered notifications in call order and commits
/// (with a SQL store on the application's connection, together with the application's own
/// writes since the transaction began), then the post-commit step dispatches. Rollback, or
/// destruction without commit, stores and sends nothing. One thread at a time.
class transaction {
public:
    explicit transaction(imbus::bus& b);  ///< begins: for SQL stores, BEGIN IMMEDIATE
    ~transaction();                       ///< rolls back if still open
    transaction(transaction&&) noexcept = default;
    transaction& operator=(transaction&&) = delete;
    transaction(const transaction&) = delete;

    /// Buffers a notification (Odoo: _sendone).
    template <class Target>
    void send(const Target& target, std::string_view type, const json& payload, std::error_code& ec);
    template <class Target> void send(const Target& target, std::string_view type, const json& payload);

    /// Runs inside the transaction just before the bus rows are written; a throw rolls back.
    void on_precommit(std::function<void()> hook);
    /// Runs after the commit and the dispatch; a throw is logged.
    void on_postcommit(std::function<void()> hook);

    /// Returns the ids of the stored notifications; on failure nothing is stored or sent.
    std::vector<std::int64_t> commit(std::error_code& ec);
    std::vector<std::int64_t> commit();
    void rollback() noexcept;

    bool open() const noexcept { return store_tx_ != nullptr; }
    std::size_t pending() const noexcept { return batch_.size(); }

private:
    imbus::bus* bus_;
    std::unique_ptr<store::write_transaction> store_tx_;
    std::vector<pending_message> batch_;
    std::vector<std::function<void()>> precommit_;
    std::vector<std::function<void()>> postcommit_;
};

// --------------------------------------------------------------------------------------------
// 6. Dispatcher (Odoo: ImDispatch and _channels_to_ws)
// --------------------------------------------------------------------------------------------

/// What one commit tells the dispatcher (Odoo: the NOTIFY payload, plus the rows themselves
/// so that live connections need not poll the store). Immutable and shared by all recipients.
struct commit_event {
    std::vector<channel> channels;            ///< de-duplicated, in first-send order
    std::vector<notification> notifications;  ///< the stored rows, ascending; empty for a bare wake-up
    std::vector<std::string> wire;            ///< wire form of each row, serialized once for everybody
    /// When this process learned of the commit: the start of the publish-to-send latency.
    std::chrono::steady_clock::time_point noticed_at = std::chrono::steady_clock::now();

    /// A wake-up naming channels only (e.g. from another process): subscribers poll the store.
    static std::shared_ptr<const commit_event> wake_up(std::vector<channel> channels);
    /// The event for committed rows: channels and wire forms are derived from them.
    static std::shared_ptr<const commit_event> from_rows(std::vector<notification> rows);
    /// The event for every row with an id in (after, rows.back().id], read in one snapshot
    /// (pg_listener): ids missing from the rows were rolled back and will never exist.
    static std::shared_ptr<const commit_event> from_range(std::int64_t after, std::vector<notification> rows);

    bool has_rows() const noexcept { return !notifications.empty(); }
    std::int64_t first_id() const noexcept { return has_rows() ? notifications.front().id : 0; }
    std::int64_t last_id() const noexcept { return has_rows() ? notifications.back().id : 0; }
    /// Rows with ids first_id()..last_id() and nothing in between from any other commit.
    bool contiguous() const noexcept;
    /// Set by from_range; -1 for the rows of one commit, which vouch only for their own ids.
    std::int64_t complete_after = -1;
    /// The rows are every row that will ever exist with an id in (after(), last_id()]: they are
    /// contiguous, or a complete range whose missing ids were rolled back.
    bool complete() const noexcept { return has_rows() && (complete_after >= 0 || contiguous()); }
    std::int64_t after() const noexcept { return complete_after >= 0 ? complete_after : first_id() - 1; }

    /// A transport's encoding of all the rows (a frame, or frames of a capped size), made once
    /// by `make` and then shared by every recipient: fan-out costs one encoding, not one per
    /// connection. The first caller's encoding is kept (one server per process frames it).
    template <class T, class Make> std::shared_ptr<const T> shared_frame(Make&& make) const {
        std::call_once(frame_once_, [&] { frame_ = std::shared_ptr<const void>(make()); });
        return std::static_pointer_cast<const T>(frame_);
    }

private:
    mutable std::once_flag frame_once_;
    mutable std::shared_ptr<const void> frame_;
};

/// One event as one dispatcher delivered it. `epoch` changes whenever the dispatcher sees ids
/// it was never told about (another process, a late or reordered notify): within one epoch,
/// every row below an event's first id was delivered before it, which lets a follower skip
/// the ids of other channels without asking the store.
struct delivery {
    std::shared_ptr<const commit_event> event;
    std::uint64_t epoch = 0;  ///< 0: unknown, never trusted

    const commit_event* operator->() const noexcept { return event.get(); }
    const commit_event& operator*() const noexcept { return *event; }
    operator std::shared_ptr<const commit_event>() const { return event; }
};

/// Everything that reached one subscriber since its handler last ran (coalesced wake-ups).
struct wakeup {
    std::vector<delivery> events;  ///< in notification order
    /// Events were dropped because the subscriber fell behind: catch up from the store.
    bool overflowed = false;
};

/// Runs a task: the server queues it on the connection's shard; empty means "run inline".
using executor = std::function<void(std::function<void()>)>;

struct dispatcher_options {
    /// Events queued per subscriber before they are dropped in favour of a store catch-up.
    std::size_t max_pending = IMBUS_MAX_PENDING_WAKEUPS;
    logger log = stderr_logger();
};

/// Maps channel keys to subscribers and wakes each subscriber once per notify; wake-ups that
/// arrive while a subscriber's handler has not yet run are coalesced into its next run.
/// Thread-safe. Must outlive its subscriptions and the tasks it gave to executors.
class dispatcher {
    struct entry;

public:
    using handler = std::function<void(wakeup&)>;

    /// Where many subscribers' handlers run one after another (e.g. one event loop): a commit
    /// queues all the lane's subscribers it wakes at once and posts the lane once, instead of
    /// a task per subscriber, and the lane serves them a slice at a time.
    class lane {
    public:
        /// `post` makes the lane's thread call run() soon; it is called once per run() needed.
        explicit lane(std::function<void()> post) : post_(std::move(post)) {}
        lane(const lane&) = delete;
        lane& operator=(const lane&) = delete;
        /// Runs the handlers of up to `limit` woken subscribers, in the order they were woken,
        /// and posts itself again first when more are waiting. On the lane's thread only.
        void run(std::size_t limit);
        /// Subscribers woken and waiting for their turn.
        std::size_t waiting() const;

    private:
        friend class dispatcher;
        void wake(std::vector<std::shared_ptr<entry>>& woken, const logger& log);
        void unwind() noexcept;
        std::function<void()> post_;
        mutable std::mutex mutex_;  // guards the two below
        std::deque<std::shared_ptr<entry>> ready_;
        bool posted_ = false;
        std::vector<std::shared_ptr<entry>> running_;  // the slice being run (lane's thread)
    };

    /// A subscriber's handle: owns its place in the dispatcher; leaving happens on destruction.
    class subscription {
    public:
        subscription() = default;
        subscription(subscription&&) noexcept = default;
        subscription& operator=(subscription&& other) noexcept;
        ~subscription() { close(); }

        /// Replaces the channel set: channels not in `channels` are left.
        void set_channels(const std::vector<channel>& channels);
        std::vector<channel> channels() const;
        /// Leaves every channel; no handler runs after the one (if any) already running.
        void close() noexcept;
        explicit operator bool() const noexcept { return entry_ != nullptr; }

    private:
        friend class dispatcher;
        subscription(dispatcher* owner, std::shared_ptr<entry> e) : owner_(owner), entry_(std::move(e)) {}
        dispatcher* owner_ = nullptr;
        std::shared_ptr<entry> entry_;
    };

    explicit dispatcher(dispatcher_options options = {});
    dispatcher(const dispatcher&) = delete;
    dispatcher& operator=(const dispatcher&) = delete;

    /// A subscriber with no channels yet. `run` decides where the handler runs.
    subscription subscribe(handler on_wakeup, executor run = {});
    /// A subscriber whose handler runs on `where`, which must outlive the subscription.
    subscription subscribe(handler on_wakeup, lane& where);

    /// The post-commit step: wakes every distinct subscriber of the event's channels once.
    void notify(std::shared_ptr<const commit_event> event);

    /// The current epoch (see delivery); a follower reads it before it polls the store.
    std::uint64_t epoch() const noexcept { return epoch_.load(std::memory_order_acquire); }

    std::size_t subscriber_count() const;
    std::size_t channel_count() const;
    std::size_t subscribers_of(const channel& c) const;

private:
    void set_channels(const std::shared_ptr<entry>& e, const std::vector<channel>& channels);
    void part(const std::string& key, std::size_t place) noexcept;
    void leave(const std::shared_ptr<entry>& e) noexcept;
    bool enqueue(const std::shared_ptr<entry>& e, const delivery& d);  // true: needs a drain
    void schedule(const std::shared_ptr<entry>& e);
    static void drain(const std::shared_ptr<entry>& e);

    dispatcher_options options_;
    std::mutex notify_mutex_;    // one notify at a time: queues see events in epoch order
    std::int64_t sequence_ = 0;  // last id of the rows notified so far (under notify_mutex_)
    std::atomic<std::uint64_t> epoch_{1};
    mutable std::shared_mutex mutex_;
    // Each channel's subscribers side by side (a commit walks them), each entry knowing its
    // place so that leaving is O(1).
    std::unordered_map<std::string, std::vector<std::shared_ptr<entry>>> by_channel_;
    std::size_t subscribers_ = 0;
};

/// Follows a set of channels without gaps or duplicates: takes rows straight from commit
/// events when they continue where it stands, and polls the store whenever they do not
/// (first contact, dropped events, wake-ups from other processes, events out of order).
/// Not thread-safe: use it on the subscriber's executor.
/// Order of use (examples/follower.cpp): subscribe to the dispatcher with the same channels
/// first, then catch_up() once on the executor, then take() each wake-up; a commit between the
/// two reaches the handler, and one before is in the catch-up. `last` 0 is a first poll (the
/// store's first_poll_window, 50 s by default), as for a browser; a negative `last` is every
/// row the store still holds; pass a saved position to resume. A follower does nothing by
/// itself: without catch_up() it waits for the next commit.
class follower {
public:
    follower(store& s, std::vector<channel> channels, std::int64_t last = 0);
    /// Follows the events of `d`: within one of its epochs, ids of other channels are skipped
    /// without a poll.
    follower(store& s, const dispatcher& d, std::vector<channel> channels, std::int64_t last = 0);

    /// Replaces the channels; the position is kept (later subscribes keep the server cursor).
    void set_channels(std::vector<channel> channels);
    const std::vector<channel>& channels() const noexcept { return channels_; }  ///< in key order
    /// Every id at or below the position has been seen or does not concern these channels.
    std::int64_t position() const noexcept { return position_; }
    void set_position(std::int64_t last) noexcept { position_ = last; }

    /// Polls the store from the position; calls on_row(notification, wire) for each new row.
    /// With a limit, a full page leaves the follower behind(): call again.
    template <class OnRow> std::size_t catch_up(OnRow&& on_row, std::size_t limit = 0);
    /// Takes the rows of a wake-up that concern these channels; calls on_row for each new one.
    template <class OnRow> std::size_t take(const wakeup& w, OnRow&& on_row, std::size_t limit = 0);

    /// The same two for a destination that takes whole events and fills up (a server's
    /// connection: detail::connection_feed). `to` has the members
    ///     void row(const notification& n, std::string_view wire);   a new row, as on_row
    ///     void event(const commit_event& e);  take_into: an event all of whose rows are for
    ///                                         these channels, whole (its frame can be shared)
    ///     bool full();                        take_into: asked before each event
    ///     bool full(std::string_view wire);   asked before each row a poll reads
    /// Once full says true, that event or row and the rest wait in the store (behind()).
    /// max_bytes: the poll reads no more than that many bytes of messages (store::fetch).
    template <class Destination> std::size_t take_into(const wakeup& w, Destination& to, std::size_t limit = 0);
    template <class Destination>
    std::size_t catch_up_into(Destination& to, std::size_t limit = 0, std::size_t max_bytes = 0);
    /// The last catch-up stopped at its limit, or a take() was stopped: rows may remain
    /// before the live events, and the next take() polls first.
    bool behind() const noexcept { return behind_; }

private:
    bool wants(const channel& c) const;
    bool wants_all(const commit_event& e) const;

    store& store_;
    const dispatcher* dispatcher_ = nullptr;
    std::vector<channel> channels_;  // sorted by key: a lookup without a second copy of the keys
    std::int64_t position_;
    std::uint64_t synced_epoch_ = 0;  // the dispatcher's epoch before the last complete poll
    bool behind_ = false;
    bool polled_ = false;  // after the first poll, position 0 means "nothing yet", not "first poll"
};

/// One thread that runs the tasks posted to it one at a time, in order: the executor for a
/// dispatcher handler that must not run on the committing thread (a follower writing to a file,
/// another database, a slow socket). A task that throws is logged; the next ones still run.
/// The destructor runs the tasks already posted, then joins: destroy it before what they use.
class task_thread {
public:
    explicit task_thread(logger log = stderr_logger());
    ~task_thread();
    task_thread(const task_thread&) = delete;
    task_thread& operator=(const task_thread&) = delete;

    /// Thread-safe; from a task too (it runs after the tasks posted before it).
    void post(std::function<void()> task);
    /// For dispatcher::subscribe(handler, worker.as_executor()): posts to this thread.
    imbus::executor as_executor() noexcept {
        return [this](std::function<void()> task) { post(std::move(task)); };
    }
    /// Tasks posted and not yet finished.
    std::size_t pending() const;

private:
    void run();

    logger log_;
    mutable std::mutex mutex_;  // guards the three below
    std::condition_variable ready_;
    std::deque<std::function<void()>> tasks_;
    std::size_t running_ = 0;
    bool stopping_ = false;
    std::thread thread_;  // last: starts once the rest exists
};

#ifdef IMBUS_WITH_POSTGRES
// --------------------------------------------------------------------------------------------
// 7. Cross-process listener (Odoo: the NOTIFY imbus listener thread, ImDispatch.loop)
// --------------------------------------------------------------------------------------------

struct pg_listener_options {
    /// Rows read per query while catching up.
    std::size_t page_size = 1000;
    /// Wait before reconnecting after the connection was lost, doubled after each failure.
    std::chrono::milliseconds reconnect_min{50};
    std::chrono::milliseconds reconnect_max{2000};
};

/// The process's one listener on PostgreSQL: a thread with its own connection that LISTENs
/// on the store's NOTIFY channel and, per wake-up, reads the new rows once (every id after
/// its cursor, ascending, in pages) and hands them to the dispatcher, so every commit of every
/// process reaches local subscribers without a query per connection. With a listener, build
/// the bus with dispatch_on_commit = false so this process's own commits come this way too.
/// After a dropped connection or a server restart it reconnects with backoff and catches up
/// from its cursor: nothing is lost, nothing repeated. Thread-safe; the store and the
/// dispatcher must outlive it.
class pg_listener {
public:
    /// Connects and LISTENs before it returns (throws if it cannot); the cursor starts at the
    /// newest committed id, so every commit after the constructor is dispatched.
    pg_listener(pg_store& store, dispatcher& d, pg_listener_options options = {});
    ~pg_listener();  ///< stops the thread and closes the connection
    pg_listener(const pg_listener&) = delete;
    pg_listener& operator=(const pg_listener&) = delete;

    std::int64_t cursor() const noexcept { return cursor_.load(); }  ///< the last id dispatched
    std::uint64_t reads() const noexcept { return reads_.load(); }   ///< row queries so far
    std::uint64_t reconnects() const noexcept { return reconnects_.load(); }
    bool connected() const noexcept { return connected_.load(); }

private:
    void connect();  // throws
    void run();
    bool read_new_rows();                            // false: the connection is gone
    bool pause(std::chrono::milliseconds how_long);  // false: stop was asked
    void log(log_level level, const std::string& text) const;

    pg_store& store_;
    dispatcher& dispatcher_;
    pg_listener_options options_;
    std::unique_ptr<detail::pg_connection> connection_;  // the thread's alone after construction
    int stop_fd_ = -1;                                   // an eventfd: wakes the thread's poll() at once to stop
    std::atomic<std::int64_t> cursor_{0};
    std::atomic<std::uint64_t> reads_{0};
    std::atomic<std::uint64_t> reconnects_{0};
    std::atomic<bool> connected_{false};
    std::thread thread_;
};
#endif  // IMBUS_WITH_POSTGRES

// --------------------------------------------------------------------------------------------
// 8. Auth policies (Odoo: _build_bus_channel_list, _serve_ir_websocket, the session check)
// --------------------------------------------------------------------------------------------

/// An HTTP request as an auth policy or a route sees it: the WebSocket handshake, or a POST.
struct http_request {
    std::string method;
    std::string path;   ///< as sent, without the query string: routes match it (`/%62us/send` is not `/bus/send`)
    std::string query;  ///< raw text after '?'
    std::string body;
    std::string remote;  ///< peer address, e.g. "127.0.0.1:53412"
    std::vector<std::pair<std::string, std::string>> headers;

    /// Case-insensitive; "" when absent.
    std::string header(std::string_view name) const;
    bool has_header(std::string_view name) const;
    /// A query parameter, percent-decoded; "" when absent.
    std::string param(std::string_view name) const;
    /// The path percent-decoded ('+' stays '+'), for a route that serves names.
    std::string decoded_path() const;
    /// A cookie from the Cookie header; "" when absent.
    std::string cookie(std::string_view name) const;
    /// The token of an `Authorization: Bearer <token>` header; "" when absent.
    std::string bearer_token() const;
};

/// What a route answers.
struct http_response {
    int status = 200;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string body;

    /// A JSON body with its content type.
    void set_json(int code, const json& value);
};

/// An auth policy's answer to a handshake: who the peer is, or the HTTP status to refuse with.
template <class Identity> class admission {
public:
    static admission accept(Identity who) {
        admission a;
        a.identity_.emplace(std::move(who));
        return a;
    }
    /// 401 (who are you?) or 403 (not you); the reason goes to the log and the response body.
    static admission reject(int http_status, std::string reason = {}) {
        admission a;
        a.status_ = http_status;
        a.reason_ = std::move(reason);
        return a;
    }
    bool accepted() const noexcept { return identity_.has_value(); }
    Identity& identity() { return *identity_; }
    int status() const noexcept { return status_; }
    const std::string& reason() const noexcept { return reason_; }

private:
    std::optional<Identity> identity_;
    int status_ = 0;
    std::string reason_;
};

// An auth policy decides who a peer is and what it may hear. Its shape (checked at compile
// time by basic_server, members called from several I/O threads at once):
//
//   struct my_policy {
//       using identity = ...;                                     // required: copyable
//       admission<identity> authenticate(const http_request&);     // required: at the handshake
//       // optional, with their defaults:
//       std::vector<channel> channels(const identity&, std::vector<channel> requested);
//                                         // the client's string channels as [db, s], unchanged
//       bool still_valid(const identity&);            // true; false closes with 4001
//       void on_event(const identity&, const std::string& name, const json& data);  // ignored
//       void on_open(const identity&);  void on_close(const identity&);              // nothing
//       std::vector<direct_message> on_subscribe(const identity&, const std::vector<channel>& granted);
//                                         // none: messages for this client alone, asked for
//                                         // once its history is read and sent right after it
//   };

/// A message for one connection only, not stored (Odoo: what _after_subscribe_data sends), e.g.
/// the current presence of a room's members. It arrives as an in-band element (docs/PROTOCOL.md §4).
struct direct_message {
    std::string type;
    json payload;
};

/// Admits everybody as one public identity, subscribed to `always` plus its string channels.
class public_policy {
public:
    struct identity {};

    explicit public_policy(std::vector<channel> always = {}) : always_(std::move(always)) {}

    admission<identity> authenticate(const http_request&) const { return admission<identity>::accept({}); }
    std::vector<channel> channels(const identity&, std::vector<channel> requested) const;

private:
    std::vector<channel> always_;
};

/// Who a signed token names, and until when.
struct signed_identity {
    std::string subject;
    time_point expires{};
};

struct signed_token_options {
    /// Where browsers carry the token (they cannot set headers on a WebSocket).
    std::string cookie = "imbus_session";
    clock_function clock = system_clock();
    /// The identity's own channels, added to its string channels (e.g. a user's record channel).
    std::function<std::vector<channel>(const signed_identity&)> own_channels;
    /// Which string channels a client may ask for; empty: all of them.
    std::function<bool(const signed_identity&, const channel&)> may_subscribe;
};

/// Admits peers that present a token this policy signed (HMAC-SHA256 with a server secret), in
/// a cookie or an `Authorization: Bearer` header. Tokens expire; revoke() ends a subject's
/// sessions at their next request or dispatch (4001). Thread-safe; copies share revocations.
class signed_token_policy {
public:
    using identity = signed_identity;

    explicit signed_token_policy(std::string secret, signed_token_options options = {});

    /// A token for `subject`, valid for `ttl`: base64url(subject) "." expiry "." base64url(mac).
    std::string issue(std::string_view subject, std::chrono::seconds ttl) const;
    /// The identity a token names, if this policy signed it and it has not expired.
    std::optional<identity> verify(std::string_view token) const;
    void revoke(std::string_view subject);
    void reinstate(std::string_view subject);

    admission<identity> authenticate(const http_request& request) const;
    std::vector<channel> channels(const identity& who, std::vector<channel> requested) const;
    bool still_valid(const identity& who) const;

private:
    std::string secret_;
    signed_token_options options_;
    struct revocations {
        std::mutex mutex;
        std::unordered_set<std::string> subjects;
    };
    // Shared, so the policy stays copyable (a server holds its own copy) and copies agree.
    std::shared_ptr<revocations> revoked_ = std::make_shared<revocations>();
};

// --------------------------------------------------------------------------------------------
// 9. Client requests (Odoo: the parsing in Websocket._process_next_message)
// --------------------------------------------------------------------------------------------

/// One text frame from a client, as docs/PROTOCOL.md §4 reads it. Kept apart from the server so the
/// rules are testable (and fuzzable) without a socket.
struct client_request {
    enum class kind { invalid, subscribe, event };
    kind what = kind::invalid;
    std::string error;                  ///< why it is invalid: logged, the connection stays open
    std::string event_name;             ///< subscribe and events
    json data;                          ///< events: the "data" member (null when absent)
    std::vector<std::string> channels;  ///< subscribe: the strings the client asked for
    std::int64_t last = 0;              ///< subscribe: the client's last id, at least 0
};

/// {"event_name": "subscribe", "data": {"channels": [strings], "last": int|null}} or any other
/// {"event_name": string, "data": any}; anything else, or JSON nested deeper than
/// `max_depth` arrays and objects, is invalid. Never throws.
client_request parse_client_request(std::string_view text, std::size_t max_depth = IMBUS_MAX_JSON_DEPTH) noexcept;

#ifdef IMBUS_WITH_PRESENCE
// --------------------------------------------------------------------------------------------
// 10. Presence (Odoo: bus.presence, the update_presence event, the im_status notifications)
// --------------------------------------------------------------------------------------------
//
// A presence_tracker follows who is connected and active, and publishes each identity's
// transitions (online, away, offline) as notifications {"who": key, "status": ...} of
// options.type on the channel the application chooses. Any auth policy opts in by calling it
// from its hooks with a string key of its identity:
//
//     struct my_policy {                       // e.g. around signed_token_policy
//         std::shared_ptr<imbus::presence_tracker> presence;  // shared: the server copies policies
//         void on_open(const identity& who) { presence->on_open(who.subject); }
//         void on_close(const identity& who) { presence->on_close(who.subject); }
//         void on_event(const identity& who, const std::string& name, const imbus::json& data) {
//             presence->on_event(who.subject, name, data);   // takes "update_presence"
//         }
//     };
//
// An identity is online while one of its connections reported activity within away_after
// (a connection that opens counts as activity; the client's update_presence {"inactivity_period":
// ms} sets the last activity to now - ms, the latest report winning, as in Odoo), away while
// connected but idle longer, offline once its last connection closed.
//
// Across processes (one PostgreSQL database, one tracker per process): each tracker writes its
// own contribution, the local status of each identity connected to it, as rows on the internal
// channel [db, "imbus.presence", 0] (a channel a client's string cannot name): a row per local
// change, and every `refresh` the whole contribution, which also says the tracker is alive for
// 3 * refresh. Every tracker follows that channel in id order, so all of them merge the same
// rows in the same order (an identity's status is the best of its contributions), and each
// publishes the transitions that ITS OWN rows cause: every transition is published once, by
// the process that caused it. A tracker that sees another's contribution expire (a crashed
// process) writes a row withdrawing it; the transitions that follow are its to publish. A new
// tracker learns the others' contributions from the store's first-poll window: keep
// 3 * refresh below the store's first_poll_window (default 50 s).
//
// The tracker commits its rows through the bus from its own thread and from the hooks' threads:
// with a sqlite_store on the application's own connection, run every statement of the
// application inside an imbus::transaction, or one may land in the tracker's transaction.
//
// Bound: the tracker keeps one entry per identity connected to this process, one per identity
// connected to any process (the merged view), and one per live tracker.
// Thread-safe: on_open, on_close, on_event and tick may be called from every I/O thread at once
// (one lock: a call that changes a local status commits its row under it, so this process's
// rows keep their order); the tracker's own thread reads the internal channel and publishes.

/// Ordered: the best contribution wins.
enum class presence_status { offline, away, online };

/// "offline", "away", "online": the wire form in the notifications.
const char* to_string(presence_status s) noexcept;

struct presence_options {
    /// The channel of each identity's transitions (e.g. its record channel); see also the
    /// constructor that takes one channel for everybody.
    std::function<channel(const std::string& who)> channel_of;
    std::string type = "imbus/presence";
    /// Idle this long: away (Odoo's AWAY_TIMER, 30 minutes).
    std::chrono::milliseconds away_after = std::chrono::minutes(30);
    clock_function clock = system_clock();
    /// The whole contribution is written this often; another tracker's expires after 3 * refresh.
    std::chrono::milliseconds refresh = std::chrono::seconds(15);
    /// The tracker's thread calls tick() this often (real time); 0: only when the application does.
    std::chrono::milliseconds tick_every = std::chrono::seconds(1);
    logger log = stderr_logger();
};

class presence_tracker {
public:
    /// Starts the tracker's thread and writes its first contribution (empty). The bus needs a
    /// dispatcher (the tracker follows the internal channel); bus and dispatcher must outlive it.
    presence_tracker(imbus::bus& b, presence_options options);
    /// Every transition on `where`.
    presence_tracker(imbus::bus& b, channel where, presence_options options = {});
    ~presence_tracker();  ///< stops the thread; writes nothing (closing connections does)
    presence_tracker(const presence_tracker&) = delete;
    presence_tracker& operator=(const presence_tracker&) = delete;

    void on_open(const std::string& who);   ///< a connection of `who` opened: activity
    void on_close(const std::string& who);  ///< the last one to close makes `who` offline
    /// Takes "update_presence" {"inactivity_period": ms}; returns false for any other event.
    bool on_event(const std::string& who, const std::string& name, const json& data);
    /// The user of `who` was last active `inactivity` ago (ignored when `who` has no connection).
    void update(const std::string& who, std::chrono::milliseconds inactivity);
    /// Time-driven work: idle identities become away, the contribution is refreshed, expired
    /// contributions of other trackers are withdrawn. The thread calls it every tick_every.
    void tick();

    /// The merged status of `who`, as of the last internal row this tracker read.
    presence_status status(const std::string& who) const;
    std::size_t local_size() const;  ///< identities connected to this process
    std::size_t size() const;        ///< identities connected to any process (the merged view)
    std::size_t trackers() const;    ///< live trackers, this one included, as far as it knows
    /// The last internal row read and whose transitions (if any) are published.
    std::int64_t processed() const noexcept { return processed_.load(); }
    const std::string& id() const noexcept { return id_; }
    const channel& sync_channel() const noexcept { return sync_channel_; }

private:
    struct local_entry {
        std::size_t connections = 0;
        time_point last_activity{};
        presence_status written = presence_status::offline;  // in this tracker's last row
    };
    struct contribution {  // one tracker's, as read from the internal channel
        time_point until{};
        std::int64_t last_row = 0;
        std::unordered_map<std::string, presence_status> statuses;
    };
    using transition = std::pair<std::string, presence_status>;

    presence_status local_status(const local_entry& e, time_point now) const;
    json row(time_point now) const;
    void write(std::vector<json> rows);  // under mutex_
    void changed(const std::string& who, local_entry& e, time_point now, std::vector<json>& rows);
    void run();
    void post(std::function<void()> task);
    void read(wakeup& w);                                             // the thread
    void apply(const notification& n, std::vector<transition>& out);  // under mutex_
    presence_status merged(const std::string& who) const;             // under mutex_
    void publish(const std::vector<transition>& transitions);

    imbus::bus& bus_;
    presence_options options_;
    std::string id_;
    channel sync_channel_;
    follower follower_;         // the thread's
    mutable std::mutex mutex_;  // the state below; held across a write so rows keep their order
    std::unordered_map<std::string, local_entry> local_;
    std::unordered_map<std::string, contribution> trackers_;
    std::unordered_map<std::string, presence_status> merged_;  // offline: absent
    std::unordered_map<std::string, std::int64_t> withdrawn_;  // tracker -> its last row when withdrawn
    time_point last_refresh_{};
    std::atomic<std::int64_t> processed_{0};
    std::mutex tasks_mutex_;
    std::condition_variable tasks_ready_;
    std::deque<std::function<void()>> tasks_;
    bool stopping_ = false;
    dispatcher::subscription subscription_;
    std::thread thread_;
};
#endif  // IMBUS_WITH_PRESENCE

// --------------------------------------------------------------------------------------------
// 11. Server (Odoo: the /websocket controller, the Websocket class and its _serve_forever loop)
// --------------------------------------------------------------------------------------------

/// Every limit and timer of the protocol (docs/PROTOCOL.md §4), with its defaults.
struct server_options {
    std::string version = IMBUS_PROTOCOL_VERSION;  ///< browsers with another one: OUTDATED_VERSION
    std::string path = "/websocket";               ///< the socket; routes live under it
    /// Shards: event loops of run() and start(), each on its own thread and owning the
    /// connections it accepted (threads > 1 listens with SO_REUSEPORT: Linux spreads them).
    std::size_t threads = 1;
    std::size_t max_message_bytes = IMBUS_MAX_MESSAGE_BYTES;  ///< beyond: close 1009
    std::size_t rate_burst = 10;                              ///< at most this many frames (pings too)...
    std::chrono::milliseconds rate_delay{200};                ///< ...in any burst * delay: else 1013
    std::chrono::milliseconds idle_ping{40000};               ///< ping after this long without a frame
    std::chrono::milliseconds pong_timeout{15000};            ///< then drop the TCP connection
    std::chrono::milliseconds lifetime{3600000};              ///< close 4002 after this...
    std::chrono::milliseconds lifetime_jitter{1800000};       ///< ...plus up to this, at random
    std::chrono::milliseconds open_handshake_timeout{5000};
    std::chrono::milliseconds close_handshake_timeout{5000};
    /// After a close for a protocol error (1002, 1007, 1009), how long the client's input is
    /// still read and dropped so that a client still sending reads the close, not a reset.
    std::chrono::milliseconds close_drain_linger{1000};
    /// Bytes queued for one client before it counts as slow and is caught up from the store.
    std::size_t max_outbound_bytes = IMBUS_MAX_OUTBOUND_BYTES;
    /// Bytes queued for all clients together; past it, a client holding catch_up_bytes or more
    /// gets no live frames and is caught up from the store once it has drained (clients that
    /// read keep flowing). The total stays within this plus catch_up_bytes and a frame per client.
    std::uint64_t max_outbound_total = IMBUS_MAX_OUTBOUND_TOTAL;
    std::size_t catch_up_rows = 1000;  ///< rows per store read when catching up
    /// A read of the store for a connection that fails (the database restarting, no descriptor
    /// for a reader) is tried again after this, doubling up to 5 s, the connection keeping its
    /// position; when store_retries retries in a row have failed too, the connection is closed with 1011 and
    /// its client resumes from its last id once it reconnects.
    std::chrono::milliseconds store_retry_delay{100};
    std::size_t store_retries = 8;
    /// Bytes per catch-up frame at most (a single larger row goes alone), so a catch-up never
    /// puts more than max_outbound_bytes in one client's queue.
    std::size_t catch_up_bytes = 65536;
    /// SO_SNDBUF of each client socket: what the kernel may hold for a client that stopped
    /// reading, on top of max_outbound_bytes (Linux doubles it). 0: the kernel's autotuning,
    /// which lets one socket grow to tcp_wmem's maximum (4 MiB by default).
    std::size_t send_buffer_bytes = 0;
    /// Connections a shard serves per turn of its loop, so that publishes and handshakes are
    /// not kept waiting behind a whole fan-out.
    std::size_t delivery_slice = 32;
    std::size_t max_http_body_bytes = IMBUS_MAX_MESSAGE_BYTES;
    /// Client JSON (requests, route bodies) nested deeper than this is refused: copying or
    /// printing a value recurses once per level, so a 1 MiB "[[[[..." would overflow the stack.
    std::size_t max_json_depth = IMBUS_MAX_JSON_DEPTH;
    /// Origins allowed to open a socket, e.g. "https://app.example.com", or "self" for pages
    /// this server serves; empty: any. Browsers always send Origin, so this is what stops
    /// another site from using a visitor's cookie here. When set, a handshake without Origin
    /// is refused too: native clients add the header themselves.
    std::vector<std::string> allowed_origins;
    /// Bearer key of POST /bus/send; empty: publishing over HTTP is refused.
    std::string api_key;
    /// How often the store's garbage is collected, on an I/O thread; 0: never (the application
    /// does it: needed for a SQLite in-memory database borrowed from the application).
    std::chrono::seconds gc_interval{3600};
    /// Open sockets at most, overall and per peer address (0: no limit); beyond, the handshake
    /// gets 503, so one misbehaving host cannot take every file descriptor.
    std::size_t max_connections = 0;
    std::size_t max_connections_per_address = 0;
    /// Channel names one subscribe may ask for (0: no limit). Beyond, the connection is closed
    /// with 1008 "TOO_MANY_CHANNELS": a subscribe then costs at most this many channels' work,
    /// and the frame rate limit bounds how often (Odoo's clients ask for tens).
    std::size_t max_channels = 1000;
    /// GET here answers the counters in Prometheus text format; empty: no such route.
    std::string metrics_path = "/metrics";
    /// When set, /metrics wants "Authorization: Bearer <token>".
    std::string metrics_token;
    /// wss:// (basic_server<Policy, tls_transport>): PEM files of the certificate chain (the
    /// server's first) and of its private key. TLS 1.2 and later only.
    std::string tls_certificate_chain_file;
    std::string tls_private_key_file;
    logger log = stderr_logger();
};

/// One of the application's own HTTP routes: return false to answer 404.
using http_route = std::function<bool(const http_request&, http_response&)>;

/// What a server counts for GET /metrics (and for tests). Thread-safe: atomics, and a mutex
/// for the labelled counters, which are touched once per connection. What every delivery
/// counts is kept per shard, so that shards never write to one cache line.
class server_metrics {
public:
    explicit server_metrics(std::size_t shards = 1);

    std::atomic<std::uint64_t> connections_opened{0};  ///< handshakes completed
    std::atomic<std::int64_t> subscribed{0};           ///< open connections that subscribed
    std::atomic<std::uint64_t> slow_consumer_catch_ups{0};
    std::atomic<std::uint64_t> missed_signals{0};       ///< bus/missed_notifications markers sent
    std::atomic<std::uint64_t> rate_limited{0};         ///< connections closed 1013 for their frame rate
    std::atomic<std::uint64_t> too_many_channels{0};    ///< connections closed 1008: a subscribe over max_channels
    std::atomic<std::uint64_t> outbound_total_lags{0};  ///< clients held back by max_outbound_total
    std::atomic<std::uint64_t> pings_received{0};
    std::atomic<std::uint64_t> pongs_replaced{0};    ///< pings answered by a pong already waiting
    std::atomic<std::uint64_t> accept_pauses{0};     ///< accepting paused: out of file descriptors
    std::atomic<std::uint64_t> bad_requests{0};      ///< HTTP requests refused as malformed (400, 431, 501)
    std::atomic<std::uint64_t> requests_refused{0};  ///< malformed client requests, answered bus/request_refused
    std::atomic<std::uint64_t> store_errors{0};      ///< reads of the store for a connection that failed
    std::atomic<std::uint64_t> event_errors{
        0};  ///< policy.on_event/on_subscribe calls that threw (logged, connection kept)
    /// The most one connection has held queued and in flight since the server started.
    std::atomic<std::uint64_t> outbound_peak{0};

    void count_refusal(int status);
    void count_close(std::uint16_t code);
    /// Frames sent and the notifications in them, by a connection of `shard`.
    void count_sent(std::size_t shard, std::uint64_t frames, std::uint64_t notifications) noexcept;
    std::uint64_t frames_sent() const noexcept;
    std::uint64_t notifications_sent() const noexcept;
    /// From the commit event's arrival at this process's dispatcher to the connection's
    /// wake-up that sends it.
    void observe_publish_to_send(std::size_t shard, std::chrono::steady_clock::duration d) noexcept;
    /// Raises outbound_peak to `held`, one connection's bytes queued and in flight, if higher.
    void observe_outbound(std::uint64_t held) noexcept;
    /// Each labelled counter and the histogram, in Prometheus text format.
    std::string prometheus_text() const;
    std::uint64_t closes(std::uint16_t code) const;
    std::uint64_t refusals(int status) const;

    /// Upper bounds of the latency histogram's buckets, in seconds.
    static constexpr std::array<double, 12> latency_bounds{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                           0.05,   0.1,   0.25,   0.5,   1.0,  2.5};

private:
    struct alignas(64) delivery_counters {
        std::atomic<std::uint64_t> frames{0}, notifications{0}, latency_sum_ns{0};
        std::array<std::atomic<std::uint64_t>, latency_bounds.size() + 1> latency{};  // last: +Inf
    };
    std::vector<delivery_counters> shards_;
    mutable std::mutex mutex_;
    std::map<std::uint16_t, std::uint64_t> closes_;  // by close code
    std::map<int, std::uint64_t> refusals_;          // by HTTP status
};

/// A route serving the files under `root` for GET requests (e.g. the page and js/), so a page
/// and its bus client load from the bus's own origin. Paths with ".." are refused.
http_route static_files(std::string root, std::string url_prefix = "/");

namespace detail {
struct frame_builder;
struct wire_frame;  // a frame ready for the wire, shared by its recipients
using shared_wire_frame = std::shared_ptr<const wire_frame>;

// One connection's place in the stream of notifications, kept in its connection object and
// touched only on the thread of the shard that owns the connection.
struct feed_state {
    std::optional<follower> follow;    // set by the first subscribe
    std::uint32_t store_failures = 0;  // failed store reads in a row
    bool lagging = false;              // over an outbound budget: wake-ups wait for a catch-up
    bool catching_up = false;          // its next catch-up frame waits for a slice; wake-ups wait too
    bool check_missed = false;         // that frame first says whether rows after the position are gone
    bool greet = false;     // the latest subscribe awaits the policy's on_subscribe, asked once its history is read
    bool retrying = false;  // a store read failed: its catch-up waits for the retry timer
};

// What a connection's feed needs from the connection and from the server around it:
// basic_server gives a websocketpp connection and its shard, tests/feed_test.cpp a list.
class feed_link {
public:
    virtual bool open() const = 0;                                  // false once a close has begun
    virtual std::size_t shard() const = 0;                          // whose per-shard counters
    virtual std::string peer() const = 0;                           // who, for the log
    virtual std::size_t queued_bytes() const = 0;                   // this connection's, queued and in flight
    virtual std::uint64_t all_queued_bytes() const = 0;             // every connection's (max_outbound_total)
    virtual bool queue(shared_wire_frame frame) = 0;                // false once closing: dropped
    virtual void flush_after_slice() = 0;                           // its frames leave in one write
    virtual void catch_up_in_a_slice() = 0;                         // then connection_feed::catch_up_frame
    virtual void resume_when_drained() = 0;                         // then connection_feed::resume
    virtual void retry_after(std::chrono::milliseconds delay) = 0;  // then connection_feed::retry
    virtual void close(std::uint16_t code, const std::string& reason) = 0;
    virtual bool still_valid() = 0;  // the policy's say on the session (closed 4001 when not)
    virtual std::vector<direct_message> greeting(const std::vector<channel>& granted) = 0;  // on_subscribe's

protected:
    ~feed_link() = default;
};

// How notifications reach one connection (Odoo: Websocket._dispatch_bus_notifications, a
// poll per socket on each wake-up). A wake-up that continues the connection's position is sent
// as it came, an event wholly for it as the frames shared by every recipient; anything else (a
// subscribe, a gap, a full queue, a failed read) turns into a catch-up from the store, one
// frame per slice. No socket and no policy here: one per server, used by every shard.
class connection_feed {
public:
    connection_feed(store& s, const dispatcher& d, const server_options& options, server_metrics& metrics)
        : store_(s), dispatcher_(d), options_(options), metrics_(metrics) {}

    /// A subscribe's granted channels (its dispatcher subscription is set to them first); the
    /// first subscribe starts at `last` (0: a first poll). greet: ask link.greeting() once
    /// the history has been read.
    void subscribe(feed_state& s, feed_link& link, std::vector<channel> granted, std::int64_t last, bool greet);
    /// A wake-up of the connection's dispatcher subscription.
    void on_wakeup(feed_state& s, feed_link& link, wakeup& w);
    /// The next frame of a catch-up, in the slice link.catch_up_in_a_slice() asked for; its size.
    std::size_t catch_up_frame(feed_state& s, feed_link& link);
    /// A lagging connection's queue has drained (link.resume_when_drained()).
    void resume(feed_state& s, feed_link& link);
    /// The delay after a failed read of the store has passed (link.retry_after()).
    void retry(feed_state& s, feed_link& link);

private:
    void catch_up(feed_state& s, feed_link& link, bool check_missed);
    bool over_budget(const feed_state& s, feed_link& link, std::size_t adding);
    void lag(feed_state& s, feed_link& link);
    void store_failed(feed_state& s, feed_link& link, const char* what);
    void greet(feed_state& s, feed_link& link, frame_builder& frame);
    void send(feed_link& link, shared_wire_frame frame);

    store& store_;
    const dispatcher& dispatcher_;
    const server_options& options_;
    server_metrics& metrics_;
};
}  // namespace detail

#ifdef IMBUS_WITH_WEBSOCKETPP
/// How the server and the client carry WebSocket: plain TCP (ws://), or TLS (wss://, with
/// IMBUS_WITH_TLS and OpenSSL; CMake target imbus::tls).
struct plain_transport {};
struct tls_transport {};
struct client_options;

namespace detail {
template <class Policy> struct checked_identity;  // the policy's identity, or a readable error
template <class Policy> struct checked_hooks;     // a hook with the wrong signature: a readable error
struct connection_ledger;                         // open TCP connections, overall and per address
// What one shard's connections hold in their outbound queues, on a cache line of its own.
struct alignas(64) outbound_meter {
    std::atomic<std::uint64_t> bytes{0};
};
template <class Identity> struct session_slot;
inline namespace IMBUS_ABI_NAMESPACE {
template <class Identity, class Transport> struct server_config;
}
// Give an endpoint its TLS context (defined with IMBUS_WITH_TLS, used only by tls_transport).
template <class Endpoint> void use_server_tls(Endpoint& endpoint, const server_options& options);
template <class Endpoint> void use_client_tls(Endpoint& endpoint, const client_options& options);
template <class Connection> void check_server_name(Connection& con, const client_options& options);
}  // namespace detail

/// The bus's WebSocket server: authenticates peers with AuthPolicy, subscribes them to the
/// policy's channels, and pushes committed notifications to them (docs/PROTOCOL.md §4-5).
/// Thread-safe. Outlives every connection: stop(), then let run() return (or wait()).
inline namespace IMBUS_ABI_NAMESPACE {  // see IMBUS_ABI_NAMESPACE
template <class AuthPolicy, class Transport = plain_transport> class basic_server {
public:
    using policy_type = AuthPolicy;
    using transport = Transport;
    using identity = typename detail::checked_identity<AuthPolicy>::type;
    static_assert(detail::checked_hooks<AuthPolicy>::value);
    using config = detail::server_config<identity, Transport>;
    using endpoint_type = websocketpp::server<config>;
    using connection_ptr = typename endpoint_type::connection_ptr;

    basic_server(imbus::bus& b, AuthPolicy policy, server_options options = {});
    ~basic_server();
    basic_server(const basic_server&) = delete;
    basic_server& operator=(const basic_server&) = delete;

    /// Binds and starts accepting; port 0 picks a free one (see port()).
    void listen(const std::string& address, std::uint16_t port, std::error_code& ec);
    void listen(const std::string& address, std::uint16_t port);
    std::uint16_t port() const noexcept { return port_; }

    /// Serves on this thread and threads - 1 more until stop() and the last connection closes.
    void run(std::error_code& ec);
    void run();
    /// Serves on `threads` background threads; wait() joins them.
    void start();
    /// Closes every connection with 1001 and refuses new ones (503); the I/O threads return
    /// once the last has closed, and wait() (or run()) closes the listening socket.
    /// From any thread, handlers included.
    void stop() noexcept;
    /// Not from a handler (an I/O thread cannot join itself): that throws std::logic_error, and
    /// destroying the server there ends the process with that error.
    void wait();

    /// Adds the application's routes (set before listen()); the bus routes come first.
    void on_http(http_route route) { route_ = std::move(route); }
    /// Answers one HTTP request as the server would (bus routes, then the application's), for
    /// an application that takes HTTP through a server of its own. Thread-safe; never throws.
    http_response serve_http(const http_request& request);
    /// Closes with 4001 every connection whose identity the policy no longer finds valid.
    void revalidate();

    AuthPolicy& policy() noexcept { return policy_; }
    imbus::bus& bus() noexcept { return bus_; }
    std::size_t connection_count() const;
    /// Open TCP connections (WebSocket, HTTP, or no request yet): what max_connections bounds.
    std::size_t tcp_connection_count() const;
    const server_metrics& metrics() const noexcept { return metrics_; }
    /// Bytes queued and in flight to every client together (bounded by max_outbound_total).
    std::uint64_t outbound_bytes() const noexcept;
    /// The most one connection holds queued and in flight right now (max_outbound_bytes).
    std::size_t largest_outbound_bytes() const;
    /// The first shard's event loop, e.g. for signal handlers and timers of the application.
    asio::io_context& io_context() noexcept { return shards_.front()->io; }

private:
    using message_ptr = typename config::message_type::ptr;
    using state_type = detail::session_slot<identity>;
    // One event loop on its own thread, owning the connections it accepted for their whole
    // life: a listener of its own on the shared port (SO_REUSEPORT), no strand, no locks.
    struct shard {
        std::size_t index = 0;
        // Its subscribers' wake-ups, served a slice at a time (goes after the loop and the
        // connections its handlers hold, whose subscriptions name it).
        std::unique_ptr<dispatcher::lane> lane;
        asio::io_context io{1};
        endpoint_type endpoint;
        // Connections whose catch-up sends its next frame in the next catch-up slice
        // (touched on the shard's thread only).
        std::deque<std::weak_ptr<typename endpoint_type::connection_type>> catch_ups;
        bool catch_ups_posted = false;
        // Connections given frames during the running slice: written together at its end, so
        // that the sends of a slice go back to back (touched on the shard's thread only).
        std::vector<connection_ptr> unflushed;
        // The open connections, for the keep-alive sweep (touched on the shard's thread only).
        std::vector<std::weak_ptr<typename endpoint_type::connection_type>> open;
        std::unique_ptr<asio::steady_timer> sweep;
        std::shared_ptr<asio::ip::tcp::acceptor> acceptor;  // websocketpp's, taken before bind
        connection_ptr spare;                               // the next accept goes into it
        std::unique_ptr<asio::steady_timer> accept_pause;   // out of descriptors: accept later
        detail::outbound_meter outbound;
    };

    bool on_validate(websocketpp::connection_hdl h);
    std::optional<std::pair<int, std::string>> handshake_refusal(const http_request& request,
                                                                 std::optional<identity>& who,
                                                                 bool check_origin = true);
    void on_open(websocketpp::connection_hdl h);
    void on_message(websocketpp::connection_hdl h, message_ptr msg);
    void on_close(websocketpp::connection_hdl h);
    void on_http_request(websocketpp::connection_hdl h);
    void on_subscribe(const connection_ptr& con, const client_request& request);
    std::vector<channel> build_channels(const identity& who, const std::vector<std::string>& asked);
    // The feed (detail::connection_feed) sees a connection through this, made on the stack per call.
    class connection_link;
    void queue_catch_up(const connection_ptr& con);
    void run_catch_up_slice(shard& home);
    void resume(const connection_ptr& con);
    void run_wakeup_slice(shard& home);
    void flush_slice(shard& home);
    void post_to(const connection_ptr& con, std::function<void()> task);
    void init_shard(std::size_t index);
    void schedule_sweep(shard& home);
    std::chrono::milliseconds keep_alive_tick() const;
    void keep_alive(const connection_ptr& con, std::chrono::steady_clock::time_point now);
    void forget_open(const connection_ptr& con);
    bool within_rate(const connection_ptr& con);
    bool still_valid(const connection_ptr& con);
    void close(const connection_ptr& con, std::uint16_t code, const std::string& reason);
    void send_frame(const connection_ptr& con, detail::shared_wire_frame frame);
    void refuse_request(const connection_ptr& con, const client_request& request);
    void serve_route(const http_request& request, http_response& response);
    // One function per route (serve_route says which, in what order).
    bool body_too_deep(const http_request& request, http_response& response) const;
    void serve_metrics(const http_request& request, http_response& response);
    void serve_handshake_probe(const http_request& request, http_response& response);
    void serve_health(http_response& response);
    void serve_peek_notifications(const http_request& request, http_response& response);
    void serve_has_missed(const http_request& request, http_response& response);
    void serve_send(const http_request& request, http_response& response);
    bool admit(const connection_ptr& con, std::string& why);
    void refuse_at_accept(connection_ptr con, const std::string& why);
    std::string metrics_text();
    void schedule_gc();
    void accept_when_ready(shard& home);
    void stop_shards();
    connection_ptr connection_of(websocketpp::connection_hdl h);

    imbus::bus& bus_;
    dispatcher& dispatcher_;
    AuthPolicy policy_;
    server_options options_;
    http_route route_;
    std::vector<std::unique_ptr<shard>> shards_;
    std::optional<asio::steady_timer> gc_timer_;  // on the first shard
    std::uint16_t port_ = 0;
    std::atomic<bool> stopping_{false};
    std::vector<std::thread> threads_;
    std::atomic<std::thread::id> run_thread_{};  // the caller of run(), the first shard's thread
    mutable std::mutex connections_mutex_;       // guards the three below
    std::unordered_map<const void*, std::weak_ptr<typename endpoint_type::connection_type>> connections_;
    std::shared_ptr<detail::connection_ledger> ledger_ = std::make_shared<detail::connection_ledger>();
    server_metrics metrics_;
    detail::connection_feed feed_{bus_.store(), dispatcher_, options_, metrics_};
};
}  // namespace IMBUS_ABI_NAMESPACE

// --------------------------------------------------------------------------------------------
// 12. Client: for native programs and tests (the browser has js/)
// --------------------------------------------------------------------------------------------

struct client_options {
    std::string version = IMBUS_PROTOCOL_VERSION;
    /// Sent with every handshake, e.g. {"Cookie", "imbus_session=..."}, {"User-Agent", "..."}.
    std::vector<std::pair<std::string, std::string>> headers;
    /// Reconnect after a drop (not after 1000 or close()) and subscribe again from last_id().
    bool reconnect = true;
    std::chrono::milliseconds reconnect_delay{1000};  ///< then x1.5 per retry, at most 60 s
    /// wss:// (basic_client<tls_transport>): PEM file of the authorities trusted for the
    /// server's certificate; empty: the system's. The host name is checked against it too.
    std::string tls_ca_file;
    bool tls_verify = true;  ///< false only for tests against a throwaway certificate
    /// The largest frame accepted (a larger one closes with 1009). A server's frames stay within
    /// its catch_up_bytes (64 KiB) or one row, whichever is larger; keep this above your largest
    /// row, or the client would reconnect for the same frame forever.
    std::size_t max_message_bytes = 64 * 1024 * 1024;
    /// Notifications kept for take() at most; beyond, the oldest are dropped (counted by
    /// dropped(), logged). With an on_notification handler nothing is kept.
    std::size_t max_received = 100000;
    logger log = stderr_logger();
};

/// A bus client on its own I/O thread: ws:// URLs with plain_transport (imbus::client),
/// wss:// with tls_transport. Thread-safe.
template <class Transport = plain_transport> class basic_client {
public:
    struct close_status {
        int code = 0;  ///< 1006 when the connection dropped without a close frame
        std::string reason;
    };
    using notification_handler = std::function<void(const json& notification)>;

    explicit basic_client(client_options options = {});
    ~basic_client();
    basic_client(const basic_client&) = delete;
    basic_client& operator=(const basic_client&) = delete;

    /// Opens the socket, e.g. "ws://127.0.0.1:8080/websocket"; blocks until open or refused.
    /// A client that subscribed before (then closed, or lost its socket) subscribes again at
    /// once with the same channels from last_id(), so nothing is missed in between.
    void connect(const std::string& url, std::error_code& ec);
    void connect(const std::string& url);
    /// The status of a refused handshake (401, 403, 426...); 0 when none was refused.
    int handshake_status() const;
    /// Why it was refused, as the server said (imbus: the policy's reason); empty when none was.
    std::string handshake_reason() const;

    /// Subscribes; `last` < 0 means "from the last id received" (what a reconnect sends).
    void subscribe(std::vector<std::string> channels, std::int64_t last = -1);
    /// Any other event, e.g. send("update_presence", {{"inactivity_period", 0}}).
    void send(std::string_view event_name, const json& data);
    void close(std::uint16_t code = 1000, const std::string& reason = {});

    /// Called on the client's thread for each notification {"id":..,"message":{..}}.
    void on_notification(notification_handler handler);
    /// Waits until `count` notifications arrived since the last take; returns and forgets them.
    std::vector<json> take(std::size_t count, std::chrono::milliseconds timeout);
    /// Waits until the connection is closed (by either side); nullopt on timeout.
    std::optional<close_status> wait_closed(std::chrono::milliseconds timeout);
    /// Waits until the connection is open (again); false on timeout.
    bool wait_open(std::chrono::milliseconds timeout);

    std::int64_t last_id() const;
    bool is_open() const;
    std::size_t connects() const;  ///< successful handshakes so far, reconnects included
    std::size_t dropped() const;   ///< notifications dropped from take()'s queue (max_received)

private:
    struct impl;
    std::unique_ptr<impl> impl_;
};

using server = basic_server<public_policy>;
using client = basic_client<plain_transport>;
#endif  // IMBUS_WITH_WEBSOCKETPP

// ============================================================================================
// Implementation
// ============================================================================================

namespace detail {

inline std::int64_t to_micros(time_point t) {
    return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count();
}

inline time_point from_micros(std::int64_t us) {
    return time_point(std::chrono::duration_cast<clock_type::duration>(std::chrono::microseconds(us)));
}

[[noreturn]] inline void throw_error(errc e, const std::string& what) {
    throw std::system_error(make_error_code(e), "imbus: " + what);
}

// Python's json.dumps with ensure_ascii: \" \\ \b \f \n \r \t, every other byte outside
// 0x20..0x7e as \u00XX, non-ASCII as \uXXXX (surrogate pairs above U+FFFF). Returns false on
// invalid UTF-8, which Python could never have produced.
inline bool append_ascii_json_string(std::string& out, std::string_view s) {
    static constexpr char hex[] = "0123456789abcdef";
    auto put_u = [&out](std::uint32_t u) {
        char buf[6] = {'\\', 'u', hex[(u >> 12) & 15], hex[(u >> 8) & 15], hex[(u >> 4) & 15], hex[u & 15]};
        out.append(buf, 6);
    };
    out.push_back('"');
    for (std::size_t i = 0; i < s.size();) {
        const auto c = static_cast<unsigned char>(s[i]);
        if (c < 0x80) {
            switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20 || c == 0x7f) put_u(c);
                else out.push_back(static_cast<char>(c));
            }
            ++i;
            continue;
        }
        std::size_t len;
        std::uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) {
            len = 2;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            cp = c & 0x07;
        } else return false;
        if (i + len > s.size()) return false;
        for (std::size_t k = 1; k < len; ++k) {
            const auto b = static_cast<unsigned char>(s[i + k]);
            if ((b & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (b & 0x3f);
        }
        if (len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) return false;
        if (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) return false;
        i += len;
        if (cp >= 0x10000) {
            cp -= 0x10000;
            put_u(0xd800 + (cp >> 10));
            put_u(0xdc00 + (cp & 0x3ff));
        } else {
            put_u(cp);
        }
    }
    out.push_back('"');
    return true;
}

inline void append_json_string_checked(std::string& out, std::string_view s) {
    if (!append_ascii_json_string(out, s)) throw_error(errc::invalid_channel, "channel text is not valid UTF-8");
}

// Channels, keys de-duplicated, in first-seen order: a poll must not return a row twice.
inline std::vector<channel> unique_channels(const std::vector<channel>& channels) {
    std::vector<channel> out;
    out.reserve(channels.size());
    std::unordered_set<std::string_view> seen;
    for (const auto& c : channels)
        if (!c.empty() && seen.insert(c.key()).second) out.push_back(c);
    return out;
}

// A store's page (ascending ids) cut to `limit` rows and to the row whose message reaches
// max_bytes; a cut page vouches only up to its last row.
inline void cut_page(poll_result& page, std::size_t limit, std::size_t max_bytes) {
    auto& rows = page.notifications;
    bool cut = limit && rows.size() >= limit;
    if (cut) rows.resize(limit);
    if (max_bytes) {
        std::size_t bytes = 0, kept = 0;
        while (kept < rows.size() && bytes < max_bytes) bytes += rows[kept++].message.size();
        if (bytes >= max_bytes) rows.resize(kept), cut = true;
    }
    if (cut && !rows.empty()) page.horizon = rows.back().id;
}

template <class T, class = void> struct has_bus_channel : std::false_type {};
template <class T> struct has_bus_channel<T, std::void_t<decltype(bus_channel(std::declval<const T&>()))>>
    : std::true_type {};

}  // namespace detail

// --- 1. version, clocks, errors, logging -----------------------------------------------------

inline std::string version_string() {
    return std::to_string(IMBUS_VERSION_MAJOR) + "." + std::to_string(IMBUS_VERSION_MINOR) + "." +
           std::to_string(IMBUS_VERSION_PATCH);
}

inline clock_function system_clock() {
    return [] { return clock_type::now(); };
}

inline manual_clock::manual_clock(time_point start) : ticks_(start.time_since_epoch().count()) {}
inline time_point manual_clock::operator()() const noexcept { return time_point(clock_type::duration(ticks_.load())); }
inline void manual_clock::advance(clock_type::duration by) noexcept { ticks_ += by.count(); }
inline void manual_clock::set(time_point to) noexcept { ticks_ = to.time_since_epoch().count(); }

namespace detail {
// What a handler threw, for the log: anything may come out of an application's hook.
inline std::string current_error() {
    try {
        throw;
    } catch (const std::exception& e) {
        return e.what();
    } catch (...) {
        return "an exception that is not a std::exception";
    }
}

class error_category_impl final : public std::error_category {
public:
    const char* name() const noexcept override { return "imbus"; }
    std::string message(int e) const override {
        switch (static_cast<errc>(e)) {
        case errc::invalid_channel: return "invalid channel";
        case errc::invalid_message: return "invalid message";
        case errc::transaction_finished: return "transaction already finished";
        case errc::hook_failed: return "a pre-commit hook failed";
        case errc::store_failure: return "store failure";
        case errc::subscription_closed: return "subscription closed";
        }
        return "unknown imbus error";
    }
};
}  // namespace detail

inline const std::error_category& error_category() noexcept {
    static const detail::error_category_impl category;
    return category;
}

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), error_category()}; }

inline logger stderr_logger(log_level threshold) {
    return [threshold](log_level level, const std::string& text) {
        if (level < threshold) return;
        static const char* const names[] = {"debug", "info", "warning", "error"};
        static std::mutex m;  // one line at a time, even from many threads
        std::lock_guard<std::mutex> lock(m);
        std::clog << "imbus " << names[static_cast<int>(level)] << ": " << text << std::endl;
    };
}

// --- 2. channel ------------------------------------------------------------------------------

inline channel::channel(std::string_view db, std::string_view name) : size_(2) {
    if (db.empty()) detail::throw_error(errc::invalid_channel, "a channel needs a database name");
    key_.reserve(db.size() + name.size() + 7);
    key_ += '[';
    detail::append_json_string_checked(key_, db);
    key_ += ',';
    detail::append_json_string_checked(key_, name);
    key_ += ']';
}

inline channel::channel(std::string_view db, std::string_view model, std::int64_t id) : size_(3) {
    if (db.empty()) detail::throw_error(errc::invalid_channel, "a channel needs a database name");
    key_ += '[';
    detail::append_json_string_checked(key_, db);
    key_ += ',';
    detail::append_json_string_checked(key_, model);
    key_ += ',';
    key_ += std::to_string(id);
    key_ += ']';
}

inline channel::channel(std::string_view db, std::string_view model, std::int64_t id, std::string_view sub)
    : channel(db, model, id) {
    *this = with_sub(sub);
}

inline channel channel::with_sub(std::string_view sub) const {
    if (size_ != 3) detail::throw_error(errc::invalid_channel, "only a record channel takes a sub-channel: " + key_);
    channel c;
    c.key_.assign(key_, 0, key_.size() - 1);
    c.key_ += ',';
    detail::append_json_string_checked(c.key_, sub);
    c.key_ += ']';
    c.size_ = 4;
    return c;
}

inline channel channel::from_json(const json& j, std::error_code& ec) {
    ec.clear();
    auto is_int = [](const json& v) {
        return v.is_number_integer() &&
               (v.is_number_unsigned()
                    ? v.get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<std::int64_t>::max())
                    : true);
    };
    const bool shape_ok = j.is_array() && j.size() >= 2 && j.size() <= 4 && j[0].is_string() &&
                          !j[0].get_ref<const std::string&>().empty() && j[1].is_string() &&
                          (j.size() < 3 || is_int(j[2])) && (j.size() < 4 || j[3].is_string());
    if (!shape_ok) {
        ec = errc::invalid_channel;
        return {};
    }
    try {
        const auto& db = j[0].get_ref<const std::string&>();
        const auto& name = j[1].get_ref<const std::string&>();
        if (j.size() == 2) return channel(db, name);
        channel c(db, name, j[2].get<std::int64_t>());
        return j.size() == 4 ? c.with_sub(j[3].get_ref<const std::string&>()) : c;
    } catch (const std::system_error&) {
        ec = errc::invalid_channel;  // invalid UTF-8
        return {};
    }
}

inline channel channel::from_json(const json& j) {
    std::error_code ec;
    auto c = from_json(j, ec);
    if (ec)
        detail::throw_error(errc::invalid_channel,
                            "not a channel ([db, name], [db, model, id] or [db, model, id, sub]): " +
                                j.dump(-1, ' ', false, json::error_handler_t::replace));
    return c;
}

inline channel channel::from_key(std::string_view key, std::error_code& ec) {
    json j = json::parse(key.begin(), key.end(), nullptr, false);
    channel c = from_json(j, ec);
    if (!ec && c.key_ != key) {  // parsed, but written differently: not the canonical key
        ec = errc::invalid_channel;
        return {};
    }
    return c;
}

inline channel channel::from_key(std::string_view key) {
    std::error_code ec;
    auto c = from_key(key, ec);
    if (ec) detail::throw_error(errc::invalid_channel, "not a canonical channel key: " + std::string(key));
    return c;
}

inline json channel::to_json() const { return empty() ? json::array() : json::parse(key_); }

inline channel to_channel(std::string_view, const channel& c) { return c; }
inline channel to_channel(std::string_view db, std::string_view name) { return channel(db, name); }
inline channel to_channel(std::string_view db, const std::string& name) { return channel(db, name); }
inline channel to_channel(std::string_view db, const char* name) { return channel(db, name); }
inline channel to_channel(std::string_view db, const record& r) {
    channel c(db, r.model, r.id);
    return r.sub.empty() ? c : c.with_sub(r.sub);
}

template <class Target> channel to_channel(std::string_view db, const std::pair<Target, std::string>& target_and_sub) {
    return to_channel(db, target_and_sub.first).with_sub(target_and_sub.second);
}

template <class Target> channel to_channel(std::string_view db, const Target& target) {
    static_assert(detail::has_bus_channel<Target>::value,
                  "imbus: this type has no channel. Declare `R bus_channel(const T&)` in its namespace, "
                  "returning an imbus::channel, an imbus::record, a channel name, or another type "
                  "that has a bus_channel.");
    return to_channel(db, bus_channel(target));
}

}  // namespace imbus

namespace std {
/// Hash by canonical key, so channels can key unordered containers.
template <> struct hash<imbus::channel> {
    std::size_t operator()(const imbus::channel& c) const noexcept { return std::hash<std::string>()(c.key()); }
};
}  // namespace std

namespace imbus {

// --- 3. notification -------------------------------------------------------------------------

inline std::string make_message(std::string_view type, const json& payload) {
    try {
        std::string m = "{\"type\":";
        m += json(std::string(type)).dump();
        m += ",\"payload\":";
        m += payload.dump();
        m += '}';
        return m;
    } catch (const json::exception& e) {
        detail::throw_error(errc::invalid_message, std::string("cannot serialize the message: ") + e.what());
    }
}

inline std::string notification::type() const { return json::parse(message).at("type").get<std::string>(); }
inline json notification::payload() const { return json::parse(message).at("payload"); }

inline std::string notification::wire() const {
    std::string w;
    w.reserve(message.size() + 32);
    w += "{\"id\":";
    w += std::to_string(id);
    w += ",\"message\":";
    w += message;
    w += '}';
    return w;
}

inline json notification::to_json() const { return json::parse(wire()); }

inline std::string make_frame(const std::vector<notification>& notifications) {
    std::string f = "[";
    for (const auto& n : notifications) {
        if (f.size() > 1) f += ',';
        f += n.wire();
    }
    f += ']';
    return f;
}

// --- 4. store --------------------------------------------------------------------------------

inline bool store::lost_after(const std::vector<channel>&, std::int64_t last) {
    if (last <= 0) return false;
    const std::int64_t newest = newest_id();
    if (last > newest) return true;  // the store was reset under the client
    const std::int64_t oldest = oldest_id();
    return oldest == 0 ? last < newest : oldest > last + 1;
}

inline std::vector<notification> store::poll(const std::vector<channel>& channels, std::int64_t last,
                                             std::size_t limit) {
    return fetch(channels, last, limit).notifications;
}

inline std::vector<notification> store::append(std::vector<pending_message> batch) {
    auto tx = begin();
    return tx->commit(batch);
}

// --- 4. memory_store -------------------------------------------------------------------------

class memory_store::write_tx final : public store::write_transaction {
public:
    explicit write_tx(memory_store& s) : store_(s) {}
    std::vector<notification> commit(std::vector<pending_message>& batch) override {
        std::unique_lock<std::shared_mutex> lock(store_.mutex_);
        return store_.commit_locked(batch);
    }
    void rollback() noexcept override {}  // nothing was written before commit

private:
    memory_store& store_;
};

inline memory_store::memory_store(memory_store_options options) : options_(std::move(options)) {}

inline std::unique_ptr<store::write_transaction> memory_store::begin() { return std::make_unique<write_tx>(*this); }

inline std::vector<notification> memory_store::commit_locked(std::vector<pending_message>& batch) {
    // created_at never decreases along ids, so the first-poll window is one binary search.
    const time_point now = std::max(options_.clock(), newest_created_);
    newest_created_ = now;
    std::vector<notification> stored;
    stored.reserve(batch.size());
    for (auto& m : batch) {
        auto it = by_channel_.find(m.channel.key());
        if (it == by_channel_.end()) it = by_channel_.emplace(m.channel.key(), channel_rows{m.channel, {}}).first;
        const std::int64_t id = ++newest_id_;
        it->second.ids.push_back(id);
        stored.push_back(notification{id, m.channel, m.message, now});
        rows_.push_back(row{id, &it->second, std::move(m.message), now});
    }
    collect_locked(now);
    return stored;
}

inline std::size_t memory_store::collect_locked(time_point now) {
    const time_point cutoff = now - options_.retention;
    std::size_t removed = 0;
    while (!rows_.empty() && (rows_.front().created_at < cutoff ||
                              (options_.max_notifications && rows_.size() > options_.max_notifications))) {
        channel_rows* rows = rows_.front().rows;
        auto& dropped = dropped_[rows->channel.key()];
        dropped = std::max(dropped, rows_.front().id);
        rows->ids.pop_front();  // the oldest row overall is the oldest of its channel
        if (rows->ids.empty()) by_channel_.erase(rows->channel.key());
        rows_.pop_front();
        ++removed;
    }
    if (dropped_.size() > detail::dropped_channels_kept) {  // bounded: fold into the floor
        for (const auto& d : dropped_) dropped_floor_ = std::max(dropped_floor_, d.second);
        dropped_.clear();
    }
    return removed;
}

inline bool memory_store::lost_after(const std::vector<channel>& channels, std::int64_t last) {
    if (last <= 0) return false;
    std::shared_lock<std::shared_mutex> lock(mutex_);
    if (last > newest_id_ || last < dropped_floor_) return true;
    for (const auto& c : channels) {
        auto it = dropped_.find(c.key());
        if (it != dropped_.end() && it->second > last) return true;
    }
    return false;
}

inline std::size_t memory_store::collect_garbage() {
    std::unique_lock<std::shared_mutex> lock(mutex_);
    return collect_locked(options_.clock());
}

inline poll_result memory_store::fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit,
                                       std::size_t max_bytes) {
    const time_point now = options_.clock();
    std::shared_lock<std::shared_mutex> lock(mutex_);
    poll_result result;
    result.horizon = newest_id_;
    if (last > newest_id_) last = 0;  // the store was reset under the client
    std::int64_t after = last;
    if (last == 0) {
        const time_point since = now - options_.first_poll_window;
        auto first_recent =
            std::partition_point(rows_.begin(), rows_.end(), [&](const row& r) { return r.created_at < since; });
        after = first_recent == rows_.end() ? newest_id_ : first_recent->id - 1;
    }
    std::vector<std::int64_t> ids;
    bool cut = false;  // a channel's rows were left for the next poll
    const auto wanted = detail::unique_channels(channels);
    for (const auto& c : wanted) {
        auto it = by_channel_.find(c.key());
        if (it == by_channel_.end()) continue;
        const auto& list = it->second.ids;
        auto from = std::upper_bound(list.begin(), list.end(), after);
        auto to = limit && std::size_t(list.end() - from) > limit ? from + std::ptrdiff_t(limit) : list.end();
        // A channel's rows past max_bytes of its own lie past the merged cut as well.
        for (std::size_t bytes = 0; from != to && (!max_bytes || bytes < max_bytes); ++from) {
            ids.push_back(*from);
            bytes += row_at(*from).message.size();
        }
        cut = cut || from != list.end();
    }
    if (wanted.size() > 1) std::sort(ids.begin(), ids.end());
    if (limit && ids.size() >= limit) ids.resize(limit), cut = true;
    if (max_bytes) {
        std::size_t bytes = 0, kept = 0;
        while (kept < ids.size() && bytes < max_bytes) bytes += row_at(ids[kept++]).message.size();
        if (kept < ids.size()) ids.resize(kept), cut = true;
    }
    if (cut && !ids.empty()) result.horizon = ids.back();  // a cut page vouches only up to its last row
    result.notifications.reserve(ids.size());
    for (auto id : ids) {
        const row& r = row_at(id);
        result.notifications.push_back(notification{id, r.rows->channel, r.message, r.created_at});
    }
    return result;
}

inline std::int64_t memory_store::newest_id() {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return newest_id_;
}

inline std::int64_t memory_store::oldest_id() {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return rows_.empty() ? 0 : rows_.front().id;
}

inline bool memory_store::contains(std::int64_t id) {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return !rows_.empty() && id >= rows_.front().id && id <= rows_.back().id;
}

inline std::size_t memory_store::size() {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return rows_.size();
}

// --- 4. writer_gate (the SQL stores' writer lock) --------------------------------------------

inline void detail::writer_gate::lock() {
    std::unique_lock<std::mutex> lock(mutex_);
    const auto me = std::this_thread::get_id();
    if (depth_ != 0 && holder_ == me) {
        ++depth_;
        return;
    }
    free_.wait(lock, [&] { return depth_ == 0; });
    holder_ = me;
    depth_ = 1;
}

inline void detail::writer_gate::unlock() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--depth_ != 0) return;
    holder_ = std::thread::id();
    free_.notify_one();
}

// --- 4. sqlite_store -------------------------------------------------------------------------

#ifdef IMBUS_WITH_SQLITE
namespace detail {

[[noreturn]] inline void throw_sqlite(sqlite3* db, const std::string& what) {
    throw_error(errc::store_failure, "sqlite: " + what + ": " + (db ? sqlite3_errmsg(db) : "out of memory"));
}

inline void sqlite_exec(sqlite3* db, const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
        std::string text = err ? err : "unknown error";
        sqlite3_free(err);
        throw_error(errc::store_failure, "sqlite: " + sql + ": " + text);
    }
}

// A prepared statement, compiled once and reset after every use.
class sqlite_statement {
public:
    sqlite_statement(sqlite3* db, const char* sql) : db_(db) {
        if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt_, nullptr) != SQLITE_OK)
            throw_sqlite(db, std::string("prepare ") + sql);
    }
    ~sqlite_statement() { sqlite3_finalize(stmt_); }
    sqlite_statement(const sqlite_statement&) = delete;
    sqlite_statement& operator=(const sqlite_statement&) = delete;

    sqlite_statement& bind(int i, std::int64_t v) {
        check(sqlite3_bind_int64(stmt_, i, v), "bind");
        return *this;
    }
    sqlite_statement& bind(int i, std::string_view v) {
        check(sqlite3_bind_text(stmt_, i, v.data(), int(v.size()), SQLITE_STATIC), "bind");
        return *this;
    }
    /// true: a row is ready; false: done. Throws on error.
    bool step() {
        const int rc = sqlite3_step(stmt_);
        if (rc == SQLITE_ROW) return true;
        if (rc == SQLITE_DONE) return false;
        const std::string sql = sqlite3_sql(stmt_);
        sqlite3_reset(stmt_);
        throw_sqlite(db_, sql);
    }
    void reset() noexcept {
        sqlite3_reset(stmt_);
        sqlite3_clear_bindings(stmt_);
    }
    /// Runs a statement that returns at most one integer; `fallback` for no row or NULL.
    std::int64_t scalar(std::int64_t fallback) {
        std::int64_t v = fallback;
        if (step() && sqlite3_column_type(stmt_, 0) != SQLITE_NULL) v = sqlite3_column_int64(stmt_, 0);
        reset();
        return v;
    }
    void run() {
        while (step()) {}
        reset();
    }
    std::int64_t int64(int col) const { return sqlite3_column_int64(stmt_, col); }
    std::string text(int col) const {
        auto p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
        return p ? std::string(p, std::size_t(sqlite3_column_bytes(stmt_, col))) : std::string();
    }

private:
    void check(int rc, const char* what) {
        if (rc != SQLITE_OK) throw_sqlite(db_, what);
    }
    sqlite3* db_;
    sqlite3_stmt* stmt_ = nullptr;
};

// Resets a statement however the scope is left.
struct statement_reset {
    sqlite_statement& s;
    ~statement_reset() { s.reset(); }
};

// One connection used for polls: statements prepared once, a read transaction per poll so
// that all channels of one poll see one snapshot.
struct sqlite_reader {
    sqlite_reader(sqlite3* db, bool owned, bool snapshots)
        : db(db), owned(owned), snapshots(snapshots), begin(db, "BEGIN"), commit(db, "COMMIT"),
          rollback(db, "ROLLBACK"), poll(db,
                                         "SELECT id, message, create_date FROM bus_bus "
                                         "WHERE channel = ?1 AND id > ?2 AND create_date >= ?3 ORDER BY id LIMIT ?4"),
          first_since(db, "SELECT min(+id) FROM bus_bus WHERE create_date >= ?1"),
          newest(db, "SELECT seq FROM sqlite_sequence WHERE name = 'bus_bus'"),
          oldest(db, "SELECT min(id) FROM bus_bus"), exists(db, "SELECT 1 FROM bus_bus WHERE id = ?1"),
          dropped(db, "SELECT max(id) FROM bus_bus_dropped WHERE channel = ?1 OR channel = ''") {}
    ~sqlite_reader() {
        if (owned) {
            // statements are finalized by the members' destructors, which run after this body;
            // closing with sqlite3_close_v2 defers the close until they are.
            sqlite3_close_v2(db);
        }
    }
    sqlite3* db;
    bool owned;
    bool snapshots;  // false when sharing the writer connection, which the writer mutex guards
    sqlite_statement begin, commit, rollback, poll, first_since, newest, oldest, exists, dropped;
};

inline sqlite3* sqlite_open(const std::string& path, int flags, std::chrono::milliseconds busy_timeout,
                            const std::string& vfs) {
    sqlite3* db = nullptr;
    if (sqlite3_open_v2(path.c_str(), &db, flags | SQLITE_OPEN_NOMUTEX, vfs.empty() ? nullptr : vfs.c_str()) !=
        SQLITE_OK) {
        std::string err = db ? sqlite3_errmsg(db) : "out of memory";
        sqlite3_close_v2(db);
        throw_error(errc::store_failure, "sqlite: cannot open " + path + ": " + err);
    }
    sqlite3_busy_timeout(db, int(busy_timeout.count()));
    sqlite3_extended_result_codes(db, 1);
    return db;
}

// Deletes old rows a chunk per transaction, remembering the newest deleted id of each channel
// (bus_bus_dropped, for lost_after). On the writer connection, or on one of its own for a
// borrowed file database.
struct sqlite_collector {
    sqlite3* db;
    bool owned;
    sqlite_statement begin, commit, horizon, remember, erase;
    sqlite_collector(sqlite3* d, bool own)
        : db(d), owned(own), begin(db, "BEGIN IMMEDIATE"), commit(db, "COMMIT"),
          horizon(db,
                  "SELECT max(id) FROM (SELECT id FROM bus_bus WHERE create_date < ?1 ORDER BY create_date LIMIT ?2)"),
          remember(db,
                   "INSERT INTO bus_bus_dropped (channel, id) SELECT channel, max(id) FROM bus_bus "
                   "WHERE create_date < ?1 AND id <= ?2 GROUP BY channel "
                   "ON CONFLICT (channel) DO UPDATE SET id = max(id, excluded.id)"),
          erase(db, "DELETE FROM bus_bus WHERE create_date < ?1 AND id <= ?2") {}
    ~sqlite_collector() {
        if (owned) sqlite3_close_v2(db);  // deferred until the members' statements are finalized
    }
    // Rows deleted: those of the `limit` oldest, and any older than the cutoff below them.
    std::size_t collect_chunk(std::int64_t cutoff, std::int64_t limit) {
        begin.run();
        try {
            const std::int64_t upto = horizon.bind(1, cutoff).bind(2, limit).scalar(0);
            std::size_t n = 0;
            if (upto > 0) {
                remember.bind(1, cutoff).bind(2, upto).run();
                erase.bind(1, cutoff).bind(2, upto).run();
                n = std::size_t(sqlite3_changes(db));
            }
            commit.run();
            return n;
        } catch (...) {
            if (!sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
            throw;
        }
    }
};

}  // namespace detail

struct sqlite_store::writer_statements {
    explicit writer_statements(sqlite3* db)
        : begin(db, "BEGIN IMMEDIATE"), commit(db, "COMMIT"), rollback(db, "ROLLBACK"),
          insert(db, "INSERT INTO bus_bus (channel, message, create_date) VALUES (?1, ?2, ?3)"),
          reserved(db, "SELECT id FROM bus_bus_reserved"), reserve(db, "UPDATE bus_bus_reserved SET id = max(id, ?1)"),
          safety(db, "PRAGMA synchronous"), gc(db, false) {}
    detail::sqlite_statement begin, commit, rollback, insert, reserved, reserve, safety;
    detail::sqlite_collector gc;
};

// Holds the writer mutex from BEGIN IMMEDIATE to COMMIT: one write transaction at a time per
// connection, and SQLite's write lock makes ids follow commit order across processes too.
class sqlite_store::write_tx final : public store::write_transaction {
public:
    explicit write_tx(sqlite_store& s) : store_(s), lock_(s.writer_mutex_) {
        if (!sqlite3_get_autocommit(s.db_))
            detail::throw_error(errc::store_failure,
                                "the SQLite connection is already inside a transaction: open the "
                                "imbus::transaction first and do the application's writes inside it");
        s.writer_->begin.run();
        open_ = true;
    }
    ~write_tx() override { rollback(); }

    std::vector<notification> commit(std::vector<pending_message>& batch) override {
        try {
            const time_point now = store_.options_.clock();
            const std::int64_t micros = detail::to_micros(now);
            std::vector<notification> stored;
            stored.reserve(batch.size());
            auto& insert = store_.writer_->insert;
            for (auto& m : batch) {
                {
                    detail::statement_reset reset{insert};
                    insert.bind(1, m.channel.key()).bind(2, m.message).bind(3, micros);
                    insert.step();
                }
                stored.push_back(
                    notification{sqlite3_last_insert_rowid(store_.db_), m.channel, std::move(m.message), now});
            }
            const bool reserve =
                store_.reserves_ids() && !stored.empty() && stored.back().id > store_.writer_->reserved.scalar(0);
            store_.writer_->commit.run();
            open_ = false;
            if (reserve) store_.reserve_ids(stored.back().id);
            return stored;
        } catch (...) {
            rollback();
            throw;
        }
    }

    void rollback() noexcept override {
        if (!open_) return;
        open_ = false;
        try {
            if (!sqlite3_get_autocommit(store_.db_)) store_.writer_->rollback.run();
        } catch (const std::exception& e) {
            if (store_.options_.log) store_.options_.log(log_level::error, e.what());
        }
    }

private:
    sqlite_store& store_;
    std::unique_lock<detail::writer_gate> lock_;
    bool open_ = false;
};

inline sqlite_store::sqlite_store(const std::string& path, sqlite_store_options options)
    : options_(std::move(options)), owns_db_(true) {
    db_ = detail::sqlite_open(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, options_.busy_timeout, options_.vfs);
    try {
        if (options_.wal) detail::sqlite_exec(db_, "PRAGMA journal_mode=WAL");
        detail::sqlite_exec(db_, "PRAGMA synchronous=" + options_.synchronous);
        create_schema();
    } catch (...) {
        writer_.reset();
        sqlite3_close_v2(db_);
        throw;
    }
}

inline sqlite_store::sqlite_store(sqlite3* application_connection, sqlite_store_options options)
    : options_(std::move(options)), db_(application_connection), owns_db_(false) {
    if (!db_) detail::throw_error(errc::store_failure, "sqlite_store needs a connection");
    create_schema();
}

inline void sqlite_store::create_schema() {
    detail::sqlite_exec(db_,
                        "CREATE TABLE IF NOT EXISTS bus_bus ("
                        " id INTEGER PRIMARY KEY AUTOINCREMENT,"  // AUTOINCREMENT: ids are never reused
                        " channel TEXT NOT NULL,"
                        " message TEXT NOT NULL,"
                        " create_date INTEGER NOT NULL);"
                        "CREATE INDEX IF NOT EXISTS bus_bus_channel_id ON bus_bus (channel, id);"
                        "CREATE INDEX IF NOT EXISTS bus_bus_create_date ON bus_bus (create_date);");
    // Per channel, the newest id garbage collection deleted (lost_after). A database made before
    // the table existed gets a floor under channel '': rows up to it may be gone on any channel.
    detail::sqlite_exec(
        db_,
        "BEGIN IMMEDIATE;"
        "CREATE TEMP TABLE IF NOT EXISTS imbus_new_schema AS SELECT count(*) = 0 AS fresh FROM sqlite_master "
        " WHERE type = 'table' AND name = 'bus_bus_dropped';"
        "CREATE TABLE IF NOT EXISTS bus_bus_dropped (channel TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT OR IGNORE INTO bus_bus_dropped (channel, id) SELECT '', floor FROM"
        " (SELECT coalesce((SELECT min(id) - 1 FROM bus_bus),"
        "                  (SELECT seq FROM sqlite_sequence WHERE name = 'bus_bus'), 0) AS floor)"
        " WHERE floor > 0 AND (SELECT fresh FROM imbus_new_schema);"
        "DROP TABLE imbus_new_schema;"
        // The id reservation (reserve_ids): ids up to it may have been handed
        // out before a power cut, so the sequence continues above it.
        "CREATE TABLE IF NOT EXISTS bus_bus_reserved (id INTEGER NOT NULL);"
        "INSERT INTO bus_bus_reserved (id) SELECT coalesce((SELECT seq FROM sqlite_sequence"
        " WHERE name = 'bus_bus'), 0) WHERE NOT EXISTS (SELECT 1 FROM bus_bus_reserved);"
        "UPDATE sqlite_sequence SET seq = (SELECT id FROM bus_bus_reserved)"
        " WHERE name = 'bus_bus' AND seq < (SELECT id FROM bus_bus_reserved);"
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'bus_bus', id FROM bus_bus_reserved"
        " WHERE id > 0 AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'bus_bus');"
        "COMMIT;");
    writer_ = std::make_unique<writer_statements>(db_);
    const char* file = sqlite3_db_filename(db_, "main");
    path_ = file ? file : "";
    if (path_.empty()) writer_reader_ = std::make_unique<detail::sqlite_reader>(db_, false, false);
}

// Ids must never come back after a power cut, even with synchronous=NORMAL, whose last commits
// a power cut may undo while their ids were already sent: a client holding such an id would
// skip the new rows up to it. So ids are reserved ahead in blocks (PostgreSQL's sequences log
// ahead the same way): a commit that passes the reservation raises it in a transaction of its
// own, committed with a sync, which makes the commit before it durable too; a reopened store
// continues above the reservation. One synced commit per IMBUS_SQLITE_ID_BLOCK ids.
inline void sqlite_store::reserve_ids(std::int64_t handed_out) {
    auto& w = *writer_;
    const std::int64_t safety = w.safety.scalar(1);
    try {
        if (safety < 2) detail::sqlite_exec(db_, "PRAGMA synchronous=FULL");
        w.begin.run();
        w.reserve.bind(1, handed_out + IMBUS_SQLITE_ID_BLOCK).run();
        w.commit.run();
    } catch (const std::exception& e) {
        if (!sqlite3_get_autocommit(db_)) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        // The rows are committed; the next commit tries the reservation again.
        if (options_.log)
            options_.log(log_level::error, std::string("sqlite_store: reserving ids failed: ") + e.what());
    }
    if (safety < 2)
        sqlite3_exec(db_, ("PRAGMA synchronous=" + std::to_string(safety)).c_str(), nullptr, nullptr, nullptr);
}

inline sqlite_store::~sqlite_store() {
    // A clean close gives back the ids reserved and never used (no gap at the next start); a
    // commit of another process past it reserves again.
    if (writer_ && reserves_ids() && sqlite3_get_autocommit(db_))
        sqlite3_exec(
            db_,
            "UPDATE bus_bus_reserved SET id = coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'bus_bus'), 0)",
            nullptr, nullptr, nullptr);
    collector_.reset();
    idle_readers_.clear();
    writer_reader_.reset();
    writer_.reset();  // finalize our statements before closing, or before handing the connection back
    if (owns_db_) sqlite3_close_v2(db_);
}

inline std::unique_ptr<store::write_transaction> sqlite_store::begin() { return std::make_unique<write_tx>(*this); }

inline std::unique_ptr<detail::sqlite_reader> sqlite_store::open_reader() {
    sqlite3* db = detail::sqlite_open(path_, SQLITE_OPEN_READWRITE, options_.busy_timeout, options_.vfs);
    try {
        return std::make_unique<detail::sqlite_reader>(db, true, true);
    } catch (...) {
        sqlite3_close_v2(db);
        throw;
    }
}

// Runs f(reader) on a pooled reader connection, inside one read transaction.
template <class F> auto sqlite_store::with_reader(F&& f) {
    if (!path_.empty()) {
        std::unique_ptr<detail::sqlite_reader> r;
        {
            std::lock_guard<std::mutex> lock(readers_mutex_);
            if (!idle_readers_.empty()) {
                r = std::move(idle_readers_.back());
                idle_readers_.pop_back();
            }
        }
        if (!r) r = open_reader();
        r->begin.run();
        try {
            auto result = f(*r);
            r->commit.run();
            std::lock_guard<std::mutex> lock(readers_mutex_);
            if (idle_readers_.size() < options_.idle_readers) idle_readers_.push_back(std::move(r));
            return result;
        } catch (...) {
            if (!sqlite3_get_autocommit(r->db)) sqlite3_exec(r->db, "ROLLBACK", nullptr, nullptr, nullptr);
            throw;  // the reader is dropped: a fresh one replaces it
        }
    }
    std::lock_guard<detail::writer_gate> lock(writer_mutex_);
    return f(*writer_reader_);
}

inline poll_result sqlite_store::fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit,
                                       std::size_t max_bytes) {
    const std::int64_t since_window = detail::to_micros(options_.clock() - options_.first_poll_window);
    const auto wanted = detail::unique_channels(channels);
    return with_reader([&](detail::sqlite_reader& r) {
        poll_result result;
        result.horizon = r.newest.scalar(0);
        if (last > result.horizon) last = 0;  // the store was reset under the client
        std::int64_t after = last;
        std::int64_t since = std::numeric_limits<std::int64_t>::min();
        if (last == 0) {
            since = since_window;
            const std::int64_t first = r.first_since.bind(1, since).scalar(0);
            if (first == 0) return result;  // nothing recent at all
            after = first - 1;
        }
        for (const auto& c : wanted) {
            r.poll.bind(1, c.key()).bind(2, after).bind(3, since).bind(4, limit ? std::int64_t(limit) : -1);
            detail::statement_reset reset{r.poll};
            // A channel's rows past max_bytes of its own lie past the merged cut as well.
            std::size_t bytes = 0;
            while ((!max_bytes || bytes < max_bytes) && r.poll.step()) {
                result.notifications.push_back(
                    notification{r.poll.int64(0), c, r.poll.text(1), detail::from_micros(r.poll.int64(2))});
                bytes += result.notifications.back().message.size();
            }
        }
        std::sort(result.notifications.begin(), result.notifications.end(),
                  [](const notification& a, const notification& b) { return a.id < b.id; });
        detail::cut_page(result, limit, max_bytes);
        return result;
    });
}

inline std::int64_t sqlite_store::newest_id() {
    return with_reader([](detail::sqlite_reader& r) { return r.newest.scalar(0); });
}

inline std::int64_t sqlite_store::oldest_id() {
    return with_reader([](detail::sqlite_reader& r) { return r.oldest.scalar(0); });
}

inline bool sqlite_store::contains(std::int64_t id) {
    return with_reader([id](detail::sqlite_reader& r) { return r.exists.bind(1, id).scalar(0) == 1; });
}

inline std::size_t sqlite_store::collect_garbage() {
    const std::int64_t cutoff = detail::to_micros(options_.clock() - options_.retention);
    const std::int64_t chunk = IMBUS_SQLITE_GC_CHUNK;
    std::size_t total = 0;
    // The application may be inside a transaction of its own on a borrowed connection at any
    // moment (not only inside imbus's): deleting there would join it. SQLite's write lock
    // orders the collector's deletes with the application's writes instead.
    if (!owns_db_ && !path_.empty()) {
        std::lock_guard<std::mutex> lock(collector_mutex_);
        if (!collector_)
            collector_ = std::make_unique<detail::sqlite_collector>(
                detail::sqlite_open(path_, SQLITE_OPEN_READWRITE, options_.busy_timeout, options_.vfs), true);
        for (;;) {
            const std::size_t n = collector_->collect_chunk(cutoff, chunk);
            total += n;
            if (n < std::size_t(chunk)) return total;
        }
    }
    for (;;) {  // small transactions, so writers are never held up for long
        std::lock_guard<detail::writer_gate> lock(writer_mutex_);
        const std::size_t n = writer_->gc.collect_chunk(cutoff, chunk);
        total += n;
        if (n < std::size_t(chunk)) return total;
    }
}

inline bool sqlite_store::lost_after(const std::vector<channel>& channels, std::int64_t last) {
    if (last <= 0) return false;
    const auto wanted = detail::unique_channels(channels);
    return with_reader([&](detail::sqlite_reader& r) {
        if (last > r.newest.scalar(0)) return true;  // the store was reset under the client
        for (const auto& c : wanted)
            if (r.dropped.bind(1, c.key()).scalar(0) > last) return true;
        return false;
    });
}
#endif  // IMBUS_WITH_SQLITE

// --- 4. pg_store -----------------------------------------------------------------------------

#ifdef IMBUS_WITH_POSTGRES
namespace detail {

struct pg_result_clear {
    void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using pg_result = std::unique_ptr<PGresult, pg_result_clear>;

inline std::string pg_error_text(PGconn* c) {
    std::string text = c ? PQerrorMessage(c) : "out of memory";
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text;
}

[[noreturn]] inline void throw_pg(PGconn* c, const std::string& what) {
    throw_error(errc::store_failure, "postgres: " + what + ": " + pg_error_text(c));
}

// Server notices go to the store's logger instead of libpq's default, stderr.
inline void pg_log_notice(void* log, const char* message) {
    const auto& to = *static_cast<const logger*>(log);
    std::string text = message;
    while (!text.empty() && text.back() == '\n') text.pop_back();
    if (to) to(log_level::info, "postgres: " + text);
}

// A connection: owned ones are closed with it, a borrowed one (the application's) is not.
class pg_connection {
public:
    pg_connection(PGconn* c, bool owned) : conn_(c), owned_(owned) {}
    ~pg_connection() {
        if (owned_) PQfinish(conn_);
    }
    pg_connection(const pg_connection&) = delete;
    pg_connection& operator=(const pg_connection&) = delete;

    /// `application_name` shows in pg_stat_activity unless the conninfo names one itself.
    static std::unique_ptr<pg_connection> open(const std::string& conninfo, const logger& log,
                                               const char* application_name = "imbus") {
        // expand_dbname: the "dbname" is the whole conninfo string or URI.
        const char* keys[] = {"dbname", "fallback_application_name", nullptr};
        const char* values[] = {conninfo.c_str(), application_name, nullptr};
        PGconn* c = PQconnectdbParams(keys, values, 1);
        if (!c || PQstatus(c) != CONNECTION_OK) {
            const std::string error = pg_error_text(c);
            PQfinish(c);
            throw_error(errc::store_failure, "postgres: cannot connect: " + error);
        }
        PQsetNoticeProcessor(c, pg_log_notice, const_cast<logger*>(&log));
        return std::make_unique<pg_connection>(c, true);
    }

    PGconn* get() const noexcept { return conn_; }
    bool owned() const noexcept { return owned_; }
    bool broken() const noexcept { return PQstatus(conn_) == CONNECTION_BAD; }

    /// Prepares named statements once per session (a reset starts a new one): the server then
    /// neither parses nor plans them again. Owned connections only: the names are ours.
    template <class Statements> void prepare(const Statements& statements) {
        if (prepared_) return;
        for (const auto& st : statements) {
            pg_result r(PQprepare(conn_, st.name, st.sql, 0, nullptr));
            if (!r || PQresultStatus(r.get()) != PGRES_COMMAND_OK) throw_pg(conn_, std::string("prepare ") + st.sql);
        }
        prepared_ = true;
    }

    /// Before a statement is sent: an owned connection the server dropped meanwhile (restart,
    /// terminated backend) is reopened, which is safe because nothing of ours is in flight.
    /// An idle connection has nothing to read unless the server is ending it (its FATAL
    /// message, then EOF), so anything waiting means: reconnect.
    void revive() {
        if (!owned_) return;
        pollfd waiting{PQsocket(conn_), POLLIN, 0};
        if (!broken() && ::poll(&waiting, 1, 0) == 0) return;
        prepared_ = false;
        PQreset(conn_);
        if (broken()) throw_pg(conn_, "cannot reconnect");
    }

    /// Runs one statement; throws with the server's message unless it succeeded.
    pg_result exec(const char* sql, const std::vector<std::string>& params = {}) {
        std::vector<const char*> values;
        values.reserve(params.size());
        for (const auto& p : params) values.push_back(p.c_str());
        pg_result r(PQexecParams(conn_, sql, int(values.size()), nullptr, values.data(), nullptr, nullptr, 0));
        const auto status = r ? PQresultStatus(r.get()) : PGRES_FATAL_ERROR;
        if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) throw_pg(conn_, sql);
        return r;
    }

    /// A statement returning at most one integer; `fallback` for no row or NULL.
    std::int64_t scalar(const char* sql, const std::vector<std::string>& params, std::int64_t fallback) {
        auto r = exec(sql, params);
        if (PQntuples(r.get()) == 0 || PQgetisnull(r.get(), 0, 0)) return fallback;
        return std::stoll(PQgetvalue(r.get(), 0, 0));
    }

private:
    PGconn* conn_;
    bool owned_;
    bool prepared_ = false;
};

// A text[] literal: every element double-quoted, with " and \ escaped.
inline std::string pg_text_array(const std::vector<std::string_view>& items) {
    std::string out = "{";
    for (const auto& item : items) {
        if (out.size() > 1) out += ',';
        out += '"';
        for (char c : item) {
            if (c == '"' || c == '\\') out += '\\';
            out += c;
        }
        out += '"';
    }
    out += '}';
    return out;
}

// docs/PROTOCOL.md §3: JSON arrays of the channel keys, in order, each below PostgreSQL's 8000-byte
// NOTIFY limit (a single key too long for it fails the commit with the server's message).
inline std::vector<std::string> notify_payloads(const std::vector<channel>& channels, std::size_t max_bytes = 7999) {
    std::vector<std::string> payloads;
    std::string current;
    for (const auto& c : channels) {
        if (!current.empty() && current.size() + 1 + c.key().size() + 1 > max_bytes) {
            payloads.push_back(current + ']');
            current.clear();
        }
        current += current.empty() ? '[' : ',';
        current += c.key();
    }
    if (!current.empty()) payloads.push_back(current + ']');
    return payloads;
}

// The parameters of a libpq connection as a conninfo string (what it was opened with).
inline std::string pg_conninfo_of(PGconn* c) {
    PQconninfoOption* options = PQconninfo(c);
    if (!options) throw_error(errc::store_failure, "postgres: cannot read the connection's parameters");
    std::string out;
    for (auto* o = options; o->keyword; ++o) {
        if (!o->val || !*o->val) continue;
        if (!out.empty()) out += ' ';
        out += o->keyword;
        out += "='";
        for (const char* v = o->val; *v; ++v) {
            if (*v == '\'' || *v == '\\') out += '\\';
            out += *v;
        }
        out += '\'';
    }
    PQconninfoFree(options);
    return out;
}

inline notification pg_row(PGresult* r, int row, int first_column, channel c) {
    return notification{
        std::stoll(PQgetvalue(r, row, first_column)), std::move(c),
        std::string(PQgetvalue(r, row, first_column + 2), std::size_t(PQgetlength(r, row, first_column + 2))),
        from_micros(std::stoll(PQgetvalue(r, row, first_column + 3)))};
}

// The columns of a row as pg_row reads them: id, channel, message, create_date in microseconds.
#define IMBUS_PG_ROW_COLUMNS "id, channel, message, (extract(epoch FROM create_date) * 1000000)::bigint"

// --- pg_store: the commit pipeline -----------------------------------------------------------

// The statements of a commit, by position; owned writer connections have them prepared.
struct pg_statement {
    const char* name;
    const char* sql;
};
enum pg_write_step : std::size_t { pg_begin, pg_lock, pg_insert, pg_notify, pg_commit };
inline constexpr pg_statement pg_write_statements[] = {
    {"imbus_begin", "BEGIN"},
    {"imbus_lock", "SELECT pg_advisory_xact_lock($1::bigint)"},
    {"imbus_insert",
     "INSERT INTO bus_bus (channel, message, create_date) "
     "SELECT c, m, timestamp '1970-01-01' + $3::bigint * interval '1 microsecond' "
     "FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS b(c, m, n) ORDER BY n RETURNING id"},
    {"imbus_notify", "SELECT pg_notify($1, $2)"},
    {"imbus_commit", "COMMIT"},
};

// The statements of one commit with their parameters, in the order the server answers them.
struct pg_commit_statements {
    struct statement {
        pg_write_step step;
        std::vector<std::string> params;
    };
    std::vector<statement> list;
    std::size_t insert_index = std::size_t(-1);  // where the ids come back; none for an empty batch
};

// [BEGIN,] lock, insert, NOTIFY..., COMMIT. The advisory lock is taken after the application's
// own work and held only while the server runs these statements.
inline pg_commit_statements pg_commit_statements_for(const std::vector<pending_message>& batch, bool begin,
                                                     time_point now) {
    pg_commit_statements out;
    if (begin) out.list.push_back({pg_begin, {}});
    if (!batch.empty()) {
        std::vector<std::string_view> channels, messages;
        std::vector<channel> touched;
        for (const auto& m : batch) {
            channels.push_back(m.channel.key());
            messages.push_back(m.message);
            touched.push_back(m.channel);
        }
        out.list.push_back({pg_lock, {std::to_string(pg_store::advisory_lock_key)}});
        out.insert_index = out.list.size();
        out.list.push_back(
            {pg_insert, {pg_text_array(channels), pg_text_array(messages), std::to_string(to_micros(now))}});
        // NOTIFY inside the transaction is delivered at its commit and only then: a process
        // that dies right after committing cannot lose the wake-up.
        for (auto& payload : notify_payloads(unique_channels(touched)))
            out.list.push_back({pg_notify, {pg_store::notify_channel, std::move(payload)}});
    }
    out.list.push_back({pg_commit, {}});
    return out;
}

// What the server's answers prove about a commit. Only a sure rollback may be retried: after
// an unknown outcome the rows may be stored, and a retry could store them twice.
struct pg_commit_outcome {
    enum state_t { rolled_back, unknown, committed };
    state_t state = rolled_back;    // nothing sent yet: surely nothing stored
    std::vector<std::int64_t> ids;  // committed: the inserted rows' ids
    std::string error;              // rolled_back: the failed statement and the server's message; unknown: libpq's
};

// Queues every statement and the sync point without waiting, so the commit is one round trip;
// false if the connection failed on the way.
inline bool pg_send_commit(PGconn* c, const pg_commit_statements& statements, bool prepared) {
    for (const auto& st : statements.list) {
        std::vector<const char*> values;
        for (const auto& p : st.params) values.push_back(p.c_str());
        const pg_statement& sql = pg_write_statements[st.step];
        if (!(prepared
                  ? PQsendQueryPrepared(c, sql.name, int(values.size()), values.data(), nullptr, nullptr, 0)
                  : PQsendQueryParams(c, sql.sql, int(values.size()), nullptr, values.data(), nullptr, nullptr, 0)))
            return false;
    }
    return PQpipelineSync(c) != 0;
}

// Reads the answers up to the sync point and leaves pipeline mode (unless the connection ended).
inline pg_commit_outcome pg_read_commit(pg_connection& conn, const pg_commit_statements& statements) {
    PGconn* c = conn.get();
    const auto& list = statements.list;
    // The server answers in order: its error for a statement means that statement and the
    // rest (the COMMIT) did not run. An error libpq makes up (no SQLSTATE: the connection
    // ended) says nothing about what the server ran before it died.
    std::vector<std::int64_t> ids;
    std::string error;
    bool committed = false;
    bool commit_failed = false;  // the error came with the COMMIT itself
    for (std::size_t i = 0; i < list.size(); ++i) {
        pg_result r(PQgetResult(c));
        if (!r) break;  // the connection is gone
        const auto status = PQresultStatus(r.get());
        if (status == PGRES_FATAL_ERROR && !PQresultErrorField(r.get(), PG_DIAG_SQLSTATE)) break;
        if (status == PGRES_FATAL_ERROR && error.empty()) {
            error = std::string(pg_write_statements[list[i].step].sql) + ": " + PQresultErrorMessage(r.get());
            commit_failed = i + 1 == list.size();
        }
        if (status == PGRES_TUPLES_OK && i == statements.insert_index)
            for (int row = 0; row < PQntuples(r.get()); ++row) ids.push_back(std::stoll(PQgetvalue(r.get(), row, 0)));
        if (i + 1 == list.size() && status == PGRES_COMMAND_OK) {
            committed = std::string_view(PQcmdStatus(r.get())) == "COMMIT";
            if (!committed && error.empty()) error = "COMMIT: the transaction had already failed";
        }
        while (pg_result(PQgetResult(c))) {}  // the NULL that ends this statement's results
    }
    if (!conn.broken()) {
        for (;;) {  // up to the sync point
            pg_result r(PQgetResult(c));
            if (!r || PQresultStatus(r.get()) == PGRES_PIPELINE_SYNC) break;
        }
        PQexitPipelineMode(c);
    }
    if (committed) return {pg_commit_outcome::committed, std::move(ids), {}};
    if (error.empty() || (commit_failed && conn.broken())) {
        // No COMMIT confirmation and no earlier statement failed: the connection ended
        // after the COMMIT left (a server dying at once may even have ended it just
        // after committing).
        return {pg_commit_outcome::unknown, {}, pg_error_text(c)};
    }
    while (!error.empty() && (error.back() == '\n' || error.back() == ' ')) error.pop_back();
    return {pg_commit_outcome::rolled_back, {}, std::move(error)};
}

// The one place an outcome becomes the stored rows or the error the caller sees: the text
// says whether anything may have been stored.
inline std::vector<notification> pg_stored_or_throw(pg_commit_outcome& outcome, std::vector<pending_message>& batch,
                                                    time_point now) {
    if (outcome.state == pg_commit_outcome::unknown)  // retrying could store the batch twice: report it instead
        throw_error(errc::store_failure, "postgres: connection lost during commit, outcome unknown: " + outcome.error);
    if (outcome.state == pg_commit_outcome::rolled_back)
        throw_error(errc::store_failure, "postgres: " + outcome.error + " (rolled back)");
    auto& ids = outcome.ids;
    if (ids.size() != batch.size())
        throw_error(errc::store_failure, "postgres: the insert returned " + std::to_string(ids.size()) + " ids for " +
                                             std::to_string(batch.size()) + " rows");
    std::sort(ids.begin(), ids.end());  // ids were taken in batch order
    std::vector<notification> stored;
    stored.reserve(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i)
        stored.push_back(notification{ids[i], batch[i].channel, std::move(batch[i].message), now});
    return stored;
}

// Reads and drops what is left of a pipeline up to its sync point, then leaves pipeline mode.
inline void pg_drop_pipeline(PGconn* c) noexcept {
    for (int nulls = 0; nulls < 2 && PQstatus(c) == CONNECTION_OK;) {  // two NULLs in a row: nothing left
        pg_result r(PQgetResult(c));
        if (!r) ++nulls;
        else if (PQresultStatus(r.get()) == PGRES_PIPELINE_SYNC) break;
        else nulls = 0;
    }
    PQexitPipelineMode(c);
}

// One commit in one round trip (libpq pipeline mode). An owned connection sends BEGIN too (a
// borrowed one began when the transaction opened) and uses its prepared statements (a borrowed
// one gets the SQL text each time: the store prepares nothing in the application's session).
// `outcome` tells, also when this throws, whether anything may have been stored.
inline std::vector<notification> pg_run_commit(pg_connection& conn, std::vector<pending_message>& batch, time_point now,
                                               pg_commit_outcome& outcome) {
    const pg_commit_statements statements = pg_commit_statements_for(batch, conn.owned(), now);
    PGconn* c = conn.get();
    if (!PQenterPipelineMode(c)) throw_pg(c, "cannot enter pipeline mode");
    outcome = {pg_commit_outcome::unknown, {}, {}};  // from here on the COMMIT may reach the server
    if (pg_send_commit(c, statements, conn.owned())) {
        try {
            outcome = pg_read_commit(conn, statements);
        } catch (...) {           // out of memory, or an id that is not a number: the outcome stays
            pg_drop_pipeline(c);  // unknown, and the answers not read yet must not be the next
            throw;                // commit's on this connection
        }
    } else {  // the connection failed while we sent, so the COMMIT may or may not have left
        outcome.error = pg_error_text(c);
        PQexitPipelineMode(c);
    }
    return pg_stored_or_throw(outcome, batch, now);
}

// After a failed commit, so the connection's next user does not find an aborted transaction.
inline void pg_end_failed_transaction(PGconn* c, const logger& log) noexcept {
    const auto status = PQtransactionStatus(c);
    if (status == PQTRANS_INTRANS || status == PQTRANS_INERROR) {
        pg_result r(PQexec(c, "ROLLBACK"));
        if (PQresultStatus(r.get()) != PGRES_COMMAND_OK && log)
            log(log_level::error, "postgres: ROLLBACK: " + pg_error_text(c));
    }
}

// --- pg_store: the writer pool ---------------------------------------------------------------

// The writer connections of a store that owns them, each idle or used by one commit (opened
// under load up to options.writers, never closed early), and the batches waiting for one:
// commits on different writers overlap their round trips, and a group commit lets the
// waiting batches share one lock-to-commit section.
class pg_writer_pool {
public:
    pg_writer_pool(pg_connection& first, std::string conninfo, const pg_store_options& options)
        : options_(options), conninfo_(std::move(conninfo)) {
        more_writers_.reserve(options_.writers);  // so neither push_back can throw
        idle_writers_.reserve(std::max<std::size_t>(options_.writers, 1));
        idle_writers_.push_back(&first);
    }
    pg_writer_pool(const pg_writer_pool&) = delete;
    pg_writer_pool& operator=(const pg_writer_pool&) = delete;

    std::vector<notification> commit(std::vector<pending_message>& batch);

    std::size_t waiting_commits() {
        std::lock_guard<std::mutex> lock(mutex_);
        return queued_commits_.size();
    }

private:
    // A batch waiting for a writer connection; the commit that takes it fills in the outcome.
    struct queued_commit {
        std::vector<pending_message>* batch;
        bool taken = false;  // a commit carries it now
        bool done = false;
        std::vector<notification> stored;
        std::exception_ptr error;

        std::vector<notification> result() {
            if (error) std::rethrow_exception(error);
            return std::move(stored);
        }
    };

    std::vector<queued_commit*> take_waiting(queued_commit& me);
    pg_connection* open_writer(const std::vector<queued_commit*>& group);
    void give_back(pg_connection* writer, const std::vector<queued_commit*>& group);
    void commit_group(pg_connection& writer, const std::vector<queued_commit*>& group);
    bool commit_alone(pg_connection& writer, std::vector<pending_message>& batch, std::vector<notification>& stored,
                      std::exception_ptr& error);

    const pg_store_options& options_;  // the store's: pg_connection keeps the address of its logger
    const std::string conninfo_;       // what new writer connections connect with
    std::mutex mutex_;
    std::condition_variable writer_idle_;
    std::vector<std::unique_ptr<pg_connection>> more_writers_;  // opened under load; the first is the store's
    std::vector<pg_connection*> idle_writers_;
    std::size_t writers_opening_ = 0;
    std::vector<queued_commit*> queued_commits_;  // batches waiting for a writer connection, in call order
};

// Waits in line for a writer connection, unless another commit takes this batch along first.
inline std::vector<notification> pg_writer_pool::commit(std::vector<pending_message>& batch) {
    queued_commit me{&batch, false, false, {}, nullptr};
    std::vector<queued_commit*> group;
    pg_connection* writer = nullptr;
    {
        std::unique_lock<std::mutex> lock(mutex_);
        const std::size_t most = std::max<std::size_t>(options_.writers, 1);
        queued_commits_.push_back(&me);
        writer_idle_.wait(lock, [&] {
            return me.taken || !idle_writers_.empty() || 1 + more_writers_.size() + writers_opening_ < most;
        });
        if (me.taken) {  // another commit carries this batch: wait for its outcome
            writer_idle_.wait(lock, [&] { return me.done; });
            return me.result();
        }
        group = take_waiting(me);
        if (idle_writers_.empty()) {
            ++writers_opening_;  // connect without the mutex: other commits go on meanwhile
        } else {
            writer = idle_writers_.back();
            idle_writers_.pop_back();
        }
    }
    if (!writer) writer = open_writer(group);
    if (writer) {
        try {
            commit_group(*writer, group);
        } catch (...) {  // out of memory before the results were handed out: none of them were
            for (auto* q : group)
                if (!q->error && q->stored.empty()) q->error = std::current_exception();
        }
    }
    give_back(writer, group);
    return me.result();
}

// Under the mutex: the batches this commit carries, marked so their callers wait for it.
inline std::vector<pg_writer_pool::queued_commit*> pg_writer_pool::take_waiting(queued_commit& me) {
    std::vector<queued_commit*> group;
    if (options_.group_commit) group.swap(queued_commits_);  // every waiting batch, in line order
    else {
        // Out of the line first: were the push to throw, no pointer to this frame's batch stays queued.
        queued_commits_.erase(std::find(queued_commits_.begin(), queued_commits_.end(), &me));
        group.push_back(&me);
    }
    for (auto* q : group) q->taken = true;
    return group;
}

// A new writer connection, or null with the error handed to every batch of the group.
inline pg_connection* pg_writer_pool::open_writer(const std::vector<queued_commit*>& group) {
    std::unique_ptr<pg_connection> opened;
    try {
        opened = pg_connection::open(conninfo_, options_.log);
    } catch (...) {
        for (auto* q : group) q->error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    --writers_opening_;
    if (!opened) return nullptr;
    more_writers_.push_back(std::move(opened));  // reserved: cannot throw
    return more_writers_.back().get();
}

// Wakes the group's callers with their outcomes and the next commit in line with the writer.
inline void pg_writer_pool::give_back(pg_connection* writer, const std::vector<queued_commit*>& group) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (writer) idle_writers_.push_back(writer);  // a broken one too: revive() reopens it next time
        for (auto* q : group) q->done = true;
    }
    writer_idle_.notify_all();
}

// One transaction for the whole group; after a sure rollback, one per batch.
inline void pg_writer_pool::commit_group(pg_connection& writer, const std::vector<queued_commit*>& group) {
    if (group.size() == 1) {
        commit_alone(writer, *group[0]->batch, group[0]->stored, group[0]->error);
        return;
    }
    std::vector<pending_message> all;
    for (auto* q : group)
        for (auto& m : *q->batch) all.push_back(std::move(m));
    std::vector<notification> stored;
    std::exception_ptr error;
    const bool retry_each = commit_alone(writer, all, stored, error);
    std::size_t at = 0;
    for (auto* q : group) {
        const std::size_t n = q->batch->size();
        if (!error) {
            q->stored.assign(std::make_move_iterator(stored.begin() + std::ptrdiff_t(at)),
                             std::make_move_iterator(stored.begin() + std::ptrdiff_t(at + n)));
        } else if (retry_each) {  // nothing stored: each batch alone, so only a bad one fails
            for (std::size_t i = 0; i < n; ++i) (*q->batch)[i] = std::move(all[at + i]);
            commit_alone(writer, *q->batch, q->stored, q->error);
        } else {
            q->error = error;  // the outcome is unknown for every batch alike: never retried
        }
        at += n;
    }
}

// One transaction on `writer`. True if it failed and surely stored nothing: only then is a
// retry safe.
inline bool pg_writer_pool::commit_alone(pg_connection& writer, std::vector<pending_message>& batch,
                                         std::vector<notification>& stored, std::exception_ptr& error) {
    pg_commit_outcome outcome;  // a sure rollback until the pipeline is sent
    try {
        writer.revive();
        writer.prepare(pg_write_statements);
        stored = pg_run_commit(writer, batch, options_.clock(), outcome);
        return false;
    } catch (...) {
        error = std::current_exception();
        pg_end_failed_transaction(writer.get(), options_.log);
        return outcome.state == pg_commit_outcome::rolled_back;
    }
}

}  // namespace detail

// --- pg_store: the two write transactions ----------------------------------------------------

// The application's connection: BEGIN at once, so the application's own writes on it join the
// transaction, and the writer mutex is held until its end (one transaction at a time on it).
class pg_store::borrowed_write_tx final : public store::write_transaction {
public:
    explicit borrowed_write_tx(pg_store& s) : store_(s), lock_(s.writer_mutex_), conn_(s.writer_.get()) {
        if (PQtransactionStatus(conn_->get()) != PQTRANS_IDLE) {
            detail::throw_error(errc::store_failure,
                                "the PostgreSQL connection is busy or already inside a transaction: open "
                                "the imbus::transaction first and do the application's writes inside it");
        }
        conn_->exec("BEGIN");
    }
    ~borrowed_write_tx() override { rollback(); }

    std::vector<notification> commit(std::vector<pending_message>& batch) override {
        try {
            detail::pg_commit_outcome outcome;  // unused: the application's transaction is never retried
            auto stored = detail::pg_run_commit(*conn_, batch, store_.options_.clock(), outcome);
            release();
            return stored;
        } catch (...) {
            rollback();
            throw;
        }
    }

    void rollback() noexcept override {
        if (!conn_) return;
        detail::pg_end_failed_transaction(conn_->get(), store_.options_.log);
        release();
    }

private:
    void release() noexcept {
        lock_.unlock();
        conn_ = nullptr;
    }

    pg_store& store_;
    std::unique_lock<detail::writer_gate> lock_;
    detail::pg_connection* conn_;  // null once the transaction ended
};

// The store's own writer connections: nothing is sent before commit, which takes a writer from
// the pool (or waits in line for one, and may be carried by another commit's transaction).
class pg_store::owned_write_tx final : public store::write_transaction {
public:
    explicit owned_write_tx(detail::pg_writer_pool& writers) : writers_(writers) {}

    std::vector<notification> commit(std::vector<pending_message>& batch) override {
        return batch.empty() ? std::vector<notification>{} : writers_.commit(batch);
    }
    void rollback() noexcept override {}  // nothing was sent before commit

private:
    detail::pg_writer_pool& writers_;
};

inline pg_store::pg_store(const std::string& conninfo, pg_store_options options)
    : options_(std::move(options)), conninfo_(options_.conninfo.empty() ? conninfo : options_.conninfo) {
    writer_ = detail::pg_connection::open(conninfo, options_.log);
    writers_ = std::make_unique<detail::pg_writer_pool>(*writer_, conninfo, options_);
    create_schema();
}

inline pg_store::pg_store(PGconn* application_connection, pg_store_options options) : options_(std::move(options)) {
    if (!application_connection || PQstatus(application_connection) != CONNECTION_OK)
        detail::throw_error(errc::store_failure, "pg_store needs an open connection");
    writer_ = std::make_unique<detail::pg_connection>(application_connection, false);
    conninfo_ = options_.conninfo.empty() ? detail::pg_conninfo_of(application_connection) : options_.conninfo;
    create_schema();
}

inline pg_store::~pg_store() = default;

inline PGconn* pg_store::connection() const noexcept { return writer_->get(); }

inline std::unique_ptr<detail::pg_connection> pg_store::open_connection() const {
    return detail::pg_connection::open(conninfo_, options_.log);
}

// Runs f(connection) on a pooled reader connection; reads are safe to retry, so a connection
// the server dropped is replaced and f runs once more.
template <class F> auto pg_store::with_reader(F&& f) {
    std::unique_ptr<detail::pg_connection> c;
    {
        std::lock_guard<std::mutex> lock(readers_mutex_);
        if (!idle_readers_.empty()) {
            c = std::move(idle_readers_.back());
            idle_readers_.pop_back();
        }
    }
    if (!c) c = open_connection();
    auto give_back = [&] {
        std::lock_guard<std::mutex> lock(readers_mutex_);
        if (idle_readers_.size() < options_.idle_readers) idle_readers_.push_back(std::move(c));
    };
    try {
        c->revive();
        auto result = f(*c);
        give_back();
        return result;
    } catch (const std::system_error&) {
        if (!c->broken()) {
            if (PQtransactionStatus(c->get()) != PQTRANS_IDLE) detail::pg_result(PQexec(c->get(), "ROLLBACK"));
            give_back();
            throw;
        }
    }
    c = open_connection();
    auto result = f(*c);
    give_back();
    return result;
}

inline void pg_store::create_schema() {
    // On a connection of our own, so a borrowed one is never touched outside a transaction;
    // the advisory lock serializes processes creating the table at the same moment.
    with_reader([](detail::pg_connection& c) {
        c.exec("BEGIN");
        c.exec("SELECT pg_advisory_xact_lock($1::bigint)", {std::to_string(advisory_lock_key)});
        c.exec(
            "CREATE TABLE IF NOT EXISTS bus_bus ("
            " id bigserial PRIMARY KEY,"
            " channel text NOT NULL,"
            " message text NOT NULL,"
            " create_date timestamp NOT NULL)");  // UTC, like Odoo's column
        c.exec("CREATE INDEX IF NOT EXISTS bus_bus_channel_id ON bus_bus (channel, id)");
        c.exec("CREATE INDEX IF NOT EXISTS bus_bus_create_date ON bus_bus (create_date)");
        // Per channel, the newest id garbage collection deleted (lost_after). A database made
        // before the table existed gets a floor under channel '': rows up to it may be gone on
        // any channel.
        if (c.scalar(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'bus_bus_dropped'",
                {}, 0) == 0) {
            c.exec("CREATE TABLE bus_bus_dropped (channel text PRIMARY KEY, id bigint NOT NULL)");
            c.exec(
                "INSERT INTO bus_bus_dropped (channel, id) SELECT '', floor FROM"
                " (SELECT coalesce((SELECT min(id) - 1 FROM bus_bus),"
                "                  (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM bus_bus_id_seq)) AS "
                "floor) f"
                " WHERE floor > 0");
        }
        c.exec("COMMIT");
        return 0;
    });
}

// Which of the two kinds: a borrowed connection's transaction must BEGIN now, so the
// application's writes join it.
inline std::unique_ptr<store::write_transaction> pg_store::begin() {
    if (!writers_) return std::make_unique<borrowed_write_tx>(*this);
    return std::make_unique<owned_write_tx>(*writers_);
}

inline std::size_t pg_store::waiting_commits() { return writers_ ? writers_->waiting_commits() : 0; }

inline poll_result pg_store::fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit,
                                   std::size_t max_bytes) {
    const std::int64_t since = detail::to_micros(options_.clock() - options_.first_poll_window);
    const auto wanted = detail::unique_channels(channels);
    std::unordered_map<std::string_view, const channel*> by_key;
    std::vector<std::string_view> keys;
    for (const auto& c : wanted) {
        by_key.emplace(c.key(), &c);
        keys.push_back(c.key());
    }
    // One statement, one snapshot: the rows and the newest id visible with them. Writers commit
    // in id order (the advisory lock), so every id up to that newest one is already visible or
    // will never exist: it is the horizon, with no hold-back.
    static const char* const sql =
        "WITH seq AS (SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS assigned FROM bus_bus_id_seq),"
        " params AS (SELECT CASE WHEN $2::bigint > seq.assigned THEN 0 ELSE $2::bigint END AS last FROM seq),"
        " head AS (SELECT coalesce(max(id), 0) AS newest FROM bus_bus) "
        "SELECT head.newest, params.last, r.* FROM head CROSS JOIN params LEFT JOIN LATERAL ("
        " SELECT " IMBUS_PG_ROW_COLUMNS
        " FROM bus_bus"
        " WHERE channel = ANY($1::text[]) AND id > params.last AND (params.last <> 0 OR create_date >="
        "  timestamp '1970-01-01' + $3::bigint * interval '1 microsecond')"
        " ORDER BY id LIMIT $4::bigint) r ON true";
    const std::vector<std::string> params{detail::pg_text_array(keys), std::to_string(last), std::to_string(since),
                                          limit ? std::to_string(limit) : std::string()};
    return with_reader([&](detail::pg_connection& c) {
        std::vector<const char*> values{params[0].c_str(), params[1].c_str(), params[2].c_str(),
                                        limit ? params[3].c_str() : nullptr};
        detail::pg_result r(PQexecParams(c.get(), sql, 4, nullptr, values.data(), nullptr, nullptr, 0));
        if (PQresultStatus(r.get()) != PGRES_TUPLES_OK) detail::throw_pg(c.get(), "poll");
        poll_result result;
        const int rows = PQntuples(r.get());
        if (rows == 0) return result;
        // A reset store (last above every id ever assigned) counts as a first poll (params.last = 0).
        result.horizon = std::max(std::stoll(PQgetvalue(r.get(), 0, 0)), std::stoll(PQgetvalue(r.get(), 0, 1)));
        std::size_t bytes = 0;
        for (int i = 0; i < rows && (!max_bytes || bytes < max_bytes); ++i) {
            if (PQgetisnull(r.get(), i, 2)) break;  // the LEFT JOIN's row without rows
            const std::string_view key(PQgetvalue(r.get(), i, 3), std::size_t(PQgetlength(r.get(), i, 3)));
            result.notifications.push_back(detail::pg_row(r.get(), i, 2, *by_key.at(key)));
            bytes += result.notifications.back().message.size();
        }
        detail::cut_page(result, limit, max_bytes);
        return result;
    });
}

inline std::int64_t pg_store::newest_id() {
    return with_reader([](detail::pg_connection& c) {
        return c.scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM bus_bus_id_seq", {}, 0);
    });
}

inline std::int64_t pg_store::oldest_id() {
    return with_reader([](detail::pg_connection& c) { return c.scalar("SELECT min(id) FROM bus_bus", {}, 0); });
}

inline bool pg_store::lost_after(const std::vector<channel>& channels, std::int64_t last) {
    if (last <= 0) return false;
    std::vector<std::string_view> keys;
    const auto wanted = detail::unique_channels(channels);
    for (const auto& c : wanted) keys.push_back(c.key());
    return with_reader([&](detail::pg_connection& c) {
        return c.scalar(
                   "SELECT CASE WHEN $2::bigint > (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM "
                   "bus_bus_id_seq)"
                   " OR EXISTS (SELECT 1 FROM bus_bus_dropped WHERE (channel = ANY($1::text[]) OR channel = '')"
                   "            AND id > $2::bigint AND cardinality($1::text[]) > 0)"
                   " THEN 1 ELSE 0 END",
                   {detail::pg_text_array(keys), std::to_string(last)}, 0) == 1;
    });
}

inline bool pg_store::contains(std::int64_t id) {
    return with_reader([id](detail::pg_connection& c) {
        return c.scalar("SELECT 1 FROM bus_bus WHERE id = $1::bigint", {std::to_string(id)}, 0) == 1;
    });
}

inline std::size_t pg_store::collect_garbage() {
    const std::string cutoff = std::to_string(detail::to_micros(options_.clock() - options_.retention));
    const std::string chunk = std::to_string(options_.gc_chunk ? options_.gc_chunk : 5000);
    std::size_t total = 0;
    for (;;) {  // small statements on a reader connection: writers are never held up for long
        // One statement: the rows deleted and, per channel, the newest of them (for lost_after).
        const std::size_t n = with_reader([&](detail::pg_connection& c) {
            return std::size_t(c.scalar(
                "WITH gone AS (DELETE FROM bus_bus WHERE id IN (SELECT id FROM bus_bus WHERE create_date < "
                "  timestamp '1970-01-01' + $1::bigint * interval '1 microsecond' ORDER BY id LIMIT $2::bigint)"
                "  RETURNING id, channel),"
                " remembered AS (INSERT INTO bus_bus_dropped (channel, id) SELECT channel, max(id) FROM gone GROUP BY "
                "channel"
                "  ON CONFLICT (channel) DO UPDATE SET id = greatest(bus_bus_dropped.id, excluded.id))"
                " SELECT count(*) FROM gone",
                {cutoff, chunk}, 0));
        });
        total += n;
        if (n < std::stoull(chunk)) return total;
    }
}

#endif  // IMBUS_WITH_POSTGRES

// --- 5. bus and transaction ------------------------------------------------------------------

inline bus::bus(imbus::store& s, dispatcher& d, bus_options options)
    : store_(s), dispatcher_(&d), options_(std::move(options)) {}

inline bus::bus(imbus::store& s, bus_options options) : store_(s), options_(std::move(options)) {}

inline dispatcher& bus::get_dispatcher() const {
    if (!dispatcher_) throw std::logic_error("imbus::bus: this bus was made without a dispatcher");
    return *dispatcher_;
}

inline void bus::publish(std::shared_ptr<const commit_event> event) {
    if (dispatcher_) dispatcher_->notify(std::move(event));
}

template <class Target> std::vector<std::int64_t> bus::send(const Target& target, std::string_view type,
                                                            const json& payload, std::error_code& ec) {
    try {
        transaction tx(*this);
        tx.send(target, type, payload, ec);
        if (ec) return {};
        return tx.commit(ec);
    } catch (const std::system_error& e) {  // begin() failed: the store is unreachable
        ec = errc::store_failure;
        if (options_.log) options_.log(log_level::error, e.what());
        return {};
    }
}

template <class Target>
std::vector<std::int64_t> bus::send(const Target& target, std::string_view type, const json& payload) {
    transaction tx(*this);
    tx.send(target, type, payload);
    return tx.commit();
}

inline transaction::transaction(imbus::bus& b) : bus_(&b), store_tx_(b.store().begin()) {}

inline transaction::~transaction() { rollback(); }

template <class Target>
void transaction::send(const Target& target, std::string_view type, const json& payload, std::error_code& ec) {
    ec.clear();
    if (!open()) {
        ec = errc::transaction_finished;
        return;
    }
    try {
        batch_.push_back(pending_message{bus_->channel_for(target), make_message(type, payload)});
    } catch (const std::system_error& e) {
        ec = e.code();
        if (bus_->log()) bus_->log()(log_level::warning, e.what());
    }
}

template <class Target> void transaction::send(const Target& target, std::string_view type, const json& payload) {
    if (!open()) detail::throw_error(errc::transaction_finished, "send after commit or rollback");
    batch_.push_back(pending_message{bus_->channel_for(target), make_message(type, payload)});
}

inline void transaction::on_precommit(std::function<void()> hook) { precommit_.push_back(std::move(hook)); }
inline void transaction::on_postcommit(std::function<void()> hook) { postcommit_.push_back(std::move(hook)); }

inline std::vector<std::int64_t> transaction::commit(std::error_code& ec) {
    ec.clear();
    if (!open()) {
        ec = errc::transaction_finished;
        return {};
    }
    const logger& log = bus_->log();
    // pre-commit: the application's hooks, then the bus rows, inside the transaction. A hook
    // may add hooks (as in Odoo): they run in this pass, so the list is walked by index.
    for (std::size_t i = 0; i < precommit_.size(); ++i) {
        try {
            auto hook = std::move(precommit_[i]);
            hook();
        } catch (const std::exception& e) {
            if (log) log(log_level::warning, std::string("pre-commit hook failed, rolled back: ") + e.what());
            rollback();
            ec = errc::hook_failed;
            return {};
        }
    }
    std::vector<notification> stored;
    try {
        stored = store_tx_->commit(batch_);
    } catch (const std::exception& e) {
        if (log) log(log_level::error, std::string("commit failed, rolled back: ") + e.what());
        rollback();
        ec = errc::store_failure;
        return {};
    }
    store_tx_.reset();
    batch_.clear();
    // post-commit: only now may anybody hear of it
    std::vector<std::int64_t> ids;
    ids.reserve(stored.size());
    for (const auto& n : stored) ids.push_back(n.id);
    if (!stored.empty() && bus_->dispatches_on_commit()) bus_->publish(commit_event::from_rows(std::move(stored)));
    for (std::size_t i = 0; i < postcommit_.size(); ++i) {  // by index: hooks may add hooks
        try {
            auto hook = std::move(postcommit_[i]);
            hook();
        } catch (const std::exception& e) {
            if (log) log(log_level::error, std::string("post-commit hook failed: ") + e.what());
        }
    }
    postcommit_.clear();
    return ids;
}

inline std::vector<std::int64_t> transaction::commit() {
    std::error_code ec;
    auto ids = commit(ec);
    if (ec) detail::throw_error(static_cast<errc>(ec.value()), "commit failed: " + ec.message());
    return ids;
}

inline void transaction::rollback() noexcept {
    if (!store_tx_) return;
    store_tx_->rollback();
    store_tx_.reset();
    batch_.clear();
    precommit_.clear();
    postcommit_.clear();
}

// --- 6. dispatcher ---------------------------------------------------------------------------

inline std::shared_ptr<const commit_event> commit_event::wake_up(std::vector<channel> channels) {
    auto e = std::make_shared<commit_event>();
    e->channels = detail::unique_channels(channels);
    return e;
}

inline std::shared_ptr<const commit_event> commit_event::from_rows(std::vector<notification> rows) {
    auto e = std::make_shared<commit_event>();
    std::vector<channel> touched;
    touched.reserve(rows.size());
    e->wire.reserve(rows.size());
    for (const auto& n : rows) {
        touched.push_back(n.channel);
        e->wire.push_back(n.wire());
    }
    e->channels = detail::unique_channels(touched);
    e->notifications = std::move(rows);
    return e;
}

inline std::shared_ptr<const commit_event> commit_event::from_range(std::int64_t after,
                                                                    std::vector<notification> rows) {
    auto e = std::const_pointer_cast<commit_event>(from_rows(std::move(rows)));
    e->complete_after = after;
    return e;
}

inline bool commit_event::contiguous() const noexcept {
    return has_rows() && last_id() - first_id() + 1 == std::int64_t(notifications.size());
}

struct dispatcher::entry {
    handler on_wakeup;
    executor run;
    lane* on = nullptr;  // when set, `run` is not used
    logger log;
    std::size_t max_pending;
    std::vector<std::string> keys;    // sorted; guarded by the dispatcher's mutex, as is
    std::vector<std::size_t> places;  // where this entry stands among each key's subscribers

    std::mutex mutex;  // guards the fields below
    std::vector<delivery> pending;
    bool overflowed = false;
    bool scheduled = false;  // a drain is queued or running: later wake-ups join it
    bool closed = false;
};

inline dispatcher::subscription& dispatcher::subscription::operator=(subscription&& other) noexcept {
    if (this != &other) {
        close();
        owner_ = other.owner_;
        entry_ = std::move(other.entry_);
    }
    return *this;
}

inline void dispatcher::subscription::set_channels(const std::vector<channel>& channels) {
    if (!entry_) detail::throw_error(errc::subscription_closed, "set_channels on a closed subscription");
    owner_->set_channels(entry_, channels);
}

inline std::vector<channel> dispatcher::subscription::channels() const {
    std::vector<channel> out;
    if (!entry_) return out;
    std::shared_lock<std::shared_mutex> lock(owner_->mutex_);
    for (const auto& k : entry_->keys) out.push_back(channel::from_key(k));
    return out;
}

inline void dispatcher::subscription::close() noexcept {
    if (!entry_) return;
    owner_->leave(entry_);
    entry_.reset();
}

inline dispatcher::dispatcher(dispatcher_options options) : options_(std::move(options)) {}

inline dispatcher::subscription dispatcher::subscribe(handler on_wakeup, executor run) {
    auto e = std::make_shared<entry>();
    e->on_wakeup = std::move(on_wakeup);
    e->run = std::move(run);
    e->log = options_.log;
    e->max_pending = options_.max_pending;
    std::unique_lock<std::shared_mutex> lock(mutex_);
    ++subscribers_;
    return subscription(this, std::move(e));
}

inline dispatcher::subscription dispatcher::subscribe(handler on_wakeup, lane& where) {
    auto sub = subscribe(std::move(on_wakeup));
    sub.entry_->on = &where;  // before any channel: no notify can see the entry yet
    return sub;
}

inline void dispatcher::set_channels(const std::shared_ptr<entry>& e, const std::vector<channel>& channels) {
    std::vector<std::string> keys;
    for (const auto& c : detail::unique_channels(channels)) keys.push_back(c.key());
    std::sort(keys.begin(), keys.end());
    std::vector<std::size_t> places(keys.size());
    std::unique_lock<std::shared_mutex> lock(mutex_);
    for (std::size_t i = 0; i < e->keys.size(); ++i)
        if (!std::binary_search(keys.begin(), keys.end(), e->keys[i])) part(e->keys[i], e->places[i]);
    for (std::size_t i = 0; i < keys.size(); ++i) {
        auto kept = std::lower_bound(e->keys.begin(), e->keys.end(), keys[i]);
        if (kept != e->keys.end() && *kept == keys[i]) {
            places[i] = e->places[std::size_t(kept - e->keys.begin())];
        } else {
            auto& members = by_channel_[keys[i]];
            places[i] = members.size();
            members.push_back(e);
        }
    }
    e->keys = std::move(keys);
    e->places = std::move(places);
}

// The last subscriber of the channel takes the leaver's place (under the exclusive lock).
inline void dispatcher::part(const std::string& key, std::size_t place) noexcept {
    auto it = by_channel_.find(key);
    auto& members = it->second;
    if (place + 1 != members.size()) {
        members[place] = std::move(members.back());
        entry& moved = *members[place];
        auto k = std::lower_bound(moved.keys.begin(), moved.keys.end(), key);
        moved.places[std::size_t(k - moved.keys.begin())] = place;
    }
    members.pop_back();
    if (members.empty()) by_channel_.erase(it);  // no empty entries left behind
}

inline void dispatcher::leave(const std::shared_ptr<entry>& e) noexcept {
    {
        std::lock_guard<std::mutex> lock(e->mutex);
        e->closed = true;
        e->pending.clear();
    }
    std::unique_lock<std::shared_mutex> lock(mutex_);
    for (std::size_t i = 0; i < e->keys.size(); ++i) part(e->keys[i], e->places[i]);
    e->keys.clear();
    e->places.clear();
    --subscribers_;
}

inline void dispatcher::notify(std::shared_ptr<const commit_event> event) {
    if (!event || event->channels.empty()) return;
    std::vector<std::shared_ptr<entry>> to_schedule;                           // executors, inline handlers
    std::vector<std::pair<lane*, std::vector<std::shared_ptr<entry>>>> lanes;  // those woken, per lane
    {
        std::lock_guard<std::mutex> order(notify_mutex_);  // queues must see events in epoch order
        delivery d{event, 0};
        if (event->has_rows()) {
            // Rows that do not continue the notified sequence mean ids this dispatcher never
            // saw: a new epoch tells followers to ask the store instead of skipping the gap.
            if (!event->complete() || event->after() != sequence_ || sequence_ == 0)
                epoch_.fetch_add(1, std::memory_order_acq_rel);
            sequence_ = std::max(sequence_, event->last_id());
            d.epoch = epoch();
        }
        auto wake = [&](const std::shared_ptr<entry>& e) {
            if (!enqueue(e, d)) return;  // closed, or coalesced into a run already queued
            if (!e->on) return to_schedule.push_back(e);
            if (lanes.empty() || lanes.back().first != e->on) {  // few lanes: one per event loop
                auto it = std::find_if(lanes.begin(), lanes.end(), [&](const auto& l) { return l.first == e->on; });
                if (it == lanes.end()) lanes.emplace_back(e->on, std::vector<std::shared_ptr<entry>>());
                else std::iter_swap(it, lanes.end() - 1);
            }
            lanes.back().second.push_back(e);
        };
        std::shared_lock<std::shared_mutex> lock(mutex_);
        if (event->channels.size() == 1) {
            auto it = by_channel_.find(event->channels.front().key());
            if (it != by_channel_.end()) {
                for (const auto& e : it->second) wake(e);
            }
        } else {  // a subscriber of several of the channels is woken once
            std::vector<const std::shared_ptr<entry>*> targets;
            for (const auto& c : event->channels) {
                auto it = by_channel_.find(c.key());
                if (it != by_channel_.end())
                    for (const auto& e : it->second) targets.push_back(&e);
            }
            auto by_entry = [](const std::shared_ptr<entry>* a, const std::shared_ptr<entry>* b) {
                return a->get() < b->get();
            };
            std::sort(targets.begin(), targets.end(), by_entry);
            for (std::size_t i = 0; i < targets.size(); ++i)
                if (i == 0 || targets[i]->get() != targets[i - 1]->get()) wake(*targets[i]);
        }
    }
    // Outside every lock: an inline handler may send, resubscribe or leave.
    for (auto& l : lanes) l.first->wake(l.second, options_.log);
    for (const auto& e : to_schedule) schedule(e);
}

inline void dispatcher::lane::wake(std::vector<std::shared_ptr<entry>>& woken, const logger& log) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto& e : woken) ready_.push_back(std::move(e));
        if (std::exchange(posted_, true)) return;
    }
    try {
        post_();
    } catch (const std::exception& ex) {
        unwind();
        if (log) log(log_level::error, std::string("dispatcher: a lane could not post its run: ") + ex.what());
    }
}

// No run will come: the waiting subscribers are unscheduled, so that the next notify for each
// schedules it again (its events stay pending), as when an executor refuses a task.
inline void dispatcher::lane::unwind() noexcept {
    std::deque<std::shared_ptr<entry>> stranded;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stranded.swap(ready_);
        posted_ = false;
    }
    for (const auto& e : stranded) {
        std::lock_guard<std::mutex> lock(e->mutex);
        e->scheduled = false;
    }
}

inline void dispatcher::lane::run(std::size_t limit) {
    running_.clear();
    bool again;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        const std::size_t n = std::min(ready_.size(), std::max<std::size_t>(limit, 1));
        running_.assign(std::make_move_iterator(ready_.begin()),
                        std::make_move_iterator(ready_.begin() + std::ptrdiff_t(n)));
        ready_.erase(ready_.begin(), ready_.begin() + std::ptrdiff_t(n));
        again = !ready_.empty();
        posted_ = again;
    }
    if (again) {
        try {
            post_();  // first, so that the rest waits behind whatever the loop has queued meanwhile
        } catch (...) {
            unwind();
        }
    }
    for (const auto& e : running_) drain(e);
    running_.clear();
}

inline std::size_t dispatcher::lane::waiting() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return ready_.size();
}

inline bool dispatcher::enqueue(const std::shared_ptr<entry>& e, const delivery& event) {
    std::lock_guard<std::mutex> lock(e->mutex);
    if (e->closed) return false;
    if (e->pending.size() >= e->max_pending) {
        e->pending.clear();  // a subscriber that fell behind must not grow memory
        e->overflowed = true;
    }
    e->pending.push_back(event);
    if (e->scheduled) return false;  // coalesced into the run already queued
    e->scheduled = true;
    return true;
}

inline void dispatcher::schedule(const std::shared_ptr<entry>& e) {
    if (!e->run) return drain(e);
    try {
        e->run([e] { drain(e); });
    } catch (const std::exception& ex) {
        std::lock_guard<std::mutex> lock(e->mutex);
        e->scheduled = false;
        if (e->log) e->log(log_level::error, std::string("dispatcher: executor refused a task: ") + ex.what());
    }
}

// Runs the handler until nothing is pending, so one subscriber's handler never runs twice at once.
inline void dispatcher::drain(const std::shared_ptr<entry>& e) {
    wakeup w;
    for (;;) {
        w.events.clear();  // keeps its capacity: the queue and this batch trade buffers
        {
            std::lock_guard<std::mutex> lock(e->mutex);
            if (e->closed || (e->pending.empty() && !e->overflowed)) {
                e->scheduled = false;
                if (e->pending.capacity() == 0) e->pending.swap(w.events);
                return;
            }
            w.events.swap(e->pending);
            w.overflowed = std::exchange(e->overflowed, false);
        }
        try {
            e->on_wakeup(w);
        } catch (const std::exception& ex) {
            if (e->log) e->log(log_level::error, std::string("dispatcher: a handler threw: ") + ex.what());
        } catch (...) {
            if (e->log) e->log(log_level::error, "dispatcher: a handler threw a non-exception");
        }
    }
}

inline std::size_t dispatcher::subscriber_count() const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return subscribers_;
}

inline std::size_t dispatcher::channel_count() const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return by_channel_.size();
}

inline std::size_t dispatcher::subscribers_of(const channel& c) const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    auto it = by_channel_.find(c.key());
    return it == by_channel_.end() ? 0 : it->second.size();
}

// --- 6. follower -----------------------------------------------------------------------------

inline follower::follower(store& s, std::vector<channel> channels, std::int64_t last) : store_(s), position_(last) {
    set_channels(std::move(channels));
}

inline follower::follower(store& s, const dispatcher& d, std::vector<channel> channels, std::int64_t last)
    : store_(s), dispatcher_(&d), position_(last) {
    set_channels(std::move(channels));
}

inline void follower::set_channels(std::vector<channel> channels) {
    channels_ = detail::unique_channels(channels);
    std::sort(channels_.begin(), channels_.end(), [](const channel& a, const channel& b) { return a.key() < b.key(); });
    channels_.shrink_to_fit();
    synced_epoch_ = 0;  // new channels: only a poll can vouch for their past
}

inline bool follower::wants(const channel& c) const {
    auto it = std::lower_bound(channels_.begin(), channels_.end(), c.key(),
                               [](const channel& a, const std::string& key) { return a.key() < key; });
    return it != channels_.end() && it->key() == c.key();
}

inline bool follower::wants_all(const commit_event& e) const {
    for (const auto& c : e.channels)
        if (!wants(c)) return false;
    return true;
}

namespace detail {
// A plain on_row as a follower's destination: never full, an event as its rows.
template <class OnRow> struct row_destination {
    OnRow& on_row;
    void row(const notification& n, std::string_view wire) { on_row(n, wire); }
    void event(const commit_event& e) {
        for (std::size_t i = 0; i < e.notifications.size(); ++i)
            on_row(e.notifications[i], std::string_view(e.wire[i]));
    }
    bool full() const noexcept { return false; }
    bool full(std::string_view) const noexcept { return false; }
};
}  // namespace detail

template <class OnRow> std::size_t follower::catch_up(OnRow&& on_row, std::size_t limit) {
    detail::row_destination<std::remove_reference_t<OnRow>> to{on_row};
    return catch_up_into(to, limit);
}

template <class OnRow> std::size_t follower::take(const wakeup& w, OnRow&& on_row, std::size_t limit) {
    detail::row_destination<std::remove_reference_t<OnRow>> to{on_row};
    return take_into(w, to, limit);
}

template <class Destination>
std::size_t follower::catch_up_into(Destination& to, std::size_t limit, std::size_t max_bytes) {
    // The epoch is read before the poll: any gap that opens later starts a newer epoch.
    const std::uint64_t epoch_before = dispatcher_ ? dispatcher_->epoch() : 0;
    // Behind until the read succeeds: if it throws, the next take() polls from the position
    // instead of trusting an event of the same epoch (the rows it was to read would be skipped).
    behind_ = true;
    synced_epoch_ = 0;
    // Position 0 after a first poll (an empty store) means every row, not the first-poll window.
    auto found = store_.fetch(channels_, position_ == 0 && polled_ ? -1 : position_, limit, max_bytes);
    std::size_t taken = 0, bytes = 0;
    for (const auto& n : found.notifications) {
        const std::string wire = n.wire();
        if (to.full(std::string_view(wire))) {  // the rest waits; a first poll stays one until a row is taken
            if (taken) position_ = found.notifications[taken - 1].id, polled_ = true;
            behind_ = true;
            synced_epoch_ = 0;
            return taken;
        }
        to.row(n, std::string_view(wire));
        ++taken;
        bytes += n.message.size();
    }
    polled_ = true;
    // A reset store (position above its newest id) restarts from its horizon as well.
    position_ = found.horizon;
    // A page that reached either cap may have been cut: the next catch-up reads on.
    behind_ = (limit != 0 && found.notifications.size() >= limit) || (max_bytes != 0 && bytes >= max_bytes);
    synced_epoch_ = behind_ ? 0 : epoch_before;
    return found.notifications.size();
}

template <class Destination> std::size_t follower::take_into(const wakeup& w, Destination& to, std::size_t limit) {
    if (w.overflowed || behind_) return catch_up_into(to, limit);  // the events are incomplete
    std::size_t taken = 0;
    for (const auto& d : w.events) {
        const commit_event& event = *d.event;
        if (to.full()) {
            behind_ = true;  // the rest of this wake-up comes from the store
            synced_epoch_ = 0;
            return taken;
        }
        if (event.has_rows() && event.last_id() <= position_) continue;  // already seen
        // An event continues the position when its complete range starts at or before it, or
        // when the same epoch vouches that every row in between was delivered here (or was
        // not ours).
        const bool continues = event.complete() && event.first_id() > position_ &&
                               (event.after() <= position_ || (synced_epoch_ != 0 && d.epoch == synced_epoch_));
        if (!continues) {
            // Every event here was sent after its commit, so one poll now covers this event
            // and all the later ones.
            return taken + catch_up_into(to, limit);
        }
        if (wants_all(event)) {
            to.event(event);
            taken += event.notifications.size();
        } else {
            for (std::size_t i = 0; i < event.notifications.size(); ++i) {
                const auto& n = event.notifications[i];
                if (!wants(n.channel)) continue;
                to.row(n, std::string_view(event.wire[i]));
                ++taken;
            }
        }
        position_ = event.last_id();
    }
    return taken;
}

// --- 6. task_thread --------------------------------------------------------------------------

inline task_thread::task_thread(logger log) : log_(std::move(log)), thread_([this] { run(); }) {}

inline task_thread::~task_thread() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stopping_ = true;
    }
    ready_.notify_one();
    thread_.join();
}

inline void task_thread::post(std::function<void()> task) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
}

inline std::size_t task_thread::pending() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return tasks_.size() + running_;
}

inline void task_thread::run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
        ready_.wait(lock, [&] { return stopping_ || !tasks_.empty(); });
        if (tasks_.empty()) return;  // stopping, and everything posted has run
        auto task = std::move(tasks_.front());
        tasks_.pop_front();
        ++running_;
        lock.unlock();
        try {
            if (task) task();
        } catch (...) {
            if (log_) log_(log_level::error, "task_thread: a task failed: " + detail::current_error());
        }
        lock.lock();
        --running_;
    }
}

#ifdef IMBUS_WITH_POSTGRES
// --- 7. pg_listener --------------------------------------------------------------------------

inline pg_listener::pg_listener(pg_store& store, dispatcher& d, pg_listener_options options)
    : store_(store), dispatcher_(d), options_(std::move(options)) {
    connect();
    // LISTEN came first: a commit after this read is both above the cursor and notified.
    cursor_ = connection_->scalar("SELECT max(id) FROM bus_bus", {}, 0);
    stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stop_fd_ < 0) detail::throw_error(errc::store_failure, "pg_listener: eventfd failed");
    thread_ = std::thread([this] { run(); });
}

inline pg_listener::~pg_listener() {
    const std::uint64_t one = 1;
    if (write(stop_fd_, &one, sizeof one) != ssize_t(sizeof one))
        log(log_level::error, "pg_listener: cannot signal stop");
    if (thread_.joinable()) thread_.join();
    close(stop_fd_);
}

inline void pg_listener::log(log_level level, const std::string& text) const {
    if (store_.options().log) store_.options().log(level, text);
}

inline void pg_listener::connect() {
    connection_.reset();
    connected_ = false;
    auto c = detail::pg_connection::open(store_.conninfo(), store_.options().log, "imbus-listener");
    c->exec((std::string("LISTEN ") + pg_store::notify_channel).c_str());
    connection_ = std::move(c);
    connected_ = true;
}

// A signal (any handler the application installs) interrupts poll(): the rest of the pause is
// waited out; only the stop pipe, or poll failing otherwise, ends it early.
inline bool pg_listener::pause(std::chrono::milliseconds how_long) {
    const auto until = std::chrono::steady_clock::now() + how_long;
    for (;;) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
        pollfd stop{stop_fd_, POLLIN, 0};
        const int ready = ::poll(&stop, 1, int(std::max<std::int64_t>(0, left.count())));
        if (ready == 0) return true;
        if (ready < 0 && errno == EINTR) continue;
        if (ready < 0) log(log_level::error, "pg_listener: poll failed");
        return false;
    }
}

// Every row after the cursor, in pages of one snapshot each: a page holds every row that will
// ever exist in (cursor, its last id], since writers commit in id order.
inline bool pg_listener::read_new_rows() {
    const std::string page = std::to_string(options_.page_size ? options_.page_size : 1000);
    for (;;) {
        const std::int64_t after = cursor_;
        detail::pg_result r;
        try {
            ++reads_;
            r = connection_->exec("SELECT " IMBUS_PG_ROW_COLUMNS
                                  " FROM bus_bus WHERE id > $1::bigint ORDER BY id LIMIT $2::bigint",
                                  {std::to_string(after), page});
        } catch (const std::system_error& e) {
            log(log_level::warning, std::string("pg_listener: ") + e.what());
            return false;
        }
        const int rows = PQntuples(r.get());
        std::vector<notification> found;
        found.reserve(std::size_t(rows));
        std::int64_t last = after;
        for (int i = 0; i < rows; ++i) {
            last = std::stoll(PQgetvalue(r.get(), i, 0));
            std::error_code ec;
            auto c = channel::from_key(
                std::string_view(PQgetvalue(r.get(), i, 1), std::size_t(PQgetlength(r.get(), i, 1))), ec);
            if (ec) {  // no subscriber can follow a channel that is not canonical
                log(log_level::warning,
                    "pg_listener: skipped row " + std::to_string(last) + " on a non-canonical channel");
                continue;
            }
            found.push_back(detail::pg_row(r.get(), i, 0, std::move(c)));
        }
        if (!found.empty()) dispatcher_.notify(commit_event::from_range(after, std::move(found)));
        cursor_ = last;
        if (std::size_t(rows) < std::stoull(page)) return true;
    }
}

inline void pg_listener::run() {
    auto backoff = options_.reconnect_min;
    bool must_read = false;  // commits after the constructor's cursor are notified
    for (;;) {
        if (!connection_) {
            if (!pause(backoff)) return;
            try {
                connect();
                ++reconnects_;
                log(log_level::info, "pg_listener: listening again; catching up after id " + std::to_string(cursor_));
                backoff = options_.reconnect_min;
                must_read = true;
            } catch (const std::system_error& e) {
                log(log_level::warning, std::string("pg_listener: ") + e.what());
                backoff = std::min(backoff * 2, options_.reconnect_max);
                continue;
            }
        }
        PGconn* c = connection_->get();
        // Drain every pending notification first: one read answers them all.
        while (PGnotify* n = PQnotifies(c)) {
            PQfreemem(n);
            must_read = true;
        }
        if (must_read) {
            must_read = false;
            if (!read_new_rows()) {
                connection_.reset();
                connected_ = false;
                continue;
            }
            continue;  // notifications that arrived during the read are already buffered
        }
        pollfd fds[2] = {{PQsocket(c), POLLIN, 0}, {stop_fd_, POLLIN, 0}};
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            log(log_level::error, "pg_listener: poll failed");
            return;
        }
        if (fds[1].revents) return;
        if (fds[0].revents && (!PQconsumeInput(c) || connection_->broken())) {
            log(log_level::warning, "pg_listener: connection lost: " + detail::pg_error_text(c));
            connection_.reset();
            connected_ = false;
        }
    }
}
#undef IMBUS_PG_ROW_COLUMNS
#endif  // IMBUS_WITH_POSTGRES

// --- 8. auth policies ------------------------------------------------------------------------

namespace detail {

// Lets imbus hash and sign session tokens without linking OpenSSL or any other crypto library.
inline std::array<std::uint8_t, 32> sha256(std::string_view data) {
    static constexpr std::uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    std::uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                          0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    auto rotr = [](std::uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
    // Padded message: data, 0x80, zeros, then the 64-bit big-endian bit length; total a multiple of 64.
    const std::size_t total = (data.size() + 9 + 63) / 64 * 64;
    const std::uint64_t bit_len = static_cast<std::uint64_t>(data.size()) * 8;
    auto byte_at = [&](std::size_t i) -> std::uint8_t {
        if (i < data.size()) return static_cast<std::uint8_t>(data[i]);
        if (i == data.size()) return 0x80;
        if (i >= total - 8) return static_cast<std::uint8_t>(bit_len >> (8 * (total - 1 - i)));
        return 0;
    };
    for (std::size_t block = 0; block < total; block += 64) {
        std::uint32_t w[64];
        for (std::size_t t = 0; t < 16; ++t) {
            w[t] = 0;
            for (std::size_t b = 0; b < 4; ++b) w[t] = (w[t] << 8) | byte_at(block + 4 * t + b);
        }
        for (int t = 16; t < 64; ++t) {
            std::uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
            std::uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16] + s0 + w[t - 7] + s1;
        }
        std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
        for (int t = 0; t < 64; ++t) {
            std::uint32_t s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
            std::uint32_t t1 = hh + s1 + ((e & f) ^ (~e & g)) + k[t] + w[t];
            std::uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            hh = g;
            g = f;
            f = e;
            e = d + t1;
            d = c;
            c = b;
            b = a;
            a = t1 + t2;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
        h[5] += f;
        h[6] += g;
        h[7] += hh;
    }
    std::array<std::uint8_t, 32> out{};
    for (std::size_t i = 0; i < 32; ++i) out[i] = static_cast<std::uint8_t>(h[i / 4] >> (24 - 8 * (i % 4)));
    return out;
}

// Authenticates session tokens so clients cannot forge or alter them.
inline std::array<std::uint8_t, 32> hmac_sha256(std::string_view key, std::string_view message) {
    std::string block_key(key);
    if (key.size() > 64) {
        auto hashed = sha256(key);
        block_key.assign(hashed.begin(), hashed.end());
    }
    block_key.resize(64, '\0');
    std::string inner = block_key, outer = block_key;
    for (char& c : inner) c = static_cast<char>(c ^ 0x36);
    for (char& c : outer) c = static_cast<char>(c ^ 0x5c);
    auto inner_hash = sha256(inner.append(message));
    return sha256(outer.append(inner_hash.begin(), inner_hash.end()));
}

// Makes binary digests safe to carry in URLs, cookies and headers without escaping.
inline std::string base64url_encode(std::string_view bytes) {
    static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    std::string out;
    out.reserve((bytes.size() * 4 + 2) / 3);
    std::uint32_t acc = 0, bits = 0;
    for (char ch : bytes) {
        acc = (acc << 8) | static_cast<std::uint8_t>(ch);
        for (bits += 8; bits >= 6; bits -= 6) out += alphabet[(acc >> (bits - 6)) & 0x3f];
    }
    if (bits > 0) out += alphabet[(acc << (6 - bits)) & 0x3f];
    return out;
}

// Reads tokens back from untrusted input, so malformed text must fail cleanly rather than decode loosely.
inline bool base64url_decode(std::string_view text, std::string& out) {
    out.clear();
    if (text.size() % 4 == 1) return false;
    std::uint32_t acc = 0, bits = 0;
    for (char ch : text) {
        int v;
        if (ch >= 'A' && ch <= 'Z') v = ch - 'A';
        else if (ch >= 'a' && ch <= 'z') v = ch - 'a' + 26;
        else if (ch >= '0' && ch <= '9') v = ch - '0' + 52;
        else if (ch == '-') v = 62;
        else if (ch == '_') v = 63;
        else return out.clear(), false;
        acc = (acc << 6) | static_cast<std::uint32_t>(v);
        bits += 6;
        if (bits >= 8) out += static_cast<char>((acc >> (bits -= 8)) & 0xff);
    }
    // Leftover bits must be zero, so every byte string has exactly one accepted encoding.
    if ((acc & ((1u << bits) - 1)) != 0) return out.clear(), false;
    return true;
}

// Compares secrets (e.g. signatures) without leaking the position of the first mismatch through timing.
inline bool constant_time_equal(std::string_view a, std::string_view b) {
    unsigned diff = a.size() == b.size() ? 0u : 1u;
    // Walks all of `a` regardless of content; a short `b` is cycled so no index goes out of range.
    for (std::size_t i = 0; i < a.size(); ++i) {
        unsigned other = b.empty() ? 0u : static_cast<unsigned char>(b[i % b.size()]);
        diff |= static_cast<unsigned char>(a[i]) ^ other;
    }
    return diff == 0;
}

inline bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i])))
            return false;
    return true;
}

inline std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
}

// Query strings arrive percent-encoded, with '+' for spaces in forms; in a path '+' is itself.
inline std::string percent_decode(std::string_view s, bool plus_is_space = true) {
    std::string out;
    out.reserve(s.size());
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '%' && i + 2 < s.size() && hex(s[i + 1]) >= 0 && hex(s[i + 2]) >= 0) {
            out += static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2]));
            i += 2;
        } else {
            out += s[i] == '+' && plus_is_space ? ' ' : s[i];
        }
    }
    return out;
}

// Calls f(name, value) for each "name=value" between separators; stops when f returns true.
template <class F> bool for_each_pair(std::string_view text, char separator, F&& f) {
    while (!text.empty()) {
        const auto end = text.find(separator);
        const auto item = trim(text.substr(0, end));
        const auto eq = item.find('=');
        if (f(trim(item.substr(0, eq)), eq == std::string_view::npos ? std::string_view() : trim(item.substr(eq + 1))))
            return true;
        if (end == std::string_view::npos) break;
        text.remove_prefix(end + 1);
    }
    return false;
}

// Whether JSON text nests at most max_depth arrays and objects (exact for valid JSON, which
// is all that gets parsed). Parsing is iterative, but copying and printing recurse per level.
inline bool json_nesting_within(std::string_view text, std::size_t max_depth) {
    std::size_t depth = 0;
    bool in_string = false;
    for (std::size_t i = 0; i < text.size(); ++i) {
        const char c = text[i];
        if (in_string) {
            if (c == '\\') ++i;  // the escaped character cannot end the string
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth) return false;
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
    return true;
}

inline std::string query_param(std::string_view query, std::string_view name) {
    std::string found;
    for_each_pair(query, '&', [&](std::string_view k, std::string_view v) {
        if (percent_decode(k) != name) return false;
        found = percent_decode(v);
        return true;
    });
    return found;
}

}  // namespace detail

inline std::string http_request::header(std::string_view name) const {
    for (const auto& h : headers)
        if (detail::iequals(h.first, name)) return h.second;
    return {};
}

inline bool http_request::has_header(std::string_view name) const {
    for (const auto& h : headers)
        if (detail::iequals(h.first, name)) return true;
    return false;
}

inline std::string http_request::param(std::string_view name) const { return detail::query_param(query, name); }
inline std::string http_request::decoded_path() const { return detail::percent_decode(path, false); }

inline std::string http_request::cookie(std::string_view name) const {
    std::string found;
    const std::string cookies = header("Cookie");
    detail::for_each_pair(cookies, ';', [&](std::string_view k, std::string_view v) {
        if (k != name) return false;
        if (v.size() >= 2 && v.front() == '"' && v.back() == '"') v = v.substr(1, v.size() - 2);
        found = std::string(v);
        return true;
    });
    return found;
}

inline std::string http_request::bearer_token() const {
    const std::string value = header("Authorization");
    if (value.size() < 7 || !detail::iequals(std::string_view(value).substr(0, 7), "Bearer ")) return {};
    return std::string(detail::trim(std::string_view(value).substr(7)));
}

inline void http_response::set_json(int code, const json& value) {
    status = code;
    headers.emplace_back("Content-Type", "application/json");
    body = value.dump();
}

inline std::vector<channel> public_policy::channels(const identity&, std::vector<channel> requested) const {
    requested.insert(requested.end(), always_.begin(), always_.end());
    return requested;
}

inline signed_token_policy::signed_token_policy(std::string secret, signed_token_options options)
    : secret_(std::move(secret)), options_(std::move(options)) {
    if (secret_.size() < 16) throw std::invalid_argument("signed_token_policy: the secret needs at least 16 bytes");
}

inline std::string signed_token_policy::issue(std::string_view subject, std::chrono::seconds ttl) const {
    const auto expires =
        std::chrono::duration_cast<std::chrono::seconds>((options_.clock() + ttl).time_since_epoch()).count();
    std::string body = detail::base64url_encode(subject) + "." + std::to_string(expires);
    const auto mac = detail::hmac_sha256(secret_, body);
    return body + "." +
           detail::base64url_encode(std::string_view(reinterpret_cast<const char*>(mac.data()), mac.size()));
}

inline std::optional<signed_identity> signed_token_policy::verify(std::string_view token) const {
    const auto dot2 = token.rfind('.');
    if (dot2 == std::string_view::npos) return std::nullopt;
    const auto body = token.substr(0, dot2);
    const auto mac = detail::hmac_sha256(secret_, body);
    const std::string expected =
        detail::base64url_encode(std::string_view(reinterpret_cast<const char*>(mac.data()), mac.size()));
    if (!detail::constant_time_equal(expected, token.substr(dot2 + 1))) return std::nullopt;
    const auto dot1 = body.find('.');
    if (dot1 == std::string_view::npos) return std::nullopt;
    signed_identity who;
    if (!detail::base64url_decode(body.substr(0, dot1), who.subject)) return std::nullopt;
    std::int64_t seconds = 0;
    for (char c : body.substr(dot1 + 1)) {
        if (c < '0' || c > '9' || seconds > (std::numeric_limits<std::int64_t>::max() - 9) / 10) return std::nullopt;
        seconds = seconds * 10 + (c - '0');
    }
    who.expires = time_point(std::chrono::duration_cast<clock_type::duration>(std::chrono::seconds(seconds)));
    if (who.expires <= options_.clock()) return std::nullopt;
    return who;
}

inline void signed_token_policy::revoke(std::string_view subject) {
    std::lock_guard<std::mutex> lock(revoked_->mutex);
    revoked_->subjects.insert(std::string(subject));
}

inline void signed_token_policy::reinstate(std::string_view subject) {
    std::lock_guard<std::mutex> lock(revoked_->mutex);
    revoked_->subjects.erase(std::string(subject));
}

inline admission<signed_identity> signed_token_policy::authenticate(const http_request& request) const {
    std::string token = request.cookie(options_.cookie);
    if (token.empty()) token = request.bearer_token();
    if (token.empty()) return admission<identity>::reject(401, "no session token");
    auto who = verify(token);
    if (!who) return admission<identity>::reject(403, "invalid or expired session token");
    if (!still_valid(*who)) return admission<identity>::reject(403, "session revoked");
    return admission<identity>::accept(std::move(*who));
}

inline std::vector<channel> signed_token_policy::channels(const identity& who, std::vector<channel> requested) const {
    std::vector<channel> out;
    for (auto& c : requested)
        if (!options_.may_subscribe || options_.may_subscribe(who, c)) out.push_back(std::move(c));
    if (options_.own_channels)
        for (auto& c : options_.own_channels(who)) out.push_back(std::move(c));
    return out;
}

inline bool signed_token_policy::still_valid(const identity& who) const {
    if (who.expires <= options_.clock()) return false;
    std::lock_guard<std::mutex> lock(revoked_->mutex);
    return revoked_->subjects.count(who.subject) == 0;
}

// --- 9. client requests -----------------------------------------------------------------------

namespace detail {
// A notification id sent by a client, read one way everywhere (subscribe's last, the routes'):
// any JSON integer; below 0 counts as 0, above int64 as the largest id (a far future); not an
// integer (a float, a string): no id.
inline std::optional<std::int64_t> client_id(const json& value) {
    if (!value.is_number_integer()) return std::nullopt;
    if (value.is_number_unsigned()) return std::int64_t(std::min<std::uint64_t>(value.get<std::uint64_t>(), INT64_MAX));
    return std::max<std::int64_t>(0, value.get<std::int64_t>());
}

}  // namespace detail

inline client_request parse_client_request(std::string_view text, std::size_t max_depth) noexcept {
    client_request r;
    try {
        if (!detail::json_nesting_within(text, max_depth)) {
            r.error = "a request is nested deeper than " + std::to_string(max_depth) + " levels";
            return r;
        }
        json request = json::parse(text, nullptr, false);
        if (request.is_discarded() || !request.is_object() || !request.contains("event_name") ||
            !request["event_name"].is_string()) {
            r.error = "a request is {\"event_name\": string, \"data\": ...}";
            return r;
        }
        r.event_name = request["event_name"].get<std::string>();
        if (request.contains("data")) r.data = std::move(request["data"]);
        if (r.event_name != "subscribe") {
            r.what = client_request::kind::event;
            return r;
        }
        const json& data = r.data;
        if (!data.is_object() || !data.contains("channels") || !data["channels"].is_array()) {
            r.error = "data.channels must be an array of strings";
            return r;
        }
        if (data.contains("last") && !data["last"].is_null()) {
            if (!data["last"].is_number_integer()) {
                r.error = "data.last must be an integer";
                return r;
            }
            r.last = *detail::client_id(data["last"]);  // above int64: a far future (a first poll)
        }
        for (const auto& c : data["channels"]) {
            if (!c.is_string()) {
                r.error = "channels sent by a client must be strings";
                r.channels.clear();
                return r;
            }
            r.channels.push_back(c.get<std::string>());
        }
        r.data = json();
        r.what = client_request::kind::subscribe;
    } catch (const std::exception& e) {  // e.g. out of memory: still one invalid request
        r = client_request();
        r.error = std::string("unreadable request: ") + e.what();
    }
    return r;
}

#ifdef IMBUS_WITH_PRESENCE
// --- 10. presence ----------------------------------------------------------------------------

namespace detail {
constexpr const char* presence_sync_type = "imbus/presence.sync";

inline presence_status presence_from_string(const std::string& s) {
    return s == "online" ? presence_status::online : s == "away" ? presence_status::away : presence_status::offline;
}

inline presence_options presence_on(channel where, presence_options options) {
    options.channel_of = [where = std::move(where)](const std::string&) { return where; };
    return options;
}

inline std::string presence_tracker_id() {
    std::random_device seed;
    std::mt19937_64 random((std::uint64_t(seed()) << 32) ^ seed());
    char text[17];
    std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(random()));
    return text;
}
}  // namespace detail

inline const char* to_string(presence_status s) noexcept {
    switch (s) {
    case presence_status::online: return "online";
    case presence_status::away: return "away";
    default: return "offline";
    }
}

inline presence_tracker::presence_tracker(imbus::bus& b, channel where, presence_options options)
    : presence_tracker(b, detail::presence_on(std::move(where), std::move(options))) {}

inline presence_tracker::presence_tracker(imbus::bus& b, presence_options options)
    : bus_(b), options_(std::move(options)), id_(detail::presence_tracker_id()),
      sync_channel_(b.db(), "imbus.presence", 0), follower_(b.store(), b.get_dispatcher(), {sync_channel_}, 0) {
    if (!options_.channel_of) throw std::invalid_argument("presence_tracker: options.channel_of is empty");
    if (options_.refresh.count() <= 0)
        throw std::invalid_argument("presence_tracker: options.refresh must be positive");
    subscription_ = b.get_dispatcher().subscribe([this](wakeup& w) { read(w); },
                                                 [this](std::function<void()> task) { post(std::move(task)); });
    subscription_.set_channels({sync_channel_});
    post([this] {  // the first read: the others' contributions from the first-poll window
        wakeup w;
        w.overflowed = true;
        read(w);
    });
    thread_ = std::thread([this] { run(); });
    tick();  // the first contribution: the others learn that this tracker is alive
}

inline presence_tracker::~presence_tracker() {
    {
        std::lock_guard<std::mutex> lock(tasks_mutex_);
        stopping_ = true;
    }
    tasks_ready_.notify_all();
    thread_.join();
    subscription_.close();  // a task posted after the join is dropped with tasks_
}

inline presence_status presence_tracker::local_status(const local_entry& e, time_point now) const {
    if (e.connections == 0) return presence_status::offline;
    return now - e.last_activity >= options_.away_after ? presence_status::away : presence_status::online;
}

// Every row names its writer and how long the writer is alive without another row.
inline json presence_tracker::row(time_point now) const {
    const auto until = now + 3 * std::chrono::duration_cast<clock_type::duration>(options_.refresh);
    return {{"p", id_}, {"until", detail::to_micros(until)}};
}

inline void presence_tracker::changed(const std::string& who, local_entry& e, time_point now, std::vector<json>& rows) {
    const presence_status s = local_status(e, now);
    if (s == e.written) return;
    e.written = s;
    json r = row(now);
    r["who"] = who;
    r["s"] = to_string(s);
    rows.push_back(std::move(r));
}

// A failed write loses rows of this tracker only: the next refresh writes its whole contribution.
inline void presence_tracker::write(std::vector<json> rows) {
    if (rows.empty()) return;
    std::error_code ec;
    try {
        transaction tx(bus_);  // begin() may throw (a SQL store that lost its server)
        for (const auto& r : rows) tx.send(sync_channel_, detail::presence_sync_type, r, ec);
        if (!ec) tx.commit(ec);
    } catch (const std::exception& e) {
        if (options_.log)
            options_.log(log_level::error, std::string("presence: writing the contribution failed: ") + e.what());
        return;
    }
    if (ec && options_.log)
        options_.log(log_level::error, "presence: writing the contribution failed: " + ec.message());
}

inline void presence_tracker::on_open(const std::string& who) {
    std::lock_guard<std::mutex> lock(mutex_);
    const time_point now = options_.clock();
    auto& e = local_[who];
    ++e.connections;
    e.last_activity = now;
    std::vector<json> rows;
    changed(who, e, now, rows);
    write(std::move(rows));
}

inline void presence_tracker::on_close(const std::string& who) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = local_.find(who);
    if (it == local_.end()) return;
    if (--it->second.connections > 0) return;
    std::vector<json> rows;
    changed(who, it->second, options_.clock(), rows);
    local_.erase(it);
    write(std::move(rows));
}

inline bool presence_tracker::on_event(const std::string& who, const std::string& name, const json& data) {
    if (name != "update_presence") return false;
    const json* ms = data.is_object() && data.contains("inactivity_period") ? &data["inactivity_period"] : nullptr;
    if (!ms || !ms->is_number()) return true;                        // malformed: ignored
    const double period = std::clamp(ms->get<double>(), 0.0, 1e12);  // NaN-free: JSON has none
    update(who, std::chrono::milliseconds(static_cast<std::int64_t>(period)));
    return true;
}

inline void presence_tracker::update(const std::string& who, std::chrono::milliseconds inactivity) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = local_.find(who);
    if (it == local_.end()) return;
    const time_point now = options_.clock();
    it->second.last_activity = now - std::chrono::duration_cast<clock_type::duration>(inactivity);
    std::vector<json> rows;
    changed(who, it->second, now, rows);
    write(std::move(rows));
}

inline void presence_tracker::tick() {
    std::lock_guard<std::mutex> lock(mutex_);
    const time_point now = options_.clock();
    std::vector<json> rows;
    for (auto& [who, e] : local_) changed(who, e, now, rows);
    if (last_refresh_ == time_point{} || now - last_refresh_ >= options_.refresh) {
        last_refresh_ = now;
        json r = row(now);
        r["all"] = json::object();
        for (const auto& [who, e] : local_) r["all"][who] = to_string(e.written);
        rows.push_back(std::move(r));
    }
    for (const auto& [tracker, c] : trackers_) {
        if (tracker == id_ || c.until >= now) continue;
        auto [at, fresh] = withdrawn_.emplace(tracker, c.last_row);
        if (!fresh && at->second == c.last_row) continue;  // already written, not yet read back
        at->second = c.last_row;
        json r = row(now);
        r["gone"] = tracker;
        r["seen"] = c.last_row;  // withdrawn only if it wrote nothing since
        rows.push_back(std::move(r));
    }
    write(std::move(rows));
}

inline presence_status presence_tracker::merged(const std::string& who) const {
    presence_status best = presence_status::offline;
    for (const auto& [tracker, c] : trackers_) {
        auto it = c.statuses.find(who);
        if (it != c.statuses.end()) best = std::max(best, it->second);
    }
    return best;
}

// Every tracker applies the same rows in the same order, so each merged transition is seen by
// all of them at the same row; the row's writer publishes it.
inline void presence_tracker::apply(const notification& n, std::vector<transition>& out) {
    if (n.channel != sync_channel_) return;
    const json m = json::parse(n.message, nullptr, false);
    if (!m.is_object() || m.value("type", "") != detail::presence_sync_type) return;
    const json& p = m["payload"];
    if (!p.is_object() || !p.contains("p") || !p["p"].is_string() || !p.contains("until")) return;
    const std::string writer = p["p"].get<std::string>();
    auto& c = trackers_[writer];
    c.until = detail::from_micros(p["until"].get<std::int64_t>());
    c.last_row = n.id;
    withdrawn_.erase(writer);  // it wrote again: alive
    std::vector<std::string> touched;
    if (p.contains("who")) {
        const std::string who = p["who"].get<std::string>();
        const presence_status s = detail::presence_from_string(p.value("s", ""));
        if (s == presence_status::offline) c.statuses.erase(who);
        else c.statuses[who] = s;
        touched.push_back(who);
    } else if (p.contains("all")) {
        std::unordered_map<std::string, presence_status> statuses;
        for (const auto& [who, s] : p["all"].items()) {
            const presence_status status = detail::presence_from_string(s.get<std::string>());
            if (status != presence_status::offline) statuses.emplace(who, status);
        }
        for (const auto& [who, s] : c.statuses) touched.push_back(who);
        for (const auto& [who, s] : statuses) touched.push_back(who);
        c.statuses = std::move(statuses);
    } else if (p.contains("gone")) {
        const std::string gone = p["gone"].get<std::string>();
        auto it = trackers_.find(gone);
        if (gone != writer && it != trackers_.end() && it->second.last_row == p.value("seen", std::int64_t(-1))) {
            for (const auto& [who, s] : it->second.statuses) touched.push_back(who);
            trackers_.erase(it);
            withdrawn_.erase(gone);
        }
    }
    for (const auto& who : touched) {
        const presence_status now = merged(who);
        auto it = merged_.find(who);
        const presence_status before = it == merged_.end() ? presence_status::offline : it->second;
        if (now == before) continue;
        if (now == presence_status::offline) merged_.erase(it);
        else merged_[who] = now;
        if (writer == id_) out.emplace_back(who, now);
    }
}

inline void presence_tracker::read(wakeup& w) {
    std::vector<notification> rows;
    try {
        follower_.take(w, [&](const notification& n, std::string_view) { rows.push_back(n); });
    } catch (const std::exception& e) {  // the store failed: the next wake-up polls again
        if (options_.log)
            options_.log(log_level::error, std::string("presence: reading the contributions failed: ") + e.what());
        return;
    }
    std::vector<transition> transitions;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& n : rows) {
            try {
                apply(n, transitions);
            } catch (const std::exception& e) {  // a row of another version: skipped
                if (options_.log) options_.log(log_level::warning, std::string("presence: a row skipped: ") + e.what());
            }
        }
    }
    publish(transitions);
    processed_.store(follower_.position());
}

inline void presence_tracker::publish(const std::vector<transition>& transitions) {
    if (transitions.empty()) return;
    std::error_code ec;
    try {
        transaction tx(bus_);
        for (const auto& [who, s] : transitions)
            if (!ec) tx.send(options_.channel_of(who), options_.type, {{"who", who}, {"status", to_string(s)}}, ec);
        if (!ec) tx.commit(ec);
    } catch (const std::exception& e) {
        if (options_.log)
            options_.log(log_level::error, std::string("presence: publishing transitions failed: ") + e.what());
        return;
    }
    if (ec && options_.log) options_.log(log_level::error, "presence: publishing transitions failed: " + ec.message());
}

inline void presence_tracker::post(std::function<void()> task) {
    {
        std::lock_guard<std::mutex> lock(tasks_mutex_);
        tasks_.push_back(std::move(task));
    }
    tasks_ready_.notify_one();
}

inline void presence_tracker::run() {
    using steady = std::chrono::steady_clock;
    const bool ticking = options_.tick_every.count() > 0;
    auto next_tick = steady::now() + options_.tick_every;
    std::unique_lock<std::mutex> lock(tasks_mutex_);
    for (;;) {
        const auto ready = [this] { return stopping_ || !tasks_.empty(); };
        if (ticking) tasks_ready_.wait_until(lock, next_tick, ready);
        else tasks_ready_.wait(lock, ready);
        if (stopping_) return;
        std::function<void()> task;
        if (!tasks_.empty()) {
            task = std::move(tasks_.front());
            tasks_.pop_front();
        }
        const bool tick_due = ticking && steady::now() >= next_tick;
        if (tick_due) next_tick = steady::now() + options_.tick_every;
        lock.unlock();
        try {
            if (task) task();
            if (tick_due) tick();
        } catch (const std::exception& e) {
            if (options_.log) options_.log(log_level::error, std::string("presence: ") + e.what());
        }
        lock.lock();
    }
}

inline presence_status presence_tracker::status(const std::string& who) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = merged_.find(who);
    return it == merged_.end() ? presence_status::offline : it->second;
}

inline std::size_t presence_tracker::local_size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return local_.size();
}

inline std::size_t presence_tracker::size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return merged_.size();
}

inline std::size_t presence_tracker::trackers() const {
    std::lock_guard<std::mutex> lock(mutex_);
    const time_point now = options_.clock();
    return std::size_t(std::count_if(trackers_.begin(), trackers_.end(),
                                     [&](const auto& t) { return t.first == id_ || t.second.until >= now; }));
}
#endif  // IMBUS_WITH_PRESENCE

// --- 11. server options and metrics ----------------------------------------------------------

inline void server_metrics::count_refusal(int status) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++refusals_[status];
}

inline void server_metrics::count_close(std::uint16_t code) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++closes_[code];
}

inline std::uint64_t server_metrics::closes(std::uint16_t code) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = closes_.find(code);
    return it == closes_.end() ? 0 : it->second;
}

inline std::uint64_t server_metrics::refusals(int status) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = refusals_.find(status);
    return it == refusals_.end() ? 0 : it->second;
}

inline server_metrics::server_metrics(std::size_t shards) : shards_(std::max<std::size_t>(shards, 1)) {}

inline void server_metrics::count_sent(std::size_t shard, std::uint64_t frames, std::uint64_t notifications) noexcept {
    shards_[shard].frames.fetch_add(frames, std::memory_order_relaxed);
    shards_[shard].notifications.fetch_add(notifications, std::memory_order_relaxed);
}

inline void server_metrics::observe_outbound(std::uint64_t held) noexcept {
    auto peak = outbound_peak.load(std::memory_order_relaxed);
    while (held > peak && !outbound_peak.compare_exchange_weak(peak, held, std::memory_order_relaxed)) {}
}

inline std::uint64_t server_metrics::frames_sent() const noexcept {
    std::uint64_t n = 0;
    for (const auto& s : shards_) n += s.frames.load(std::memory_order_relaxed);
    return n;
}

inline std::uint64_t server_metrics::notifications_sent() const noexcept {
    std::uint64_t n = 0;
    for (const auto& s : shards_) n += s.notifications.load(std::memory_order_relaxed);
    return n;
}

inline void server_metrics::observe_publish_to_send(std::size_t shard, std::chrono::steady_clock::duration d) noexcept {
    const double seconds = std::chrono::duration<double>(d).count();
    const auto bucket =
        std::size_t(std::lower_bound(latency_bounds.begin(), latency_bounds.end(), seconds) - latency_bounds.begin());
    shards_[shard].latency[bucket].fetch_add(1, std::memory_order_relaxed);
    shards_[shard].latency_sum_ns.fetch_add(
        std::uint64_t(std::max<std::int64_t>(0, std::chrono::duration_cast<std::chrono::nanoseconds>(d).count())),
        std::memory_order_relaxed);
}

inline std::string server_metrics::prometheus_text() const {
    std::string out;
    auto counter = [&](const char* name, const char* help, std::uint64_t value) {
        out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " +
               std::to_string(value) + "\n";
    };
    counter("imbus_connections_opened_total", "WebSocket handshakes completed.", connections_opened.load());
    counter("imbus_frames_sent_total", "Frames sent to clients.", frames_sent());
    counter("imbus_notifications_sent_total", "Notifications sent to clients (a row sent to two clients counts twice).",
            notifications_sent());
    counter("imbus_slow_consumer_catch_ups_total",
            "Times a client was held back to be caught up from the store (its queue over max_outbound_bytes, or all "
            "over max_outbound_total).",
            slow_consumer_catch_ups.load());
    counter("imbus_missed_notifications_signals_total", "bus/missed_notifications markers sent.",
            missed_signals.load());
    counter("imbus_rate_limited_total", "Connections closed with 1013 for sending frames (pings included) too fast.",
            rate_limited.load());
    counter("imbus_too_many_channels_total",
            "Connections closed with 1008 for a subscribe asking for more than max_channels.",
            too_many_channels.load());
    counter("imbus_outbound_total_lags_total",
            "Times a client was held back because all queues together reached max_outbound_total.",
            outbound_total_lags.load());
    counter("imbus_pings_received_total", "Pings received from clients.", pings_received.load());
    counter("imbus_pongs_replaced_total",
            "Pings answered by updating a pong not yet written instead of queueing another.", pongs_replaced.load());
    counter("imbus_accept_pauses_total", "Times accepting paused because the process was out of file descriptors.",
            accept_pauses.load());
    counter("imbus_requests_refused_total",
            "Malformed client requests (bad JSON, a subscribe with wrong types), answered with a bus/request_refused "
            "element.",
            requests_refused.load());
    counter(
        "imbus_bad_requests_total",
        "HTTP requests refused before routing because their framing was malformed or ambiguous (400, 413, 431, 501).",
        bad_requests.load());
    counter("imbus_store_errors_total",
            "Reads of the store for a connection that failed (retried, or closed with 1011).", store_errors.load());
    counter("imbus_event_errors_total",
            "Calls of policy.on_event or policy.on_subscribe that threw or gave a bad message (logged; the connection "
            "stays open).",
            event_errors.load());
    {
        std::lock_guard<std::mutex> lock(mutex_);
        out +=
            "# HELP imbus_closes_total WebSocket connections closed, by close code (1006: dropped without one).\n"
            "# TYPE imbus_closes_total counter\n";
        for (const auto& c : closes_)
            out += "imbus_closes_total{code=\"" + std::to_string(c.first) + "\"} " + std::to_string(c.second) + "\n";
        out +=
            "# HELP imbus_handshakes_refused_total Handshakes answered with an HTTP error, by status.\n"
            "# TYPE imbus_handshakes_refused_total counter\n";
        for (const auto& r : refusals_)
            out += "imbus_handshakes_refused_total{status=\"" + std::to_string(r.first) + "\"} " +
                   std::to_string(r.second) + "\n";
    }
    out +=
        "# HELP imbus_publish_to_send_seconds From a commit reaching this process to the wake-up that sends its "
        "frame.\n"
        "# TYPE imbus_publish_to_send_seconds histogram\n";
    std::uint64_t cumulative = 0;
    char bound[32];
    std::uint64_t sum_ns = 0;
    for (const auto& s : shards_) sum_ns += s.latency_sum_ns.load(std::memory_order_relaxed);
    for (std::size_t i = 0; i <= latency_bounds.size(); ++i) {
        for (const auto& s : shards_) cumulative += s.latency[i].load(std::memory_order_relaxed);
        if (i < latency_bounds.size()) std::snprintf(bound, sizeof bound, "%g", latency_bounds[i]);
        out += std::string("imbus_publish_to_send_seconds_bucket{le=\"") +
               (i < latency_bounds.size() ? bound : "+Inf") + "\"} " + std::to_string(cumulative) + "\n";
    }
    std::snprintf(bound, sizeof bound, "%.9f", double(sum_ns) / 1e9);
    out += std::string("imbus_publish_to_send_seconds_sum ") + bound + "\n";
    out += "imbus_publish_to_send_seconds_count " + std::to_string(cumulative) + "\n";
    return out;
}

inline http_route static_files(std::string root, std::string url_prefix) {
    return [root = std::move(root), prefix = std::move(url_prefix)](const http_request& request,
                                                                    http_response& response) {
        if (request.method != "GET" || request.path.compare(0, prefix.size(), prefix) != 0) return false;
        std::string relative = detail::percent_decode(std::string_view(request.path).substr(prefix.size()), false);
        if (relative.empty() || relative.back() == '/') relative += "index.html";
        if (relative.find("..") != std::string::npos || relative.find('\0') != std::string::npos) return false;
        std::ifstream file(root + "/" + relative, std::ios::binary);
        if (!file) return false;
        static const std::pair<const char*, const char*> types[] = {{".html", "text/html; charset=utf-8"},
                                                                    {".js", "text/javascript; charset=utf-8"},
                                                                    {".mjs", "text/javascript; charset=utf-8"},
                                                                    {".css", "text/css; charset=utf-8"},
                                                                    {".json", "application/json"},
                                                                    {".svg", "image/svg+xml"},
                                                                    {".png", "image/png"},
                                                                    {".ico", "image/x-icon"},
                                                                    {".txt", "text/plain; charset=utf-8"}};
        std::string type = "application/octet-stream";
        for (const auto& t : types) {
            const std::string_view ext = t.first;
            if (relative.size() >= ext.size() && relative.compare(relative.size() - ext.size(), ext.size(), ext) == 0)
                type = t.second;
        }
        response.status = 200;
        response.headers.emplace_back("Content-Type", type);
        response.headers.emplace_back("Cache-Control", "no-cache");
        response.body.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
        return true;
    };
}

namespace detail {

// --- 11. frames and in-band markers ----------------------------------------------------------

// An in-band signal: a frame element shaped like a notification, carrying the client's own
// cursor as id so that clients tracking the last element's id stay put (docs/PROTOCOL.md §4).
inline std::string marker(std::int64_t id, const char* type, const json& payload) {
    return "{\"id\":" + std::to_string(id) + ",\"message\":{\"type\":\"" + type +
           "\",\"payload\":" + payload.dump(-1, ' ', false, json::error_handler_t::replace) + "}}";
}

// A policy's direct message, numbered like a marker (the position it follows).
inline std::string direct_element(std::int64_t id, const direct_message& m) {
    return "{\"id\":" + std::to_string(id) + ",\"message\":" + make_message(m.type, m.payload) + "}";
}

// Rows after `last` were garbage-collected: the client must reload.
inline std::string missed_marker(std::int64_t last) {
    return marker(last, "bus/missed_notifications", {{"last", last}});
}

// A malformed request: the connection stays, as in Odoo, but the client learns why nothing happened.
inline std::string refusal_marker(std::int64_t id, const std::string& event_name, const std::string& error) {
    return marker(id, "bus/request_refused",
                  {{"event_name", event_name.empty() ? json() : json(event_name)}, {"error", error}});
}

// One WebSocket frame as it goes on the wire: a commit's frame is made once and shared by
// every recipient; a catch-up frame or a pong belongs to one connection.
struct wire_frame {
    static constexpr std::size_t header_room = 10;  // the longest server frame header
    std::string bytes;                              // header_room bytes (the header fills their end), then the payload
    std::size_t start = header_room;
    std::size_t size() const noexcept { return bytes.size() - start; }
    const char* data() const noexcept { return bytes.data() + start; }
};

// Writes the (unmasked, final) header into the room left before the payload: no copy.
inline shared_wire_frame finish_frame(std::string bytes, std::uint8_t opcode) {
    const std::uint64_t n = bytes.size() - wire_frame::header_room;
    std::size_t start = 0;
    if (n < 126) {
        start = 8;
        bytes[9] = char(n);
    } else if (n <= 0xffff) {
        start = 6;
        bytes[7] = char(126);
        bytes[8] = char(n >> 8);
        bytes[9] = char(n & 0xff);
    } else {
        bytes[1] = char(127);
        for (int i = 0; i < 8; ++i) bytes[std::size_t(2 + i)] = char((n >> (56 - 8 * i)) & 0xff);
    }
    bytes[start] = char(0x80 | opcode);
    auto frame = std::make_shared<wire_frame>();
    frame->bytes = std::move(bytes);
    frame->start = start;
    return frame;
}

inline shared_wire_frame control_frame(std::uint8_t opcode, std::string_view payload) {
    std::string bytes(wire_frame::header_room, '\0');
    bytes.append(payload.data(), std::min<std::size_t>(payload.size(), 125));  // RFC 6455 §5.5
    return finish_frame(std::move(bytes), opcode);
}

// Builds one text frame (a JSON array) from already serialized wire forms.
struct frame_builder {
    std::string text;
    std::size_t rows = 0;  // notifications in it (a missed marker is not one)
    void add(std::string_view wire, bool is_row = true) {
        if (text.empty()) text.assign(wire_frame::header_room, '\0'), text += '[';
        else text += ',';
        text += wire;
        rows += is_row;
    }
    bool empty() const noexcept { return text.empty(); }
    std::size_t size() const noexcept { return text.size(); }  // the frame's bytes, near enough
    shared_wire_frame finish() { return finish_frame(std::move(text += ']'), 0x1); }
};

// A commit's rows as frames of at most `cap` bytes each (a single larger row alone): made once
// per commit and shared by every recipient, like the single frame of a small commit.
struct wire_frames {
    std::vector<shared_wire_frame> pieces;
    std::size_t rows = 0;
};
inline wire_frames frames_of(const std::vector<std::string>& wire, std::size_t cap) {
    wire_frames out;
    frame_builder frame;
    for (const auto& w : wire) {
        if (!frame.empty() && frame.size() + w.size() + 1 > cap)
            out.pieces.push_back(frame.finish()), frame = frame_builder();
        frame.add(w);
    }
    if (!frame.empty()) out.pieces.push_back(frame.finish());
    out.rows = wire.size();
    return out;
}

// --- 11. connection_feed: what a connection is sent, and when (no socket) -------------------

inline void connection_feed::subscribe(feed_state& s, feed_link& link, std::vector<channel> granted, std::int64_t last,
                                       bool greet) {
    const bool first = !s.follow;
    if (first) s.follow.emplace(store_, dispatcher_, std::vector<channel>(), last);
    s.greet = greet;
    s.follow->set_channels(std::move(granted));
    if (s.lagging) return;  // the catch-up after the drain covers the new channels
    catch_up(s, link, first && last > 0);
}

// A catch-up (history on subscribe, wake-ups that do not continue, a resume after a drain)
// goes one frame of catch_up_bytes at a time, one frame per connection per slice, with live
// wake-ups served between slices: a thousand clients asking for history at once wait their
// turns, and an honest client's live frames do not wait behind them. Wake-ups meanwhile are
// skipped: the next read of the store covers them.
inline void connection_feed::catch_up(feed_state& s, feed_link& link, bool check_missed) {
    s.check_missed = s.check_missed || check_missed;
    if (s.retrying) return;                          // the retry catches up
    if (std::exchange(s.catching_up, true)) return;  // already waiting for its slice
    link.catch_up_in_a_slice();
}

inline std::size_t connection_feed::catch_up_frame(feed_state& s, feed_link& link) {
    if (!link.open() || !s.follow || !std::exchange(s.catching_up, false)) return 0;
    if (over_budget(s, link, 0)) {
        lag(s, link);  // its resume checks for missed rows again
        return 0;
    }
    // One frame sized so that the queue stays within max_outbound_bytes (a lone larger row
    // aside); the store reads about one frame's worth: a catch-up costs what it sends.
    struct into_frame {
        frame_builder frame;
        std::size_t room;
        void row(const notification&, std::string_view wire) { frame.add(wire); }
        bool full(std::string_view wire) const { return !frame.empty() && frame.size() + wire.size() + 1 > room; }
    } to{frame_builder(), std::min(options_.catch_up_bytes, options_.max_outbound_bytes - link.queued_bytes())};
    bool missed = false;
    try {
        missed = s.check_missed && store_.lost_after(s.follow->channels(), s.follow->position());
        if (missed) {
            if (options_.log)
                options_.log(log_level::info, "server: " + link.peer() + " missed notifications after " +
                                                  std::to_string(s.follow->position()));
            to.frame.add(missed_marker(s.follow->position()), false);
        }
        s.follow->catch_up_into(to, options_.catch_up_rows, to.room);
    } catch (const std::exception& e) {
        store_failed(s, link, e.what());  // nothing taken: the position and check_missed stand
        return 0;
    }
    s.check_missed = false;
    s.store_failures = 0;
    if (missed) metrics_.missed_signals.fetch_add(1, std::memory_order_relaxed);
    if (!s.follow->behind() && std::exchange(s.greet, false)) greet(s, link, to.frame);
    const std::size_t size = to.frame.size();
    if (!to.frame.empty()) {
        metrics_.count_sent(link.shard(), 1, to.frame.rows);
        send(link, to.frame.finish());
        link.flush_after_slice();
    }
    if (s.follow->behind()) catch_up(s, link, false);
    return size;
}

// Odoo's _after_subscribe_data: asked when the subscribe's history has been read, so what it
// says is never older than the rows before it; its messages end the history's last frame.
inline void connection_feed::greet(feed_state& s, feed_link& link, frame_builder& frame) {
    auto failed = [&](const std::string& what) {
        metrics_.event_errors.fetch_add(1, std::memory_order_relaxed);
        if (options_.log) options_.log(log_level::error, "server: policy.on_subscribe " + what);
    };
    std::vector<direct_message> messages;
    try {
        messages = link.greeting(s.follow->channels());
    } catch (...) {
        return failed("failed: " + current_error());
    }
    for (const auto& m : messages) {
        try {
            frame.add(direct_element(s.follow->position(), m), false);
        } catch (const std::exception& e) {
            failed(std::string("gave a bad message: ") + e.what());  // the others still go
        }
    }
}

inline void connection_feed::on_wakeup(feed_state& s, feed_link& link, wakeup& w) {
    // A lagging client is caught up after its drain, one catching up by its next frame.
    if (!link.open() || !s.follow || s.lagging || s.catching_up || s.retrying) return;
    if (!link.still_valid()) return;
    if (w.overflowed || s.follow->behind()) return catch_up(s, link, true);
    // What follower::take_into does with the wake-up: rows of events shared only in part join
    // the connection's own frame; an event wholly for it goes as the frames encoded once for
    // every recipient (a big commit in pieces); a full queue stops it and the rest waits in the
    // store. The queue bound holds per event, not per wake-up.
    struct live_frames {
        connection_feed& self;
        feed_state& s;
        feed_link& link;
        std::chrono::steady_clock::time_point now;                    // one clock read per wake-up, not per frame
        std::optional<std::chrono::steady_clock::time_point> oldest;  // of the events in `frame`
        frame_builder frame;                                          // rows of events shared only in part
        std::uint64_t frames = 0, rows = 0;                           // one update of the counters per wake-up
        bool stopped = false;                                         // the queue filled up

        void flush() {
            if (oldest) self.metrics_.observe_publish_to_send(link.shard(), now - *oldest);
            ++frames, rows += frame.rows;
            self.send(link, frame.finish());
            frame = frame_builder();
        }
        // No frame grows past catch_up_bytes unless one row does: clients size their frame
        // limit on it (client_options::max_message_bytes).
        void row(const notification&, std::string_view wire) {
            if (!frame.empty() && frame.size() + wire.size() + 1 > self.options_.catch_up_bytes) flush();
            frame.add(wire);
        }
        void event(const commit_event& e) {
            if (!frame.empty()) flush();
            const auto shared = e.shared_frame<wire_frames>(
                [&] { return std::make_shared<wire_frames>(frames_of(e.wire, self.options_.catch_up_bytes)); });
            self.metrics_.observe_publish_to_send(link.shard(), now - e.noticed_at);
            frames += shared->pieces.size(), rows += shared->rows;
            for (const auto& piece : shared->pieces) self.send(link, piece);
        }
        bool full() { return stopped = self.over_budget(s, link, frame.size()); }
        // A poll within a wake-up (an event that does not continue) reads catch_up_rows rows,
        // framed by row(); the queue is checked again at the next event.
        bool full(std::string_view) const noexcept { return false; }
    } to{*this, s, link, std::chrono::steady_clock::now(), std::nullopt, frame_builder()};
    if (!w.events.empty() && w.events.front().event) to.oldest = w.events.front()->noticed_at;
    std::string failure;  // a read of the store failed: what was taken before it still goes out
    try {
        s.follow->take_into(w, to, options_.catch_up_rows);
    } catch (const std::exception& e) {
        failure = e.what();
    }
    if (!to.frame.empty()) to.flush();
    if (to.frames) link.flush_after_slice();  // everything of this wake-up in one write
    metrics_.count_sent(link.shard(), to.frames, to.rows);
    if (!failure.empty()) return store_failed(s, link, failure.c_str());
    if (to.stopped) return lag(s, link);
    if (s.follow->behind()) catch_up(s, link, false);
}

// A client at max_outbound_bytes waits; so does, once all queues together reach
// max_outbound_total, every client holding catch_up_bytes or more: those that read keep
// flowing, and the total stays within max_outbound_total plus catch_up_bytes and a frame per client.
inline bool connection_feed::over_budget(const feed_state& s, feed_link& link, std::size_t adding) {
    const std::size_t mine = link.queued_bytes() + adding;
    if (mine >= options_.max_outbound_bytes) return true;
    if (mine < options_.catch_up_bytes || link.all_queued_bytes() < options_.max_outbound_total) return false;
    if (!s.lagging) metrics_.outbound_total_lags.fetch_add(1, std::memory_order_relaxed);
    return true;
}

// A held-back client gets nothing live until all it holds has been written; then it is
// caught up from the store (resume). One that never reads costs no more work meanwhile.
inline void connection_feed::lag(feed_state& s, feed_link& link) {
    if (!s.lagging) {
        metrics_.slow_consumer_catch_ups.fetch_add(1, std::memory_order_relaxed);
        if (options_.log)
            options_.log(log_level::info, "server: " + link.peer() + " is slow; it will be caught up from the store");
    }
    s.lagging = true;
    link.resume_when_drained();
}

inline void connection_feed::resume(feed_state& s, feed_link& link) {
    if (!link.open() || !s.lagging) return;
    s.lagging = false;
    if (link.still_valid()) catch_up(s, link, true);
}

// One guard for every read of the store made for a connection on an I/O thread: the loop goes
// on, the connection keeps its position and is caught up again after a backoff, and a store
// that stays down costs each client a 1011 (it resumes from its last id), never the server.
inline void connection_feed::store_failed(feed_state& s, feed_link& link, const char* what) {
    metrics_.store_errors.fetch_add(1, std::memory_order_relaxed);
    if (++s.store_failures > options_.store_retries) {
        if (options_.log)
            options_.log(log_level::error, "server: reading the store for " + link.peer() + " failed " +
                                               std::to_string(s.store_failures) +
                                               " times in a row; closing (1011): " + what);
        return link.close(1011, "store unavailable");
    }
    const auto delay = std::min<std::chrono::milliseconds>(
        options_.store_retry_delay * (1u << std::min<std::uint32_t>(s.store_failures - 1, 16)),
        std::chrono::seconds(5));
    if (options_.log)
        options_.log(log_level::warning, "server: reading the store for " + link.peer() + " failed (" + what +
                                             "); trying again in " + std::to_string(delay.count()) + " ms");
    s.retrying = true;
    link.retry_after(delay);
}

inline void connection_feed::retry(feed_state& s, feed_link& link) {
    if (!std::exchange(s.retrying, false)) return;
    if (link.open()) catch_up(s, link, false);  // a lagging one is caught up by its resume
}

// Catch-up frames are counted by catch_up_frame, live ones by on_wakeup, once per wake-up.
inline void connection_feed::send(feed_link& link, shared_wire_frame frame) {
    if (!link.queue(std::move(frame))) return;  // closing: the client resumes from its last id
    metrics_.observe_outbound(link.queued_bytes());
}

}  // namespace detail

namespace detail {

// --- 11. admission: places under the connection limits, the frame rate (no socket) ----------

// Open TCP connections, overall and per peer address, counted from accept to the end of the
// connection object, whatever ends it (a close, an HTTP answer, a handshake timeout).
struct connection_ledger {
    std::mutex mutex;  // guards the two below
    std::size_t total = 0;
    std::unordered_map<std::string, std::size_t> by_address;
};

// A connection's place in the ledger, given back by release() or with the connection.
class ledger_ticket {
public:
    ledger_ticket() = default;
    ledger_ticket(ledger_ticket&& other) noexcept = default;
    ledger_ticket& operator=(ledger_ticket&& other) noexcept {
        if (this != &other) release(), ledger_ = std::move(other.ledger_), address_ = std::move(other.address_);
        return *this;
    }
    ~ledger_ticket() { release(); }

    // A place for a connection from `address` under max_connections and
    // max_connections_per_address (0: no limit), or an empty ticket and the reason in `why`.
    static ledger_ticket take(const std::shared_ptr<connection_ledger>& ledger, std::string address,
                              std::size_t max_total, std::size_t max_per_address, std::string& why) {
        std::lock_guard<std::mutex> lock(ledger->mutex);
        if (max_total && ledger->total >= max_total) {
            why = "too many connections";
            return {};
        }
        auto& mine = ledger->by_address[address];
        if (max_per_address && mine >= max_per_address) {
            if (mine == 0) ledger->by_address.erase(address);
            why = "too many connections from " + address;
            return {};
        }
        ++mine;
        ++ledger->total;
        return ledger_ticket(ledger, std::move(address));
    }
    explicit operator bool() const noexcept { return ledger_ != nullptr; }
    const std::string& address() const noexcept { return address_; }  // the peer's, taken at accept
    void release() noexcept {
        if (!ledger_) return;
        const auto ledger = std::move(ledger_);  // the last owner may be this ticket: kept past the lock
        std::lock_guard<std::mutex> lock(ledger->mutex);
        --ledger->total;
        auto it = ledger->by_address.find(address_);
        if (it != ledger->by_address.end() && --it->second == 0) ledger->by_address.erase(it);
    }

private:
    ledger_ticket(std::shared_ptr<connection_ledger> ledger, std::string address)
        : ledger_(std::move(ledger)), address_(std::move(address)) {}
    std::shared_ptr<connection_ledger> ledger_;
    std::string address_;
};

// A connection's frame rate: at most `burst` frames in any burst * delay (Odoo: 10 in 2 s),
// pings and pongs included. The last `burst` arrival times, as a ring.
class rate_window {
public:
    // Counts a frame that arrived at `now`; false when it is one too many.
    bool admit(std::chrono::steady_clock::time_point now, std::size_t burst, std::chrono::milliseconds delay) {
        if (recent_.size() < burst) {
            recent_.push_back(now);
            return true;
        }
        if (now - recent_[next_] < delay * burst) return false;
        recent_[next_] = now;
        next_ = (next_ + 1) % burst;
        return true;
    }

private:
    std::vector<std::chrono::steady_clock::time_point> recent_;
    std::size_t next_ = 0;
};

}  // namespace detail

#ifdef IMBUS_WITH_WEBSOCKETPP
// --- 11. server: sockets, admission, routes (websocketpp) ------------------------------------

namespace detail {

// Connections taken per readiness of a listening socket: a burst is taken in a few turns,
// while the loop still gets back to the connections it serves between them.
constexpr std::size_t accept_batch = 64;
// Catch-up bytes framed per slice at most (a lone larger frame aside): four frames of the
// default catch_up_bytes, about the cost of a slice of live wake-ups.
constexpr std::size_t catch_up_slice_bytes = 256 * 1024;
// How long accepting waits when the process is out of file descriptors.
constexpr std::chrono::milliseconds accept_pause_time{100};
// How long a connection refused at accept may take to read its 503 before it is closed.
constexpr std::chrono::milliseconds refusal_linger{1000};

// Runs `task` after the loop's next poll for I/O: posted once it would run before the I/O
// completions that poll adds; posted twice it runs behind them, so a slice never starves I/O.
template <class Task> void post_after_io(asio::io_context& io, Task task) {
    asio::post(io, [&io, task = std::move(task)]() mutable { asio::post(io, std::move(task)); });
}

// websocketpp checks each fragment of a text message as it comes, but at the end it asks
// whether the message ends on a whole character only when the last frame is not a
// continuation. What it let through is a valid prefix, so only the tail needs a look.
inline bool ends_on_character(std::string_view text) {
    std::size_t i = text.size(), continuation = 0;
    while (i > 0 && continuation < 4 && (static_cast<unsigned char>(text[i - 1]) & 0xC0) == 0x80) --i, ++continuation;
    if (i == 0) return continuation == 0;
    const unsigned char lead = static_cast<unsigned char>(text[i - 1]);
    const std::size_t needed = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    return continuation == needed;
}

// A socket closed with input unread sends RST, and a client still sending (the rest of a
// message too big, frames after a protocol error) then loses the answer written before it (a
// 503, a close frame). So the write side ends first, and what still arrives is read and dropped
// until the peer closes or `linger` passes; then done() runs, once. `owner` keeps the socket.
template <class Owner, class Socket, class Done>
void drain_input(std::shared_ptr<Owner> owner, Socket& socket, std::chrono::milliseconds linger, Done done) {
    struct state {
        std::shared_ptr<Owner> owner;
        Socket& socket;
        asio::steady_timer timer;
        Done done;
        bool finished = false;
        void finish() {
            if (std::exchange(finished, true)) return;
            timer.cancel();
            done();
        }
    };
    struct reader {
        std::shared_ptr<state> s;
        void operator()(const asio::error_code& ec = {}) const {
            if (ec) return s->finish();  // cancelled by the timer
            char sink[4096];             // on the stack: a drain holds no buffer between reads
            ssize_t n;
            while ((n = ::recv(s->socket.native_handle(), sink, sizeof sink, 0)) > 0) {}
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return s->finish();
            s->socket.async_wait(asio::socket_base::wait_read, reader{s});
        }
    };
    asio::error_code ignored;
    socket.shutdown(asio::socket_base::shutdown_send, ignored);
    socket.non_blocking(true, ignored);
    auto s = std::make_shared<state>(
        state{std::move(owner), socket, asio::steady_timer(socket.get_executor(), linger), std::move(done)});
    s->timer.async_wait([s](const asio::error_code& ec) {
        asio::error_code ignored;
        if (!ec) s->socket.cancel(ignored);
    });
    reader{s}();
}

// What websocketpp's parser lets through and a proxy in front may read differently (request
// smuggling): the header section is checked as sent, before websocketpp parses it. Returns ""
// or the reason for a 400 (a 501 for a transfer coding, which imbus does not decode).
inline std::string header_section_fault(std::string_view head, int& status) {
    status = 400;
    auto token_char = [](unsigned char c) {
        return std::isalnum(c) || std::string_view("!#$%&'*+-.^_`|~").find(char(c)) != std::string_view::npos;
    };
    for (std::size_t i = 0; i < head.size(); ++i) {
        const unsigned char c = static_cast<unsigned char>(head[i]);
        if (c == '\r' && (i + 1 == head.size() || head[i + 1] != '\n')) return "bare CR in the header section";
        if (c == '\n' && (i == 0 || head[i - 1] != '\r')) return "bare LF in the header section";
        if ((c < 0x20 && c != '\t' && c != '\r' && c != '\n') || c == 0x7f)
            return "control character in the header section";
    }
    int lengths = 0;
    bool chunked = false;
    std::size_t at = head.find("\r\n");  // after the request line
    while (at != std::string_view::npos && at + 2 < head.size()) {
        const std::size_t start = at + 2, end = head.find("\r\n", start);
        const std::string_view line = head.substr(start, (end == std::string_view::npos ? head.size() : end) - start);
        at = end;
        if (line.empty()) break;
        if (line.front() == ' ' || line.front() == '\t') return "folded header line";
        const std::size_t colon = line.find(':');
        if (colon == std::string_view::npos) return "header line without a colon";
        const std::string_view name = line.substr(0, colon), value = trim(line.substr(colon + 1));
        if (name.empty()) return "empty header name";
        for (const char c : name)
            if (!token_char(static_cast<unsigned char>(c))) return "invalid character or whitespace in header name";
        if (iequals(name, "Content-Length")) {
            ++lengths;
            if (value.empty() || value.size() > 15 || value.find_first_not_of("0123456789") != std::string_view::npos)
                return "malformed Content-Length";
        }
        if (iequals(name, "Transfer-Encoding")) chunked = true;
    }
    if (lengths > 1) return "more than one Content-Length";
    if (chunked && lengths > 0) return "both Content-Length and Transfer-Encoding";
    if (chunked) {
        status = 501;
        return "Transfer-Encoding is not supported; send Content-Length";
    }
    return "";
}

// websocketpp picks its handshake code from the version header and answers 400 to versions it
// does not know, while it still speaks drafts 0, 7 and 8. Reporting "13" for every version
// lets the server itself refuse all but 13 with 426, as RFC 6455 asks.
class ws_request : public websocketpp::http::parser::request {
public:
    // Hides the parser's consume (websocketpp calls it on the configured request type): the
    // header section is kept as sent until it is complete and checked, then parsed in one piece,
    // so how the bytes were split never changes the answer.
    std::size_t consume(char const* buf, std::size_t len) {
        using base = websocketpp::http::parser::request;
        if (head_checked_) return base::consume(buf, len);
        const std::size_t cap = websocketpp::http::max_header_size + 4;
        const std::size_t from = head_.size() < 3 ? 0 : head_.size() - 3, before = head_.size();
        head_.append(buf, std::min(len, cap + 1 - before));
        const std::size_t blank = head_.find("\r\n\r\n", from);
        if (blank == std::string::npos) {
            if (head_.size() > cap)
                throw websocketpp::http::exception("header section too large",
                                                   websocketpp::http::status_code::request_header_fields_too_large,
                                                   "header section too large");
            return len;
        }
        head_.resize(blank + 4);
        const std::size_t taken = head_.size() - before;  // this call's bytes that end the header section
        int status = 400;
        const std::string fault = header_section_fault(head_, status);
        if (!fault.empty())
            throw websocketpp::http::exception(fault, static_cast<websocketpp::http::status_code::value>(status),
                                               fault);
        head_checked_ = true;
        base::consume(head_.data(), head_.size());
        std::string().swap(head_);
        return ready() ? taken : taken + base::consume(buf + taken, len - taken);
    }

    std::string const& get_header(std::string const& key) const {
        std::string const& value = websocketpp::http::parser::request::get_header(key);
        static const std::string thirteen = "13";
        return iequals(key, "Sec-WebSocket-Version") ? thirteen : value;
    }
    std::string const& real_header(std::string const& key) const {
        return websocketpp::http::parser::request::get_header(key);
    }

private:
    std::string head_;  // the header section so far, as sent
    bool head_checked_ = false;
};

// websocketpp keeps the handshake's request, response and URI in the connection; once open,
// nothing reads them again (its logs of them run before the open handler), so an idle
// connection drops them: 1.4 KiB in all for the bench's client, about 2.8 KiB with a
// browser's headers. Swapped with fresh ones, not assigned, so no string keeps its buffer.
template <class Connection> void release_handshake(Connection& con) {
    using request = typename Connection::request_type;
    using response = typename Connection::response_type;
    request spent_request;
    std::swap(const_cast<request&>(con.get_request()), spent_request);
    response spent_response;
    std::swap(const_cast<response&>(con.get_response()), spent_response);
    con.set_uri(websocketpp::uri_ptr());
}

// Each connection's bus state lives inside websocketpp's connection object (one allocation)
// and is touched only on the thread of the shard that owns the connection.
template <class Identity> struct session_state {
    std::optional<Identity> identity;
    feed_state feed;  // where it stands in the stream of notifications
    dispatcher::subscription subscription;
    rate_window rate;
    std::chrono::steady_clock::time_point last_frame;
    std::chrono::steady_clock::time_point ping_sent;  // when ping_outstanding became true
    std::chrono::steady_clock::time_point ends_at;    // the lifetime's end: close 4002
    std::size_t shard = 0;                            // the shard (event loop) that owns the connection
    std::size_t open_index = 0;                       // its place in the shard's list of open connections
    bool open = false;
    bool policy_opened = false;       // on_close only for connections the policy saw open
    bool ping_outstanding = false;    // waiting for the pong; pong_timeout runs from ping_sent
    detail::ledger_ticket admission;  // its place under max_connections(_per_address)
};

template <class Identity> struct session_slot {
    session_state<Identity> imbus_state;  // a name websocketpp's own members cannot hide
};

// The websocketpp configurations of a transport; TLS's exist only with IMBUS_WITH_TLS.
template <class T> struct always_false : std::false_type {};
template <class Transport> struct websocketpp_configs {
    static_assert(
        always_false<Transport>::value,
        "imbus: tls_transport needs IMBUS_WITH_TLS defined before including imbus.hpp (CMake: link imbus::tls)");
};
template <> struct websocketpp_configs<plain_transport> {
    using server = websocketpp::config::asio;
    using client = websocketpp::config::asio_client;
};
#ifdef IMBUS_WITH_TLS
template <> struct websocketpp_configs<tls_transport> {
    using server = websocketpp::config::asio_tls;
    using client = websocketpp::config::asio_tls_client;
};
#endif

// --- The outbound path ----------------------------------------------------------------------
// Every byte a server sends on a connection leaves through one queue of imbus's own
// (outbound_connection), so that one number bounds what a client can make the server hold and
// everything queued for a socket leaves in one gather write. websocketpp keeps the handshake,
// reading and validating frames, and the close handshake. Only one write is ever in flight on
// a socket, because websocketpp's own writes (the handshake answer, close frames) join the same
// queue: its transport calls land in outbound_connection::async_write. imbus sends the data
// frames, pings and pongs itself (websocketpp's automatic pong is off, its ping() unused), and
// once websocketpp writes a close frame, the data frames still waiting are dropped.

// A buffer sequence over a vector that does not change while its write is in flight, so that
// asio does not copy the vector for each write.
struct buffer_span {
    using value_type = asio::const_buffer;
    using const_iterator = const asio::const_buffer*;
    const asio::const_buffer* first;
    const asio::const_buffer* last;
    const_iterator begin() const noexcept { return first; }
    const_iterator end() const noexcept { return last; }
};

// websocketpp's asio transport connection with imbus's outbound queue in place of its writes.
template <class TransportConfig> class outbound_connection
    : public websocketpp::transport::asio::connection<TransportConfig> {
    using base = websocketpp::transport::asio::connection<TransportConfig>;

public:
    using base::base;

    // websocketpp's writes: the handshake answer first, and after open only close frames.
    void async_write(const char* data, std::size_t size, websocketpp::transport::write_handler done) {
        library_write({asio::const_buffer(data, size)}, std::move(done));
    }
    void async_write(const std::vector<websocketpp::transport::buffer>& buffers,
                     websocketpp::transport::write_handler done) {
        std::vector<asio::const_buffer> copy;
        copy.reserve(buffers.size());
        for (const auto& b : buffers) copy.emplace_back(b.buf, b.len);
        library_write(std::move(copy), std::move(done));
    }
    // A write stuck on a peer that stopped reading would hold the shutdown back forever (and a
    // TLS shutdown writes): the TCP stream ends under it first, websocketpp's shutdown follows.
    void async_shutdown(websocketpp::transport::shutdown_handler done) {
        drop_frames();
        if (draining_) {  // the drain's end shuts down
            shutdown_ = std::move(done);
            return;
        }
        if (close_sent_ && !reading_ && !in_read_handler_ && !writing_ && !failed_ && !this->is_secure()) {
            shutdown_ = std::move(done);
            return drain_after_close();
        }
        if (!writing_) return base::async_shutdown(std::move(done));
        asio::error_code ignored;
        this->get_raw_socket().shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
        shutdown_ = std::move(done);
    }

    // websocketpp stops reading after the close it sends for a protocol error (and waits for
    // the close handshake timeout); whether a read of its is pending tells that close apart.
    void async_read_at_least(std::size_t num_bytes, char* buf, std::size_t len,
                             websocketpp::transport::read_handler handler) {
        reading_ = true;
        base::async_read_at_least(
            num_bytes, buf, len, [this, handler = std::move(handler)](const std::error_code& ec, std::size_t n) {
                reading_ = false;
                in_read_handler_ = true;  // a shutdown from in here ends a close handshake the peer finished
                handler(ec, n);
                in_read_handler_ = false;
            });
    }

    /// How long a drain after a protocol-error close may last (server_options::close_drain_linger).
    void set_drain_linger(std::chrono::milliseconds linger) noexcept { drain_linger_ = linger; }
    /// Counts this connection's bytes in its shard's total as well.
    void set_outbound_meter(outbound_meter* meter) noexcept { meter_ = meter; }
    using drained_hook = void (*)(void* context, outbound_connection& con);
    /// Who hears, once asked with notify_when_drained(), that everything has been written.
    void set_drained_hook(drained_hook hook, void* context) noexcept { drained_ = hook, drained_context_ = context; }
    /// Calls the drained hook once, on this connection's thread, when nothing is left to write.
    void notify_when_drained() noexcept { notify_drained_ = true; }
    /// The handshake is done: from now on a write of websocketpp's is a close frame.
    void open_outbound() noexcept { open_ = true; }
    /// No more frames: a close is about to be handed to websocketpp.
    void close_outbound() noexcept {
        closing_ = true;
        drop_frames();
    }
    /// Queues a frame; false once the connection is closing. flush_outbound() sends it.
    bool queue_frame(shared_wire_frame frame) {
        if (!open_ || closing_ || failed_) return false;
        count(frame->size(), true);
        queue_.push_back({std::move(frame), {}, {}});
        return true;
    }
    /// Answers the newest ping only: a pong not yet written takes the new payload instead of
    /// queueing another (RFC 6455 §5.5.3), so pings cannot pile pongs up. True: replaced.
    bool queue_pong(std::string_view payload) {
        if (!open_ || closing_ || failed_) return false;
        auto pong = control_frame(0xA, payload);
        if (pong_at_ < queue_.size()) {
            count(queue_[pong_at_].frame->size(), false);
            count(pong->size(), true);
            queue_[pong_at_].frame = std::move(pong);
            return true;
        }
        pong_at_ = queue_.size();
        queue_frame(std::move(pong));
        return false;
    }
    /// Starts one gather write of everything queued, unless a write is in flight (its
    /// completion writes what queued meanwhile).
    void flush_outbound() {
        if (writing_ || queue_.empty() || failed_) return;
        writing_ = true;
        pong_at_ = npos;
        std::swap(in_flight_, queue_);
        gather_.clear();
        for (const auto& item : in_flight_) {
            if (item.frame) gather_.emplace_back(item.frame->data(), item.frame->size());
            else gather_.insert(gather_.end(), item.library.begin(), item.library.end());
        }
        asio::async_write(this->get_socket(), buffer_span{gather_.data(), gather_.data() + gather_.size()},
                          write_done{std::static_pointer_cast<outbound_connection>(this->shared_from_this())});
    }
    /// The close code this side sent when it is not the one websocketpp reports; 0 otherwise.
    std::uint16_t close_code_sent() const noexcept { return close_code_sent_; }

    /// Bytes queued and in flight on this connection (readable from any thread).
    std::size_t outbound_bytes() const noexcept { return bytes_.load(std::memory_order_relaxed); }

private:
    struct outgoing {
        shared_wire_frame frame;                     // imbus's frame, or else
        std::vector<asio::const_buffer> library;     // websocketpp's (it keeps them alive)
        websocketpp::transport::write_handler done;  // and its completion
        std::size_t size() const noexcept { return frame ? frame->size() : asio::buffer_size(library); }
    };
    static constexpr std::size_t npos = std::size_t(-1);

    // The write's completion. websocketpp's handlers waiting here hold the connection, so one
    // destroyed unrun (its event loop went away mid-write) lets go of them: no cycle is left.
    struct write_done {
        std::shared_ptr<outbound_connection> self;
        explicit write_done(std::shared_ptr<outbound_connection> s) : self(std::move(s)) {}
        write_done(write_done&&) noexcept = default;
        write_done(const write_done&) = delete;
        ~write_done() {
            if (self) self->abandon();
        }
        void operator()(const asio::error_code& ec, std::size_t) { std::exchange(self, nullptr)->written(ec); }
    };

    // No loop will run the write's completion: drop everything without counting (the shard's
    // meter goes first), keeping the connection alive until this returns.
    void abandon() noexcept {
        writing_ = false;
        failed_ = true;
        auto in_flight = std::move(in_flight_);
        auto queue = std::move(queue_);
        auto shutdown = std::move(shutdown_);
        shutdown_ = nullptr;
    }

    void count(std::size_t n, bool add) noexcept {
        if (add) bytes_.store(bytes_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
        else bytes_.store(bytes_.load(std::memory_order_relaxed) - n, std::memory_order_relaxed);
        if (meter_)
            add ? meter_->bytes.fetch_add(n, std::memory_order_relaxed)
                : meter_->bytes.fetch_sub(n, std::memory_order_relaxed);
    }

    void library_write(std::vector<asio::const_buffer> buffers, websocketpp::transport::write_handler done) {
        if (open_) {  // a close frame: nothing of ours goes after it
            close_outbound();
            close_sent_ = true;
            if (answers_bad_close_reason(buffers)) {
                static const std::string reason = "\x03\xefinvalid UTF-8 in the close reason";  // 1007
                static const std::string header{char(0x88), char(reason.size())};
                buffers = {asio::const_buffer(header.data(), header.size()),
                           asio::const_buffer(reason.data(), reason.size())};
                close_code_sent_ = 1007;
            }
        }
        if (failed_) {
            asio::post(this->get_raw_socket().get_executor(), [done = std::move(done)] {
                done(websocketpp::transport::error::make_error_code(websocketpp::transport::error::pass_through));
            });
            return;
        }
        outgoing item{nullptr, std::move(buffers), std::move(done)};
        count(item.size(), true);
        queue_.push_back(std::move(item));
        flush_outbound();
    }

    // websocketpp answers a close frame whose reason is not UTF-8 with 1002 and this reason;
    // RFC 6455 (§7.4.1, §8.1) asks for 1007, which the frame becomes instead.
    static bool answers_bad_close_reason(const std::vector<asio::const_buffer>& buffers) {
        static const std::string websocketpp_answer = "\x03\xeaInvalid close reason";  // 1002
        if (buffers.size() != 2 || buffers[1].size() != websocketpp_answer.size()) return false;
        return std::memcmp(buffers[1].data(), websocketpp_answer.data(), websocketpp_answer.size()) == 0;
    }

    // Imbus's frames not yet in flight go; websocketpp's writes stay (it waits for them).
    void drop_frames() {
        pong_at_ = npos;
        std::size_t kept = 0;
        for (std::size_t i = 0; i < queue_.size(); ++i) {
            if (queue_[i].frame) count(queue_[i].frame->size(), false);
            else if (kept++ != i) queue_[kept - 1] = std::move(queue_[i]);
        }
        queue_.resize(kept);
    }

    void written(const asio::error_code& ec) {
        writing_ = false;
        std::vector<websocketpp::transport::write_handler> done;  // websocketpp's, called last
        for (auto& item : in_flight_) {
            count(item.size(), false);
            if (item.done) done.push_back(std::move(item.done));
        }
        in_flight_.clear();
        if (ec) {
            failed_ = true;
            drop_frames();
            for (auto& item : queue_) {
                count(item.size(), false);
                done.push_back(std::move(item.done));
            }
            queue_.clear();
        }
        const auto result =
            ec ? websocketpp::transport::error::make_error_code(websocketpp::transport::error::pass_through)
               : std::error_code();
        if (shutdown_) {
            auto finish = std::move(shutdown_);
            shutdown_ = nullptr;
            for (auto& d : done) d(result);
            return base::async_shutdown(std::move(finish));
        }
        for (auto& d : done) d(result);
        flush_outbound();
        if (notify_drained_ && !writing_ && queue_.empty() && !failed_ && drained_) {
            notify_drained_ = false;
            drained_(drained_context_, *this);
        }
    }

    // websocketpp ends the connection right after the close it sends for a protocol error, and
    // reads no more: a peer still sending would get a reset instead of that close frame, so its
    // input is drained first (TLS aside: its shutdown writes, and draining under it would cut
    // the close_notify).
    void drain_after_close() {
        draining_ = true;
        auto self = std::static_pointer_cast<outbound_connection>(this->shared_from_this());
        drain_input(self, this->get_raw_socket(), drain_linger_, [self] {
            self->draining_ = false;
            auto finish = std::move(self->shutdown_);
            self->shutdown_ = nullptr;
            if (finish) self->base::async_shutdown(std::move(finish));
        });
    }

    std::vector<outgoing> queue_;      // waiting for the write in flight to finish
    std::vector<outgoing> in_flight_;  // the write in flight
    std::vector<asio::const_buffer> gather_;
    std::size_t pong_at_ = npos;  // where in queue_ the pong waits, if one does
    std::atomic<std::size_t> bytes_{0};
    outbound_meter* meter_ = nullptr;
    drained_hook drained_ = nullptr;
    void* drained_context_ = nullptr;
    websocketpp::transport::shutdown_handler shutdown_;
    bool writing_ = false, open_ = false, closing_ = false, failed_ = false, notify_drained_ = false;
    std::chrono::milliseconds drain_linger_{1000};
    std::uint16_t close_code_sent_ = 0;
    bool reading_ = false, in_read_handler_ = false, close_sent_ = false, draining_ = false;
};

// websocketpp's asio transport, making outbound_connections.
template <class TransportConfig> class outbound_endpoint
    : public websocketpp::transport::asio::endpoint<TransportConfig> {
public:
    using transport_con_type = outbound_connection<TransportConfig>;
    using transport_con_ptr = std::shared_ptr<transport_con_type>;
};

inline namespace IMBUS_ABI_NAMESPACE {
template <class Identity, class Transport> struct server_config : websocketpp_configs<Transport>::server {
    using connection_base = session_slot<Identity>;
    using request_type = ws_request;
    // A connection lives on one shard's thread for its whole life: no strand per connection.
    struct transport_config : websocketpp_configs<Transport>::server::transport_config {
        static const bool enable_multithreading = false;
    };
    using transport_type = outbound_endpoint<transport_config>;
    // The read buffer is part of every connection: sized for small client requests.
    static const std::size_t connection_read_buffer_size = IMBUS_READ_BUFFER_BYTES;
    // imbus logs what matters itself; websocketpp's access log would cost a line per frame.
    static const websocketpp::log::level alog_level = websocketpp::log::alevel::none;
    static const websocketpp::log::level elog_level = websocketpp::log::elevel::none;
};
}  // namespace IMBUS_ABI_NAMESPACE

#ifdef IMBUS_WITH_TLS
inline std::shared_ptr<asio::ssl::context> tls_context(asio::ssl::context::method method) {
    auto context = std::make_shared<asio::ssl::context>(method);
    context->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                         asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 | asio::ssl::context::no_tlsv1_1 |
                         asio::ssl::context::single_dh_use);
    return context;
}

// One context for every connection: the certificate is read once, at construction (throws).
template <class Endpoint> void use_server_tls(Endpoint& endpoint, const server_options& options) {
    auto context = tls_context(asio::ssl::context::tls_server);
    context->use_certificate_chain_file(options.tls_certificate_chain_file);
    context->use_private_key_file(options.tls_private_key_file, asio::ssl::context::pem);
    endpoint.set_tls_init_handler([context](websocketpp::connection_hdl) { return context; });
}

// The server's certificate must chain to a trusted authority and name the host of the URL.
template <class Endpoint> void use_client_tls(Endpoint& endpoint, const client_options& options) {
    auto context = tls_context(asio::ssl::context::tls_client);
    if (options.tls_verify) {
        context->set_verify_mode(asio::ssl::verify_peer);
        if (options.tls_ca_file.empty()) context->set_default_verify_paths();
        else context->load_verify_file(options.tls_ca_file);
    } else {
        context->set_verify_mode(asio::ssl::verify_none);
    }
    endpoint.set_tls_init_handler([context](websocketpp::connection_hdl) { return context; });
}

template <class Connection> void check_server_name(Connection& con, const client_options& options) {
    if (options.tls_verify) con.get_socket().set_verify_callback(asio::ssl::host_name_verification(con.get_host()));
}
#endif

// "self" admits a page served by this very server (its Origin names the Host it asked), which
// is what a server listening on port 0 cannot spell out in advance.
inline bool origin_allowed(const std::vector<std::string>& allowed, const http_request& request) {
    if (allowed.empty()) return true;
    const std::string origin = request.header("Origin");
    for (const auto& a : allowed) {
        if (a == origin && !origin.empty()) return true;
        if (a == "self" && !origin.empty()) {
            const auto scheme_end = origin.find("://");
            if (scheme_end != std::string::npos && iequals(origin.substr(scheme_end + 3), request.header("Host")))
                return true;
        }
    }
    return false;
}

// Which optional members a policy has (by signature, so the defaults apply otherwise).
template <class P, class = void> struct policy_has_identity : std::false_type {};
template <class P> struct policy_has_identity<P, std::void_t<typename P::identity>> : std::true_type {};

template <class P, class = void> struct policy_can_authenticate : std::false_type {};
template <class P> struct policy_can_authenticate<
    P, std::void_t<decltype(std::declval<P&>().authenticate(std::declval<const http_request&>()))>>
    : std::is_same<decltype(std::declval<P&>().authenticate(std::declval<const http_request&>())),
                   admission<typename P::identity>> {};

// The first thing basic_server asks of its policy, so a policy of the wrong shape stops the
// build here, with these messages, before anything else fails on it.
struct stand_in_policy {
    struct identity {};
};
template <class P> struct lazy_can_authenticate : policy_can_authenticate<P> {};
template <class Policy> struct checked_identity {
    static_assert(policy_has_identity<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy must declare `using identity = ...;`, "
                  "the type that says who a connection belongs to (see imbus::public_policy)");
    using type = typename std::conditional_t<policy_has_identity<Policy>::value, Policy, stand_in_policy>::identity;
    static_assert(std::disjunction<std::negation<policy_has_identity<Policy>>, lazy_can_authenticate<Policy>>::value,
                  "imbus::basic_server<AuthPolicy>: the policy must have "
                  "`imbus::admission<identity> authenticate(const imbus::http_request&)` "
                  "(see imbus::public_policy)");
    static_assert(std::is_copy_constructible<type>::value,
                  "imbus::basic_server<AuthPolicy>: AuthPolicy::identity must be copyable");
};

template <class P, class = void> struct policy_has_channels : std::false_type {};
template <class P>
struct policy_has_channels<P, std::void_t<decltype(std::declval<P&>().channels(
                                  std::declval<const typename P::identity&>(), std::declval<std::vector<channel>>()))>>
    : std::is_convertible<decltype(std::declval<P&>().channels(std::declval<const typename P::identity&>(),
                                                               std::declval<std::vector<channel>>())),
                          std::vector<channel>> {};

template <class P, class = void> struct policy_has_still_valid : std::false_type {};
template <class P> struct policy_has_still_valid<
    P, std::void_t<decltype(bool(std::declval<P&>().still_valid(std::declval<const typename P::identity&>())))>>
    : std::true_type {};

template <class P, class = void> struct policy_has_on_event : std::false_type {};
template <class P> struct policy_has_on_event<P, std::void_t<decltype(std::declval<P&>().on_event(
                                                     std::declval<const typename P::identity&>(),
                                                     std::declval<const std::string&>(), std::declval<const json&>()))>>
    : std::true_type {};

template <class P, class = void> struct policy_has_on_open : std::false_type {};
template <class P> struct policy_has_on_open<
    P, std::void_t<decltype(std::declval<P&>().on_open(std::declval<const typename P::identity&>()))>>
    : std::true_type {};

template <class P, class = void> struct policy_has_on_subscribe : std::false_type {};
template <class P> struct policy_has_on_subscribe<
    P, std::void_t<decltype(std::declval<P&>().on_subscribe(std::declval<const typename P::identity&>(),
                                                            std::declval<const std::vector<channel>&>()))>>
    : std::is_convertible<decltype(std::declval<P&>().on_subscribe(std::declval<const typename P::identity&>(),
                                                                   std::declval<const std::vector<channel>&>())),
                          std::vector<direct_message>> {};

template <class P, class = void> struct policy_has_on_close : std::false_type {};
template <class P> struct policy_has_on_close<
    P, std::void_t<decltype(std::declval<P&>().on_close(std::declval<const typename P::identity&>()))>>
    : std::true_type {};

// Whether a policy declares a member of a hook's name at all, whatever its signature: the
// name lookup is ambiguous between the policy's member and the probe's. A hook whose signature
// misses is then a compile error, not silently skipped (a `channels` taking strings would be
// ignored and every channel the client asks for granted). Final classes are not probed.
struct hook_names {
    int channels, still_valid, on_event, on_open, on_close, on_subscribe;
};
template <class P> struct hook_probe : P, hook_names {};
template <class P> using probe_of =
    std::conditional_t<std::is_class<P>::value && !std::is_final<P>::value, hook_probe<P>, hook_names>;
template <class P, class = void> struct declares_channels : std::true_type {};
template <class P> struct declares_channels<P, std::void_t<decltype(&probe_of<P>::channels)>> : std::false_type {};
template <class P, class = void> struct declares_still_valid : std::true_type {};
template <class P> struct declares_still_valid<P, std::void_t<decltype(&probe_of<P>::still_valid)>> : std::false_type {
};
template <class P, class = void> struct declares_on_event : std::true_type {};
template <class P> struct declares_on_event<P, std::void_t<decltype(&probe_of<P>::on_event)>> : std::false_type {};
template <class P, class = void> struct declares_on_open : std::true_type {};
template <class P> struct declares_on_open<P, std::void_t<decltype(&probe_of<P>::on_open)>> : std::false_type {};
template <class P, class = void> struct declares_on_close : std::true_type {};
template <class P> struct declares_on_close<P, std::void_t<decltype(&probe_of<P>::on_close)>> : std::false_type {};
template <class P, class = void> struct declares_on_subscribe : std::true_type {};
template <class P> struct declares_on_subscribe<P, std::void_t<decltype(&probe_of<P>::on_subscribe)>>
    : std::false_type {};

template <class Policy> struct checked_hooks {
    static_assert(!declares_channels<Policy>::value || policy_has_channels<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy has a member named `channels` that is not "
                  "`std::vector<imbus::channel> channels(const identity&, std::vector<imbus::channel> requested)`; "
                  "as written it would be ignored and every channel the client asks for granted");
    static_assert(!declares_still_valid<Policy>::value || policy_has_still_valid<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy has a member named `still_valid` that is not "
                  "`bool still_valid(const identity&)`; as written it would be ignored and sessions never expire");
    static_assert(!declares_on_event<Policy>::value || policy_has_on_event<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy has a member named `on_event` that is not "
                  "`void on_event(const identity&, const std::string& name, const imbus::json& data)`; "
                  "as written it would be ignored and client events dropped");
    static_assert(!declares_on_open<Policy>::value || policy_has_on_open<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy has a member named `on_open` that is not "
                  "`void on_open(const identity&)`; as written it would be ignored");
    static_assert(!declares_on_close<Policy>::value || policy_has_on_close<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy has a member named `on_close` that is not "
                  "`void on_close(const identity&)`; as written it would be ignored");
    static_assert(!declares_on_subscribe<Policy>::value || policy_has_on_subscribe<Policy>::value,
                  "imbus::basic_server<AuthPolicy>: the policy has a member named `on_subscribe` that is not "
                  "`std::vector<imbus::direct_message> on_subscribe(const identity&, const "
                  "std::vector<imbus::channel>& granted)`; "
                  "as written it would be ignored");
    static constexpr bool value = true;
};

// The request as a policy sees it, copied out of websocketpp's connection.
template <class Connection> http_request make_http_request(Connection& con) {
    http_request r;
    const auto& raw = con.get_request();
    r.method = raw.get_method();
    const std::string& target = raw.get_uri();
    const auto q = target.find('?');
    r.path = target.substr(0, q);
    if (q != std::string::npos) r.query = target.substr(q + 1);
    r.body = raw.get_body();
    r.remote = con.get_remote_endpoint();
    for (const auto& h : raw.get_headers()) r.headers.emplace_back(h.first, h.second);
    return r;
}

// Odoo's HTTP routes speak JSON-RPC; plain JSON is accepted as well.
inline json rpc_params(const json& body) {
    if (body.is_object() && body.contains("jsonrpc") && body.contains("params")) return body.at("params");
    return body;
}

inline std::string rpc_result(const json& body, std::string result) {
    if (!(body.is_object() && body.contains("jsonrpc"))) return result;
    return "{\"jsonrpc\":\"2.0\",\"id\":" + body.value("id", json()).dump() + ",\"result\":" + result + "}";
}

}  // namespace detail

template <class AuthPolicy, class Transport>
basic_server<AuthPolicy, Transport>::basic_server(imbus::bus& b, AuthPolicy policy, server_options options)
    : bus_(b), dispatcher_(b.get_dispatcher()), policy_(std::move(policy)), options_(std::move(options)),
      metrics_(std::max<std::size_t>(options_.threads, 1)) {
    if (options_.threads == 0) options_.threads = 1;
    if (options_.rate_burst == 0) options_.rate_burst = 1;
    for (std::size_t i = 0; i < options_.threads; ++i) init_shard(i);
    gc_timer_.emplace(shards_.front()->io);
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::init_shard(std::size_t index) {
    shards_.push_back(std::make_unique<shard>());
    shard& home = *shards_.back();
    home.index = index;
    home.lane = std::make_unique<dispatcher::lane>(
        [this, &home] { detail::post_after_io(home.io, [this, &home] { run_wakeup_slice(home); }); });
    auto& endpoint = home.endpoint;
    endpoint.init_asio(&home.io);
    if constexpr (!std::is_same_v<Transport, plain_transport>) detail::use_server_tls(endpoint, options_);
    endpoint.set_reuse_addr(true);
    endpoint.set_user_agent("");  // no Server header (nothing to learn about us), nothing kept
    endpoint.set_max_message_size(options_.max_message_bytes);
    endpoint.set_max_http_body_size(options_.max_http_body_bytes);
    endpoint.set_open_handshake_timeout(long(options_.open_handshake_timeout.count()));
    endpoint.set_close_handshake_timeout(long(options_.close_handshake_timeout.count()));
    // Frames are small and latency matters: no Nagle delay behind an unacknowledged segment.
    // (After the accept: websocketpp's socket_init handler sees the socket before it is open.)
    // (Two pointers: the handler fits in std::function's own storage, as websocketpp copies it
    // into every connection.)
    endpoint.set_tcp_post_init_handler([this, &home](websocketpp::connection_hdl h) {
        auto con = connection_of(h);
        if (!con) return;
        asio::error_code ignored;
        con->get_raw_socket().set_option(asio::ip::tcp::no_delay(true), ignored);
        if (options_.send_buffer_bytes)
            con->get_raw_socket().set_option(asio::socket_base::send_buffer_size(int(options_.send_buffer_bytes)),
                                             ignored);
        con->imbus_state.shard = home.index;
        con->set_outbound_meter(&home.outbound);
        con->set_drain_linger(options_.close_drain_linger);
        con->set_drained_hook(
            [](void* server, auto& drained) {
                static_cast<basic_server*>(server)->resume(
                    std::static_pointer_cast<typename endpoint_type::connection_type>(drained.shared_from_this()));
            },
            this);
    });
    endpoint.set_validate_handler([this](websocketpp::connection_hdl h) { return on_validate(h); });
    endpoint.set_open_handler([this](websocketpp::connection_hdl h) { on_open(h); });
    endpoint.set_close_handler([this](websocketpp::connection_hdl h) { on_close(h); });
    endpoint.set_fail_handler([this](websocketpp::connection_hdl h) { on_close(h); });
    endpoint.set_http_handler([this](websocketpp::connection_hdl h) { on_http_request(h); });
    endpoint.set_message_handler([this](websocketpp::connection_hdl h, message_ptr m) { on_message(h, m); });
    // Pings and pongs count against the rate limit like any frame; imbus answers pings itself,
    // with at most one pong waiting.
    endpoint.set_ping_handler([this](websocketpp::connection_hdl h, std::string payload) {
        auto con = connection_of(h);
        metrics_.pings_received.fetch_add(1, std::memory_order_relaxed);
        if (!con || !con->imbus_state.open || !within_rate(con)) return false;
        if (con->queue_pong(payload)) metrics_.pongs_replaced.fetch_add(1, std::memory_order_relaxed);
        con->flush_outbound();
        return false;  // websocketpp's own pong stays unsent
    });
    endpoint.set_pong_handler([this](websocketpp::connection_hdl h, std::string) {
        auto con = connection_of(h);
        if (!con || !con->imbus_state.open || !within_rate(con)) return;
        con->imbus_state.ping_outstanding = false;
    });
}

template <class AuthPolicy, class Transport> basic_server<AuthPolicy, Transport>::~basic_server() {
    stop();
    wait();
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::listen(const std::string& address, std::uint16_t port, std::error_code& ec) {
    ec.clear();
    asio::error_code aec;
    const auto ip = asio::ip::make_address(address, aec);
    if (aec) {
        ec = aec;
        return;
    }
    for (std::size_t i = 0; i < shards_.size(); ++i) {
        auto& home = *shards_[i];
        auto& endpoint = home.endpoint;
#ifndef SO_REUSEPORT
        if (shards_.size() > 1) {
            ec = std::make_error_code(std::errc::operation_not_supported);  // threads > 1 needs SO_REUSEPORT
            return;
        }
#endif
        endpoint.set_tcp_pre_bind_handler([&home, reuse_port = shards_.size() >
                                                               1](std::shared_ptr<asio::ip::tcp::acceptor> acceptor) {
            home.acceptor = acceptor;
            asio::error_code option_ec;
#ifdef SO_REUSEPORT
            // Every shard listens on the same port; the kernel spreads new connections.
            if (reuse_port)
                acceptor->set_option(asio::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>(true), option_ec);
#endif
            return std::error_code(option_ec);
        });
        endpoint.listen(asio::ip::tcp::endpoint(ip, i == 0 ? port : port_), ec);
        if (ec) return;
        if (i == 0) {
            const auto local = endpoint.get_local_endpoint(aec);
            if (aec) {
                ec = aec;
                return;
            }
            port_ = local.port();
        }
        home.acceptor->non_blocking(true, aec);
        if (aec) {
            ec = aec;
            return;
        }
        accept_when_ready(home);
        schedule_sweep(home);
    }
    schedule_gc();
}

// Each time the listening socket is ready, every connection waiting is accepted (up to
// accept_batch), not one per turn of the loop as websocketpp's own accept loop does: a client
// arriving behind a burst of connections then waits one turn, not one per connection ahead.
// Out of file descriptors, accepting pauses instead of spinning on the error.
template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::accept_when_ready(shard& home) {
    home.acceptor->async_wait(asio::socket_base::wait_read, [this, &home](const asio::error_code& ec) {
        if (ec) return;  // the acceptor was closed
        for (std::size_t i = 0; i < detail::accept_batch; ++i) {
            if (!home.spare) home.spare = home.endpoint.get_connection();
            asio::error_code aec;
            home.acceptor->accept(home.spare->get_raw_socket(), aec);
            if (aec == asio::error::would_block || aec == asio::error::try_again) break;
            if (aec == asio::error::no_descriptors || aec == asio::error::no_buffer_space ||
                aec == asio::error::no_memory || aec.value() == ENFILE) {
                metrics_.accept_pauses.fetch_add(1, std::memory_order_relaxed);
                if (options_.log)
                    options_.log(log_level::error, "server: accept failed (" + aec.message() + "); pausing");
                if (!home.accept_pause) home.accept_pause = std::make_unique<asio::steady_timer>(home.io);
                home.accept_pause->expires_after(detail::accept_pause_time);
                home.accept_pause->async_wait([this, &home](const asio::error_code& timer_ec) {
                    if (!timer_ec) accept_when_ready(home);
                });
                return;
            }
            if (aec) continue;  // the peer gave up before we took it (ECONNABORTED): the next one
            std::string why;
            if (!admit(home.spare, why)) {
                refuse_at_accept(std::exchange(home.spare, nullptr), why);
                continue;
            }
            std::exchange(home.spare, nullptr)->start();
        }
        accept_when_ready(home);
    });
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::listen(const std::string& address, std::uint16_t port) {
    std::error_code ec;
    listen(address, port, ec);
    if (ec) throw std::system_error(ec, "imbus server: cannot listen on " + address + ":" + std::to_string(port));
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::run(std::error_code& ec) {
    ec.clear();
    try {
        run();
    } catch (const std::system_error& e) {
        ec = e.code();
        stop();
        wait();
    }
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::run() {
    for (std::size_t i = 1; i < shards_.size(); ++i) threads_.emplace_back([io = &shards_[i]->io] { io->run(); });
    run_thread_ = std::this_thread::get_id();
    shards_.front()->io.run();
    run_thread_ = std::thread::id();
    wait();
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::start() {
    for (auto& sh : shards_) threads_.emplace_back([io = &sh->io] { io->run(); });
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::wait() {
    const auto me = std::this_thread::get_id();
    if (run_thread_.load() == me ||
        std::any_of(threads_.begin(), threads_.end(), [&](const std::thread& t) { return t.get_id() == me; }))
        throw std::logic_error("imbus: basic_server::wait() (or its destructor) called on one of its own I/O threads");
    for (auto& t : threads_)
        if (t.joinable()) t.join();
    threads_.clear();
    // Only now, with no I/O thread left, are the acceptors safe to close: websocketpp restarts
    // accepting from the thread that took the last connection.
    for (auto& sh : shards_) {
        std::error_code ec;
        if (stopping_ && sh->io.stopped() && sh->endpoint.is_listening()) sh->endpoint.stop_listening(ec);
    }
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::stop_shards() {
    for (auto& sh : shards_) sh->io.stop();
}

// New handshakes are refused (503) from here on; once the last connection has closed its
// handshake, the I/O threads return and wait() closes the acceptors.
template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::stop() noexcept {
    if (stopping_.exchange(true)) return;
    asio::post(shards_.front()->io, [this] {
        gc_timer_->cancel();
        std::vector<connection_ptr> open;
        {
            std::lock_guard<std::mutex> lock(connections_mutex_);
            for (auto& entry : connections_)
                if (auto con = entry.second.lock()) open.push_back(con);
            if (open.empty()) stop_shards();
        }
        for (auto& con : open) post_to(con, [this, con] { close(con, 1001, "server shutdown"); });
    });
}

// A connection is touched only on its own shard's thread.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::post_to(const connection_ptr& con, std::function<void()> task) {
    asio::post(shards_[con->imbus_state.shard]->io, std::move(task));
}

template <class AuthPolicy, class Transport> std::size_t basic_server<AuthPolicy, Transport>::connection_count() const {
    std::lock_guard<std::mutex> lock(connections_mutex_);
    return connections_.size();
}

template <class AuthPolicy, class Transport>
std::size_t basic_server<AuthPolicy, Transport>::tcp_connection_count() const {
    std::lock_guard<std::mutex> lock(ledger_->mutex);
    return ledger_->total;
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::revalidate() {
    std::vector<connection_ptr> open;
    {
        std::lock_guard<std::mutex> lock(connections_mutex_);
        for (auto& entry : connections_)
            if (auto con = entry.second.lock()) open.push_back(con);
    }
    for (auto& con : open) post_to(con, [this, con] { still_valid(con); });
}

template <class AuthPolicy, class Transport>
std::uint64_t basic_server<AuthPolicy, Transport>::outbound_bytes() const noexcept {
    std::uint64_t total = 0;
    for (const auto& sh : shards_) total += sh->outbound.bytes.load(std::memory_order_relaxed);
    return total;
}

template <class AuthPolicy, class Transport>
std::size_t basic_server<AuthPolicy, Transport>::largest_outbound_bytes() const {
    std::size_t largest = 0;
    std::lock_guard<std::mutex> lock(connections_mutex_);
    for (const auto& entry : connections_)
        if (auto con = entry.second.lock()) largest = std::max(largest, con->outbound_bytes());
    return largest;
}

template <class AuthPolicy, class Transport>
typename basic_server<AuthPolicy, Transport>::connection_ptr basic_server<AuthPolicy, Transport>::connection_of(
    websocketpp::connection_hdl h) {
    std::error_code ec;
    auto con = shards_.front()->endpoint.get_con_from_hdl(h, ec);  // any endpoint: a cast of the handle
    return ec ? nullptr : con;
}

template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::schedule_gc() {
    if (options_.gc_interval.count() <= 0) return;
    gc_timer_->expires_after(options_.gc_interval);
    gc_timer_->async_wait([this](const asio::error_code& ec) {
        if (ec || stopping_) return;
        try {
            bus_.store().collect_garbage();
        } catch (const std::exception& e) {
            if (options_.log)
                options_.log(log_level::error, std::string("server: garbage collection failed: ") + e.what());
        }
        schedule_gc();
    });
}

template <class AuthPolicy, class Transport>
bool basic_server<AuthPolicy, Transport>::on_validate(websocketpp::connection_hdl h) {
    auto con = connection_of(h);
    if (!con) return false;
    auto refuse = [&](int status, const std::string& why) {
        con->set_status(static_cast<websocketpp::http::status_code::value>(status));
        con->set_body(json({{"error", why}}).dump());
        con->replace_header("Content-Type", "application/json");
        con->replace_header("Connection", "close");
        if (options_.log)
            options_.log(log_level::info, "server: handshake from " + con->get_remote_endpoint() + " refused (" +
                                              std::to_string(status) + "): " + why);
        metrics_.count_refusal(status);
        return false;
    };
    if (stopping_) return refuse(503, "server shutting down");
    http_request request = detail::make_http_request(*con);
    if (request.path != options_.path) return refuse(404, "no WebSocket at " + request.path);
    if (con->get_request().real_header("Sec-WebSocket-Version") != "13") {
        con->replace_header("Sec-WebSocket-Version", "13");
        return refuse(426, "WebSocket version 13 required");
    }
    std::optional<identity> who;
    if (auto refusal = handshake_refusal(request, who)) return refuse(refusal->first, refusal->second);
    con->imbus_state.identity.emplace(std::move(*who));
    return true;
}

// What the handshake of `request` gets from the origin check and the policy: a refusal, or
// none and the peer's identity. The handshake and its probe (GET without upgrade) share it.
template <class AuthPolicy, class Transport>
std::optional<std::pair<int, std::string>> basic_server<AuthPolicy, Transport>::handshake_refusal(
    const http_request& request, std::optional<identity>& who, bool check_origin) {
    if (check_origin && !detail::origin_allowed(options_.allowed_origins, request))
        return std::make_pair(403, "origin not allowed: " + request.header("Origin"));
    try {
        auto verdict = policy_.authenticate(request);
        if (!verdict.accepted()) return std::make_pair(verdict.status() ? verdict.status() : 403, verdict.reason());
        who.emplace(std::move(verdict.identity()));
    } catch (...) {
        return std::make_pair(500, "auth policy failed: " + detail::current_error());
    }
    return std::nullopt;
}

// The counters, plus the gauges read at scrape time.
template <class AuthPolicy, class Transport> std::string basic_server<AuthPolicy, Transport>::metrics_text() {
    std::string out = metrics_.prometheus_text();
    auto gauge = [&](const char* name, const char* help, std::int64_t value) {
        out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " " +
               std::to_string(value) + "\n";
    };
    gauge("imbus_connections_open", "Open WebSocket connections.", std::int64_t(connection_count()));
    gauge("imbus_tcp_connections",
          "Open TCP connections (WebSocket, HTTP, or no request yet): what max_connections bounds.",
          std::int64_t(tcp_connection_count()));
    gauge("imbus_connections_subscribed", "Open connections that subscribed.", metrics_.subscribed.load());
    gauge("imbus_channels", "Channels with at least one local subscriber.", std::int64_t(dispatcher_.channel_count()));
    // /metrics is how an outage is watched: a store that cannot answer must not fail the scrape.
    std::optional<std::int64_t> newest;
    try {
        newest = bus_.store().newest_id();
    } catch (...) {
        if (options_.log)
            options_.log(log_level::warning, "server: /metrics could not read the store: " + detail::current_error());
    }
    gauge("imbus_store_up", "1 when the store answered this scrape's read of its newest id, 0 when that read failed.",
          newest ? 1 : 0);
    if (newest)
        gauge("imbus_store_newest_id", "The newest notification id in the store (ids count the notifications stored).",
              *newest);
    gauge("imbus_outbound_bytes", "Bytes queued and in flight to all clients together.",
          std::int64_t(outbound_bytes()));
    gauge("imbus_outbound_bytes_largest", "The most bytes one client has queued and in flight now.",
          std::int64_t(largest_outbound_bytes()));
    gauge("imbus_outbound_bytes_peak", "The most bytes one client has had queued and in flight since the start.",
          std::int64_t(metrics_.outbound_peak.load()));
    gauge("imbus_outbound_bytes_limit",
          "max_outbound_bytes: one client's queue beyond which it is caught up from the store.",
          std::int64_t(options_.max_outbound_bytes));
    gauge("imbus_outbound_total_limit", "max_outbound_total: all queues together beyond which the largest wait.",
          std::int64_t(options_.max_outbound_total));

    return out;
}

// Takes a place under max_connections and max_connections_per_address, at accept, before any
// byte of HTTP is read: a host holding bare TCP connections is bounded too. The place goes
// back when the connection closes, or at the latest with the connection object.
template <class AuthPolicy, class Transport>
bool basic_server<AuthPolicy, Transport>::admit(const connection_ptr& con, std::string& why) {
    std::error_code ec;
    const auto peer = con->get_raw_socket().remote_endpoint(ec);
    auto place = detail::ledger_ticket::take(ledger_, ec ? std::string("?") : peer.address().to_string(),
                                             options_.max_connections, options_.max_connections_per_address, why);
    if (!place) return false;
    con->imbus_state.admission = std::move(place);
    return true;
}

// A connection over the limits gets a 503 at once, its write side shut, and its input read
// and dropped for a short while, so that its client reads the answer instead of a reset. (On
// a wss:// port the answer is plain HTTP: a TLS client sees a failed handshake instead.)
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::refuse_at_accept(connection_ptr con, const std::string& why) {
    metrics_.count_refusal(503);
    if (options_.log) options_.log(log_level::warning, "server: connection refused (503): " + why);
    const std::string body = json({{"error", why}}).dump();
    const std::string answer =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: " +
        std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    auto& socket = con->get_raw_socket();
    asio::error_code ignored;
    socket.non_blocking(true, ignored);
    (void)::send(socket.native_handle(), answer.data(), answer.size(), MSG_NOSIGNAL);  // a fresh socket takes it whole
    // Never started, the connection only holds the socket, closed when the client is done.
    detail::drain_input(con, socket, detail::refusal_linger, [&socket] {
        asio::error_code ec;
        socket.close(ec);
    });
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::on_open(websocketpp::connection_hdl h) {
    auto con = connection_of(h);
    if (!con) return;
    auto& s = con->imbus_state;
    s.open = true;
    s.last_frame = std::chrono::steady_clock::now();
    con->open_outbound();
    {
        std::lock_guard<std::mutex> lock(connections_mutex_);
        connections_.emplace(con.get(), con);
    }

    metrics_.connections_opened.fetch_add(1, std::memory_order_relaxed);
    if (stopping_) return close(con, 1001, "server shutdown");
    const auto& request = con->get_request();
    if (!request.real_header("User-Agent").empty()) {  // browsers send one; Odoo checks only them
        const std::string& target = request.get_uri();
        const auto q = target.find('?');
        const std::string_view query =
            q == std::string::npos ? std::string_view() : std::string_view(target).substr(q + 1);
        if (detail::query_param(query, "version") != options_.version) return close(con, 1000, "OUTDATED_VERSION");
    }
    if constexpr (detail::policy_has_on_open<AuthPolicy>::value) {
        try {
            policy_.on_open(*s.identity);
        } catch (...) {
            if (options_.log) options_.log(log_level::error, "server: on_open hook failed: " + detail::current_error());
            return close(con, 1011, "server error");
        }
    }
    s.policy_opened = true;
    // The lifetime is spread so that clients connected together do not reconnect together.
    thread_local std::mt19937_64 random(std::random_device{}());
    const auto jitter_ms = options_.lifetime_jitter.count() > 0
                               ? std::uniform_int_distribution<long long>(0, options_.lifetime_jitter.count())(random)
                               : 0;
    s.ends_at = s.last_frame + options_.lifetime + std::chrono::milliseconds(jitter_ms);
    auto& home = *shards_[s.shard];
    s.open_index = home.open.size();
    home.open.push_back(con);
    detail::release_handshake(*con);
}

// Keep-alive without a timer per connection (an asio timer and its waiting handler cost about
// 0.6 KiB each): one sweep per shard, every keep_alive_tick, checks each open connection for the
// first of: the ping after idle_ping without a frame, the pong deadline (no pong within
// pong_timeout drops TCP without a close), the lifetime's end.
template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::schedule_sweep(shard& home) {
    if (!home.sweep) home.sweep = std::make_unique<asio::steady_timer>(home.io);
    home.sweep->expires_after(keep_alive_tick());
    home.sweep->async_wait([this, &home](const asio::error_code& ec) {
        if (ec) return;
        const auto now = std::chrono::steady_clock::now();
        std::vector<connection_ptr> live;  // acting may close a connection, which edits the list
        live.reserve(home.open.size());
        for (const auto& weak : home.open)
            if (auto con = weak.lock()) live.push_back(std::move(con));
        for (const auto& con : live) keep_alive(con, now);
        schedule_sweep(home);
    });
}

// A quarter of the shortest keep-alive period, between 10 ms and 1 s: a deadline is acted on
// at most that late.
template <class AuthPolicy, class Transport>
std::chrono::milliseconds basic_server<AuthPolicy, Transport>::keep_alive_tick() const {
    const auto shortest = std::min({options_.idle_ping, options_.pong_timeout, options_.lifetime});
    return std::clamp(shortest / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(1000));
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::keep_alive(const connection_ptr& c,
                                                     std::chrono::steady_clock::time_point now) {
    auto& s = c->imbus_state;
    if (!s.open) return;
    if (now >= s.ends_at) return close(c, 4002, "KEEP_ALIVE_TIMEOUT");
    if (s.ping_outstanding && now >= s.ping_sent + options_.pong_timeout) {
        if (options_.log)
            options_.log(log_level::info, "server: no pong from " + c->get_remote_endpoint() + ", dropped");
        return c->terminate(websocketpp::transport::error::make_error_code(websocketpp::transport::error::timeout));
    }
    if (!s.ping_outstanding && now >= s.last_frame + options_.idle_ping) {
        static const detail::shared_wire_frame ping = detail::control_frame(0x9, {});
        if (!c->queue_frame(ping)) return;
        c->flush_outbound();
        s.ping_outstanding = true;
        s.ping_sent = now;
    }
}

// Takes a closed connection out of its shard's list (the last one takes its place).
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::forget_open(const connection_ptr& con) {
    auto& home = *shards_[con->imbus_state.shard];
    const std::size_t i = con->imbus_state.open_index;
    if (i >= home.open.size() || home.open[i].lock() != con) return;
    if (i + 1 != home.open.size()) {
        home.open[i] = std::move(home.open.back());
        if (auto moved = home.open[i].lock()) moved->imbus_state.open_index = i;
    }
    home.open.pop_back();
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::on_close(websocketpp::connection_hdl h) {
    auto con = connection_of(h);
    if (!con) return;
    auto& s = con->imbus_state;
    if (!s.open && con->get_ec() == websocketpp::error::make_error_code(websocketpp::error::http_parse_error)) {
        if (options_.log)
            options_.log(log_level::warning, "server: malformed request from " + s.admission.address() + " answered " +
                                                 std::to_string(int(con->get_response_code())) + " (" +
                                                 con->get_response_msg() + ")");
        metrics_.bad_requests.fetch_add(1,
                                        std::memory_order_release);  // after the log: who sees the count sees the line
    }
    if (s.open) forget_open(con);
    s.subscription.close();
    if (s.feed.follow) metrics_.subscribed.fetch_sub(1, std::memory_order_relaxed);
    s.feed.follow.reset();
    {
        std::lock_guard<std::mutex> lock(connections_mutex_);
        if (connections_.erase(con.get()) != 0) {  // the first code sent wins; an echo repeats it
            using websocketpp::close::status::blank;
            const auto local = con->close_code_sent() ? con->close_code_sent() : con->get_local_close_code();
            const auto remote = con->get_remote_close_code();
            metrics_.count_close(local != blank ? local : remote != blank ? remote : std::uint16_t(1006));
        }
        s.admission.release();
        if (stopping_ && connections_.empty()) stop_shards();  // the last one: run() may return
    }
    s.open = false;
    if (!std::exchange(s.policy_opened, false)) return;
    if constexpr (detail::policy_has_on_close<AuthPolicy>::value) {
        try {
            policy_.on_close(*s.identity);
        } catch (...) {
            if (options_.log)
                options_.log(log_level::error, "server: on_close hook failed: " + detail::current_error());
        }
    }
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::close(const connection_ptr& con, std::uint16_t code,
                                                const std::string& reason) {
    con->close_outbound();  // what waits is dropped: the client resumes from its last id
    std::error_code ec;
    con->close(code, reason, ec);  // a connection already closing keeps its first code
}

// At most rate_burst frames in any rate_burst * rate_delay, pings and pongs included (Odoo:
// burst 10, delay 0.2 s, every frame); a client over it is closed with 1013.
template <class AuthPolicy, class Transport>
bool basic_server<AuthPolicy, Transport>::within_rate(const connection_ptr& con) {
    auto& s = con->imbus_state;
    const auto now = std::chrono::steady_clock::now();
    s.last_frame = now;
    if (s.rate.admit(now, options_.rate_burst, options_.rate_delay)) return true;
    if (options_.log)
        options_.log(log_level::warning, "server: " + con->get_remote_endpoint() + " exceeded the rate limit");
    metrics_.rate_limited.fetch_add(1, std::memory_order_relaxed);
    close(con, 1013, "rate limit exceeded");
    return false;
}

template <class AuthPolicy, class Transport>
bool basic_server<AuthPolicy, Transport>::still_valid(const connection_ptr& con) {
    if constexpr (detail::policy_has_still_valid<AuthPolicy>::value) {
        auto& s = con->imbus_state;
        if (!s.identity || !s.open) return false;
        bool valid = false;
        try {
            valid = policy_.still_valid(*s.identity);
        } catch (...) {
            if (options_.log) options_.log(log_level::error, "server: still_valid failed: " + detail::current_error());
        }
        if (!valid) {
            if (options_.log)
                options_.log(log_level::info, "server: session of " + con->get_remote_endpoint() + " expired");
            close(con, 4001, "SESSION_EXPIRED");
        }
        return valid;
    } else {
        return con->imbus_state.open;
    }
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::on_message(websocketpp::connection_hdl h, message_ptr msg) {
    auto con = connection_of(h);
    if (!con || !con->imbus_state.open) return;
    auto& s = con->imbus_state;
    if (!within_rate(con)) return;
    const std::string& text = msg->get_payload();
    if (msg->get_opcode() == websocketpp::frame::opcode::text && !detail::ends_on_character(text)) {
        if (options_.log)
            options_.log(log_level::warning, "server: text message from " + con->get_remote_endpoint() +
                                                 " ends inside a UTF-8 sequence; closed 1007");
        return close(con, 1007, "invalid UTF-8");
    }
    if (msg->get_opcode() == websocketpp::frame::opcode::binary && text.size() == 1 && text[0] == '\0') return;
    if (!still_valid(con)) return;
    try {
        client_request request = parse_client_request(text, options_.max_json_depth);
        if (request.what == client_request::kind::invalid) {
            if (options_.log)
                options_.log(log_level::warning,
                             "server: request from " + con->get_remote_endpoint() + " refused: " + request.error);
            return refuse_request(con, request);
        }
        if (request.what == client_request::kind::subscribe) return on_subscribe(con, request);
        if constexpr (detail::policy_has_on_event<AuthPolicy>::value) {
            // As in Odoo, an event handler's failure is the application's: logged, counted, and
            // the connection (and every tab behind it) stays.
            try {
                policy_.on_event(*s.identity, request.event_name, request.data);
            } catch (...) {
                metrics_.event_errors.fetch_add(1, std::memory_order_relaxed);
                if (options_.log)
                    options_.log(log_level::error, "server: on_event(\"" + request.event_name + "\") from " +
                                                       con->get_remote_endpoint() +
                                                       " failed: " + detail::current_error());
            }
        }
    } catch (...) {  // the subscribe's channels (the grant is unknown) or the server itself
        if (options_.log) options_.log(log_level::error, "server: request failed: " + detail::current_error());
        close(con, 1011, "server error");
    }
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::on_subscribe(const connection_ptr& con, const client_request& request) {
    auto& s = con->imbus_state;
    if (options_.max_channels && request.channels.size() > options_.max_channels) {
        metrics_.too_many_channels.fetch_add(1, std::memory_order_relaxed);
        if (options_.log)
            options_.log(log_level::warning, "server: " + con->get_remote_endpoint() + " asked for " +
                                                 std::to_string(request.channels.size()) + " channels (max_channels " +
                                                 std::to_string(options_.max_channels) + "); closing (1008)");
        return close(con, 1008, "TOO_MANY_CHANNELS");
    }
    std::vector<channel> channels = build_channels(*s.identity, request.channels);
    if (!s.feed.follow) {
        metrics_.subscribed.fetch_add(1, std::memory_order_relaxed);
        std::weak_ptr<typename endpoint_type::connection_type> weak = con;
        s.subscription = dispatcher_.subscribe(
            [this, weak](wakeup& w) {
                if (auto c = weak.lock()) {
                    connection_link link(*this, c);
                    feed_.on_wakeup(c->imbus_state.feed, link, w);
                }
            },
            *shards_[s.shard]->lane);
    }
    // Subscribe before polling: whatever commits after the poll reaches us as an event.
    s.subscription.set_channels(channels);
    connection_link link(*this, con);
    feed_.subscribe(s.feed, link, std::move(channels), request.last,
                    detail::policy_has_on_subscribe<AuthPolicy>::value);
}

// Odoo's _build_bus_channel_list: the client's strings as [db, s], then the policy's say.
template <class AuthPolicy, class Transport>
std::vector<channel> basic_server<AuthPolicy, Transport>::build_channels(const identity& who,
                                                                         const std::vector<std::string>& asked) {
    std::vector<channel> requested;
    requested.reserve(asked.size());
    for (const auto& name : asked) requested.emplace_back(bus_.db(), name);
    if constexpr (detail::policy_has_channels<AuthPolicy>::value) return policy_.channels(who, std::move(requested));
    else return requested;
}

// A connection's catch-up waits in its shard's queue, served a slice at a time (connection_feed::catch_up).
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::queue_catch_up(const connection_ptr& con) {
    shard& home = *shards_[con->imbus_state.shard];
    home.catch_ups.push_back(con);
    if (std::exchange(home.catch_ups_posted, true)) return;
    detail::post_after_io(home.io, [this, &home] { run_catch_up_slice(home); });
}

// A slice ends after delivery_slice connections or catch_up_slice_bytes, whichever comes first:
// about what a slice of live wake-ups costs, so that history never holds live frames back long.
template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::run_catch_up_slice(shard& home) {
    std::size_t bytes = 0;
    // Those queued again during this slice wait for the next one.
    for (std::size_t n = std::min(home.catch_ups.size(), std::max<std::size_t>(options_.delivery_slice, 1));
         n && bytes < detail::catch_up_slice_bytes; --n) {
        auto weak = std::move(home.catch_ups.front());
        home.catch_ups.pop_front();
        if (auto con = weak.lock()) {
            connection_link link(*this, con);
            bytes += feed_.catch_up_frame(con->imbus_state.feed, link);
        }
    }
    flush_slice(home);
    if (home.catch_ups.empty()) home.catch_ups_posted = false;
    else detail::post_after_io(home.io, [this, &home] { run_catch_up_slice(home); });
}

// The wake-ups of a shard's connections join one queue (its dispatcher lane) served a slice at
// a time, each slice posted twice so that it runs after the next poll for I/O. Publishes and
// handshakes waiting there are served between slices instead of behind a whole fan-out, and
// the commits they make join the queue's later connections, whose frames then leave in one
// write (1,000 subscribers: a task per wake-up 141k deliveries/s, one batch 300k, slices of 32
// about 650k). A commit posts each shard's lane once, not a task per subscriber.
template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::run_wakeup_slice(shard& home) {
    home.lane->run(options_.delivery_slice);
    flush_slice(home);
}

// The frames of a slice are written after it, back to back: one sleeping reader is woken once
// for all of them rather than once per connection between the others' work.
template <class AuthPolicy, class Transport> void basic_server<AuthPolicy, Transport>::flush_slice(shard& home) {
    for (const auto& con : home.unflushed) con->flush_outbound();
    home.unflushed.clear();
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::resume(const connection_ptr& con) {
    connection_link link(*this, con);
    feed_.resume(con->imbus_state.feed, link);
}

template <class AuthPolicy, class Transport> class basic_server<AuthPolicy, Transport>::connection_link final
    : public detail::feed_link {
public:
    connection_link(basic_server& server, const connection_ptr& con) : server_(server), con_(con) {}
    bool open() const override { return con_->imbus_state.open; }
    std::size_t shard() const override { return con_->imbus_state.shard; }
    std::string peer() const override { return con_->get_remote_endpoint(); }
    std::size_t queued_bytes() const override { return con_->outbound_bytes(); }
    std::uint64_t all_queued_bytes() const override { return server_.outbound_bytes(); }
    bool queue(detail::shared_wire_frame frame) override { return con_->queue_frame(std::move(frame)); }
    void flush_after_slice() override { server_.shards_[shard()]->unflushed.push_back(con_); }
    void catch_up_in_a_slice() override { server_.queue_catch_up(con_); }
    void resume_when_drained() override {
        if (con_->outbound_bytes() != 0) return con_->notify_when_drained();  // its drained hook resumes
        std::weak_ptr<typename endpoint_type::connection_type> weak = con_;   // nothing to wait for
        server_.post_to(con_, [&server = server_, weak] {
            if (auto c = weak.lock()) server.resume(c);
        });
    }
    void retry_after(std::chrono::milliseconds delay) override {
        auto timer = std::make_shared<asio::steady_timer>(server_.shards_[shard()]->io, delay);
        std::weak_ptr<typename endpoint_type::connection_type> weak = con_;
        timer->async_wait([&server = server_, weak, timer](const asio::error_code& ec) {
            auto c = weak.lock();
            if (ec || !c) return;
            connection_link link(server, c);
            server.feed_.retry(c->imbus_state.feed, link);
        });
    }
    void close(std::uint16_t code, const std::string& reason) override { server_.close(con_, code, reason); }
    bool still_valid() override { return server_.still_valid(con_); }
    std::vector<direct_message> greeting(const std::vector<channel>& granted) override {
        if constexpr (detail::policy_has_on_subscribe<AuthPolicy>::value)
            return server_.policy_.on_subscribe(*con_->imbus_state.identity, granted);
        else return {};
    }

private:
    basic_server& server_;
    const connection_ptr& con_;
};

// The answer's id is the connection's position, or before its first subscribe the `last` it
// sent (0 if none could be read): a client tracking the last element's id stays where it was.
// Unanswered (logged only) when its queue is over budget: the rate limit bounds the rest.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::refuse_request(const connection_ptr& con, const client_request& request) {
    auto& s = con->imbus_state;
    metrics_.requests_refused.fetch_add(1, std::memory_order_relaxed);
    const std::int64_t id = s.feed.follow ? s.feed.follow->position() : request.last;
    detail::frame_builder frame;
    frame.add(detail::refusal_marker(id, request.event_name, request.error), false);
    if (con->outbound_bytes() + frame.size() >= options_.max_outbound_bytes) return;
    send_frame(con, frame.finish());
    con->flush_outbound();
}

// A refusal; the notifications go through connection_feed::send.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::send_frame(const connection_ptr& con, detail::shared_wire_frame frame) {
    if (con->queue_frame(std::move(frame))) metrics_.observe_outbound(con->outbound_bytes());
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::on_http_request(websocketpp::connection_hdl h) {
    auto con = connection_of(h);
    if (!con) return;
    const http_response response = serve_http(detail::make_http_request(*con));
    con->set_status(static_cast<websocketpp::http::status_code::value>(response.status));
    for (const auto& h2 : response.headers) con->replace_header(h2.first, h2.second);
    con->set_body(response.body);
    con->replace_header("Connection", "close");  // websocketpp closes after every response
}

template <class AuthPolicy, class Transport>
http_response basic_server<AuthPolicy, Transport>::serve_http(const http_request& request) {
    http_response response;
    try {
        serve_route(request, response);
    } catch (...) {
        if (options_.log) options_.log(log_level::error, "server: HTTP route failed: " + detail::current_error());
        response = http_response();
        response.set_json(500, {{"error", "internal error"}});
    }
    return response;
}

// The bus's routes in the order they are tried (docs/PROTOCOL.md §5), then the application's.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_route(const http_request& request, http_response& response) {
    const bool get = request.method == "GET", post = request.method == "POST";
    if (get && !options_.metrics_path.empty() && request.path == options_.metrics_path)
        return serve_metrics(request, response);
    if (get && request.path == options_.path) return serve_handshake_probe(request, response);
    if (request.path == options_.path + "/health") return serve_health(response);
    if (post && request.path == options_.path + "/peek_notifications")
        return serve_peek_notifications(request, response);
    if (post && request.path == "/bus/has_missed_notifications") return serve_has_missed(request, response);
    if (post && request.path == "/bus/send") return serve_send(request, response);
    if (route_ && route_(request, response)) return;
    response.set_json(404, {{"error", "not found"}});
}

// The bus routes' JSON bodies: one nested too deep to copy safely is refused unparsed (400).
template <class AuthPolicy, class Transport>
bool basic_server<AuthPolicy, Transport>::body_too_deep(const http_request& request, http_response& response) const {
    if (detail::json_nesting_within(request.body, options_.max_json_depth)) return false;
    response.set_json(
        400, {{"error", "the body is nested deeper than " + std::to_string(options_.max_json_depth) + " levels"}});
    return true;
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_metrics(const http_request& request, http_response& response) {
    if (!options_.metrics_token.empty() && !detail::constant_time_equal(request.bearer_token(), options_.metrics_token))
        return response.set_json(401, {{"error", "Authorization: Bearer <metrics token> required"}});
    response.status = 200;
    response.headers.emplace_back("Content-Type", "text/plain; version=0.0.4");
    response.headers.emplace_back("Cache-Control", "no-store");
    response.body = metrics_text();
}

// A browser cannot read why a handshake failed; its worker asks here with the same URL and
// cookies: 426 means the handshake would be accepted, else the refusal it would get. Browsers
// send no Origin on a same-origin GET, and a cross-site page cannot read the answer, so the
// origin is checked only when one is named.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_handshake_probe(const http_request& request, http_response& response) {
    std::optional<identity> who;
    auto refusal = handshake_refusal(request, who, request.has_header("Origin"));
    if (!refusal) refusal.emplace(426, "send a WebSocket handshake (Upgrade: websocket) to this URL");
    response.set_json(refusal->first, {{"error", refusal->second}});
    if (refusal->first == 426) response.headers.emplace_back("Upgrade", "websocket");
    response.headers.emplace_back("Cache-Control", "no-store");
}

template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_health(http_response& response) {
    response.set_json(200, {{"status", "pass"}});
    response.headers.emplace_back("Cache-Control", "no-store");
}

// Odoo's /websocket/peek_notifications: one page of what the store has for the channels the
// policy grants, priced like a catch-up frame; "more" says to ask again from "last".
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_peek_notifications(const http_request& request,
                                                                   http_response& response) {
    auto bad_request = [&](const std::string& why) { response.set_json(400, {{"error", why}}); };
    if (body_too_deep(request, response)) return;
    const json body = json::parse(request.body, nullptr, false);
    const json params = detail::rpc_params(body);
    if (!params.is_object() || !params.contains("channels") || !params["channels"].is_array())
        return bad_request("expected {\"channels\": [...], \"last\": N, \"is_first_poll\": bool}");
    auto verdict = policy_.authenticate(request);
    if (!verdict.accepted())
        return response.set_json(verdict.status() ? verdict.status() : 403, {{"error", verdict.reason()}});
    if (options_.max_channels && params["channels"].size() > options_.max_channels)
        return bad_request("more than max_channels (" + std::to_string(options_.max_channels) + ") channels");
    std::vector<std::string> asked;
    for (const auto& c : params["channels"]) {
        if (!c.is_string()) return bad_request("channels must be strings");
        asked.push_back(c.get<std::string>());
    }
    const auto channels = detail::unique_channels(build_channels(verdict.identity(), asked));
    const auto last = detail::client_id(params.value("last", json(0)));
    if (!last) return bad_request("last must be an integer");
    const auto page = bus_.store().fetch(channels, *last, options_.catch_up_rows, options_.catch_up_bytes);
    std::string out = "{\"channels\":[";
    for (std::size_t i = 0; i < channels.size(); ++i) out += (i ? "," : "") + channels[i].key();
    out += "],\"notifications\":[";
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < page.notifications.size(); ++i) {
        const std::string& wire = page.notifications[i].wire();
        out += i ? "," : "";
        out += wire;
        bytes += wire.size();
    }
    const bool more = page.notifications.size() >= options_.catch_up_rows || bytes >= options_.catch_up_bytes;
    out += "],\"last\":" + std::to_string(page.horizon) + ",\"more\":" + (more ? "true" : "false") + "}";
    response.status = 200;
    response.headers.emplace_back("Content-Type", "application/json");
    response.body = detail::rpc_result(body, out);
}

// Odoo's /bus/has_missed_notifications: whether rows after the page's last id were collected.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_has_missed(const http_request& request, http_response& response) {
    if (body_too_deep(request, response)) return;
    const json body = json::parse(request.body, nullptr, false);
    const json params = detail::rpc_params(body);
    const auto last = params.is_object() && params.contains("last_notification_id")
                          ? detail::client_id(params["last_notification_id"])
                          : std::nullopt;
    if (!last) return response.set_json(400, {{"error", "expected {\"last_notification_id\": N}"}});
    const bool missed = bus_.store().has_missed(*last);
    response.status = 200;
    response.headers.emplace_back("Content-Type", "application/json");
    response.body = detail::rpc_result(body, missed ? "true" : "false");
}

// Publishing over HTTP for programs that do not link imbus: one transaction per request.
template <class AuthPolicy, class Transport>
void basic_server<AuthPolicy, Transport>::serve_send(const http_request& request, http_response& response) {
    auto bad_request = [&](const std::string& why) { response.set_json(400, {{"error", why}}); };
    const std::string token = request.bearer_token();
    if (token.empty()) return response.set_json(401, {{"error", "Authorization: Bearer <key> required"}});
    if (options_.api_key.empty() || !detail::constant_time_equal(token, options_.api_key))
        return response.set_json(403, {{"error", "wrong key"}});
    if (body_too_deep(request, response)) return;
    const json body = json::parse(request.body, nullptr, false);
    if (body.is_discarded()) return bad_request("the body is not JSON");
    const json items = body.is_array() ? body : json::array({body});
    if (items.empty()) return bad_request("nothing to send");
    transaction tx(bus_);
    for (const auto& item : items) {
        if (!item.is_object() || !item.contains("channel") || !item.contains("type") || !item["type"].is_string())
            return bad_request("each notification needs \"channel\" and \"type\" (string); \"payload\" is optional");
        std::error_code ec;
        const json& c = item["channel"];
        channel target;
        if (c.is_string()) target = channel(bus_.db(), c.get<std::string>());
        else target = channel::from_json(c, ec);
        if (ec || target.empty()) return bad_request("channel must be a string or a channel array");
        tx.send(target, item["type"].get<std::string>(), item.value("payload", json()), ec);
        if (ec) return bad_request(ec.message());
    }
    std::error_code ec;
    const auto ids = tx.commit(ec);
    if (ec) return response.set_json(500, {{"error", ec.message()}});
    response.set_json(200, {{"ids", ids}});
}

// --- 12. client ------------------------------------------------------------------------------

template <class Transport> struct basic_client<Transport>::impl {
    using endpoint_type = websocketpp::client<typename detail::websocketpp_configs<Transport>::client>;
    using message_ptr = typename endpoint_type::message_ptr;

    client_options options;
    asio::io_context io;
    endpoint_type endpoint;
    asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
    asio::steady_timer retry{io};
    std::thread thread;

    mutable std::mutex mutex;  // guards everything below
    std::condition_variable changed;
    websocketpp::connection_hdl hdl;
    std::string url;
    bool open = false;
    bool attempt_done = false;
    bool closing = false;  // close() was called: no reconnect
    bool shutting_down = false;
    std::error_code attempt_error;
    int refused_status = 0;
    std::string refused_reason;
    std::optional<close_status> closed;
    std::optional<std::vector<std::string>> channels;  // what to subscribe to after a reconnect
    std::int64_t last = 0;
    std::deque<json> received;
    std::size_t dropped = 0;
    std::size_t connects = 0;
    std::chrono::milliseconds delay;
    notification_handler handler;

    explicit impl(client_options o) : options(std::move(o)), delay(options.reconnect_delay) {
        endpoint.clear_access_channels(websocketpp::log::alevel::all);
        endpoint.clear_error_channels(websocketpp::log::elevel::all);
        endpoint.init_asio(&io);
        endpoint.set_max_message_size(options.max_message_bytes);
        if constexpr (!std::is_same_v<Transport, plain_transport>) detail::use_client_tls(endpoint, options);
        endpoint.set_open_handler([this](websocketpp::connection_hdl h) { on_open(h); });
        endpoint.set_fail_handler([this](websocketpp::connection_hdl h) { on_fail(h); });
        endpoint.set_close_handler([this](websocketpp::connection_hdl h) { on_close(h); });
        endpoint.set_message_handler([this](websocketpp::connection_hdl, message_ptr m) { on_message(m); });
        thread = std::thread([this] { io.run(); });
    }

    void log(log_level level, const std::string& text) const {
        if (options.log) options.log(level, "client: " + text);
    }

    // On the I/O thread.
    void start_attempt() {
        std::error_code ec;
        auto con = endpoint.get_connection(url, ec);
        if (ec) {
            std::lock_guard<std::mutex> lock(mutex);
            attempt_error = ec;
            attempt_done = true;
            changed.notify_all();
            return;
        }
        for (const auto& h : options.headers) con->replace_header(h.first, h.second);
        if constexpr (!std::is_same_v<Transport, plain_transport>) detail::check_server_name(*con, options);
        endpoint.connect(con);
    }

    std::string subscribe_text() const {  // under mutex
        return json({{"event_name", "subscribe"}, {"data", {{"channels", *channels}, {"last", last}}}}).dump();
    }

    void on_open(websocketpp::connection_hdl h) {
        std::string subscribe;
        {
            std::lock_guard<std::mutex> lock(mutex);
            hdl = h;
            open = true;
            attempt_done = true;
            attempt_error.clear();
            refused_status = 0;
            refused_reason.clear();
            ++connects;
            delay = options.reconnect_delay;
            if (channels) subscribe = subscribe_text();  // a reconnect resumes where it stood
            changed.notify_all();
        }
        std::error_code ec;
        if (!subscribe.empty()) endpoint.send(h, subscribe, websocketpp::frame::opcode::text, ec);
    }

    void on_fail(websocketpp::connection_hdl h) {
        std::error_code ec;
        auto con = endpoint.get_con_from_hdl(h, ec);
        std::lock_guard<std::mutex> lock(mutex);
        open = false;
        attempt_done = true;
        attempt_error = con ? con->get_ec() : ec;
        refused_status = con ? int(con->get_response_code()) : 0;
        refused_reason.clear();
        if (con && refused_status) {  // imbus answers {"error": why}; another server, its status text
            const json body = json::parse(con->get_response().get_body(), nullptr, false);
            refused_reason = body.is_object() && body.contains("error") && body["error"].is_string()
                                 ? body["error"].get<std::string>()
                                 : con->get_response_msg();
        }
        if (!attempt_error) attempt_error = websocketpp::error::make_error_code(websocketpp::error::general);
        changed.notify_all();
        if (connects > 0) schedule_reconnect(false);  // only a client that was connected retries
    }

    void on_close(websocketpp::connection_hdl h) {
        std::error_code ec;
        auto con = endpoint.get_con_from_hdl(h, ec);
        std::unique_lock<std::mutex> lock(mutex);
        open = false;
        close_status status;
        bool too_big = false;  // this client refused a frame: the same frame would come again
        if (con) {
            status.code = con->get_remote_close_code();
            status.reason = con->get_remote_close_reason();
            const auto local = con->get_local_close_code();
            too_big = local == websocketpp::close::status::message_too_big;
            if ((status.code == websocketpp::close::status::no_status ||
                 status.code == websocketpp::close::status::abnormal_close) &&
                local != websocketpp::close::status::no_status && local != websocketpp::close::status::abnormal_close) {
                status.code = local;  // closed by this side (e.g. 1009), the peer never answered
                status.reason = con->get_local_close_reason();
            } else if (status.code == websocketpp::close::status::no_status && con->get_ec()) {
                status.code = 1006;
            }
        }
        closed = status;
        changed.notify_all();
        if (too_big) {
            lock.unlock();
            return log(log_level::error, "a frame above max_message_bytes (" +
                                             std::to_string(options.max_message_bytes) +
                                             ") was refused (1009); not reconnecting, it would come again");
        }
        // 1000 is final, 4001 waits for a new identity; everything else is retried (4002 at once).
        if (status.code != 1000 && status.code != 4001) schedule_reconnect(status.code == 4002);
    }

    void schedule_reconnect(bool at_once) {  // under mutex
        if (!options.reconnect || closing || shutting_down) return;
        const auto wait = at_once ? std::chrono::milliseconds(0) : delay;
        delay = std::min<std::chrono::milliseconds>(
            std::chrono::milliseconds(std::int64_t(double(delay.count()) * 1.5)), std::chrono::seconds(60));
        retry.expires_after(wait);
        retry.async_wait([this](const asio::error_code& ec) {
            if (ec) return;
            {
                std::lock_guard<std::mutex> lock(mutex);
                if (closing || shutting_down) return;
            }
            log(log_level::info, "reconnecting to " + url);
            start_attempt();
        });
    }

    static bool is_marker(const json& n) {
        const json* type = n.contains("message") && n["message"].is_object() && n["message"].contains("type")
                               ? &n["message"]["type"]
                               : nullptr;
        return type && type->is_string() && (*type == "bus/missed_notifications" || *type == "bus/request_refused");
    }

    void on_message(const message_ptr& m) {
        json frame = json::parse(m->get_payload(), nullptr, false);
        if (!frame.is_array()) return log(log_level::warning, "server sent a frame that is not an array");
        notification_handler h;
        std::size_t dropping = 0;
        {
            std::lock_guard<std::mutex> lock(mutex);
            h = handler;
            for (const auto& n : frame) {
                if (!n.is_object() || !n.contains("id") || !n["id"].is_number_integer()) continue;
                // A row's id is the position to resume from, assigned as Odoo's worker does:
                // after a store reset the ids start over, lower. A marker's id is the position
                // the server had for us, not a row.
                if (!is_marker(n)) last = n["id"].get<std::int64_t>();
                if (h) continue;  // the handler takes them: nothing is kept
                received.push_back(n);
                if (received.size() > options.max_received) received.pop_front(), ++dropping;
            }
            dropped += dropping;
            changed.notify_all();
        }
        if (dropping)
            log(log_level::warning, std::to_string(dropping) +
                                        " notifications dropped: take() is not keeping up (max_received " +
                                        std::to_string(options.max_received) + ")");
        if (h)
            for (const auto& n : frame) h(n);
    }

    void send_text(const std::string& text) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!open) return;  // subscribe is sent again on the next open
        std::error_code ec;
        endpoint.send(hdl, text, websocketpp::frame::opcode::text, ec);
        if (ec) log(log_level::warning, "send failed: " + ec.message());
    }
};

template <class Transport> basic_client<Transport>::basic_client(client_options options)
    : impl_(std::make_unique<impl>(std::move(options))) {}

template <class Transport> basic_client<Transport>::~basic_client() {
    {
        std::lock_guard<std::mutex> lock(impl_->mutex);
        impl_->shutting_down = true;
    }
    asio::post(impl_->io, [this] { impl_->retry.cancel(); });
    if (is_open()) {
        close(1000, "client shutdown");
        wait_closed(std::chrono::seconds(2));
    }
    impl_->work.reset();
    impl_->io.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
}

template <class Transport> void basic_client<Transport>::connect(const std::string& url, std::error_code& ec) {
    std::string target = url;
    if (target.find("version=") == std::string::npos)
        target += (target.find('?') == std::string::npos ? "?version=" : "&version=") + impl_->options.version;
    std::unique_lock<std::mutex> lock(impl_->mutex);
    impl_->url = target;
    impl_->attempt_done = false;
    impl_->closing = false;
    lock.unlock();
    asio::post(impl_->io, [this] { impl_->start_attempt(); });
    lock.lock();
    if (!impl_->changed.wait_for(lock, std::chrono::seconds(30), [&] { return impl_->attempt_done; })) {
        ec = std::make_error_code(std::errc::timed_out);
        return;
    }
    ec = impl_->open ? std::error_code() : impl_->attempt_error;
}

template <class Transport> void basic_client<Transport>::connect(const std::string& url) {
    std::error_code ec;
    connect(url, ec);
    if (!ec) return;
    const int status = handshake_status();
    const std::string reason = handshake_reason();
    throw std::system_error(
        ec, "imbus client: cannot connect to " + url +
                (status ? " (HTTP " + std::to_string(status) + (reason.empty() ? "" : ": " + reason) + ")" : ""));
}

template <class Transport> int basic_client<Transport>::handshake_status() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->refused_status;
}

template <class Transport> std::string basic_client<Transport>::handshake_reason() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->refused_reason;
}

template <class Transport> std::size_t basic_client<Transport>::dropped() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->dropped;
}

template <class Transport>
void basic_client<Transport>::subscribe(std::vector<std::string> channels, std::int64_t last) {
    std::string text;
    {
        std::lock_guard<std::mutex> lock(impl_->mutex);
        impl_->channels = std::move(channels);
        if (last >= 0) impl_->last = last;
        text = impl_->subscribe_text();
    }
    impl_->send_text(text);
}

template <class Transport> void basic_client<Transport>::send(std::string_view event_name, const json& data) {
    impl_->send_text(json({{"event_name", event_name}, {"data", data}}).dump());
}

template <class Transport> void basic_client<Transport>::close(std::uint16_t code, const std::string& reason) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->closing = true;
    if (!impl_->open) return;
    std::error_code ec;
    impl_->endpoint.close(impl_->hdl, code, reason, ec);
}

template <class Transport> void basic_client<Transport>::on_notification(notification_handler handler) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->handler = std::move(handler);
}

template <class Transport>
std::vector<json> basic_client<Transport>::take(std::size_t count, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    impl_->changed.wait_for(lock, timeout, [&] { return impl_->received.size() >= count; });
    const auto n = std::min(count, impl_->received.size());
    std::vector<json> out(impl_->received.begin(), impl_->received.begin() + std::ptrdiff_t(n));
    impl_->received.erase(impl_->received.begin(), impl_->received.begin() + std::ptrdiff_t(n));
    return out;
}

template <class Transport>
std::optional<typename basic_client<Transport>::close_status> basic_client<Transport>::wait_closed(
    std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    if (!impl_->changed.wait_for(lock, timeout, [&] { return !impl_->open && impl_->closed.has_value(); }))
        return std::nullopt;
    return impl_->closed;
}

template <class Transport> bool basic_client<Transport>::wait_open(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(impl_->mutex);
    return impl_->changed.wait_for(lock, timeout, [&] { return impl_->open; });
}

template <class Transport> std::int64_t basic_client<Transport>::last_id() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->last;
}

template <class Transport> bool basic_client<Transport>::is_open() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->open;
}

template <class Transport> std::size_t basic_client<Transport>::connects() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->connects;
}
#endif  // IMBUS_WITH_WEBSOCKETPP

}  // namespace imbus

#endif  // IMBUS_HPP
