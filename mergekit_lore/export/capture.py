"""Capture of a lore merge for the export: an observer (``observers.capture_solves``) that
streams theta_0 into the base checkpoint and keeps every task vector compact."""

from __future__ import annotations

import math
import re
import threading
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_lore.export.factors import Factors, split_factors
from mergekit_lore.lore import TensorSolve
from mergekit_lore.svt import LowRank

_SLICE = re.compile(r"^(?P<name>.*)\[(?P<index>[0-9]+(?:,[0-9]+)*)\]$")


def parse_label(label: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
    """``"w[1,2]"`` -> ``("w", (1, 2))``; a label without a slice index -> ``(label, None)``."""
    match = _SLICE.match(label)
    if match is None:
        return label, None
    return match.group("name"), tuple(int(i) for i in match.group("index").split(","))


class SolveCapture:
    """Observer: theta_0 streams into ``writer`` (mergekit's ``TensorWriter``), task vectors are kept.

    Per source model: ``matrices[model][name] = (B, A)``, ``vectors[model][name]`` (dense
    delta of a 0-D/1-D weight), ``slices[model][name][index] = (B, A)`` for the slices of
    a 3-D stack; ``missing[model]`` lists tensors the model took no part in.
    """

    def __init__(self, writer, dtype: torch.dtype, models: Sequence[str]):
        self.writer = writer
        self.dtype = dtype
        self.models = list(models)
        self.lock = threading.Lock()
        self.written: set = set()
        self.theta0_slices: Dict[str, Dict[Tuple[int, ...], torch.Tensor]] = defaultdict(dict)
        self.theta0_vectors: Dict[str, torch.Tensor] = {}
        self.matrices: Dict[str, Dict[str, Factors]] = defaultdict(dict)
        self.vectors: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
        self.slices: Dict[str, Dict[str, Dict[Tuple[int, ...], Factors]]] = (
            defaultdict(lambda: defaultdict(dict))
        )
        self.missing: Dict[str, List[str]] = defaultdict(list)
        self.slice_shapes: Dict[str, Tuple[int, ...]] = {}
        self._open_stack: Dict[int, str] = {}  # thread -> stack whose slices it is delivering

    def _model_names(self, names: List[str]) -> List[str]:
        if all(name in self.models for name in names):
            return names
        if len(names) == len(self.models):  # ids unknown: mergekit keeps input order
            return list(self.models)
        raise RuntimeError(
            f"lore export: cannot tell which source models {names} are (expected {self.models})"
        )

    def _compact(self, solve: TensorSolve) -> List[Any]:
        """``(B, A)`` per matrix task vector, a float32 copy per dense one."""
        factors: List[Any] = []
        for delta in solve.deltas:
            if isinstance(delta, LowRank):
                factors.append(split_factors(delta, dtype=self.dtype))
            else:
                factors.append(delta.detach().to("cpu", torch.float32).clone())
        return factors

    def __call__(self, solve: TensorSolve, names: List[str]) -> None:
        names = self._model_names(names)
        name, index = parse_label(solve.label)
        theta0 = solve.theta0.detach().to("cpu", self.dtype).clone()
        factors = self._compact(solve)
        with self.lock:
            # lore_merge solves all slices of a stack in one call, in one thread: when that
            # thread moves on, the stack is complete and goes to the writer.
            thread = threading.get_ident()
            previous = self._open_stack.pop(thread, None)
            if previous is not None and previous != name:
                self._finish_stack(previous)
            if index is not None:
                self._open_stack[thread] = name
                self.theta0_slices[name][index] = theta0
            else:
                if theta0.ndim <= 1:  # kept in float32: adapters store theta_0 + delta_i for these
                    self.theta0_vectors[name] = solve.theta0.detach().to("cpu", torch.float32).clone()
                self.writer.save_tensor(name, theta0)
                self.written.add(name)
            self._keep(name, index, names, factors, solve.label)

    def _keep(self, name: str, index, names: List[str], factors: List[Any], label: str) -> None:
        for model, value in zip(names, factors):
            if index is not None:
                self.slices[model][name][index] = value
            elif isinstance(value, tuple):
                self.matrices[model][name] = value
            else:
                self.vectors[model][name] = value
        for model in self.models:
            if model not in names:
                self.missing[model].append(label)

    def _finish_stack(self, name: str) -> None:
        pieces = self.theta0_slices.get(name)
        if not pieces:
            return
        lead = tuple(max(index[d] for index in pieces) + 1 for d in range(len(next(iter(pieces)))))
        if len(pieces) != math.prod(lead):
            return  # incomplete: filled in from the merged output at the end
        sample = next(iter(pieces.values()))
        full = torch.empty(lead + tuple(sample.shape), dtype=sample.dtype)
        for index, value in pieces.items():
            full[index] = value
        del self.theta0_slices[name]
        self.writer.save_tensor(name, full)
        self.written.add(name)
        self.slice_shapes[name] = tuple(full.shape)

    def finish(self) -> None:
        """Write the stacks still open (call after the merge)."""
        with self.lock:
            self._open_stack.clear()
            for name in list(self.theta0_slices):
                self._finish_stack(name)
