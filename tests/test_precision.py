"""dtype='auto': the fastest safe precision for the hardware, chosen from what it reports; and whether torch.compile
can run here."""
import sys

import pytest
import torch

import model
from conftest import TINY, logged_losses, run

AVX2_EPYC = {'fpu', 'sse2', 'avx', 'avx2', 'fma', 'f16c'}  # no AVX512: bf16 would be emulated, ~20x slower
SKYLAKE_X = AVX2_EPYC | {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'}  # AVX512, still no bf16 instructions
SAPPHIRE_RAPIDS = SKYLAKE_X | {'avx512_bf16', 'amx_bf16', 'amx_tile'}
GRAVITON3 = {'fp', 'asimd', 'sve', 'bf16', 'i8mm'}  # ARM's /proc/cpuinfo 'Features'


@pytest.mark.parametrize('device, gpu_bf16, flags, expected', [
    ('cuda', True, (), 'bfloat16'),  # Ampere and later
    ('cuda', False, (), 'float16'),  # V100, T4: fp16 with a gradient scaler
    ('cpu', False, SAPPHIRE_RAPIDS, 'bfloat16'),
    ('cpu', False, SAPPHIRE_RAPIDS - {'amx_bf16'}, 'bfloat16'),  # AVX512-BF16 alone
    ('cpu', False, GRAVITON3, 'bfloat16'),
    ('cpu', False, SKYLAKE_X, 'float32'),
    ('cpu', False, AVX2_EPYC, 'float32'),
    ('cpu', False, set(), 'float32'),  # no /proc/cpuinfo: nothing known, nothing risked
    ('mps', False, (), 'float32'),
])
def test_choose_dtype_every_branch(device, gpu_bf16, flags, expected):
    dtype, why = model.choose_dtype(device, gpu_bf16, flags)
    assert dtype == expected and why


def test_bf16_only_where_onednn_may_use_it():
    """ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN below the CPU's bf16 instructions: bf16 autocast would be emulated there
    (3 s a step of the shapes default against 0.18 in fp32 on a Zen 5 EPYC), so auto keeps fp32. oneDNN's "yes" is
    no news: it says yes wherever it can emulate."""
    assert model.choose_dtype('cpu', cpu_flags=SAPPHIRE_RAPIDS, onednn_bf16=False)[0] == 'float32'
    assert model.choose_dtype('cpu', cpu_flags=SKYLAKE_X, onednn_bf16=True)[0] == 'float32'
    p = run([sys.executable, '-c', "import model; print(model.resolve_dtype('auto', 'cpu')[0])"],
            env={'ONEDNN_MAX_CPU_ISA': 'AVX2'})
    assert p.stdout.strip() == 'float32'  # on any machine: without native bf16 the flags say so anyway


def test_explicit_dtype_wins_and_typos_are_one_line_errors(monkeypatch):
    # both hardware reports mocked: on an AVX2-only host the real oneDNN says no bf16, whatever the flags say
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    monkeypatch.setattr(model, 'cpu_flags', lambda: AVX2_EPYC)
    assert model.resolve_dtype('auto', 'cpu')[0] == 'float32'
    assert model.resolve_dtype('bfloat16', 'cpu') == ('bfloat16', 'set explicitly')
    monkeypatch.setattr(model, 'cpu_flags', lambda: SAPPHIRE_RAPIDS)
    assert model.resolve_dtype('auto', 'cpu')[0] == 'bfloat16'
    assert model.resolve_dtype('float32', 'cpu')[0] == 'float32'
    with pytest.raises(SystemExit, match='dtype must be'):
        model.resolve_dtype('bf16', 'cpu')


def test_a_device_typo_or_a_missing_gpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for device, message in (('cudax', "device 'cudax' is not a torch device"), ('gpu', 'is not a torch device'),
                            ('cuda:1', "device 'cuda:1', but torch sees no CUDA GPU here")):
        for dtype in ('auto', 'float32'):  # an explicit dtype does not skip the check
            with pytest.raises(SystemExit) as e:
                model.resolve_dtype(dtype, device)
            assert str(e.value).startswith('config error: ') and message in str(e.value) and '\n' not in str(e.value)
    for argv in (['train.py', '--device=cuda', '--max_iters=1'], ['sample.py', '--device=cuda', '--prompt', 'x'],
                 ['bench.py', 'train', '--device=gpu']):  # on this CPU machine: before any loading or training
        p = run([sys.executable, *argv], check=False, env={'CUDA_VISIBLE_DEVICES': ''})
        assert p.returncode != 0 and p.stderr.strip().startswith('config error: device'), p.stderr


def test_the_default_config_needs_no_native_bf16(monkeypatch, tmp_path):
    scope = {}
    exec(open('config/shapes.py').read(), scope)
    monkeypatch.setattr(model, 'cpu_flags', lambda: AVX2_EPYC)
    assert model.resolve_dtype(scope.get('dtype', 'auto'), 'cpu')[0] == 'float32'
    monkeypatch.undo()  # and train.py says first what it chose and why, on this machine
    p = run([sys.executable, 'train.py', 'config/shapes.py', *TINY, '--max_iters=0', f'--out_dir={tmp_path}'])
    first = p.stdout.splitlines()[0]
    assert first == 'dtype {}: {}'.format(*model.resolve_dtype('auto', 'cpu')), first


def test_fp16_trains_with_a_gradient_scaler_and_resumes(tmp_path):
    run([sys.executable, 'train.py', *TINY, '--dtype=float16', '--max_iters=2', f'--out_dir={tmp_path}'])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['scaler']['scale'] > 1  # the scaler ran and its state is in the checkpoint
    p = run([sys.executable, 'train.py', *TINY, '--dtype=float16', '--max_iters=4', f'--out_dir={tmp_path}',
             '--init_from=resume'])
    assert sorted(logged_losses(p.stdout)) == [3, 4]


def test_compile_runs_where_it_can(monkeypatch, tmp_path):
    from torch._inductor import cpp_builder
    assert model.resolve_compile(True, 'cuda', asked=False)[0] and not model.resolve_compile(False, 'cuda', True)[0]
    assert not model.resolve_compile(True, 'cpu', asked=False)[0]  # minutes of C++ compiling: only when asked
    monkeypatch.setattr(cpp_builder, 'get_cpp_compiler', lambda: 'g++')
    assert model.resolve_compile(True, 'cpu', asked=True) == (True, 'set explicitly')

    def none_found():
        raise cpp_builder.exc.InvalidCxxCompiler
    monkeypatch.setattr(cpp_builder, 'get_cpp_compiler', none_found)
    compiled, why = model.resolve_compile(True, 'cpu', asked=True)
    assert not compiled and 'C++ compiler' in why
    # train.py says so on its second line and trains eager: the same losses as a run that never asked
    env = {'CXX': 'no-such-compiler-here'}
    args = [sys.executable, 'train.py', *TINY, '--dtype=float32', '--max_iters=2']
    asked = run(args + ['--compile=True', f'--out_dir={tmp_path / "a"}'], env=env)
    assert asked.stdout.splitlines()[1].startswith('compile False: no C++ compiler'), asked.stdout
    assert logged_losses(asked.stdout) == logged_losses(run(args + [f'--out_dir={tmp_path / "b"}']).stdout)
