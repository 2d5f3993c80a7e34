// The README's "server in one .cpp" pattern: what the rest of the application includes.
// check.sh finds the README block here, line for line.
// app_bus.hpp: what the rest of the application sees of the server
#pragma once
#include "imbus.hpp"  // the core: channels, stores, bus, transactions
#include <cstdint>
#include <memory>

class app_bus {  // no websocketpp or Asio in here
public:
    app_bus(imbus::bus& bus, std::uint16_t port);  // serving on background threads
    ~app_bus();                                    // every client gets 1001, the threads are joined
    std::uint16_t port() const;

private:
    struct server;
    std::unique_ptr<server> server_;
};
