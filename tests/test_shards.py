"""Webdataset tar shards as a second row source, and the latent cache: what a GPU's data path is made of."""
import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch

import data
import fault_server as fs
from conftest import TINY, logged_losses, run, stream_options, tiny_vae
from encoders import load_vae

SIZE = 16


def options(tmp_path, **kw):
    return stream_options(tmp_path, SIZE, fetch_timeout=2.0, **kw)


def write_tar(path, captions, corrupt=(), truncate_in=None):
    """img2dataset's layout: 000000000.jpg + .txt + .json per sample. `corrupt`: samples whose .jpg is garbage;
    `truncate_in`: cut the file inside that sample's .jpg. Returns the captions a reader must serve."""
    cut = None
    with tarfile.open(path, 'w') as tar:
        for i, caption in enumerate(captions):
            jpg = b'\xff\xd8 not a jpeg at all' * 20 if i in corrupt else fs.jpeg(24, 20, seed=hash(caption) % 1000)
            for ext, body in (('jpg', jpg), ('txt', caption.encode()), ('json', json.dumps({'key': i}).encode())):
                info = tarfile.TarInfo(f'{i:09d}.{ext}')
                info.size = len(body)
                if i == truncate_in and ext == 'jpg':
                    cut = tar.fileobj.tell() + 512 + len(body) // 2  # header, then half the data
                tar.addfile(info, io.BytesIO(body))
    if cut:
        with open(path, 'r+b') as f:
            f.truncate(cut)
    last = truncate_in if truncate_in is not None else len(captions)
    return [c for i, c in enumerate(captions[:last]) if i not in corrupt]


@pytest.fixture
def tars(tmp_path):
    """4 shards of 5 samples; shard 1 has a corrupt member, shard 3 is truncated in its 4th sample."""
    folder, valid = tmp_path / 'tars', []
    folder.mkdir()
    for s in range(4):
        caps = [f'shard {s} sample {i}' for i in range(5)]
        valid += write_tar(folder / f'{s:05d}.tar', caps, corrupt={2} if s == 1 else (),
                           truncate_in=3 if s == 3 else None)
    return str(folder / '{00000..00003}.tar'), sorted(valid)


def first_epoch(stream):
    """Captions served in each worker's first epoch (batches of 1), read until every worker has begun its second."""
    served, positions = [], stream.dataset.positions
    while True:
        before = dict(positions)
        _, captions = next(stream)
        w = next(w for w, p in positions.items() if before.get(w) != p)  # the worker this batch came from
        if positions[w][0] == 0:
            served += captions
        elif len(positions) == stream.workers and all(p[0] >= 1 for p in positions.values()):
            return served


def test_tar_shards_split_over_ranks_and_workers(tars, tmp_path):
    pattern, valid = tars
    served, counts = [], {}
    for rank in range(2):
        stream = data.LaionStream(pattern, 1, SIZE, 0, rank, 2, 2, **options(tmp_path))
        served += first_epoch(stream)
        for k, n in zip(data.COUNTERS, stream.counters()):
            counts[k] = counts.get(k, 0) + n
    assert sorted(served) == valid  # disjoint and complete: each valid sample once over 2 ranks x 2 workers
    assert counts['not_an_image'] >= 1 and counts['bad_shard'] >= 1, counts  # the corrupt member, the truncated tar


def test_resume_mid_tar_serves_nothing_twice(tars, tmp_path):
    pattern, valid = tars
    first = data.LaionStream(pattern, 2, SIZE, 0, 0, 1, 0, **options(tmp_path))
    served = sum((next(first)[1] for _ in range(3)), [])  # 6 of 17: inside the first tar or the second
    state = json.loads(json.dumps(first.state_dict()))  # through the checkpoint's plain types
    second = data.LaionStream(pattern, 2, SIZE, 0, 0, 1, 0, **options(tmp_path))
    second.load_state_dict(state)
    while len(served) < len(valid):
        served += next(second)[1]
    assert sorted(served[:len(valid)]) == valid  # none twice, none skipped


def test_tars_over_http_stream_like_local_ones(tars, tmp_path):
    pattern, valid = tars
    folder = tmp_path / 'tars'
    url, hits, server = fs.start({f'/wds/{s:05d}.tar': (folder / f'{s:05d}.tar').read_bytes() for s in range(4)})
    try:
        stream = data.LaionStream(url + '/wds/{00000..00003}.tar', 1, SIZE, 0, 0, 1, 1,
                                  **options(tmp_path, cache_dir=str(tmp_path / 'cache2')))
        assert sorted(first_epoch(stream)) == valid
        assert all(hits[f'/wds/{s:05d}.tar'] >= 1 for s in range(4))
    finally:
        server.shutdown()


class Counting:
    """A VAE whose encode calls are counted."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0

    def parameters(self):
        return self.vae.parameters()

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


@pytest.fixture(scope='module')
def web(tmp_path_factory):
    images = {f'/p{i}.jpg': fs.jpeg(64, 48, seed=i) for i in range(8)}  # 4x3 blocks: not mirror-symmetric
    url, hits, server = fs.start(images)
    yield url, hits, images
    server.shutdown()


def url_shards(folder, url, images):
    folder.mkdir()
    with open(folder / 'shard_00000.jsonl', 'w') as f:
        f.writelines(json.dumps({'url': url + p, 'caption': p, 'width': 64, 'height': 48}) + '\n' for p in images)
    return str(folder / 'shard_*.jsonl')


def epoch_latents(stream, n):
    """caption -> latent over the next n samples (one epoch), batches of 4."""
    out = {}
    for _ in range(n // 4):
        z, captions = next(stream)
        out.update(zip(captions, z))
    return out


def test_second_epoch_comes_from_the_latent_cache(web, tmp_path):
    url, hits, images = web
    pattern = url_shards(tmp_path / 'shards', url, images)
    vae = Counting(load_vae(tiny_vae(tmp_path / 'vae')))
    stream = data.LaionStream(pattern, 4, SIZE, 0, 0, 1, 0, vae=vae, cache_tag='vae-a', **options(tmp_path))
    first = epoch_latents(stream, len(images))
    assert vae.calls == 2 and len(first) == len(images) and first['/p0.jpg'].shape == (4, SIZE // 2, SIZE // 2)
    requests_before = sum(hits.values())
    second = epoch_latents(stream, len(images))
    assert vae.calls == 2 and sum(hits.values()) == requests_before  # no VAE forward, no request
    assert all(torch.equal(first[c], second[c]) for c in images)  # the very latents the first epoch trained on
    assert stream.counters()[1] == len(images)  # cache hits
    # what was cached is the fp16 latent of the center crop
    img = np.array(data.decode(images['/p3.jpg'], SIZE, 10 ** 8, SIZE))  # (16, 21, 3): 64x48 to a 16-pixel side
    crop = torch.from_numpy(img[:, 2:18].copy()).permute(2, 0, 1)
    direct = vae.vae.encode(crop[None].float() / 127.5 - 1)[0]
    torch.testing.assert_close(first['/p3.jpg'], direct.half().float(), atol=2e-3, rtol=0)
    # a cache made with one VAE is never read by another
    other = Counting(load_vae(tiny_vae(tmp_path / 'vae-b', scaling_factor=0.5)))
    stream_b = data.LaionStream(pattern, 4, SIZE, 0, 0, 1, 0, vae=other, cache_tag='vae-b', **options(tmp_path))
    z_b = epoch_latents(stream_b, len(images))
    assert other.calls == 2 and stream_b.counters()[1] == 0
    assert not torch.equal(z_b['/p3.jpg'], first['/p3.jpg'])


def test_latent_cache_with_flips_and_caption_embeddings(web, tmp_path):
    url, hits, images = web
    pattern = url_shards(tmp_path / 'shards', url, images)
    vae = Counting(load_vae(tiny_vae(tmp_path / 'vae')))
    from encoders import HashTextEncoder
    text = HashTextEncoder(dim=8, max_length=4)
    calls = []
    encode_text = lambda caps: calls.append(len(caps)) or text(caps)  # noqa: E731
    make = lambda: data.LaionStream(pattern, 4, SIZE, 0, 0, 1, 0, vae=vae, text_encoder=encode_text,  # noqa: E731
                                    cache_tag='vae|hash', **options(tmp_path, random_flip=True))
    stream = make()
    latents, ctx = {}, {}
    for epoch in range(4):
        for _ in range(2):
            z, c = next(stream)
            for i in range(4):  # the caption embedding stands in for the caption
                key = next(p for p in images if torch.equal(c[i], text([p])[0].half().float()))
                latents.setdefault(key, []).append(z[i])
    assert vae.calls == 2 and sum(calls) == len(images)  # encoded once each, crop and flip together
    for key, zs in latents.items():
        views = {tuple(z.flatten()[:6].tolist()) for z in zs}
        assert 1 <= len(views) <= 2  # the crop's latent or its flip's, nothing else
    assert sum(len({tuple(z.flatten()[:6].tolist()) for z in zs}) for zs in latents.values()) > len(images)
    # a new stream over the warm cache (another process, say) encodes nothing
    warm = make()
    next(warm)
    assert vae.calls == 2 and sum(calls) == len(images)


def test_train_on_tar_shards_and_the_warm_latent_cache(tars, tmp_path):
    pattern, _ = tars
    args = [sys.executable, 'train.py', *TINY, '--dataset=laion', f'--data_shards={pattern}', '--image_size=16',
            f'--vae={tiny_vae(tmp_path / "vae")}', '--data_workers=1', '--fetch_threads=1', '--min_image_size=16',
            f'--cache_dir={tmp_path / "cache"}', '--batch_size=4', '--max_iters=4']
    cold = run(args + [f'--out_dir={tmp_path / "a"}'])
    assert 'cache hits 0%' in cold.stdout and 'wait' in cold.stdout
    warm = run(args + [f'--out_dir={tmp_path / "b"}'])
    assert warm.stdout.count('cache hits 100%') == 4
    assert logged_losses(warm.stdout) == logged_losses(cold.stdout)  # the same fp16 latents, cold or warm
    run(args[:-1] + ['--max_iters=2', f'--out_dir={tmp_path / "c"}'])
    resumed = run(args + [f'--out_dir={tmp_path / "c"}', '--init_from=resume'])
    assert sorted(logged_losses(resumed.stdout)) == [3, 4]
    assert all(logged_losses(resumed.stdout)[s] == logged_losses(warm.stdout)[s] for s in (3, 4))
