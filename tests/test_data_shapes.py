import re

import numpy as np
import torch

import shapes

COLORS = '|'.join(shapes.PALETTE)
GRAMMAR = re.compile(rf'^(small|large) ({COLORS}) (circle|square|triangle) '
                     rf'(in the center|on the left|on the right|at the top|at the bottom), ({COLORS}) background$')


def test_stream_is_deterministic_per_seed_rank_and_step():
    a, b = shapes.ShapesStream(16, 32, seed=3, rank=0), shapes.ShapesStream(16, 32, seed=3, rank=0)
    batches = [next(a) for _ in range(3)]
    assert all(torch.equal(x[0], next(b)[0]) for x in batches)
    other_rank = next(shapes.ShapesStream(16, 32, seed=3, rank=1))
    assert not torch.equal(other_rank[0], batches[0][0])
    resumed = shapes.ShapesStream(16, 32, seed=3, rank=0)
    resumed.load_state_dict(shapes.ShapesStream(16, 32, 3, 0).state_dict() | {'step': 2})
    x, captions = next(resumed)
    assert torch.equal(x, batches[2][0]) and captions == batches[2][1]
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32)


def test_caption_grammar_and_palette():
    images, captions = next(shapes.ShapesStream(200, 32, seed=0, rank=0))
    for img, cap in zip(images, captions):
        m = GRAMMAR.match(cap)
        assert m, cap
        assert m.group(2) != m.group(5)  # the background differs from the shape
        corner = tuple(img[:, 0, 0].tolist())
        assert corner == shapes.PALETTE[m.group(5)]
        colors = {tuple(c) for c in img.reshape(3, -1).T.tolist()}
        assert colors == {shapes.PALETTE[m.group(2)], shapes.PALETTE[m.group(5)]}


def test_geometry_follows_the_spec():
    S = 100
    img = shapes.draw('triangle', 'red', 'blue', r=20, cx=50, cy=50, image_size=S)
    red = np.all(img == shapes.PALETTE['red'], axis=-1)
    ys, xs = np.nonzero(red)
    assert ys.min() in (30, 31) and ys.max() == 69  # apex at cy - r, base at cy + r
    assert xs[ys == 69].min() in (30, 31) and xs[ys == 69].max() == 69  # base of width 2r
    sq = np.all(shapes.draw('square', 'white', 'black', 10, 28, 72, S) == shapes.PALETTE['white'], axis=-1)
    assert sq.sum() == 20 * 20 and sq[72, 28] and not sq[72, 40]
    circ = np.all(shapes.draw('circle', 'green', 'black', 30, 50, 50, S) == shapes.PALETTE['green'], axis=-1)
    assert abs(circ.sum() - np.pi * 900) < 30


def test_attribute_distribution():
    rng = np.random.default_rng(0)
    scenes = [shapes.random_scene(rng, 32)[2] for _ in range(3000)]
    for key, values in [('size', shapes.SIZES), ('shape', shapes.SHAPES), ('position', shapes.POSITIONS),
                        ('color', shapes.PALETTE)]:
        counts = [sum(s[key] == v for s in scenes) for v in values]
        assert min(counts) > 0.7 * 3000 / len(values), (key, counts)


def test_evaluator_reads_the_generator():
    rng = np.random.default_rng(1)
    images, captions, scenes = zip(*(shapes.random_scene(rng, 32) for _ in range(300)))
    scores = shapes.adherence(images, scenes)
    assert all(v >= 0.98 for v in scores.values()), scores
    # and it is not fooled: the wrong prompts score badly
    shuffled = scenes[1:] + scenes[:1]
    assert max(shapes.adherence(images, shuffled).values()) < 0.7
    assert len(shapes.all_scenes()) == 2 * 8 * 3 * 5 * 7
