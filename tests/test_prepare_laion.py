import json
import sys

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import run

GOOD = [(f'https://img.example.com/{i}.jpg', f'a photo of thing number {i}', 640, 480) for i in range(10)]
BAD = [  # (url, caption, width, height, punsafe, pwatermark) and the reason each is dropped
    (('https://img.example.com/3.jpg', 'a duplicate url', 640, 480, 0.0, 0.0), 'duplicate_url'),
    (('https://img.example.com/s.jpg', 'too small an image', 100, 480, 0.0, 0.0), 'small'),
    (('https://img.example.com/n.jpg', 'no size recorded', None, None, 0.0, 0.0), 'small'),
    (('https://img.example.com/w.jpg', 'a very wide banner', 2000, 400, 0.0, 0.0), 'aspect'),
    (('https://img.example.com/u.jpg', 'an unsafe image', 640, 480, 0.9, 0.0), 'punsafe'),
    (('https://img.example.com/m.jpg', 'a watermarked image', 640, 480, 0.0, 0.95), 'pwatermark'),
    (('https://img.example.com/c.jpg', 'ab', 640, 480, 0.0, 0.0), 'caption_length'),
    (('ftp://img.example.com/f.jpg', 'not over http', 640, 480, 0.0, 0.0), 'bad_url'),
]


def laion5b_parquet(path):
    rows = [(u, c, w, h, 0.01, 0.1) for u, c, w, h in GOOD] + [r for r, _ in BAD]
    cols = list(zip(*rows))
    pq.write_table(pa.table({'URL': list(cols[0]), 'TEXT': list(cols[1]), 'WIDTH': pa.array(cols[2], pa.float64()),
                             'HEIGHT': pa.array(cols[3], pa.float64()), 'punsafe': list(cols[4]),
                             'pwatermark': list(cols[5]), 'similarity': [0.3] * len(rows)}), path, row_group_size=7)


def test_filters_dedup_shards_and_summary(tmp_path):
    laion5b_parquet(tmp_path / 'part-0.parquet')
    args = [sys.executable, 'prepare_laion.py', '--input', str(tmp_path / '*.parquet'), '--num_shards', '3',
            '--min_side', '256', '--max_aspect', '2', '--max_punsafe', '0.5', '--max_pwatermark', '0.8']
    p = run(args + ['--out_dir', str(tmp_path / 'a')])
    assert 'kept 10' in p.stdout
    summary = json.load(open(tmp_path / 'a' / 'summary.json'))
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert summary['read'] == 18 and summary['kept'] == 10
    assert {k: v for k, v in summary['dropped'].items() if v} == expected
    shards = sorted((tmp_path / 'a').glob('shard_*.jsonl'))
    rows = [json.loads(line) for s in shards for line in open(s)]
    assert summary['shards'] == len(shards) <= 3 and len(rows) == 10  # rows go to a shard by a hash of their URL
    assert not (tmp_path / 'a' / '.work').exists()
    assert sorted(r['url'] for r in rows) == sorted(u for u, *_ in GOOD)  # each kept row once
    assert all(set(r) == {'url', 'caption', 'width', 'height'} and r['width'] == 640 for r in rows)
    assert [r['url'] for r in rows] != [u for u, *_ in GOOD]  # shuffled
    # the same settings write the same shards; another seed another order
    run(args + ['--out_dir', str(tmp_path / 'b')])
    assert all(open(s).read() == open(tmp_path / 'b' / s.name).read() for s in shards)
    run(args + ['--out_dir', str(tmp_path / 'c'), '--seed', '1'])
    assert any(open(s).read() != open(tmp_path / 'c' / s.name).read() for s in shards)


def test_relaion_columns_and_a_missing_one(tmp_path):
    pq.write_table(pa.table({'url': [u for u, *_ in GOOD], 'caption': [c for _, c, *_ in GOOD],
                             'original_width': [640] * 10, 'original_height': [480] * 10,
                             'aesthetic': [5.0] * 5 + [3.0] * 5}), tmp_path / 'relaion.parquet')
    p = run([sys.executable, 'prepare_laion.py', '--input', str(tmp_path / 'relaion.parquet'), '--num_shards', '2',
             '--min_aesthetic', '4.5', '--out_dir', str(tmp_path / 'out')])
    assert 'kept 5' in p.stdout and 'aesthetic 5' in p.stdout
    pq.write_table(pa.table({'url': ['https://a/b.jpg'], 'caption': ['hello there']}), tmp_path / 'bad.parquet')
    bad = run([sys.executable, 'prepare_laion.py', '--input', str(tmp_path / 'bad.parquet'),
               '--out_dir', str(tmp_path / 'o2')], check=False)
    assert bad.returncode != 0 and 'no column for width, height' in bad.stderr and 'Traceback' not in bad.stderr
    for flag in ('--num_shards', '--workers'):  # before anything is read or written
        bad = run([sys.executable, 'prepare_laion.py', '--input', str(tmp_path / 'relaion.parquet'), flag, '0',
                   '--out_dir', str(tmp_path / 'o3')], check=False)
        assert bad.stderr.strip() == f'error: {flag} must be at least 1, got 0' and not (tmp_path / 'o3').exists()


def relaion_parquet(path, start, n, duplicates=()):
    """n rows numbered from start (URL i), plus copies of the URLs in `duplicates`."""
    ids = list(range(start, start + n)) + list(duplicates)
    pq.write_table(pa.table({'url': [f'https://img.example.com/{i}.jpg' for i in ids],
                             'caption': [f'a photo of thing number {i}' for i in ids],
                             'original_width': [640] * len(ids), 'original_height': [480] * len(ids)}), path)


def shards_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob('*.json*'))}


def test_same_shards_whatever_the_processes_and_duplicates_across_files(tmp_path):
    relaion_parquet(tmp_path / 'a.parquet', 0, 300)
    relaion_parquet(tmp_path / 'b.parquet', 300, 300, duplicates=[5, 17, 5])  # 5 twice, 17 once: from file a
    args = [sys.executable, 'prepare_laion.py', '--input', str(tmp_path / '*.parquet'), '--num_shards', '8']
    one = run(args + ['--workers', '1', '--out_dir', str(tmp_path / 'one')])
    run(args + ['--workers', '2', '--out_dir', str(tmp_path / 'two')])
    assert shards_of(tmp_path / 'one') == shards_of(tmp_path / 'two')  # shards and summary, byte for byte
    summary = json.load(open(tmp_path / 'one' / 'summary.json'))
    assert summary['read'] == 603 and summary['kept'] == 600 and summary['dropped']['duplicate_url'] == 3
    urls = [json.loads(line)['url'] for p in (tmp_path / 'one').glob('shard_*.jsonl') for line in open(p)]
    assert len(urls) == len(set(urls)) == 600 and 'kept 600' in one.stdout
    assert {5, 17} <= {int(u.rsplit('/', 1)[1][:-4]) for u in urls}


def test_an_interrupted_run_redoes_only_what_is_missing(tmp_path, monkeypatch):
    import prepare_laion
    for i in range(3):
        relaion_parquet(tmp_path / f'{i}.parquet', 100 * i, 100, duplicates=[0] if i else ())
    args = ['--input', str(tmp_path / '*.parquet'), '--num_shards', '6', '--workers', '1']
    prepare_laion.main(args + ['--out_dir', str(tmp_path / 'clean')])
    merge, calls = prepare_laion.merge, []

    def crash_after_two(job):
        calls.append(job[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine went away in pass 2
        return merge(job)
    monkeypatch.setattr(prepare_laion, 'merge', crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_laion.main(args + ['--out_dir', str(tmp_path / 'out')])
    assert not (tmp_path / 'out' / 'summary.json').exists()  # nothing looks complete that is not
    assert not list((tmp_path / 'out').rglob('*.tmp'))
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / 'out').rglob('*.json*')}  # shards 0-1, pass 1's counts
    assert len(list((tmp_path / 'out' / '.work').glob('file_*.json'))) == 3
    monkeypatch.setattr(prepare_laion, 'merge', merge)
    prepare_laion.main(args + ['--out_dir', str(tmp_path / 'out')])
    assert shards_of(tmp_path / 'out') == shards_of(tmp_path / 'clean')
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items() if p.exists())  # not written again
    assert not (tmp_path / 'out' / '.work').exists()


@pytest.mark.slow
def test_memory_stays_flat_as_the_input_grows(tmp_path):
    import tracemalloc

    import prepare_laion
    peaks = []
    for files in (2, 8):  # 40K and 160K rows; shards of 10K rows either way
        folder = tmp_path / f'in{files}'
        folder.mkdir()
        for i in range(files):
            relaion_parquet(folder / f'{i}.parquet', 20_000 * i, 20_000)
        tracemalloc.start()
        prepare_laion.main(['--input', str(folder / '*.parquet'), '--num_shards', str(2 * files), '--workers', '1',
                            '--out_dir', str(tmp_path / f'out{files}')])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0], peaks  # 4x the rows, the same memory: bounded by a shard, not the input
