// Builds @classmesh/web and the classroom page, from the repository's pinned toolchain:
//   1. tsc -p tsconfig.json        type check, dist/*.js + .d.ts (the package)
//   2. tsc -p tsconfig.page.json   type check of the page against the package
//   3. esbuild                     dist/classmesh-web.js (self-contained ESM browser bundle)
//                                  servers/classmesh/gateway/static/app.js (the page bundle)
// Both bundles are build output (git-ignored): `make web` (run by `make gen`, `make run` and
// `make test`) and the browser tests build them. The output is deterministic.
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const bin = (name) => join(root, "node_modules", ".bin", name);
const pageOut = join(root, "servers/classmesh/gateway/static/app.js");

function tsc(project) {
  try {
    execFileSync(bin("tsc"), ["-p", join(here, project)], { stdio: "inherit", cwd: root });
  } catch {
    console.error(`tsc -p sdk/web/${project} failed`);
    process.exit(1);
  }
}

tsc("tsconfig.json");
tsc("tsconfig.page.json");

const common = {
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  absWorkingDir: root,
  logLevel: "warning",
  legalComments: "none",
  charset: "utf8",
  write: false,
};

const [lib, page] = await Promise.all([
  esbuild.build({
    ...common,
    entryPoints: [join(here, "src/index.ts")],
    outfile: join(here, "dist/classmesh-web.js"),
    minify: true,
    sourcemap: true,
  }),
  esbuild.build({
    ...common,
    entryPoints: [join(here, "page/app.ts")],
    outfile: pageOut,
    minify: true,
    sourcemap: "linked",
    banner: {
      js: "// Built by sdk/web/build.mjs from sdk/web/page/app.ts and sdk/web/src (esbuild); do not edit.",
    },
  }),
]);

for (const file of [...page.outputFiles, ...lib.outputFiles]) {
  mkdirSync(dirname(file.path), { recursive: true });
  writeFileSync(file.path, file.contents);
  console.log(`${relative(root, file.path)}: ${file.contents.length} bytes`);
}
