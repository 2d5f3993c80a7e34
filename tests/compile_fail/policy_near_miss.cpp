// Policies whose optional hooks miss the expected signature by a little, as a newcomer writes
// them. Each must stop the build with imbus's message (tests/compile_fail/run.sh checks that
// every one of them is reported); before, each was skipped without a word, and the first one
// let a client read any channel it asked for.
#include "imbus.hpp"

#include <string>
#include <vector>

namespace {

struct base_policy {
    using identity = std::string;
    imbus::admission<identity> authenticate(const imbus::http_request&) {
        return imbus::admission<identity>::accept("u");
    }
};

// The strings the client asked for, not the channels built from them.
struct channels_near_miss : base_policy {
    std::vector<imbus::channel> channels(const identity&, const std::vector<std::string>&) { return {}; }
};
// The identity by non-const reference.
struct still_valid_near_miss : base_policy {
    bool still_valid(identity&) { return false; }
};
// Without the event's data.
struct on_event_near_miss : base_policy {
    void on_event(const identity&, const std::string&) {}
};
// An extra parameter.
struct on_open_near_miss : base_policy {
    void on_open(const identity&, int) {}
};
// No parameter.
struct on_close_near_miss : base_policy {
    void on_close() {}
};
// Returning JSON instead of direct messages.
struct on_subscribe_near_miss : base_policy {
    imbus::json on_subscribe(const identity&, const std::vector<imbus::channel>&) { return {}; }
};

}  // namespace

// Naming the class is enough: its identity is checked where it is declared.
template class imbus::basic_server<channels_near_miss>;
template class imbus::basic_server<still_valid_near_miss>;
template class imbus::basic_server<on_event_near_miss>;
template class imbus::basic_server<on_open_near_miss>;
template class imbus::basic_server<on_close_near_miss>;
template class imbus::basic_server<on_subscribe_near_miss>;
