import json
import sys

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
    assert summary['read'] == 18 and summary['kept'] == 10 and summary['shards'] == 3
    assert {k: v for k, v in summary['dropped'].items() if v} == expected
    shards = sorted((tmp_path / 'a').glob('shard_*.jsonl'))
    rows = [json.loads(line) for s in shards for line in open(s)]
    assert sorted(len(open(s).readlines()) for s in shards) == [3, 3, 4]
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
