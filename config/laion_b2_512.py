# Stage 2 of config/laion_b2.py, progressive resolution as SD3, PixArt and Qwen-Image train: the same recipe at 512 px
# (32x32 latent patches: 4x the image tokens), starting from the 256 px run's EMA weights with a fresh optimizer at
# step 0 (init_from, given on the command line: without it the stage would start from scratch). Shards of images at
# least 512 px on their shorter side: prepare_laion.py --min_side=512 --out_dir=laion-shards-512.
#   torchrun --standalone --nproc_per_node=8 train.py config/laion_b2_512.py --init_from=out-laion-b2/ckpt.pt
exec(open('config/laion_b2.py').read())
out_dir = 'out-laion-b2-512'
data_shards = 'laion-shards-512/shard_*.jsonl'
image_size = 512
min_image_size = 512
max_iters = 100000  # 25.6M images at the global batch of 256: a fine-tune of the 256 px stage
