"""From dataset samples to what each rank needs: collate, TP broadcast, PP routing, CP split.

As in megatron-core's GPT training: data is read on tensor-parallel rank 0
and broadcast to its TP group; the first pipeline stage needs the tokens and
positions, the last stage the labels, the loss mask and the sparse targets,
and middle stages nothing. The first and the last stage both get the
attention mask: their layers attend by it, and a mask that keeps packed
documents apart must reach every layer (Megatron-LM's ``get_batch`` sends it
to both too). With context parallelism every sequence-shaped tensor (the
sparse targets included) is split exactly like the tokens.

Sparse targets travel compactly: ids as int32, weights as float16 (then
renormalized to sum to 1 in float32 on arrival, so the loss sees exact
distributions; float16 keeps 11 significant bits of each weight).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collate_kd", "get_kd_batch", "FIRST_STAGE_KEYS", "LAST_STAGE_KEYS"]

FIRST_STAGE_KEYS = ("tokens", "position_ids", "attention_mask")
LAST_STAGE_KEYS = ("labels", "loss_mask", "attention_mask", "kd_ids", "kd_weights")
_WIRE = {"kd_ids": torch.int32, "kd_weights": torch.float16}


def collate_kd(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch, padding ``kd_ids``/``kd_weights`` to the batch's largest K."""
    out = {}
    for key in samples[0]:
        if key in ("kd_ids", "kd_weights"):
            k = max(s[key].shape[-1] for s in samples)
            out[key] = torch.stack(
                [torch.nn.functional.pad(s[key], (0, k - s[key].shape[-1])) for s in samples]
            )
        else:  # a blend's samples also carry numpy scalars (BlendedDataset's dataset_id)
            out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return out


def _broadcast(batch: dict | None, keys, tp_group, src: int, device) -> dict[str, torch.Tensor]:
    """Send ``keys`` of ``batch`` from ``src`` to the TP group: shapes and dtypes first."""
    rank = dist.get_rank()
    if rank == src:
        present = [k for k in keys if k in batch and batch[k] is not None]
        meta = [(k, tuple(batch[k].shape), str(_WIRE.get(k, batch[k].dtype))) for k in present]
    else:
        meta = None
    box = [meta]
    dist.broadcast_object_list(box, src=src, group=tp_group)
    out = {}
    for key, shape, dtype_name in box[0]:
        dtype = getattr(torch, dtype_name.replace("torch.", ""))
        if rank == src:
            t = batch[key].to(device=device, dtype=dtype).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=src, group=tp_group)
        out[key] = t
    return out


def get_kd_batch(data_iterator, *, device: str | torch.device = "cpu") -> dict | None:
    """The batch this rank needs, following megatron-core's parallel state.

    TP rank 0 draws ``next(data_iterator)`` (a :func:`collate_kd` batch) and
    broadcasts; other TP ranks may pass ``None``. Returns only the stage's keys
    (``None`` on middle pipeline stages), with ``kd_ids`` as int64 and
    ``kd_weights`` as float32 rows summing to 1 (or 0 without targets), split
    along the sequence for this context-parallel rank.
    """
    from megatron.core import parallel_state as ps

    from megatron_slkd.compat.megatron import cp_split

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not (first or last):
        return None
    wanted = (FIRST_STAGE_KEYS if first else ()) + (LAST_STAGE_KEYS if last else ())
    keys = tuple(dict.fromkeys(wanted))  # one stage that is both: each key once
    tp_group = ps.get_tensor_model_parallel_group()
    src = ps.get_tensor_model_parallel_src_rank()
    batch = next(data_iterator) if dist.get_rank() == src else None
    out = _broadcast(batch, keys, tp_group, src, device)
    if "kd_ids" in out:
        out["kd_ids"] = out["kd_ids"].long()
        w = out["kd_weights"].float()
        total = w.sum(-1, keepdim=True)
        out["kd_weights"] = torch.where(total > 0, w / total.clamp(min=1e-12), 0.0)
    return cp_split(out)
