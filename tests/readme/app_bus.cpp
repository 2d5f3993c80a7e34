// The README's "server in one .cpp" pattern: the one file that compiles the server.
// check.sh finds the README block here, line for line.
// app_bus.cpp: the one file that compiles websocketpp and Asio
#define IMBUS_WITH_WEBSOCKETPP
#include "app_bus.hpp"

struct app_bus::server {
    imbus::server ws;
    explicit server(imbus::bus& bus) : ws(bus, imbus::public_policy({bus.channel_for("broadcast")})) {}
};
app_bus::app_bus(imbus::bus& bus, std::uint16_t port) : server_(std::make_unique<server>(bus)) {
    server_->ws.listen("127.0.0.1", port);
    server_->ws.start();
}
app_bus::~app_bus() {
    server_->ws.stop();
    server_->ws.wait();
}
std::uint16_t app_bus::port() const { return server_->ws.port(); }
