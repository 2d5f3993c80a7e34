// imbus.hpp - a real-time notification bus for C++17, in one header.
//
// imbus follows the architecture of the Odoo bus: applications send notifications on
// channels inside their own transaction; at commit the notifications are stored and the
// dispatcher wakes the live connections subscribed to those channels; clients poll "what
// happened after my last id" so that nothing is lost across reconnects.
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
// Opt-in parts (each only ADDS code; nothing changes layout when it is off):
//     IMBUS_WITH_SQLITE     sqlite_store                     link: SQLite::SQLite3 / -lsqlite3
//
// Configuration macros (define before including to change a compile-time default; every
// one of them is also a runtime option of the class that uses it):
//     IMBUS_FIRST_POLL_WINDOW_SECONDS   50     a first poll (last == 0) returns this much history
//     IMBUS_RETENTION_SECONDS           86400  notifications older than this are garbage
//     IMBUS_MAX_PENDING_WAKEUPS         1024   per subscriber; beyond it the subscriber re-polls
//     IMBUS_SQLITE_BUSY_TIMEOUT_MS      5000   how long a SQLite connection waits for a lock
//     IMBUS_SQLITE_GC_CHUNK             5000   rows deleted per garbage-collection transaction
//
// Threading model:
//     channel, notification, commit_event: values; immutable once shared.
//     memory_store, sqlite_store, dispatcher, bus: every member function is thread-safe.
//     transaction, follower: one thread at a time (a transaction is the unit of one caller).
//     dispatcher handlers run on the subscriber's executor, never concurrently with themselves.
//     Stores and dispatchers must outlive the buses, transactions and subscriptions using them.
//
// Dependencies: nlohmann/json (always); SQLite 3 (IMBUS_WITH_SQLITE).

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

#ifndef IMBUS_SQLITE_GC_CHUNK
#define IMBUS_SQLITE_GC_CHUNK 5000
#endif

// ============================================================================================
// Includes
// ============================================================================================

#include <algorithm>     // sort, lower_bound, partition_point
#include <atomic>        // manual_clock, subscriber state
#include <chrono>        // created_at, windows, retention
#include <cstdint>       // int64_t ids
#include <deque>         // memory_store rows, trimmed at the front by garbage collection
#include <functional>    // clocks, loggers, handlers, executors
#include <iostream>      // stderr_logger
#include <limits>
#include <memory>        // shared commit events, subscriber entries
#include <mutex>
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

// ============================================================================================
// Declarations
// ============================================================================================

namespace imbus {

using json = nlohmann::json;

/// "0.1.0"
std::string version_string();

// --------------------------------------------------------------------------------------------
// Time: every store reads time through a clock_function, so tests can move time by hand.
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
// Errors and logging: setup errors throw; the publish path returns error codes.
// --------------------------------------------------------------------------------------------

enum class errc {
    invalid_channel = 1,   // not one of the channel shapes, or not valid UTF-8
    invalid_message,       // the type or payload cannot be serialized (invalid UTF-8)
    transaction_finished,  // the transaction was already committed or rolled back
    hook_failed,           // a pre-commit hook threw: the transaction was rolled back
    store_failure,         // the store could not write or read; nothing was committed
};

const std::error_category& error_category() noexcept;
std::error_code make_error_code(errc e) noexcept;

enum class log_level { debug, info, warning, error };

/// Where imbus reports what it contained instead of crashing (bad input, throwing handlers).
using logger = std::function<void(log_level, const std::string&)>;

/// Writes messages at or above `threshold` to std::clog.
logger stderr_logger(log_level threshold = log_level::warning);

} // namespace imbus

namespace std {
template <> struct is_error_code_enum<imbus::errc> : true_type {};
} // namespace std

namespace imbus {

// --------------------------------------------------------------------------------------------
// Channels (Odoo: the tuples given to _sendone and their JSON form in bus_bus.channel)
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
    std::string sub;  ///< empty: the record's own channel
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
template <class Target>
channel to_channel(std::string_view db, const std::pair<Target, std::string>& target_and_sub);
template <class Target>
channel to_channel(std::string_view db, const Target& target);

// --------------------------------------------------------------------------------------------
// Notifications (Odoo: a bus_bus row)
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
// Stores (Odoo: the bus_bus table and _poll)
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

    /// The notifications on `channels` after `last`, ascending ids (PROTOCOL §2): `last == 0`
    /// means the first-poll window; `last` above the newest id (a reset store) counts as 0.
    /// At most `limit` rows when limit > 0 (the oldest ones).
    virtual poll_result fetch(const std::vector<channel>& channels, std::int64_t last,
                              std::size_t limit = 0) = 0;
    std::vector<notification> poll(const std::vector<channel>& channels, std::int64_t last,
                                   std::size_t limit = 0);

    virtual std::int64_t newest_id() = 0;  ///< newest id ever assigned; 0 for a new store
    virtual std::int64_t oldest_id() = 0;  ///< oldest id still stored; 0 when empty
    virtual bool contains(std::int64_t id) = 0;
    /// Deletes notifications older than the retention; returns how many.
    virtual std::size_t collect_garbage() = 0;

    /// Odoo's /bus/has_missed_notifications: row `last` is gone, so rows after it may be too.
    bool has_missed(std::int64_t last) { return last > 0 && !contains(last); }

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
    poll_result fetch(const std::vector<channel>& channels, std::int64_t last,
                      std::size_t limit = 0) override;
    std::int64_t newest_id() override;
    std::int64_t oldest_id() override;
    bool contains(std::int64_t id) override;
    std::size_t collect_garbage() override;
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
};

#ifdef IMBUS_WITH_SQLITE
namespace detail { class sqlite_statement; struct sqlite_reader; }

struct sqlite_store_options : store_options {
    /// For files the store opens itself: journal_mode=WAL, so polls never wait for writers.
    bool wal = true;
    /// For files the store opens itself: PRAGMA synchronous (NORMAL is durable in WAL
    /// except for the last commits before a power cut; FULL survives that too).
    std::string synchronous = "NORMAL";
    std::chrono::milliseconds busy_timeout{IMBUS_SQLITE_BUSY_TIMEOUT_MS};
    /// Reader connections kept open for polls (more are opened under load, then closed).
    std::size_t idle_readers = 4;
};

/// Notifications in a SQLite `bus_bus` table (id, channel, message, create_date in
/// microseconds since the Unix epoch, UTC), indexed by (channel, id) and by create_date so a
/// poll costs the same at a million rows as at ten thousand. Either owns its database file,
/// or shares the application's own sqlite3* connection so bus rows commit atomically with the
/// application's rows (the outbox pattern). Thread-safe; polls use separate reader
/// connections when the database is a file. A borrowed connection must outlive the store and
/// must not be used by the application from another thread while an imbus transaction is open.
class sqlite_store final : public store {
public:
    explicit sqlite_store(const std::string& path, sqlite_store_options options = {});
    explicit sqlite_store(sqlite3* application_connection, sqlite_store_options options = {});
    ~sqlite_store() override;
    sqlite_store(const sqlite_store&) = delete;
    sqlite_store& operator=(const sqlite_store&) = delete;

    std::unique_ptr<write_transaction> begin() override;
    poll_result fetch(const std::vector<channel>& channels, std::int64_t last,
                      std::size_t limit = 0) override;
    std::int64_t newest_id() override;
    std::int64_t oldest_id() override;
    bool contains(std::int64_t id) override;
    std::size_t collect_garbage() override;

    sqlite3* connection() const noexcept { return db_; }

private:
    class write_tx;
    struct writer_statements;
    template <class F> auto with_reader(F&& f);
    std::unique_ptr<detail::sqlite_reader> open_reader();
    void create_schema();

    sqlite_store_options options_;
    sqlite3* db_ = nullptr;
    bool owns_db_ = false;
    std::string path_;           // empty: an in-memory database; polls go through db_
    std::recursive_mutex writer_mutex_;
    std::unique_ptr<writer_statements> writer_;
    std::unique_ptr<detail::sqlite_reader> writer_reader_;  // used when path_ is empty
    std::mutex readers_mutex_;
    std::vector<std::unique_ptr<detail::sqlite_reader>> idle_readers_;
};
#endif // IMBUS_WITH_SQLITE

// --------------------------------------------------------------------------------------------
// Dispatcher (Odoo: ImDispatch and _channels_to_ws)
// --------------------------------------------------------------------------------------------

/// What one commit tells the dispatcher (Odoo: the NOTIFY payload, plus the rows themselves
/// so that live connections need not poll the store). Immutable and shared by all recipients.
struct commit_event {
    std::vector<channel> channels;            ///< de-duplicated, in first-send order
    std::vector<notification> notifications; ///< the stored rows, ascending; empty for a bare wake-up
    std::vector<std::string> wire;            ///< wire form of each row, serialized once for everybody

    /// A wake-up naming channels only (e.g. from another process): subscribers poll the store.
    static std::shared_ptr<const commit_event> wake_up(std::vector<channel> channels);
    /// The event for committed rows: channels and wire forms are derived from them.
    static std::shared_ptr<const commit_event> from_rows(std::vector<notification> rows);

    bool has_rows() const noexcept { return !notifications.empty(); }
    std::int64_t first_id() const noexcept { return has_rows() ? notifications.front().id : 0; }
    std::int64_t last_id() const noexcept { return has_rows() ? notifications.back().id : 0; }
    /// Rows with ids first_id()..last_id() and nothing in between from any other commit.
    bool contiguous() const noexcept;
};

/// Everything that reached one subscriber since its handler last ran (coalesced wake-ups).
struct wakeup {
    std::vector<std::shared_ptr<const commit_event>> events;  ///< in notification order
    /// Events were dropped because the subscriber fell behind: catch up from the store.
    bool overflowed = false;
};

/// Runs a task: the server posts it to a connection's strand; empty means "run inline".
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

    /// The post-commit step: wakes every distinct subscriber of the event's channels once.
    void notify(std::shared_ptr<const commit_event> event);

    std::size_t subscriber_count() const;
    std::size_t channel_count() const;
    std::size_t subscribers_of(const channel& c) const;

private:
    void set_channels(const std::shared_ptr<entry>& e, const std::vector<channel>& channels);
    void leave(const std::shared_ptr<entry>& e) noexcept;
    void deliver(const std::shared_ptr<entry>& e, const std::shared_ptr<const commit_event>& event);
    static void drain(const std::shared_ptr<entry>& e);

    dispatcher_options options_;
    mutable std::shared_mutex mutex_;
    std::unordered_map<std::string, std::unordered_set<std::shared_ptr<entry>>> by_channel_;
    std::size_t subscribers_ = 0;
};

/// Follows a set of channels without gaps or duplicates: takes rows straight from commit
/// events when they continue where it stands, and polls the store whenever they do not
/// (first contact, dropped events, wake-ups from other processes, events out of order).
/// Not thread-safe: use it on the subscriber's executor.
class follower {
public:
    follower(store& s, std::vector<channel> channels, std::int64_t last = 0);

    /// Replaces the channels; the position is kept (later subscribes keep the server cursor).
    void set_channels(std::vector<channel> channels);
    const std::vector<channel>& channels() const noexcept { return channels_; }
    /// Every id at or below the position has been seen or does not concern these channels.
    std::int64_t position() const noexcept { return position_; }
    void set_position(std::int64_t last) noexcept { position_ = last; }

    /// Polls the store from the position; calls on_row(notification, wire) for each new row.
    template <class OnRow> std::size_t catch_up(OnRow&& on_row, std::size_t limit = 0);
    /// Takes the rows of a wake-up that concern these channels; calls on_row for each new one.
    template <class OnRow> std::size_t take(const wakeup& w, OnRow&& on_row);

private:
    bool wants(const channel& c) const { return keys_.count(c.key()) != 0; }

    store& store_;
    std::vector<channel> channels_;
    std::unordered_set<std::string> keys_;
    std::int64_t position_;
};

// --------------------------------------------------------------------------------------------
// Bus and transactions (Odoo: _sendone, _ensure_hooks, precommit and postcommit)
// --------------------------------------------------------------------------------------------

struct bus_options {
    std::string db = "imbus";  ///< the first element of every channel this bus makes
    logger log = stderr_logger();
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
    const logger& log() const noexcept { return options_.log; }

    template <class Target> channel channel_for(const Target& target) const {
        return to_channel(options_.db, target);
    }

    /// Autocommit: one notification in its own transaction. Returns its ids.
    template <class Target>
    std::vector<std::int64_t> send(const Target& target, std::string_view type, const json& payload,
                                   std::error_code& ec);
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
        if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
        else return false;
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
    if (!append_ascii_json_string(out, s))
        throw_error(errc::invalid_channel, "channel text is not valid UTF-8");
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

template <class T, class = void> struct has_bus_channel : std::false_type {};
template <class T>
struct has_bus_channel<T, std::void_t<decltype(bus_channel(std::declval<const T&>()))>> : std::true_type {};

} // namespace detail

// --- version, clocks, errors, logging -------------------------------------------------------

inline std::string version_string() {
    return std::to_string(IMBUS_VERSION_MAJOR) + "." + std::to_string(IMBUS_VERSION_MINOR) + "." +
           std::to_string(IMBUS_VERSION_PATCH);
}

inline clock_function system_clock() {
    return [] { return clock_type::now(); };
}

inline manual_clock::manual_clock(time_point start) : ticks_(start.time_since_epoch().count()) {}
inline time_point manual_clock::operator()() const noexcept {
    return time_point(clock_type::duration(ticks_.load()));
}
inline void manual_clock::advance(clock_type::duration by) noexcept { ticks_ += by.count(); }
inline void manual_clock::set(time_point to) noexcept { ticks_ = to.time_since_epoch().count(); }

namespace detail {
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
        }
        return "unknown imbus error";
    }
};
} // namespace detail

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

// --- channel --------------------------------------------------------------------------------

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
               (v.is_number_unsigned() ? v.get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<std::int64_t>::max()) : true);
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
    if (ec) detail::throw_error(errc::invalid_channel, "not a channel ([db, name], [db, model, id] or [db, model, id, sub]): " +
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

template <class Target>
channel to_channel(std::string_view db, const std::pair<Target, std::string>& target_and_sub) {
    return to_channel(db, target_and_sub.first).with_sub(target_and_sub.second);
}

template <class Target> channel to_channel(std::string_view db, const Target& target) {
    static_assert(detail::has_bus_channel<Target>::value,
                  "imbus: this type has no channel. Declare `R bus_channel(const T&)` in its namespace, "
                  "returning an imbus::channel, an imbus::record, a channel name, or another type "
                  "that has a bus_channel.");
    return to_channel(db, bus_channel(target));
}

} // namespace imbus

namespace std {
/// Hash by canonical key, so channels can key unordered containers.
template <> struct hash<imbus::channel> {
    std::size_t operator()(const imbus::channel& c) const noexcept { return std::hash<std::string>()(c.key()); }
};
} // namespace std

namespace imbus {

// --- notification ---------------------------------------------------------------------------

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

// --- store ----------------------------------------------------------------------------------

inline std::vector<notification> store::poll(const std::vector<channel>& channels, std::int64_t last,
                                              std::size_t limit) {
    return fetch(channels, last, limit).notifications;
}

inline std::vector<notification> store::append(std::vector<pending_message> batch) {
    auto tx = begin();
    return tx->commit(batch);
}

// --- memory_store ---------------------------------------------------------------------------

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
        rows->ids.pop_front();  // the oldest row overall is the oldest of its channel
        if (rows->ids.empty()) by_channel_.erase(rows->channel.key());
        rows_.pop_front();
        ++removed;
    }
    return removed;
}

inline std::size_t memory_store::collect_garbage() {
    std::unique_lock<std::shared_mutex> lock(mutex_);
    return collect_locked(options_.clock());
}

inline poll_result memory_store::fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit) {
    const time_point now = options_.clock();
    std::shared_lock<std::shared_mutex> lock(mutex_);
    poll_result result;
    result.horizon = newest_id_;
    if (last > newest_id_) last = 0;  // the store was reset under the client
    std::int64_t after = last;
    if (last == 0) {
        const time_point since = now - options_.first_poll_window;
        auto first_recent = std::partition_point(rows_.begin(), rows_.end(),
                                                 [&](const row& r) { return r.created_at < since; });
        after = first_recent == rows_.end() ? newest_id_ : first_recent->id - 1;
    }
    std::vector<std::int64_t> ids;
    for (const auto& c : detail::unique_channels(channels)) {
        auto it = by_channel_.find(c.key());
        if (it == by_channel_.end()) continue;
        const auto& list = it->second.ids;
        auto from = std::upper_bound(list.begin(), list.end(), after);
        auto to = limit && std::size_t(list.end() - from) > limit ? from + std::ptrdiff_t(limit) : list.end();
        ids.insert(ids.end(), from, to);
    }
    std::sort(ids.begin(), ids.end());
    if (limit && ids.size() >= limit) {
        ids.resize(limit);  // a full page vouches only up to its last row
        result.horizon = ids.back();  // the rest comes with the next poll
    }
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

// --- sqlite_store ---------------------------------------------------------------------------

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
        : db(db), owned(owned), snapshots(snapshots),
          begin(db, "BEGIN"), commit(db, "COMMIT"), rollback(db, "ROLLBACK"),
          poll(db, "SELECT id, message, create_date FROM bus_bus "
                   "WHERE channel = ?1 AND id > ?2 AND create_date >= ?3 ORDER BY id LIMIT ?4"),
          first_since(db, "SELECT min(+id) FROM bus_bus WHERE create_date >= ?1"),
          newest(db, "SELECT seq FROM sqlite_sequence WHERE name = 'bus_bus'"),
          oldest(db, "SELECT min(id) FROM bus_bus"),
          exists(db, "SELECT 1 FROM bus_bus WHERE id = ?1") {}
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
    sqlite_statement begin, commit, rollback, poll, first_since, newest, oldest, exists;
};

inline sqlite3* sqlite_open(const std::string& path, int flags, std::chrono::milliseconds busy_timeout) {
    sqlite3* db = nullptr;
    if (sqlite3_open_v2(path.c_str(), &db, flags | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK) {
        std::string err = db ? sqlite3_errmsg(db) : "out of memory";
        sqlite3_close_v2(db);
        throw_error(errc::store_failure, "sqlite: cannot open " + path + ": " + err);
    }
    sqlite3_busy_timeout(db, int(busy_timeout.count()));
    sqlite3_extended_result_codes(db, 1);
    return db;
}

} // namespace detail

struct sqlite_store::writer_statements {
    explicit writer_statements(sqlite3* db)
        : begin(db, "BEGIN IMMEDIATE"), commit(db, "COMMIT"), rollback(db, "ROLLBACK"),
          insert(db, "INSERT INTO bus_bus (channel, message, create_date) VALUES (?1, ?2, ?3)"),
          gc(db, "DELETE FROM bus_bus WHERE id IN "
                 "(SELECT id FROM bus_bus WHERE create_date < ?1 ORDER BY create_date LIMIT ?2)") {}
    detail::sqlite_statement begin, commit, rollback, insert, gc;
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
                stored.push_back(notification{sqlite3_last_insert_rowid(store_.db_), m.channel,
                                              std::move(m.message), now});
            }
            store_.writer_->commit.run();
            open_ = false;
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
    std::unique_lock<std::recursive_mutex> lock_;
    bool open_ = false;
};

inline sqlite_store::sqlite_store(const std::string& path, sqlite_store_options options)
    : options_(std::move(options)), owns_db_(true) {
    db_ = detail::sqlite_open(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, options_.busy_timeout);
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
    writer_ = std::make_unique<writer_statements>(db_);
    const char* file = sqlite3_db_filename(db_, "main");
    path_ = file ? file : "";
    if (path_.empty()) writer_reader_ = std::make_unique<detail::sqlite_reader>(db_, false, false);
}

inline sqlite_store::~sqlite_store() {
    idle_readers_.clear();
    writer_reader_.reset();
    writer_.reset();  // finalize our statements before closing, or before handing the connection back
    if (owns_db_) sqlite3_close_v2(db_);
}

inline std::unique_ptr<store::write_transaction> sqlite_store::begin() { return std::make_unique<write_tx>(*this); }

inline std::unique_ptr<detail::sqlite_reader> sqlite_store::open_reader() {
    sqlite3* db = detail::sqlite_open(path_, SQLITE_OPEN_READWRITE, options_.busy_timeout);
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
    std::lock_guard<std::recursive_mutex> lock(writer_mutex_);
    return f(*writer_reader_);
}

inline poll_result sqlite_store::fetch(const std::vector<channel>& channels, std::int64_t last, std::size_t limit) {
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
            while (r.poll.step())
                result.notifications.push_back(
                    notification{r.poll.int64(0), c, r.poll.text(1), detail::from_micros(r.poll.int64(2))});
        }
        std::sort(result.notifications.begin(), result.notifications.end(),
                  [](const notification& a, const notification& b) { return a.id < b.id; });
        if (limit && result.notifications.size() >= limit) {
            result.notifications.resize(limit);
            result.horizon = result.notifications.back().id;
        }
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
    for (;;) {  // small transactions, so writers are never held up for long
        std::lock_guard<std::recursive_mutex> lock(writer_mutex_);
        writer_->gc.bind(1, cutoff).bind(2, chunk).run();
        const auto n = std::size_t(sqlite3_changes(db_));
        total += n;
        if (n < std::size_t(chunk)) return total;
    }
}
#endif // IMBUS_WITH_SQLITE

// --- dispatcher -----------------------------------------------------------------------------

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

inline bool commit_event::contiguous() const noexcept {
    return has_rows() && last_id() - first_id() + 1 == std::int64_t(notifications.size());
}

struct dispatcher::entry {
    handler on_wakeup;
    executor run;
    logger log;
    std::size_t max_pending;
    std::vector<std::string> keys;  // guarded by the dispatcher's mutex

    std::mutex mutex;  // guards the fields below
    std::vector<std::shared_ptr<const commit_event>> pending;
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
    if (!entry_) detail::throw_error(errc::invalid_channel, "set_channels on a closed subscription");
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

inline void dispatcher::set_channels(const std::shared_ptr<entry>& e, const std::vector<channel>& channels) {
    std::vector<std::string> keys;
    for (const auto& c : detail::unique_channels(channels)) keys.push_back(c.key());
    std::sort(keys.begin(), keys.end());
    std::unique_lock<std::shared_mutex> lock(mutex_);
    for (const auto& old : e->keys) {
        if (std::binary_search(keys.begin(), keys.end(), old)) continue;
        auto it = by_channel_.find(old);
        it->second.erase(e);
        if (it->second.empty()) by_channel_.erase(it);  // no empty entries left behind
    }
    for (const auto& k : keys)
        if (!std::binary_search(e->keys.begin(), e->keys.end(), k)) by_channel_[k].insert(e);
    e->keys = std::move(keys);
}

inline void dispatcher::leave(const std::shared_ptr<entry>& e) noexcept {
    {
        std::lock_guard<std::mutex> lock(e->mutex);
        e->closed = true;
        e->pending.clear();
    }
    std::unique_lock<std::shared_mutex> lock(mutex_);
    for (const auto& k : e->keys) {
        auto it = by_channel_.find(k);
        it->second.erase(e);
        if (it->second.empty()) by_channel_.erase(it);
    }
    e->keys.clear();
    --subscribers_;
}

inline void dispatcher::notify(std::shared_ptr<const commit_event> event) {
    if (!event || event->channels.empty()) return;
    std::vector<std::shared_ptr<entry>> targets;
    {
        std::shared_lock<std::shared_mutex> lock(mutex_);
        for (const auto& c : event->channels) {
            auto it = by_channel_.find(c.key());
            if (it != by_channel_.end()) targets.insert(targets.end(), it->second.begin(), it->second.end());
        }
    }
    if (event->channels.size() > 1) {  // a subscriber of several of the channels is woken once
        std::sort(targets.begin(), targets.end());
        targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
    }
    for (const auto& e : targets) deliver(e, event);  // outside the lock: handlers may resubscribe
}

inline void dispatcher::deliver(const std::shared_ptr<entry>& e, const std::shared_ptr<const commit_event>& event) {
    {
        std::lock_guard<std::mutex> lock(e->mutex);
        if (e->closed) return;
        if (e->pending.size() >= e->max_pending) {
            e->pending.clear();  // a subscriber that fell behind must not grow memory
            e->overflowed = true;
        }
        e->pending.push_back(event);
        if (e->scheduled) return;  // coalesced into the run already queued
        e->scheduled = true;
    }
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
    for (;;) {
        wakeup w;
        {
            std::lock_guard<std::mutex> lock(e->mutex);
            if (e->closed || (e->pending.empty() && !e->overflowed)) {
                e->scheduled = false;
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

// --- follower -------------------------------------------------------------------------------

inline follower::follower(store& s, std::vector<channel> channels, std::int64_t last)
    : store_(s), position_(last) {
    set_channels(std::move(channels));
}

inline void follower::set_channels(std::vector<channel> channels) {
    channels_ = detail::unique_channels(channels);
    keys_.clear();
    for (const auto& c : channels_) keys_.insert(c.key());
}

template <class OnRow> std::size_t follower::catch_up(OnRow&& on_row, std::size_t limit) {
    auto found = store_.fetch(channels_, position_, limit);
    for (const auto& n : found.notifications) on_row(n, std::string_view(n.wire()));
    // A reset store (position above its newest id) restarts from its horizon as well.
    position_ = found.horizon;
    return found.notifications.size();
}

template <class OnRow> std::size_t follower::take(const wakeup& w, OnRow&& on_row) {
    if (w.overflowed) return catch_up(on_row);
    std::size_t taken = 0;
    for (const auto& event : w.events) {
        if (event->has_rows() && event->last_id() <= position_) continue;  // already seen
        if (!event->contiguous() || event->first_id() != position_ + 1) {
            // Not the continuation of what we have. Every event here was sent after its
            // commit, so one poll now covers this event and all the later ones.
            return taken + catch_up(on_row);
        }
        for (std::size_t i = 0; i < event->notifications.size(); ++i) {
            const auto& n = event->notifications[i];
            if (!wants(n.channel)) continue;
            on_row(n, std::string_view(event->wire[i]));
            ++taken;
        }
        position_ = event->last_id();
    }
    return taken;
}

// --- bus and transaction --------------------------------------------------------------------

inline bus::bus(imbus::store& s, dispatcher& d, bus_options options)
    : store_(s), dispatcher_(&d), options_(std::move(options)) {}

inline bus::bus(imbus::store& s, bus_options options) : store_(s), options_(std::move(options)) {}

inline void bus::publish(std::shared_ptr<const commit_event> event) {
    if (dispatcher_) dispatcher_->notify(std::move(event));
}

template <class Target>
std::vector<std::int64_t> bus::send(const Target& target, std::string_view type, const json& payload,
                                    std::error_code& ec) {
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

template <class Target>
void transaction::send(const Target& target, std::string_view type, const json& payload) {
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
    // pre-commit: the application's hooks, then the bus rows, inside the transaction
    for (auto& hook : precommit_) {
        try {
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
    if (!stored.empty()) bus_->publish(commit_event::from_rows(std::move(stored)));
    for (auto& hook : postcommit_) {
        try {
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

} // namespace imbus

#endif // IMBUS_HPP
