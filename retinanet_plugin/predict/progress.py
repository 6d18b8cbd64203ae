"""Progress of a predict run: a tqdm bar when installed, else a log line every few seconds."""

import logging
import time

try:  # an optional nicety: without tqdm, progress is logged
    from tqdm import tqdm
except ImportError:
    tqdm = None

__all__ = ["Progress"]

# The tool's logger, so the log lines read as those of ``python -m retinanet_plugin.tools.predict``.
logger = logging.getLogger("retinanet_plugin.tools.predict")


class Progress:
    """tqdm when installed, else an INFO line every few seconds; both show images/s."""

    def __init__(self, total: int, interval_s: float = 5.0):
        self.total, self.count, self.interval_s = total, 0, interval_s
        self.start = self.last_log = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", desc="predict") if tqdm is not None else None

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_log >= self.interval_s:
            self.last_log = now
            logger.info("%d/%d images, %.2f images/s", self.count, self.total, self.rate())

    def rate(self) -> float:
        return self.count / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
