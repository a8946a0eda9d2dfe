"""lm-evaluation-harness adapter: any lm-eval task runs on a Helox checkpoint.

    from services.evaluator.lm_eval_adapter import HeloxLM, run_lm_eval
    lm = HeloxLM.from_checkpoint("ckpts/step-000001000", dataset="datasets/<version>/manifest.json")
    results = run_lm_eval(lm, ["my_task"], include_path="tasks/")

or from lm-eval's own entry points, once this module is imported: `model="helox",
model_args="checkpoint=...,dataset=..."`. Needs `pip install 'lm-eval>=0.4.13,<0.5'` (not a
dependency of the evaluator itself: only this module imports it).

Conventions (the same as the suites'): a context is the start of a document, so EOS, which the
shards put between documents, is prepended; continuations are split from contexts the way
lm-eval's HF model does (`suites.split_continuation`); inputs longer than the model's
max_seq_len are left-truncated; generation is greedy unless do_sample/temperature say otherwise,
with the KV cache (shared.model.generate), cut at the first `until` string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from shared.checkpoint import load_model

from .heldout import dataset_tokenizer
from .suites import cut_at_stop, generate_texts, split_continuation, token_logprobs


@register_model("helox")
class HeloxLM(LM):
    """A Helox `Llama` + its sentencepiece tokenizer as an lm-eval language model."""

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: spm.SentencePieceProcessor | None = None,
        *,
        checkpoint: str | None = None,
        dataset: str | None = None,
        tokenizer_path: str | None = None,
        batch_size: int | str | None = 16,
        max_gen_toks: int | str = 64,
        device: str | None = "cpu",
        **_: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("HeloxLM needs a model or checkpoint=<checkpoint dir>")
            model, _cfg = load_model(checkpoint, device=device or "cpu")
        if tokenizer is None:
            if tokenizer_path is not None:
                tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
            elif dataset is not None:
                tokenizer = dataset_tokenizer(dataset)
            else:
                raise ValueError("HeloxLM needs a tokenizer: pass dataset=<manifest.json> or tokenizer_path=<.model>")
        self.model = model.eval()
        self.sp = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # 'auto' and None: the default
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.max_seq_len
        self.eos_id = int(tokenizer.eos_id())
        self.pad_id = max(int(tokenizer.pad_id()), 0)
        self._device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, dataset: str | Path, **kwargs: Any) -> HeloxLM:
        return cls(checkpoint=str(checkpoint), dataset=str(dataset), **kwargs)

    # lm-eval reads these for some tasks
    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.eos_id

    def tok_encode(self, text: str, **_: Any) -> list[int]:
        return self.sp.encode(text)

    def tok_decode(self, tokens: list[int], **_: Any) -> str:
        return self.sp.decode(list(tokens))

    # --- the three request types ---------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = split_continuation(self.sp, context, continuation)
            pairs.append(([self.eos_id] + ctx, cont))
        out = token_logprobs(self.model, pairs, batch_size=self.batch_size)
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args[:1]
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eos_id, max_seq_len=self.max_length,
                context_len=1)]
            windows = [(ctx, cont) for ctx, cont in windows if cont]
            total = sum(lp for lp, _ in token_logprobs(self.model, windows, batch_size=self.batch_size)) \
                if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {}
            key = json.dumps(kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
            settings[key] = kwargs
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            kw = settings[key]
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kw.get("do_sample", False))
            temperature = float(kw.get("temperature", 0.0)) if do_sample else 0.0
            texts = generate_texts(
                self.model, self.sp, [requests[i].args[0] for i in idx],
                max_new_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)), prefix_id=self.eos_id,
                eos_id=self.eos_id, pad_id=self.pad_id, temperature=temperature, top_k=kw.get("top_k"),
                top_p=kw.get("top_p"), batch_size=self.batch_size, seed=int(kw.get("seed", 0)),
            )
            for i, text in zip(idx, texts, strict=True):
                out[i] = cut_at_stop(text, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def run_lm_eval(
    lm: HeloxLM,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool = False,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval tasks on the adapter; returns lm-eval's results dict ('results', 'samples', ...).

    include_defaults=False skips indexing lm-eval's thousands of bundled tasks (seconds) when
    only local tasks from include_path are wanted."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_defaults or include_path is None)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           bootstrap_iters=0, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                           torch_random_seed=seed, fewshot_random_seed=seed)
