"""Trainer checkpoints with IST: what :class:`~ist_ds.integrations.hf_trainer.ISTTrainerMixin` adds to them.

- Saving (every checkpoint folder, and ``save_model``): every IST layer trainable and offloaded
  optimizer state back in the optimizer while Trainer writes (Trainer saves PEFT models with
  ``exclude_frozen_parameters`` under DeepSpeed, and an optimizer saves only the state it holds), the
  IST state in ``ist_state.pt``, and, once every rank wrote its files, a checksum manifest
  (:mod:`ist_ds.runtime.checkpoint`).
- Resuming: the manifest verified on every rank before Trainer loads anything, the IST state read back
  when training starts; under FSDP2 the optimizer loads without entries for layers IST never trained.
- ``load_best_model_at_end``: every layer handed back before Trainer loads the best weights.

The Trainer methods these run around are private; :class:`~ist_ds.compat.transformers.TrainerHooks`
overrides them and calls the public-named hooks implemented here.
"""

from __future__ import annotations

import contextlib
import logging
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ist_ds.compat import transformers as hf_compat
from ist_ds.model.layers import set_trainable
from ist_ds.runtime.checkpoint import (IST_STATE_FILE, MANIFEST_FILE, atomic_torch_save, safe_load, verify_checkpoint,
                                       write_manifest)
from ist_ds.runtime.collectives import default_collectives

logger = logging.getLogger(__name__)

#: File name of the IST state inside a Trainer checkpoint folder (``checkpoint-<step>/``).
IST_STATE_NAME = IST_STATE_FILE


class ISTCheckpointMixin(hf_compat.TrainerHooks):
    """The checkpoint half of :class:`~ist_ds.integrations.hf_trainer.ISTTrainerMixin` (which sets its attributes)."""

    @contextlib.contextmanager
    def _ist_full_view(self):
        """While Trainer saves: every layer trainable, offloaded optimizer state back in the optimizer.

        Trainer saves PEFT models with ``exclude_frozen_parameters`` under DeepSpeed, and an
        optimizer saves only the state it holds; both would otherwise drop unselected layers.
        """
        if not self._ist_active or self._ist_view_depth:
            yield
            return
        controller = self.ist
        gate = controller.gate
        self._ist_view_depth += 1
        try:
            gate.restore_all()
            set_trainable(controller.layer_map, range(controller.num_layers))
            yield
        finally:
            self._ist_view_depth -= 1
            set_trainable(controller.layer_map, controller.selected)
            gate.select(controller.selected)

    def around_save_checkpoint(self, save, run_dir: str):
        """Trainer writes a checkpoint folder: full view, ``ist_state.pt`` first, the manifest last."""
        with self._ist_full_view():
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if self._ist_active and self.args.should_save:
                self._ist_save(folder)
            out = save()
            if self._ist_active and os.path.isdir(folder):
                # Every rank has written its files; the checksums of all of them, hashed by all ranks.
                write_manifest(folder, self.ist.comm, self.ist_config.verify_engine_files)
            return out

    def _ist_save(self, folder: str) -> None:
        """Write ``ist_state.pt``: the controller's state, plus which layers the optimizer holds no state for."""
        gate = self.ist.gate
        state = self.ist.state_dict()
        state["trainer"] = {"layers_without_optimizer_state": [
            layer for layer in gate.all_layers
            if not any(t in gate.optimizer.state and gate.optimizer.state[t] for t in gate.masters(layer))]}
        os.makedirs(folder, exist_ok=True)
        atomic_torch_save(state, os.path.join(folder, IST_STATE_NAME))  # never half-written

    def around_load_optimizer_and_scheduler(self, load, checkpoint):
        """Trainer loads a checkpoint's optimizer: under FSDP2, layers without saved state stay empty.

        torch.distributed.checkpoint (FSDP2) refuses to load an optimizer state dict that lacks the
        state of a parameter requiring grad; layers IST never trained (or dropped) have none. Such
        parameters are marked frozen while the optimizer loads, so their state is left empty.
        """
        layers = []
        if checkpoint is not None and self.ist_config.enabled and hf_compat.trainer_uses_fsdp(self):
            path = os.path.join(checkpoint, IST_STATE_NAME)
            if os.path.isfile(path):
                saved = safe_load(path)
                layers = list((saved.get("trainer") or {}).get("layers_without_optimizer_state", []))
        params = self._ist_layer_map(self.model).parameters_of(layers) if layers else []
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return load()
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def save_model(self, *args, **kwargs):
        with self._ist_full_view():
            return super().save_model(*args, **kwargs)

    def before_load_best_model(self) -> None:
        # Training is over: hand every layer back before Trainer loads the best weights (and, under
        # DeepSpeed, that checkpoint's optimizer state, which must not be mixed with offloaded state).
        self._ist_finish()

    def _ist_verify(self, checkpoint: str) -> None:
        """Check the checkpoint's manifest on every rank together, before Trainer loads anything."""
        if not any(os.path.isfile(os.path.join(checkpoint, n)) for n in (IST_STATE_NAME, MANIFEST_FILE)):
            return  # a checkpoint written without IST: Trainer's own business
        verify_checkpoint(checkpoint, default_collectives(), self.ist_config.verify_engine_files)

    def _ist_load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, IST_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning("checkpoint %s holds no %s; IST starts afresh at step %d", checkpoint, IST_STATE_NAME,
                           self.state.global_step)
            self.ist.step = self.state.global_step
            return
        state = safe_load(path)
        saved = state.get("config") or {}
        changed = sorted(k for k, v in self.ist_config.to_dict().items() if k in saved and saved[k] != v)
        if changed:
            logger.warning("resuming with IST settings that differ from the checkpoint's: %s",
                           ", ".join(f"{k}: {saved[k]!r} -> {getattr(self.ist_config, k)!r}" for k in changed))
        self.ist.load_state_dict(state)
        logger.info("IST state restored from %s (step %d, selected %s)", path, self.ist.step, self.ist.selected)


__all__ = ["ISTCheckpointMixin", "IST_STATE_NAME"]
