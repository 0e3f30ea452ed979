"""Counts of what the stream read, kept, and skipped, by kind.

Broken input never stops a run (a week-long job must not die on one bad tar); it is skipped and
counted here instead. Each DataLoader worker counts in its own process and ships the counts since
its previous batch inside that batch (``batch["data_stats"]``), so the training process sees them
without shared memory; :class:`DataStats` adds those deltas up there for logging as metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

log = logging.getLogger(__name__)

# The kinds, in the order a sample meets them. Filter kinds count the first LAION rule a sample fails.
READ = "samples_read"  # complete samples out of the tars (before any check)
ACCEPTED = "samples_accepted"  # samples delivered in batches
SHARD_OPEN_ERROR = "shard_open_error"
TRUNCATED_TAR = "truncated_tar"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
MISSING_JSON = "missing_json"
BAD_JSON = "bad_json"
UNDECODABLE_IMAGE = "undecodable_image"
BAD_IMAGE_SIZE = "bad_image_size"  # decodes, but too small or too elongated to crop (transforms.py)
BAD_CAPTION = "bad_caption"  # a caption that is not valid UTF-8: the shard's bytes are corrupt
MISSING_ARRAY = "missing_array"  # cached shards: a latent or text member absent
BAD_ARRAY = "bad_array"  # cached shards: a member that is not a readable .npy
SKIP_KINDS = (SHARD_OPEN_ERROR, TRUNCATED_TAR, MISSING_IMAGE, MISSING_CAPTION, BAD_CAPTION, MISSING_JSON, BAD_JSON,
              UNDECODABLE_IMAGE, BAD_IMAGE_SIZE, MISSING_ARRAY, BAD_ARRAY)
FILTERED_PREFIX = "filtered_"

# How many skips of one kind are logged with their reason before only every 1000th is.
_LOG_FIRST = 5


class DataStats:
    """A counter of samples by kind; cheap to update per sample and to ship per batch."""

    def __init__(self, counts: Mapping[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})
        self._since_last_batch: Counter[str] = Counter()

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n
        self._since_last_batch[kind] += n

    def skip(self, kind: str, where: str, reason: object) -> None:
        """Count a skipped sample or shard and log it (the first few of each kind, then every 1000th)."""
        self.count(kind)
        seen = self.counts[kind]
        if seen <= _LOG_FIRST or seen % 1000 == 0:
            log.warning("data: skipped %s #%d at %s: %s", kind, seen, where, reason)

    def take_batch_delta(self) -> dict[str, int]:
        """The counts since the previous call; a worker attaches this to each batch it emits."""
        delta = dict(self._since_last_batch)
        self._since_last_batch.clear()
        return delta

    def update(self, delta: Mapping[str, int]) -> None:
        """Add a batch's ``data_stats`` (in the training process)."""
        self.counts.update(delta)

    def filtered(self) -> dict[str, int]:
        """Rejections by LAION rule, e.g. ``{"size": 12, "aesthetic": 40}``."""
        return {k.removeprefix(FILTERED_PREFIX): v for k, v in self.counts.items() if k.startswith(FILTERED_PREFIX)}

    def skipped(self) -> dict[str, int]:
        """Broken-input skips by kind."""
        return {k: v for k, v in self.counts.items() if k in SKIP_KINDS}

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Cumulative counts as a flat metrics dict for ``LightningModule.log_dict``."""
        return {f"{prefix}{kind}": float(n) for kind, n in sorted(self.counts.items())}

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.counts = Counter(state)
