// The rest of the application in the README's "server in one .cpp" pattern: built without
// IMBUS_WITH_WEBSOCKETPP (its target links the core and app_bus only), it runs the server
// through app_bus and asks it, over HTTP on 127.0.0.1, for its health and its counters.
#include "app_bus.hpp"

#ifdef IMBUS_WITH_WEBSOCKETPP
#error "the rest of the application must compile without the server"
#endif

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <string>

// One HTTP/1.0 GET on 127.0.0.1: the whole answer (the server closes after it).
static std::string http_get(std::uint16_t port, const std::string& path) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string answer;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
        const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        if (::send(fd, request.data(), request.size(), 0) == ssize_t(request.size())) {
            char buffer[4096];
            ssize_t n;
            while ((n = ::recv(fd, buffer, sizeof buffer, 0)) > 0) answer.append(buffer, std::size_t(n));
        }
    }
    ::close(fd);
    return answer;
}

int main() {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher, {"mydb"});
    app_bus server(bus, 0);
    bus.send("broadcast", "chat/message", {{"text", "hello"}});
    const std::string health = http_get(server.port(), "/websocket/health");
    const std::string metrics = http_get(server.port(), "/metrics");
    const bool ok =
        health.rfind("HTTP/1.1 200", 0) == 0 && metrics.find("imbus_store_newest_id 1") != std::string::npos;
    if (!ok)
        std::fprintf(stderr, "README app_bus pattern: health:\n%s\nmetrics:\n%s\n", health.c_str(), metrics.c_str());
    else std::puts("README app_bus pattern: ok");
    return ok ? 0 : 1;
}
