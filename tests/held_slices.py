"""An appliance whose LM-head slices can be held or failed by the test (a test hook).

Usage: as ``ServerProcess(..., launcher=(python, this file), env=...)``; everything else is the
real appliance (``eagle3_appliance.cli``). For a forward of ``EAGLE3_TEST_HOLD_SEQ_LEN``
positions, slice 1 waits until the file ``EAGLE3_TEST_RELEASE`` exists (and fails the request
after 60 s, so that a server that does not stream fails the test instead of passing late).
The first forward of ``EAGLE3_TEST_FAIL_SEQ_LEN`` positions raises at slice 2, once, and
creates the file ``EAGLE3_TEST_FAILED`` to say so; every forward of
``EAGLE3_TEST_ALWAYS_FAIL_SEQ_LEN`` positions raises there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from eagle3_appliance.cli import main
from eagle3_appliance.model import head_slices

_slices = head_slices.LogitSlices.slices
_failed = False


def slices(self: head_slices.LogitSlices) -> Iterator[tuple[int, int, torch.Tensor]]:
    global _failed
    seq_len = self.shape[1]
    hold = seq_len == int(os.environ.get("EAGLE3_TEST_HOLD_SEQ_LEN", "-1"))
    fail = seq_len == int(os.environ.get("EAGLE3_TEST_FAIL_SEQ_LEN", "-1")) and not _failed
    always = seq_len == int(os.environ.get("EAGLE3_TEST_ALWAYS_FAIL_SEQ_LEN", "-1"))
    for index, item in enumerate(_slices(self)):
        if hold and index == 1:
            release = Path(os.environ["EAGLE3_TEST_RELEASE"])
            deadline = time.monotonic() + 60
            while not release.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("held slice never released")
                time.sleep(0.01)
        if fail and index == 2:
            _failed = True
            Path(os.environ["EAGLE3_TEST_FAILED"]).touch()
            raise RuntimeError("injected failure in a later slice")
        if always and index == 2:
            raise RuntimeError("injected failure in every such forward")
        yield item


head_slices.LogitSlices.slices = slices  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
