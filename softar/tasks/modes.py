"""Reasoning modes: what a task sequence holds between the question and the answer. A registry: adding a mode is one
entry here, and `task.mode`'s validation, the sequences (`softar.tasks.data.Encoder`), the evaluation and the CLI
read it.

A sequence is [question] <bot> [slots] <eot> [steps] <ans> [answer] <eos>, trained on what follows <eot>. A mode says
which token fills the slots and how many there are at a curriculum stage, whether the sequence writes the reasoning
steps, and whether it follows Coconut's curriculum (at stage k, the slots replace the first k steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    doc: str
    slot: str | None  # the token of the slots between <bot> and <eot>, or None (no slots)
    count: Callable[[object, int], int]  # (task config, stage) -> how many slots
    writes_steps: bool  # the sequence holds the reasoning steps (those the curriculum has not replaced)
    curriculum: bool  # Coconut's stages: stage k replaces the first k steps by its slots
    label: Callable[[object], str]  # (the whole config) -> how reports name a config of this mode
    reversed_steps: bool = False  # the steps are written last first (a control: the same tokens, another order)

    def slots(self, cfg, stage: int) -> int:
        return self.count(cfg, stage) if self.slot else 0

    def replaced(self, stage: int) -> int:
        """Reasoning steps the slots replace at a stage."""
        return stage if self.curriculum else 0


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("no_cot", "the answer right after the question", None, lambda t, k: 0, False, False, lambda c: "no CoT"),
    Mode("cot", "every reasoning step, then the answer (chain of thought)", None, lambda t, k: 0, True, False,
         lambda c: "CoT"),
    Mode("cot_reversed", "every reasoning step in reverse order, then the answer (a control for chain of thought: "
         "the same tokens, in an order that leaves each step nothing to look up)", None, lambda t, k: 0, True, False,
         lambda c: "CoT reversed", reversed_steps=True),
    Mode("pause", "task.pauses learned <pause> slots, then the answer (no steps)", "<pause>",
         lambda t, k: t.pauses, False, False, lambda c: f"pause ({c.task.pauses})"),
    Mode("pause_curriculum", "Coconut's curriculum with <pause> tokens in place of the thoughts (Coconut's 'pause as "
         "thought' control: the curriculum and the slots, without anything fed back)", "<pause>",
         lambda t, k: t.thoughts_per_step * k, True, True, lambda c: "pause curriculum"),
    Mode("thoughts", "Coconut's curriculum: at stage k, k * task.thoughts_per_step continuous thoughts (each the soft "
         "token soft.kind of the slot before) replace the first k steps", "<thought>",
         lambda t, k: t.thoughts_per_step * k, True, True,
         lambda c: f"thoughts ({c.soft.kind}{', ' + c.soft.noise if c.soft.noise != 'none' else ''})"),
)}
