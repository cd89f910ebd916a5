"""The collector tuning every long-running process applies at start-up."""

from __future__ import annotations

import gc

from detector.collector import YOUNG_THRESHOLD, tune_collector


def test_start_up_objects_are_frozen_and_the_young_generation_collected_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0  # the modules imported so far are out of its sight

        class Cycle:
            def __init__(self) -> None:
                self.me = self

        Cycle()  # garbage only a collection finds
        assert gc.collect() > 0  # cycles are still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
