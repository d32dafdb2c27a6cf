#!/usr/bin/env node
// A minimal JavaScript homeserver's federation sending with fedsend: real HTTPS, real X-Matrix
// signatures. It starts a fake remote homeserver on a loopback HTTPS port (certificate:
// remote-cert.pem, a test-only self-signed one for 127.0.0.1), sends it a room event and a
// to-device message, and checks that the remote received both with valid signatures.
// The remote refuses the first transaction with 503, to show a retry. Exit 0 on delivery.
//
//   node examples/send.mjs

import https from 'node:https';
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { FederationSender, MemoryStore, SigningKey, verifyJson } from 'fedsend';

const CERT = readFileSync(new URL('remote-cert.pem', import.meta.url));
const ORIGIN = 'example.org';
const ROOM = '!room:example.org';

// ----- the remote: checks the X-Matrix header, records what arrives -----

function startRemote(publicKeyBase64) {
  const received = { pdus: [], edus: [], requests: 0 };
  const server = https.createServer({ key: readFileSync(new URL('remote-key.pem', import.meta.url)), cert: CERT });
  server.on('request', (req, res) => {
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', () => {
      received.requests++;
      const answer = (status, json) => res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(json));
      const auth = /^X-Matrix origin="([^"]+)",destination="([^"]+)",key="([^"]+)",sig="([^"]+)"$/.exec(req.headers.authorization ?? '');
      if (req.method !== 'PUT' || !req.url.startsWith('/_matrix/federation/v1/send/') || !auth) {
        return answer(401, { errcode: 'M_UNAUTHORIZED' });
      }
      const [, origin, destination, keyId, sig] = auth;
      const content = JSON.parse(body);
      try {
        const request = { method: req.method, uri: req.url, origin, destination, content, signatures: { [origin]: { [keyId]: sig } } };
        verifyJson(request, origin, keyId, publicKeyBase64);
      } catch (e) {
        return answer(401, { errcode: 'M_UNAUTHORIZED', error: e.message });
      }
      if (received.requests === 1) return answer(503, { errcode: 'M_UNKNOWN', error: 'warming up' });
      received.pdus.push(...(content.pdus ?? []));
      received.edus.push(...(content.edus ?? []));
      answer(200, { pdus: Object.fromEntries((content.pdus ?? []).map((p) => [p.event_id, {}])) });
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, received, port: server.address().port })));
}

// ----- the homeserver side: a transport over node:https, events in memory -----

const agent = new https.Agent({ ca: CERT, keepAlive: true });

function sendTransaction(destination, txnId, body, authorization, { signal }) {
  // A real homeserver resolves `destination` through .well-known and SRV; here it is
  // host:port already.
  return new Promise((resolve, reject) => {
    const req = https.request(
      `https://${destination}/_matrix/federation/v1/send/${encodeURIComponent(txnId)}`,
      { method: 'PUT', agent, signal, headers: { 'content-type': 'application/json', authorization } },
      (res) => {
        let text = '';
        res.on('data', (chunk) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode, body: text }));
      },
    );
    req.on('error', reject); // ECONNREFUSED and friends: mapped to `unreachable`
    req.end(body);
  });
}

const signingKey = SigningKey.fromSeedBytes('ed25519:a1', randomBytes(32));
const remote = await startRemote(signingKey.publicKeyBase64);
const REMOTE = `127.0.0.1:${remote.port}`;

const events = [];
const homeserver = {
  fetchEvents: ({ after, limit }) => events.filter((e) => e.stream_ordering > after).slice(0, limit),
  loadCatchUp: ({ rows }) =>
    rows.map(({ room_id, stream_ordering }) => {
      const e = events.find((x) => x.stream_ordering === stream_ordering);
      return { room_id, stream_ordering, event_id: e.event_id, pdu: e.pdu };
    }),
};

const sender = await FederationSender.start({
  config: { server_name: ORIGIN, http_retry_delay_max_ms: 200 },
  transport: { sendTransaction },
  homeserver,
  store: new MemoryStore(),
  signingKey,
  onEvent: (e) => console.log('event:', JSON.stringify(e)),
  onError: (e) => console.error('error:', e.message),
});

const pdu = { event_id: '$hello', room_id: ROOM, sender: '@alice:example.org', type: 'm.room.message', content: { body: 'hello over federation' } };
events.push({ event_id: pdu.event_id, room_id: ROOM, stream_ordering: 1, sender: pdu.sender, hosts: [ORIGIN, REMOTE], pdu });
await sender.newEvents(1);
await sender.sendToDevice({
  sender: '@alice:example.org',
  message_type: 'm.room_key_request',
  message_id: 'req-1',
  messages: { [`@bob:${REMOTE}`]: { BOBDEVICE: { action: 'request_cancellation', request_id: 'r1', requesting_device_id: 'ALICE' } } },
});
console.log('to-device message durable in the outbox');

const deadline = Date.now() + 10_000;
while (Date.now() < deadline && !(remote.received.pdus.length && remote.received.edus.length)) {
  await new Promise((resolve) => setTimeout(resolve, 20));
}
await sender.close();
agent.destroy();
remote.server.close();

const ok =
  remote.received.pdus.some((p) => p.event_id === '$hello') &&
  remote.received.edus.some((e) => e.edu_type === 'm.direct_to_device' && e.content.message_id === 'req-1') &&
  remote.received.requests >= 2;
console.log(
  ok
    ? `delivered to ${REMOTE} over HTTPS: ${remote.received.pdus.length} PDU, ${remote.received.edus.length} EDU, ${remote.received.requests} signed requests (the first answered 503)`
    : `NOT delivered: ${JSON.stringify(remote.received)}`,
);
process.exitCode = ok ? 0 : 1;
