"""Development and test workload seeds: disjoint ranges, enforced.

Everything that shapes a method (training, evaluation callbacks during training, best-static search,
any tuning) uses *development* seeds, below :data:`TEST_SEED_BASE`. Every reported figure uses *test*
seeds, from :data:`TEST_SEED_BASE` on. Using a test seed where a development seed belongs raises
:class:`SeedLeak`, so a result cannot be tuned on the seeds it reports.
"""

from __future__ import annotations

TEST_SEED_BASE = 1_000_000  # test seeds: TEST_SEED_BASE + k; development seeds: 0 .. TEST_SEED_BASE - 1
DEV_EVAL_BASE = 500_000  # development seeds reserved for evaluation during training and for tuning searches


class SeedLeak(ValueError):
    """A test seed used for training or tuning."""


def dev_seed(seed: int, what: str) -> int:
    """``seed`` if it is a development seed; SeedLeak naming ``what`` otherwise."""
    seed = int(seed)
    if seed >= TEST_SEED_BASE or seed < 0:
        raise SeedLeak(f"{what}: seed {seed} is not a development seed (0..{TEST_SEED_BASE - 1}); seeds from "
                       f"{TEST_SEED_BASE} on are test seeds, reserved for reported figures")
    return seed


def test_seeds(n: int, start: int = 0) -> list[int]:
    """``n`` test workload seeds."""
    return [TEST_SEED_BASE + start + k for k in range(n)]


def dev_eval_seeds(n: int, start: int = 0) -> list[int]:
    """``n`` development workload seeds for searches and evaluation callbacks (disjoint from training's
    per-episode draws only by convention: they are still development data)."""
    return [DEV_EVAL_BASE + start + k for k in range(n)]


def is_test_seed(seed: int) -> bool:
    return int(seed) >= TEST_SEED_BASE
