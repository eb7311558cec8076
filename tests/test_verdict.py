"""Verdict records: event ids that stay unique across frames and restarts."""
from __future__ import annotations

from iadgpt.runtime.verdict import Verdict


def test_event_id_keeps_the_milliseconds_and_the_frame_id():
    """Overlay files and describer updates are keyed by event id: two frames of one instant, or one
    frame id after a restart within the same second, must not collide."""
    a = Verdict(frame_id=1, timestamp=1_800_000_000.123)
    b = Verdict(frame_id=2, timestamp=1_800_000_000.123)
    c = Verdict(frame_id=1, timestamp=1_800_000_000.456)
    assert len({a.event_id, b.event_id, c.event_id}) == 3
    assert a.event_id.endswith("123-1")
