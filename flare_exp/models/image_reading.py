"""A batch's image files read and decoded by threads while the batch before it decodes (infer, the in-training
held-out eval). One thread reads ahead; more join only while the decode waits on the reading (the first batch,
large X-rays), because a reading thread slows the decode it runs beside: the decode loop's thread launches each
token's work and waits for the interpreter while the readers hold it between their C calls."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the chat is passed in; models/ does not import data/
    from flare_exp.data.vision import VisionChat
    from flare_exp.models.batch_decoding import InputsAhead

log = logging.getLogger(__name__)
MOST_IMAGE_THREADS = 8  # decoding threads beyond this mostly wait on each other and on the decode loop's thread


class BatchRead:
    """One batch's records' pictures, decoded by whichever threads take its records (one at a time, in order);
    the thread that decodes the last one builds the batch's model input (``ahead``). An unreadable file is
    reported as one thread reading in order would: the first such record's error, after the others are read."""

    def __init__(self, chat: VisionChat, records: list[dict], ahead: InputsAhead | None):
        self.chat, self.records, self.ahead = chat, records, ahead
        self.images: list = [None] * len(records)
        self.errors: dict[int, BaseException] = {}
        self.next, self.left = 0, len(records)
        self.lock, self.done, self.stop = threading.Lock(), threading.Event(), False
        if not records:
            self.done.set()

    def work(self) -> None:
        """Decode records until none is left untaken (a thread that finds none returns at once)."""
        while True:
            with self.lock:
                if self.stop or self.next >= len(self.records):
                    return
                index, self.next = self.next, self.next + 1
            try:
                self.images[index] = self.chat.load_images(self.records[index])
            except BaseException as e:  # noqa: BLE001 - raised in the consumer's thread, in record order
                self.errors[index] = e
            with self.lock:
                self.left -= 1
                last = self.left == 0
            if last:
                self.finish()

    def finish(self) -> None:
        try:
            if self.ahead is not None and not self.errors and not self.stop:
                self.ahead.build(self.records, self.images)
        except BaseException as e:  # noqa: BLE001
            self.errors[len(self.records)] = e
        finally:
            self.done.set()

    def result(self) -> list:
        self.done.wait()
        if self.errors:
            raise self.errors[min(self.errors)]
        return self.images


class ImageReader:
    """Reads each batch's files ahead with ``threads`` at most: ``ahead_threads`` start reading the next batch
    while this one decodes (1 at first); when the decode has to wait for a batch, every thread joins its
    reading, and the next batches start with twice as many (the reading is slower than the decode)."""

    def __init__(self, chat: VisionChat, threads: int, ahead: InputsAhead | None):
        self.chat, self.threads, self.ahead = chat, max(1, threads), ahead
        self.ahead_threads, self.waits = 1, 0
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="image-reader")

    def start(self, records: list[dict]) -> BatchRead:
        read = BatchRead(self.chat, records, self.ahead)
        for _ in range(min(self.ahead_threads, len(records)) or 1):
            self.pool.submit(read.work)
        return read

    def wait(self, read: BatchRead, first: bool) -> list:
        if not read.done.is_set():  # the decode waits on the reading: every thread reads now
            for _ in range(self.threads - 1):
                self.pool.submit(read.work)
            if not first and self.ahead_threads < self.threads:
                self.waits += 1
                self.ahead_threads = min(self.threads, 2 * self.ahead_threads)
                log.debug("image reading slower than the decode: %d thread(s) read ahead from now on",
                          self.ahead_threads)
        return read.result()

    def close(self, read: BatchRead | None) -> None:
        if read is not None:
            read.stop = True  # a batch nobody will take: its untaken records are not read
        self.pool.shutdown(wait=True)


def batches_with_images(chat: VisionChat, todo: list[dict], size: int, ahead: InputsAhead | None = None,
                        threads: int = 1):
    """(records, their decoded images) per batch; the next batch's files are read and decoded by threads
    while the current one generates (with ``ahead``, its model input built there too)."""
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    reader = ImageReader(chat, threads, ahead)
    pending = reader.start(chunks[0]) if chunks else None
    try:
        for i, chunk in enumerate(chunks):
            images = reader.wait(pending, first=i == 0)
            pending = reader.start(chunks[i + 1]) if i + 1 < len(chunks) else None
            yield chunk, images
    finally:
        reader.close(pending)


def image_threads(setting) -> int:
    """infer.image_threads as a number: auto = this process's share of its CPU cores (the ranks torchrun
    started on this node share them), at most MOST_IMAGE_THREADS; a number as it is."""
    import os

    from flare_exp.runtime import usable_cores

    check_image_threads(setting)
    if setting != "auto":
        return int(setting)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(MOST_IMAGE_THREADS, usable_cores() // max(1, ranks_here)))


def check_image_threads(value) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"infer.image_threads={value!r}: choose auto or a whole number >= 1 (threads that "
                         "read and decode the image files)")
