"""The GREEN judge: the package's input and greedy decoding, on infer's fast decoding path.

The input is built exactly as the GREEN package builds it (``flare_exp.metrics.green``). What differs is only
how the same greedy tokens are produced:
- ``decode_loop=generate``: transformers' ``generate`` with a dynamic cache, the package's way;
- ``decode_loop=graph``: the graph decode loop (static KV cache, one compiled step per token on a GPU);
- ``auto``: graph on a GPU, generate on the CPU.
Prompts are sorted by length (less padding), a repeated pair judged once, ``batch_size`` at a time. Greedy
picks are the same in both loops (tested). The batch is not only a matter of speed: a batch's total length is
``max_length`` for all its members (the package's ``generate(max_length=...)``), so a judgment that reaches that
budget is cut where its batch-mates' longest prompt leaves it; and in fp16 on a GPU another batch composition
can flip a near-tie (the benchmark reports the share of identical judgments). ``exact=True`` judges as the
package does for FLARE's number: 8 at a time in input order, repeats included, ``generate`` unless the graph
loop is asked for by name, no cap but ``max_length``. Every judgment is journaled as soon as its batch
finishes, so a preempted eval resumes, and a pair already judged (in exact mode: the same pair at the same
place of the same batch) is not judged again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from flare_exp.io import read_journal
from flare_exp.metrics.green import GREEN_CHAT_TEMPLATE, clean_response, green_score, make_prompt, parse_green, \
    summarise
from flare_exp.models.decoding import DECODE_LOOPS, GraphLoop, graph_loop_chosen
from flare_exp.runtime import check_choice

log = logging.getLogger(__name__)
JUDGE_DTYPES = ("float16", "bfloat16", "float32")
PACKAGE_BATCH = 8  # the package's batch size, as FLARE's evaluator calls it


@contextlib.contextmanager
def quiet_right_padding_warning():
    """The package's input ends with EOS, which is also its pad token, so generate takes it for right padding
    and warns on every batch; the padding is on the left (the package silences the same warning)."""
    from transformers.generation.utils import logger

    class Filter(logging.Filter):
        def filter(self, record):
            return "right-padding was detected" not in record.getMessage()

    quiet = Filter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class GreenJudge:
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048,
                 max_new_tokens: int | None = None, decode_loop: str = "auto", parser: str = "package",
                 journal: str | Path | None = None, identity: str = "", exact: bool = False):
        """A loaded judge (``from_pretrained`` loads one as the package does). max_length: the package's total
        length (prompt + judgment) and its input truncation; max_new_tokens: a tighter cap on the judgment
        (None: the package's, max_length minus the batch's prompt). identity: what names the judge in the
        journal's keys (its path and settings). exact: the package's batching (module doc)."""
        check_choice("eval.green.decode_loop", decode_loop, DECODE_LOOPS)
        parse_green("", parser)  # an unknown parser fails here, before any judging
        if exact and max_new_tokens is not None:
            raise ValueError("eval.green.exact=true judges as the package does: leave eval.green.max_new_tokens "
                             f"null (it is {max_new_tokens})")
        self.model, self.tokenizer, self.device = model, tokenizer, str(model.device)
        self.exact = exact
        self.batch_size = PACKAGE_BATCH if exact else batch_size
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.parser = parser
        if exact and decode_loop == "auto":
            decode_loop = "generate"
        on_gpu = self.device.startswith("cuda")
        self.graph = GraphLoop("eval.green.decode_loop", on_gpu, decode_loop) if graph_loop_chosen(
            "eval.green.decode_loop", decode_loop, "hf", on_gpu) else None
        # journal key: the judge and what decides its text (the decoding loop does not)
        self.identity = json.dumps([identity, max_length, max_new_tokens])
        self.journal = Path(journal) if journal else None

    @classmethod
    def from_pretrained(cls, model_path: str | Path, dtype: str = "float16", device: str | None = None,
                        **settings) -> "GreenJudge":
        """The judge and its tokenizer as the package loads them: fp16 weights; the tokenizer with
        ``add_eos_token=True``, left padding, the GREEN chat template, EOS as the pad token."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_choice("eval.green.dtype", dtype, JUDGE_DTYPES)
        path = Path(model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"eval.green.model_path={path} holds no model. On a machine with internet: huggingface-cli "
                "download StanfordAIMI/GREEN-radllama2-7b --local-dir DIR (~13.5 GB; GREEN-RadPhi2 is smaller), "
                "copy DIR here and pass eval.green.model_path=DIR")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(path, add_eos_token=True, use_fast=True, padding_side="left")
        tokenizer.chat_template = GREEN_CHAT_TEMPLATE
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.clean_up_tokenization_spaces = True
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        return cls(model, tokenizer, identity=json.dumps([str(path.resolve()), dtype]), **settings)

    def render(self, prompt: str) -> str:
        """The package's chat text: the prompt as a human turn, an empty assistant turn, the generation prompt."""
        return self.tokenizer.apply_chat_template([{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                                                  tokenize=False, add_generation_prompt=True)

    def encode(self, texts: list[str]) -> dict:
        """The package's tokenizer call: default special tokens (BOS, and EOS), left padding, truncation."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length)
        return {k: v.to(self.device) for k, v in enc.items() if k != "token_type_ids"}

    def key(self, text: str) -> str:
        return hashlib.sha256((self.identity + "\n" + text).encode()).hexdigest()

    def new_token_budget(self, prompt_length: int) -> int:
        budget = self.max_length - prompt_length
        return budget if self.max_new_tokens is None else min(budget, self.max_new_tokens)

    def _greedy_config(self):
        """The judge's generation config with the package's greedy settings (its EOS as the pad token)."""
        config = self.model.generation_config
        config.eos_token_id, config.pad_token_id, config.do_sample = (self.tokenizer.eos_token_id,
                                                                      self.tokenizer.pad_token_id, False)
        return config

    def generate(self, texts: list[str]) -> list[str]:
        """Greedy judgments for one batch of rendered texts, decoded and cleaned as the package does."""
        import torch

        enc = self.encode(texts)
        budget = self.new_token_budget(enc["input_ids"].shape[1])
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        new = None
        if budget > 0 and self.graph is not None:
            new = self.graph.new_tokens(self.model, enc, budget, pad, self._greedy_config(), "the judge's decode step")
        if budget <= 0:
            sequences = enc["input_ids"]
        elif new is not None:
            sequences = torch.cat([enc["input_ids"], new], dim=1)
        else:
            with torch.inference_mode(), quiet_right_padding_warning():
                sequences = self.model.generate(**enc, eos_token_id=eos, pad_token_id=pad, max_new_tokens=budget,
                                                do_sample=False, temperature=None, top_p=None, top_k=None)
        decoded = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [clean_response(text) for text in decoded]

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

        texts = [self.render(make_prompt(r, c)) for r, c in zip(references, candidates)]
        judged = self._judged()
        keys, batches = self._batches(texts, judged)
        if share is not None:
            batches = batches[share[0]::share[1]]
        left = sum(len(b) for b in batches)
        if judged and left:
            log.info("GREEN judge: %d judgments reused from %s, %d to go", len(set(keys)) - left, self.journal, left)
        journal = self._journal_of(share[0] if share else None)
        if journal:
            journal.parent.mkdir(parents=True, exist_ok=True)
        with (open(journal, "a", encoding="utf-8") if journal else contextlib.nullcontext()) as f:
            for todo in tqdm(batches, desc="GREEN judge", unit="batch", disable=len(batches) <= 1):
                batch_keys, batch = zip(*todo)
                for key, output in zip(batch_keys, self.generate(list(batch))):
                    judged[key] = output
                    if f:
                        f.write(json.dumps({"key": key, "judge_output": output}, ensure_ascii=False) + "\n")
                if f:
                    f.flush()
        return [] if share is not None else [judged[k] for k in keys]

    def _batches(self, texts: list[str], judged: dict) -> tuple[list[str], list[list[tuple[str, str]]]]:
        """Every text's journal key, and the batches still to judge as (key, text) lists. Default: each distinct
        text once, the longest first (similar lengths share a batch, less padding; a too-large batch fails
        first). Exact: the package's batches of 8 in input order, a batch judged again whole when any of its
        judgments is missing (its members' budgets depend on one another); a key names the batch and place."""
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

    def input_tokens(self, references: list[str], candidates: list[str]) -> list[int]:
        """Each judge input's token count before truncation (the package's judgment has no room from
        ``max_length`` on)."""
        texts = [self.render(make_prompt(r, c)) for r, c in zip(references, candidates)]
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]] if texts else []

    def score(self, references: list[str], candidates: list[str]) -> tuple[dict, list[dict]]:
        outputs = self.judge(references, candidates)
        per_sample = []
        for ref, cand, text, tokens in zip(references, candidates, outputs, self.input_tokens(references, candidates)):
            counts = parse_green(text, self.parser)
            per_sample.append({"reference": ref, "candidate": cand, "judge_output": text, "judge_input_tokens": tokens,
                               **counts, "green": green_score(counts)})
        return {"green_parser": self.parser, **summarise(per_sample)}, per_sample
