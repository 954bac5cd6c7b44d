// Streams one generation from a tinylm InferenceService using only the .proto files and @grpc/grpc-js.
// usage: node generate.js HOST:PORT PROTO_ROOT PROMPT MAX_NEW_TOKENS
// Prints one JSON line: {"text", "token_ids", "finish_reason", "chunks"}; exits 1 on an RPC error.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoRoot, prompt, maxNewTokens] = process.argv.slice(2);
if (!address || !protoRoot || prompt === undefined) {
  console.error("usage: node generate.js HOST:PORT PROTO_ROOT PROMPT [MAX_NEW_TOKENS]");
  process.exit(2);
}

const definition = protoLoader.loadSync(path.join(protoRoot, "protos", "inference.proto"), {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
});
const tinylm = grpc.loadPackageDefinition(definition).tinylm.v1;
const client = new tinylm.InferenceService(address, grpc.credentials.createInsecure());

const request = {
  prompt,
  params: { max_new_tokens: Number(maxNewTokens || 16), temperature: 0, has_temperature: true },
};
const result = { text: "", token_ids: [], finish_reason: null, chunks: 0 };
const call = client.Generate(request, { deadline: Date.now() + 60000 });
call.on("data", (chunk) => {
  result.chunks += 1;
  result.text += chunk.text;
  result.token_ids.push(...chunk.token_ids);
  if (chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") result.finish_reason = chunk.finish_reason;
});
call.on("error", (err) => {
  console.error(`rpc error: ${err.code} ${err.details}`);
  process.exit(1);
});
call.on("end", () => {
  console.log(JSON.stringify(result));
  client.close();
});
