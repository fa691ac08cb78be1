"""Any size, any shape: aspect-ratio buckets in both streams, progressive resolution, sampling at another size."""
import argparse
import io
import json
import math
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fault_server as fs
import shapes
from conftest import TINY, run, stream_options, tiny_vae
from encoders import PixelSpace, load_vae
from model import DiT, load_weights, resize_table
from sample import size_and_shift
from web import decode, nearest_bucket, parse_buckets

BUCKETS = [(16, 16), (16, 24), (24, 16)]


def kept(h, w, bucket):
    # the fraction of an h x w image left after resizing it to cover the bucket and cropping the rest
    scale = max(bucket[0] / h, bucket[1] / w)
    return bucket[0] * bucket[1] / (h * scale * w * scale)


def test_auto_buckets_span_1_2_to_2_1_at_one_area():
    sizes = parse_buckets('auto', 256, 16)
    assert (256, 256) in sizes and (192, 352) in sizes and (352, 192) in sizes and len(sizes) == 13
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)
    assert all(abs(h * w / 256 ** 2 - 1) < 0.06 for h, w in sizes)  # about the same number of tokens
    assert all(0.5 <= h / w <= 2 for h, w in sizes) and sorted((w, h) for h, w in sizes) == sizes
    assert parse_buckets('', 256, 16) == [(256, 256)]
    assert parse_buckets('32x48, 48X32', 32, 4) == [(32, 48), (48, 32)]
    for spec, needle in (('30x48', 'not multiples of 4'), ('32by48', "'', 'auto' or"), ('0x32', "'', 'auto' or")):
        with pytest.raises(SystemExit, match=needle):
            parse_buckets(spec, 32, 4)


def test_the_bucket_choice_minimises_the_crop():
    sizes, rng = parse_buckets('auto', 256, 16), np.random.default_rng(0)
    for h, w in rng.integers(100, 3000, size=(500, 2)):
        best = nearest_bucket(h, w, sizes)
        assert kept(h, w, best) >= max(kept(h, w, b) for b in sizes) - 1e-9, (h, w, best)
    assert nearest_bucket(480, 640, sizes) == (224, 288) and nearest_bucket(1000, 1000, sizes) == (256, 256)
    # decoding covers the chosen bucket with the least to crop: 640x480 -> 299x224 for 224x288
    img = decode(fs.jpeg(640, 480), 256, 10 ** 8, 64, sizes)
    assert img.size == (299, 224) and nearest_bucket(img.height, img.width, sizes, inside=True) == (224, 288)


def jpeg_tar(path, shard, sizes):
    """A webdataset tar of images of the given (width, height); captions name the sample and the size."""
    captions = []
    with tarfile.open(path, 'w') as tar:
        for i, (w, h) in enumerate(sizes):
            captions.append(f'image {shard}-{i} {w}x{h}')
            for ext, body in (('jpg', fs.jpeg(w, h, seed=i)), ('txt', captions[-1].encode())):
                info = tarfile.TarInfo(f'{i:09d}.{ext}')
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return captions


@pytest.fixture
def mixed(tmp_path):
    """2 tars of 12 images each: 4 landscapes (3:2), 4 portraits (2:3) and 4 squares, shuffled."""
    rng, valid = np.random.default_rng(0), []
    for s in range(2):
        sizes = [((36, 24), (24, 36), (30, 30))[k] for k in rng.permutation([0, 1, 2] * 4)]
        valid += jpeg_tar(tmp_path / f'{s:05d}.tar', s, sizes)
    return str(tmp_path / '{00000..00001}.tar'), sorted(valid)


def bucket_of_caption(caption):
    w, h = map(int, caption.split()[-1].split('x'))
    return nearest_bucket(h, w, BUCKETS)


def test_every_batch_holds_one_bucket_and_resume_serves_nothing_twice(mixed, tmp_path):
    pattern, valid = mixed  # 8 images to a bucket: an epoch is 6 whole batches of 4
    o = stream_options(tmp_path, 16, buckets=BUCKETS, min_image_size=16)
    stream = data.LaionStream(pattern, 4, 16, 0, 0, 1, 0, **o)
    served, seen = [], set()
    for _ in range(2):  # a third of an epoch: rows of the third bucket wait in its partial batch
        images, captions = next(stream)
        bucket = tuple(images.shape[-2:])
        seen.add(bucket)
        assert all(bucket_of_caption(c) == bucket for c in captions)  # one bucket, the right one for each image
        served += captions
    state = json.loads(json.dumps(stream.state_dict()))
    resumed = data.LaionStream(pattern, 4, 16, 0, 0, 1, 0, **{**o, 'cache_dir': str(tmp_path / 'cache2')})
    resumed.load_state_dict(state)
    for _ in range(4):
        images, captions = next(resumed)
        seen.add(tuple(images.shape[-2:]))
        served += captions
    # the epoch exactly: the rows waiting at the checkpoint are served once, after it, and none is skipped
    assert sorted(served) == valid
    assert seen == set(BUCKETS)


def test_latent_cache_keeps_working_with_buckets(mixed, tmp_path):
    pattern, valid = mixed
    vae = load_vae(tiny_vae(tmp_path / 'vae'))  # factor 2
    o = stream_options(tmp_path, 16, buckets=BUCKETS, min_image_size=16)
    stream = data.LaionStream(pattern, 3, 16, 0, 0, 1, 0, vae=vae, cache_tag='vae', **o)
    shapes_seen, hits = set(), 0
    for _ in range(14):  # beyond the first epoch: cached latents come back, batched with fresh ones by bucket
        z, captions = next(stream)
        assert z.shape[:2] == (3, 4) and all(bucket_of_caption(c) == tuple(2 * s for s in z.shape[-2:])
                                             for c in captions)
        shapes_seen.add(tuple(z.shape[-2:]))
        hits = stream.counters()[1]
    assert shapes_seen == {(8, 8), (8, 12), (12, 8)} and hits > 0


def test_shapes_buckets_and_judge_on_non_square_canvases():
    stream = shapes.ShapesStream(8, 32, 0, 0, buckets=[(32, 48), (48, 32)])
    seen = set()
    for _ in range(10):
        images, captions = next(stream)
        seen.add(tuple(images.shape[-2:]))
    assert seen == {(32, 48), (48, 32)}
    rng = np.random.default_rng(1)
    for size in ((32, 48), (48, 32)):  # the evaluator reads the drawn attributes back on either canvas
        drawn = [shapes.random_scene(rng, size) for _ in range(200)]
        score = shapes.adherence([img for img, _, _ in drawn], [a for _, _, a in drawn])
        assert min(score.values()) >= 0.97, score
    # a single canvas draws exactly what the square stream always drew
    a, b = shapes.ShapesStream(4, 32, 0, 0), shapes.ShapesStream(4, 32, 0, 0, buckets=[(32, 32)])
    assert torch.equal(next(a)[0], next(b)[0])


def test_progressive_resolution_and_sampling_at_another_size(tmp_path):
    train = [sys.executable, 'train.py', *TINY, '--ckpt_interval=100']
    run([*train, '--image_size=32', '--max_iters=3', f'--out_dir={tmp_path / "a"}'])
    src = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    # 32 px -> 48 px from the EMA weights, fresh optimizer; with lr 0 the weights stay the source's EMA, its learned
    # table resized to the new grid
    p = run([*train, '--image_size=48', '--max_iters=1', '--learning_rate=0', f'--init_from={tmp_path / "a/ckpt.pt"}',
             f'--out_dir={tmp_path / "b"}'])
    assert 'initialised from the EMA weights' in p.stdout
    dst = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert dst['step'] == 1 and dst['grid'] == 48 and dst['model']['pos_embed'].shape == (1, 144, 192)
    assert torch.equal(dst['model']['pos_embed'], resize_table(src['ema']['pos_embed'], 12, 12))
    assert all(torch.equal(dst['model'][k], v) for k, v in src['ema'].items() if k != 'pos_embed')
    # weights that do not fit, or no checkpoint at all: one line, no traceback (train.py exits through load_weights)
    misfit = DiT('DiT-Ti/4', src['in_channels'], src['caption_dim'], 32, pos_embed='rope')
    with pytest.raises(SystemExit, match='do not fit this model'):
        load_weights(misfit, str(tmp_path / 'a' / 'ckpt.pt'))
    with pytest.raises(SystemExit, match='init_from=.*no checkpoint there'):
        load_weights(misfit, str(tmp_path / 'nowhere' / 'ckpt.pt'))
    # sampling at a size it was not trained at: cells of that size, SD3's shift by default
    out = tmp_path / 'wide.png'
    p = run([sys.executable, 'sample.py', f'--out_dir={tmp_path / "a"}', '--prompt', 'red circle', '--prompt', 'blue',
             '--n', '3', '--steps', '2', '--height', '32', '--width', '64', '--out', str(out)])
    assert Image.open(out).size == (3 * 64, 2 * 32)
    assert 'new to it' in p.stdout and f'time shift {math.sqrt(2):.2f}' in p.stdout
    model = DiT('DiT-Ti/4', 3, src['caption_dim'], 32)
    with pytest.raises(SystemExit, match='multiples of 4'):
        size_and_shift(model, PixelSpace(), src['config'], argparse.Namespace(height=None, width=30, shift=None))
