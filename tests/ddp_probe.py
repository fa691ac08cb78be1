"""Run train.py under torchrun and record, per rank, what each step saw: its captions, its local loss and a
checksum of the weights after the optimiser step. Written to OUT/probe{rank}.json. Prints the threads still running
if the interpreter shuts down (train.py's end under gloo should not get there)."""
import atexit
import json
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shapes  # noqa: E402
import flow  # noqa: E402

record = {'captions': [], 'loss': [], 'weights': []}
next_batch, loss, step = shapes.ShapesStream.__next__, flow.loss, torch.optim.AdamW.step


def probe_next(self):
    images, captions = next_batch(self)
    record['captions'].append(captions)
    return images, captions


def probe_loss(*args, **kw):
    out = loss(*args, **kw)
    record['loss'].append(out.mean().item())
    return out


def probe_step(self, *args, **kw):
    out = step(self, *args, **kw)
    record['weights'].append(sum(p.double().sum().item() for g in self.param_groups for p in g['params']))
    return out


@atexit.register
def threads_at_shutdown():
    names = sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task'))
    print('threads at interpreter shutdown:', ' '.join(names), flush=True)


shapes.ShapesStream.__next__, flow.loss, torch.optim.AdamW.step = probe_next, probe_loss, probe_step
out_dir = sys.argv[1]
sys.argv = ['train.py'] + sys.argv[2:]
runpy.run_path('train.py', run_name='__main__')
with open(os.path.join(out_dir, f"probe{os.environ['RANK']}.json"), 'w') as f:
    json.dump(record, f)
