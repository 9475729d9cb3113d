// Read modq's results from a Redis stream (a redis-stream:// callback) with a consumer group,
// validate each against schemas/moderation_result.v1.json, print it as one JSON line and
// acknowledge it.
//
//   node consumer.js --redis redis://127.0.0.1:6379/0 --stream results --count 2
//
// Exits 0 once --count results arrived, 1 when --timeout seconds pass first or a result does
// not validate. Deliveries are at-least-once: results are deduped by request_id.
"use strict";

const { createClient } = require("redis");
const { parseArgs, validator } = require("./lib");

async function ensureGroup(client, stream, group) {
  try {
    await client.xGroupCreate(stream, group, "0", { MKSTREAM: true });
  } catch (error) {
    if (!String(error.message).startsWith("BUSYGROUP")) throw error;
  }
}

async function main() {
  const { options } = parseArgs(process.argv.slice(2), {
    redis: process.env.MODQ_BROKER_URL || "redis://127.0.0.1:6379/0",
    stream: "moderation-results",
    group: "node-example",
    consumer: "consumer-1",
    count: "1",
    timeout: "120",
  });
  const want = Number(options.count);
  const deadline = Date.now() + Number(options.timeout) * 1000;
  const validResult = validator("moderation_result.v1.json");
  const client = createClient({ url: options.redis });
  await client.connect();
  const seen = new Set();
  try {
    await ensureGroup(client, options.stream, options.group);
    while (seen.size < want && Date.now() < deadline) {
      const batches = await client.xReadGroup(
        options.group,
        options.consumer,
        { key: options.stream, id: ">" },
        { COUNT: 100, BLOCK: 500 },
      );
      for (const { messages } of batches || []) {
        for (const { id, message } of messages) {
          const result = validResult(JSON.parse(message.result));
          if (!seen.has(result.request_id)) {
            seen.add(result.request_id);
            process.stdout.write(`${JSON.stringify(result)}\n`);
          }
          await client.xAck(options.stream, options.group, id);
        }
      }
    }
  } finally {
    await client.quit();
  }
  if (seen.size < want) {
    throw new Error(`only ${seen.size} of ${want} results within ${options.timeout} s`);
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
