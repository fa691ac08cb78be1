import os
import sys

import pytest

from configurator import check, configure
from conftest import TINY, run


def settings():
    return dict(batch_size=64, learning_rate=1e-4, decay_lr=False, out_dir='out')


def test_a_config_file_then_the_command_line(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 32\nlearning_rate = 1  # an int where a float is expected\n_private = 'ignored'\n")
    s = settings()
    given = configure(s, [str(cfg), '--batch_size=16', '--decay_lr=True', '--out_dir=out-b16'])
    assert s == dict(batch_size=16, learning_rate=1.0, decay_lr=True, out_dir='out-b16')  # the command line wins
    assert type(s['learning_rate']) is float
    assert given == {'batch_size', 'learning_rate', 'decay_lr', 'out_dir'}


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=16'], "unknown setting 'batch_sise' (command line)"),
    (['--batch_size=1.5'], 'batch_size must be int, got 1.5 (command line)'),
    (['--decay_lr=1'], 'decay_lr must be bool, got 1'),
    (['--batch_size'], 'write --batch_size=VALUE'),
    (['no/such/config.py'], 'no config file no/such/config.py'),
])
def test_bad_settings_stop_with_one_line(argv, message):
    s = settings()
    with pytest.raises(SystemExit) as e:
        configure(s, argv)
    assert str(e.value).startswith('config error: ') and message in str(e.value) and '\n' not in str(e.value)
    assert s == settings()  # the bad value is not applied


BOUNDS = dict(choices=dict(decay='cosine linear'.split()), at_least=dict(batch_size=1, warmup=0),
              positive=('lr',), fractions=('drop',))


@pytest.mark.parametrize('bad, message', [
    (dict(decay='step'), "decay must be 'cosine' or 'linear', got 'step'"),
    (dict(batch_size=0), 'batch_size must be >= 1, got 0'),
    (dict(warmup=-1), 'warmup must be >= 0, got -1'),
    (dict(lr=0.0), 'lr must be > 0, got 0.0'),
    (dict(drop=1.5), 'drop must be in [0, 1], got 1.5'),
    (dict(drop=-0.1), 'drop must be in [0, 1], got -0.1'),
])
def test_values_out_of_bounds_stop_with_one_line(bad, message):
    good = dict(decay='linear', batch_size=1, warmup=0, lr=1e-4, drop=1.0)  # every bound itself is allowed
    check(good, **BOUNDS)
    with pytest.raises(SystemExit) as e:
        check({**good, **bad}, **BOUNDS)
    assert str(e.value) == f'config error: {message}'


def test_an_output_folder_the_run_cannot_write_stops_before_it_trains(tmp_path):
    good = dict(decay='linear', batch_size=1, warmup=0, lr=1e-4, drop=1.0)
    check({**good, 'out_dir': str(tmp_path / 'runs' / 'a')}, **BOUNDS, folders=('out_dir',))
    assert (tmp_path / 'runs' / 'a').is_dir() and not os.listdir(tmp_path / 'runs' / 'a')  # made, left empty
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit) as e:  # a file where a folder must go
        check({**good, 'out_dir': str(tmp_path / 'file' / 'a')}, **BOUNDS, folders=('out_dir',))
    assert str(e.value).startswith(f"config error: out_dir '{tmp_path / 'file' / 'a'}' is not a folder this run can")
    # train.py, with TensorBoard off (whose writer would otherwise fail first): at once, not at the first checkpoint
    p = run([sys.executable, 'train.py', *TINY, '--tensorboard_log=False', f"--out_dir={tmp_path / 'file' / 'a'}"],
            check=False)
    assert p.returncode != 0 and 'config error: out_dir' in p.stderr.strip().splitlines()[-1]
    assert 'step' not in p.stdout and 'dtype' not in p.stdout  # nothing loaded, nothing trained
