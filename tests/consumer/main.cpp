// Compiles, links and runs against imbus exactly as a user project would.
#include "imbus.hpp"

#include <iostream>

#if defined(CONSUMER_EXPECT_SQLITE) && !defined(IMBUS_WITH_SQLITE)
#error "imbus::sqlite must define IMBUS_WITH_SQLITE"
#endif

int main() {
    std::cout << "imbus " << imbus::version_string() << '\n';
    return IMBUS_VERSION_MAJOR >= 0 ? 0 : 1;
}
