"""
Images from the hostile web, for data.py's streamer. Real LAION is hostile (dead links, hangs, HTML named .jpg, pixel
bombs, hosts that resolve into the training cluster's network), so fetch() has a total deadline and a byte cap and
reaches public addresses only, and decode() checks untrusted bytes before decoding them. A sample that cannot be used
raises Skip(reason), counted under its reason and skipped.
"""
import io
import ipaddress
import re
import socket
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


def fetch(session, url, deadline, max_bytes, allow_private, honor_robots, max_redirects=5):
    """The body of url within `deadline` seconds in all (a hang or a slow drip is cut off), or Skip(reason)."""
    end = time.monotonic() + deadline
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise Skip('bad_url')
        if not allow_private:  # refuse addresses inside the training cluster's network
            try:
                addrs = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80)}
            except (socket.gaierror, UnicodeError):
                raise Skip('connection')
            if any(not ipaddress.ip_address(a.split('%')[0]).is_global for a in addrs):
                raise Skip('private_address')
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
            if r.is_redirect:  # followed by hand, so that every hop's address is checked
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


def session(threads):
    """Connections reused across fetches; retries with backoff for 429, 5xx and failed connects only (a read
    timeout is a hang: not retried), never honouring a Retry-After that would stall the stream."""
    s = requests.Session()
    retry = Retry(total=2, connect=2, read=False, redirect=0, status=2, status_forcelist=(429, 500, 502, 503, 504),
                  backoff_factor=0.25, backoff_max=1.0, respect_retry_after_header=False, raise_on_status=False)
    for prefix in ('http://', 'https://'):
        s.mount(prefix, HTTPAdapter(max_retries=retry, pool_maxsize=threads))
    s.headers['User-Agent'] = 'flowdit/1.0 (image-text research; honours X-Robots-Tag noai)'
    return s


def decode(content, size, max_pixels, min_size):
    """Raw bytes -> RGB image whose shorter side is `size`, or Skip(reason)."""
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
    scale = size / min(im.size)
    return im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC,
                     reducing_gap=3.0)
