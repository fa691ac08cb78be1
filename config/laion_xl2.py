# DiT-XL/2 on LAION at 256 px: config/laion_b2.py's data, encoders and recipe with the XL/2 model (28 blocks x 1152
# wide, 16 heads; 1.33B parameters with its two streams). If its weights, grads and AdamW state (16 bytes a parameter)
# plus activations do not fit, add --fsdp=True (shards them over the GPUs) and --grad_checkpointing=True.
#   torchrun --standalone --nproc_per_node=8 train.py config/laion_xl2.py    (from the repository root)
exec(open('config/laion_b2.py').read())
out_dir = 'out-laion-xl2'
model = 'DiT-XL/2'
