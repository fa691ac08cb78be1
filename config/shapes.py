# The embedded default: a text-conditioned DiT on 32x32 shapes, trained on a 2-core CPU in about 13 minutes.
#   python train.py config/shapes.py && python sample.py --out_dir=out-shapes --prompt "large red circle in the center, blue background"
out_dir = 'out-shapes'
model = 'DiT-Ti/4'  # 6 blocks x 192 wide, 64 image tokens (32/4)^2 + 12 caption tokens
image_size = 32
batch_size = 64
max_iters = 900  # 57,600 images at ~75 img/s on 2 cores
learning_rate = 1e-3  # a small model with AdaLN-Zero takes 10x the DiT paper's rate
min_lr = 1e-4
decay_lr = True
warmup_iters = 50
ema_decay = 0.995  # averages the last ~200 steps of a short run
log_interval = 25
ckpt_interval = 300
sample_interval = 300
