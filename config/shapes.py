# The embedded default: a text-conditioned DiT on 32x32 shapes, trained on a 2-core CPU within a 14-minute deadline.
#   python train.py config/shapes.py && python sample.py --prompt "large red circle in the center, blue background"
# dtype stays 'auto': bf16 where the CPU computes it natively (AVX512-BF16, AMX, ARM bf16), else fp32, as emulated
# bf16 is ~20x slower. The measurements the comments below cite: README's Results (every table whole: EXPERIMENTS.md).
out_dir = 'out-shapes'
model = 'DiT-Mi/4'  # 6 blocks x 128 wide, 64 image tokens (32/4)^2 + 8 caption tokens: 1.7x the steps of the
# 192-wide Ti/4 in the same minutes, and shape +3.6 / +9.0 points over it; 4 heads of 32, not 2 of 64: shape +1.3
# on the mean of six seeds in the same minutes (README)
mlp_ratio = 2  # MLPs half DiT's width: a step 1.17x cheaper; in the same minutes on an AVX2-only EPYC, shape
# +0.4 / +8.1 / +0.5 points over ratio 4 (seeds 0-2, README)
image_size = 32
text_max_length = 8  # every caption of the spec has 8 words
attn_impl = 'manual'  # the CPU's fused attention kernel is slow backward in bf16 for 72 tokens: +20-30% img/s
batch_size = 32  # small batches: more updates from the same images, which is what a short run lacks
optimizer = 'muon'  # Muon for the blocks' matrices, AdamW for the rest: in the same minutes as AdamW's 2,390 steps,
# shape +10.5 / -0.4 points and size +5.7 / +2.9 over it (seeds 0 / 1, README)
adamw_lr_scale = 0.5  # the rest (embeddings, biases, the input, time, caption and output layers) at half Muon's
# rate: at the slower machine's ~1,640 steps shape +0.9 points on the mean of eight seeds (6 up), all >= 85 (README)
max_iters = 2800  # 89,600 images where they fit: the minutes of ratio 4's 2,400 steps (1.25x the images of 1,920
# steps: shape +0.9 to +3.3, README)
max_minutes = 14.0  # where they do not, fewer steps: CPUs without native bf16 differ 2x in speed, and the count is
# refitted as a run drifts after step 50 (a deadline). On the AVX2-only EPYC itself 14 minutes held 2,642-2,800
# steps in a fast hour (shape 92.0-93.3%); at its slow hours' speed 1,480-1,770 steps, shape >= 85 in 14 of 16 runs
# at 4e-3 (84.1-88.7%), 10 of 10 at 5e-3 (85.5-89.4%); 13 minutes held 1,340-1,508, 2 of 4 (README)
learning_rate = 5e-3  # a small model with AdaLN-Zero takes 50x the DiT paper's rate: 4e-3 gained shape +6 points
# over 1e-3; 5e-3 (and its end, 5e-4) over 4e-3 at the slower machine's ~1,500 steps +1.0 on the mean of ten seeds
# (7 up), at 2,800 steps -1.3 / -0.6 (90.8 / 92.3%: the targets still met with room) (README)
min_lr = 5e-4
decay_lr = True
lr_decay = 'linear'  # a straight line to min_lr, not the cosine: at 1,700 steps shape +0.6 points on the mean of six
# seeds (4 up, 1 down, 1 tie), size +0.1; down to 0 lost (README); a short run's schedule (Bergsma et al. 2025)
warmup_iters = 100
ema_decay = 0.0  # no EMA: the decay's low final rate already averages; size +3.3 / +0.5, shape +0.8 / +1.4 (README)
t_mean = 1.0  # training t toward noise (median 0.73), where layout is decided: 1.5 gained size +4.5, shape +3.6
# points over 0; 1.0 gains shape +1.7 / +6.2 over 1.5 at 1,452 steps on an AVX2-only EPYC, ties at 1,920-2,400 (README)
t_std = 0.8  # a little narrower than SD3's 1: shape +1.3 points on the mean of ten seed pairs at 1,308-1,864 steps
# (6 of 10 up), size -0.2; 0.7 and 0.6 lost (README)
contrast = 0.05  # contrastive flow matching (Stoica et al. 2025; flow.loss), its paper's weight: shape +0.0 to +3.8
# points on four seeds, size -0.7 to +1.2, at no cost a step (README); the logged loss goes below zero
log_interval = 50
ckpt_interval = 500
sample_interval = 1200
sample_cfg = 3.0  # guidance scale of the grids and sample.py's default for this run: shape +0.2-1.9, size +0.5-1.0
# points over 4.0 on three seeds (README)
cfg_t_min = 0.22  # no guidance near data, t < 0.22 (sample.py's default for this run): there it rounds the corners
# of small squares, shape -4.5 to -9.6 points; guidance up to t = 1 (not EDM2's 0.84): shape +0.7 to +1.7 (README)
