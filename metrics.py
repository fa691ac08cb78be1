"""
What a text-to-image model learned, in the numbers papers report: FID, CLIP score and FD-DINOv2 of generated images,
against a reference set of image-caption pairs whose captions are the prompts.

- FID: the Frechet distance between Gaussians fitted to Inception-v3 pool features (2048-d) of the reference and the
  generated images. The network is NVIDIA's TorchScript port of the TensorFlow graph the original FID used (the one of
  StyleGAN2-ADA, EDM and clean-fid; pytorch-fid and torch-fidelity port the same weights), fed uint8 images that it
  resizes to 299 itself.
- CLIP score: 100 x the cosine of CLIP's image and caption embeddings, clipped at 0, averaged (as torchmetrics).
- FD-DINOv2: the same distance in DINOv2's CLS features at 224 px, which "Exposing flaws of generative model
  evaluation metrics" (Stein et al., 2023) finds ranks models as people do, where FID does not.
Each metric's model is named by a URL, a path or a hub id ('' leaves the metric out). Reference statistics are
cached in FLOWDIT_CACHE (default ~/.cache/flowdit), so a reference set is read once.
"""
import concurrent.futures
import functools
import hashlib
import itertools
import json
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from web import Skip, decode, fetch, session

INCEPTION = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
CLIP = 'openai/clip-vit-large-patch14'
DINOV2 = 'facebook/dinov2-large'
CACHE = os.environ.get('FLOWDIT_CACHE', os.path.expanduser('~/.cache/flowdit'))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def gaussian(features):
    """(N, F) features -> mean (F,), covariance (F, F), in float64."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). S1 S2 is not symmetric, but with A = S1^1/2 (symmetric) it is
    similar to A S2 A, which is: tr (S1 S2)^1/2 = sum of the square roots of A S2 A's eigenvalues. eigh throughout,
    no complex parts to drop (scipy's sqrtm route)."""
    w, V = np.linalg.eigh(sigma1)
    A = (V * np.sqrt(w.clip(min=0))) @ V.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(A @ sigma2 @ A).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def resized(images, size, mean, std, device):
    # (B, H, W, 3) uint8 -> (B, 3, size, size) normalised; square images, so resizing is CLIP's resize and crop
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bicubic', antialias=True, align_corners=False)
    return (x - torch.tensor(mean, device=device)[:, None, None]) / torch.tensor(std, device=device)[:, None, None]


class Inception:
    """Pool features of a TorchScript Inception (a URL, downloaded once into CACHE, or a path): model(uint8 images,
    return_features=True) -> (B, 2048)."""

    def __init__(self, name, device):
        path = name
        if name.startswith(('http://', 'https://')):
            path = os.path.join(CACHE, os.path.basename(name))
            if not os.path.exists(path):
                os.makedirs(CACHE, exist_ok=True)
                try:
                    torch.hub.download_url_to_file(name, path)
                except Exception as e:
                    raise SystemExit(f'error: could not download the FID network {name} ({type(e).__name__}); '
                                     f'fetch it elsewhere and pass its path as fid_model')
        if not os.path.isfile(path):
            raise SystemExit(f'error: no FID network at {path} (fid_model: a TorchScript file or URL)')
        with warnings.catch_warnings():  # TorchScript is deprecated for new models; this file is one
            warnings.simplefilter('ignore', DeprecationWarning)
            self.net = torch.jit.load(path, map_location=device).eval()
        self.device = device

    def __call__(self, images):
        x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return self.net(x, return_features=True)


class DINOv2:
    """The CLS token (after the final norm) of a transformers DINOv2, at 224 px as dgm-eval feeds it."""

    def __init__(self, name, device):
        import transformers
        self.net = transformers.AutoModel.from_pretrained(name).to(device).eval()
        self.device = device

    def __call__(self, images):
        return self.net(pixel_values=resized(images, 224, IMAGENET_MEAN, IMAGENET_STD, self.device)).pooler_output


class CLIPScore:
    """100 * max(cos(image, caption), 0) per image, with a transformers CLIP by hub id or path."""

    def __init__(self, name, device):
        import transformers
        self.net = transformers.CLIPModel.from_pretrained(name).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        self.device = device

    def __call__(self, images, captions):
        cfg = self.net.config
        tok = self.tokenizer(list(captions), padding=True, truncation=True,
                             max_length=cfg.text_config.max_position_embeddings, return_tensors='pt').to(self.device)
        pixels = resized(images, cfg.vision_config.image_size, CLIP_MEAN, CLIP_STD, self.device)
        out = self.net(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
        return 100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)  # both unit length


class Scorer:
    """The metrics whose models are named: features of image batches, then the numbers against a reference."""

    def __init__(self, fid_model=INCEPTION, clip_model=CLIP, dino_model='', device='cpu', batch=64):
        self.features = {}  # metric -> extractor of (B, F) features
        if fid_model:
            self.features['fid'] = Inception(fid_model, device)
        if dino_model:
            self.features['fd_dinov2'] = DINOv2(dino_model, device)
        self.clip = CLIPScore(clip_model, device) if clip_model else None
        self.names = dict(fid=fid_model, fd_dinov2=dino_model, clip_score=clip_model)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, images, captions=None):
        """(B, H, W, 3) uint8 images (and their captions, for the CLIP score) -> {metric: (B, F) features or (B,)
        CLIP scores}."""
        with torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False):  # fp32, as the papers
            out = {k: f(images).float().cpu().numpy() for k, f in self.features.items()}
            if self.clip and captions is not None:
                out['clip_score'] = self.clip(images, captions).float().cpu().numpy()
        return out

    def results(self, parts, reference):
        """parts: outputs of __call__ (one per batch) -> {metric: value}; reference: {metric: (mu, sigma)}."""
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        res = {k: frechet_distance(*gaussian(x), *reference[k]) for k, x in joined.items() if k in self.features}
        if 'clip_score' in joined:
            res['clip_score'] = float(joined['clip_score'].mean())
        return res

    def reference(self, ref, n, size, allow_private=False):
        """{metric: (mu, sigma)} of the first n reference images, center-cropped to size; read once, then cached."""
        if not self.features:
            return {}
        key = json.dumps([identity(ref), n, size, {k: self.names[k] for k in self.features}])
        path = os.path.join(CACHE, f'ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz')
        if os.path.exists(path):
            with np.load(path) as f:
                print(f'reference statistics from {path} ({int(f["count"])} images)')
                return {k: (f[f'{k}_mu'], f[f'{k}_sigma']) for k in self.features}
        parts, skipped, rows = [], {}, reference_rows(ref, n)
        load = functools.partial(reference_image, size=size, http=session(16), allow_private=allow_private)
        with concurrent.futures.ThreadPoolExecutor(16) as pool, tqdm(total=n, desc='reference images') as bar:
            while chunk := list(itertools.islice(rows, self.batch)):
                images = []
                for img in pool.map(load, chunk):  # in order
                    if isinstance(img, Skip):
                        skipped[img.args[0]] = skipped.get(img.args[0], 0) + 1
                    else:
                        images.append(img)
                if images:
                    parts.append(self(np.stack(images)))
                bar.update(len(chunk))
        count = sum(len(p[next(iter(self.features))]) for p in parts)
        if count < 2:
            raise SystemExit(f'error: the reference {ref} gave {count} usable images of {n} (skipped: {skipped})')
        print(f'reference: {count} images of {n}' + (f', skipped {skipped}' if skipped else ''))
        stats = {k: gaussian(np.concatenate([p[k] for p in parts])) for k in self.features}
        os.makedirs(CACHE, exist_ok=True)
        np.savez(path + '.tmp.npz', count=count, **{f'{k}_{s}': v for k, (mu, sigma) in stats.items()
                                                      for s, v in (('mu', mu), ('sigma', sigma))})
        os.replace(path + '.tmp.npz', path)  # atomic: an interrupted run leaves no half-written statistics
        return stats


# ----------------------------------------------------------------------------------------------------------------
# Reference sets: image-caption pairs whose captions are the prompts and whose images are the reference.

def reference_rows(ref, n=None):
    """The first n rows {'caption', and one of 'image' (bytes), 'path', 'url'} of a reference set: a folder of images
    with captions in .txt files of the same name (img2dataset's 'files' layout, searched recursively), JSON lines
    ({"caption", and "url", "image" or "path": a URL or a path relative to the file}), or webdataset tar shards (in
    data_shards' syntax: globs, {00000..00099}, URLs)."""
    if os.path.isdir(ref):
        rows = folder_rows(ref)
    else:
        paths = data.shard_list(ref)
        if not paths:
            raise SystemExit(f'error: no reference set at {ref} (a folder, JSON lines or tar shards)')
        rows = (row for p in paths for row in (data.tar_rows(p, 30.0) if '.tar' in os.path.basename(p)
                                                else jsonl_rows(p)))
    return itertools.islice(rows, n)


def folder_rows(folder):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext[1:].lower() in data.IMAGE_EXTS:
                txt = os.path.join(root, stem + '.txt')
                caption = open(txt, encoding='utf-8').read().strip() if os.path.exists(txt) else ''
                yield {'caption': caption, 'path': os.path.join(root, name)}


def jsonl_rows(path):
    for row in data.jsonl_rows(path):
        image = row.get('url') or row.get('image') or row.get('path') or ''
        if image.startswith(('http://', 'https://')):
            yield {'caption': row.get('caption') or '', 'url': image}
        else:
            yield {'caption': row.get('caption') or '', 'path': os.path.join(os.path.dirname(path), image)}


def reference_image(row, size, http=None, allow_private=False):
    """(size, size, 3) uint8, the center crop of a row's image (as training crops it), or the Skip that stopped it."""
    try:
        if 'url' in row:
            content = fetch(http, row['url'], 30.0, 50_000_000, allow_private, False)
        elif 'path' in row:
            with open(row['path'], 'rb') as f:
                content = f.read()
        elif row['image'] is None:
            raise Skip(row.get('fails', 'not_an_image'))
        else:
            content = row['image']
        img = np.asarray(decode(content, size, 50_000_000, 0))
    except Skip as e:
        return e
    except OSError:
        return Skip('not_an_image')
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[y:y + size, x:x + size]


def identity(ref):
    """What names a reference set's content: its files with their sizes and modification times (URLs as given)."""
    if os.path.isdir(ref):
        files = [os.path.join(r, f) for r, _, fs in os.walk(ref) for f in fs]
    else:
        files = [p for p in data.shard_list(ref) if os.path.exists(p)]
    return [ref] + sorted((p, os.path.getsize(p), os.path.getmtime(p)) for p in files)


def loss_by_t(sums, counts):
    """The training loss in equal bins of t, as a log line and curves: sums and counts per bin over a stretch of steps
    (data.health's form). Where in time the model still errs; a bin that drew no sample shows '-'."""
    bins = [f'[{i / len(sums):.2f},{(i + 1) / len(sums):.2f})' for i in range(len(sums))]
    by_bin = {b: s / n for b, s, n in zip(bins, sums, counts) if n}
    line = '  loss by t: ' + ' '.join(f"{b} {f'{by_bin[b]:.4f}' if b in by_bin else '-'}" for b in bins)
    return line, {f'loss_by_t/{b}': v for b, v in by_bin.items()}


class Curves:
    """Where train.py's numbers go besides its log: TensorBoard event files in a folder, a Weights & Biases run. Each
    is imported only when asked for; Curves() records nothing."""

    def __init__(self, tensorboard_dir='', wandb_project='', wandb_name='', config=None, step=0):
        self.tensorboard = self.wandb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit('config error: tensorboard_log needs tensorboard (pip install tensorboard)')
            # purge_step: a resumed run replaces the curves that followed its checkpoint
            self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=step)
        if wandb_project:
            import wandb
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_name or None, config=config)

    def __call__(self, step, scalars, image=None):
        """scalars {name: value}; image: a sample grid, (H, W, 3) uint8."""
        if self.tensorboard:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
            if image is not None:
                self.tensorboard.add_image('samples', image, step, dataformats='HWC')
        if self.wandb:
            images = {} if image is None else {'samples': self.wandb.Image(image)}
            self.wandb.log({**scalars, **images}, step=step)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
