// Peer of the imbus WebSocket bench: Socket.IO (npm `socket.io`) with rooms. One process.
//
//   node socketio_server.mjs PORT
//
// A client emits ("subscribe", ["a","b"]) and joins those rooms (`socket.join`).
// HTTP `POST /publish` with {"channel":"a","payload":{...}} does
// `io.to(channel).emit("n", payload)` (Socket.IO encodes the packet once per broadcast) and
// answers {"subscribers":N}. The Socket.IO server is attached to an http server bound to
// 127.0.0.1 (`new Server(port)` would bind every interface). Prints `PORT n`.
import http from "node:http";
import { Server } from "socket.io";

const port = Number(process.argv[2] || 0);

const server = http.createServer();
const io = new Server(server, { serveClient: false, perMessageDeflate: false, httpCompression: false });

// Socket.IO answers its own paths (/socket.io/); everything else arrives here.
server.on("request", (req, res) => {
  if (req.url.startsWith("/socket.io/")) return;
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
    const room = io.sockets.adapter.rooms.get(String(body.channel));
    io.to(String(body.channel)).emit("n", body.payload);
    const answer = `{"subscribers":${room ? room.size : 0}}`;
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": answer.length });
    res.end(answer);
  });
});

io.on("connection", (socket) => {
  socket.on("subscribe", (list) => {
    for (const ch of Array.isArray(list) ? list : [list]) socket.join(String(ch));
  });
});

server.listen(port, "127.0.0.1", () => console.log(`PORT ${server.address().port}`));
process.on("SIGTERM", () => process.exit(0));
