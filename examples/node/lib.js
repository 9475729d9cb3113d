// Shared by producer.js and consumer.js: modq's JSON Schemas, compiled with ajv.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const Ajv2020 = require("ajv/dist/2020").default;

const SCHEMAS = process.env.MODQ_SCHEMAS || path.join(__dirname, "..", "..", "schemas");

function validator(name) {
  const schema = JSON.parse(fs.readFileSync(path.join(SCHEMAS, name), "utf8"));
  const ajv = new Ajv2020({ allErrors: true, strict: false });
  const validate = ajv.compile(schema);
  return (document) => {
    if (!validate(document)) {
      const problems = validate.errors.map((e) => `${e.instancePath || "/"} ${e.message}`);
      throw new Error(`${name}: ${problems.join("; ")}`);
    }
    return document;
  };
}

// --name value pairs and the positional arguments left over.
function parseArgs(argv, defaults) {
  const options = { ...defaults };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith("--")) {
      options[argv[i].slice(2)] = argv[++i];
    } else {
      rest.push(argv[i]);
    }
  }
  return { options, rest };
}

module.exports = { parseArgs, validator };
