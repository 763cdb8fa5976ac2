// The Cosmos DB (NoSQL API) test server: @vercel/cosmosdb-server over plain HTTP on loopback,
// in memory. Usage: node tests/cosmos/server.mjs PORT
//
// One fix over the package: it answers a read of a document that does not exist with a 500
// (its handler dereferences the missing document), where Cosmos DB answers 404 Not Found
// ("Get a Document", Cosmos DB REST API). Clients must see the 404 to create the document.
import cosmos from "@vercel/cosmosdb-server";

const port = Number(process.argv[2]);
const server = cosmos.createHttpServer({ keepAlive: true });
// Longer than clients keep idle connections (reqwest: 90 s), so that none is reused just as
// the server closes it.
server.keepAliveTimeout = 120_000;
const [handler] = server.listeners("request");
server.removeAllListeners("request");
const documentPath = /^\/dbs\/[^/]+\/colls\/[^/]+\/docs\/[^/]+$/;

server.on("request", (req, res) => {
  if (req.method === "GET" && documentPath.test(req.url.split("?")[0])) {
    const end = res.end.bind(res);
    res.end = (body, ...rest) => {
      if (res.statusCode === 500 && String(body).includes("Cannot read properties of undefined")) {
        res.statusCode = 404;
        body = JSON.stringify({
          code: "NotFound",
          message: "Entity with the specified id does not exist in the system.",
        });
      }
      return end(body, ...rest);
    };
  }
  handler(req, res);
});

server.listen(port, "127.0.0.1", () => {
  console.log(`Cosmos DB test server at http://127.0.0.1:${port}`);
});
