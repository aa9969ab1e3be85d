"""Free-text questions with reasoning steps: Coconut's record format for GSM8k-style data, `{"question", "steps",
"answer"}`, brought by the user (`softar task prepare qa --files train=T.json valid=V.json`). Its text is anything a
model's own tokenizer reads, so a qa run needs model.hf; an answer is right when its words equal the record's."""

from __future__ import annotations

from softar import SoftarError
from softar.data.tokenizer import TaskTokenizer
from softar.tasks.base import Rendered

MAX_CHARS = 100_000  # of a question, a step or an answer


class QA:
    name = "qa"
    renders = ("text",)
    fields = {"question": str, "answer": str, "steps": list}
    own_vocabulary = False  # free text: a model's tokenizer reads it (model.hf)

    def validate(self, record: dict) -> None:
        if not record["question"].strip() or not record["answer"].strip():
            raise SoftarError("question and answer must not be empty")
        if any(len(t) > MAX_CHARS for t in (record["question"], record["answer"], *record["steps"])):
            raise SoftarError(f"a question, step or answer is longer than {MAX_CHARS} characters")

    def render(self, record: dict, rendering: str) -> Rendered:
        return Rendered(record["question"], list(record["steps"]), record["answer"])

    def check(self, record: dict, answer: list[str], rendering: str = "text") -> bool:
        """The answer's words (letters and digits runs, each other character alone) are the record's."""
        return answer == TaskTokenizer.PATTERN.findall(record["answer"])

    def node_tokens(self, record: dict, rendering: str = "text") -> list[str]:
        return []  # no graph: nothing for the superposition probe
