"""
Data for flowdit: 1. shapes, the embedded dataset, drawn on the fly, and its evaluator; 2. laion, a URL shard
streamer with a RAM cache. A stream's next() gives (images, captions): uint8 (B, 3, H, W) and a list of B strings;
its state_dict() / load_state_dict() let a checkpoint resume it exactly.
"""
import concurrent.futures
import glob
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import tempfile
import time
import urllib.parse

import numpy as np
import requests
import torch
import urllib3
from PIL import Image, ImageOps
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

# ----------------------------------------------------------------------------------------------------------------
# The shapes dataset. This spec is a public contract (README.md): users type prompts from it.

PALETTE = {'red': (220, 40, 40), 'green': (40, 170, 70), 'blue': (40, 80, 220), 'yellow': (235, 210, 40),
           'purple': (140, 60, 190), 'orange': (240, 130, 30), 'white': (240, 240, 240), 'black': (25, 25, 25)}
SHAPES = ('circle', 'square', 'triangle')
SIZES = {'small': (0.12, 0.16), 'large': (0.24, 0.30)}  # radius r as a fraction of image_size
POSITIONS = {'in the center': (0.5, 0.5), 'on the left': (0.28, 0.5), 'on the right': (0.72, 0.5),
             'at the top': (0.5, 0.28), 'at the bottom': (0.5, 0.72)}  # shape centre (x, y) as fractions
JITTER = 0.04
CAPTION = '{size} {color} {shape} {position}, {background} background'


def draw(shape, color, background, r, cx, cy, image_size):
    """uint8 (H, W, 3); r, cx, cy in pixels. Pixel (i, j) covers [j, j+1) x [i, i+1): its centre decides."""
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    if shape == 'circle':
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == 'square':
        mask = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    else:  # isosceles, apex up at cy - r, base of width 2r at cy + r: half-width grows by 1/2 per row down
        mask = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    return np.where(mask[..., None], np.uint8(PALETTE[color]), np.uint8(PALETTE[background]))


def random_scene(rng, image_size):
    """One (image, caption, attributes) drawn uniformly from the spec."""
    color, background = rng.choice(list(PALETTE), size=2, replace=False)
    attrs = dict(size=str(rng.choice(list(SIZES))), color=str(color), shape=str(rng.choice(SHAPES)),
                 position=str(rng.choice(list(POSITIONS))), background=str(background))
    r = rng.uniform(*SIZES[attrs['size']]) * image_size
    fx, fy = np.array(POSITIONS[attrs['position']]) + rng.uniform(-JITTER, JITTER, size=2)
    img = draw(attrs['shape'], attrs['color'], attrs['background'], r, fx * image_size, fy * image_size, image_size)
    return img, CAPTION.format(**attrs), attrs


class ShapesStream:
    """Infinite; batch number `step` of rank `rank` is a pure function of (seed, rank, step)."""

    def __init__(self, batch_size, image_size, seed, rank, pin_memory=False):
        self.batch_size, self.image_size, self.seed, self.rank, self.step = batch_size, image_size, seed, rank, 0
        self.pin_memory = pin_memory  # pinned host memory: the copy to the GPU overlaps with compute

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        images, captions = zip(*(random_scene(rng, self.image_size)[:2] for _ in range(self.batch_size)))
        self.step += 1
        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        return (images.pin_memory() if self.pin_memory else images), list(captions)

    def state_dict(self):
        return {'step': self.step}

    def load_state_dict(self, state):
        self.step = state['step']


def all_scenes():
    """Every attribute combination (1,680), as attribute dicts in a fixed order."""
    return [dict(size=s, color=c, shape=sh, position=p, background=b) for s in SIZES for c in PALETTE
            for sh in SHAPES for p in POSITIONS for b in PALETTE if b != c]


def judge(img):
    """Read the attributes back from one uint8 (H, W, 3) image, knowing only the spec."""
    S = img.shape[0]
    names, colors = list(PALETTE), np.array(list(PALETTE.values()), dtype=np.float32)
    nearest = np.argmin(((img[:, :, None, :].astype(np.float32) - colors) ** 2).sum(-1), axis=-1)  # (H, W)
    border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    bg = np.bincount(border, minlength=len(names)).argmax()
    mask = nearest != bg
    out = dict(background=names[bg])
    if mask.sum() < 4:  # no shape drawn
        return out
    out['color'] = names[np.bincount(nearest[mask], minlength=len(names)).argmax()]
    ys, xs = np.nonzero(mask)
    # robust bounding box: stray pixels elsewhere must not move it
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    w, h = x1 - x0 + 1, y1 - y0 + 1
    fill = mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1].mean()  # circle pi/4, square 1, triangle 1/2
    out['shape'] = 'triangle' if fill < 0.66 else 'circle' if fill < 0.9 else 'square'
    cx, cy = (x0 + x1 + 1) / 2 / S, (y0 + y1 + 1) / 2 / S
    out['position'] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    out['size'] = 'small' if max(w, h) / 2 / S < 0.20 else 'large'  # between 0.16 and 0.24
    return out


def adherence(images, scenes):
    """Fraction of images whose read-back attribute matches the prompt's, per attribute."""
    seen = [judge(img) for img in images]
    return {k: np.mean([s.get(k) == scene[k] for s, scene in zip(seen, scenes)])
            for k in ('color', 'background', 'shape', 'position', 'size')}


# ----------------------------------------------------------------------------------------------------------------
# The LAION stream: shards of (url, caption, width, height) rows, written by prepare_laion.py as JSON lines, fetched
# from their URLs during training. Real LAION is hostile (dead links, hangs, HTML named .jpg, pixel bombs), so every
# fetch has a total deadline and a byte cap, and a failure is counted under its reason and skipped.

REASONS = ('bad_url', 'private_address', 'http_error', 'connection', 'timeout', 'too_large', 'redirect_loop',
           'robots_noai', 'not_an_image', 'pixel_bomb', 'too_small')
COUNTERS = ('served', 'cache_hits') + REASONS  # each worker's, in this order
Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours, checked from the header before any decoding


class Skip(Exception):  # an image that cannot be used; args[0] is one of REASONS
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


class Cache:
    """Processed images as files under a folder, by default in RAM (/dev/shm), shared by every worker and rank of a
    node and kept across restarts. A file is b'I' + (height, width) as 2-byte ints + the raw RGB bytes, or b'F' + the
    reason a URL failed, so a second pass makes no requests at all. The byte bound holds without locks: each of the
    node's writers gets an equal share of what was free when it started."""

    def __init__(self, folder, max_bytes, writers):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        used = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
        self.budget = max(0, max_bytes - used) // writers

    def path(self, key):  # keys are URLs: hashed into file names
        return os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest())

    def get(self, key):
        """The RGB array, None if absent; raises Skip for a URL known to fail."""
        try:
            with open(self.path(key), 'rb') as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        if blob[:1] == b'F':
            raise Skip(blob[1:].decode())
        h, w = int.from_bytes(blob[1:3], 'little'), int.from_bytes(blob[3:5], 'little')
        return np.frombuffer(blob, dtype=np.uint8, offset=5).reshape(h, w, 3)

    def put(self, key, img=None, reason=''):
        blob = (b'F' + reason.encode() if img is None else
                b'I' + img.shape[0].to_bytes(2, 'little') + img.shape[1].to_bytes(2, 'little') + img.tobytes())
        if len(blob) > self.budget:
            return
        self.budget -= len(blob)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix='.tmp')  # unique: threads may write the same key
        with os.fdopen(fd, 'wb') as f:
            f.write(blob)
        os.replace(tmp, self.path(key))  # readers never see half a file


class LaionShards(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: its share of the shards, fetched by a pool of threads, yielded as batches
    (images, captions, worker, position, stats). Shards are split over ranks x workers afresh each epoch (a seeded
    shuffle), disjoint and together complete; the stream never ends, so no rank runs dry. A worker's position is
    (epoch, below, done): of its rows of that epoch, those before `below` and those in `done` are finished (served or
    failed). Images are served as they arrive, out of order, and the position sent with a batch covers exactly the
    rows finished by then, so resuming from it serves no image twice and skips none."""

    def __init__(self, shards, batch_size, image_size, seed, rank, world, workers, o):
        super().__init__()
        self.shards, self.batch_size, self.size, self.seed = sorted(shards), batch_size, image_size, seed
        self.rank, self.world, self.workers, self.o = rank, world, max(1, workers), o
        self.positions = {}  # worker -> position to resume from
        if len(self.shards) < world * self.workers:
            raise ValueError(f'{len(self.shards)} shard(s) cannot feed {world} rank(s) x {self.workers} worker(s): '
                             f'write at least {world * self.workers} (prepare_laion.py --num_shards)')

    def my_shards(self, epoch, g):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[g::self.world * self.workers]]

    def load(self, row, key, rng):
        """The square uint8 (3, S, S) crop of one row, through the cache; Skip on failure."""
        img, o = self.cache.get(key), self.o
        cached = img is not None
        if not cached:
            try:
                content = fetch(self.session, row['url'], o['fetch_timeout'], o['max_image_bytes'],
                                o['allow_private_urls'], o['honor_robots'])
                img = np.asarray(decode(content, self.size, o['max_image_pixels'], o['min_image_size']))
            except Skip as e:
                self.cache.put(key, reason=e.args[0])
                raise
            self.cache.put(key, img)
        h, w = img.shape[:2]
        y, x = ((rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)) if o['random_crop']
                else ((h - self.size) // 2, (w - self.size) // 2))
        img = img[y:y + self.size, x:x + self.size]
        if o['random_flip'] and rng.random() < 0.5:
            img = img[:, ::-1]
        return cached, torch.from_numpy(img.copy()).permute(2, 0, 1)  # a cached array is read-only

    def __iter__(self):
        w = getattr(torch.utils.data.get_worker_info(), 'id', 0)
        g = self.rank * self.workers + w  # this worker among all ranks' workers
        writers = int(os.environ.get('LOCAL_WORLD_SIZE', 1)) * self.workers  # this node's
        self.cache = Cache(self.o['cache_dir'], self.o['cache_bytes'], writers)
        self.session = session(self.o['fetch_threads'])
        epoch, below, done = self.positions.get(w, (0, 0, []))
        pool = concurrent.futures.ThreadPoolExecutor(self.o['fetch_threads'])
        try:
            yield from self.batches(w, g, pool, epoch, below, set(done))
        finally:  # a closed stream fetches no more; what is running ends by its deadline
            pool.shutdown(wait=False, cancel_futures=True)

    def batches(self, w, g, pool, epoch, below, done):
        stats, images, captions = dict.fromkeys(COUNTERS, 0), [], []
        while True:
            served_before = stats['served']
            todo = ((k, row, rng) for k, row, rng in self.rows(epoch, g) if k >= below and k not in done)
            running = {}
            while True:
                for k, row, rng in todo:  # keep the pool busy
                    running[pool.submit(self.load, row, f"{row['url']}|{self.size}", rng)] = (k, row['caption'])
                    if len(running) >= 2 * self.o['fetch_threads']:
                        break
                if not running:
                    break
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in finished:
                    k, caption = running.pop(fut)
                    done.add(k)
                    try:
                        cached, img = fut.result()
                    except Skip as e:
                        stats[e.args[0]] += 1
                        continue
                    stats['served'] += 1
                    stats['cache_hits'] += cached
                    images.append(img)
                    captions.append(caption)
                    if len(images) == self.batch_size:  # yield now: the position covers served rows only
                        while below in done:  # rows before `below` are implied done
                            done.discard(below)
                            below += 1
                        yield torch.stack(images), captions, w, (epoch, below, sorted(done)), dict(stats)
                        images, captions = [], []
            if stats['served'] == served_before:
                raise RuntimeError(f'data worker {g}: a whole epoch of {len(self.my_shards(epoch, g))} shard(s) '
                                   f'gave no usable image; counts so far: {stats}')
            epoch, below, done = epoch + 1, 0, set()

    def rows(self, epoch, g):
        """(k, row, rng) for this worker's rows of an epoch, numbered across its shards (read as reached), so a
        shard's slow stragglers never hold up the next one; each row shuffled within its shard, with its own rng."""
        k = 0
        for path in self.my_shards(epoch, g):
            with open(path) as f:
                rows, sid = [json.loads(line) for line in f], self.shards.index(path)
            for i in np.random.default_rng([self.seed, epoch, sid]).permutation(len(rows)):
                yield k, rows[i], np.random.default_rng([self.seed, epoch, sid, int(i)])
                k += 1


class LaionStream:
    """The training side: a DataLoader over LaionShards that remembers each worker's position and counters."""

    def __init__(self, pattern, batch_size, image_size, seed, rank, world, workers, pin_memory=False, **options):
        shards = glob.glob(pattern)
        if not shards:
            raise SystemExit(f'error: no shards match {pattern!r}: write them with prepare_laion.py')
        self.dataset = LaionShards(shards, batch_size, image_size, seed, rank, world, workers, options)
        self.workers, self.pin_memory, self.loader, self.stats = workers, pin_memory, None, {}  # stats: per worker

    def __next__(self):
        if self.loader is None:
            self.loader = iter(torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None))
        images, captions, w, self.dataset.positions[w], self.stats[w] = next(self.loader)
        return images, captions

    def state_dict(self):
        return {'positions': {w: list(p) for w, p in self.dataset.positions.items()}}

    def load_state_dict(self, state):
        assert self.loader is None, 'load the position before the first batch'
        self.dataset.positions = {int(w): tuple(p) for w, p in state['positions'].items()}

    def counters(self):
        """COUNTERS summed over this rank's workers."""
        return [sum(s[k] for s in self.stats.values()) for k in COUNTERS]
