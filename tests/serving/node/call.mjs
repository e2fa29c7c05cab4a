// Interop client: calls liverec.v1.Recommender/Recommend and grpc.health.v1.Health/Check with
// @grpc/grpc-js and @grpc/proto-loader (the health .proto comes from gRPC's grpc-health-check
// package), then prints one JSON object on stdout.
//
// usage: node call.mjs TARGET PROTO_ROOT SPEC_JSON
//   SPEC_JSON: {"health": ["", "liverec.v1.Recommender"], "recommend": [{"user_id": "1", "k": 5}, ...]}
//   output:    {"health": {"": "SERVING", ...}, "recommend": [{"ok": {...}} | {"error": {"code", "name", "details"}}]}
// int64 fields travel as decimal strings both ways, so ids above 2^53 survive.

import { createRequire } from "node:module";
import path from "node:path";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const require = createRequire(import.meta.url);
const [target, protoRoot, specJson] = process.argv.slice(2);
if (!target || !protoRoot || !specJson) {
  console.error("usage: node call.mjs TARGET PROTO_ROOT SPEC_JSON");
  process.exit(2);
}
const spec = JSON.parse(specJson);
const DEADLINE_MS = 30_000;
const LOADER = { longs: String, enums: String, defaults: true, arrays: true, keepCase: true };

function load(file, includeDirs) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, { ...LOADER, includeDirs }));
}

const healthProto = path.join(path.dirname(require.resolve("grpc-health-check/package.json")),
  "proto", "health", "v1", "health.proto");
const liverec = load("liverec/v1/recommender.proto", [protoRoot]).liverec.v1;
const health = load(healthProto, []).grpc.health.v1;
const credentials = grpc.credentials.createInsecure();
const recommender = new liverec.Recommender(target, credentials);
const healthClient = new health.Health(target, credentials);

function call(client, method, request) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, { deadline }, (err, response) => {
      if (err) {
        resolve({ error: { code: err.code, name: grpc.status[err.code], details: err.details } });
      } else {
        resolve({ ok: response });
      }
    });
  });
}

const out = { health: {}, recommend: [] };
for (const service of spec.health ?? []) {
  const result = await call(healthClient, "Check", { service });
  out.health[service] = result.ok ? result.ok.status : result.error;
}
for (const request of spec.recommend ?? []) {
  out.recommend.push(await call(recommender, "Recommend", request));
}
recommender.close();
healthClient.close();
console.log(JSON.stringify(out));
