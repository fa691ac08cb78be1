"""
Images from the hostile web, for data.py's streamer. Real LAION is hostile (dead links, hangs, HTML named .jpg, pixel
bombs, hosts that resolve into the training cluster's network, DNS answers that change between a check and a
connection), so fetch() has a total deadline and a byte cap and connects only to public addresses it has checked,
and decode() checks untrusted bytes before decoding them. A sample that cannot be used
raises Skip(reason), counted under its reason and skipped. Also here: the aspect-ratio buckets decode() resizes to,
and the row sources (JSON-lines and webdataset tar shards, local or over http).
"""
import glob
import io
import ipaddress
import json
import math
import re
import socket
import tarfile
import threading
import time
import urllib.parse

import requests
import urllib3
from PIL import Image, ImageOps
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

REASONS = ('bad_url', 'private_address', 'http_error', 'connection', 'timeout', 'too_large', 'redirect_loop',
           'robots_noai', 'not_an_image', 'pixel_bomb', 'too_small', 'bad_shard')
Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours, checked from the header before any decoding


class Skip(Exception):  # a sample that cannot be used; args[0] is one of REASONS
    pass


POLICY = threading.local()  # fetch() sets allow_private here for the connections its thread opens


class CheckedConnection:
    """Mixed into urllib3's HTTP(S) connections: resolve the host once, refuse the connection when any of its
    addresses is private, loopback or link-local (unless allow_private), and connect to the very address that was
    checked. A DNS answer that changes afterwards (DNS rebinding) reaches nothing, on every redirect hop and every new
    connection; a reused connection goes on to the address it was opened to. TLS wraps this socket as usual:
    certificate and host name are verified against the URL's host."""
    allow_private = False

    def _new_conn(self):
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise Skip('connection')  # not retried: a dead domain stays dead
        if not self.allow_private and any(not ipaddress.ip_address(i[4][0].split('%')[0]).is_global for i in infos):
            raise Skip('private_address')
        error = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                if isinstance(self.timeout, (int, float)):
                    sock.settimeout(self.timeout)
                sock.connect(address)  # the checked address itself: no second lookup
                return sock
            except OSError as e:
                sock.close()
                error = e
        if isinstance(error, TimeoutError):
            raise urllib3.exceptions.ConnectTimeoutError(self, f'connecting to {self.host} timed out')
        raise urllib3.exceptions.NewConnectionError(self, f'failed to connect to {self.host}: {error}')


class CheckedAdapter(HTTPAdapter):
    """requests' adapter over CheckedConnection, with a pool manager per policy, so that a connection opened to a
    private address where that was allowed is never reused where it is not."""

    def init_poolmanager(self, connections, maxsize, block=False, **kw):
        self.managers = [urllib3.PoolManager(num_pools=connections, maxsize=maxsize, block=block, **kw)
                         for _ in range(2)]
        for allow, manager in enumerate(self.managers):
            manager.pool_classes_by_scheme = {
                scheme: type(pool.__name__, (pool,), {'ConnectionCls': type(
                    'Checked' + pool.ConnectionCls.__name__, (CheckedConnection, pool.ConnectionCls),
                    {'allow_private': bool(allow)})})
                for scheme, pool in manager.pool_classes_by_scheme.items()}
        self.poolmanager = self.managers[0]

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        # no proxies: every connection is one this process checked
        host, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        return self.managers[getattr(POLICY, 'allow_private', False)].connection_from_host(**host,
                                                                                           pool_kwargs=pool_kwargs)


def session(threads):
    """Connections reused across fetches, each checked when opened; retries with backoff for 429, 5xx and failed
    connects only (a read timeout is a hang: not retried), never honouring a Retry-After that would stall the
    stream."""
    s = requests.Session()
    s.trust_env = False  # no proxies from the environment: the address check must see the real peer
    retry = Retry(total=2, connect=2, read=False, redirect=0, status=2, status_forcelist=(429, 500, 502, 503, 504),
                  backoff_factor=0.25, backoff_max=1.0, respect_retry_after_header=False, raise_on_status=False)
    for prefix in ('http://', 'https://'):
        s.mount(prefix, CheckedAdapter(max_retries=retry, pool_maxsize=threads))
    s.headers['User-Agent'] = 'flowdit/1.0 (image-text research; honours X-Robots-Tag noai)'
    return s


def fetch(session, url, deadline, max_bytes, allow_private, honor_robots, max_redirects=5):
    """The body of url within `deadline` seconds in all (a hang or a slow drip is cut off), or Skip(reason). The
    connection checks the address it connects to (CheckedConnection); a session that is not session()'s gets its
    adapters."""
    if not isinstance(session.get_adapter('https://'), CheckedAdapter):
        for prefix in ('http://', 'https://'):
            session.mount(prefix, CheckedAdapter())
    POLICY.allow_private = allow_private
    end = time.monotonic() + deadline
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise Skip('bad_url')
        left = end - time.monotonic()
        if left <= 0:
            raise Skip('timeout')
        try:
            r = session.get(url, stream=True, timeout=(left / 2, left / 2), allow_redirects=False)
        except requests.exceptions.Timeout:
            raise Skip('timeout')
        except (requests.exceptions.RequestException, ValueError):
            raise Skip('connection')
        with r:
            if r.is_redirect:  # followed by hand, so that every hop's connection is checked
                url = urllib.parse.urljoin(url, r.headers['location'])
                continue
            if r.status_code != 200:
                raise Skip('http_error')
            robots = re.split(r'[\s,:]+', r.headers.get('x-robots-tag', '').lower())  # 'noai', 'googlebot: noai'
            if honor_robots and {'noai', 'noimageai'} & set(robots):
                raise Skip('robots_noai')
            if int(r.headers.get('content-length') or 0) > max_bytes:
                raise Skip('too_large')
            body = bytearray()
            try:
                while len(body) <= max_bytes:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise Skip('timeout')
                    if r.raw.connection and r.raw.connection.sock:
                        r.raw.connection.sock.settimeout(left)  # no single read outlives the deadline
                    chunk = r.raw.read1(65536)
                    if not chunk:
                        return bytes(body)
                    body += chunk
                raise Skip('too_large')
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
                raise Skip('timeout')
            except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError):
                raise Skip('connection')
    raise Skip('redirect_loop')


def decode(content, size, max_pixels, min_size, buckets=None):
    """Raw bytes -> RGB image just covering the bucket nearest its aspect ratio, or Skip(reason). buckets: (height,
    width) pairs; by default the square of side `size` alone, which the image covers with its shorter side."""
    try:
        im = Image.open(io.BytesIO(content))  # reads the header only
    except Exception:  # HTML served as image/jpeg, unknown formats
        raise Skip('not_an_image')
    if im.width * im.height > max_pixels:
        raise Skip('pixel_bomb')
    if min(im.size) < min_size:
        raise Skip('too_small')
    try:
        im.draft('RGB', (size, size))  # JPEG: decode at a power-of-two reduction no smaller than needed
        im = ImageOps.exif_transpose(im)
        if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16-bit grayscale: keep the high byte
            im = im.point(lambda v: v / 256).convert('L')
        if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
            im = im.convert('RGBA')  # matte alpha onto white
            im = Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im)
        im = im.convert('RGB')  # CMYK, palette, grayscale
    except Exception:  # truncated or corrupt data
        raise Skip('not_an_image')
    bh, bw = nearest_bucket(im.height, im.width, buckets or [(size, size)])
    scale = max(bh / im.height, bw / im.width)
    return im.resize((max(bw, round(im.width * scale)), max(bh, round(im.height * scale))), Image.BICUBIC,
                     reducing_gap=3.0)


# ----------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets: a few (height, width) sizes of about the same area. Each image goes to the one nearest its
# aspect ratio, which crops least, and every batch is drawn from one bucket.

def parse_buckets(spec, image_size, multiple):
    """The `buckets` setting -> (height, width) pairs in pixels, multiples of `multiple` (the patch size times the
    VAE's factor). '': the square of image_size alone; 'auto': from 1:2 to 2:1 at about image_size^2 pixels (at 256
    px and a multiple of 16: 16x16 latent patches for 1:1, then 15x17, 14x18, 13x19, 13x20, 12x21, 12x22, and
    transposed); else 'HxW,HxW,...'."""
    if spec == '':
        sizes = [(image_size, image_size)]
    elif spec == 'auto':
        n = image_size // multiple  # the square's side, in multiples
        wide = [(round(n * n / w), w) for w in range(n, math.isqrt(2 * n * n) + 1)]  # w / h up to 2
        sizes = sorted({(h * multiple, w * multiple) for hw in wide for h, w in (hw, hw[::-1])})
    else:
        try:
            sizes = [tuple(int(v) for v in s.lower().split('x')) for s in spec.split(',')]
            assert all(len(s) == 2 and min(s) > 0 for s in sizes)
        except (ValueError, AssertionError):
            raise SystemExit(f"config error: buckets must be '', 'auto' or 'HxW,HxW,...', got {spec!r}")
    bad = [f'{h}x{w}' for h, w in sizes if h % multiple or w % multiple]
    if bad:
        raise SystemExit(f"config error: bucket(s) {', '.join(bad)} not multiples of {multiple} (patch x VAE factor)")
    return sizes


def nearest_bucket(h, w, buckets, inside=False):
    """The bucket whose aspect ratio is nearest h:w on a log scale: the one that crops least. inside=True prefers
    those that fit in h x w (an image already resized to cover its bucket finds that bucket again)."""
    fits = [b for b in buckets if b[0] <= h and b[1] <= w] if inside else []
    return min(fits or buckets, key=lambda b: (abs(math.log(b[0] * w / (b[1] * h))), -b[0] * b[1]))
# ----------------------------------------------------------------------------------------------------------------
# Two row sources, one streamer: prepare_laion.py's JSON lines of URLs, and webdataset tar shards as img2dataset
# writes them (00000.tar holding 000000000.jpg + .txt + .json), local or over http(s), read as a stream.

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')


def shard_list(spec):
    """data_shards -> shard paths and URLs: a glob, a brace range ('shards/{00000..00999}.tar', zero-padded as
    written), an http(s) URL, or several of these joined by '::'."""
    if '::' in spec:
        return [s for part in spec.split('::') for s in shard_list(part)]
    m = re.search(r'\{(\d+)\.\.(\d+)\}', spec)
    if m:
        a, b = m.groups()
        return [s for i in range(int(a), int(b) + 1)
                for s in shard_list(spec[:m.start()] + str(i).zfill(len(a)) + spec[m.end():])]
    return [spec] if spec.startswith(('http://', 'https://')) else sorted(glob.glob(spec))


def jsonl_rows(path):
    with open(path) as f:
        for line in f:
            yield json.loads(line)


def tar_rows(path, timeout):
    """The samples of a webdataset tar as rows {'key', 'caption', 'image'}: members sharing a key (the name up to the
    first dot of its base name) form a sample. Streamed with the standard library: a tar over http(s) is never
    downloaded whole. A truncated or unreadable tar ends its shard with a row that fails as 'bad_shard'."""
    key, parts = None, {}
    try:
        if path.startswith(('http://', 'https://')):
            r = requests.get(path, stream=True, timeout=timeout)
            r.raise_for_status()
            r.raw.decode_content = True
            f = r.raw
        else:
            f = open(path, 'rb')
        with f, tarfile.open(fileobj=f, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition('/')
                stem, _, ext = base.partition('.')
                if (folder, stem) != key:
                    if parts:
                        yield tar_sample(path, key, parts)
                    key, parts = (folder, stem), {}
                parts[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, requests.exceptions.RequestException):
        # the sample being read may lack members: dropped with the rest of the shard
        yield {'key': f'{path}#end', 'caption': '', 'image': None, 'fails': 'bad_shard'}
        return
    if parts:
        yield tar_sample(path, key, parts)


def tar_sample(path, key, parts):
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption = parts.get('txt', b'').decode('utf-8', 'replace').strip()
    return {'key': f'{path}#{"/".join(k for k in key if k)}', 'caption': caption, 'image': image}
