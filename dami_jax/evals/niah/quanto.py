"""The baseline KV cache: transformers' ``QuantizedCache`` (optimum-quanto backend), run in torch.

torch and optimum-quanto are optional (the ``quanto`` extra), so they and the parts of
transformers that need them are imported when a :class:`TransformersQuanto` is created, never at
module import: the dami-jax caches of a NIAH run work without them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from dami_jax.errors import MissingExtraError

QUANTO_CONFIGS = {"quanto-2": 2, "quanto-4": 4}  # config name -> bits
QUANTO_GROUP, QUANTO_RESIDUAL = 64, 128  # as TailorKV's quantized layers


def describe_quanto(nbits: int) -> dict[str, Any]:
    """How a quanto baseline is configured, for the records."""
    return {"type": "transformers.QuantizedCache", **TransformersQuanto.cache_config(nbits), "axis_key": 0, "axis_value": 0}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


class _TokenBar:
    """A progress bar fed through ``model.generate``'s streamer hook (``put`` per step, the first
    call being the prompt; ``end`` at the end)."""

    def __init__(self, bar: tqdm):
        self.bar, self.prompt_seen = bar, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


class TransformersQuanto:
    """An HF checkpoint in torch (float32) decoding with transformers' quantized KV cache
    (``QuantizedCache``, optimum-quanto backend): per-token groups of ``q_group_size`` channels
    (``axis_key = axis_value = 0``, transformers' default; ``axis=-1`` needs batch * heads *
    tokens divisible by the group), a full-precision residual of up to ``residual_length`` new
    tokens, the whole prompt quantized at prefill. Slow on CPU: each call shows a progress bar.

    ``threads`` sets torch's (process-wide) thread count; on a loaded 2-core machine one
    thread avoids OpenMP spin-waits that were seen to slow decoding by up to 50x.
    """

    def __init__(self, model_path: str | Path, threads: int | None = None, progress: bool = True):
        missing = [name for name in ("torch", "optimum.quanto") if not _installed(name)]
        if missing:
            raise MissingExtraError(f"the quanto baselines need {' and '.join(missing)}: pip install 'dami-jax[quanto]'")
        import torch  # optional dependencies: see the module docstring
        from transformers import AutoModelForCausalLM

        if threads is not None:
            torch.set_num_threads(threads)
        self.torch, self.progress = torch, progress
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
        # Never stop early inside transformers: EOS stopping is applied afterwards by the caller.
        self.model.generation_config.eos_token_id = None

    @staticmethod
    def cache_config(nbits: int) -> dict[str, Any]:
        """``cache_config`` for ``model.generate(..., cache_implementation="quantized")``."""
        return {"backend": "quanto", "nbits": nbits, "q_group_size": QUANTO_GROUP, "residual_length": QUANTO_RESIDUAL}

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="token", leave=False, disable=not self.progress)

    def greedy(self, prompt: Sequence[int], nbits: int, steps: int) -> list[int]:
        """``steps`` greedy tokens from ``model.generate`` with the quantized cache (no EOS stop)."""
        torch = self.torch
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                cache_implementation="quantized", cache_config=self.cache_config(nbits),
                pad_token_id=self.model.config.pad_token_id,
                streamer=_TokenBar(self._bar(steps, f"quanto-{nbits} greedy (torch)")),
            )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    def forced_logprobs(self, prompt: Sequence[int], nbits: int | None, continuation: Sequence[int]) -> np.ndarray:
        """float32 [N, V]: the prompt, then ``continuation`` one token per step, through a fresh
        quantized cache (``nbits=None``: transformers' dense ``DynamicCache``); row t predicts
        continuation[t]."""
        from transformers import DynamicCache, QuantizedCache  # need torch, which __init__ checked

        torch = self.torch
        if nbits is None:
            cache = DynamicCache(config=self.model.config)
        else:
            options = {k: v for k, v in self.cache_config(nbits).items() if k != "backend"}
            cache = QuantizedCache(backend="quanto", config=self.model.config, **options)
        rows = []
        feeds = [list(prompt)] + [[int(t)] for t in list(continuation)[:-1]]
        with torch.no_grad(), self._bar(len(feeds), f"quanto-{nbits} scoring (torch)") as bar:
            for feed in feeds:
                ids = torch.tensor([feed], dtype=torch.long)
                out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                rows.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))
                bar.update(1)
        return torch.stack(rows).numpy()
