// A second translation unit including imbus.hpp, linked into the dispatcher test: a function
// defined in the header without `inline` would make that link fail with a duplicate symbol.
#include "imbus.hpp"

// Uses a few of the header's inline functions; the test recomputes the same value itself.
int imbus_second_tu_uses() {
    const imbus::channel c("db", "res.partner", 7);
    const std::string m = imbus::make_message("t", imbus::json{{"k", 1}});
    return int(c.key().size() + m.size() + imbus::version_string().size());
}
