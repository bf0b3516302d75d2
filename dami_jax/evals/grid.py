"""The resumable grid runner shared by lambda sweeps and needle-in-a-haystack runs.

A grid is cells (a lambda; a context length and depth) times items (problems; cache configs). A
record belongs to the (cell, item) pair ``key(record)`` names; pairs already in the log are
skipped, so an interrupted run resumes where it stopped and a grown grid only runs what is new.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Sequence

from tqdm.auto import tqdm

from dami_jax.evals.records import JsonlLog

Record = dict[str, Any]


def run_grid(
    log: JsonlLog,
    cells: Sequence[Hashable],
    items: Sequence[Hashable],
    key: Callable[[Record], tuple[Hashable, Hashable]],
    work: Callable[[Any, list[Any]], Iterable[list[Record]]],
    *,
    desc: str,
    unit: str,
    describe: Callable[[Any], str] = str,
    progress: bool = True,
    mine: Callable[[Hashable, Hashable], bool] = lambda cell, item: True,
) -> list[Record]:
    """Run ``work(cell, pending items)`` for each cell with unfinished items; it yields batches of
    records as it goes, each appended to ``log`` at once (and counted on a progress bar). Returns
    the records of this grid, old and new, in log order. ``mine``: which (cell, item) pairs are
    this run's to do (a process's share of a split grid)."""
    done = log.done(key)
    todo = [(cell, [item for item in items if mine(cell, item) and (cell, item) not in done]) for cell in cells]
    total = sum(mine(cell, item) for cell in cells for item in items)
    with tqdm(total=total, initial=total - sum(len(p) for _, p in todo), desc=desc, unit=unit, disable=not progress) as bar:
        for cell, pending in todo:
            if not pending:
                continue
            bar.set_postfix_str(describe(cell))
            for records in work(cell, pending):
                log.extend(records)
                bar.update(len(records))
    wanted = {(cell, item) for cell in cells for item in items}
    return [r for r in log.records if key(r) in wanted]
