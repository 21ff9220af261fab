"""Under ZeRO, an unselected layer keeps nothing on the device but its bit16 weights.

ZeRO counts as optimizer memory the fp32 master partition plus Adam's two moments (12 of the 16 bytes
per parameter of mixed-precision Adam), and holds a gradient partition per parameter on top. The
optimizer gate (:mod:`ist_ds.optim.gate`) keeps unselected layers from being stepped and the state
store moves their moments; this module does the rest, for DeepSpeed's ZeRO-1/2 and ZeRO-3 optimizers:

**Masters follow the state.** With ``optimizer_state: offload`` or ``drop`` the fp32 master partition
of a layer leaving the selection is *parked* (:mod:`ist_ds.optim.parking`: copied to host memory or
to ``offload_dir``, its storage shrunk to 0 bytes in place, so DeepSpeed's views of it stay valid) and
unparked, bit-identical, when the layer is selected again. ``drop`` frees moments but never a master:
a master rebuilt from bf16 weights would lose the low bits of every update. Masters are left alone
where DeepSpeed's own ``offload_optimizer`` already keeps them on the host, and under ZeRO-3 with fp32
weights, where the master *is* the weight partition that every forward gathers.

**No gradient partition for what does not train.** ZeRO-2 copies the reduced gradients of its
partition into one contiguous buffer that it sizes for every parameter of every group; IST allocates
it for the parameters of the layers that train in the step instead. ZeRO-1/2 then build, at the end
of backward, a gradient partition for every param group, filling zeros for parameters without a
gradient; ZeRO-3 builds new
zero tensors for parameters that do not require grad. For groups (sub-groups) of unselected layers
this module hands DeepSpeed a zero-stride zero tensor instead (4 bytes, whatever the partition size).
ZeRO-3 also allocates one flat gradient buffer at init for every trainable parameter and looks up
each parameter's slice in it: IST replaces it by a buffer sized for the largest possible selection
and, at each selection change, gives the selected parameters consecutive slices of it.

**The step touches only the selected.** ZeRO-3's per-sub-group work (flatten the gradient, unscale
and clip, step, copy the master into the bit16 partition, release) is skipped for unselected
sub-groups. ZeRO-1/2's step loop is one method; for a group whose master is parked, the master tensor
temporarily *aliases the bit16 partition* during the step, so the loop's copy-back writes the weights
onto themselves (bit-identical) and nothing reads the parked storage. The all-gather of bit16
partitions that ends a ZeRO-1/2 step skips the groups of unselected layers, whose partitions did not
change on any rank.

Where the copies happen in a step: parking (device to host) runs when the controller applies the next
selection, right after ``engine.step()``; unparking (host to device, ``non_blocking`` from pinned
memory, on a side CUDA stream) is issued at that same moment for the layers of the next step, so on a
GPU the copy overlaps the next forward and backward, which do not read masters; the optimizer step
waits for it (an event) before it reads them. Every DeepSpeed internal used here is named, and
checked on the live optimizer, in :mod:`ist_ds.compat.deepspeed`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch

from ist_ds.compat import deepspeed as ds
from ist_ds.optim.gate import LAYER_KEY
from ist_ds.optim.parking import CopyStream, Parked, can_park, park, storage_bytes, unpark

logger = logging.getLogger(__name__)

#: ZeRO-3's per-sub-group step work, skipped for sub-groups of unselected layers.
ZERO3_SKIPPED = ds.ZERO3_SUB_GROUP_STEP_METHODS


class ZeroMemory:
    """Parks the masters and elides the gradient partitions of unselected layers in one ZeRO optimizer.

    ``trains(layer)`` tells whether a layer trains in the current step (the optimizer gate's
    selection). Call :meth:`release` / :meth:`restore` as layers leave / enter the selection (the gate
    does) and :meth:`restore_all` before anything reads every master (checkpoints).
    """

    def __init__(self, zero_optimizer, trains: Callable[[int], bool], park_masters: bool,
                 target: str = "host", directory: str | None = None, rank: int = 0,
                 max_trained_layers: int | None = None) -> None:
        self.opt = zero_optimizer
        self.kind = ds.zero_kind(zero_optimizer)
        if self.kind is None:
            raise TypeError(f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO-1/2/3 optimizer")
        ds.check_zero_internals(self.kind, zero_optimizer)
        self._trains = trains
        self.target = target
        self.directory = directory
        self.rank = rank
        groups = zero_optimizer.optimizer.param_groups
        if self.kind == "zero12":
            count = ds.zero12_num_groups(zero_optimizer)
            self.layer_of = [groups[i].get(LAYER_KEY, -1) for i in range(count)]
            self.host_masters = ds.zero12_offloads(zero_optimizer)
        else:
            count = ds.zero3_num_sub_groups(zero_optimizer)
            self.layer_of = [groups[ds.zero3_param_group_of(zero_optimizer, s)].get(LAYER_KEY, -1)
                             for s in range(count)]
            self.host_masters = ds.zero3_offloads(zero_optimizer)
        self.park_masters = park_masters and not self.host_masters
        self._parked: dict[int, Parked] = {}
        self._zeros: dict[tuple, torch.Tensor] = {}
        self._copies = CopyStream(self.master(0).device if count else None)
        self._stepping = False
        self._originals: list[tuple[str, object]] = []
        self._grad_buffer: torch.Tensor | None = None  # ZeRO-3: the flat gradient buffer, shrunk
        if self.park_masters and target == "disk":
            if not directory:
                raise ValueError("parking masters on disk needs a directory")
            os.makedirs(directory, exist_ok=True)
        self._install()
        if self.kind == "zero3" and not self.host_masters and max_trained_layers is not None:
            self._shrink_zero3_grad_buffer(max_trained_layers)

    # ------------------------------------------------------------------ selection
    def trains_index(self, index: int) -> bool:
        layer = self.layer_of[index]
        return layer < 0 or self._trains(layer)

    def _indices(self, layer: int) -> list[int]:
        return [i for i, owner in enumerate(self.layer_of) if owner == layer]

    def master(self, index: int) -> torch.Tensor:
        if self.kind == "zero12":
            return ds.zero12_master(self.opt, index)
        return ds.zero3_master(self.opt, index)

    def _parkable(self, index: int) -> bool:
        m = self.master(index)
        if not can_park(m):
            return False
        if self.kind == "zero3":  # fp32 weights on the device: the master is the weight partition itself
            w = ds.zero3_weight_partition(self.opt, index)
            if w is not None and w.untyped_storage().data_ptr() == m.untyped_storage().data_ptr():
                return False
        return True

    def release(self, layer: int) -> None:
        """Park the masters of a layer that leaves the selection (offload and drop only)."""
        if not self.park_masters:
            return
        self._copies.wait()  # a refill still in flight must land before its storage is freed again
        for i in self._indices(layer):
            if i in self._parked or not self._parkable(i):
                continue
            path = (os.path.join(self.directory, f"rank{self.rank}-master{i}.pt")
                    if self.target == "disk" else None)
            self._parked[i] = park(self.master(i), path)

    def restore(self, layer: int, non_blocking: bool = True) -> None:
        """Bring a layer's masters back (``non_blocking`` from pinned memory, on a side stream on CUDA)."""
        back = [self._parked.pop(i) for i in self._indices(layer) if i in self._parked]
        if back:
            self._copies.run(lambda: [unpark(parked, non_blocking) for parked in back])

    def on_selection(self) -> None:
        """Called by the gate once a new selection is in place."""
        if self._grad_buffer is not None:
            self._map_zero3_grads()

    def restore_all(self) -> None:
        self._copies.wait()
        for i in sorted(self._parked):
            unpark(self._parked.pop(i), non_blocking=False)

    # ------------------------------------------------------------------ accounting
    def master_bytes(self) -> dict[str, int]:
        """fp32 master bytes on this rank: held by the engine, parked on the host, parked on disk."""
        out = {"engine": 0, "host": 0, "disk": 0}
        for i in range(len(self.layer_of)):
            parked = self._parked.get(i)
            if parked is None:
                out["engine"] += storage_bytes(self.master(i)) if self.master(i).numel() else 0
            else:
                out["disk" if parked.path else "host"] += parked.nbytes
        return out

    # ------------------------------------------------------------------ patches
    def _zero(self, numel: int, dtype, device) -> torch.Tensor:
        """A zero tensor of ``numel`` elements backed by one element (read-only use only)."""
        key = (dtype, str(device))
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(1, dtype=dtype, device=device)
        return self._zeros[key].expand(int(numel))

    def _zero3_params(self) -> list[tuple[int, torch.nn.Parameter]]:
        return [(s, p) for s in range(len(self.layer_of)) for p in ds.zero3_params(self.opt, s)]

    def _shrink_zero3_grad_buffer(self, max_trained_layers: int) -> None:
        """Replace ZeRO-3's flat gradient buffer by one that fits the largest possible selection.

        DeepSpeed allocates it at init for every trainable parameter and looks each parameter's slice
        up by ``ds_id`` when it reduces a gradient (copying on the first micro-step, adding after).
        Only selected layers are reduced, so after each selection change the selected parameters get
        consecutive slices of a buffer sized for the ``max_trained_layers`` largest layers (plus the
        parameters outside the blocks), and unselected ones a zero-stride zero.
        """
        per_layer: dict[int, int] = {}
        for s, p in self._zero3_params():
            per_layer[self.layer_of[s]] = per_layer.get(self.layer_of[s], 0) + ds.zero3_partition_numel(p)
        outside = per_layer.pop(-1, 0)
        sizes = sorted(per_layer.values(), reverse=True)
        capacity = outside + sum(sizes[:max_trained_layers])
        if capacity >= outside + sum(sizes):
            return
        old = ds.zero3_grad_buffer(self.opt)
        self._grad_buffer = torch.zeros(capacity, dtype=old.dtype, device=old.device)
        ds.set_zero3_grad_buffer(self.opt, self._grad_buffer)
        self._map_zero3_grads()

    def _map_zero3_grads(self) -> None:
        buffer, mapping, offset = self._grad_buffer, ds.zero3_grad_partition_map(self.opt), 0
        buffer.zero_()  # a slice a rank never writes (all padding) must read as zero, as in DeepSpeed's own
        for s, p in self._zero3_params():
            n = ds.zero3_partition_numel(p)
            if self.trains_index(s):
                mapping[ds.zero3_param_id(p)] = buffer.narrow(0, offset, n)
                offset += n
            else:
                mapping[ds.zero3_param_id(p)] = self._zero(n, buffer.dtype, buffer.device)

    def _install(self) -> None:
        if self.kind == "zero12":
            self._install_zero12()
        else:
            self._install_zero3()

    def _patch(self, name: str, replacement) -> None:
        self._originals.append((name, getattr(self.opt, name)))
        setattr(self.opt, name, replacement)

    def uninstall(self) -> None:
        """Masters back in place and DeepSpeed's own methods restored (the Trainer's ``train()`` ends)."""
        self.restore_all()
        if self._grad_buffer is not None:  # every parameter its own slice again, as DeepSpeed laid it out
            self._grad_buffer = None
            total = sum(ds.zero3_partition_numel(p) for _, p in self._zero3_params())
            full = torch.zeros(total, dtype=ds.zero3_grad_accum_dtype(self.opt), device=self.master(0).device)
            ds.set_zero3_grad_buffer(self.opt, full)
            mapping, offset = ds.zero3_grad_partition_map(self.opt), 0
            for _, p in self._zero3_params():
                mapping[ds.zero3_param_id(p)] = full.narrow(0, offset, ds.zero3_partition_numel(p))
                offset += ds.zero3_partition_numel(p)
        for name, original in reversed(self._originals):
            setattr(self.opt, name, original)
        self._originals.clear()
        if self.kind == "zero12":
            ds.filter_zero12_allgather(self.opt, None)

    def _install_zero12(self) -> None:
        opt = self.opt
        # Only inside IST's step: a load's re-gather (``update_lp_params``) must still move every group.
        ds.filter_zero12_allgather(opt, lambda i: not self._stepping or self.trains_index(i))

        step = opt.step

        @functools.wraps(step)
        def ist_step(*args, **kwargs):
            self._copies.wait()  # the masters prefetched after the previous step
            # A parked master aliases its bit16 partition while the step runs: the loop's
            # ``bit16.copy_(master)`` then copies the weights onto themselves, and the flattened zero
            # gradient it assigns to ``master.grad`` takes the bit16 dtype. Restored right after.
            aliased = []
            for i in list(self._parked):
                master = ds.zero12_master(opt, i)
                aliased.append((master, master.data))
                master.data = ds.zero12_bit16_partition(opt, i)
            self._stepping = True
            try:
                return step(*args, **kwargs)
            finally:
                self._stepping = False
                for master, data in aliased:
                    master.grad = None
                    master.data = data

        self._patch("step", ist_step)
        if ds.zero12_offloads(opt):
            return  # gradients go straight into pinned host buffers; nothing is built per group on device

        get_all_grad_tensors = opt.get_all_grad_tensors

        @functools.wraps(get_all_grad_tensors)
        def ist_get_all_grad_tensors(tensor_list, dtype):
            group = ds.zero12_group_of_params(opt, tensor_list)
            if group is not None and not self.trains_index(group):
                return []  # no zeros_like per parameter of a layer that does not train
            return get_all_grad_tensors(tensor_list, dtype)

        get_flat_partition = opt.get_flat_partition

        @functools.wraps(get_flat_partition)
        def ist_get_flat_partition(tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                                   return_tensor_list=False):
            if not self.trains_index(param_group_idx):
                zero = self._zero(partition_size, dtype, device)
                return [zero] if return_tensor_list else zero
            return get_flat_partition(tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                                      return_tensor_list)

        build_compact = getattr(opt, ds.ZERO12_COMPACT_GRAD_BUILDER)

        @functools.wraps(build_compact)
        def ist_build_compact(group_idx):
            if not self.trains_index(group_idx):
                # A plain list (no ``flat_partition``): the step flattens it into a transient partition.
                return [self._zero(ds.zero12_partition_size(opt, group_idx), ds.zero12_grad_accum_dtype(opt),
                                   ds.zero12_master(opt, group_idx).device)]
            return build_compact(group_idx)

        copy_grads_in_partition = opt.copy_grads_in_partition

        @functools.wraps(copy_grads_in_partition)
        def ist_copy_grads_in_partition(param, group_idx=None):
            # ZeRO-2 copies each reduced gradient of its partition into one buffer it allocates, at the
            # first reduction of a backward, for every parameter of every group. Only the layers that
            # train this step are reduced, so a buffer for their parameters is enough.
            if ds.zero12_contiguous_grads(opt) is None and not ds.zero12_uses_compact_grads(opt, group_idx):
                trained = [i for i in range(len(self.layer_of)) if self.trains_index(i)]
                ds.zero12_allocate_contiguous_grads(opt, trained)
            return copy_grads_in_partition(param, group_idx)

        self._patch("copy_grads_in_partition", ist_copy_grads_in_partition)
        self._patch("get_all_grad_tensors", ist_get_all_grad_tensors)
        self._patch("get_flat_partition", ist_get_flat_partition)
        self._patch(ds.ZERO12_COMPACT_GRAD_BUILDER, ist_build_compact)

    def _install_zero3(self) -> None:
        opt = self.opt
        for name in ZERO3_SKIPPED:
            original = getattr(opt, name)

            def skip_unselected(sub_group_id, *args, _original=original, **kwargs):
                if not self.trains_index(sub_group_id):
                    return None
                self._copies.wait()  # the masters prefetched after the previous step
                return _original(sub_group_id, *args, **kwargs)

            self._patch(name, functools.wraps(original)(skip_unselected))
        if ds.zero3_offloads(opt):
            return  # gradients are copied into the masters' pinned host buffers; no zeros are built

        epilogue = opt.independent_gradient_partition_epilogue

        @functools.wraps(epilogue)
        def ist_epilogue(*args, **kwargs):
            # DeepSpeed builds ``torch.zeros_like(ds_tensor)`` for every parameter that does not require
            # grad. For the duration of the epilogue the parameters of unselected layers "require grad",
            # so it takes their slice of the flat gradient buffer instead (allocated for them at init).
            flipped = [p for s in range(len(self.layer_of)) if not self.trains_index(s)
                       for p in ds.zero3_params(opt, s) if not p.requires_grad]
            for p in flipped:
                p.requires_grad_(True)
            try:
                out = epilogue(*args, **kwargs)
            finally:
                for p in flipped:
                    p.requires_grad_(False)
            grads = ds.averaged_gradients(opt)
            for s in range(len(self.layer_of)):
                if not self.trains_index(s):
                    for g in grads.get(s) or ():
                        if 0 not in g.stride():  # a zero-stride zero is zero already
                            g.zero_()  # the slice may hold the layer's last real gradient
            return out

        self._patch("independent_gradient_partition_epilogue", ist_epilogue)


def install_zero_memory(engine, controller, config, rank: int) -> "ZeroMemory | None":
    """Hand ``controller``'s gate a :class:`ZeroMemory` for ``engine``'s ZeRO optimizer (stage 1-3).

    Stage 0 (plain or bf16 wrapper) gets none: the gate and the state store do everything there. With
    ``optimizer_state: keep`` a DeepSpeed whose internals changed only loses the gradient savings (a
    warning); with ``offload``/``drop`` it is refused, since masters would have to move.
    """
    zero = engine.optimizer
    if ds.zero_kind(zero) is None:
        return None
    gate = controller.gate
    park = config.optimizer_state in ("offload", "drop")
    directory = os.path.join(config.offload_dir, "masters") if config.offload_dir else None
    max_trained = controller.num_layers if config.strategy == "all" else controller.importance.num_train
    try:
        memory = ZeroMemory(zero, gate.trains, park, config.offload_target, directory, rank, max_trained)
    except ds.DeepSpeedInternalsChanged:
        if park:
            raise
        logger.warning("DeepSpeed internals changed; IST keeps ZeRO's gradient partitions of unselected layers",
                       exc_info=True)
        return None
    gate.memories.append(memory)
    logger.info("ZeRO memory: no gradient partitions for unselected layers; fp32 masters %s",
                "parked with their optimizer state" if memory.park_masters else
                "left on the host by DeepSpeed's offload_optimizer" if park else "kept (optimizer_state: keep)")
    return memory


def zero_gradient_bytes(zero_optimizer) -> int:
    """Bytes of gradient partitions a ZeRO optimizer holds now, each storage counted once.

    Read between backward and step: ZeRO-1/2's ``averaged_gradients`` (and stage 2's contiguous
    ``grads_in_partition`` buffer), ZeRO-3's flat gradient buffer plus whatever else its
    ``averaged_gradients`` reference. A zero-stride zero counts its one element.
    """
    seen: dict[int, int] = {}

    def add(t) -> None:
        if torch.is_tensor(t) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for grads in ds.averaged_gradients(zero_optimizer).values():
        for g in grads or ():
            add(g)
    if ds.zero_kind(zero_optimizer) == "zero3":
        add(ds.zero3_grad_buffer(zero_optimizer))
    else:
        add(ds.zero12_contiguous_grads(zero_optimizer))
    return sum(seen.values())
