#!/usr/bin/env python3
"""Many remote homeservers in one process, each `127.0.0.1:PORT` over HTTPS, that answer at once.

Started by worker_side_by_side.py as a child process, so that their work (TLS, parsing every
transaction) is not counted in the sender under test and does not share the driver's GIL.

Each remote is described by a line of the `--remotes` JSON file: its port, a Synapse-format
signing-key file and a certificate/key pair (as `interop/harness.Origin` writes them; the driver
uses those Origins to join the remotes to rooms through make_join/send_join, and a joining
server must serve its key). Every remote:

* serves its signed key at `GET /_matrix/key/v2/server` (the main process fetches it to verify
  the send_join event);
* answers `PUT /_matrix/federation/v1/send/{txn}` with 200 `{"pdus": {}}` as soon as the body is
  read, and records the PDUs whose `content.body` is a marker `GROUP-INDEX` (the driver's burst
  events). A transaction id seen before on the same remote is answered without being counted
  again, as a receiving server deduplicates transactions; it is counted as repeated;
* gives empty answers to the device-list and key queries a homeserver makes about new members.

A plain-HTTP control port (`GET /_bench/stats`, `GET /_bench/missing`, `POST /_bench/phase`)
reports per remote and marker group: distinct markers, duplicate PDUs, the transactions that
carried them, and the time (CLOCK_MONOTONIC, comparable with the driver's `time.monotonic()`)
of the last marker first seen. When all sockets listen it writes `{"control_port": N}` to the
`--ready` file. `--transcript FILE` adds a line per transaction received (for finding out how a
miss or a duplicate came about).
"""

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
import urllib.parse

from canonicaljson import encode_canonical_json
from signedjson.key import encode_verify_key_base64, get_verify_key, read_signing_keys
from signedjson.sign import sign_json

HEADER_LIMIT = 64 * 1024
BODY_LIMIT = 64 * 1024 * 1024  # Synapse's own limit on a federation request body is far lower
IDLE_TIMEOUT_S = 300  # a kept-alive connection nobody uses is closed after this
FED = "/_matrix/federation/v1/"


class Remote:
    def __init__(self, spec):
        self.port = spec["port"]
        self.server_name = f"127.0.0.1:{self.port}"
        with open(spec["signing_key_path"]) as f:
            self.key = read_signing_keys(f)[0]
        self.key_id = f"{self.key.alg}:{self.key.version}"
        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl.load_cert_chain(spec["cert_path"], spec["cert_key_path"])
        self.txn_ids = set()
        self.seen = {}  # marker -> times received
        self.groups = {}  # marker group -> counters (see `group`)
        self.phases = {}  # phase -> {"txns", "pdus", "edus", "repeated_txns"}

    def group(self, name):
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = {"distinct": 0, "duplicates": 0, "txns": 0, "last_new": 0.0}
        return g

    def key_document(self):
        return sign_json(
            {
                "server_name": self.server_name,
                "valid_until_ts": int(time.time() * 1000) + 86_400_000,
                "verify_keys": {self.key_id: {"key": encode_verify_key_base64(get_verify_key(self.key))}},
                "old_verify_keys": {},
            },
            self.server_name,
            self.key,
        )


class Farm:
    def __init__(self, remotes, transcript):
        self.remotes = remotes
        self.transcript = transcript  # one line per transaction: what arrived where, in order
        self.phase = "setup"
        self.requests = 0
        self.last_request = 0.0  # monotonic
        self.errors = []  # requests we could not make sense of (the driver reports them)

    def phase_counters(self, remote):
        p = remote.phases.get(self.phase)
        if p is None:
            p = remote.phases[self.phase] = {"txns": 0, "pdus": 0, "edus": 0, "repeated_txns": 0}
        return p

    def on_send(self, remote, txn_id, body):
        p = self.phase_counters(remote)
        if txn_id in remote.txn_ids:
            p["repeated_txns"] += 1
            return
        remote.txn_ids.add(txn_id)
        txn = json.loads(body)
        pdus = txn.get("pdus") or []
        p["txns"] += 1
        p["pdus"] += len(pdus)
        p["edus"] += len(txn.get("edus") or [])
        now = time.monotonic()
        touched = set()
        markers = []
        for pdu in pdus:
            content = pdu.get("content")
            marker = content.get("body") if isinstance(content, dict) else None
            if not isinstance(marker, str) or "-" not in marker:
                # Not a burst event: its type and sender, for the transcript.
                markers.append(f"[{pdu.get('type')}:{pdu.get('sender')}]")
                continue
            name, _, index = marker.rpartition("-")
            if not index.isdigit():
                continue
            markers.append(marker)
            g = remote.group(name)
            n = remote.seen.get(marker, 0)
            remote.seen[marker] = n + 1
            if n:
                g["duplicates"] += 1
            else:
                g["distinct"] += 1
                g["last_new"] = now
            touched.add(name)
        for name in touched:
            remote.groups[name]["txns"] += 1
        if self.transcript:
            self.transcript.write(
                f"{now:.6f} {remote.port} {txn_id} pdus={len(pdus)} edus={len(txn.get('edus') or [])} {' '.join(markers)}\n"
            )

    def answer(self, remote, method, path, body):
        """(status, JSON body) for one federation request to `remote`."""
        if method == "PUT" and path.startswith(FED + "send/"):
            self.on_send(remote, urllib.parse.unquote(path[len(FED + "send/"):]), body)
            return 200, {"pdus": {}}
        if method == "GET" and path == "/_matrix/key/v2/server":
            return 200, remote.key_document()
        if method == "GET" and path.startswith(FED + "user/devices/"):
            user_id = urllib.parse.unquote(path[len(FED + "user/devices/"):])
            return 200, {"user_id": user_id, "stream_id": 0, "devices": []}
        if method == "POST" and path == FED + "user/keys/query":
            return 200, {"device_keys": {}}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "not served by the loopback remotes"}

    # -- control -------------------------------------------------------------------------

    def stats(self):
        return {
            "requests": self.requests,
            "last_request": self.last_request,
            "errors": self.errors[:20],
            "remotes": {
                str(r.port): {"groups": r.groups, "phases": r.phases} for r in self.remotes
            },
        }

    def missing(self, group, expect):
        """Per remote, the indexes of `group` it never received (first 20) and how many."""
        out = {}
        for r in self.remotes:
            lost = [i for i in range(expect) if f"{group}-{i}" not in r.seen]
            if lost:
                out[str(r.port)] = {"count": len(lost), "first": lost[:20]}
        return out

    def control(self, method, path, query):
        if method == "GET" and path == "/_bench/stats":
            return 200, self.stats()
        if method == "GET" and path == "/_bench/missing":
            return 200, self.missing(query["group"][0], int(query["expect"][0]))
        if method == "POST" and path == "/_bench/phase":
            self.phase = query["name"][0]
            return 200, {"phase": self.phase}
        return 404, {"error": "unknown control request"}


async def read_request(reader):
    """(method, target, headers, body) of the next request, or None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise ValueError("connection closed inside a request head") from None
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        n = int(headers.get("content-length") or 0)
        if n > BODY_LIMIT:
            raise ValueError(f"body of {n} bytes")
        body = await reader.readexactly(n) if n else b""
    return method, target, headers, body


def response(status, obj, close=False):
    data = encode_canonical_json(obj)
    reason = {200: "OK", 404: "Not Found", 400: "Bad Request"}.get(status, "Status")
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + data


def connection_handler(farm, remote):
    async def handle(reader, writer):
        try:
            while True:
                req = await asyncio.wait_for(read_request(reader), IDLE_TIMEOUT_S)
                if req is None:
                    break
                method, target, headers, body = req
                if remote is not None:
                    farm.requests += 1
                    farm.last_request = time.monotonic()
                url = urllib.parse.urlsplit(target)
                try:
                    if remote is None:
                        status, obj = farm.control(method, url.path, urllib.parse.parse_qs(url.query))
                    else:
                        status, obj = farm.answer(remote, method, url.path, body)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    farm.errors.append(f"{method} {url.path}: {type(e).__name__}: {e}")
                    status, obj = 400, {"errcode": "M_BAD_JSON", "error": str(e)}
                close = headers.get("connection", "").lower() == "close"
                writer.write(response(status, obj, close))
                await writer.drain()
                if close:
                    break
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            writer.close()

    return handle


async def main_async(args):
    with open(args.remotes) as f:
        specs = json.load(f)
    transcript = open(args.transcript, "w", buffering=1 << 16) if args.transcript else None
    farm = Farm([Remote(s) for s in specs], transcript)
    servers = []
    for r in farm.remotes:
        servers.append(
            await asyncio.start_server(
                connection_handler(farm, r), "127.0.0.1", r.port, ssl=r.ssl, limit=HEADER_LIMIT, backlog=256
            )
        )
    control = await asyncio.start_server(connection_handler(farm, None), "127.0.0.1", 0)
    servers.append(control)
    port = control.sockets[0].getsockname()[1]
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"control_port": port, "pid": os.getpid()}, f)
    os.replace(tmp, args.ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()
    if transcript:
        transcript.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remotes", required=True, help="JSON list of {port, signing_key_path, cert_path, cert_key_path}")
    parser.add_argument("--ready", required=True, help="file written once every socket listens")
    parser.add_argument("--transcript", help="write a line per transaction received: time, port, txn id, markers")
    args = parser.parse_args()
    try:
        asyncio.run(main_async(args))
    except OSError as e:
        sys.exit(f"loopback_remotes: {e}")


if __name__ == "__main__":
    main()
