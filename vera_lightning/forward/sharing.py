"""Reuse ``h = x A_sᵀ`` across sibling layers that read the same input (q/k/v, gate/up).

Every adapted layer of a model holds the same :class:`~vera_lightning.core.adapter.VeraAdapter`,
which carries one :class:`SiblingCache`. When a layer's forward receives the very tensor object
the previous adapted layer projected (same object, same in-place version, same ``in_features``
so the same ``A_s`` slice, same dtype and grad mode, same autograd mode, no active dropout), it
reuses that layer's ``h`` instead of computing it again. Autograd then accumulates the siblings'
``grad h`` on the one :class:`~vera_lightning.forward.lowrank.ProjectIn` node, so the shared part of
the input gradient is formed once.

The cache holds one entry: the last ``h``. It is replaced by the next layer with a different
input and dropped on ``deepcopy``/pickling. Disable with ``cache.enabled = False`` (or
:func:`vera_lightning.set_vera_path` with ``share=False``).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

__all__ = ["SiblingCache", "SiblingPlans", "in_backward"]


class SiblingCache:
    """The last ``(x, h)`` an adapted layer produced, for its siblings to reuse.

    Attributes:
        enabled: Whether sharing is allowed at all.
        hits: How many forwards reused an ``h`` (for tests and diagnostics).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.hits = 0
        self.clear()

    def clear(self) -> None:
        """Forget the current entry."""
        self._x_ref: Optional[weakref.ref] = None
        self._key: Optional[tuple] = None
        self._value: Optional[tuple[Any, ...]] = None
        self._users: set[int] = set()
        self.plans = SiblingPlans()  # which layers read the same input, learned (merged path, cost model)

    @staticmethod
    def _key_of(x: torch.Tensor, a_s: torch.Tensor, mode: str) -> tuple:
        return (x._version, a_s.data_ptr(), tuple(a_s.shape), a_s.dtype, mode, torch.is_grad_enabled())

    def lookup(self, x: torch.Tensor, a_s: torch.Tensor, mode: str, user: int) -> Optional[tuple[Any, ...]]:
        """The value stored for this very ``x``/``A_s``/mode, or ``None``.

        ``user`` identifies the asking layer: a layer that already used the entry is running a new
        forward pass on the same input object (e.g. a fixed batch fed to the first layer step after
        step), so it must not reuse the previous pass's graph node.
        """
        if not self.enabled or self._x_ref is None or self._x_ref() is not x or x.is_inference():
            return None
        if user in self._users or self._key != self._key_of(x, a_s, mode):
            return None
        self._users.add(user)
        self.hits += 1
        return self._value

    def peek_mode(self, x: torch.Tensor, a_s: torch.Tensor) -> Optional[str]:
        """The mode of the current entry if it is for this very ``x``/``A_s`` (what a sibling would reuse)."""
        if not self.enabled or self._x_ref is None or self._x_ref() is not x or x.is_inference():
            return None
        mode = self._key[4]
        return mode if self._key == self._key_of(x, a_s, mode) else None

    def store(self, x: torch.Tensor, a_s: torch.Tensor, mode: str, value: tuple[Any, ...], user: int) -> None:
        """Remember ``value`` (e.g. ``(h, group)``) for later layers reading ``x``."""
        if not self.enabled or x.is_inference():  # inference tensors have no version counter to check
            return
        self._x_ref, self._key, self._value = weakref.ref(x), self._key_of(x, a_s, mode), value
        self._users = {user}

    # An entry holds a non-leaf tensor: never copy or pickle it with the model.
    def __deepcopy__(self, memo: dict) -> "SiblingCache":
        return SiblingCache(self.enabled)

    def __getstate__(self) -> dict:
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("enabled", True))


def in_backward() -> bool:
    """Whether autograd is executing a backward pass (where activation checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


class SiblingPlans:
    """Which layers read the same input as a *leader* (the first adapted layer to read it), learned.

    The leader of a forward cannot see its siblings coming, so paths that treat a group as one
    (the merged form computes all siblings' outputs in one node; the cost model prices a group)
    use the group observed the last time this leader led. Observations come only from forwards
    outside backward; a recomputation inside backward (activation checkpointing) replays the plan
    the last such forward used, so it builds exactly the same autograd nodes.
    """

    def __init__(self) -> None:
        self._plan: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # leader -> tuple of weakrefs
        self._used: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # leader -> plan of its last forward
        self._open: Optional[tuple[weakref.ref, weakref.ref, list]] = None  # (leader, x, joined members)

    @staticmethod
    def _alive(refs: tuple) -> list:
        return [m for m in (r() for r in refs) if m is not None]

    def lead(self, leader: Any, x: torch.Tensor) -> list:
        """``leader`` starts a group on ``x``; returns the siblings it should expect."""
        if in_backward():
            return self._alive(self._used.get(leader, ()))
        self._close()
        plan = self._plan.get(leader, ())
        self._used[leader] = plan
        self._open = (weakref.ref(leader), weakref.ref(x), [])
        return self._alive(plan)

    def learned(self, leader: Any) -> bool:
        """Whether ``leader`` has led a forward before (its plan, possibly empty, is known)."""
        return leader in self._plan or (self._open is not None and self._open[0]() is leader)

    def current(self, leader: Any) -> list:
        """The siblings ``leader``'s latest :meth:`lead` said to expect."""
        return self._alive(self._used.get(leader, ()))

    def join(self, member: Any, x: torch.Tensor) -> None:
        """``member`` reused the open group's input ``x`` (recorded for the leader's next forward)."""
        if self._open is not None and self._open[1]() is x and not in_backward():
            self._open[2].append(weakref.ref(member))

    def _close(self) -> None:
        if self._open is not None:
            leader = self._open[0]()
            if leader is not None:
                self._plan[leader] = tuple(self._open[2])
            self._open = None
