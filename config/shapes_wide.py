# The embedded default on non-square canvases: the same spec drawn on 32x48 (landscape) and 48x32 (portrait), each
# batch on one of them (aspect-ratio buckets). The learned table, resized to each canvas's grid, stays: it placed the
# shapes far better than 2D RoPE here (README, Results).
#   python train.py config/shapes_wide.py
#   python sample.py --out_dir out-shapes-wide --prompt "small red circle on the left, blue background" --width 48
exec(open('config/shapes.py').read())
out_dir = 'out-shapes-wide'
buckets = '32x48,48x32'  # 96 image tokens each: ~1.5x the square's compute per image
