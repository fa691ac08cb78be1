"""A real HTTP server on 127.0.0.1 serving images and the faults of the web. A route is bytes (a JPEG, served as
image/jpeg), or a function of the request handler. Used by the streamer tests and by bench.py."""
import collections
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def jpeg(w, h, seed=0, quality=90, **save):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)  # smooth, photo-like
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, 'JPEG', quality=quality, **save)
    return buf.getvalue()


def encode(img, fmt, **save):
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_header_only(w, h):
    """A PNG that declares w x h pixels in a few dozen bytes: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def send(h, body, ctype='image/jpeg', status=200, headers=()):
    h.send_response(status)
    h.send_header('Content-Type', ctype)
    h.send_header('Content-Length', str(len(body)))
    for k, v in headers:
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def status(code):
    return lambda h: send(h, b'no', 'text/plain', code)


def hang(h):
    time.sleep(20)


def drip(h):  # headers at once, then a byte every 50 ms: never a socket timeout, never done
    h.send_response(200)
    h.send_header('Content-Type', 'image/jpeg')
    h.send_header('Content-Length', '1000000')
    h.end_headers()
    for _ in range(400):
        h.wfile.write(b'\xff')
        h.wfile.flush()
        time.sleep(0.05)


def endless(h):  # an unbounded body as fast as the socket takes it
    h.send_response(200)
    h.send_header('Content-Type', 'image/jpeg')
    h.send_header('Connection', 'close')
    h.end_headers()
    block, end = b'\0' * 65536, time.time() + 20
    while time.time() < end:
        h.wfile.write(block)


def redirect(to):
    def route(h):
        h.send_response(302)
        h.send_header('Location', to)
        h.send_header('Content-Length', '0')
        h.end_headers()
    return route


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # not 5: every fetch thread's connect waits, even while a busy CPU starves accept()


def start(routes, tls=None):
    """Serve routes on a free loopback port; returns (base_url, hits per path, server). tls: an ssl.SSLContext to
    serve https with."""
    hits = collections.Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'  # keep-alive, as real servers do

        def do_GET(self):
            hits[self.path] += 1
            route = routes.get(self.path)
            try:
                if route is None:
                    send(self, b'not found', 'text/plain', 404)
                elif isinstance(route, bytes):
                    send(self, route)
                else:
                    route(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        def log_message(self, *args):
            pass

    server = Server(('127.0.0.1', 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # clients hanging up mid-request is what the faults test
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", hits, server
