"""An appliance whose group links close between the answer's metadata and its send (a test hook).

Usage: as ``ServerProcess(..., launcher=(python, this file))``. ``GroupLink.send`` first
closes the link, exactly as a peer drop or a concurrent ``POST /data_plane {"tier": "wire"}``
would in that window; everything else is the real appliance (``eagle3_appliance.cli``).
"""

from __future__ import annotations

from typing import Any

from eagle3_appliance.cli import main
from eagle3_appliance.dataplanes import group_link

_send = group_link.GroupLink.send


def send(self: group_link.GroupLink, seq: int, tensors: Any) -> Any:
    self.close("failed")
    return _send(self, seq, tensors)


group_link.GroupLink.send = send  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
