// Enqueue modq requests from Node.js, with no Celery client: a Celery protocol 2 message in
// the envelope of kombu's Redis transport, pushed onto modq's queue (a Redis list).
//
//   node producer.js --broker redis://127.0.0.1:6379/0 --callback redis-stream://results \
//       file:///srv/uploads/cat.jpg s3://uploads/dog.jpg
//
// Each request is validated against schemas/moderation_request.v1.json before it is sent;
// prints "<request id>\t<image>" per request.
"use strict";

const crypto = require("node:crypto");
const os = require("node:os");
const { createClient } = require("redis");
const { parseArgs, validator } = require("./lib");

const TASK = "modq.moderate";

// One protocol 2 task message (https://docs.celeryq.dev/en/stable/internals/protocol.html):
// the body is [args, kwargs, embed] with the request as the one positional argument.
function taskMessage(request, queue) {
  const id = request.request_id;
  const body = [[request], {}, { callbacks: null, errbacks: null, chain: null, chord: null }];
  return {
    body: Buffer.from(JSON.stringify(body)).toString("base64"),
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "js",
      task: TASK,
      id, // modq uses the request id as the task id
      root_id: id,
      parent_id: null,
      group: null,
      group_index: null,
      shadow: null,
      eta: null,
      expires: null,
      retries: 0,
      timelimit: [null, null],
      argsrepr: JSON.stringify([request]),
      kwargsrepr: "{}",
      origin: `node@${os.hostname()}`,
      ignore_result: true,
    },
    properties: {
      correlation_id: id,
      delivery_mode: 2,
      delivery_info: { exchange: "", routing_key: queue },
      priority: 0,
      body_encoding: "base64",
      delivery_tag: crypto.randomUUID(),
    },
  };
}

async function main() {
  const { options, rest } = parseArgs(process.argv.slice(2), {
    broker: process.env.MODQ_BROKER_URL || "redis://127.0.0.1:6379/0",
    queue: "modq",
    callback: undefined,
    prefix: "node",
  });
  const validRequest = validator("moderation_request.v1.json");
  const requests = rest.map((image, n) => {
    const request = { request_id: `${options.prefix}-${n}-${crypto.randomUUID()}`, image };
    if (options.callback) request.callback = options.callback;
    return validRequest(request);
  });
  const client = createClient({ url: options.broker });
  await client.connect();
  try {
    for (const request of requests) {
      // kombu's Redis transport pops from the right: LPUSH keeps the queue first in, first out.
      await client.lPush(options.queue, JSON.stringify(taskMessage(request, options.queue)));
      process.stdout.write(`${request.request_id}\t${request.image}\n`);
    }
  } finally {
    await client.quit();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
