"""The GREEN judge: the package's input and greedy decoding, on infer's fast decoding path.

The input is built exactly as the GREEN package builds it (``flare_exp.metrics.green``). What differs is only
how the same greedy tokens are produced:
- ``decode_loop=generate``: transformers' ``generate`` with a dynamic cache, the package's way;
- ``decode_loop=graph``: the graph decode loop (static KV cache, one compiled step per token on a GPU);
- ``auto``: graph on a GPU, generate on the CPU.
Prompts are sorted by length (less padding) and judged ``batch_size`` at a time. Greedy picks are the same in
both loops (tested); in fp16 on a GPU a different batch composition can flip a near-tie, which the benchmark
reports as the share of identical judgments. Every judgment is journaled as soon as its batch finishes, so a
preempted eval resumes, and a pair already judged is not judged again.
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


def judge_tokenizer(path):
    """The judge's tokenizer as the GREEN package loads it on transformers 4 (``AutoTokenizer(...,
    add_eos_token=True)``): its tokenizer.json as it is, BOS first and EOS last, left padding, the GREEN chat
    template, EOS as the pad token. (On transformers 5 that call rebuilds a Llama tokenizer's pipeline and drops
    the BOS: other input ids.)"""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, add_bos_token=True, add_eos_token=True,
                                                        padding_side="left")
    tokenizer.chat_template = GREEN_CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = True
    return tokenizer


class GreenJudge:
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048,
                 max_new_tokens: int | None = None, decode_loop: str = "auto", parser: str = "package",
                 journal: str | Path | None = None, identity: str = ""):
        """A loaded judge (``from_pretrained`` loads one as the package does). max_length: the package's total
        length (prompt + judgment) and its input truncation; max_new_tokens: a tighter cap on the judgment
        (None: the package's, max_length minus the batch's prompt). identity: what names the judge in the
        journal's keys (its path and settings)."""
        check_choice("eval.green.decode_loop", decode_loop, DECODE_LOOPS)
        parse_green("", parser)  # an unknown parser fails here, before any judging
        self.model, self.tokenizer, self.device = model, tokenizer, str(model.device)
        self.batch_size, self.max_length, self.max_new_tokens = batch_size, max_length, max_new_tokens
        self.parser = parser
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
        BOS and EOS added (the package's ``add_eos_token=True``), left padding, the GREEN chat template, EOS as
        the pad token."""
        import torch
        from transformers import AutoModelForCausalLM

        check_choice("eval.green.dtype", dtype, JUDGE_DTYPES)
        path = Path(model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"eval.green.model_path={path} holds no model. On a machine with internet: huggingface-cli "
                "download StanfordAIMI/GREEN-radllama2-7b --local-dir DIR (~13.5 GB; GREEN-RadPhi2 is smaller), "
                "copy DIR here and pass eval.green.model_path=DIR")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = judge_tokenizer(path)
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
        keys = [self.key(t) for t in texts]
        judged = self._judged()
        todo = [(key, text) for key, text in dict(zip(keys, texts)).items() if key not in judged]
        # similar lengths share a batch (less padding); the longest first, so a too-large batch fails first
        todo.sort(key=lambda item: len(item[1]), reverse=True)
        if share is not None:
            todo = todo[share[0]::share[1]]
        if judged and todo:
            log.info("GREEN judge: %d judgments reused from %s, %d to go", len(set(keys)) - len(todo),
                     self.journal, len(todo))
        journal = self._journal_of(share[0] if share else None)
        if journal:
            journal.parent.mkdir(parents=True, exist_ok=True)
        with (open(journal, "a", encoding="utf-8") if journal else contextlib.nullcontext()) as f:
            for start in tqdm(range(0, len(todo), self.batch_size), desc="GREEN judge", unit="batch",
                              disable=len(todo) <= self.batch_size):
                batch_keys, batch = zip(*todo[start:start + self.batch_size])
                for key, output in zip(batch_keys, self.generate(list(batch))):
                    judged[key] = output
                    if f:
                        f.write(json.dumps({"key": key, "judge_output": output}, ensure_ascii=False) + "\n")
                if f:
                    f.flush()
        return [] if share is not None else [judged[k] for k in keys]

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

    def score(self, references: list[str], candidates: list[str]) -> tuple[dict, list[dict]]:
        outputs = self.judge(references, candidates)
        per_sample = []
        for ref, cand, text in zip(references, candidates, outputs):
            counts = parse_green(text, self.parser)
            per_sample.append({"reference": ref, "candidate": cand, "judge_output": text, **counts,
                               "green": green_score(counts)})
        return {"green_parser": self.parser, **summarise(per_sample)}, per_sample
