// Peer of the imbus WebSocket bench: a pub/sub server on the npm `ws` package, the
// "I'll just write it in Node" choice. One process, one JS thread.
//
//   node ws_server.mjs PORT
//
// WebSocket on any path. A client subscribes by sending the imbus-style message
//   {"event_name":"subscribe","data":{"channels":["a","b"],"last":0}}
// (`last` is ignored: this server keeps no history). The server keeps channel -> Set(socket).
// HTTP `POST /publish` with {"channel":"a","payload":{...}} serializes
// {"channel":"a","payload":{...}} once and `ws.send`s that same string to every subscriber
// of the channel; it answers {"subscribers":N}. Binds 127.0.0.1 and prints `PORT n`.
import http from "node:http";
import { WebSocketServer } from "ws";

const port = Number(process.argv[2] || 0);
const channels = new Map(); // channel -> Set(ws)

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url !== "/publish") {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      res.writeHead(400).end("bad json");
      return;
    }
    const subs = channels.get(String(body.channel));
    let n = 0;
    if (subs && subs.size) {
      const frame = JSON.stringify({ channel: body.channel, payload: body.payload });
      for (const ws of subs) {
        ws.send(frame);
        n++;
      }
    }
    const answer = `{"subscribers":${n}}`;
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": answer.length });
    res.end(answer);
  });
});

const wss = new WebSocketServer({ server, perMessageDeflate: false });
wss.on("connection", (ws) => {
  ws.channels = [];
  ws.on("message", (data, isBinary) => {
    if (isBinary) return;
    let msg;
    try {
      msg = JSON.parse(data.toString("utf8"));
    } catch {
      return;
    }
    if (msg?.event_name !== "subscribe" || !Array.isArray(msg.data?.channels)) return;
    for (const ch of ws.channels) channels.get(ch)?.delete(ws);
    ws.channels = msg.data.channels.map(String);
    for (const ch of ws.channels) {
      let set = channels.get(ch);
      if (!set) channels.set(ch, (set = new Set()));
      set.add(ws);
    }
  });
  ws.on("close", () => {
    for (const ch of ws.channels) {
      const set = channels.get(ch);
      if (!set) continue;
      set.delete(ws);
      if (set.size === 0) channels.delete(ch);
    }
  });
  ws.on("error", () => {});
});

server.listen(port, "127.0.0.1", () => console.log(`PORT ${server.address().port}`));
process.on("SIGTERM", () => process.exit(0));
