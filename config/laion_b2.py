# DiT-B/2 on LAION at 256 px, the DiT paper's recipe: AdamW 1e-4 without weight decay, EMA 0.9999, global batch 256.
# SD-VAE latents: 256 / 8 = 32x32x4, patch 2 -> 16 x 16 = 256 image tokens; CLIP-L captions: 77 tokens of width 768.
#   python prepare_laion.py --out_dir=laion-shards --num_shards=1024
#   torchrun --standalone --nproc_per_node=8 train.py config/laion_b2.py
out_dir = 'out-laion-b2'
dataset = 'laion'
data_shards = 'laion-shards/shard_*.jsonl'
data_workers = 8  # per GPU
fetch_threads = 32  # per worker: 8 x 32 = 256 fetches in flight per GPU
image_size = 256
min_image_size = 256
random_flip = True
model = 'DiT-B/2'
vae = 'stabilityai/sd-vae-ft-ema'
text_encoder = 'openai/clip-vit-large-patch14'
text_max_length = 77
batch_size = 32  # per GPU: 32 x 8 GPUs = 256 global
learning_rate = 1e-4
warmup_iters = 1000
weight_decay = 0.0
ema_decay = 0.9999
max_iters = 400000  # 400K x 256 = 102M images, the DiT paper's budget for its B/2 comparisons
log_interval = 100
ckpt_interval = 5000
sample_interval = 5000
sample_prompts = 'a photograph of an astronaut riding a horse|a red sports car parked on a street at night|a bowl of fruit on a wooden table|a watercolor painting of a lighthouse by the sea'
# FID and CLIP score on 1,000 COCO captions every 10K steps: write coco-val2014.jsonl as the README says, then add
#   --eval_interval=10000 --eval_ref=coco-val2014.jsonl
