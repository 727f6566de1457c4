"""The collective helpers every multi-process part uses (training, evaluation, in-training scores).

Each works in a single process too (nothing to exchange), so callers never branch on the process count.
"""
import torch
import torch.distributed as dist

__all__ = ['is_distributed', 'all_gather_object', 'gather_object_on_main', 'broadcast_from_main',
           'failed_ranks', 'raise_if_any_failed']


def is_distributed():
    """True when torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process (collective); [obj] in a single process."""
    if not is_distributed():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def gather_object_on_main(obj):
    """[obj of every rank] on the main process, None on the others (collective)."""
    if not is_distributed():
        return [obj]
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, everyone, dst=0)
    return everyone


def broadcast_from_main(obj):
    """The main process's `obj` on every process (collective)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def failed_ranks(error, device, group=None):
    """Collective: the ranks whose `error` (an exception or None) is not None, on every process ([0] or [] in a
    single process). `device`: where the default group's backend exchanges tensors (the CPU for a gloo `group`)."""
    if not is_distributed():
        return [0] if error is not None else []
    flag = torch.tensor([int(error is not None)], device=torch.device('cpu') if group is not None else device)
    flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, flag, group=group)
    return [rank for rank, f in enumerate(flags) if f.item()]


def raise_if_any_failed(error, device, group=None):
    """Collective: every process says whether it failed (`error` is its exception or None); a failed one re-raises
    its error, the others raise too, so that none goes on to wait alone at the next collective. `device`: where the
    default group's backend exchanges tensors (the CPU for a gloo `group`)."""
    failed = failed_ranks(error, device, group)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f'process(es) {failed} failed (their error is in their log); stopping')
