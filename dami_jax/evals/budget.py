"""A sweep at a smaller token budget, started from one at a larger budget (greedy decoding only).

A greedy answer that stopped on its own before ``budget`` tokens is the answer that budget
would have produced too: decoding never looks at the budget until it is reached. So a tight-budget
sweep need only answer again the (lambda, problem) pairs whose answer ran to ``budget`` tokens or
more; the rest are copied. On a pair whose cheap end answers in ~20 tokens, that skips most of
the grid. The copied answers are a claim about the decoder, so the sweep's other consumers check
it: route-eval serves its routers' lambdas afresh and the served answers can be compared with
the copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from dami_jax.errors import InputError
from dami_jax.evals.records import JsonlLog, ResultsFolder
from dami_jax.evals.sweep import RECORDS_FILE


def within_budget(records: Iterable[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The records whose answer ended by itself in fewer than ``budget`` tokens."""
    return [r for r in records if not r["truncated"] and r["output_tokens"] < budget]


def seed_budget_sweep(source: str | Path, target: str | Path, budget: int) -> int:
    """Start the sweep folder ``target`` at ``budget`` tokens from the greedy sweep folder
    ``source`` (made at a larger budget): its settings with the new budget, and the records that
    :func:`within_budget` keeps. ``dami-jax sweep --max-new-tokens budget --out target`` with
    the source's other settings then answers only the rest. Returns how many records were copied."""
    settings = ResultsFolder(source).stored_settings()
    if settings is None or not (Path(source) / RECORDS_FILE).is_file():
        raise InputError(f"{source} is not a sweep folder (no settings.json and {RECORDS_FILE})")
    if settings["sampling"]["temperature"] != 0.0:
        raise InputError(f"{source} was sampled (temperature {settings['sampling']['temperature']}): only greedy answers carry over to another budget")
    if not 0 < budget < settings["max_new_tokens"]:
        raise InputError(f"budget {budget} must lie between 0 and the source's {settings['max_new_tokens']} tokens")
    folder = ResultsFolder(target)
    if folder.stored_settings() is not None or (folder.path / RECORDS_FILE).exists():
        raise InputError(f"{target} already holds a sweep; seed a new folder")
    kept = within_budget(JsonlLog(Path(source) / RECORDS_FILE).records, budget)
    folder.claim({**settings, "max_new_tokens": budget})
    folder.log(RECORDS_FILE).extend(kept)
    return len(kept)
