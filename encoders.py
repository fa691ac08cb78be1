"""
The frozen encoders around flowdit's DiT. Text: captions -> (B, L, D) embeddings. VAE: pixels in [-1, 1] <-> latents.
Both are named by a setting: 'hash' (a weight-free text encoder) or a transformers model; '' (pixel space) or a
diffusers AutoencoderKL, each by hub id or local path.
"""
import functools

import numpy as np
import torch
import torch.nn as nn

from model import to_device

class HashTextEncoder(nn.Module):
    """Weight-free, offline: each word maps to a fixed pseudo-random vector (a hash of the word seeds it), plus a
    fixed vector for its position, so word order survives. The DiT's caption projection learns the rest.
    Padding and the empty caption are zeros. Returns float32 on the CPU; the caller moves it."""

    def __init__(self, dim=64, max_length=16):
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.pos = torch.randn(max_length, dim, generator=torch.Generator().manual_seed(0)) / 2

    @functools.lru_cache(maxsize=65536)
    def word(self, w):
        seed = int.from_bytes(w.encode(), 'little') % (2 ** 63)  # stable across runs, unlike hash()
        return torch.from_numpy(np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32))

    def forward(self, captions):
        out = torch.zeros(len(captions), self.max_length, self.dim)
        for i, caption in enumerate(captions):
            words = ''.join(ch if ch.isalnum() else ' ' for ch in caption.lower()).split()[:self.max_length]
            if words:
                out[i, :len(words)] = torch.stack([self.word(w) for w in words]) + self.pos[:len(words)]
        return out


# the text-only class for model types whose checkpoints hold more (T5's decoder, CLIP's vision tower)
TEXT_ONLY = {'t5': 'T5EncoderModel', 'mt5': 'MT5EncoderModel', 'umt5': 'UMT5EncoderModel', 'clip': 'CLIPTextModel',
             'siglip': 'SiglipTextModel'}


class HFTextEncoder(nn.Module):
    """Any transformers text model by hub id or path: CLIP and T5 encoders, or a decoder LM whose hidden states serve
    as embeddings. Captions are padded to max_length. layer -1 is last_hidden_state (after CLIP's final norm, as SD
    uses it); another index picks hidden_states[layer] (SDXL takes CLIP's penultimate, -2)."""

    def __init__(self, name, max_length, layer):
        super().__init__()
        import transformers
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        if self.tokenizer.pad_token is None:  # decoder LMs often have none; right padding keeps causal tokens clean
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_type = transformers.AutoConfig.from_pretrained(name).model_type
        cls = getattr(transformers, TEXT_ONLY.get(model_type, 'AutoModel'))
        self.model = cls.from_pretrained(name).requires_grad_(False).eval()
        self.max_length, self.layer = max_length, layer
        cfg = self.model.config
        self.dim = getattr(cfg, 'hidden_size', None) or cfg.d_model

    @torch.no_grad()
    def forward(self, captions):
        tok = self.tokenizer(list(captions), padding='max_length', max_length=self.max_length, truncation=True,
                             return_tensors='pt')
        out = self.model(input_ids=to_device(tok.input_ids, self.model.device),
                         attention_mask=to_device(tok.attention_mask, self.model.device),
                         output_hidden_states=self.layer != -1)
        return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]  # (B, L, D)


def load_text_encoder(name, max_length, layer=-1):
    return HashTextEncoder(max_length=max_length) if name == 'hash' else HFTextEncoder(name, max_length, layer)


class PixelSpace(nn.Module):
    """vae = '': the model works on pixels directly."""
    channels, factor = 3, 1

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class VAE(nn.Module):
    """A diffusers AutoencoderKL by hub id or path. Latents are the posterior mean, shifted and scaled so that they
    are roughly unit-variance: z = (mean - shift_factor) * scaling_factor; decode inverts it exactly."""

    def __init__(self, name, subfolder=''):
        super().__init__()
        from diffusers import AutoencoderKL
        self.vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder or None).requires_grad_(False).eval()
        cfg = self.vae.config
        self.channels = cfg.latent_channels
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale, self.shift = cfg.scaling_factor, getattr(cfg, 'shift_factor', None) or 0.0

    @torch.no_grad()
    def encode(self, x):
        # x: (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)
        mean = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z.to(self.vae.dtype) / self.scale + self.shift).sample


def load_vae(name, subfolder=''):
    return PixelSpace() if name == '' else VAE(name, subfolder)
