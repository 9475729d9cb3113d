"""What was sent and what came back, for the fault and load tests: every request answered,
copies of one result identical, every upload in exactly one place (source or quarantine)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.messages import ModerationResult, Status, Verdict

__all__ = ["Ledger", "Tally", "Upload"]


@dataclass(frozen=True)
class Upload:
    request_id: str
    ref: str
    content: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class Tally:
    sent: int = 0
    received: int = 0  # requests with at least one result
    duplicates: int = 0  # extra copies beyond the first
    differing: list[str] = field(default_factory=list)  # requests whose copies differ
    unanswered: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # error results, with their code
    blocked: int = 0
    in_both: list[str] = field(default_factory=list)  # source and quarantine
    in_neither: list[str] = field(default_factory=list)  # the upload is lost
    misplaced: list[str] = field(default_factory=list)  # where its verdict says it is not

    @property
    def lost(self) -> int:
        return len(self.unanswered) + len(self.in_neither)

    def counts(self) -> dict[str, int]:
        """The reliability table's columns."""
        return {
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost,
            "duplicates": self.duplicates,
        }

    def assert_clean(self) -> None:
        assert not self.unanswered, f"{len(self.unanswered)} unanswered: {self.unanswered[:5]}"
        assert not self.differing, f"copies differ for {self.differing[:5]}"
        assert not self.errors, f"error results: {self.errors[:5]}"
        assert not self.in_neither, f"uploads lost: {self.in_neither[:5]}"
        assert not self.in_both, f"left in both places: {self.in_both[:5]}"
        assert not self.misplaced, f"not where the verdict says: {self.misplaced[:5]}"

    def words(self) -> str:
        return (
            f"{self.received}/{self.sent} answered, {self.duplicates} identical re-publications, "
            f"{len(self.differing)} differing; {self.blocked} blocked and moved, "
            f"{len(self.in_both)} in both places, {len(self.in_neither)} lost"
        )


class Ledger:
    """``source_holds(ref) -> bool`` and ``quarantine_holds(location) -> bytes | None`` look
    at storage after the run; without them only delivery is checked."""

    def __init__(self, uploads: list[Upload]) -> None:
        self.uploads = uploads

    def tally(
        self,
        results: dict[str, list[ModerationResult]],
        source_holds: Callable[[str], bool] | None = None,
        quarantine_holds: Callable[[str], bytes | None] | None = None,
    ) -> Tally:
        tally = Tally(sent=len(self.uploads))
        for upload in self.uploads:
            copies = results.get(upload.request_id, [])
            if not copies:
                tally.unanswered.append(upload.request_id)
                continue
            tally.received += 1
            tally.duplicates += len(copies) - 1
            first = copies[0]
            if any(c.model_dump_json() != first.model_dump_json() for c in copies[1:]):
                tally.differing.append(upload.request_id)
            if first.status is Status.ERROR:
                assert first.error is not None
                tally.errors.append(f"{upload.request_id}: {first.error.code}")
                continue
            if source_holds is not None and quarantine_holds is not None:
                self._place(upload, first, tally, source_holds, quarantine_holds)
        return tally

    @staticmethod
    def _place(
        upload: Upload,
        result: ModerationResult,
        tally: Tally,
        source_holds: Callable[[str], bool],
        quarantine_holds: Callable[[str], bytes | None],
    ) -> None:
        blocked = result.verdict is Verdict.BLOCK
        in_source = source_holds(upload.ref)
        location = result.action.location if result.action else None
        in_quarantine = location is not None and quarantine_holds(location) == upload.content
        if blocked:
            tally.blocked += 1
        if in_source and in_quarantine:
            tally.in_both.append(upload.request_id)
        elif not in_source and not in_quarantine:
            tally.in_neither.append(upload.request_id)
        elif in_source is blocked:
            tally.misplaced.append(upload.request_id)
