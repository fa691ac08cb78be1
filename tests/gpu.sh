# The GPU checks behind README's GPU table, on one GPU with no network. One stage per call (each fits 10 minutes);
# logs land in $OUT (default gpu-logs). Run each alone: a suite in the background starves a training run's CPU.
#   bash tests/gpu.sh suite      # the whole suite, GPU-only tests included, one line per test
#   bash tests/gpu.sh train      # a LAION-shaped run (DiT-B/2, 256 px, SD-VAE and CLIP-L sizes): DDP, resume, FSDP
#   bash tests/gpu.sh resume     # the same, short: 60 steps in one go against 30 + 30 resumed
#   bash tests/gpu.sh profile    # cProfile and torch.profiler over 20 steps of that run with a warm latent cache
#   bash tests/gpu.sh bench      # bench.py train at DiT-B/2 and DiT-XL/2 against diffusers' MMDiT, and sampling
#   bash tests/gpu.sh bench_xl_compiled
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
LAION="config/laion_b2.py --data_shards=/tmp/fake/shards/*.jsonl --vae=/tmp/fake/vae --text_encoder=/tmp/fake/clip
    --allow_private_urls=True --log_interval=10 --sample_interval=0 --warmup_iters=50 --learning_rate=3e-4
    --cache_dir=/dev/shm/fake-cache"
TORCHRUN="timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node=1 train.py $LAION"  # a first compile ~85 s

serve() {  # 2,048 generated photos on a loopback server, their shards, random-weight SD-VAE and CLIP-L (~70 s)
    (cd tests && python3 offline_laion.py /tmp/fake --images 2048 > "$OUT/server.log" 2>&1 &)
    while [ ! -f /tmp/fake/ready ]; do sleep 1; done
}

suite() {
    timeout 420 python3 -m pytest -v -n 10 -p no:benchmark --timeout=200 -rfE --tb=short --durations=10 \
        > "$OUT/pytest.log" 2>&1
    grep -E "FAILED|ERROR|Timeout|passed|failed" "$OUT/pytest.log" | tail -40
}

train() {
    serve
    $TORCHRUN --max_iters=200 --ckpt_interval=200 --out_dir=/tmp/full > "$OUT/full.log" 2>&1  # fills the latent cache
    $TORCHRUN --max_iters=100 --ckpt_interval=100 --out_dir=/tmp/half > "$OUT/half.log" 2>&1
    cp -r /tmp/half /tmp/half-fsdp
    $TORCHRUN --max_iters=200 --init_from=resume --out_dir=/tmp/half > "$OUT/resume.log" 2>&1
    $TORCHRUN --max_iters=200 --init_from=resume --fsdp=True --out_dir=/tmp/half-fsdp > "$OUT/fsdp.log" 2>&1
    timeout 60 python3 sample.py --out_dir=/tmp/half --prompt "w1 w2 w3" --prompt "w4 w5" --n 4 \
        --out "$OUT/sample.png" > "$OUT/sample.log" 2>&1
    for f in full resume fsdp; do echo "== $f"; grep "^step\|resumed\|sharded\|Error" "$OUT/$f.log" | tail -11; done
    tail -1 "$OUT/sample.log"
}

resume() {  # exact resume on the GPU, short: 0 -> 60 in one go against 0 -> 30, resumed -> 60
    serve
    $TORCHRUN --max_iters=60 --log_interval=5 --out_dir=/tmp/r-full > "$OUT/r-full.log" 2>&1
    $TORCHRUN --max_iters=30 --log_interval=5 --ckpt_interval=30 --out_dir=/tmp/r-half > "$OUT/r-half.log" 2>&1
    $TORCHRUN --max_iters=60 --log_interval=5 --init_from=resume --out_dir=/tmp/r-half > "$OUT/r-resume.log" 2>&1
    for f in r-full r-half r-resume; do echo "== $f"; grep "^step\|resumed\|Error" "$OUT/$f.log" | cut -c1-60; done
}

profile() {  # one run: epoch 1 fills the latent cache (64 steps), steps 80-100 run under cProfile and torch.profiler
    serve
    TORCH_LOGS=recompiles,graph_breaks timeout 300 python3 -c "
import cProfile, pstats, runpy, sys, time, torch
import data
from torch.profiler import profile, ProfilerActivity
prof, cprof, times, nxt = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]), cProfile.Profile(), [], data.LaionStream.__next__
def timed_next(self):  # once per step
    times.append(time.perf_counter())
    if len(times) == 80: prof.start(); cprof.enable()
    if len(times) == 100: cprof.disable(); prof.stop()
    return nxt(self)
data.LaionStream.__next__ = timed_next
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
dt = [b - a for a, b in zip(times, times[1:])]
print('ms per step, 10-step means:', [round(1e3 * sum(dt[i:i + 10]) / 10, 1) for i in range(0, len(dt) - 9, 10)])
pstats.Stats(cprof).sort_stats('tottime').print_stats(25)
pstats.Stats(cprof).sort_stats('cumtime').print_stats(40)
for key in ('self_cuda_time_total', 'self_cpu_time_total'):
    print(prof.key_averages().table(sort_by=key, row_limit=20))
" $LAION --max_iters=110 --out_dir=/tmp/prof --ckpt_interval=1000 > "$OUT/profile.log" 2>&1
    grep -E "^step|ms per step|recompil|graph break" "$OUT/profile.log" | cut -c1-300 | tail -30
}

bench() {
    local b="timeout 300 python3 bench.py train --res 256 --steps 10 --warmup 3"
    $b --model DiT-B/2 --batch 128 --compile 2>&1 | tee "$OUT/b2-compiled.log"
    $b --model DiT-B/2 --batch 128 2>&1 | tee "$OUT/b2-eager.log"
    timeout 200 python3 bench.py sample --model DiT-B/2 --res 256 --batch 64 --steps 28 --cfg 4 --compile 2>&1 |
        tee "$OUT/sample.log"
    $b --model DiT-XL/2 --batch 32 2>&1 | tee "$OUT/xl2-eager.log"
    $b --model DiT-XL/2 --batch 128 --grad_checkpointing 2>&1 | tee "$OUT/xl2-eager-ckpt.log"
}

bench_xl_compiled() {
    timeout 500 python3 bench.py train --res 256 --steps 10 --warmup 3 --model DiT-XL/2 --batch 32 --compile 2>&1 |
        tee "$OUT/xl2-compiled.log"
}

"$@"
