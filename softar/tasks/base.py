"""What every task shares: the one vocabulary of every task and rendering, a rendered record, the task interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from softar.tasks.graphs import NODES

# special tokens of every task sequence: [question] <bot> [thoughts | pauses] <eot> [steps] <ans> [answer] <eos>
SPECIALS = ["<eos>", "<bot>", "<eot>", "<thought>", "<pause>", "<ans>"]
PEOPLE = [
    "Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly", "Rex", "Sally",
    "Sam", "Stella", "Tom", "Wren"
]
CONCEPTS = [
    "bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus", "grimpus",
    "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus", "numpus", "quimpus", "rempus",
    "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus", "terpus", "timpus", "tumpus", "vumpus",
    "worpus", "wumpus", "yerpus", "yimpus", "yumpus", "zhorpus", "zumpus"
]
GLUE = ["Every", "is", "a", ".", "Is", "or", "?", ";"]
MAX_NODES = 64  # node-id tokens n0..n63 for the symbolic renderings
NODE_TOKENS = [f"n{i}" for i in range(MAX_NODES)]
VOCABULARY = SPECIALS + GLUE + PEOPLE + CONCEPTS + NODE_TOKENS  # one vocabulary for every task and rendering
assert NODES[1] <= MAX_NODES


@dataclass(frozen=True)
class Rendered:
    """A record as text: the question, each reasoning step, and the answer (words the task tokenizer splits)."""

    question: str
    steps: list[str]
    answer: str


class Task(Protocol):
    name: str
    renders: tuple[str, ...]  # the renderings it offers ("text", "symbolic")

    def validate(self, record: dict) -> None:
        """A `SoftarError` naming what is wrong with a record whose fields have the right types (`check_record`)
        but which this task cannot pose or score: checked once, at load, so that nothing fails later."""

    def render(self, record: dict, rendering: str) -> Rendered: ...

    def check(self, record: dict, answer: list[str], rendering: str) -> bool:
        """Whether a generated answer (its words, without <ans> and <eos>) is right."""

    def node_tokens(self, record: dict, rendering: str) -> list[str]:
        """The token that names each node 0..n-1 in this rendering (for the superposition probe)."""
