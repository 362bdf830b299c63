"""Published ports against a real runtime's guest (microVM, pod): what both runtimes' tests run.

The servers run inside the sandbox on the guest's Python (stdlib only, as the microVM's default
image has): `http.server` serving a page and its asset, and a small stdlib WebSocket echo server
(RFC 6455 handshake and frames, written here). Each prints `listening` once its socket listens, so
the test starts requests when the guest says it is ready, not after a guess.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from typing import Any

import aiohttp

from gateway.ports import headers as hdr
from gateway.testing.conformance import AUTH, OTHER_AUTH, Gateway, WsClient

#: `python3 serve.py HTTP_PORT WS_PORT`: http.server on one port (files of /tmp/site), the
#: WebSocket echo on the other; `/big?mib=N` streams N MiB of a known pattern.
SERVER = r'''
import base64, hashlib, http.server, os, socket, struct, sys, threading

http_port, ws_port = int(sys.argv[1]), int(sys.argv[2])
os.makedirs("/tmp/site", exist_ok=True)
with open("/tmp/site/index.html", "w") as f:
    f.write('<html><script src="app.js"></script>preview page</html>')
with open("/tmp/site/app.js", "w") as f:
    f.write("console.log('asset')")

class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory="/tmp/site", **kwargs)

    def do_GET(self):
        if self.path.startswith("/big"):
            mib = int(self.path.split("mib=")[1])
            self.send_response(200)
            self.send_header("Content-Length", str(mib << 20))
            self.end_headers()
            block = bytes(range(256)) * 256
            for _ in range(mib * 16):
                self.wfile.write(block)
            return
        if self.path.startswith("/headers"):
            body = repr(sorted(self.headers.items())).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args):
        pass

def recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data

def send_frame(conn, opcode, payload):
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([len(payload)])
    elif len(payload) < 65536:
        head += bytes([126]) + struct.pack(">H", len(payload))
    else:
        head += bytes([127]) + struct.pack(">Q", len(payload))
    conn.sendall(head + payload)

def websocket(conn):
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    headers = dict(line.split(": ", 1) for line in request.decode().split("\r\n")[1:] if ": " in line)
    accept = base64.b64encode(hashlib.sha1((headers["Sec-WebSocket-Key"]
                                            + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
    while True:
        first, second = recv_exact(conn, 2)
        opcode, length = first & 0x0F, second & 0x7F
        if length == 126:
            length = struct.unpack(">H", recv_exact(conn, 2))[0]
        elif length == 127:
            length = struct.unpack(">Q", recv_exact(conn, 8))[0]
        mask = recv_exact(conn, 4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(recv_exact(conn, length)))
        if opcode == 1:
            if payload == b"close-me":
                send_frame(conn, 8, struct.pack(">H", 4002) + b"bye from guest")
            else:
                send_frame(conn, 1, b"echo:" + payload)
        elif opcode == 2:
            send_frame(conn, 2, payload[::-1])
        elif opcode == 8:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
            with open("/tmp/ws-close-code", "w") as f:
                f.write(str(code))
            send_frame(conn, 8, payload[:2])
            return

def serve_websockets(listener):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=lambda c=conn: (websocket(c), c.close()), daemon=True).start()

httpd = http.server.ThreadingHTTPServer(("127.0.0.1", http_port), Handler)
ws_listener = socket.create_server(("127.0.0.1", ws_port))
threading.Thread(target=serve_websockets, args=(ws_listener,), daemon=True).start()
print("listening", flush=True)
httpd.serve_forever()
'''


async def start_servers(gateway: Gateway, sandbox_id: str, http_port: int, ws_port: int) -> WsClient:
    """Write the servers into the sandbox and start them; returns once the guest says they listen
    (the session that started them stays open: closing it would not stop them, but keeps the test
    honest about what runs)."""
    resp = await gateway.client.put(f"/v1/sandboxes/{sandbox_id}/files/serve.py", data=SERVER.encode(), headers=AUTH)
    assert resp.status == 201, await resp.text()
    ws = await gateway.ws(sandbox_id)
    request_id = await ws.send("exec.start", command=["python3", "serve.py", str(http_port), str(ws_port)])
    out = b""
    while b"listening" not in out:
        message = await ws.receive_for(request_id)
        assert message.get("ev") != "end" and "error" not in message, message
        if message.get("ev") == "data":
            out += message["data"]
    return ws


async def check_ports(gateway: Gateway, sandbox: dict[str, Any], http_port: int, ws_port: int) -> None:
    """The issue's cases for published ports, through the real gateway, against the guest's servers."""
    client = gateway.client
    sid = sandbox["id"]
    (published,) = sandbox["ports"]  # http_port, published at create
    assert published["port"] == http_port
    url, token = published["url"], published["token"]
    await start_servers(gateway, sid, http_port, ws_port)

    # The tenant's key.
    page = await client.get(url, headers=AUTH)
    assert page.status == 200 and "preview page" in await page.text()
    seen = await (await client.get(f"{url}headers", headers={**AUTH, "Cookie": "app=1"})).text()
    assert "Authorization" not in seen and f"'Host', 'localhost:{http_port}'" in seen
    assert f"'X-Forwarded-Prefix', '{url.rstrip('/')}'" in seen and "'Cookie', 'app=1'" in seen

    # The token: a browser's exchange, then the cookie alone loads the page's asset.
    async with aiohttp.ClientSession(base_url=str(client.make_url("/")),
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        exchange = await browser.get(f"{url}?token={token}", allow_redirects=False)
        assert exchange.status == 303 and exchange.headers["Location"] == url
        assert "HttpOnly" in exchange.headers["Set-Cookie"] and "SameSite=Lax" in exchange.headers["Set-Cookie"]
        page = await browser.get(url)
        assert page.status == 200 and "preview page" in await page.text()
        asset = await browser.get(f"{url}app.js")
        assert asset.status == 200 and await asset.text() == "console.log('asset')"

    # Refused: no credential, a wrong token (401, whether or not the sandbox exists), another tenant (404).
    assert (await client.get(url)).status == 401
    assert (await client.get(f"{url}?token=wrong")).status == 401
    assert (await client.get(url, headers={"Cookie": f"{hdr.PORT_COOKIE}=wrong"})).status == 401
    assert (await client.get(url, headers=OTHER_AUTH)).status == 404

    # A WebSocket echo in the guest: text, binary, the client's close code reaches the guest, and
    # the guest's reaches the client.
    ws_published = await (await client.post(f"/v1/sandboxes/{sid}/ports", json={"port": ws_port},
                                             headers=AUTH)).json()
    ws = await client.ws_connect(f"{ws_published['url']}?token={ws_published['token']}")
    await ws.send_str("hello")
    assert await ws.receive_str() == "echo:hello"
    await ws.send_bytes(bytes(range(256)) * 300)
    assert await ws.receive_bytes() == (bytes(range(256)) * 300)[::-1]
    await ws.close(code=4001, message=b"done")
    closed = await client.get(f"/v1/sandboxes/{sid}/files?path=/tmp/ws-close-code", headers=AUTH)
    assert await closed.text() == "4001"
    ws = await client.ws_connect(ws_published["url"], headers=AUTH)
    await ws.send_str("close-me")
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4002 and msg.extra == "bye from guest"
    await ws.close()

    # A large response to a slow reader: every byte arrives, and the gateway's memory stays bounded.
    mib = 16
    tracemalloc.start()
    try:
        big = await client.get(f"{url}big?mib={mib}", headers=AUTH)
        digest, received = hashlib.sha256(), 0
        while chunk := await big.content.read(8 << 10):
            digest.update(chunk)
            received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == mib << 20
    assert digest.hexdigest() == hashlib.sha256(bytes(range(256)) * 256 * 16 * mib).hexdigest()
    assert peak < 8 << 20, f"peak traced memory {peak >> 20} MiB for a {mib} MiB response"

    # Unpublish: the token stops working, the key finds no port.
    assert (await client.delete(f"/v1/sandboxes/{sid}/ports/{http_port}", headers=AUTH)).status == 204
    assert (await client.get(f"{url}?token={token}", allow_redirects=False)).status == 401
    assert (await client.get(url, headers=AUTH)).status == 404
