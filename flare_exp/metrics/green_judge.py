"""The GREEN judge: the package's input and greedy decoding, on infer's fast decoding path.

The input is built exactly as the GREEN package builds it (``flare_exp.metrics.green``). What differs is only
how the same greedy tokens are produced:
- ``decode_loop=generate``: transformers' ``generate`` with a dynamic cache, the package's way;
- ``decode_loop=graph``: the graph decode loop (static KV cache, one compiled step per token on a GPU);
- ``auto``: graph on a GPU, generate on the CPU.
Prompts are sorted by length (less padding), a repeated pair judged once, ``batch_size`` at a time. Greedy
picks are the same in both loops (tested). In the package a batch's total length is ``max_length`` for all its
members (its ``generate(max_length=...)``), so a judgment is cut where its batch-mates' longest prompt leaves it
(one at ``max_length`` leaves them none). Here each judgment gets the room its own prompt leaves, as if judged
alone: the ones a longer prompt beside them cut short are judged again among themselves, so the number does not
move with ``batch_size``; in fp16 on a GPU another batch composition can still flip a near-tie (the benchmark
reports the share of identical judgments). ``exact=True`` judges as the package does for FLARE's number: 8 at a
time in input order, each batch's budget set by its longest prompt, repeats included, ``generate`` unless the
graph loop is asked for by name, no cap but ``max_length``. Every judgment is journaled as soon as its batch
finishes, so a preempted eval resumes, and a pair already judged (in exact mode: the same pair at the same
place of the same batch) is not judged again.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from flare_exp.card import AUTO, card_memory, check_batch, green_batch, sized_batch
from flare_exp.metrics.green import GREEN_CHAT_TEMPLATE, clean_response, green_score, make_prompt, parse_green, \
    summarise
from flare_exp.io import model_dir_digest
from flare_exp.metrics.judge_journal import JournaledJudge, judge_dir
from flare_exp.models import grouped_attention
from flare_exp.models.decoding import DecodeSettings, decoder_for
from flare_exp.runtime import check_choice

log = logging.getLogger(__name__)
JUDGE_DTYPES = ("float16", "bfloat16", "float32")
PACKAGE_BATCH = 8  # the package's batch size, as FLARE's evaluator calls it
BATCH_KEY = "eval.green.batch_size"
ATTENTION_KEY = "eval.green.decode_attention"


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


class GreenJudge(JournaledJudge):
    name, section = "GREEN judge", "eval.green"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048,
                 max_new_tokens: int | None = None, decode_loop: str = "auto", parser: str = "package",
                 journal: str | Path | None = None, identity: str = "", exact: bool = False,
                 shared_prefix: bool = False):
        """A loaded judge (``from_pretrained`` loads one as the package does). max_length: the package's total
        length (prompt + judgment) and its input truncation; max_new_tokens: a tighter cap on the judgment
        (None: the package's, max_length minus the batch's prompt). identity: what names the judge in the
        journal's keys (its path and settings). exact: the package's batching (module doc). shared_prefix: the
        graph loop reads the prompts' common beginning once per block of rows (split-KV attention only)."""
        parse_green("", parser)  # an unknown parser fails here, before any judging
        if exact and max_new_tokens is not None:
            raise ValueError("eval.green.exact=true judges as the package does: leave eval.green.max_new_tokens "
                             f"null (it is {max_new_tokens})")
        self.model, self.tokenizer, self.device = model, tokenizer, str(model.device)
        self.exact = exact
        check_batch(BATCH_KEY, batch_size)
        # the batch as used, and why (eval's summary); auto is sized when the prompts are known (judge)
        if exact:
            self.batch_size, self.batch_choice = PACKAGE_BATCH, {
                "key": BATCH_KEY, "value": PACKAGE_BATCH, "auto": False, "why": "eval.green.exact=true: the "
                "package's batches"}
        elif batch_size == AUTO:
            self.batch_size, self.batch_choice = AUTO, None
        else:
            self.batch_size, self.batch_choice = sized_batch(BATCH_KEY, batch_size, None)
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.parser = parser
        if exact and decode_loop == "auto":
            decode_loop = "generate"
        self.decoder = decoder_for(model, DecodeSettings("eval.green", decode_loop, shared_prefix=shared_prefix))
        # journal key: the judge and what decides its text (the decoding loop does not)
        # (outside exact mode each judgment has its own prompt's room: journals made before that are not reused)
        self.identity = json.dumps([identity, max_length, max_new_tokens, *([] if exact else ["own room"])])
        self.journal = Path(journal) if journal else None

    @classmethod
    def from_pretrained(cls, model_path: str | Path, dtype: str = "float16", device: str | None = None,
                        decode_attention: str = "split_kv", **settings) -> "GreenJudge":
        """The judge and its tokenizer as the package loads them: fp16 weights; the tokenizer with
        BOS and EOS added (the package's ``add_eos_token=True``), left padding, the GREEN chat template, EOS as
        the pad token."""
        import torch
        from transformers import AutoModelForCausalLM

        from flare_exp.models.checkpoint_files import load_whole

        check_choice("eval.green.dtype", dtype, JUDGE_DTYPES)
        check_choice(ATTENTION_KEY, decode_attention, grouped_attention.SETTINGS)
        path = judge_dir("eval.green.model_path", model_path, "StanfordAIMI/GREEN-radllama2-7b --local-dir DIR "
                         "(~13.5 GB; GREEN-RadPhi2 is smaller)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = judge_tokenizer(path)
        model = load_whole(AutoModelForCausalLM, "eval.green.model_path", path,
                           dtype=getattr(torch, dtype)).to(device).eval()
        if not settings.get("exact"):  # exact: every judgment as the package makes it, its attention too
            grouped_attention.use_decode_attention(model, decode_attention, ATTENTION_KEY)
        return cls(model, tokenizer, identity=json.dumps([str(path.resolve()), model_dir_digest(path), dtype]), **settings)

    def render(self, prompt: str) -> str:
        """The package's chat text: the prompt as a human turn, an empty assistant turn, the generation prompt."""
        return self.tokenizer.apply_chat_template([{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}],
                                                  tokenize=False, add_generation_prompt=True)

    def encode(self, texts: list[str]) -> dict:
        """The package's tokenizer call: default special tokens (BOS, and EOS), left padding, truncation."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length)
        return {k: v.to(self.device) for k, v in enc.items() if k != "token_type_ids"}

    def render_pair(self, reference: str, candidate: str) -> str:
        return self.render(make_prompt(reference, candidate))

    def new_token_budget(self, prompt_length: int) -> int:
        budget = self.max_length - prompt_length
        return budget if self.max_new_tokens is None else min(budget, self.max_new_tokens)

    def row_tokens(self, references: list[str], candidates: list[str]) -> int:
        """The most tokens one row of the judge's cache holds: max_length (the package's budget fills it), or
        with max_new_tokens set the longest prompt (cut at max_length) + max_new_tokens."""
        if self.max_new_tokens is None or not references:
            return self.max_length
        return min(self.max_length, max(self.input_tokens(references, candidates)) + self.max_new_tokens)

    def judge(self, references: list[str], candidates: list[str], share: tuple[int, int] | None = None) -> list[str]:
        if self.batch_size == AUTO:  # every rank sizes from the same prompts and the same kind of card
            rows = self.row_tokens(references, candidates)
            self.batch_size, self.batch_choice = sized_batch(BATCH_KEY, AUTO,
                                                             lambda: green_batch(card_memory(), rows))
        return super().judge(references, candidates, share)

    def _greedy_config(self):
        """The judge's generation config with the package's greedy settings (its EOS as the pad token)."""
        config = self.model.generation_config
        config.eos_token_id, config.pad_token_id, config.do_sample = (self.tokenizer.eos_token_id,
                                                                      self.tokenizer.pad_token_id, False)
        return config

    def generate(self, texts: list[str]) -> list[str]:
        """Greedy judgments for one batch of rendered texts, decoded and cleaned as the package does. Outside
        exact mode each judgment gets the room its own prompt leaves (as judged alone): those the batch's
        longest prompt cut short are judged again among themselves."""
        enc = self.encode(texts)
        budget = self.new_token_budget(enc["input_ids"].shape[1])
        sequences = self._sequences(enc, budget)
        decoded = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        outputs = [clean_response(text) for text in decoded]
        cut = [] if self.exact else self.cut_by_batch(enc, sequences, budget)
        for i, output in zip(cut, self.generate([texts[i] for i in cut]) if cut else []):
            outputs[i] = output
        return outputs

    def _sequences(self, enc: dict, budget: int):
        """The batch's prompts followed by up to ``budget`` greedy new tokens (the graph loop's, else generate's)."""
        import torch

        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if budget <= 0:
            return enc["input_ids"]
        new = self.decoder.new_tokens(enc, budget, pad, self._greedy_config(), "the judge's decode step")
        if new is not None:
            return torch.cat([enc["input_ids"], new], dim=1)
        with torch.inference_mode(), quiet_right_padding_warning():
            return self.model.generate(**enc, eos_token_id=eos, pad_token_id=pad, max_new_tokens=budget,
                                       do_sample=False, temperature=None, top_p=None, top_k=None)

    def cut_by_batch(self, enc: dict, sequences, budget: int) -> list[int]:
        """The rows whose judgment ended at the batch's budget without EOS although their own prompt leaves them
        more (a long prompt beside them: one at max_length leaves its batch-mates none)."""
        width = enc["input_ids"].shape[1]
        finished = (sequences[:, width:] == self.tokenizer.eos_token_id).any(dim=1).tolist()
        own = enc["attention_mask"].sum(dim=1).tolist()
        return [i for i, (done, length) in enumerate(zip(finished, own))
                if not done and self.new_token_budget(length) > max(budget, 0)]

    def input_tokens(self, references: list[str], candidates: list[str]) -> list[int]:
        """Each judge input's token count before truncation (the package's judgment has no room from
        ``max_length`` on)."""
        texts = [self.render_pair(r, c) for r, c in zip(references, candidates)]
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]] if texts else []

    def score(self, references: list[str], candidates: list[str]) -> tuple[dict, list[dict]]:
        outputs = self.judge(references, candidates)
        per_sample = []
        for ref, cand, text, tokens in zip(references, candidates, outputs, self.input_tokens(references, candidates)):
            counts = parse_green(text, self.parser)
            per_sample.append({"reference": ref, "candidate": cand, "judge_output": text, "judge_input_tokens": tokens,
                               **counts, "green": green_score(counts)})
        return {"green_parser": self.parser, **summarise(per_sample)}, per_sample
