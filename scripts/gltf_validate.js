// The Khronos glTF validator on one file: prints {errors, warnings, infos, messages} as JSON and
// exits 1 when there are errors. `make setup` installs the validator into .tools/gltf (npm).
//   NODE_PATH=.tools/gltf/node_modules node scripts/gltf_validate.js model.glb
const validator = require('gltf-validator');
const fs = require('fs');
const data = new Uint8Array(fs.readFileSync(process.argv[2]));
validator.validateBytes(data).then((r) => {
  const messages = r.issues.messages.slice(0, 20).map((m) => `${m.severity} ${m.code} ${m.message} ${m.pointer || ''}`);
  console.log(JSON.stringify({ errors: r.issues.numErrors, warnings: r.issues.numWarnings, infos: r.issues.numInfos,
                               hints: r.issues.numHints, messages }));
  process.exit(r.issues.numErrors ? 1 : 0);
}).catch((e) => { console.error(String(e)); process.exit(2); });
