import time, sys, pathlib, tempfile, gc, weakref
sys.path.insert(0,'..')
import data, fault_server as fs
import test_laion as T
url, hits, srv = fs.start({**T.IMAGES})
tmp = pathlib.Path(tempfile.mkdtemp())
pattern = T.write_shards(tmp / 'shards', T.rows_for(url, list(T.IMAGES)), 4)
gc.disable()
s = data.LaionStream(pattern, 2, T.SIZE, 0, 0, 2, 2, **T.options(tmp))
for _ in range(3): next(s)
r = weakref.ref(s.loader); rs = weakref.ref(s)
t0 = time.time(); del s; print('stream alive', rs() is not None, 'loader alive', r() is not None, time.time() - t0)
if r() is not None:
    import objgraph
