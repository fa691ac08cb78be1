"""train.py and sample.py run for real, as subprocesses, on tiny settings."""
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, logged_losses, run


def train(out_dir, *extra, check=True):
    return run([sys.executable, 'train.py', *TINY, f'--out_dir={out_dir}', *extra], check=check)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    p = train(out, '--max_iters=6', '--ckpt_interval=3')
    return out, p.stdout


def test_train_logs_and_checkpoint(trained):
    out, stdout = trained
    losses = logged_losses(stdout)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 10 for v in losses.values())
    assert 'img/s' in stdout and 'eta' in stdout and 'loss by t' in stdout
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)  # plain types and state_dicts only
    assert ckpt['step'] == 6 and ckpt['config']['max_iters'] == 6 and ckpt['data'] == [{'step': 6}]
    assert set(ckpt) >= {'model', 'ema', 'optimizer', 'step', 'config', 'data'}
    assert not any(k.startswith(('_orig_mod', 'module')) for k in ckpt['model'])
    assert not os.path.exists(out / 'ckpt.pt.tmp')
    # the EMA moved, but not as far as the model
    assert not torch.equal(ckpt['ema']['final.weight'], ckpt['model']['final.weight'])
    assert ckpt['ema']['final.weight'].abs().sum() > 0


def shapes_default(*keys):
    scope = {}
    exec(open(os.path.join(ROOT, 'config', 'shapes.py')).read(), scope)
    return [f'--{k}={scope[k]}' for k in keys]


# TINY's settings, and the preset, optimizer (AdamW's rate) and MLP ratio config/shapes.py trains with (tiny)
@pytest.mark.parametrize('settings', [[], shapes_default('model', 'optimizer', 'mlp_ratio', 'adamw_lr_scale')],
                         ids=['tiny', 'shapes'])
def test_resume_gives_the_same_losses(tmp_path, settings):
    full = logged_losses(train(tmp_path / 'a', *settings, '--max_iters=4').stdout)
    train(tmp_path / 'b', *settings, '--max_iters=2')
    p = train(tmp_path / 'b', *settings, '--max_iters=4', '--init_from=resume')
    assert 'resumed' in p.stdout
    resumed = logged_losses(p.stdout)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in resumed), (full, resumed)
    summary = next(line for line in p.stdout.splitlines() if 'parameters' in line)  # model, ..., optimizer
    assert all(setting.split('=')[1] in summary for setting in settings), summary  # the config's were in force
    # another optimizer cannot take over the state: a one-line error, the checkpoint kept
    other = '--optimizer=adamw' if settings else '--optimizer=muon'
    bad = train(tmp_path / 'b', *settings, other, '--max_iters=6', '--init_from=resume', check=False)
    assert bad.returncode != 0 and 'was trained with optimizer' in bad.stderr.strip().splitlines()[-1]
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 4
    # sample.py rebuilds the model the checkpoint was trained as (preset, MLP ratio)
    p = run([sys.executable, 'sample.py', f"--out_dir={tmp_path / 'b'}", '--prompt', 'small red circle on the left',
             '--n', '1', '--steps', '2', '--out', str(tmp_path / 'b.png')])
    assert 'wrote' in p.stdout


def test_lr_decays_along_the_chosen_curve(tmp_path):
    # the logged rate of each step: warmup, then the cosine or a straight line down to min_lr at max_iters
    base = ['--max_iters=40', '--warmup_iters=10', '--learning_rate=1e-2', '--min_lr=1e-3', '--decay_lr=True',
            '--ckpt_interval=1000']
    logged = {}
    for curve, left in (('cosine', lambda u: 0.5 * (1 + math.cos(math.pi * u))), ('linear', lambda u: 1 - u)):
        p = train(tmp_path / curve, *base, f'--lr_decay={curve}')
        logged[curve] = {int(line.split()[1]): float(line.split('lr ')[1].split()[0])
                         for line in p.stdout.splitlines() if line.startswith('step ')}
        for step in (5, 10, 20, 30, 40):  # a step's line shows the rate it trained at, that of iteration step - 1
            it = step - 1
            want = 1e-2 * (it + 1) / 10 if it < 10 else 1e-3 + left((it - 10) / 30) * 9e-3
            assert logged[curve][step] == pytest.approx(want, rel=6e-3), (curve, step)  # logged to 3 digits
    assert logged['linear'][20] < logged['cosine'][20] - 5e-4  # 7.3e-3 against 8.1e-3 a third of the way down


def test_adamw_lr_scale_scales_the_rate_of_adamws_part_only(tmp_path):
    # the output layer starts at zero and Adam's first update is about its rate times sign(g): after one step
    # the layer is that update, half as large at half the rate; later steps keep the ratio of the two rates
    final = {}
    for scale in (1.0, 0.5):
        train(tmp_path / str(scale), '--optimizer=muon', f'--adamw_lr_scale={scale}', '--max_iters=1')
        final[scale] = torch.load(tmp_path / str(scale) / 'ckpt.pt', weights_only=True)['model']['final.weight']
    assert final[1.0].abs().min() > 0 and torch.allclose(final[0.5], final[1.0] / 2, rtol=1e-3)
    train(tmp_path / 'three', '--optimizer=muon', '--adamw_lr_scale=0.25', '--max_iters=3')
    groups = torch.load(tmp_path / 'three' / 'ckpt.pt', weights_only=True)['optimizer']['param_groups']
    lr = {name: g['lr'] for g in groups for name in g['params']}
    assert lr['final.weight'] == pytest.approx(0.25 * lr['blocks.0.img.mlp.0.weight']) and lr['final.weight'] > 0
    one_line_error(train(tmp_path / 'bad', '--optimizer=muon', '--adamw_lr_scale=0', check=False), 'adamw_lr_scale')


def test_laion_evaluation_without_references_stops_before_loading_anything(tmp_path):
    # a VAE that does not exist: had the check come after loading, its error would be the one shown
    p = train(tmp_path, '--dataset=laion', '--eval_interval=10', '--vae=no/such/vae', check=False)
    one_line_error(p, 'eval_interval needs eval_ref')


def test_max_minutes_is_a_deadline(tmp_path):
    # the speed at step 50 plans the run; an aside after it (grids of 80 sampling steps every 60) slows it, and
    # the refits of each log interval lower the plan, so the run still ends near its deadline
    small = ['--model=DiT-Mi/8', '--batch_size=2', '--text_max_length=4', '--log_interval=10', '--decay_lr=True',
             '--warmup_iters=50']
    aside = ['--sample_interval=60', '--sample_steps=80']
    p = train(tmp_path / 'timed', *small, *aside, '--max_iters=100000', '--max_minutes=0.3')
    line = next(line for line in p.stdout.splitlines() if line.startswith('max_minutes'))
    planned = int(line.split('-> ')[1].split(',')[0])
    done = next(line for line in p.stdout.splitlines() if line.startswith('done'))  # done: N steps in M min
    steps, minutes = int(done.split()[1]), float(done.split()[4])
    timed = torch.load(tmp_path / 'timed' / 'ckpt.pt', weights_only=True)
    assert 50 < timed['step'] == timed['config']['max_iters'] == steps < planned, (planned, steps)
    assert minutes < 1.4 * 0.3, done  # a log interval's steps and the final grid may pass it (1.17x measured)
    # a resume keeps the step count the first run fitted, however fast this process is
    p = train(tmp_path / 'timed', *small, '--max_iters=100000', '--max_minutes=0.3', '--init_from=resume')
    assert not logged_losses(p.stdout)
    assert torch.load(tmp_path / 'timed' / 'ckpt.pt', weights_only=True)['step'] == steps
    # time to spare never trains past max_iters
    p = train(tmp_path / 'short', *small, '--max_iters=60', '--max_minutes=5')
    assert max(logged_losses(p.stdout)) == 60 and 'max_minutes' not in p.stdout


def test_max_minutes_plans_from_the_speed_after_the_first_step(tmp_path):
    # a first step that stalls 8 s, as torch.compile's does, is a cost paid once: the plan at step 50 counts it as
    # time spent, not as the speed of the steps to come, and the ETA printed there keeps to the deadline
    stall = ("import runpy, sys, time, flow; loss, calls = flow.loss, []; "
             "flow.loss = lambda *a, **k: (calls or time.sleep(8), calls.append(1), loss(*a, **k))[2]; "
             "sys.argv = sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")
    p = run([sys.executable, '-c', stall, 'train.py', *TINY, '--model=DiT-Mi/8', '--batch_size=2', '--text_max_length=4',
             '--log_interval=10', '--decay_lr=True', '--max_iters=100000', '--max_minutes=0.4', f'--out_dir={tmp_path}'])
    lines = p.stdout.splitlines()
    planned = int(next(line for line in lines if line.startswith('max_minutes')).split('-> ')[1].split(',')[0])
    steps = int(next(line for line in lines if line.startswith('done')).split()[1])
    assert 0.75 < planned / steps < 1.3, (planned, steps)  # the stall counted as speed: about half of them
    eta = float(next(line for line in lines if line.startswith('step 50 ')).split('eta ')[1].split()[0])
    assert eta <= 0.4, lines


def test_sample_grid(trained, tmp_path):
    out, _ = trained
    args = [sys.executable, 'sample.py', f'--out_dir={out}', '--prompt', 'large red circle in the center, blue background',
            '--prompt', 'small white square at the top, black background', '--n', '3', '--steps', '4', '--device=cpu']
    p = run(args + ['--out', str(tmp_path / 'a.png'), '--seed', '5'])
    assert 'wrote' in p.stdout
    run(args + ['--out', str(tmp_path / 'b.png'), '--seed', '5'])
    run(args + ['--out', str(tmp_path / 'c.png'), '--seed', '6', '--sampler', 'heun', '--shift', '2'])
    a, b, c = (np.asarray(Image.open(tmp_path / f)) for f in ('a.png', 'b.png', 'c.png'))
    assert a.shape == (2 * 16, 3 * 16, 3)  # one row per prompt, n columns, native resolution, no padding
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # prompts from a file, image-to-image, a negative prompt
    (tmp_path / 'prompts.txt').write_text('small red circle on the left, blue background\n\nlarge blue square on the right, red background\n')
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / 'init.png')
    run([sys.executable, 'sample.py', f'--out_dir={out}', '--prompts_file', str(tmp_path / 'prompts.txt'), '--n', '2',
         '--steps', '4', '--init_image', str(tmp_path / 'init.png'), '--strength', '0.5', '--negative_prompt', 'black',
         '--out', str(tmp_path / 'd.png')])
    assert np.asarray(Image.open(tmp_path / 'd.png')).shape == (2 * 16, 2 * 16, 3)


def one_line_error(p, *needles):
    assert p.returncode != 0
    err = p.stderr.strip()
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_and_corrupt_checkpoints(tmp_path):
    sample = [sys.executable, 'sample.py', '--prompt', 'x', f'--out_dir={tmp_path}']
    one_line_error(run(sample, check=False), 'no checkpoint', str(tmp_path))
    one_line_error(run([sys.executable, 'train.py', *TINY, f'--out_dir={tmp_path}', '--init_from=resume'], check=False),
                   'no checkpoint')
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint at all' * 10)
    assert 'weights_only' not in one_line_error(run(sample, check=False), 'unreadable')  # not torch's advice to unpickle
    torch.save({'model': {'w': torch.zeros(1000)}}, tmp_path / 'whole.pt')  # a real one, cut short as by a full disk
    (tmp_path / 'ckpt.pt').write_bytes((tmp_path / 'whole.pt').read_bytes()[:2000])
    one_line_error(run(sample, check=False), 'unreadable', 'zip archive')


def test_resume_with_another_model_names_the_setting(trained, tmp_path):
    shutil.copy(trained[0] / 'ckpt.pt', tmp_path / 'ckpt.pt')
    p = run([sys.executable, 'train.py', *TINY, f'--out_dir={tmp_path}', '--init_from=resume', '--max_iters=8',
             '--model=DiT-S/4'], check=False)
    err = one_line_error(p, 'do not fit this model', "model 'DiT-Ti/4' -> 'DiT-S/4'")
    assert 'max_iters' not in err  # a setting that changes no weight is not named
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['config']['mlp_ratio'] = 2  # as a preset redefined since the run: its weights no longer fit what it names
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    one_line_error(run([sys.executable, 'sample.py', '--prompt', 'x', f'--out_dir={tmp_path}'], check=False),
                   'do not fit this model', 'size mismatch')


def test_sample_py_bad_inputs_are_one_line_errors(trained, tmp_path):
    out, _ = trained
    sample = [sys.executable, 'sample.py', f'--out_dir={out}', '--prompt', 'x', '--steps', '2', '--device=cpu']
    for flags, message in ((['--n', '0'], '--n must be at least 1'), (['--steps', '0'], '--steps must be at least 1'),
                           (['--eval', '--eval_stride', '0'], '--eval_stride must be'),
                           (['--strength', '1.5'], '--strength must be in [0, 1]'), (['--shift', '0'], '--shift')):
        one_line_error(run(sample + flags, check=False), message)
    one_line_error(run(sample + ['--prompts_file', str(tmp_path / 'none.txt')], check=False), 'no file at')
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    one_line_error(run(sample + ['--init_image', str(tmp_path / 'bad.png')], check=False), 'not a readable image')
    one_line_error(run(sample[:2] + [f'--out_dir={out}'], check=False), 'at least one --prompt')


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('batch_size = 8\nlearning_rate = 3e-4\n')
    p = run([sys.executable, 'train.py', str(cfg), *TINY, '--batch_size=4', '--max_iters=0', f'--out_dir={tmp_path}'])
    assert 'global batch 4' in p.stdout  # the command line wins over the file
    one_line_error(run([sys.executable, 'train.py', '--max_itres=5'], check=False), "unknown setting 'max_itres'")
    one_line_error(run([sys.executable, 'train.py', '--max_iters=ten'], check=False), 'max_iters must be int')
    one_line_error(run([sys.executable, 'train.py', '--compile=1'], check=False), 'compile must be bool')
    one_line_error(run([sys.executable, 'train.py', str(tmp_path / 'none.py')], check=False), 'no config file')
    one_line_error(run([sys.executable, 'train.py', '--optimizer=sgd'], check=False),
                   "optimizer must be 'adamw' or 'muon'")
    one_line_error(run([sys.executable, 'train.py', '--lr_decay=step'], check=False),
                   "lr_decay must be 'cosine' or 'linear'")
    one_line_error(run([sys.executable, 'train.py', '--dataset=coco'], check=False),
                   "dataset must be 'shapes' or 'laion'")
    for arg, message in (('--ckpt_interval=0', 'ckpt_interval must be >= 1'), ('--t_sampling=normal', 't_sampling')):
        one_line_error(run([sys.executable, 'train.py', *TINY, arg, '--max_iters=1', f'--out_dir={tmp_path}'],
                           check=False), message)  # before the check: a traceback at step 1
    one_line_error(run([sys.executable, 'train.py', '--optimizer=muon', '--fsdp=True'], check=False), 'fsdp=False')
    one_line_error(run([sys.executable, 'train.py', '--model=DiT-Q/2'], check=False), 'unknown model preset')
    one_line_error(run([sys.executable, 'train.py', '--mlp_ratio=0'], check=False), 'mlp_ratio must be')
    bad = tmp_path / 'bad.py'
    bad.write_text('batch_size = 8\nlearnig_rate = 3e-4\n')
    one_line_error(run([sys.executable, 'train.py', str(bad)], check=False), "unknown setting 'learnig_rate'", str(bad))
    # an int is a fine float
    p = run([sys.executable, 'train.py', *TINY, '--learning_rate=1', '--max_iters=0', f'--out_dir={tmp_path}'])
    assert p.returncode == 0


def test_compile_follows_the_device_unless_set(tmp_path):
    # on a GPU machine, --device=cpu must not compile for the CPU (inductor's C++ backend takes minutes) unless asked
    probe = ("import runpy, sys, torch; torch.cuda.is_available = lambda: True; "
             "torch.compile = lambda m, **kw: print('torch.compile called') or m; "
             "sys.argv = sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")
    args = [sys.executable, '-c', probe, 'train.py', *TINY, '--max_iters=0', f'--out_dir={tmp_path}']
    assert 'torch.compile called' not in run(args).stdout
    assert 'torch.compile called' in run(args + ['--compile=True']).stdout

def test_every_shipped_config_is_valid(tmp_path):
    # each file is applied and checked key by key; the overrides after it keep the run offline and instant
    for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), '..', 'config'))):
        p = run([sys.executable, 'train.py', f'config/{name}', *TINY, '--dataset=shapes', '--vae=', '--text_encoder=hash',
                 '--dtype=float32', '--compile=False', '--max_iters=0', f'--out_dir={tmp_path}'])
        assert 'parameters' in p.stdout, name


def test_plain_sample_finds_the_run_just_trained(trained, tmp_path):
    out, _ = trained
    sample = [sys.executable, os.path.join(ROOT, 'sample.py'), '--prompt', 'small red circle on the left, blue background',
              '--n', '1', '--steps', '2', '--device=cpu']
    one_line_error(run(sample, check=False, cwd=tmp_path), 'no checkpoint', 'train one first')
    (tmp_path / 'out-shapes').mkdir()
    shutil.copy(out / 'ckpt.pt', tmp_path / 'out-shapes' / 'ckpt.pt')
    p = run(sample, cwd=tmp_path)
    assert 'out-shapes' in p.stdout and (tmp_path / 'samples.png').exists()
    (tmp_path / 'out').mkdir()
    shutil.copy(out / 'ckpt.pt', tmp_path / 'out' / 'ckpt.pt')
    one_line_error(run(sample, check=False, cwd=tmp_path), 'several runs', 'out-shapes', '--out_dir')
