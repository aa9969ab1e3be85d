"""Embedding arithmetic in the seed's own terms: king - man + woman ~ queen (`softar eval RUN --analogies FILE`).

FILE is the standard analogy format (word2vec's questions-words.txt, bundled as softar/data/questions-words.txt):
`: section` lines, then `a b c d` lines meaning a : b :: c : d. Each question is answered by 3CosAdd, the vocabulary
token nearest (cosine) to b - a + c over unit-normalised embeddings, a, b and c excluded. A question with a word
the vocabulary lacks as one token is counted and skipped. The null beside it, `only_c`, answers with the nearest
token to c alone (a and b excluded as well): what the arithmetic adds over plain similarity.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from softar import SoftarError
from softar.disk import read_text

Question = tuple[str, str, str, str]


def read_analogies(path: str | Path) -> dict[str, list[Question]]:
    """{section: [(a, b, c, d)]} in file order; a malformed line is a one-line error naming it."""
    sections: dict[str, list[Question]] = {}
    current = None
    for n, line in enumerate(read_text(Path(path), "analogy file").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            current = line[1:].strip() or f"section at line {n}"
            sections.setdefault(current, [])
            continue
        words = line.split()
        if len(words) != 4:
            raise SoftarError(f"{path}:{n}: an analogy line holds 4 words (a b c d), got {len(words)}")
        if current is None:
            raise SoftarError(f"{path}:{n}: a question before the first ': section' line")
        sections[current].append(tuple(words))
    if not any(sections.values()):
        raise SoftarError(f"{path}: no analogy questions")
    return sections


def word_id(tokenizer, word: str) -> int | None:
    """The token id of `word` if the tokenizer holds it as exactly one token (a BPE word with or without its
    leading space), else None."""
    for text in (" " + word, word):
        try:
            ids = tokenizer.encode(text)
        except SoftarError:  # a character outside a char tokenizer's vocabulary
            continue
        if len(ids) == 1 and not (getattr(tokenizer, "kind", "") == "word" and ids[0] == 0):  # word: 0 is <unk>
            return ids[0]
    return None


ANSWER_BATCH = 4096  # questions per [Q, V] score matrix


@torch.no_grad()
def answer(E: torch.Tensor, questions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """questions [Q, 4] token ids (a, b, c, d) -> (3CosAdd's answers [Q], only-c's answers [Q])."""
    if questions.shape[0] > ANSWER_BATCH:
        parts = [answer(E, q) for q in questions.split(ANSWER_BATCH)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    En = F.normalize(E.float(), dim=-1)  # [V, m]
    a, b, c = (En[questions[:, i]] for i in range(3))
    excluded = torch.zeros(questions.shape[0], E.shape[0], dtype=torch.bool, device=E.device)
    excluded.scatter_(1, questions[:, :3], True)
    cos_add = ((b - a + c) @ En.T).masked_fill(excluded, float("-inf")).argmax(-1)
    only_c = (c @ En.T).masked_fill(excluded, float("-inf")).argmax(-1)
    return cos_add, only_c


def analogy_accuracy(E: torch.Tensor, tokenizer, sections: dict[str, list[Question]]) -> dict:
    """3CosAdd accuracy per section and overall (over the questions whose four words are in the vocabulary), the
    only-c null, and how many questions were skipped."""
    result, correct, only, answered, skipped = {"sections": {}}, 0, 0, 0, 0
    cache: dict[str, int | None] = {}
    for name, questions in sections.items():
        ids = []
        for q in questions:
            for w in q:
                if w not in cache:
                    cache[w] = word_id(tokenizer, w)
            got = [cache[w] for w in q]
            if None not in got and len(set(got)) == 4:  # a word repeated inside a question: no proper question
                ids.append(got)
        n_skip = len(questions) - len(ids)
        cell = {"questions": len(questions), "answered": len(ids), "skipped": n_skip}
        if ids:
            q = torch.tensor(ids, device=E.device)
            cos_add, only_c = answer(E, q)
            hits, base = int((cos_add == q[:, 3]).sum()), int((only_c == q[:, 3]).sum())
            cell.update(accuracy=hits / len(ids), only_c=base / len(ids))
            correct, only = correct + hits, only + base
        result["sections"][name] = cell
        answered, skipped = answered + len(ids), skipped + n_skip
    result.update(answered=answered, skipped=skipped,
                  accuracy=correct / answered if answered else float("nan"),
                  only_c=only / answered if answered else float("nan"))
    return result
