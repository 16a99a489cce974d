"""The multiple-choice protocol of lm-evaluation-harness's `cmmlu` and `ceval-valid` tasks, reproduced
so that the same model and files give the same per-question choices.

lm-eval (0.4.x) builds, for a question q with k shots s_1..s_k (the first k of the dev split):

    context      = description + sum(text(s_i) + " " + letter(s_i) + "\\n\\n") + text(q)
    text(x)      = x.question.strip() + "\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案："
    continuation = " A" | " B" | " C" | " D"          (target_delimiter " " + the choice)

and scores each continuation by its summed log-likelihood after the context. Its HF backend tokenizes
as `_encode_pair` does: trailing whitespace of the context moves to the continuation, the pair is
encoded whole and the context alone, and the continuation's tokens are whatever follows the context's
token count in the whole encoding. Special tokens are added as the HF tokenizer does by default
(Llama 3: BOS; SmolLM2: none). acc = argmax of the log-likelihoods == answer; acc_norm divides each
by the choice's character length (len("A") == 1, so it equals acc here, but it is computed the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llamatron.eval.data import LETTERS, Question
from llamatron.tokenizer import Tokenizer

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def doc_to_text(question: Question) -> str:
    a, b, c, d = question.choices
    return f"{question.question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案："


def build_context(*, description: str, shots: Sequence[Question], question: Question) -> str:
    examples = "".join(
        doc_to_text(shot) + TARGET_DELIMITER + LETTERS[shot.answer] + FEWSHOT_DELIMITER for shot in shots
    )
    return description + examples + doc_to_text(question)


def continuations() -> tuple[str, ...]:
    return tuple(TARGET_DELIMITER + letter for letter in LETTERS)


def default_add_bos(tok: Tokenizer) -> bool:
    """Whether transformers' tokenizer for this model adds BOS by default (what lm-eval's HF backend
    does unless told otherwise): read from the tokenizer.json post-processor of a HF directory; Meta's
    Llama 3 tokenizer ("llama3") adds it."""
    tokenizer_json = Path(tok.spec) / "tokenizer.json"
    if not tokenizer_json.is_file():
        return tok.bos_id is not None
    from tokenizers import Tokenizer as RustTokenizer

    probe = RustTokenizer.from_file(str(tokenizer_json))
    plain = probe.encode("a", add_special_tokens=False).ids
    with_specials = probe.encode("a", add_special_tokens=True).ids
    return len(with_specials) > len(plain) and with_specials[0] == tok.bos_id


def encode_pair(tok: Tokenizer, context: str, continuation: str, *, add_bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's TemplateLM._encode_pair for a causal model."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = tok.encode(context + continuation, bos=add_bos)
    context_ids = tok.encode(context, bos=add_bos)
    return context_ids, whole[len(context_ids):]


@dataclass(frozen=True, kw_only=True)
class EncodedQuestion:
    context: list[int]
    choices: tuple[list[int], ...]
    """Each choice's continuation ids (one token each for CMMLU/C-Eval with Llama-family tokenizers)."""


def encode_question(tok: Tokenizer, context: str, *, add_bos: bool) -> EncodedQuestion:
    pairs = [encode_pair(tok, context, cont, add_bos=add_bos) for cont in continuations()]
    # Each pair's context encoding is the same string's, so they agree; keep the first.
    return EncodedQuestion(context=pairs[0][0], choices=tuple(cont for _, cont in pairs))


@dataclass(frozen=True, kw_only=True)
class QuestionResult:
    task: str
    subject: str
    index: int
    """Position of the question in its subject's eval split."""
    loglikelihoods: tuple[float, ...]
    answer: int

    @property
    def pred(self) -> int:
        # np.argmax semantics: the first maximum wins a tie.
        return max(range(len(self.loglikelihoods)), key=lambda i: (self.loglikelihoods[i], -i))

    @property
    def pred_norm(self) -> int:
        lengths = [float(len(letter)) for letter in LETTERS]
        normed = [ll / n for ll, n in zip(self.loglikelihoods, lengths, strict=True)]
        return max(range(len(normed)), key=lambda i: (normed[i], -i))

    @property
    def acc(self) -> float:
        return float(self.pred == self.answer)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.answer)
