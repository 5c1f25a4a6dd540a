"""What the report judges (GREEN, CRIMSON) share: their judgments journaled as each batch finishes (a
preempted eval resumes and a pair already judged is not judged again), a data-parallel eval's shares (each
rank its own journal, merged by rank 0), and the order and grouping of the batches.

A judge subclass gives ``render_pair(reference, candidate)`` (the judge's input text), ``generate(texts)`` (one
batch's judgments) and sets ``identity`` (what names the judge and the settings that decide its text),
``journal`` (a path or None), ``batch_size`` and ``exact`` (the package's batches in input order).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from flare_exp.io import read_journal
from flare_exp.run.lock import check_still_held

log = logging.getLogger(__name__)


def judge_dir(key: str, model_path: str | Path, download: str) -> Path:
    """The judge's local directory, or a clear error naming the key and what to download (``download``: the
    repository and its size)."""
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{key}={path} holds no model. On a machine with internet: huggingface-cli download "
                                f"{download}, copy DIR here and pass {key}=DIR")
    return path


class JudgeOutOfMemoryError(MemoryError):
    """A report judge's batch did not fit in memory (said in one line, with the prediction that made it long)."""


class JournaledJudge:
    name, section = "judge", "eval"
    identity, journal, batch_size, exact = "", None, 1, False

    def render_pair(self, reference: str, candidate: str) -> str:
        raise NotImplementedError

    def generate(self, texts: list[str]) -> list[str]:
        raise NotImplementedError

    def key(self, text: str) -> str:
        return hashlib.sha256((self.identity + "\n" + text).encode()).hexdigest()

    def _journal_of(self, rank: int | None):
        """The judgments' journal, or one rank's own (``<journal>.rank<N>.jsonl``) in a data-parallel eval."""
        if self.journal is None or rank is None:
            return self.journal
        return self.journal.with_name(f"{self.journal.stem}.rank{rank}{self.journal.suffix}")

    def _rank_journals(self) -> list[Path]:
        return sorted(self.journal.parent.glob(f"{self.journal.stem}.rank*{self.journal.suffix}"))

    def _judged(self) -> dict[str, str]:
        """Every judgment journaled so far: the merged journal and any rank's (a resume may use another number
        of ranks)."""
        if self.journal is None:
            return {}
        judged = {k: row["judge_output"] for k, row in read_journal(self.journal, "key").items()}
        for part in self._rank_journals():
            judged.update({k: row["judge_output"] for k, row in read_journal(part, "key").items()})
        return judged

    def judge(self, references: list[str], candidates: list[str], share: tuple[int, int] | None = None) -> list[str]:
        """The judgments of the pairs, reused from the journal where there. ``share=(rank, world)``: judge only
        this rank's share of what is left, into its own journal (``merge_shares`` joins them); returns []."""
        from tqdm.auto import tqdm

        texts = [self.render_pair(r, c) for r, c in zip(references, candidates)]
        self.candidate_of = dict(zip(texts, candidates))  # what names a batch that runs out of memory
        judged = self._judged()
        keys, batches = self._batches(texts, judged)
        if share is not None:
            batches = batches[share[0]::share[1]]
        left = sum(len(b) for b in batches)
        if judged and left:
            log.info("%s: %d judgments reused from %s, %d to go", self.name, len(set(keys)) - left, self.journal,
                     left)
        journal = self._journal_of(share[0] if share else None)
        if journal:
            journal.parent.mkdir(parents=True, exist_ok=True)
        with (open(journal, "a", encoding="utf-8") if journal else contextlib.nullcontext()) as f:
            for todo in tqdm(batches, desc=self.name, unit="batch", disable=len(batches) <= 1):
                batch_keys, batch = zip(*todo)
                outputs = self.generate_named(list(batch))
                if f:
                    check_still_held()  # stopped past the takeover wait: the journal is another's now
                for key, output in zip(batch_keys, outputs):
                    judged[key] = output
                    if f:
                        f.write(json.dumps({"key": key, "judge_output": output}, ensure_ascii=False) + "\n")
                if f:
                    f.flush()
        return [] if share is not None else [judged[k] for k in keys]

    def generate_named(self, batch: list[str]) -> list[str]:
        """``generate``, its running out of memory named with the batch's longest input and what to change (the
        judgments made so far are journaled: the same command resumes after them)."""
        import torch

        try:
            return self.generate(batch)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            longest, tokenizer = max(batch, key=len), getattr(self, "tokenizer", None)
            tokens = len(tokenizer(longest)["input_ids"]) if tokenizer is not None else None
            candidate = str(getattr(self, "candidate_of", {}).get(longest, ""))
            raise JudgeOutOfMemoryError(
                f"{self.name} ran out of memory on a batch of {len(batch)}, its longest input "
                f"{f'{tokens} tokens' if tokens else f'{len(longest)} characters'}, for the prediction "
                f"{candidate[:80]!r}{'...' if len(candidate) > 80 else ''} ({len(candidate.split())} words): lower "
                f"{self.section}.batch_size (1 judges one report at a time), or shorten that prediction (a report "
                "that long is no report: a model that repeats itself?). The judgments made so far are journaled: "
                "the same command goes on after them") from e

    def _batches(self, texts: list[str], judged: dict) -> tuple[list[str], list[list[tuple[str, str]]]]:
        """Every text's journal key, and the batches still to judge as (key, text) lists. Default: each distinct
        text once, the longest first (similar lengths share a batch, less padding; a too-large batch fails
        first). Exact: the package's batches (``batch_size``) in input order, a batch judged again whole when any
        of its judgments is missing (its members' budgets depend on one another); a key names the batch and
        the place in it."""
        if not self.exact:
            keys = [self.key(t) for t in texts]
            todo = [(key, text) for key, text in dict(zip(keys, texts)).items() if key not in judged]
            todo.sort(key=lambda item: len(item[1]), reverse=True)
            return keys, [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        batches = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        keyed = [[(self.key("\x00".join(batch) + f"\x00{place}"), text) for place, text in enumerate(batch)]
                 for batch in batches]
        return ([key for batch in keyed for key, _ in batch],
                [batch for batch in keyed if any(key not in judged for key, _ in batch)])

    def merge_shares(self) -> None:
        """The ranks' journals appended to the judge's one journal, then removed (rank 0, after every rank)."""
        if self.journal is None:
            return
        parts = self._rank_journals()
        known = set(read_journal(self.journal, "key"))
        with open(self.journal, "a", encoding="utf-8") as out:
            for part in parts:
                for key, row in read_journal(part, "key").items():
                    if key not in known:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        known.add(key)
        for part in parts:
            part.unlink()

