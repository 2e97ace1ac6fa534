"""How a resumed run treats config fields that differ from its checkpoint's (`ResumePolicy`).

Kept apart from the checkpoint files (and free of torch) so that the trainers' config modules,
which the command line reads for its defaults, load in milliseconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from training.loop.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePolicy:
    """What a resumed run does with each config field that differs from the checkpoint's.

    ``refuse``: the run stops (TrainingError). ``adopt``: the checkpoint's value wins, with a
    warning (nanoGPT's "resume forces the config"). ``inherit``: unset (None) takes the
    checkpoint's value silently, a set one that differs warns. ``allow``: may change freely.
    Every other field: this run's value wins, with a warning.
    """

    refuse: tuple[str, ...] = ()
    adopt: tuple[str, ...] = ()
    inherit: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()

    def reconcile(self, saved: dict[str, Any], current: dict[str, Any], warn: bool = True) -> dict[str, Any]:
        """Apply the policy; returns the fields whose value must become the checkpoint's.

        Args:
            saved: the checkpoint's config (plus any derived values the policy names).
            current: this run's config in the same form (``config_dict``).
            warn: log the warnings (only rank 0 should).
        """
        differs = [k for k in current if k in saved and saved[k] != current[k]]
        refused = [k for k in differs if k in self.refuse]
        if refused:
            what = "; ".join(f"{k} is {_diff(saved[k], current[k])}" for k in refused)
            raise TrainingError(f"cannot resume: {what}; pass the same flags or start in a new workdir")
        changes: dict[str, Any] = {}
        messages = []
        for k in differs:
            if k in self.allow:
                continue
            if k in self.adopt:
                changes[k] = saved[k]
                messages.append(f"resume: {k}={current[k]!r} differs from the checkpoint's {saved[k]!r}; "
                                "using the checkpoint's")
            elif k in self.inherit and current[k] is None:
                changes[k] = saved[k]
            else:
                messages.append(f"resume: {k} changed from {saved[k]!r} to {current[k]!r}")
        for m in messages if warn else ():
            log.warning("%s", m)
        return changes


def _diff(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return "different in " + ", ".join(f"{k} ({old.get(k)!r} in the checkpoint, {new.get(k)!r} now)" for k in keys)
    return f"{old!r} in the checkpoint but {new!r} now"
