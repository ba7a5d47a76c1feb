#!/usr/bin/env node
// Publish events to herald's ingest socket (Node standard library only).
//   node scripts/examples/publish.mjs TOPIC DATA [EVENT]     (HERALD_INGEST=host:port)
import net from "node:net";

const [topic, data, event] = process.argv.slice(2);
if (!topic || data === undefined) {
  console.error("usage: publish.mjs TOPIC DATA [EVENT]");
  process.exit(2);
}
const [host, port] = (process.env.HERALD_INGEST ?? "127.0.0.1:7070").split(":");
const line = JSON.stringify(event ? { topic, data, event } : { topic, data }) + "\n";
const sock = net.connect({ host, port: Number(port) }, () => sock.end(line));
let replies = "";
sock.on("data", (d) => (replies += d));
sock.on("close", () => console.log(replies.trim() || "published"));
sock.on("error", (e) => {
  console.error(e.message);
  process.exit(1);
});
