"""
The embedded dataset of flowdit, drawn on the fly: one shape on a uniform background, captioned from a small
grammar, and its evaluator, which reads the attributes back from pixels. A stream's next() gives (images, captions):
uint8 (B, 3, H, W) and a list of B strings; its state_dict() / load_state_dict() let a checkpoint resume it exactly.
"""
import numpy as np
import torch

# This spec is a public contract (README.md): users type prompts from it.

PALETTE = {'red': (220, 40, 40), 'green': (40, 170, 70), 'blue': (40, 80, 220), 'yellow': (235, 210, 40),
           'purple': (140, 60, 190), 'orange': (240, 130, 30), 'white': (240, 240, 240), 'black': (25, 25, 25)}
SHAPES = ('circle', 'square', 'triangle')
SIZES = {'small': (0.12, 0.16), 'large': (0.24, 0.30)}  # radius r as a fraction of the canvas's shorter side
POSITIONS = {'in the center': (0.5, 0.5), 'on the left': (0.28, 0.5), 'on the right': (0.72, 0.5),
             'at the top': (0.5, 0.28), 'at the bottom': (0.5, 0.72)}  # shape centre (x, y) as fractions
JITTER = 0.04
CAPTION = '{size} {color} {shape} {position}, {background} background'


def hw(image_size):
    # a canvas size: an int for a square, or (height, width)
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def draw(shape, color, background, r, cx, cy, image_size):
    """uint8 (H, W, 3); r, cx, cy in pixels. Pixel (i, j) covers [j, j+1) x [i, i+1): its centre decides."""
    y, x = np.mgrid[0:hw(image_size)[0], 0:hw(image_size)[1]] + 0.5
    if shape == 'circle':
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == 'square':
        mask = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    else:  # isosceles, apex up at cy - r, base of width 2r at cy + r: half-width grows by 1/2 per row down
        mask = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    return np.where(mask[..., None], np.uint8(PALETTE[color]), np.uint8(PALETTE[background]))


def random_scene(rng, image_size):
    """One (image, caption, attributes) drawn uniformly from the spec, on a canvas of image_size (int or (H, W))."""
    color, background = rng.choice(list(PALETTE), size=2, replace=False)
    attrs = dict(size=str(rng.choice(list(SIZES))), color=str(color), shape=str(rng.choice(SHAPES)),
                 position=str(rng.choice(list(POSITIONS))), background=str(background))
    H, W = hw(image_size)
    r = rng.uniform(*SIZES[attrs['size']]) * min(H, W)
    fx, fy = np.array(POSITIONS[attrs['position']]) + rng.uniform(-JITTER, JITTER, size=2)
    img = draw(attrs['shape'], attrs['color'], attrs['background'], r, fx * W, fy * H, (H, W))
    return img, CAPTION.format(**attrs), attrs


class ShapesStream:
    """Infinite; batch number `step` of rank `rank` is a pure function of (seed, rank, step). With several buckets
    ((height, width) canvases), each batch is drawn on one of them, chosen uniformly."""

    def __init__(self, batch_size, image_size, seed, rank, pin_memory=False, buckets=None):
        self.batch_size, self.image_size, self.seed, self.rank, self.step = batch_size, image_size, seed, rank, 0
        self.buckets = buckets or [hw(image_size)]
        self.pin_memory = pin_memory  # pinned host memory: the copy to the GPU overlaps with compute

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        size = self.buckets[rng.integers(len(self.buckets)) if len(self.buckets) > 1 else 0]
        images, captions = zip(*(random_scene(rng, size)[:2] for _ in range(self.batch_size)))
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
    H, W = img.shape[:2]
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
    cx, cy = (x0 + x1 + 1) / 2 / W, (y0 + y1 + 1) / 2 / H
    out['position'] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    out['size'] = 'small' if max(w, h) / 2 / min(H, W) < 0.20 else 'large'  # between 0.16 and 0.24
    return out


def adherence(images, scenes):
    """Fraction of images whose read-back attribute matches the prompt's, per attribute."""
    seen = [judge(img) for img in images]
    return {k: np.mean([s.get(k) == scene[k] for s, scene in zip(seen, scenes)])
            for k in ('color', 'background', 'shape', 'position', 'size')}
