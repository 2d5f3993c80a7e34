// Peer of the imbus WebSocket bench: uWebSockets.js (npm `@trufflesuite/uws-js-unofficial`,
// the native build) with its topics. One process, one event loop.
//
//   node uws_server.mjs PORT
//
// `app.ws('/*')`: a client sends {"event_name":"subscribe","data":{"channels":["a"],"last":0}}
// and the server calls `ws.subscribe(channel)` for each (`last` is ignored: no history).
// HTTP `POST /publish` with {"channel":"a","payload":{...}} does
// `app.publish(channel, '{"channel":"a","payload":{...}}')` and answers {"published":true}.
// maxBackpressure is raised from 64 KiB to 64 MiB: with the default, uWS silently skips a
// subscriber whose send buffer is over the limit, and the bench counts every notification.
// Binds 127.0.0.1 and prints `PORT n`. Refuses to run on the package's pure-JS fallback.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const uWS = require("@trufflesuite/uws-js-unofficial");
if (typeof uWS.us_listen_socket_close !== "function" || !String(uWS.App).includes("native code")) {
  console.error("uws_server: the native uWebSockets.js binary did not load (fallback in use)");
  process.exit(1);
}

const port = Number(process.argv[2] || 0);
const decoder = new TextDecoder();

const app = uWS.App();
app.ws("/*", {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024,
  maxBackpressure: 64 * 1024 * 1024,
  idleTimeout: 120,
  message: (ws, message, isBinary) => {
    if (isBinary) return;
    let msg;
    try {
      msg = JSON.parse(decoder.decode(message));
    } catch {
      return;
    }
    if (msg?.event_name !== "subscribe" || !Array.isArray(msg.data?.channels)) return;
    for (const ch of msg.data.channels) ws.subscribe(String(ch));
  },
});

app.post("/publish", (res) => {
  const chunks = [];
  let aborted = false;
  res.onAborted(() => {
    aborted = true;
  });
  res.onData((chunk, isLast) => {
    chunks.push(Buffer.from(chunk.slice(0))); // the ArrayBuffer is only valid during the call
    if (!isLast) return;
    if (aborted) return;
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      res.cork(() => res.writeStatus("400 Bad Request").end("bad json"));
      return;
    }
    const channel = String(body.channel);
    app.publish(channel, JSON.stringify({ channel, payload: body.payload }), false);
    res.cork(() => res.writeHeader("Content-Type", "application/json").end('{"published":true}'));
  });
});
app.any("/*", (res) => {
  res.writeStatus("404 Not Found").end();
});

app.listen("127.0.0.1", port, (token) => {
  if (!token) {
    console.error(`uws_server: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  console.log(`PORT ${uWS.us_socket_local_port(token)}`);
});
process.on("SIGTERM", () => process.exit(0));
