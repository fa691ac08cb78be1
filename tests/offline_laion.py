"""LAION at full model size with nothing to download: a loopback server of generated photos, shards of their URLs
as prepare_laion.py writes them, and SD-VAE's architecture and a CLIP-L-sized text encoder with random weights, saved
where train.py loads them from. For a real training run where no hub is reachable (the GPU machine):

    python tests/offline_laion.py /tmp/fake --images 2048 &       # writes /tmp/fake/ready, then serves until killed
    torchrun --standalone --nproc_per_node=1 train.py config/laion_b2.py --data_shards='/tmp/fake/shards/*.jsonl' \
        --vae=/tmp/fake/vae --text_encoder=/tmp/fake/clip --allow_private_urls=True
"""
import argparse
import json
import os
import threading

import numpy as np
import torch

import fault_server as fs

VOCAB = 49408  # CLIP-L's


def save_sd_vae(path):
    """SD-VAE's architecture (stabilityai/sd-vae-ft-ema's config) with random weights: its FLOPs, not its output."""
    from diffusers import AutoencoderKL
    AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
                  scaling_factor=0.18215).save_pretrained(path)
    return str(path)


def save_encoders(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast
    torch.manual_seed(0)
    save_sd_vae(os.path.join(root, 'vae'))
    words = ['[PAD]', '[UNK]', '[BOS]', '[EOS]'] + [f'w{i}' for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]', bos_token='[BOS]',
                            eos_token='[EOS]').save_pretrained(os.path.join(root, 'clip'))
    CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, pad_token_id=0, bos_token_id=2,
                                 eos_token_id=3)).save_pretrained(os.path.join(root, 'clip'))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('root')
    p.add_argument('--images', type=int, default=2048)
    p.add_argument('--shards', type=int, default=64)
    a = p.parse_args()
    os.makedirs(os.path.join(a.root, 'shards'), exist_ok=True)
    save_encoders(a.root)
    rng = np.random.default_rng(0)
    routes, rows = {}, []
    for i in range(a.images):  # 280-640 px, aspect 0.75-1.33: some shorter than LAION config's min_image_size
        w = int(rng.integers(280, 640))
        routes[f'/{i}.jpg'] = fs.jpeg(w, int(w / rng.uniform(0.75, 1.33)), seed=i)
        rows.append({'caption': ' '.join(f'w{j}' for j in rng.integers(0, VOCAB - 4, rng.integers(5, 40)))})
    url = fs.start(routes)[0]
    for s in range(a.shards):
        with open(os.path.join(a.root, 'shards', f'shard_{s:05d}.jsonl'), 'w') as f:
            for i in range(s, a.images, a.shards):
                f.write(json.dumps({'url': f'{url}/{i}.jpg', 'width': 0, 'height': 0, **rows[i]}) + '\n')
    open(os.path.join(a.root, 'ready'), 'w').write(url)
    print(f'serving {a.images} images at {url}', flush=True)
    threading.Event().wait()  # the server runs in its thread until this process is killed


if __name__ == '__main__':
    main()
