// The package as users get it: `npm pack`, installed into an empty directory, used from plain
// ESM (including the README's quick start, verbatim) and from TypeScript (`tsc --noEmit`).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from './helpers.mjs';

const PACKAGE = fileURLToPath(new URL('..', import.meta.url));
const TSC = fileURLToPath(new URL('../../tools/node/node_modules/typescript/bin/tsc', import.meta.url));

function run(cmd, args, cwd) {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout: 120_000 });
  return { ...r, output: `${r.stdout}${r.stderr}` };
}

const CONSUMER_MJS = `
import { Machine, FederationSender, MemoryStore, SigningKey, canonicalJson, ConfigError } from 'fedsend';
import { SqliteStore } from 'fedsend/sqlite';
const m = new Machine({ server_name: 'example.org' });
m.handleInput(1700000000000, { type: 'timeout' });
const types = [];
for (let o; (o = m.pollOutput()) !== undefined; ) types.push(o.type);
m.free();
let noSqlite = '';
try { await SqliteStore.open('x.db'); } catch (e) { noSqlite = e.code + ' ' + /npm install better-sqlite3@12/.test(e.message); }
let refused = '';
try { new Machine({ server_name: 1 }); } catch (e) { refused = e instanceof ConfigError ? e.code : 'wrong class'; }
console.log(JSON.stringify({
  types,
  refused,
  noSqlite,
  canonical: canonicalJson({ b: 1, a: 2 }),
  key: SigningKey.fromSeedBase64('ed25519:1', 'YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1').publicKeyBase64,
  classes: [typeof FederationSender, typeof MemoryStore, typeof SqliteStore],
}));
`;

const CONSUMER_TS = `
import { FederationSender, Machine, MemoryStore, type Output, type Input, type TransactionResult, type Event, type DestinationStats, type Config, type DeviceListPoke, type DeviceListPosition, type CommandInput, type SendTransactionOutput, type Json } from 'fedsend';
import { SqliteStore } from 'fedsend/sqlite';

function describeOutput(o: Output): string {
  switch (o.type) {
    case 'send_transaction': return \`\${o.destination} \${o.txn_id} \${o.body.length}\`;
    case 'fetch_events': return \`after \${o.after}\`;
    case 'load_catch_up': return o.destination;
    case 'load_outstanding': return String(o.after);
    case 'persist': return String(o.changes.incarnation ?? '');
    case 'event': return describeEvent(o.event);
  }
}
function describeEvent(e: Event): string {
  switch (e.event) {
    case 'backing_off': return String(e.until_ts);
    case 'storage_retry': return e.error;
    default: return e.event;
  }
}
const result: TransactionResult = { outcome: 'status', status: 429, retry_after_ms: 1000 };
const input: Input = { type: 'transaction_done', request: 1, result };
const config: Config = { server_name: 'example.org', retry_interval_min_ms: 1000 };
const m = new Machine(config);
m.handleInput(Date.now(), { type: 'timeout' });
const out: Output | undefined = m.pollOutput();
if (out) describeOutput(out);
const stats: DestinationStats[] = m.destinationStats();
const command: CommandInput = { type: 'edu', destination: 'remote.test', edu_type: 'm.x', content: [1, { a: null }] satisfies Json };
const sent: SendTransactionOutput | undefined = out?.type === 'send_transaction' ? out : undefined;
void stats; void input; void command; void sent;
async function main(): Promise<void> {
  const sender = await FederationSender.start({
    config,
    transport: { sendTransaction: async (_d: string, _t: string, _b: string, _a: string | undefined) => ({ status: 200, body: '{}' }) },
    homeserver: { fetchEvents: () => [], loadCatchUp: () => [] },
    store: new MemoryStore(),
    onError: (e) => console.error(e.code, e.message),
  });
  await sender.sendEdu({ destination: 'remote.test', edu_type: 'm.x', content: { a: 1 } });
  await sender.sendDeviceListUpdate({ user_id: '@a:example.org', device_id: 'D', stream_id: 2, keys: { k: 1 }, destinations: ['remote.test'] });
  await sender.sendSigningKeyUpdate({ user_id: '@a:example.org', stream_id: 3, master_key: { usage: ['master'] }, destinations: ['remote.test'] });
  const pokes: DeviceListPoke[] = (await new MemoryStore().loadRecovered()).device_list_pokes ?? [];
  const position: DeviceListPosition = { destination: 'remote.test', user_id: '@a:example.org', stream_id: null };
  void pokes; void position;
  await sender.close();
  const sqlite: Promise<SqliteStore> = SqliteStore.open('x.db');
  void sqlite;
}
void main;
`;

const BAD_TS = `
import { FederationSender, type Output } from 'fedsend';
declare const sender: FederationSender;
sender.sendEdu({ destination: 42, edu_type: 'm.x', content: {} });
declare const o: Output;
if (o.type === 'persist') console.log(o.txn_id);
`;

test('npm pack → install into an empty directory → plain ESM, the README quick start, and tsc --noEmit', (t) => {
  const dir = tempDir(t, 'fedsend-pack-');
  const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', dir], { cwd: PACKAGE, encoding: 'utf8' }));
  const files = packed[0].files.map((f) => f.path).sort();
  for (const f of ['dist/fedsend_wasm.js', 'dist/fedsend_wasm_bg.wasm', 'index.d.ts', 'types.d.ts', 'sqlite.d.ts', 'src/node.js', 'src/browser.js', 'src/sqlite.js', 'package.json', 'README.md']) {
    assert.ok(files.includes(f), `the tarball has ${f}: ${files}`);
  }
  assert.ok(!files.some((f) => f.startsWith('test/')), 'tests are not shipped');
  const tarball = join(dir, packed[0].filename);

  const app = join(dir, 'app');
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  const install = run('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error', tarball], app);
  assert.equal(install.status, 0, install.output);
  assert.deepEqual(readdirSync(join(app, 'node_modules')).filter((f) => !f.startsWith('.')), ['fedsend'], 'no dependencies pulled in');

  writeFileSync(join(app, 'consumer.mjs'), CONSUMER_MJS);
  const esm = run(process.execPath, ['consumer.mjs'], app);
  assert.equal(esm.status, 0, esm.output);
  assert.deepEqual(JSON.parse(esm.stdout), {
    types: ['persist', 'fetch_events', 'load_outstanding'],
    refused: 'ERR_FEDSEND_CONFIG',
    noSqlite: 'ERR_FEDSEND_CONFIG true',
    canonical: '{"a":2,"b":1}',
    key: 'XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI',
    classes: ['function', 'function', 'function'],
  });

  const readme = readFileSync(join(app, 'node_modules/fedsend/README.md'), 'utf8');
  const quickstart = /## Quick start[\s\S]*?```js\n([\s\S]*?)```/.exec(readme)[1];
  writeFileSync(join(app, 'quickstart.mjs'), quickstart);
  const qs = run(process.execPath, ['quickstart.mjs'], app);
  assert.equal(qs.status, 0, qs.output);
  assert.match(qs.stdout, /remote\.test 1\.\d+: \$1/);
  assert.match(qs.stdout, /^idle$/m);

  writeFileSync(
    join(app, 'tsconfig.json'),
    JSON.stringify({ compilerOptions: { strict: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', noEmit: true, skipLibCheck: false, lib: ['es2022', 'dom'], types: [] }, files: ['consumer.ts'] }),
  );
  writeFileSync(join(app, 'consumer.ts'), CONSUMER_TS);
  const tsc = run(process.execPath, [TSC, '--noEmit', '-p', '.'], app);
  assert.equal(tsc.status, 0, tsc.output);

  // The declarations are precise enough to catch mistakes.
  writeFileSync(join(app, 'bad.ts'), BAD_TS);
  writeFileSync(join(app, 'tsconfig.bad.json'), JSON.stringify({ extends: './tsconfig.json', files: ['bad.ts'] }));
  const bad = run(process.execPath, [TSC, '--noEmit', '-p', 'tsconfig.bad.json'], app);
  assert.notEqual(bad.status, 0);
  assert.match(bad.output, /bad\.ts\(4,\d+\): error TS2322: Type 'number' is not assignable to type 'string'/);
  assert.match(bad.output, /bad\.ts\(6,\d+\): error TS2339: Property 'txn_id' does not exist/);
});
