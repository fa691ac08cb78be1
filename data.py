"""
The LAION streamer of flowdit: image-caption rows from shards of URLs (prepare_laion.py) or of webdataset tars
(img2dataset), split over ranks and workers, fetched or read by threads, kept in a RAM cache as pixels or, when a VAE
trains, as latents. A stream's next() gives (images, captions): uint8 (B, 3, H, W) and a list of B strings (latents
and, with cache_text, caption embeddings when LaionStream encodes); state_dict() / load_state_dict() let a checkpoint
resume it exactly. With aspect-ratio buckets, each image is cropped to the bucket nearest its shape and each batch
holds one bucket. The embedded shapes dataset is in shapes.py; the fetching and decoding of web images, the shard
lists and row readers and the bucket sizes in web.py.
"""
import concurrent.futures
import hashlib
import math
import os
import signal
import struct
import tempfile
import threading

import numpy as np
import torch

from model import to_device
from shapes import CAPTION, ShapesStream, adherence, all_scenes, judge  # noqa: F401 (their first home)
from web import (IMAGE_EXTS, REASONS, Skip, decode, fetch, jsonl_rows, nearest_bucket,  # noqa: F401
                 parse_buckets, session, shard_list, tar_rows)  # (REASONS: train.py's log; the rest: their old home)

COUNTERS = ('served', 'cache_hits') + REASONS  # each worker's, in this order
TAR_SHUFFLE = 256  # samples a tar's shuffle buffer holds, images and all


def pack(arrays):
    """fp16 arrays -> bytes: for each its rank (1 byte), shape (4-byte ints) and raw data. np.load would do it too, at
    a few times the cost of a cache hit."""
    return b''.join(struct.pack(f'<B{a.ndim}I', a.ndim, *a.shape) + a.astype(np.float16).tobytes() for a in arrays)


def unpack(blob, offset=0):
    arrays = []
    while offset < len(blob):
        ndim = blob[offset]
        shape = struct.unpack_from(f'<{ndim}I', blob, offset + 1)
        offset += 1 + 4 * ndim
        arrays.append(np.frombuffer(blob, np.float16, math.prod(shape), offset).reshape(shape))
        offset += 2 * math.prod(shape)
    return arrays


class Cache:
    """Processed samples as files under a folder, by default in RAM (/dev/shm), shared by every worker and rank of a
    node and kept across restarts. A file is b'I' + (height, width) as 2-byte ints + the raw RGB bytes; b'L' + packed
    fp16 arrays (the latents of the crop and of its flip, then the caption's embedding where it is cached); or b'F' +
    the reason a sample failed, so a second pass makes no requests at all. The byte bound holds without locks: each
    of the node's writers gets an equal part of its kind's share of what was free when it started."""

    def __init__(self, folder, max_bytes, writers, share=1.0):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        used = 0
        for e in os.scandir(folder):
            try:
                used += e.stat().st_size
            except FileNotFoundError:  # another writer's temp file, renamed meanwhile
                pass
        self.budget = int(max(0, max_bytes - used) * share) // writers

    def path(self, key):  # keys are URLs or tar members, with the size and encoders: hashed into file names
        return os.path.join(self.folder, hashlib.sha1(key.encode()).hexdigest())

    def get(self, key):
        """The RGB array or a list of arrays, None if absent; raises Skip for a sample known to fail."""
        try:
            with open(self.path(key), 'rb') as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        if blob[:1] == b'F':
            raise Skip(blob[1:].decode())
        if blob[:1] == b'L':
            return unpack(blob, 1)
        h, w = int.from_bytes(blob[1:3], 'little'), int.from_bytes(blob[3:5], 'little')
        return np.frombuffer(blob, dtype=np.uint8, offset=5).reshape(h, w, 3)

    def put(self, key, img=None, reason='', arrays=()):
        blob = (b'L' + pack(arrays) if arrays else b'F' + reason.encode() if img is None else
                b'I' + img.shape[0].to_bytes(2, 'little') + img.shape[1].to_bytes(2, 'little') + img.tobytes())
        if len(blob) > self.budget:
            return
        self.budget -= len(blob)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix='.tmp')  # unique: threads may write the same key
        with os.fdopen(fd, 'wb') as f:
            f.write(blob)
        os.replace(tmp, self.path(key))  # readers never see half a file


def shuffled(items, rng, size=None):
    """items in a seeded random order, holding at most `size` of them at a time (webdataset's shuffle buffer); all
    of them when size is None."""
    buf = []
    for item in items:
        buf.append(item)
        if size and len(buf) == size:
            yield buf.pop(rng.integers(size))
    yield from (buf[i] for i in rng.permutation(len(buf)))


class LaionShards(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: its share of the shards, read or fetched by a pool of threads, yielded as
    batches (images, captions, worker, position, stats). Shards are split over ranks x workers afresh each epoch (a
    seeded shuffle), disjoint and together complete; the stream never ends, so no rank runs dry. A worker's position
    is (epoch, below, done): of its rows of that epoch, those before `below` and those in `done` are finished (served
    or failed). Samples are served as they arrive, out of order, and the position sent with a batch covers exactly the
    rows finished by then, so resuming from it serves no sample twice and skips none.
    With o['latent_tag'] set (a VAE trains), a batch's `images` is a dict: the latents the cache holds ('latents',
    'texts') and the crops it lacks ('pixels', 'flip', 'keys'), 'hit' marking which is which; LaionStream encodes and
    caches the crops. With o['buckets'] ((height, width) pairs; web.parse_buckets), each image is cropped to the
    bucket nearest its aspect ratio and every batch comes from one bucket: a row waits in its bucket's batch, and is
    finished only when that batch is yielded. Buckets come as often as the data holds them. The one inexact resume:
    a position names one epoch, so a bucket's rows of the last epoch still waiting when another bucket yields in the
    next are not served after resuming from it (fewer than batch_size per bucket, at an epoch's end only)."""

    def __init__(self, shards, batch_size, image_size, seed, rank, world, workers, o):
        super().__init__()
        self.shards, self.batch_size, self.size, self.seed = sorted(shards), batch_size, image_size, seed
        self.rank, self.world, self.workers, self.o = rank, world, max(1, workers), o
        self.latent_tag, self.buckets = o.get('latent_tag', ''), o.get('buckets') or [(image_size, image_size)]
        square = self.buckets == [(image_size, image_size)]  # the cache key names the sizes an image may take
        self.size_tag = str(image_size) if square else ','.join(f'{h}x{w}' for h, w in self.buckets)
        self.positions = {}  # worker -> position to resume from
        if len(self.shards) < world * self.workers:
            raise ValueError(f'{len(self.shards)} shard(s) cannot feed {world} rank(s) x {self.workers} worker(s): '
                             f'write at least {world * self.workers} (prepare_laion.py --num_shards)')

    def my_shards(self, epoch, g):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[g::self.world * self.workers]]

    def key(self, row):
        """The cache key: the sample, the size, and the encoders that made its latents (none for pixels)."""
        return f"{row.get('url') or row['key']}|{self.size_tag}{self.latent_tag}"

    def lookup(self, row, u):
        """A cached row's item, a Skip if it is known to fail, None if the cache lacks it. Run inline: a hit is a
        read from RAM, no work for a thread."""
        try:
            hit = self.cache.get(self.key(row))
        except Skip as e:
            return e
        if hit is None or not self.latent_tag:
            return hit if hit is None else self.crop(hit, u)
        latents, *text = hit  # latents (1 or 2 with the flip, C, h, w)
        flip = self.o['random_flip'] and u[0] < 0.5  # as crop() decides it
        return 'hit', torch.from_numpy(latents[int(flip)].copy()), torch.from_numpy(text[0].copy()) if text else None

    def load(self, row, u):
        """A row the cache lacks: fetched or read from its tar, decoded, cropped, cached (as pixels, or, for latents,
        by LaionStream once encoded). Skip on failure, remembered in the cache."""
        key, o = self.key(row), self.o
        try:
            if 'url' in row:
                content = fetch(self.session, row['url'], o['fetch_timeout'], o['max_image_bytes'],
                                o['allow_private_urls'], o['honor_robots'])
            elif row['image'] is None:
                raise Skip(row.get('fails', 'not_an_image'))
            else:
                content = row['image']
            img = np.asarray(decode(content, self.size, o['max_image_pixels'], o['min_image_size'], self.buckets))
        except Skip as e:
            if e.args[0] != 'bad_shard':  # a broken download may work next time
                self.cache.put(key, reason=e.args[0])
            raise
        if not self.latent_tag:
            self.cache.put(key, img)
            return self.crop(img, u)
        return 'miss', self.crop(img, u, flip_it=False), key

    def crop(self, img, u, flip_it=True):
        """uint8 (3, bh, bw) from (h, w, 3) resized to cover its bucket: the center or a random crop, flipped at
        random; u: the row's 3 uniform draws (flip, y, x). flip_it=False returns the flip decision beside the
        unflipped crop, whose latents are cached for both."""
        flip = self.o['random_flip'] and u[0] < 0.5
        h, w = img.shape[:2]
        bh, bw = nearest_bucket(h, w, self.buckets, inside=True)
        y, x = ((int(u[1] * (h - bh + 1)), int(u[2] * (w - bw + 1))) if self.o['random_crop']
                else ((h - bh) // 2, (w - bw) // 2))
        img = img[y:y + bh, x:x + bw]
        if not flip_it:
            return torch.from_numpy(img.copy()).permute(2, 0, 1), flip
        return torch.from_numpy((img[:, ::-1] if flip else img).copy()).permute(2, 0, 1)  # a cached array is read-only

    def __iter__(self):
        w = getattr(torch.utils.data.get_worker_info(), 'id', 0)
        g = self.rank * self.workers + w  # this worker among all ranks' workers
        self.cache = Cache(self.o['cache_dir'], self.o['cache_bytes'], LOCAL_WORLD * self.workers,
                           LATENT_SHARE[1] if self.latent_tag else 1.0)  # with latents, workers cache failures only
        self.session = session(self.o['fetch_threads'])
        epoch, below, done = self.positions.get(w, (0, 0, []))
        pool = concurrent.futures.ThreadPoolExecutor(self.o['fetch_threads'])
        try:
            yield from self.batches(w, g, pool, epoch, below, set(done))
        finally:  # a closed stream fetches no more; what is running ends by its deadline
            pool.shutdown(wait=False, cancel_futures=True)

    def bucket_of(self, item):
        # an item is a crop (3, bh, bw), a cached latent ('hit', (C, bh/f, bw/f), text) or a crop to encode ('miss')
        if len(self.buckets) == 1:
            return self.buckets[0]
        if not self.latent_tag:
            return tuple(item.shape[-2:])
        f = self.o['vae_factor'] if item[0] == 'hit' else 1
        return tuple(s * f for s in (item[1] if item[0] == 'hit' else item[1][0]).shape[-2:])

    def batches(self, w, g, pool, epoch, below, done):
        stats, waiting = dict.fromkeys(COUNTERS, 0), {}  # bucket -> [(epoch, k, item, caption)], a batch to come
        while True:
            served_before = stats['served']
            todo = ((k, row, u) for k, row, u in self.rows(epoch, g) if k >= below and k not in done)
            running, ready = {}, []
            while True:
                for k, row, u in todo:  # keep the pool busy; cache hits are ready at once
                    item = self.lookup(row, u)
                    if item is None:
                        running[pool.submit(self.load, row, u)] = k, row['caption']
                    else:
                        ready.append((k, row['caption'], item, True))
                    if len(running) >= 2 * self.o['fetch_threads'] or len(ready) >= self.batch_size:
                        break
                if running and len(ready) < self.batch_size:
                    finished, _ = concurrent.futures.wait(running, timeout=0 if ready else None,
                                                          return_when=concurrent.futures.FIRST_COMPLETED)
                    for f in sorted(finished, key=lambda f: running[f][0]):  # in row order, where they tie
                        ready.append((*running.pop(f), f.exception() if isinstance(f.exception(), Skip) else f.result(),
                                      False))
                if not ready and not running:
                    break
                for k, caption, item, cached in ready:
                    if isinstance(item, Skip):
                        done.add(k)
                        stats[item.args[0]] += 1
                        continue
                    stats['served'] += 1
                    stats['cache_hits'] += cached
                    batch = waiting.setdefault(self.bucket_of(item), [])
                    batch.append((epoch, k, item, caption))
                    if len(batch) == self.batch_size:  # yield now: the position covers its rows, not those waiting
                        del waiting[self.bucket_of(item)]
                        done.update(k for e, k, _, _ in batch if e == epoch)  # a past epoch's are past resuming
                        while below in done:  # rows before `below` are implied done
                            done.discard(below)
                            below += 1
                        yield (self.collate([b[2] for b in batch]), [b[3] for b in batch], w,
                               (epoch, below, sorted(done)), dict(stats))
                ready = []
            if stats['served'] == served_before:
                raise RuntimeError(f'data worker {g}: a whole epoch of {len(self.my_shards(epoch, g))} shard(s) '
                                   f'gave no usable image; counts so far: {stats}')
            epoch, below, done = epoch + 1, 0, set()

    def collate(self, items):
        if not self.latent_tag:
            return torch.stack(items)
        hits, misses = [i for i in items if i[0] == 'hit'], [i for i in items if i[0] == 'miss']
        return {'hit': torch.tensor([i[0] == 'hit' for i in items]),
                'latents': torch.stack([i[1] for i in hits]) if hits else None,
                'texts': torch.stack([i[2] for i in hits]) if hits and hits[0][2] is not None else None,
                'pixels': torch.stack([i[1][0] for i in misses]) if misses else None,
                'flip': torch.tensor([i[1][1] for i in misses], dtype=torch.bool), 'keys': [i[2] for i in misses]}

    def rows(self, epoch, g):
        """(k, row, u) for this worker's rows of an epoch, numbered across its shards (read as reached), so a
        shard's slow stragglers never hold up the next one. A JSON-lines shard is shuffled whole, a tar through a
        buffer of TAR_SHUFFLE samples (their images are in memory). u: the row's random draws, made here in row order,
        so they do not depend on the order in which fetches complete (a Generator per row would cost 30 us)."""
        k = 0
        for path in self.my_shards(epoch, g):
            sid, is_tar = self.shards.index(path), '.tar' in os.path.basename(path)
            rows = tar_rows(path, self.o['fetch_timeout']) if is_tar else jsonl_rows(path)
            order = np.random.default_rng([self.seed, epoch, sid])
            draws = np.random.default_rng([self.seed, epoch, sid, 1])
            for row in shuffled(rows, order, TAR_SHUFFLE if is_tar else None):
                yield k, row, draws.random(3).tolist()
                k += 1



LATENT_SHARE = 0.95, 0.05  # of the cache: latents (written by the node's ranks), failed samples (by their workers)
LOCAL_WORLD = int(os.environ.get('LOCAL_WORLD_SIZE', 1))  # processes on this node


def leave_signals_to_trainer(worker_id):
    """Ctrl-C in a terminal and a scheduler's SIGTERM reach the whole process group: a worker lives on, as the step in
    progress needs it, while the training process checkpoints (train.py); the parent's own SIGTERM, its DataLoader's
    shutdown, still ends it at once, as torch's handler would (told apart by the sender, which only sigwaitinfo sees)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, 'sigwaitinfo'):  # macOS has none: SIGTERM stays torch's to handle
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before the fetch threads start, which inherit it
    parent = os.getppid()

    def wait_for_parent():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)
    threading.Thread(target=wait_for_parent, daemon=True).start()


def health(new, wait, wait_share):
    """The data path over a log interval, as a log line and curves. new: COUNTERS summed over the ranks; wait: seconds
    per step spent waiting for data, wait_share: their share of the interval."""
    served, fails = new[0], {r: int(n) for r, n in zip(REASONS, new[2:]) if n}
    hits, failed = new[1] / max(served, 1), sum(fails.values()) / max(served + sum(fails.values()), 1)
    reasons = ', '.join(f'{r} {n}' for r, n in fails.items()) or 'none'
    line = (f'  data: {served:.0f} served | cache hits {hits:.0%} | wait {1000 * wait:.0f} ms/step ({wait_share:.0%})'
            f' | failed {failed:.0%} ({reasons})')
    return line, {'data/cache_hits': hits, 'data/wait_ms_per_step': 1000 * wait, 'data/failed': failed}


class LaionStream:
    """The training side: a DataLoader over LaionShards that remembers each worker's position and counters. With a
    `vae` (run here, on the training device), next() gives latents (B, C, h, w) instead of pixels: those the RAM cache
    holds, and the rest encoded now, rounded to fp16 and cached, so every epoch trains on the same numbers. With a
    `text_encoder` too (cache_text), the caption embeddings (B, L, D) come the same way, in place of the captions."""

    def __init__(self, pattern, batch_size, image_size, seed, rank, world, workers, pin_memory=False, vae=None,
                 text_encoder=None, cache_tag='', **options):
        shards = shard_list(pattern)
        if not shards:
            raise SystemExit(f'error: no shards match {pattern!r}: write them with prepare_laion.py or img2dataset')
        self.vae, self.text_encoder = vae, text_encoder
        if vae is not None:  # the key names the encoders: a cache made for one VAE is never read by another
            options['latent_tag'], options['vae_factor'] = f'|{cache_tag}', getattr(vae, 'factor', 1)
        try:
            self.dataset = LaionShards(shards, batch_size, image_size, seed, rank, world, workers, options)
        except ValueError as e:  # too few shards for the ranks and workers: a setting to change, not a crash
            raise SystemExit(f'error: {e}') from None
        self.workers, self.pin_memory, self.loader, self.stats = workers, pin_memory, None, {}  # stats: per worker

    def __next__(self):
        if self.loader is None:
            self.loader = iter(torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None,
                worker_init_fn=leave_signals_to_trainer))
            if self.vae is not None:  # this process writes the latents it encodes
                o = self.dataset.o
                self.cache = Cache(o['cache_dir'], o['cache_bytes'], LOCAL_WORLD, LATENT_SHARE[0])
        images, captions, w, self.dataset.positions[w], self.stats[w] = next(self.loader)
        return (images, captions) if self.vae is None else self.encode(images, captions)

    @torch.no_grad()
    def encode(self, b, captions):
        # b: LaionShards.collate's dict. Hits come as they were cached; misses go through the VAE (the crop and, with
        # random_flip, its flip, as MAR caches them) and are cached before use.
        device = next(self.vae.parameters(), torch.empty(0)).device
        z, ctx = [b['latents']], [b['texts']]
        if b['pixels'] is not None:
            px = to_device(b['pixels'], device).float() / 127.5 - 1  # (M, 3, S, S)
            views = 2 if self.dataset.o['random_flip'] else 1
            lat = self.vae.encode(torch.cat([px, px.flip(-1)][:views])).half()  # (views * M, C, h, w)
            lat = lat.unflatten(0, (views, -1)).transpose(0, 1)  # (M, views, C, h, w)
            miss = [c for c, hit in zip(captions, b['hit']) if not hit]
            txt = self.text_encoder(miss).to(device).half() if self.text_encoder else None  # (M, L, D)
            lat_np, txt_np = lat.cpu().numpy(), txt.cpu().numpy() if txt is not None else None
            for i, key in enumerate(b['keys']):
                self.cache.put(key, arrays=[lat_np[i]] + ([txt_np[i]] if txt is not None else []))
            pick = to_device(b['flip'].long(), device) if views == 2 else 0  # the view each sample trains on
            z.append(lat[torch.arange(len(miss), device=device), pick])
            ctx.append(txt)
        order = to_device(torch.cat([b['hit'].nonzero()[:, 0], (~b['hit']).nonzero()[:, 0]]), device)  # hits, misses

        def in_order(parts):  # hits and misses back in the batch's order, fp32
            joined = torch.cat([to_device(t, device) for t in parts if t is not None])
            return torch.empty_like(joined).index_copy_(0, order, joined).float()
        return in_order(z), captions if self.text_encoder is None else in_order(ctx)

    def state_dict(self):
        return {'positions': {w: list(p) for w, p in self.dataset.positions.items()}}

    def load_state_dict(self, state):
        assert self.loader is None, 'load the position before the first batch'
        self.dataset.positions = {int(w): tuple(p) for w, p in state['positions'].items()}

    def counters(self):
        """COUNTERS summed over this rank's workers."""
        return [sum(s[k] for s in self.stats.values()) for k in COUNTERS]
