// A small static server for www/ (Node only): the visualiser's local server and the e2e
// tests' server. Besides www/ it serves the shipped scenarios of tests/scenarios/ read-only
// under /scenarios/shipped/ (index.json lists them), so that the page can replay them, and,
// when asked, the npm package under /npm/ (the e2e check that runs the driven sender in the
// browser imports it from there, as a bundler would).

import { createServer } from 'node:http';
import { createReadStream, readdirSync, statSync } from 'node:fs';
import { extname, join, resolve, sep } from 'node:path';

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.jsonl': 'application/jsonl',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ts': 'text/plain; charset=utf-8',
};

const SHIPPED = '/scenarios/shipped/';
const NPM = '/npm/';

/** Names of the shipped scenario files (NAME.json with no `bad/`), sorted. */
export function shippedScenarios(dir) {
  return readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
}

/**
 * Serves `www` (and `scenarios` under /scenarios/shipped/, `npm` under /npm/) on `host` and
 * `port` (0: a free one). Resolves to { server, url }.
 */
export function serve(www, { scenarios, npm, host = '127.0.0.1', port = 0 } = {}) {
  const root = resolve(www);
  const server = createServer((req, res) => {
    let path;
    try {
      path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    } catch {
      res.writeHead(400).end();
      return;
    }
    let dir = root;
    let rel = path;
    if (npm && path.startsWith(NPM)) {
      dir = resolve(npm);
      rel = `/${path.slice(NPM.length)}`;
    } else if (scenarios && path.startsWith(SHIPPED)) {
      dir = resolve(scenarios);
      rel = `/${path.slice(SHIPPED.length)}`;
      if (rel === '/index.json') {
        res.writeHead(200, { 'content-type': MIME['.json'], 'cache-control': 'no-store' })
          .end(JSON.stringify(shippedScenarios(dir)));
        return;
      }
    }
    let file = resolve(dir, `.${rel}`);
    if (file !== dir && !file.startsWith(dir + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      if (statSync(file).isDirectory()) file = join(file, 'index.html');
      statSync(file);
    } catch {
      res.writeHead(404, { 'content-type': 'text/plain' }).end(`not found: ${path}\n`);
      return;
    }
    res.writeHead(200, {
      'content-type': MIME[extname(file)] ?? 'application/octet-stream',
      'cache-control': 'no-store',
    });
    createReadStream(file).pipe(res);
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(port, host, () => ok({ server, url: `http://${host}:${server.address().port}/` }));
  });
}
