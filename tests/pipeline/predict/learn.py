"""A short in-process training run on the synthetic set: a model that has learned something.

The project's own pieces (the reader's augmentation and collation, the solver) in one process
and one loop, without Ray: the test-time tricks need a trained model, not a trained cluster.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from panet_model import build_panet
from pipeline.config import load_job_config
from pipeline.data.augment import augment_table
from pipeline.data.collate import collate_train
from pipeline.data.reader import label_map
from pipeline.data.shards import iter_records, load_manifest
from pipeline.demo import CONFIG
from pipeline.train.checkpoints import save_state
from pipeline.train.solver import build_optimizer, build_scheduler


def train_checkpoint(train: Path, val: Path, steps: int, out: Path, batch: int = 4) -> Path:
    """Train the demo config's tiny model for `steps` steps; save a checkpoint into `out`.

    Returns:
        `out`, holding `state.pt` as a training run writes it.
    """
    job = load_job_config(
        CONFIG,
        {
            "data.train": str(train),
            "data.val": str(val),
            "solver.max_steps": steps,
            "solver.warmup_steps": min(50, steps // 4),
            "solver.ims_per_batch": batch,
            "scaling.num_workers": 1,
        },
    )
    manifest = load_manifest(train)
    labels = label_map(manifest)
    records = list(iter_records(train))
    torch.manual_seed(job.seed)
    model = build_panet(job.model, num_classes=len(labels) + 1).train()
    optimizer = build_optimizer(model, job)
    scheduler = build_scheduler(optimizer, job)
    per_epoch = len(records) // batch
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        chunk = records[k * batch : (k + 1) * batch]
        rows = augment_table(pa.Table.from_pylist(chunk), job.augment(), job.seed, epoch, labels)
        valid = [r for r in rows.to_pylist() if r["valid"] and r["labels"]]
        if not valid:
            continue
        images, targets = collate_train(valid)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.solver.clip_grad_norm)
        optimizer.step()
        scheduler.step()
    out.mkdir(parents=True, exist_ok=True)
    save_state(
        out,
        model=model.state_dict(),
        step=steps,
        num_classes=len(labels) + 1,
        categories={int(c["id"]): c["name"] for c in manifest["categories"]},
        config=job.to_dict(),
    )
    return out
