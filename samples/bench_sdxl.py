"""Interim SDXL training-step bench until `dreamlora bench` lands: python samples/bench_sdxl.py [MODEL] [RESOLUTION] [STEPS] (defaults random:sdxl 1024 30)."""
import sys, tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamlora.config import load_config
from dreamlora.train import train

model, res, steps = (sys.argv[1:] + ["random:sdxl", "1024", "30"][len(sys.argv) - 1:])[:3]
root = Path(tempfile.mkdtemp())
for name in ("inst", "cls"):
    (root / name).mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (int(res), int(res), 3), dtype=np.uint8)).save(root / name / f"{i}.png")
logs = []
cuda = torch.cuda.is_available()


def on_log(record):
    if cuda:
        torch.cuda.synchronize()
    logs.append((record["step"], record["time"], torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0))


cfg = load_config(None, {
    "model.name": model, "data.instance_dir": str(root / "inst"), "data.class_dir": str(root / "cls"), "data.class_prompt": "a photo of dog",
    "data.class_name": "dog", "data.resolution": res, "train.batch_size": "1", "adapter.rank": "4", "train.gradient_checkpointing": "true",
    "train.max_steps": steps, "train.log_every": "1", "train.num_samples": "1", "prior.steps": "2", "train.out": str(root / "run"),
})
result = train(cfg, on_log=on_log)
(s0, t0, _), (s1, t1, _) = logs[4], logs[-1]  # skip the first steps (allocation, kernel selection)
print(f"{model} {res}px batch 1+1 rank 4 grad-ckpt {result.precision}/{result.attention}: "
      f"{(s1 - s0) / (t1 - t0):.2f} it/s, training peak {max(m for *_, m in logs):.1f} GiB "
      f"(after samples {torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.1f} GiB)")
