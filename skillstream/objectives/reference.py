"""The reference policy of DPO and of PPO's KL leash -- never a second copy of the backbone.

* ``base``: the same model with its LoRA adapter disabled (``model.disable_adapter()``);
* ``adapter``: a frozen copy of the trainable (adapter) weights taken when the stage begins, i.e.
  the policy the stage starts from -- the SFT policy when DPO or PPO follows an SFT stage or an
  ``init_from`` run (TRL's reference). Its weights are swapped in for the reference pass (no extra
  modules, no copy of the backbone) and ride in checkpoints as the objective's frozen parameters,
  so a resumed run keeps the same reference;
* ``auto`` (default): ``adapter`` when the adapter has already been trained (any non-zero
  ``lora_B``), else ``base`` (a fresh LoRA adapter is a no-op: both give the same reference).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import UserError

REFERENCES = ("auto", "base", "adapter")


class Reference:
    def __init__(self, mode: str, where: str):
        if mode not in REFERENCES:
            raise UserError(f"{where}: reference {mode!r} unknown (expected one of {', '.join(REFERENCES)})")
        self.mode, self.where = mode, where
        self.resolved: str | None = None  # base | adapter, fixed when the stage begins
        self._policy: dict[str, torch.nn.Parameter] = {}
        self._frozen: dict[str, torch.nn.Parameter] = {}

    def begin(self, inner: torch.nn.Module) -> None:
        """Fix the reference from the policy as it stands when the stage begins."""
        self._policy = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        mode = self.resolved or self.mode
        if mode == "auto":
            trained = any(bool(p.detach().abs().sum() > 0) for n, p in self._policy.items() if "lora_B" in n)
            mode = "adapter" if trained or not hasattr(inner, "disable_adapter") else "base"
        if mode == "base" and not hasattr(inner, "disable_adapter"):
            raise UserError(f"{self.where}: reference 'base' needs a LoRA (PEFT) model")
        self.resolved = mode
        self._frozen = {n: torch.nn.Parameter(p.detach().clone(), requires_grad=False) for n, p in self._policy.items()} \
            if mode == "adapter" else {}

    def _swap(self) -> None:
        for n, p in self._policy.items():
            frozen = self._frozen[n]
            p.data, frozen.data = frozen.data, p.data
        # Autocast caches its bf16 casts of trainable leaf tensors by tensor identity until the
        # outermost autocast region ends, and swapping `.data` keeps the identity: without this the
        # reference pass would reuse the policy's cached casts and compute as the policy (PPO's KL
        # read exactly 0 under bf16; tests/test_reference.py pins it).
        torch.clear_autocast_cache()

    @contextmanager
    def active(self, inner: torch.nn.Module) -> Iterator[None]:
        """Inside, `inner` computes as the reference policy."""
        if self.resolved is None:
            self.begin(inner)
        if self.resolved == "base":
            with inner.disable_adapter():
                yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The frozen copy, for checkpoints (`ref.NAME`)."""
        return {f"ref.{k}": v for k, v in self._frozen.items()}

    def state_dict(self) -> dict:
        return {"reference": self.resolved}

    def load_state_dict(self, state: dict) -> None:
        self.resolved = state.get("reference") or self.resolved
