"""
Generate images from a flowdit checkpoint (the EMA weights).

    python sample.py --prompt "large red circle in the center, blue background" \
                     --prompt "small white square at the top, black background" --n 4
    python sample.py --out_dir out-laion-b2 --prompt "a bowl of fruit" --cfg 4
    python sample.py --prompts_file prompts.txt --cfg 4 --steps 28 --sampler heun --out grid.png
    python sample.py --prompt "..." --init_image photo.png --strength 0.6      # image-to-image
    python sample.py --prompt "..." --height 32 --width 48                     # another size (README)
    python sample.py --eval                                                    # shapes: prompt adherence
    python sample.py --out_dir out-laion-b2 --eval --ref coco-val2014.jsonl    # FID, CLIP score

The grid has one row per prompt, in order, and --n columns, each cell at the trained size or --height x --width.
Without --out_dir it samples the one run under the current folder (out*/ckpt.pt), and names them if there are several.
"""
import argparse
import glob
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from tqdm import tqdm

import flow
import metrics
import shapes
import web
from encoders import load_text_encoder, load_vae
from model import DiT, autocast_for, fit_weights, load_checkpoint, resolve_dtype


def to_uint8(x):
    # (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, rows, path):
    # images: (rows * cols, H, W, 3) uint8, row-major -> the grid, (rows * H, cols * W, 3), also written to path
    cols = len(images) // rows
    grid = images.reshape(rows, cols, *images.shape[1:]).transpose(0, 2, 1, 3, 4)  # (rows, H, cols, W, 3)
    grid = grid.reshape(rows * images.shape[1], cols * images.shape[2], 3)
    Image.fromarray(grid).save(path)
    return grid


@torch.no_grad()
def generate(model, text_encoder, vae, prompts, steps=28, cfg=4.0, sampler='euler', shift=1.0, negative_prompt='',
             cfg_t_min=0.0, cfg_t_max=1.0, seed=0, init=None, strength=1.0, progress=False, size=None):
    """One image per prompt, (B, H, W, 3) uint8, at size (H, W) in pixels (default: the trained square). init:
    optional (B, 3, H, W) pixels in [-1, 1] at that size, for image-to-image."""
    device = next(model.parameters()).device
    ctx = text_encoder(prompts).to(device, torch.float32)
    uncond = text_encoder([negative_prompt] * len(prompts)).to(device, torch.float32)
    h, w = (s // vae.factor for s in size) if size else (model.grid, model.grid)
    noise = torch.randn(len(prompts), model.in_channels, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    z = noise
    if init is not None:  # noise the given image to t = strength and integrate from there
        z = (1 - strength) * vae.encode(init.to(device)).float() + strength * noise
    v = flow.guided(model, ctx, uncond, cfg, (cfg_t_min, cfg_t_max))
    z = flow.sample(v, z, steps, sampler, shift, t_start=strength if init is not None else 1.0, progress=progress)
    return to_uint8(vae.decode(z))


def trained_size(cfg):
    return cfg['image_size'], cfg['image_size']


def size_and_shift(model, vae, cfg, args):
    """--height, --width and --shift -> size and shift: SD3's resolution shift by default at a size the model was not
    trained at (more of the steps near noise, where the layout of a larger image is decided)."""
    unit, square = model.patch * vae.factor, trained_size(cfg)
    seen = web.parse_buckets(cfg.get('buckets', ''), cfg['image_size'], unit)
    default = square if square in seen else seen[0]  # as train.py's grids
    size = (args.height or default[0], args.width or default[1])
    if size[0] % unit or size[1] % unit:
        raise SystemExit(f'error: --height and --width must be multiples of {unit} (patch x VAE factor), got {size}')
    shift = args.shift or (1.0 if size in seen else (size[0] * size[1] / (square[0] * square[1])) ** 0.5)
    if size not in seen:
        print(f"note: trained at {', '.join('%dx%d' % b for b in seen)}; {size[0]}x{size[1]} is new to it "
              f'(time shift {shift:.2f})')
    return dict(size=size, shift=shift)


def find_run(out_dir):
    """--out_dir if given; else the one run here (out*/ckpt.pt: train.py's 'out' and the configs' 'out-*'). Several
    runs are named, not guessed between."""
    if out_dir is not None:
        return out_dir
    runs = sorted(os.path.dirname(p) for p in glob.glob('out*/ckpt.pt'))
    if not runs:
        raise SystemExit('error: no checkpoint here (out*/ckpt.pt): train one first (python train.py '
                         'config/shapes.py) or point --out_dir at one')
    if len(runs) > 1:
        raise SystemExit(f"error: several runs here ({', '.join(runs)}): choose one with --out_dir")
    print(f'sampling the run in {runs[0]}/ (the only one here)')
    return runs[0]


def load_for_sampling(out_dir, device, text_encoder=None, vae=None):
    """EMA model, text encoder and VAE as the checkpoint recorded them (the encoders overridable)."""
    path = f'{out_dir}/ckpt.pt'
    ckpt = load_checkpoint(path)
    cfg = ckpt['config']
    te = load_text_encoder(text_encoder or cfg['text_encoder'], cfg['text_max_length'], cfg['text_layer'])
    ae = load_vae(cfg['vae'] if vae is None else vae, cfg['vae_subfolder'])
    if te.dim != ckpt['caption_dim'] or ae.channels != ckpt['in_channels']:
        raise SystemExit(f"error: the checkpoint was trained with text encoder {cfg['text_encoder']!r} "
                         f"(width {ckpt['caption_dim']}) and vae {cfg['vae']!r} ({ckpt['in_channels']} channels); "
                         f'the ones given have width {te.dim} and {ae.channels} channels')
    model = DiT(cfg['model'], ckpt['in_channels'], ckpt['caption_dim'], ckpt['grid'], cfg['attn_impl'],
                pos_embed=cfg.get('pos_embed', 'table'), mlp_ratio=cfg.get('mlp_ratio', 4))
    fit_weights(model, ckpt['ema'], path)  # a one-line error where a preset has changed since
    return model.to(device).eval(), te.to(device), ae.to(device), cfg, ckpt['step']


def generate_many(model, text_encoder, vae, prompts, batch, seed, start=0, progress=False, **gen):
    """One image per prompt, in batches: (index, images) from index `start`. The noise of the batch at index i comes
    from seed + i, so a rerun (or a resumed run) makes the same images."""
    for i in tqdm(range(start, len(prompts), batch), disable=not progress, desc='generating'):
        yield i, generate(model, text_encoder, vae, prompts[i:i + batch], seed=seed + i, **gen)


def evaluate_shapes(model, te, vae, scenes, seed, progress=False, **gen):
    """Shapes: sample each scene once and read its attributes back from the pixels."""
    prompts = [shapes.CAPTION.format(**s) for s in scenes]
    images = np.concatenate([im for _, im in generate_many(model, te, vae, prompts, 256, seed, 0, progress, **gen)])
    return shapes.adherence(images, scenes)


def score_images(model, te, vae, scorer, prompts, batch, seed, partial=None, progress=False, save_every=60.0, **gen):
    """One image per prompt, scored as it comes (metrics.Scorer): a list of its outputs. With `partial`, what is
    scored is saved there every save_every seconds, and a rerun resumes from it."""
    parts, start = [], 0
    if partial and os.path.exists(partial):
        with np.load(partial) as f:
            parts, start = [{k: f[k] for k in f.files if k != 'done'}], int(f['done'])
        print(f'resuming from {partial}: {start} of {len(prompts)} images done')
    saved = time.time()
    for i, images in generate_many(model, te, vae, prompts, batch, seed, start, progress, **gen):
        parts.append(scorer(images, prompts[i:i + batch]))
        if partial and time.time() - saved >= save_every:
            parts = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}]
            np.savez(partial + '.tmp.npz', done=i + len(images), **parts[0])
            os.replace(partial + '.tmp.npz', partial)
            saved = time.time()
    return parts


def evaluate_shared(model, te, vae, scorer, reference, prompts, seed, **gen):
    """Training's evaluation over the ranks: each makes an equal share of the images (under FSDP every rank must run as
    many batches) and rank 0 puts the shares together: scorer.results with a scorer (LAION), else the shapes
    adherence of scenes. The results on rank 0, None on the others."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = len(prompts) // world
    mine = prompts[rank * share:(rank + 1) * share]
    if scorer:
        mine = score_images(model, te, vae, scorer, mine, 64, seed + rank * share, **gen)
    else:
        mine = evaluate_shapes(model, te, vae, mine, seed + rank * share, **gen)
    shares = [mine] * world
    if world > 1:
        dist.all_gather_object(shares, mine)
    if rank == 0:  # shapes: adherence fractions over equal shares, so their mean is the whole's
        return scorer.results(sum(shares, []), reference) if scorer else {k: sum(s[k] for s in shares) / world
                                                                          for k in mine}


def earlier_settings(path):
    """The settings an evaluation file holds; None where it cannot be read (edited by hand, say): it is kept too."""
    try:
        with open(path) as f:
            return json.load(f).get('settings')
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None


def run_eval(model, te, vae, cfg, step, args, gen):
    """--eval: the checkpoint's metrics, printed and written as JSON beside it."""
    settings = dict(gen, seed=args.seed)
    ref = args.ref or cfg.get('eval_ref', '')
    if ref:
        scorer = metrics.Scorer(args.fid_model, args.clip_model, args.dino_model, args.device, args.batch)
        prompts = [row['caption'] for row in metrics.reference_rows(ref, args.eval_n)]
        reference = scorer.reference(ref, len(prompts), cfg['image_size'], cfg['allow_private_urls'])
        settings.update(ref=ref, n=len(prompts), models=scorer.names)
        key = json.dumps([metrics.identity(ref), step, settings])
        partial = os.path.join(args.out_dir, f'eval-{hashlib.sha1(key.encode()).hexdigest()[:12]}.partial.npz')
        with autocast_for(args.device, args.dtype):
            parts = score_images(model, te, vae, scorer, prompts, args.batch, args.seed, partial, True, **gen)
        results = scorer.results(parts, reference)
        if os.path.exists(partial):
            os.remove(partial)
        name = f"eval-{step:06d}-n{len(prompts)}-cfg{gen['cfg']:g}.json"
    elif cfg['dataset'] == 'shapes':
        with autocast_for(args.device, args.dtype):
            results = evaluate_shapes(model, te, vae, shapes.all_scenes()[::args.eval_stride], args.seed, True, **gen)
        settings.update(eval_stride=args.eval_stride, size=gen['size'])
        name = f"eval-{step:06d}-shapes{'-%dx%d' % gen['size'] if gen['size'] != trained_size(cfg) else ''}.json"
    else:
        raise SystemExit('error: --eval of a LAION model needs --ref, image-caption pairs to compare with (README)')
    print(f'step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in results.items()))
    path = os.path.join(args.out_dir, name)
    settings = json.loads(json.dumps(settings))  # as the file holds them: tuples become lists
    if os.path.exists(path) and earlier_settings(path) != settings:  # another evaluation's: kept
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        path = path[:-len('.json')] + f'-{digest}.json'
    with open(path + '.tmp', 'w') as f:
        json.dump(dict(step=step, results=results, settings=settings), f, indent=1)
    os.replace(path + '.tmp', path)
    print(f'wrote {path}')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--prompt', action='append', default=[], help='a prompt; repeat the flag for more rows')
    p.add_argument('--prompts_file', help='a text file with one prompt per line')
    p.add_argument('--n', type=int, default=4, help='samples per prompt (grid columns)')
    p.add_argument('--steps', type=int, help="sampling steps (default: the checkpoint's sample_steps)")
    p.add_argument('--cfg', type=float, help="classifier-free guidance scale, 1 = none (default: its sample_cfg)")
    p.add_argument('--cfg_t_min', type=float, help="guidance only for t in [cfg_t_min, cfg_t_max] (default: the "
                   "checkpoint's)")
    p.add_argument('--cfg_t_max', type=float)
    p.add_argument('--sampler', default='euler', choices=['euler', 'heun'])
    p.add_argument('--shift', type=float, help="SD3's time shift (>1: more steps near noise); default 1, or at a size "
                   'other than the trained one, the square root of the ratio of their areas (SD3)')
    p.add_argument('--height', type=int, help='image height in pixels (default: the trained size)')
    p.add_argument('--width', type=int, help='image width in pixels (default: the trained size)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--negative_prompt', default='', help='replaces the empty caption of the unconditional branch')
    p.add_argument('--init_image', help='image-to-image: start from this image noised to t = strength')
    p.add_argument('--strength', type=float, default=0.6)
    p.add_argument('--out_dir', help='the checkpoint folder (ckpt.pt); default: the one run here (out*/)')
    p.add_argument('--out', default='samples.png', help='PNG path of the grid')
    p.add_argument('--text_encoder', help="override the checkpoint's text encoder (id or path)")
    p.add_argument('--vae', help="override the checkpoint's VAE (id or path, '' for pixels)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='auto', help="autocast: 'auto' (the fastest safe one here), float32, "
                   'bfloat16, float16')
    e = p.add_argument_group('evaluation (--eval)')
    e.add_argument('--eval', action='store_true', help='FID, CLIP score (and FD-DINOv2) against --ref; without it, '
                   'a shapes model\'s prompt adherence. Written to out_dir/eval-*.json')
    e.add_argument('--eval_stride', type=int, default=1, help='shapes: every k-th attribute combination')
    e.add_argument('--ref', help="image-caption pairs: a folder, JSON lines or tar shards (default: the run's "
                   'eval_ref)')
    e.add_argument('--eval_n', type=int, default=30000, help='prompts (the first of --ref), one image each')
    e.add_argument('--batch', type=int, default=64, help='images per batch')
    e.add_argument('--fid_model', default=metrics.INCEPTION, help="Inception for FID: TorchScript URL or path ('' off)")
    e.add_argument('--clip_model', default=metrics.CLIP, help="CLIP for the CLIP score: hub id or path ('' off)")
    e.add_argument('--dino_model', default='', help=f'DINOv2 for FD-DINOv2: hub id or path, e.g. {metrics.DINOV2}')
    args = p.parse_args()
    # one-line errors here, not argparse's p.error, which prints the whole usage first
    for flag in ('n', 'steps', 'eval_stride', 'eval_n', 'batch'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f'error: --{flag} must be at least 1, got {value}')
    if not 0 <= args.strength <= 1:
        raise SystemExit(f'error: --strength must be in [0, 1], got {args.strength}')
    if args.shift is not None and args.shift <= 0:
        raise SystemExit(f'error: --shift must be > 0, got {args.shift}')
    for flag, path in (('--prompts_file', args.prompts_file), ('--init_image', args.init_image)):
        if path and not os.path.isfile(path):
            raise SystemExit(f'error: {flag}: no file at {path}')

    args.dtype, why = resolve_dtype(args.dtype, args.device)  # a bad --device or --dtype stops here
    print(f'dtype {args.dtype}: {why}')
    args.out_dir = find_run(args.out_dir)
    model, te, vae, cfg, step = load_for_sampling(args.out_dir, args.device, args.text_encoder, args.vae)
    trained = dict(steps=cfg['sample_steps'], cfg=cfg['sample_cfg'], cfg_t_min=cfg.get('cfg_t_min', 0.0),
                   cfg_t_max=cfg.get('cfg_t_max', 1.0))  # the run's sampling settings, unless the flags say otherwise
    gen = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in trained.items()}
    gen.update(sampler=args.sampler, negative_prompt=args.negative_prompt, **size_and_shift(model, vae, cfg, args))
    if args.eval:
        run_eval(model, te, vae, cfg, step, args, gen)
        raise SystemExit
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit('error: give at least one --prompt or a --prompts_file')
    init = None
    if args.init_image:
        try:
            img = ImageOps.fit(Image.open(args.init_image).convert('RGB'), gen['size'][::-1])  # center crop, resize
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files
            raise SystemExit(f'error: --init_image {args.init_image} is not a readable image ({e})')
        img = np.asarray(img, dtype=np.float32) / 127.5 - 1
        init = torch.from_numpy(img).permute(2, 0, 1)[None].expand(len(prompts) * args.n, -1, -1, -1)
    t0 = time.time()
    with autocast_for(args.device, args.dtype):
        images = generate(model, te, vae, [q for q in prompts for _ in range(args.n)], seed=args.seed, init=init,
                          strength=args.strength, progress=True, **gen)
    save_grid(images, len(prompts), args.out)
    print(f'wrote {args.out}: {len(prompts)} prompts x {args.n} samples in {time.time() - t0:.1f}s')
