"""
Benchmarks: scripts that print numbers (not tests).

    python bench.py train --model DiT-S/2 --res 128 --batch 8 --dtype float32     # CPU
    python bench.py train --model DiT-B/2 --res 256 --batch 64 --dtype bfloat16 --compile    # one GPU
    python bench.py sample --model DiT-B/2 --res 256 --batch 64 --steps 28 --cfg 4
    python bench.py stream --n 1000                                                # the LAION streamer's sources
    python bench.py latent --model DiT-S/2 --res 64 --batch 8                      # the latent cache in a step
    python bench.py prepare --rows 2000000                                         # prepare_laion.py at scale

train: a training step (forward, backward, AdamW) of flowdit's DiT and of diffusers' SD3Transformer2DModel built to
the same width, depth, heads, patch, image tokens and caption length, on the same batch, dtype and inputs (--dtype
auto, the default, picks what train.py would: model.choose_dtype). Latents have SD-VAE's geometry (res / 8,
4 channels), captions CLIP-L's (77 x 768).
stream: N web-photo-like JPEGs; one streamer worker's samples/s from URLs on a loopback server in another process
(clean, and with 30% dead and 5% stalled links), from a local tar shard, and from the RAM cache (pixels, latents),
next to the decode + resize rate of the same files on one core.
latent: a training step fed pre-made latents, the stream's warm latent cache, or pixels encoded by the VAE.
prepare: prepare_laion.py's rows/s and peak memory over generated parquet files.
"""
import argparse
import io
import json
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import flow
from encoders import load_vae
from model import DiT, PRESETS, autocast_for, peak_flops, resolve_dtype


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def memory(device):
    return torch.cuda.memory_allocated() if device.startswith('cuda') else 0


def timed(step, device):
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def diffusers_twin(preset, channels, grid, text_dim):
    from diffusers import SD3Transformer2DModel
    depth, width, heads, patch = PRESETS[preset]
    return SD3Transformer2DModel(sample_size=grid, patch_size=patch, in_channels=channels, num_layers=depth,
                                 attention_head_dim=width // heads, num_attention_heads=heads,
                                 joint_attention_dim=text_dim, caption_projection_dim=width,
                                 pooled_projection_dim=text_dim, out_channels=channels,
                                 pos_embed_max_size=grid // patch, qk_norm='rms_norm')


def bench_train(a):
    C, grid = 4, a.res // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, C, grid, grid, generator=g).to(a.device)
    ctx = torch.randn(a.batch, a.text_len, a.text_dim, generator=g).to(a.device)
    t, noise = torch.rand(a.batch, generator=g).to(a.device), torch.randn(x.shape, generator=g).to(a.device)
    autocast = autocast_for(a.device, a.dtype)
    ours = DiT(a.model, C, a.text_dim, grid, grad_checkpointing=a.grad_checkpointing)
    flops = ours.flops_per_image(a.text_len)  # the twin does the same matmuls
    peak = peak_flops(a.device)
    steps, peaks, params = {}, {}, {}
    for name, build, forward in (
            ('flowdit', lambda: ours, lambda m, z: m(z, t, ctx)),
            ('diffusers SD3Transformer2DModel', lambda: diffusers_twin(a.model, C, grid, a.text_dim),
             lambda m, z: m(z, ctx, ctx.mean(dim=1), t * 1000, return_dict=False)[0])):
        base = memory(a.device)  # the other model stays resident: count only what this one adds
        model = build().to(a.device)
        if a.grad_checkpointing and name != 'flowdit':
            model.enable_gradient_checkpointing()
        params[name] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        net = torch.compile(model) if a.compile else model

        def step(net=net, opt=opt, forward=forward):
            zt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
            with autocast:
                loss = F.mse_loss(forward(net, zt).float(), noise - x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if a.device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
        for _ in range(a.warmup):
            step()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 1e9 if a.device.startswith('cuda') else None
        steps[name] = step
    # the two alternate step by step, so that a machine whose speed drifts slows both alike; medians
    times = {name: [] for name in steps}
    for _ in range(a.steps):
        for name, step in steps.items():
            times[name].append(timed(step, a.device))
    rows = [(name, params[name], float(np.median(times[name])), peaks[name]) for name in steps]
    print(f'{a.model} at {a.res} px ({grid}x{grid}x{C} latents, {(grid // PRESETS[a.model][3]) ** 2} image tokens, '
          f'{a.text_len} caption tokens), batch {a.batch}, {a.dtype}, compile {a.compile}, '
          f'checkpointing {a.grad_checkpointing}, on {device_name(a.device)}')
    print(f"{'model':34s} {'params':>8s} {'step ms':>9s} {'img/s':>8s} {'MFU':>6s} {'peak GB':>8s} {'GB/img':>7s}")
    for name, params, dt, mem in rows:
        mfu = f'{flops * a.batch / dt / peak:.1%}' if peak else 'n/a'
        mem_s = f'{mem:8.2f} {mem / a.batch:7.3f}' if mem is not None else f"{'n/a':>8s} {'n/a':>7s}"
        print(f'{name:34s} {params / 1e6:7.1f}M {dt * 1e3:9.1f} {a.batch / dt:8.1f} {mfu:>6s} {mem_s}')
    print(f'step-time ratio flowdit / diffusers: {rows[0][2] / rows[1][2]:.3f}')


def bench_sample(a):
    C, grid = 4, a.res // 8
    model = DiT(a.model, C, a.text_dim, grid).to(a.device).eval()
    for p in model.parameters():  # a fresh model predicts zeros; timing wants real work, not skipped branches
        p.data.normal_(0, 0.02)
    ctx = torch.randn(a.batch, a.text_len, a.text_dim, device=a.device)
    uncond = torch.zeros_like(ctx)
    autocast = autocast_for(a.device, a.dtype)
    net = torch.compile(model) if a.compile else model

    def run():
        with autocast:
            flow.sample(flow.guided(net, ctx, uncond, a.cfg), torch.randn(a.batch, C, grid, grid, device=a.device),
                        a.steps)
    run()  # warm-up (and compilation)
    dt = float(np.median([timed(run, a.device) for _ in range(a.repeats)]))
    print(f'{a.model} at {a.res} px, {a.steps} Euler steps, cfg {a.cfg} (one batched forward of 2 x {a.batch}), '
          f'{a.dtype}, compile {a.compile}, on {device_name(a.device)}: {a.batch / dt:.2f} images/s '
          f'({dt:.2f} s per batch of {a.batch}; DiT only, no VAE decode)')


def web_photos(n, seed=0):
    """JPEGs like web photos: 300-1600 px wide, aspect 0.6-1.7, quality 75-95."""
    import fault_server as fs
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = int(rng.integers(300, 1600))
        h = int(w / rng.uniform(0.6, 1.7))
        out.append(fs.jpeg(w, h, seed=i, quality=int(rng.integers(75, 96))))
    return out


def serve(photos, dead, stalled, queue):
    import fault_server as fs
    routes = {f'/{i}.jpg': body for i, body in enumerate(photos)}
    for i in dead:
        routes[f'/{i}.jpg'] = fs.status(404)
    for i in stalled:
        routes[f'/{i}.jpg'] = fs.hang
    url, _, server = fs.start(routes)
    queue.put(url)
    server.serve_forever()


def pass_rates(shards, a, cache_dir, valid, **options):
    """Samples/s of one streamer worker (this process) over two passes of its shards: steady state, the time to serve
    a pass's valid samples, not the wait for its last stalled links to time out (in training a worker's pass spans
    millions of rows, so that wait comes once in a long while)."""
    o = dict(fetch_threads=a.threads, fetch_timeout=a.timeout, max_image_bytes=16_000_000, max_image_pixels=50_000_000,
             min_image_size=64, allow_private_urls=True, honor_robots=True, random_crop=False, random_flip=False,
             cache_dir=cache_dir, cache_bytes=1 << 34)
    o.update(options)
    stream = iter(data.LaionShards(shards, 32, a.res, 0, 0, 1, 0, o))
    served, marks = 0, [time.perf_counter()]
    for images, *_ in stream:
        served += len(images['hit']) if isinstance(images, dict) else len(images)
        if served >= len(marks) * valid - 32:  # a partial batch waits for the next pass
            marks.append(time.perf_counter())
            if len(marks) == 3:
                break
    stream.close()
    return [valid / (b - a) for a, b in zip(marks, marks[1:])]


def url_shard(folder, url, n):
    path = os.path.join(folder, 'shard_00000.jsonl')
    with open(path, 'w') as f:
        f.writelines(json.dumps({'url': f'{url}/{i}.jpg', 'caption': str(i), 'width': 0, 'height': 0}) + '\n'
                     for i in range(n))
    return path


def url_rates(photos, dead, stalled, a, cache_dir):
    """Over a first pass (network) and a second (the same URLs: the RAM cache); the server runs in another process."""
    q = multiprocessing.Queue()
    proc = multiprocessing.Process(target=serve, args=(photos, dead, stalled, q), daemon=True)
    proc.start()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        rates = pass_rates([url_shard(tmp, q.get(), len(photos))], a, cache_dir, len(photos) - len(dead) - len(stalled))
    proc.terminate()
    return rates


def tar_shard(path, photos):
    """img2dataset's layout: 000000000.jpg, .txt, .json."""
    with tarfile.open(path, 'w') as tar:
        for i, body in enumerate(photos):
            for ext, blob in (('jpg', body), ('txt', str(i).encode()), ('json', b'{}')):
                info = tarfile.TarInfo(f'{i:09d}.{ext}')
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


def bench_stream(a):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))  # fault_server.py
    torch.set_num_threads(1)
    photos = web_photos(a.n)
    t0 = time.perf_counter()
    for body in photos:  # what the streamer must do for each image, on one core
        img = np.asarray(data.decode(body, a.res, 50_000_000, 64))
        h, w = img.shape[:2]
        torch.from_numpy(img[(h - a.res) // 2:(h + a.res) // 2, (w - a.res) // 2:(w + a.res) // 2].copy())
    decode = a.n / (time.perf_counter() - t0)
    rng = np.random.default_rng(1)
    order = rng.permutation(a.n)
    dead, stalled = order[:int(0.3 * a.n)], order[int(0.3 * a.n):int(0.35 * a.n)]
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # stalled fetches may write late
        clean, cached = url_rates(photos, [], [], a, os.path.join(tmp, 'a'))
        faults, _ = url_rates(photos, dead, stalled, a, os.path.join(tmp, 'b'))
        tar, _ = pass_rates([tar_shard(os.path.join(tmp, '00000.tar'), photos)], a, os.path.join(tmp, 'c'), a.n,
                            fetch_threads=1)  # one decoding thread: per core, as the decode rate
        # latent hits: SD-VAE latents of the crop and its flip, (2, 4, res/8, res/8) in fp16, already in the cache
        shard, g = url_shard(tmp, 'http://unused.invalid', a.n), a.res // 8
        cache = data.Cache(os.path.join(tmp, 'd'), 1 << 34, 1)
        for i in range(a.n):
            cache.put(f'http://unused.invalid/{i}.jpg|{a.res}|bench', arrays=[rng.standard_normal((2, 4, g, g))])
        latents, _ = pass_rates([shard], a, os.path.join(tmp, 'd'), a.n, latent_tag='|bench', random_flip=True)
    print(f'{a.n} JPEGs 300-1600 px wide, to {a.res} px, one worker with {a.threads} fetch threads, '
          f'deadline {a.timeout:g} s, {os.cpu_count()} cores')
    print(f'decode + resize + crop, one core: {decode:9.1f} samples/s')
    print(f'URLs, clean:                      {clean:9.1f} samples/s  ({clean / decode:.0%} of decode)')
    print(f'URLs, 30% dead + 5% stalled:      {faults:9.1f} samples/s  ({faults / decode:.0%} of decode, '
          f'valid images only)')
    print(f'local tar shard, one thread:      {tar:9.1f} samples/s  ({tar / decode:.0%} of decode)')
    print(f'cache hits, pixels:               {cached:9.1f} samples/s')
    print(f'cache hits, latents (fp16):       {latents:9.1f} samples/s')


def bench_latent(a):
    """A training step fed pre-made latents, fed by the stream's warm latent cache, and encoding pixels with the VAE
    on the fly: the same DiT, batch and VAE (SD-VAE's architecture; FLOPs do not depend on the random weights)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))  # fault_server.py
    from offline_laion import save_sd_vae
    autocast = autocast_for(a.device, a.dtype)
    photos = web_photos(4 * a.batch)
    q = multiprocessing.Queue()
    proc = multiprocessing.Process(target=serve, args=(photos, [], [], q), daemon=True)
    proc.start()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        frozen = torch.bfloat16 if a.dtype == 'bfloat16' else torch.float32
        vae = load_vae(save_sd_vae(os.path.join(tmp, 'vae'))).to(a.device, frozen)
        o = dict(fetch_threads=16, fetch_timeout=10.0, max_image_bytes=16_000_000, max_image_pixels=50_000_000,
                 min_image_size=64, allow_private_urls=True, honor_robots=True, random_crop=False, random_flip=True,
                 cache_dir=os.path.join(tmp, 'cache'), cache_bytes=1 << 34)
        shard = url_shard(tmp, q.get(), len(photos))
        make = lambda: data.LaionStream(shard, a.batch, a.res, 0, 0, 1, a.workers,  # noqa: E731
                                        pin_memory=a.device.startswith('cuda'), vae=vae, cache_tag='bench', **o)
        first = make()
        for _ in range(4):  # one epoch: every latent encoded and cached
            premade, _ = next(first)
        stream = make()  # a new stream, as after a restart: its workers prefetched nothing before the cache was warm
        model = DiT(a.model, 4, a.text_dim, a.res // 8).to(a.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ctx = torch.randn(a.batch, a.text_len, a.text_dim, device=a.device)
        pixels = torch.randint(0, 256, (a.batch, 3, a.res, a.res), dtype=torch.uint8)

        def train(z0):
            t = torch.rand(a.batch, device=a.device)
            with autocast:
                loss = flow.loss(model, z0, t, ctx, torch.randn_like(z0)).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        feeds = {'pre-made latents': lambda: premade,
                 'latent cache (warm)': lambda: next(stream)[0],
                 'VAE encode on the fly': lambda: vae.encode(pixels.to(a.device).float() / 127.5 - 1).float()}
        for feed in feeds.values():
            train(feed())
        times = {name: [] for name in feeds}
        for _ in range(a.steps):  # interleaved: a drifting machine slows all three alike
            for name, feed in feeds.items():
                times[name].append(timed(lambda: train(feed()), a.device))
    proc.terminate()
    base = float(np.median(times['pre-made latents']))
    served, hits = stream.counters()[:2]
    print(f'{a.model} at {a.res} px, batch {a.batch}, {a.dtype}, SD-VAE architecture, {a.workers} data worker(s), '
          f'on {device_name(a.device)}; the warm stream served {hits} of {served} samples from the cache')
    for name, ts in times.items():
        print(f'{name:24s} {np.median(ts) * 1e3:9.1f} ms/step  ({np.median(ts) / base:.3f} x pre-made)')


def bench_prepare(a):
    """prepare_laion.py over generated Re-LAION-like parquet files (2% of the URLs repeated, mostly from other files):
    rows/s per process and peak memory at a quarter of --rows and at --rows, with the same rows per file (a row group)
    and per output shard, and the disk its output takes."""
    import resource
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (a.rows // 4, a.rows):
            folder = os.path.join(tmp, f'in{rows}')
            os.makedirs(folder)
            files, per_file = max(1, rows // a.rows_per_file), min(rows, a.rows_per_file)
            for i in range(files):
                ids = np.arange(i * per_file, (i + 1) * per_file)
                again = rng.random(per_file) < 0.02
                ids[again] = rng.integers(0, rows, again.sum())  # URLs of other files, or of this one
                pq.write_table(pa.table({
                    'url': [f'https://img{j % 997}.example.com/photos/{j}/full-size.jpg' for j in ids],
                    'caption': [f'a photograph of item {j}, taken outdoors in the afternoon light' for j in ids],
                    'original_width': rng.integers(200, 2000, per_file),
                    'original_height': rng.integers(200, 2000, per_file),
                    'punsafe': rng.random(per_file) * 0.2, 'pwatermark': rng.random(per_file),
                    'similarity': rng.random(per_file) * 0.4}), os.path.join(folder, f'{i:05d}.parquet'))
            out = os.path.join(tmp, f'out{rows}')
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t0 = time.perf_counter()
            shards = max(1, rows // a.rows_per_shard)
            subprocess.run([sys.executable, 'prepare_laion.py', '--input', os.path.join(folder, '*.parquet'),
                            '--out_dir', out, '--num_shards', str(shards), '--workers', str(a.workers)],
                           check=True, capture_output=True)
            dt = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
            kept = json.load(open(os.path.join(out, 'summary.json')))['kept']
            print(f'{rows:>10,d} rows in {files} files, {shards} shards, {a.workers} '
                  f'process(es): {dt:6.1f} s, {rows / dt / a.workers:9,.0f} rows/s per process, peak RSS of one '
                  f'process {max(peak, before) / 1024:6.0f} MB, output {size / kept:.0f} bytes per kept row '
                  f'({kept:,d} kept)')


def device_name(device):
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(device)
    return f'CPU ({torch.get_num_threads()} threads)'


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='what', required=True)
    for name in ('train', 'sample', 'latent'):
        s = sub.add_parser(name)
        s.add_argument('--model', default='DiT-S/2', choices=list(PRESETS))
        s.add_argument('--res', type=int, default=128, help='pixels; latents are res/8 x res/8 x 4')
        s.add_argument('--batch', type=int, default=8)
        s.add_argument('--text_len', type=int, default=77)
        s.add_argument('--text_dim', type=int, default=768)
        s.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'])
        s.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
        if name != 'latent':
            s.add_argument('--compile', action='store_true')
    train = sub.choices['train']
    train.add_argument('--steps', type=int, default=5, help='timed steps')
    train.add_argument('--warmup', type=int, default=2)
    train.add_argument('--grad_checkpointing', action='store_true')
    sample = sub.choices['sample']
    sample.add_argument('--steps', type=int, default=28)
    sample.add_argument('--cfg', type=float, default=4.0)
    sample.add_argument('--repeats', type=int, default=2)
    stream = sub.add_parser('stream')
    stream.add_argument('--n', type=int, default=1000)
    stream.add_argument('--res', type=int, default=256)
    stream.add_argument('--threads', type=int, default=64)
    stream.add_argument('--timeout', type=float, default=2.0)
    prep = sub.add_parser('prepare')
    prep.add_argument('--rows', type=int, default=2_000_000)
    prep.add_argument('--rows_per_file', type=int, default=250_000)
    prep.add_argument('--rows_per_shard', type=int, default=50_000)
    prep.add_argument('--workers', type=int, default=os.cpu_count())
    latent = sub.choices['latent']
    latent.set_defaults(res=64)
    latent.add_argument('--steps', type=int, default=5)
    latent.add_argument('--workers', type=int, default=1)
    a = p.parse_args()
    least = dict(warmup=0)  # every other count at least 1: a one-line error, not a traceback deep in a benchmark
    for flag, value in vars(a).items():
        if type(value) is int and value < least.get(flag, 1):
            raise SystemExit(f'error: --{flag} must be at least {least.get(flag, 1)}, got {value}')
    if 'device' in a:  # 'auto' resolved here, once; a bad --device stops in one line before any work
        a.dtype = resolve_dtype(a.dtype, a.device)[0]
    {'train': bench_train, 'sample': bench_sample, 'stream': bench_stream, 'latent': bench_latent,
     'prepare': bench_prepare}[a.what](a)
