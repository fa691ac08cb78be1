"""
Train a flowdit model. One code path for 1 to N processes.

One process (CPU or one GPU):
    python train.py config/shapes.py --batch_size=32    # settings: config files, then --key=value overrides
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py config/laion_b2.py
Several nodes (run on each, node_rank 0..N-1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 train.py config/laion_b2.py
Resume where the last checkpoint stopped: --init_from=resume. From another run's EMA weights: --init_from=out/ckpt.pt.
"""
import atexit
import math
import os
import signal
import sys
import time
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import flow
import metrics
import muon
import shapes
from configurator import check, configure
from encoders import load_text_encoder, load_vae
from model import DiT, autocast_for, fit_weights, load_checkpoint, load_weights, peak_flops, resolve_compile
from model import resolve_dtype, save_checkpoint, to_device
from sample import evaluate_shared, generate, save_grid

# ----- I/O
out_dir = 'out'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt) or a checkpoint path (its EMA; step 0)
log_interval = 10
ckpt_interval = 500
sample_interval = 500  # a PNG grid of sample_prompts from the EMA weights; 0 = never
sample_prompts = ('large red circle in the center, blue background|small yellow triangle on the left, purple '
                  'background|large white square at the bottom, black background|small green circle at the top, '
                  'orange background')
# ----- data
dataset = 'shapes'  # 'shapes' (embedded, drawn on the fly) or 'laion' (URL shards written by prepare_laion.py)
image_size = 32
buckets = ''  # '': image_size squares; 'auto': 1:2 to 2:1 at ~image_size^2 pixels; or 'HxW,HxW' (web.parse_buckets)
data_shards = 'laion-shards/shard_*.jsonl'  # laion: JSON lines (prepare_laion.py) or tars: glob, {0..9}, URL
data_workers = 4  # laion: DataLoader worker processes per rank
fetch_threads = 16  # laion: concurrent fetches per worker
fetch_timeout = 10.0  # laion: seconds per image, all included (a slow drip is cut off)
max_image_bytes = 16000000
max_image_pixels = 50000000  # checked from the header before decoding: pixel bombs
min_image_size = 64  # images whose shorter side is smaller are skipped
random_crop = False  # else the center crop
random_flip = False
cache_dir = '/dev/shm/flowdit-cache'  # processed images in RAM, shared by the node's ranks, kept across restarts
cache_gb = 16.0
cache_text = False  # with a VAE: cache each caption's embedding beside its latent (large text encoders)
allow_private_urls = False  # refuse URLs resolving to private, loopback or link-local addresses
honor_robots = True  # skip images served with X-Robots-Tag noai / noimageai
# ----- model and encoders
model = 'DiT-Ti/4'  # a preset of model.PRESETS
attn_impl = 'sdpa'  # 'sdpa' or 'manual': the same numbers
mlp_ratio = 4  # the MLP's hidden width over the model's, as in DiT
pos_embed = 'table'  # 'table' (learned, resized to each grid) or 'rope' (2D rotary: nothing tied to a grid)
grad_checkpointing = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute
fsdp = False  # under torchrun: shard weights, grads and optimizer state (FSDP2) instead of replicating them (DDP)
text_encoder = 'hash'  # 'hash' (weight-free, offline) or a transformers model id / path
text_max_length = 12
text_layer = -1  # which hidden state of the text encoder (-1: the last)
vae = ''  # '' trains on pixels; else a diffusers AutoencoderKL id / path
vae_subfolder = ''
# ----- flow
t_sampling = 'logit_normal'  # or 'uniform'
t_mean = 0.0
t_std = 1.0
cond_drop = 0.1  # probability a caption is replaced by "" so classifier-free guidance works
contrast = 0.0  # contrastive flow matching's weight (flow.loss): > 0 pushes different captions' velocities apart
# ----- optimisation
batch_size = 64  # per process
max_iters = 1000
max_minutes = 0.0  # > 0, a deadline: max_iters refitted (step 50, then each log) to the steps that fit; 0 = off
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 100
decay_lr = False  # from learning_rate down to min_lr over max_iters, along lr_decay
lr_decay = 'cosine'  # or 'linear', a straight line (a short run's schedule: README, geometry levers)
weight_decay = 0.0
optimizer = 'adamw'  # or 'muon': Muon for the blocks' weight matrices and AdamW for the rest (muon.py)
adamw_lr_scale = 1.0  # with optimizer='muon': the rate of AdamW's part over learning_rate, Muon's
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0 = off
ema_decay = 0.9999
ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step)): short runs get a usable EMA
# ----- sampling, evaluation and curves while training (from the EMA weights)
sample_steps = 28
sample_cfg = 4.0
cfg_t_min = 0.0  # guidance only for t in [cfg_t_min, cfg_t_max]: here and sample.py's default (flow.guided)
cfg_t_max = 1.0
eval_interval = 0  # steps between evaluations (0 = never): shapes, prompt adherence; laion, FID and CLIP score
eval_ref = ''  # laion: image-caption pairs, the first eval_n captions the prompts (sample.py --ref)
eval_n = 1000  # prompts per evaluation, shared out over the ranks
fid_model = metrics.INCEPTION  # '' leaves a metric out (see metrics.py)
clip_model = metrics.CLIP
dino_model = ''  # FD-DINOv2, e.g. 'facebook/dinov2-large'
tensorboard_log = True  # event files in out_dir: tensorboard --logdir out_dir
wandb_log = False  # Weights & Biases (pip install wandb)
wandb_project = 'flowdit'
wandb_run_name = ''
# ----- system
seed = 0
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'  # autocast: the fastest safe one here (model.choose_dtype), or float32 / bfloat16 / float16
compile = True  # torch.compile, block by block: on CUDA; on the CPU only when set (model.resolve_compile)

settings = {k: v for k, v in globals().items() if not k.startswith('_') and type(v) in (int, float, bool, str)}
given = configure(settings, sys.argv[1:])
globals().update(settings)
config = dict(settings)  # what the checkpoint records
check(settings, dict(optimizer=('adamw', 'muon'), lr_decay=('cosine', 'linear'), dataset=('shapes', 'laion'),
                    t_sampling=('logit_normal', 'uniform')),  # a typo or a value out of range stops here, in one line
      at_least=dict(batch_size=1, log_interval=1, ckpt_interval=1, sample_interval=0, eval_interval=0, eval_n=1,
                    sample_steps=1, warmup_iters=0, learning_rate=0, min_lr=0, max_minutes=0, data_workers=0,
                    fetch_threads=1), positive=('adamw_lr_scale',), fractions=('cond_drop', 'ema_decay'),
      folders=('out_dir',))
if optimizer == 'muon' and fsdp:  # measured: 3 steps under FSDP moved weights 0.013 away from DDP's
    sys.exit('config error: Muon orthogonalises whole matrices and FSDP shards them: use fsdp=False (DDP) with muon')
if eval_interval and dataset == 'laion' and not eval_ref:
    sys.exit('config error: eval_interval needs eval_ref, image-caption pairs to compare with (README)')
sampling = dict(steps=sample_steps, cfg=sample_cfg, cfg_t_min=cfg_t_min, cfg_t_max=cfg_t_max)  # grids and evals

# ----- processes, devices, seeds
ddp = 'RANK' in os.environ
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.manual_seed(seed)  # the same initial weights on every rank; DDP checks
torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's convolutions use TF32 by default already
log = (lambda msg: print(msg, flush=True)) if master else lambda msg: None  # rank 0 speaks for all
dtype, why = resolve_dtype(dtype, device)
log(f'dtype {dtype}: {why}')
compile, why = resolve_compile(compile, device, 'compile' in given)
config['compile'] = compile
log(f'compile {compile}: {why}')
autocast = autocast_for(device, dtype)  # master weights stay fp32
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # fp16 gradients underflow unscaled

# ----- encoders, model, optimiser, EMA
frozen_dtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32  # no fp32 masters; SD VAEs overflow in fp16
text_enc = load_text_encoder(text_encoder, text_max_length, text_layer).to(device, frozen_dtype)
vae_model = load_vae(vae, vae_subfolder).to(device, frozen_dtype)
if image_size % vae_model.factor:
    sys.exit(f'config error: image_size {image_size} is not a multiple of the VAE downsampling {vae_model.factor}')
grid = image_size // vae_model.factor
try:
    raw_model = DiT(model, vae_model.channels, text_enc.dim, grid, attn_impl, grad_checkpointing, pos_embed,
                    mlp_ratio).to(device)
except ValueError as e:  # an unknown preset, a grid the patch does not divide, a bad pos_embed or mlp_ratio
    sys.exit(f'config error: {e}')
sizes = data.parse_buckets(buckets, image_size, raw_model.patch * vae_model.factor)  # (height, width) pairs
sampling['size'] = (image_size, image_size) if (image_size, image_size) in sizes else sizes[0]
stream_encodes = dataset == 'laion' and vae != ''  # LaionStream gives cached latents (and with cache_text, embeddings)
if dataset == 'shapes':
    stream = shapes.ShapesStream(batch_size, image_size, seed, rank, device_type == 'cuda', sizes)
else:  # 'laion'
    stream = data.LaionStream(
        data_shards, batch_size, image_size, seed, rank, world, data_workers, pin_memory=device_type == 'cuda',
        vae=vae_model if stream_encodes else None, text_encoder=text_enc if stream_encodes and cache_text else None,
        cache_tag=f'{vae}/{vae_subfolder}' + (f'|{text_encoder}/{text_max_length}/{text_layer}' if cache_text else ''),
        fetch_threads=fetch_threads, fetch_timeout=fetch_timeout, max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels, min_image_size=min_image_size, random_crop=random_crop,
        random_flip=random_flip, cache_dir=cache_dir, cache_bytes=int(cache_gb * 2 ** 30),
        allow_private_urls=allow_private_urls, honor_robots=honor_robots, buckets=sizes)
step = 0
budget_step = 50  # max_minutes first fits max_iters here, inside the warmup; later refits move the decay's end
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
ema = deepcopy(raw_model).requires_grad_(False)  # synced with the model, from scratch and on resume
if init_from == 'resume':
    ckpt = load_checkpoint(ckpt_path)
    trained_with = ckpt['config'].get('optimizer', 'adamw')  # checkpoints from before the setting: AdamW
    if trained_with != optimizer:  # the state of one is not the other's
        sys.exit(f'config error: {ckpt_path} was trained with optimizer {trained_with!r}, this run sets {optimizer!r}')
    fit_weights(raw_model, ckpt['model'], ckpt_path, ckpt['config'], config)
    ema.load_state_dict(ckpt['ema'])
    step = ckpt['step']
    if max_minutes and step >= budget_step:  # the first run fitted the budget: keep its last step count
        max_iters = config['max_iters'] = min(max_iters, ckpt['config']['max_iters'])
    if len(ckpt['data']) == world:
        stream.load_state_dict(ckpt['data'][rank])
    else:
        log(f"warning: the checkpoint has {len(ckpt['data'])} ranks' data positions, this run {world}: streams restart")
elif init_from != 'scratch':  # another run's EMA weights begin this one: fresh optimizer, step 0
    ema.load_state_dict(load_weights(raw_model, init_from).state_dict())
    log(f'initialised from the EMA weights of {init_from} (step 0, a fresh optimizer)')
if fsdp and ddp:  # each block is a unit: its full weights exist only while it runs
    mesh = init_device_mesh(device_type, (world,))  # its own default is CUDA wherever CUDA exists
    for module in (raw_model, ema):
        for unit in (*module.blocks, module):  # the blocks, then the root: what the blocks leave (embeddings, head)
            fully_shard(unit, mesh=mesh)
# one schedule for all, each optimizer's rate scaled (AdamW's part of Muon's pair); Newton-Schulz in bf16 if native
optimizers, lr_scales = muon.optimizers(raw_model, optimizer, learning_rate, (beta1, beta2), weight_decay,
                                        frozen_dtype, adamw_lr_scale)
full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # one plain format, sharded or not
ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())  # fixed once sharded
if init_from == 'resume':  # after sharding: the optimizer state follows the parameters' placement
    set_optimizer_state_dict(raw_model, optimizers, ckpt['optimizer'], options=full)
    if ckpt.get('scaler') and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    log(f'resumed from {ckpt_path} at step {step}')
    del ckpt
curves = metrics.Curves(out_dir if tensorboard_log else '', wandb_project if wandb_log else '', wandb_run_name, config,
                        step) if master else metrics.Curves()  # TensorBoard, W&B: rank 0 only
latents = '/'.join(f'{h // vae_model.factor}x{w // vae_model.factor}x{vae_model.channels}' for h, w in sizes)
log(f'{model} (MLP {mlp_ratio}x): {raw_model.num_params() / 1e6:.2f}M parameters, {latents} latents, '
    f"{world} process(es){' sharded (FSDP)' if fsdp and ddp else ''}, global batch {batch_size * world}, {optimizer}"
    + (f' (AdamW part at {adamw_lr_scale}x)' if optimizer == 'muon' and adamw_lr_scale != 1 else ''))
peak = peak_flops(device)  # FLOP/s of one GPU; None where it is not known
if compile:  # block by block, as torchtitan does: the blocks share one compiled code, ~40% less time compiling
    for block in raw_model.blocks:
        block.compile()
net = DDP(raw_model, device_ids=[device] if device_type == 'cuda' else None) if ddp and not fsdp else raw_model
uncond = text_enc(['']).to(device)  # (1, L, D): the unconditional caption; the encoders keep no graph


def lr_at(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if not decay_lr:
        return learning_rate
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    left = 1 - progress if lr_decay == 'linear' else 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + left * (learning_rate - min_lr)


def seconds_per_step():  # timed from the end of the first step, which holds one-off costs (torch.compile's)
    return (time.time() - t_first) / (step - step_start - 1) if step > step_start + 1 else time.time() - t_begin


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    objs = [obj] * world
    if ddp:
        dist.all_gather_object(objs, obj)
    return objs


def save():
    # every rank takes part: under FSDP gathering the full state dicts is collective; data: each rank's stream position
    ckpt = dict(model=get_model_state_dict(raw_model, options=full), ema=get_model_state_dict(ema, options=full),
                optimizer=get_optimizer_state_dict(raw_model, optimizers, options=full), step=step, config=config,
                scaler=scaler.state_dict(), data=gather(stream.state_dict()), in_channels=vae_model.channels,
                caption_dim=text_enc.dim, grid=grid)
    if master:
        save_checkpoint(ckpt, ckpt_path)


def write_samples():
    prompts = sample_prompts.split('|')
    with autocast:
        images = generate(ema, text_enc, vae_model, [p for p in prompts for _ in range(4)], seed=seed, **sampling)
    if master:
        curves(step, {}, save_grid(images, len(prompts), os.path.join(out_dir, f'samples_{step:06d}.png')))


if eval_interval:
    scorer = metrics.Scorer(fid_model, clip_model, dino_model, device) if dataset == 'laion' else None
    eval_prompts = ([row['caption'] for row in metrics.reference_rows(eval_ref, eval_n)] if scorer else
                    shapes.all_scenes()[::max(1, len(shapes.all_scenes()) // eval_n)][:eval_n])  # shapes: scenes
    eval_prompts = eval_prompts[:len(eval_prompts) // world * world]  # an equal share for each rank
    reference = scorer and master and scorer.reference(eval_ref, len(eval_prompts), image_size, allow_private_urls)


def evaluate():
    """The EMA's metrics on eval_n prompts (sample.evaluate_shared), logged by rank 0."""
    t0 = time.time()
    with autocast:
        results = evaluate_shared(ema, text_enc, vae_model, scorer, reference, eval_prompts, seed, **sampling)
    if master:
        log(f'eval step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in results.items()) +
            f' ({len(eval_prompts)} prompts, {time.time() - t0:.0f}s)')
        curves(step, {f'eval/{k}': v for k, v in results.items()})


# ----- the loop. A step's random draws come from a generator seeded by (seed, rank, step): a resume continues exactly
n_bins = 4
loss_sum = torch.zeros((), device=device)
bin_sum, bin_count = torch.zeros(n_bins, device=device), torch.zeros(n_bins, device=device)
t_begin, t_last, step_start, images_seen, last_counts, data_wait = time.time(), time.time(), step, 0, 0, 0.0
gen = torch.Generator(device)
caught, stop = [], False  # SIGTERM (a scheduler's preemption; torchrun passes its own on), SIGINT (Ctrl-C): the
for s in (signal.SIGTERM, signal.SIGINT):  # run checkpoints at its step's end and stops; a second one stops it at once
    signal.signal(s, lambda sig, frame: (caught.append(sig), signal.signal(sig, signal.SIG_DFL)))
while step < max_iters and not stop:
    t_wait = time.time()
    images, captions = next(stream)  # latents and maybe caption embeddings where the stream encodes (LaionStream)
    data_wait += time.time() - t_wait
    gen.manual_seed(seed + 1_000_003 * rank + 7_919 * step)
    with torch.no_grad(), autocast:
        if stream_encodes:
            z0 = images  # (B, C, grid, grid)
        else:
            z0 = vae_model.encode(images.to(device, non_blocking=True).float() / 127.5 - 1).float()  # pixels in [-1, 1]
        ctx = captions if torch.is_tensor(captions) else to_device(text_enc(captions), device)  # (B, L, D)
    B = len(z0)
    drop = torch.rand(B, generator=gen, device=device) < cond_drop
    ctx = torch.where(drop[:, None, None], uncond, ctx)
    t = flow.sample_t(B, t_sampling, t_mean, t_std, gen, device)
    noise = torch.randn(z0.shape, generator=gen, device=device)
    for opt, scale in zip(optimizers, lr_scales):
        opt.zero_grad(set_to_none=True)
        for group in opt.param_groups:
            group['lr'] = lr_at(step) * scale
    with autocast:
        per_sample = flow.loss(net, z0, t, ctx, noise, contrast)
    loss = per_sample.mean()
    scaler.scale(loss).backward()  # with fp32 or bf16 the scaler is off: plain backward and step
    if grad_clip > 0:
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    decay = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)
    step += 1
    t_first = time.time() if step == step_start + 1 else t_first
    if max_minutes and step_start < budget_step <= step and (step == budget_step or step % log_interval == 0):
        fit = step + int((max_minutes * 60 - (time.time() - t_begin)) / seconds_per_step())  # asides included
        fit = min(settings['max_iters'], max(step, min(gather(fit))))  # capped as configured; the slowest rank decides
        if step == budget_step and fit < max_iters:
            log(f'max_minutes {max_minutes:g}: max_iters {max_iters} -> {fit}, the steps that fit at this speed')
        max_iters = config['max_iters'] = fit

    loss_sum += loss.detach()
    b = (t * n_bins).long().clamp(max=n_bins - 1)
    bin_sum.index_add_(0, b, per_sample.detach())
    bin_count.index_add_(0, b, torch.ones_like(per_sample))
    images_seen += B * world
    stop = bool(caught) and not ddp  # ranks stop together: at a log step, where the stats tell them one was caught
    if step % log_interval == 0 or step == max_iters:
        stats = torch.cat([loss_sum.view(1), bin_sum, bin_count, torch.tensor([len(caught)], device=device)])
        if ddp:
            dist.all_reduce(stats)  # the logged loss is the mean over ranks
        stop = stats[-1].item() > 0
        n_steps = (step - 1) % log_interval + 1
        dt = time.time() - t_last
        rate = images_seen / dt
        eta = (max_iters - step) * seconds_per_step()
        mfu = raw_model.flops_per_image(text_max_length) * rate / (peak * world) if peak else None
        train_loss = stats[0].item() / world / n_steps
        log(f'step {step} | loss {train_loss:.4f} | lr {lr_at(step - 1):.2e} | '
            f'{rate:.1f} img/s | mfu {f"{mfu:.1%}" if peak else "n/a"} | eta {eta / 60:.1f} min')
        curves(step, {'train/loss': train_loss, 'train/lr': lr_at(step - 1), 'train/images_per_s': rate,
                **({'train/mfu': mfu} if peak else {})})
        if step % (10 * log_interval) == 0 or step == max_iters:
            line, scalars = metrics.loss_by_t(stats[1:1 + n_bins].tolist(), stats[1 + n_bins:-1].tolist())
            log(line)
            curves(step, scalars)
            bin_sum.zero_(), bin_count.zero_()
        if dataset == 'laion':  # stream health over the interval, summed over ranks
            counts = torch.tensor(gather(stream.counters()), dtype=torch.float64).sum(0)
            line, scalars = data.health((counts - last_counts).tolist(), data_wait / n_steps, data_wait / dt)
            last_counts = counts
            log(line)
            curves(step, scalars)
        loss_sum.zero_()
        t_last, images_seen, data_wait = time.time(), 0, 0.0
    t_aside = time.time()
    if step % ckpt_interval == 0 or step == max_iters or stop:
        save()
    if sample_interval and (step % sample_interval == 0 or step == max_iters):
        write_samples()
    if eval_interval and (step % eval_interval == 0 or step == max_iters):
        evaluate()
    t_last += time.time() - t_aside  # img/s is training's alone

status = 128 + (caught or [signal.SIGTERM])[0] if stop and step < max_iters else 0  # a shell's, for a signal's end
log(f'stopped at step {step} by {signal.Signals(status - 128).name}: --init_from=resume continues from {ckpt_path}'
    if status else f'done: {step} steps in {(time.time() - t_begin) / 60:.2f} min')
curves.close()
if ddp:
    dist.destroy_process_group()
    if device_type == 'cpu':  # gloo's live threads abort interpreter shutdown (pytorch#179291): at exit, end first
        del stream  # its DataLoader's workers stop now
        atexit.register(lambda: (sys.stdout.flush(), os._exit(1 if hasattr(sys, 'last_value') else status)))
if status:  # not 0: `python train.py ... && python sample.py ...` stops here
    sys.exit(status)
