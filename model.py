"""
The DiT of flowdit: a joint-attention (MMDiT-style) Diffusion Transformer (its frozen encoders are in encoders.py).

Image latents are patchified into tokens, caption embeddings are projected into tokens, and every block runs
both streams with their own weights, concatenating them only inside attention. Timestep and pooled caption
drive AdaLN-Zero modulation of both streams, so a fresh model is the identity in every block.
"""
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# name -> (depth, width, heads, patch). S/B/L/XL are the DiT paper's widths and depths; with two streams
# (image and caption) per block a preset holds about twice the parameters of the paper's model of that name.
# Mi and Ti are small ones for a laptop CPU; Mi (four heads of 32) is the embedded shapes default's: in the same
# minutes its 1.7x the steps learn shapes better than Ti's width does (README, geometry levers).
_SIZES = {'Mi': (6, 128, 4), 'Ti': (6, 192, 3), 'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16),
          'XL': (28, 1152, 16)}
PRESETS = {f'DiT-{name}/{p}': (d, w, h, p) for name, (d, w, h) in _SIZES.items() for p in (2, 4, 8)}


# dense bf16 tensor-core peaks, for MFU
PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def peak_flops(device):
    """The GPU's dense bf16 peak in FLOP/s, or None where it is not in the table (and on CPU)."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def cpu_flags():
    """The CPU's feature flags as Linux lists them (x86 'flags', ARM 'Features'); empty without /proc/cpuinfo."""
    try:
        with open('/proc/cpuinfo') as f:
            return {flag for line in f if line.startswith(('flags', 'Features'))
                    for flag in line.split(':', 1)[1].split()}
    except OSError:
        return set()


def choose_dtype(device_type, gpu_bf16=False, cpu_flags=(), onednn_bf16=True):
    """dtype='auto': the fastest safe autocast dtype from what the hardware reports, and why (master weights stay
    fp32 whatever it is). onednn_bf16: whether torch's oneDNN may use bf16 here, False where ONEDNN_MAX_CPU_ISA caps
    it below the CPU's own instructions. A pure function: resolve_dtype asks the hardware."""
    if device_type == 'cuda':
        if gpu_bf16:
            return 'bfloat16', 'the GPU computes bf16'
        return 'float16', 'the GPU has no bf16 (pre-Ampere): fp16 autocast with a gradient scaler'
    if device_type == 'cpu':
        native = sorted({'avx512_bf16', 'amx_bf16', 'bf16'} & set(cpu_flags))  # x86's flags; ARM's is 'bf16'
        if native and onednn_bf16:
            return 'bfloat16', f"the CPU computes bf16 natively ({', '.join(native)})"
        # oneDNN says yes wherever it can run bf16, emulated too: only its "no" is news
        why = (f"the CPU computes bf16 natively ({', '.join(native)}) but oneDNN may not use it (ONEDNN_MAX_CPU_ISA)"
               if native else 'the CPU has no native bf16')
        return 'float32', f'{why}: emulated bf16 would be ~20x slower than fp32'
    return 'float32', f'no bf16 rule for {device_type} devices'


def resolve_dtype(dtype, device):
    """An explicit dtype wins; 'auto' asks this machine's hardware. A device torch does not know, or CUDA where torch
    sees none, is a one-line error here, before anything loads onto it."""
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"config error: device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')")
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"config error: device {device!r}, but torch sees no CUDA GPU here: use device 'cpu'")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise SystemExit(f"config error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if dtype != 'auto':
        return dtype, 'set explicitly'
    if device_type != 'cpu':
        gpu_bf16 = device_type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
        return choose_dtype(device_type, gpu_bf16)
    try:
        onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN: the flags decide
        onednn_bf16 = True
    return choose_dtype(device_type, cpu_flags=cpu_flags(), onednn_bf16=onednn_bf16)


def resolve_compile(compile, device, asked):
    """(compile, why): torch.compile on CUDA; on the CPU only where asked (`asked`: the setting was given), as
    inductor's C++ backend compiles for a minute there, and only with a C++ compiler to build with."""
    if not compile or torch.device(device).type == 'cuda':
        return compile, 'set explicitly' if asked else 'the default on CUDA'
    if not asked:
        return False, 'off on the CPU unless set'
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # none found, or one that does not run
        return False, f'no C++ compiler for its CPU backend ({type(e).__name__}): install g++ or set CXX'
    return True, 'set explicitly'


def autocast_for(device, dtype):
    """The autocast context of a resolved dtype: none for fp32."""
    return nullcontext() if dtype == 'float32' else torch.autocast(torch.device(device).type, getattr(torch, dtype))


def to_device(x, device):
    """Host to GPU without stalling: a copy from pageable memory would first wait for all queued GPU work."""
    if x.device.type == 'cpu' and torch.device(device).type == 'cuda':
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def attention(q, k, v, impl):
    # q, k, v: (B, H, T, hd). 'manual' spells out what the fused kernel of 'sdpa' computes.
    if impl == 'sdpa':
        return F.scaled_dot_product_attention(q, k, v)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
    return att.softmax(dim=-1) @ v


def modulate(x, shift, scale):
    # x * (1 + scale) + shift in one pass over x
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_1d(t, dim, max_period=10000.0):
    # t: (B,) -> (B, dim), the transformer's sinusoidal code
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim, gh, gw):
    # (gh*gw, dim): half the channels code the row, half the column, as in MAE and DiT
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing='ij')
    return torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], dim=-1)


def resize_table(table, gh, gw):
    # (1, g*g, D) learned positions of a square grid -> (1, gh*gw, D), bilinearly; unchanged for the same grid
    g = math.isqrt(table.shape[1])
    if (gh, gw) == (g, g):
        return table
    pos = table.view(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    pos = F.interpolate(pos, size=(gh, gw), mode='bilinear', align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)


def token_positions(gh, gw, n_txt, device=None):
    """(N + L, 2) (row, column) of each image token, then of each caption token, for 2D RoPE: image tokens on their
    grid from the top-left corner, every caption token at the origin, as Flux places them. Measured against
    Qwen-Image's MSRoPE (captions on the diagonal past the image): better placement of shapes (README)."""
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing='ij')
    image = torch.stack([ys.flatten(), xs.flatten()], -1)
    return torch.cat([image, image.new_zeros(n_txt, 2)]).float()


def rotary(pos, head_dim, base=10000.0):
    """cos and sin of axial 2D RoPE, (T, hd/2) each, for positions (T, 2): a head's first hd/4 rotated pairs turn
    with the row, the next hd/4 with the column, at the frequencies base^(-i / (hd/4))."""
    n = head_dim // 4
    freqs = base ** (-torch.arange(n, dtype=torch.float32, device=pos.device) / n)
    angles = torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=-1)  # (T, hd/2)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    # x: (B, H, T, hd); the pairs (x[i], x[i + hd/2]) turned by the angles of cos, sin (T, hd/2), in fp32
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Stream(nn.Module):
    """One stream's half of a joint block: modulation, QKV with RMS-normed Q and K, output projection, MLP.
    The caption stream of the last block only lends keys and values to the image tokens, as its own outputs would
    never be read: last=True drops its queries and everything after attention."""

    def __init__(self, dim, heads, mlp_ratio, last=False):
        super().__init__()
        self.heads, self.last = heads, last
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if last else 6) * dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim)  # separate projections: contiguous outputs
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        if not last:
            self.q = nn.Linear(dim, dim)
            self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            # the exact GELU: on CPUs torch's tanh approximation (DiT's) takes ~8x as long forward and backward
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def pre_attention(self, x, y):
        # x: (B, T, D) tokens, y: (B, D) conditioning -> q (None if last), k, v (B, H, T, hd), the remaining modulation
        mod = self.mod(y).chunk(2 if self.last else 6, dim=-1)
        B, T, D = x.shape
        h = modulate(self.norm1(x), mod[0], mod[1])

        def heads(proj, norm=None):
            z = proj(h).view(B, T, self.heads, D // self.heads)  # (B, T, H, hd)
            if norm:  # before the transpose, where rows are contiguous (no copies); in fp32, as autocast would
                z = norm(z.float()).to(z.dtype)  # otherwise hand the norm bf16 inputs and fp32 weights: a slow path
            return z.transpose(1, 2)  # (B, H, T, hd)
        q = None if self.last else heads(self.q, self.q_norm)
        return q, heads(self.k, self.k_norm), heads(self.v), mod[2:]

    def post_attention(self, x, o, mod):
        # x: (B, T, D) this stream's tokens, o: (B, H, T, hd) attention's output for them
        gate_attn, shift_mlp, scale_mlp, gate_mlp = mod
        x = torch.addcmul(x, gate_attn.unsqueeze(1), self.proj(o.transpose(1, 2).flatten(2)))  # x + gate * proj(o)
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, attn_impl, last=False):
        super().__init__()
        self.attn_impl = attn_impl
        self.img = Stream(dim, heads, mlp_ratio)
        self.txt = Stream(dim, heads, mlp_ratio, last=last)

    def forward(self, x, c, y, rope=None):
        # x: (B, N, D) image tokens, c: (B, L, D) caption tokens, y: (B, D) conditioning, rope: None or cos, sin
        qx, kx, vx, mod_x = self.img.pre_attention(x, y)
        qc, kc, vc, mod_c = self.txt.pre_attention(c, y)
        # joined along the sequence: cat's copy leaves them contiguous, as the attention kernels want them.
        # In the last block only the image tokens ask
        q = qx if self.txt.last else torch.cat((qx, qc), dim=2)  # (B, H, N+L or N, hd)
        k, v = torch.cat((kx, kc), dim=2), torch.cat((vx, vc), dim=2)  # (B, H, N+L, hd)
        if rope is not None:
            cos, sin = rope
            q, k = rotate(q, cos[:q.shape[2]], sin[:q.shape[2]]), rotate(k, cos, sin)
        o = attention(q, k, v, self.attn_impl)  # (B, H, N+L or N, hd)
        N = x.shape[1]
        x = self.img.post_attention(x, o[:, :, :N], mod_x)
        c = None if self.txt.last else self.txt.post_attention(c, o[:, :, N:], mod_c)  # None: the caption ends here
        return x, c


class DiT(nn.Module):
    def __init__(self, preset, in_channels, caption_dim, grid, attn_impl='sdpa', grad_checkpointing=False,
                 pos_embed='table', mlp_ratio=4):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
        depth, dim, heads, patch = PRESETS[preset]
        if grid % patch:
            raise ValueError(f'latent grid {grid} is not divisible by the patch size {patch} of {preset}')
        self.patch, self.in_channels, self.grid, self.dim, self.depth = patch, in_channels, grid, dim, depth
        self.mlp_ratio = mlp_ratio
        if pos_embed not in ('table', 'rope'):
            raise ValueError(f"pos_embed must be 'table' or 'rope', got {pos_embed!r}")
        if not (isinstance(mlp_ratio, int) and mlp_ratio >= 1):
            raise ValueError(f'mlp_ratio must be a whole number >= 1, got {mlp_ratio!r}')
        self.grad_checkpointing, self.rope, self.head_dim = grad_checkpointing, pos_embed == 'rope', dim // heads
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        # 'table': a learned table added to the tokens, sin-cos at init, for the trained grid (resized for another);
        # 'rope': no table, 2D rotary embeddings in attention, the same for every grid size and shape
        self.pos_embed = None if self.rope else nn.Parameter(torch.zeros(1, (grid // patch) ** 2, dim))
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pool_proj = nn.Linear(caption_dim, dim)  # W_c of t~ = W_t Emb(t) + W_c mean(c)
        self.caption_proj = nn.Linear(caption_dim, dim)
        self.blocks = nn.ModuleList([JointBlock(dim, heads, mlp_ratio, attn_impl, last=i == depth - 1)
                                     for i in range(depth)])
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(dim, patch * patch * in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # initialised like a linear layer, as in DiT
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.pos_embed is not None:
            g = self.grid // self.patch
            self.pos_embed.data.copy_(sincos_2d(self.dim, g, g).unsqueeze(0))
        for m in self.t_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # AdaLN-Zero: zero modulation means zero gates, so every block starts as the identity and the output at 0
        for block in self.blocks:
            for stream in (block.img, block.txt):
                nn.init.zeros_(stream.mod[-1].weight)
                nn.init.zeros_(stream.mod[-1].bias)
        for m in (self.final_mod[-1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, ctx):
        # x: (B, C, H, W) latents, t: (B,) in [0, 1], ctx: (B, L, caption_dim) caption embeddings
        B, C, H, W = x.shape
        p, gh, gw = self.patch, H // self.patch, W // self.patch
        # (B, N, D), N = (H/p)*(W/p), made contiguous once (the table first does it in the sum): strided like the
        # transposed patches, the residual stream would be copied by every LayerNorm
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x.contiguous() if self.rope else self.pos_embed_for(gh, gw) + x
        rope = rotary(token_positions(gh, gw, ctx.shape[1], x.device), self.head_dim) if self.rope else None
        y = self.t_embed(sincos_1d(1000 * t, 256)) + self.pool_proj(ctx.mean(dim=1))  # (B, D)
        c = self.caption_proj(ctx)  # (B, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x, c = checkpoint(block, x, c, y, rope, use_reentrant=False)
            else:
                x, c = block(x, c, y, rope)
        shift, scale = self.final_mod(y).chunk(2, dim=-1)
        x = self.final(modulate(self.final_norm(x), shift, scale))  # (B, N, p*p*C)
        x = x.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return x.reshape(B, C, H, W)

    def pos_embed_for(self, gh, gw):
        # the learned table covers the trained grid; another grid gets it resized
        return resize_table(self.pos_embed, gh, gw)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self, n_txt):
        """Training FLOPs per image (forward + backward = 3x forward), matmuls only: linear layers and attention."""
        N, L, D = (self.grid // self.patch) ** 2, n_txt, self.dim
        r = self.mlp_ratio
        # MACs: qkv 3 D^2, proj D^2, MLP 2 r D^2 a token; QK^T and AV
        per_block = (4 + 2 * r) * D * D * (N + L) + 2 * (N + L) ** 2 * D
        # the last block's caption stream only makes keys and values: no q, proj or MLP, and no queries in attention
        macs = self.depth * per_block - (2 + 2 * r) * D * D * L - 2 * L * (N + L) * D
        macs += 2 * self.in_channels * self.patch ** 2 * D * N  # patch embedding and final projection
        return 3 * 2 * macs


def save_checkpoint(ckpt, path):
    """Atomic: a crash mid-write leaves the last checkpoint whole."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_checkpoint(path):
    """The checkpoint dict, or a one-line exit that says what is wrong with it."""
    if not os.path.isfile(path):
        sys.exit(f'error: no checkpoint at {path}: train one first (python train.py ...) or point --out_dir at one')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch's own advice, to load with weights_only=False, does not apply to a damaged file
        why = str(e).partition('WeightsUnpickler error:')[2].strip() or str(e)
        sys.exit(f'error: checkpoint {path} is unreadable: truncated, damaged or not a flowdit checkpoint '
                 f"({type(e).__name__}: {why.splitlines()[0].split('. ')[0][:160]})")


def load_weights(model, path):
    """The EMA weights of the checkpoint at `path` into `model` (progressive resolution: a learned table is resized
    to the model's grid), or a one-line exit that says why they do not fit."""
    if not os.path.isfile(path):
        sys.exit(f'error: init_from={path}: no checkpoint there (train the run it names first, or name another)')
    weights = load_checkpoint(path)['ema']
    if model.pos_embed is not None and 'pos_embed' in weights:
        g = model.grid // model.patch
        weights['pos_embed'] = resize_table(weights['pos_embed'], g, g)
    return fit_weights(model, weights, path)


WEIGHT_SETTINGS = ('model', 'pos_embed', 'mlp_ratio', 'image_size', 'vae', 'text_encoder')  # they shape the weights


def fit_weights(model, weights, path, trained_with=None, now=None):
    """model.load_state_dict(weights), or a one-line exit that says why they do not fit, naming first the settings
    that shape weights and changed from the checkpoint's run (trained_with) to this one (now): dicts of settings."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        changed = [f'{k} {trained_with[k]!r} -> {now[k]!r}' for k in WEIGHT_SETTINGS
                   if k in (trained_with or {}) and k in now and trained_with[k] != now[k]]
        hint = f" (this run changes {', '.join(changed)})" if changed else ''
        sys.exit(f"error: the weights of {path} do not fit this model{hint}: {' '.join(str(e).split())[:300]}")
    return model


def __getattr__(name):  # the encoders' first home: `from model import load_vae` still works
    import encoders
    return getattr(encoders, name)
