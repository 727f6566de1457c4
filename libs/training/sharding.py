"""Where each trained parameter lives over the processes: the view the EMA, the checkpoints and the replica check share.

Kinds (`libs.training.launch.sharding_kind`):
  replicated  one process or DDP: every process holds every parameter.
  fsdp1       FSDP1 with use_orig_params: a parameter's local view is a 1-D slice of its flattened values; the
              slices of ranks 0..W-1 follow each other (FSDP splits the flat parameter into W consecutive chunks).
  fsdp2       fully_shard: DTensor parameters placed Shard(0) on a 1-D mesh; the local chunks follow each other
              along dim 0, hence also in the flattened values.
  zero2       DeepSpeed ZeRO-2: the module keeps full (bf16 or fp32) replicas, the optimizer owns an fp32 master
              partition; a parameter's fragment of it is a 1-D slice at `_hp_mapping.lp_fragment_address`.

`local_tensors()` are the fp32 values this process owns and its optimizer updates (the masters under ZeRO-2);
`parts[k][r] = (offset, numel)` is rank r's element range of the flattened parameter k. The ranges are checked
to tile every parameter exactly once, so a sharding this module does not know fails at start-up, not in a save.
"""
import torch
import torch.distributed as dist

from libs.distributed import all_gather_object

__all__ = ['ParamLayout', 'replica_record']

_WRAPPER_NAMES = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.')


def _clean(name):
    for part in _WRAPPER_NAMES:
        name = name.replace(part, '')
    return name


class ParamLayout:
    """The parameters of a prepared model, their full shapes (`full_shapes`: name -> shape, the released key
    layout and order) and every process's part of each."""

    def __init__(self, kind, prepared, unwrapped, full_shapes, rank, world_size):
        self.kind, self.rank, self.world = kind, rank, world_size
        self.sharded = kind != 'replicated'
        self.names, self.shapes = list(full_shapes), dict(full_shapes)
        source = unwrapped if kind in ('replicated', 'zero2', 'fsdp2') else prepared
        params = {_clean(n): p for n, p in source.named_parameters()}
        if set(params) != set(self.names):
            raise RuntimeError(f"the prepared model's parameters differ from the model's: "
                               f"{sorted(set(params) ^ set(self.names))[:5]}")
        self.params = [params[n] for n in self.names]
        local = self.local_tensors()
        self.device = local[0].device
        self.local_shapes = [t.shape for t in local]
        mine = [self._my_part(p, t) for p, t in zip(self.params, local)]
        everyone = all_gather_object(mine) if self.sharded else [mine]
        self.parts = [[everyone[r][k] for r in range(len(everyone))] for k in range(len(self.names))]
        self._place_consecutive()
        self._check_tiling()

    # ------------------------------------------------------------------------ local values
    def local_tensors(self):
        """This process's fp32 values of every parameter (views of the live storage; fetched anew each call)."""
        if self.kind == 'fsdp2':
            return [p.detach().to_local() for p in self.params]
        if self.kind == 'zero2':
            return [p._hp_mapping.hp_fragment if p._hp_mapping is not None
                    else torch.zeros(0, dtype=torch.float32, device=p.device) for p in self.params]
        return [p.detach() for p in self.params]

    def replicated_tensors(self):
        """Tensors every process holds a full copy of, which must therefore be identical everywhere."""
        if self.kind in ('replicated', 'zero2'):
            return [p.detach() for p in self.params]
        return []

    def _my_part(self, param, local):
        if self.kind == 'zero2':
            m = param._hp_mapping
            return (0, 0) if m is None else (int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel))
        if self.kind == 'fsdp2':
            mesh = param.device_mesh
            if mesh.ndim != 1 or mesh.mesh.tolist() != list(range(self.world)) or \
                    [type(pl).__name__ for pl in param.placements] != ['Shard'] or param.placements[0].dim != 0:
                raise RuntimeError(f"FSDP2 parameters must be Shard(0) on a 1-D mesh of all {self.world} processes; "
                                   f"got {param.placements} on {mesh}")
        return (None, local.numel())           # offset placed by rank order (_place_consecutive)

    def _place_consecutive(self):
        for parts in self.parts:
            if parts[0][0] is None:
                offsets = [0]
                for _, n in parts[:-1]:
                    offsets.append(offsets[-1] + n)
                parts[:] = [(o, n) for o, (_, n) in zip(offsets, parts)]

    def _check_tiling(self):
        for name, parts in zip(self.names, self.parts):
            numel, covered = self.shapes[name].numel(), 0
            for offset, n in sorted(p for p in parts if p[1]):
                if offset != covered:
                    break
                covered += n
            if covered != numel or sum(n for _, n in parts) != numel:
                raise RuntimeError(
                    f"{self.kind}: the processes' parts of parameter {name} {tuple(self.shapes[name])} are {parts}, "
                    "which do not cover it exactly once; this sharding (e.g. FSDP NO_SHARD / HYBRID_SHARD) is not "
                    "supported: use FULL_SHARD or SHARD_GRAD_OP")

    @property
    def local_numel(self):
        return sum(parts[self.rank][1] for parts in self.parts) if self.sharded else \
            sum(s.numel() for s in self.shapes.values())

    # ------------------------------------------------------------------------ full <-> local
    def take_local(self, k, full):
        """This process's part of parameter k from its full tensor (e.g. memory-mapped), fp32 on the device."""
        full = torch.as_tensor(full)
        if tuple(full.shape) != tuple(self.shapes[self.names[k]]):
            raise ValueError(f"{self.names[k]}: shape {tuple(full.shape)}, expected {tuple(self.shapes[self.names[k]])}")
        if not self.sharded:
            return full.to(self.device, torch.float32, copy=True)
        offset, n = self.parts[k][self.rank]
        return full.reshape(-1)[offset:offset + n].to(self.device, torch.float32, copy=True).view(self.local_shapes[k])

    def gather_full(self, tensors, dst=0):
        """{name: full fp32 CPU tensor} from every process's `tensors` (aligned with local_tensors()), on rank
        `dst` (None: on every rank); None on the others. Collective under sharding."""
        want = dst is None or dst == self.rank
        out = {} if want else None
        for k, (name, t) in enumerate(zip(self.names, tensors)):
            if not self.sharded:
                if want:
                    out[name] = t.detach().to('cpu', torch.float32, copy=True)
                continue
            parts = self.parts[k]
            width = max(n for _, n in parts)
            buf = torch.zeros(width, dtype=torch.float32, device=self.device)
            buf[:parts[self.rank][1]] = t.detach().reshape(-1)
            gathered = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(gathered, buf)
            if want:
                full = torch.empty(self.shapes[name].numel(), dtype=torch.float32)
                for (offset, n), piece in zip(parts, gathered):
                    full[offset:offset + n] = piece[:n].cpu()
                out[name] = full.view(self.shapes[name])
        return out


@torch.no_grad()
def replica_record(layout, step, lr):
    """Check what must agree over the processes and return it as a log record (collective).

    Every process must be at the same step and learning rate, hold identical copies of the replicated tensors (all
    parameters under DDP, the module replicas under ZeRO-2; FSDP has none), and the sharded parts must add up to
    the whole model. `weight_checksum` is the full model's sum (fp64), from the parts.
    """
    replicated = layout.replicated_tensors()
    rep = float(sum(t.double().sum() for t in replicated)) if replicated else None
    part = float(sum(t.double().sum() for t in layout.local_tensors()))
    mine = (int(step), float(lr), rep, part, layout.local_numel)
    rows = all_gather_object(mine)
    problems = []
    for i, what in ((0, 'steps'), (1, 'learning rates'), (2, 'replicated weights')):
        values = [r[i] for r in rows]
        if len(set(values)) != 1:
            problems.append(f"different {what}: {values}")
    total = sum(s.numel() for s in layout.shapes.values())
    numels = [r[4] for r in rows]
    if (sum(numels) if layout.sharded else numels[0]) != total:
        problems.append(f"the processes hold {numels} parameter values, expected {total} in all")
    if problems:
        raise RuntimeError("processes ended with different weights or state: " + '; '.join(problems))
    record = {'weight_checksum': sum(r[3] for r in rows) if layout.sharded else rows[0][3]}
    if rep is not None:
        record['weight_checksums'] = [r[2] for r in rows]
    if layout.sharded:
        record['shard_checksums'] = [r[3] for r in rows]
    return record
