"""lm-evaluation-harness on a llamatron-loaded model: `--model llamatron --model_args pretrained=DIR`.

lm-eval 0.4.x finds models only in its in-process registry (it has no plugin entry points), so this
module registers the model on import and doubles as the launcher:

    python -m llamatron.eval.lm_eval_adapter --model llamatron \\
        --model_args pretrained=/ckpt/hf-or-mcore,dtype=bf16 --tasks cmmlu,hellaswag --batch_size auto

DIR is anything `llamatron.checkpoint.loader.load_model` reads (HF, Megatron-Core of any TP x PP).
model_args: pretrained, dtype (bf16|fp16|fp32|auto), device, tokenizer (llama3 or a HF dir),
add_bos_token (default: what the model's HF tokenizer does, as lm-eval's HF backend), max_length,
max_gen_toks. Tokenization follows lm-eval's TemplateLM, so loglikelihood requests score exactly the
tokens its HF backend would.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llamatron.eval.mc import default_add_bos
from llamatron.eval.scoring import Row, RowScore, score_rows
from llamatron.model import KVCache

DEFAULT_MAX_GEN_TOKS = 256


def _as_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("llamatron")
class LlamatronLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        tokenizer: str | None = None,
        add_bos_token: Any = None,
        batch_size: Any = None,
        max_length: Any = None,
        max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS,
        **unused: Any,
    ) -> None:
        super().__init__()
        from llamatron.checkpoint.loader import load_model
        from llamatron.cli.options import parse_dtype, pick_device

        self.model, self.tok = load_model(pretrained, device=pick_device(device or "auto"),
                                          dtype=parse_dtype(str(dtype)), tokenizer=tokenizer)
        self.add_bos = _as_bool(add_bos_token)
        if self.add_bos is None:
            self.add_bos = default_add_bos(self.tok)
        self._batch_size = None if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokenization (TemplateLM calls these) ----
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tok.spec

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens and self.add_bos)
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # ---- scoring ----
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[RowScore]:
        """One score per (context, continuation); single-token continuations of one context share a row."""
        rows: list[Row] = []
        where: list[tuple[int, int]] = []  # (row, continuation index) of each pair
        shared: dict[tuple[int, ...], int] = {}
        for context, continuation in pairs:
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            if len(continuation) == 1:
                key = tuple(tokens)
                if key not in shared:
                    shared[key] = len(rows)
                    rows.append(Row(tokens=tokens, continuations=()))
                row = rows[shared[key]]
                rows[shared[key]] = Row(tokens=row.tokens, continuations=(*row.continuations, continuation))
                where.append((shared[key], len(row.continuations)))
            else:
                where.append((len(rows), 0))
                rows.append(Row(tokens=tokens, continuations=(continuation,)))
        scores = score_rows(self.model, rows, batch_size=self._batch_size)
        return [RowScore(loglikelihoods=(scores[r].loglikelihoods[j],), greedy=(scores[r].greedy[j],))
                for r, j in where]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scores = self._score([(list(context), list(continuation)) for _, context, continuation in requests])
        results = []
        for (request, _, _), score in zip(requests, scores, strict=True):
            result = (score.loglikelihoods[0], score.greedy[0])
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of the model's length (lm-eval's scheme)."""
        windows, owners = [], []
        for i, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )):
                windows.append((list(context), list(continuation)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(windows), strict=True):
            totals[owner] += score.loglikelihoods[0]
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ---- generation ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            text = self._generate_one(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    @torch.inference_mode()
    def _generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """Greedy decoding with a KV cache until a stop string, an end token, or max_gen_toks."""
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
            print("llamatron: lm-eval asked for sampling; llamatron's adapter decodes greedily", file=sys.stderr)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        prompt = self.tok_encode(context)[-(self.max_length - max_new):]
        param = next(self.model.parameters())
        cache = KVCache(self.model.config, batch_size=1, max_len=len(prompt) + max_new, device=param.device,
                        dtype=param.dtype)
        stop_ids = {i for i in (self.tok.eos_id, *self.tok.stop_ids) if i is not None}
        tokens = torch.tensor([prompt], device=param.device)  # (1, seq)
        generated: list[int] = []
        text = ""
        for _ in range(max_new):
            token = int(self.model(tokens, kv_cache=cache)[0, -1].argmax())
            if token in stop_ids:
                break
            generated.append(token)
            text = self.tok.decode(generated)
            if any(stop in text for stop in until):
                break
            tokens = torch.tensor([[token]], device=param.device)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text


def main() -> None:
    """lm-eval's own command line, with `--model llamatron` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
