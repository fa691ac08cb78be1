"""Real VAEs and text encoders, without a hub: tiny models built from configs, saved with save_pretrained and loaded
by path through the very settings users give (vae=..., text_encoder=...)."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import shapes
from conftest import run, tiny_vae
from encoders import load_text_encoder, load_vae
from model import DiT

PROMPTS = ['large red circle in the center, blue background', 'small white square at the top, black background', '']


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPConfig, CLIPModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model, T5Config,
                              T5EncoderModel)
    root = tmp_path_factory.mktemp('hub')
    words = ['[PAD]', '[UNK]', '[BOS]', '[EOS]'] + sorted({w for s in shapes.all_scenes()
                                                          for w in shapes.CAPTION.format(**s).replace(',', '').split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]', bos_token='[BOS]',
                                        eos_token='[EOS]')
    V = len(words)
    torch.manual_seed(0)
    encoders = {  # a full CLIP (text and vision towers, as openai/clip-vit-large-patch14), a T5, a decoder LM
        'clip': CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                             eos_token_id=3),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8), projection_dim=16)),
        't5': T5EncoderModel(T5Config(vocab_size=V, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3)),
        'lm': Qwen3Model(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)),
    }
    for name, model in encoders.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tiny_vae(root / 'vae', scaling_factor=0.5, shift_factor=0.1)
    return root


def test_vae_scale_shift_round_trip(hub):
    vae = load_vae(str(hub / 'vae'))
    assert (vae.channels, vae.factor, vae.scale, vae.shift) == (4, 2, 0.5, 0.1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    mean = vae.vae.encode(x).latent_dist.mean  # the posterior mean, not a sample
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    torch.testing.assert_close(vae.decode(z), vae.vae.decode(mean).sample)  # decode inverts scale and shift exactly
    assert torch.equal(vae.encode(x), z)  # deterministic
    pixels = load_vae('')
    assert (pixels.channels, pixels.factor) == (3, 1) and torch.equal(pixels.decode(pixels.encode(x)), x)


@pytest.mark.parametrize('name, width', [('clip', 32), ('t5', 24), ('lm', 32)])
def test_text_encoders(hub, name, width):
    enc = load_text_encoder(str(hub / name), max_length=12, layer=-1)
    assert enc.dim == width and not any(p.requires_grad for p in enc.parameters())
    out = enc(PROMPTS)
    assert out.shape == (3, 12, width)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(enc([''])[0], out[2])  # the unconditional input is the empty caption's embedding
    first = load_text_encoder(str(hub / name), max_length=12, layer=1)(PROMPTS)
    assert first.shape == out.shape and not torch.allclose(first, out)  # another hidden layer
    # the DiT takes the encoder's width for its caption projection
    dit = DiT('DiT-Ti/2', 4, enc.dim, 8)
    assert dit.caption_proj.in_features == width and dit.patch_embed.in_channels == 4
    assert dit(torch.randn(3, 4, 8, 8), torch.rand(3), out).shape == (3, 4, 8, 8)


def test_train_and_sample_through_vae_and_clip(hub, tmp_path):
    base = [sys.executable, 'train.py', '--model=DiT-Ti/2', '--image_size=16', '--batch_size=4', '--max_iters=3',
            '--sample_interval=3', '--log_interval=1', f'--vae={hub / "vae"}', f'--text_encoder={hub / "clip"}',
            '--text_max_length=16', f'--out_dir={tmp_path}', '--device=cpu']
    p = run(base)
    assert '8x8x4 latents' in p.stdout
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['vae'] == str(hub / 'vae') and ckpt['config']['text_encoder'] == str(hub / 'clip')
    assert ckpt['model']['patch_embed.weight'].shape[1] == 4 and ckpt['model']['caption_proj.weight'].shape[1] == 32
    assert Image.open(tmp_path / 'samples_000003.png').size == (4 * 16, 4 * 16)
    sample = [sys.executable, 'sample.py', f'--out_dir={tmp_path}', '--prompt', PROMPTS[0], '--n', '2', '--steps', '3',
              '--out', str(tmp_path / 's.png'), '--device=cpu']
    run(sample)
    img = np.asarray(Image.open(tmp_path / 's.png'))
    assert img.shape == (16, 2 * 16, 3)  # decoded through the VAE to pixels
    # an encoder of another width, or pixels instead of 4-channel latents, is refused with one clear line
    for override, needle in ((f'--text_encoder={hub / "t5"}', 'text encoder'), ('--vae=', 'channels')):
        bad = run(sample + [override], check=False)
        assert bad.returncode != 0 and needle in bad.stderr and 'Traceback' not in bad.stderr, bad.stderr
