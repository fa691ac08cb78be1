"""The LAION streamer against a real loopback server serving images and faults."""
import io
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fault_server as fs
from conftest import TINY, interrupt, logged_losses, run, stream_options

SIZE = 32


def options(tmp_path, **kw):
    return stream_options(tmp_path, SIZE, **kw)


def write_shards(folder, rows, n):
    os.makedirs(folder, exist_ok=True)
    for s in range(n):
        with open(folder / f'shard_{s:05d}.jsonl', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows[s::n])
    return str(folder / 'shard_*.jsonl')


def exif_rotated():
    # stored landscape 96x64 with a red left third; EXIF orientation 6 shows it portrait, red on top
    img = np.full((64, 96, 3), 255, np.uint8)
    img[:, :32] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return fs.encode(Image.fromarray(img), 'JPEG', exif=exif.tobytes(), quality=95)


def palette_alpha():
    img = Image.new('RGBA', (40, 40), (0, 0, 255, 0))  # fully transparent blue: must become white
    return fs.encode(img.convert('P'), 'PNG', transparency=0)


FAULTS = {  # path -> (route, the reason it must be counted under)
    '/404.jpg': (fs.status(404), 'http_error'),
    '/500.jpg': (fs.status(500), 'http_error'),
    '/hang.jpg': (fs.hang, 'timeout'),
    '/drip.jpg': (fs.drip, 'timeout'),
    '/endless.jpg': (fs.endless, 'too_large'),
    '/html.jpg': (lambda h: fs.send(h, b'<html><body>gone</body></html>', 'image/jpeg'), 'not_an_image'),
    '/truncated.jpg': (fs.jpeg(200, 150)[:1500], 'not_an_image'),
    '/bomb.png': (fs.png_header_only(60000, 60000), 'pixel_bomb'),
    '/loop.jpg': (fs.redirect('/loop.jpg'), 'redirect_loop'),
    '/noai.jpg': (lambda h: fs.send(h, fs.jpeg(64, 64), headers=[('X-Robots-Tag', 'noai, noimageai')]), 'robots_noai'),
    '/tiny.jpg': (fs.jpeg(16, 16), 'too_small'),
}
VALID = {  # path -> route; each must be delivered, SIZE x SIZE
    '/a.jpg': fs.jpeg(320, 240, 1), '/b.jpg': fs.jpeg(100, 300, 2), '/c.jpg': fs.jpeg(64, 64, 3),
    '/cmyk.jpg': fs.encode(Image.new('CMYK', (50, 50), (0, 255, 255, 0)), 'JPEG', quality=95),  # red
    '/palette_alpha.png': palette_alpha(),
    '/gray16.png': fs.encode(Image.fromarray(np.full((40, 40), 30000, np.uint16)), 'PNG'),
    '/exif.jpg': exif_rotated(),
    '/moved.jpg': fs.redirect('/a.jpg'),
}


IMAGES = {f'/img{i}.jpg': fs.jpeg(48, 40, i) for i in range(24)}  # plain 48x40 JPEGs


@pytest.fixture(scope='module')
def server():
    url, hits, srv = fs.start({**{p: r for p, (r, _) in FAULTS.items()}, **VALID, **IMAGES})
    yield url, hits
    srv.shutdown()


def rows_for(url, paths):
    return [{'url': url + p, 'caption': p, 'width': 100, 'height': 100} for p in paths]


def test_every_fault_counted_and_every_image_delivered(server, tmp_path):
    url, hits = server
    pattern = write_shards(tmp_path / 'shards', rows_for(url, list(FAULTS) + list(VALID)), 1)
    o = options(tmp_path)  # train.py's deadline: a 1 s one lost good images to a CI host's stall (a, c, moved)
    ds = data.LaionShards([pattern.replace('*', '00000')], 1, SIZE, 0, 0, 1, 0, o)
    it = iter(ds)
    t0 = time.time()
    got = {}
    for _ in VALID:
        images, captions, _, position, stats = next(it)
        got[captions[0]] = images[0]
    assert time.time() - t0 < o['fetch_timeout']  # served as they arrive, not held behind the hang and the drip
    assert set(got) == set(VALID)
    assert all(img.shape == (3, SIZE, SIZE) and img.dtype == torch.uint8 for img in got.values())
    assert position[0] == 0  # still the first epoch
    # one more batch: the first epoch is then over, every fault counted. The hang is cut at half the deadline (no
    # headers within the read timeout), the drip at the deadline: in parallel 1x, one after the other 1.5x
    _, _, _, position, stats = next(it)
    assert time.time() - t0 < 1.5 * o['fetch_timeout']
    assert position[0] == 1
    for path, (_, reason) in FAULTS.items():
        assert stats[reason] >= 1, (path, reason, stats)
    expected = {}
    for _, reason in FAULTS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert all(expected[r] <= stats[r] <= 2 * expected[r] for r in expected), stats  # epoch 2 may have begun
    assert sum(stats[r] for r in data.REASONS if r not in expected) == 0, str(stats)
    # the images themselves: orientation, alpha, CMYK, 16-bit
    exif = got['/exif.jpg'].float()
    assert exif[0, :4].mean() > 200 and exif[1, :4].mean() < 60  # red on top: EXIF orientation applied
    assert exif[1, -4:].mean() > 200  # white at the bottom
    assert got['/palette_alpha.png'].float().mean() > 250  # transparent matted onto white
    cmyk = got['/cmyk.jpg'].float().mean(dim=(1, 2))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60
    assert abs(got['/gray16.png'].float().mean() - 30000 / 256) < 2
    # a second epoch comes from the cache alone: no request reaches the server
    before = sum(hits.values())
    for _ in range(len(VALID)):
        next(it)
    assert sum(hits.values()) == before


def test_fetch_deadline_and_private_addresses(server):
    url, _ = server
    import requests
    session = requests.Session()
    for path in ('/hang.jpg', '/drip.jpg', '/endless.jpg'):
        t0 = time.time()
        with pytest.raises(data.Skip):
            data.fetch(session, url + path, deadline=0.5, max_bytes=10 ** 9, allow_private=True, honor_robots=True)
        assert time.time() - t0 < 0.9, path  # a total deadline, not a per-read timeout
    for bad, reason in ((url + '/a.jpg', 'private_address'), ('ftp://example.com/a.jpg', 'bad_url'),
                        ('file:///etc/passwd', 'bad_url')):
        with pytest.raises(data.Skip, match=reason):
            data.fetch(session, bad, 1.0, 10 ** 6, allow_private=False, honor_robots=True)
    body = data.fetch(session, url + '/noai.jpg', 1.0, 10 ** 6, allow_private=True, honor_robots=False)
    assert Image.open(io.BytesIO(body)).size == (64, 64)


def test_retry_on_503_then_success():
    state = {'n': 0}

    def flaky(h):
        state['n'] += 1
        fs.send(h, b'busy', 'text/plain', 503) if state['n'] < 3 else fs.send(h, fs.jpeg(64, 64))
    url, hits, srv = fs.start({'/flaky.jpg': flaky, '/gone.jpg': fs.status(404), '/slow.jpg': fs.hang})
    s = data.session(1)  # the streamer's own session
    assert len(data.fetch(s, url + '/flaky.jpg', 5.0, 10 ** 6, True, True)) > 100
    with pytest.raises(data.Skip, match='http_error'):
        data.fetch(s, url + '/gone.jpg', 5.0, 10 ** 6, True, True)
    with pytest.raises(data.Skip, match='timeout'):
        data.fetch(s, url + '/slow.jpg', 0.5, 10 ** 6, True, True)
    assert hits['/flaky.jpg'] == 3 and hits['/gone.jpg'] == 1 and hits['/slow.jpg'] == 1  # only the 503s retried
    srv.shutdown()


def test_shards_split_disjoint_and_complete_over_ranks_and_workers(server, tmp_path):
    url, _ = server
    paths = list(IMAGES)
    pattern = write_shards(tmp_path / 'shards', rows_for(url, paths), 4)
    shards = sorted(str(p) for p in (tmp_path / 'shards').iterdir())
    for epoch in (0, 1):
        parts = [data.LaionShards(shards, 1, SIZE, 0, r, 2, 2, {}).my_shards(epoch, r * 2 + w)
                 for r in (0, 1) for w in (0, 1)]
        assert sorted(sum(parts, [])) == shards and all(len(p) == 1 for p in parts)
    ds = data.LaionShards(shards, 1, SIZE, 0, 0, 2, 2, {})
    assert len({tuple(ds.my_shards(e, 0)) for e in range(8)}) > 1  # reshuffled each epoch
    # real DataLoader workers: each rank gets the rows of its shards, each once
    seen = []
    for rank in (0, 1):
        stream = data.LaionStream(pattern, 2, SIZE, 0, rank, 2, 2, **options(tmp_path))
        for _ in range(6):  # 12 rows per rank = 2 workers x 1 shard x 6 rows, batches of 2
            seen += next(stream)[1]
        assert set(stream.state_dict()['positions']) == {0, 1}
    del stream  # its workers stop now: pytest.raises below keeps this frame alive in a cycle, for the collector
    assert sorted(seen) == sorted(paths)
    with pytest.raises(ValueError, match='cannot feed'):
        data.LaionShards(shards, 1, SIZE, 0, 0, 3, 2, {})
    with pytest.raises(SystemExit, match=r'^error: 4 shard\(s\) cannot feed 3 rank\(s\) x 2 worker\(s\)') as e:
        data.LaionStream(pattern, 2, SIZE, 0, 0, 3, 2, **options(tmp_path))  # as train.py meets it: one line
    assert '\n' not in str(e.value)


def test_resume_serves_each_image_once(server, tmp_path):
    url, _ = server
    paths = list(IMAGES) + ['/404.jpg', '/hang.jpg', '/html.jpg']
    pattern = write_shards(tmp_path / 'shards', rows_for(url, paths), 2)
    opts = options(tmp_path)
    first = data.LaionStream(pattern, 2, SIZE, 0, 0, 1, 0, **opts)
    served = sum((next(first)[1] for _ in range(5)), [])
    state = json.loads(json.dumps(first.state_dict()))  # through the checkpoint's plain types
    second = data.LaionStream(pattern, 2, SIZE, 0, 0, 1, 0, **opts)
    second.load_state_dict(torch.load(save(tmp_path, state), weights_only=True))
    served += sum((next(second)[1] for _ in range(7)), [])
    images = sorted(p for p in paths if p.startswith('/img'))
    assert sorted(served) == images, (first.stats, second.stats)  # none twice, none skipped


def save(tmp_path, obj):
    torch.save(obj, tmp_path / 'state.pt')
    return tmp_path / 'state.pt'


def test_cache_bound_holds(server, tmp_path):
    url, _ = server
    pattern = write_shards(tmp_path / 'shards', rows_for(url, list(IMAGES)), 1)
    one = 5 + 32 * 38 * 3  # a cached 48x40 image resized to a 32-pixel shorter side
    stream = data.LaionStream(pattern, 4, SIZE, 0, 0, 1, 0, **options(tmp_path, cache_bytes=5 * one + 100))
    for _ in range(6):
        next(stream)
    files = list((tmp_path / 'cache').iterdir())
    assert sum(f.stat().st_size for f in files) <= 5 * one + 100 and len(files) == 5
    assert stream.counters()[0] == 24


def test_decode_sizes_and_crops(tmp_path):
    img = data.decode(fs.jpeg(640, 480), 256, 10 ** 8, 64)
    assert min(img.size) == 256 and img.size == (341, 256)
    ds = data.LaionShards(['x'], 1, 256, 0, 0, 1, 0, options(tmp_path, random_crop=True, random_flip=True))
    crops = {tuple(ds.crop(np.asarray(img), np.random.default_rng(i).random(3)).float().mean(dim=(0, 1))[:8].tolist())
             for i in range(8)}
    assert len(crops) > 1  # random crops and flips differ
    with pytest.raises(data.Skip, match='too_small'):
        data.decode(fs.jpeg(100, 50), 256, 10 ** 8, 64)



def train_on_the_stream(url, tmp_path):
    """train.py's command line for a tiny run on the loopback server's images, with two DataLoader workers."""
    pattern = write_shards(tmp_path / 'shards', rows_for(url, list(IMAGES) + ['/404.jpg', '/html.jpg']), 2)
    return [sys.executable, 'train.py', *TINY, '--image_size=32', '--dataset=laion', f'--data_shards={pattern}',
            '--data_workers=2', '--fetch_threads=4', '--allow_private_urls=True', '--min_image_size=32',
            f'--cache_dir={tmp_path / "cache"}', '--cache_gb=0.01', f'--out_dir={tmp_path / "out"}', '--batch_size=4']


def test_train_on_the_stream_and_resume(server, tmp_path):
    args = train_on_the_stream(server[0], tmp_path)
    p = run(args + ['--max_iters=2'])
    assert p.stdout.count('data: 4 served | cache hits') == 2  # the stream's health, every log line
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert set(ckpt['data'][0]['positions']) == {0, 1}
    p = run(args + ['--max_iters=4', '--init_from=resume'])
    assert sorted(logged_losses(p.stdout)) == [3, 4] and 'cache hits' in p.stdout


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_to_the_group_checkpoints_with_the_workers_alive(server, tmp_path, sig):
    # Ctrl-C in a terminal, or a scheduler's SIGTERM, signals the whole process group, the DataLoader's workers too:
    # they leave it to the training process, which checkpoints the step it is in, then stops them and exits. A worker
    # gone first fails that step, nothing saved; one that outlives its DataLoader keeps the run from exiting
    args = train_on_the_stream(server[0], tmp_path) + ['--max_iters=1000', '--ckpt_interval=1000']
    status, printed = interrupt(args, after_step=2, sig=sig, whom=lambda p: [-p.pid], timeout=120)
    stopped = max(logged_losses(printed))
    assert status == 128 + sig and f'stopped at step {stopped}' in printed.splitlines()[-1], printed[-3000:]
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == stopped and set(ckpt['data'][0]['positions']) == {0, 1}
