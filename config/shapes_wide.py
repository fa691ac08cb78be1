# The embedded default on non-square canvases: the same spec drawn on 32x48 (landscape) and 48x32 (portrait), each
# batch on one of them (aspect-ratio buckets). The learned table, resized to each canvas's grid, stays: it placed the
# shapes far better than 2D RoPE here (README, Any size; the table in EXPERIMENTS.md).
#   python train.py config/shapes_wide.py
#   python sample.py --out_dir out-shapes-wide --prompt "small red circle on the left, blue background" --width 48
exec(open('config/shapes.py').read())
out_dir = 'out-shapes-wide'
buckets = '32x48,48x32'  # 96 image tokens each: ~1.5x the square's compute per image
max_iters = 1920  # the square's budget before 2,400 steps (61,440 images; an ETA of 11-13 min on the AVX512 EPYC),
# where they fit in the max_minutes it inherits (README)
sample_interval = 960
