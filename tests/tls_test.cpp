// wss:// (issue 7): basic_server and basic_client over TLS with throwaway certificates made
// by the openssl command: delivery, certificate and host-name checks, and a plain client on
// the TLS port not disturbing anyone.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "imbus.hpp"
#include "support/raw_socket.hpp"

#include <cstdlib>
#include <stdlib.h>

using namespace std::chrono_literals;
using tls_server = imbus::basic_server<imbus::public_policy, imbus::tls_transport>;
using tls_client = imbus::basic_client<imbus::tls_transport>;

namespace {

// A self-signed certificate (its own authority) for the given subjectAltName, in a temp dir.
struct certificate {
    std::string dir, cert, key;
    explicit certificate(const std::string& alt_names) {
        char tmp[] = "/tmp/imbus-tls.XXXXXX";
        REQUIRE(mkdtemp(tmp) != nullptr);
        dir = tmp;
        cert = dir + "/cert.pem";
        key = dir + "/key.pem";
        const std::string command =
            "openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 1 -subj /CN=imbus-test"
            " -addext subjectAltName=" +
            alt_names + " -keyout " + key + " -out " + cert + " > " + dir + "/openssl.log 2>&1";
        REQUIRE_MESSAGE(std::system(command.c_str()) == 0, "openssl failed: see " << dir << "/openssl.log");
    }
    ~certificate() { std::system(("rm -rf " + dir).c_str()); }
};

struct tls_fixture {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus{store, dispatcher, {"db"}};
    tls_server server;

    explicit tls_fixture(const certificate& c) : server(bus, imbus::public_policy(), options(c)) {
        server.listen("127.0.0.1", 0);
        server.start();
    }
    ~tls_fixture() {
        server.stop();
        server.wait();
    }
    static imbus::server_options options(const certificate& c) {
        imbus::server_options o;
        o.tls_certificate_chain_file = c.cert;
        o.tls_private_key_file = c.key;
        o.log = {};
        return o;
    }
    std::string url(const std::string& host = "127.0.0.1") const {
        return "wss://" + host + ":" + std::to_string(server.port()) + "/websocket";
    }
};

imbus::client_options trusting(const certificate& c) {
    imbus::client_options o;
    o.reconnect = false;
    o.tls_ca_file = c.cert;
    o.log = {};
    return o;
}

}  // namespace

TEST_CASE("wss: a client that trusts the certificate subscribes and receives, by IP and by host name") {
    certificate cert("DNS:localhost,IP:127.0.0.1");
    tls_fixture f(cert);
    for (const std::string host : {"127.0.0.1", "localhost"}) {
        CAPTURE(host);
        tls_client c(trusting(cert));
        std::error_code ec;
        c.connect(f.url(host), ec);
        REQUIRE_MESSAGE(!ec, ec.message());
        c.subscribe({"news-" + host}, 0);
        const auto ids = f.bus.send("news-" + host, "test", {{"host", host}});
        const auto got = c.take(1, 5s);
        REQUIRE(got.size() == 1);
        CHECK(got[0]["id"] == ids[0]);
        CHECK(got[0]["message"]["payload"]["host"] == host);
    }
}

TEST_CASE("wss: an untrusted certificate or another host name fails the handshake, the server serves on") {
    certificate cert("DNS:localhost,IP:127.0.0.1");
    certificate other("DNS:other.example");
    tls_fixture f(cert);
    {
        imbus::client_options o = trusting(other);  // trusts a different authority
        tls_client c(o);
        std::error_code ec;
        c.connect(f.url(), ec);
        CHECK(ec);
        CHECK(!c.is_open());
    }
    {
        tls_fixture g(other);  // a certificate for other.example, reached as 127.0.0.1
        tls_client c(trusting(other));
        std::error_code ec;
        c.connect(g.url(), ec);
        CHECK(ec);
    }
    // A client that speaks plain HTTP to the TLS port gets no answer it could take for one.
    bool answered = true;
    try {
        answered = imbus_test::http_request(f.server.port(), "GET", "/websocket/health", "", {}, 2s).status == 200;
    } catch (const std::exception&) {
        answered = false;
    }
    CHECK(!answered);

    tls_client ok(trusting(cert));
    ok.connect(f.url());
    ok.subscribe({"news"}, 0);
    const auto ids = f.bus.send("news", "test", {{"still", "serving"}});
    const auto got = ok.take(1, 5s);
    REQUIRE(got.size() == 1);
    CHECK(got[0]["id"] == ids[0]);
}

TEST_CASE("wss: tls_verify = false accepts a certificate nobody vouches for (tests only)") {
    certificate cert("DNS:other.example");
    tls_fixture f(cert);
    imbus::client_options o;
    o.reconnect = false;
    o.tls_verify = false;
    o.log = {};
    tls_client c(o);
    std::error_code ec;
    c.connect(f.url(), ec);
    CHECK(!ec);
    CHECK(c.is_open());
}

TEST_CASE("wss: a missing certificate file is an error at construction") {
    imbus::memory_store store;
    imbus::dispatcher dispatcher;
    imbus::bus bus(store, dispatcher);
    imbus::server_options o;
    o.tls_certificate_chain_file = "/nonexistent/cert.pem";
    o.tls_private_key_file = "/nonexistent/key.pem";
    CHECK_THROWS_AS(tls_server(bus, imbus::public_policy(), o), std::system_error);
}
