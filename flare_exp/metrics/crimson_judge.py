"""The CRIMSON judge: the crimson-score package's input, decoding and output text, batched.

The package runs its judge through transformers' text-generation pipeline one report at a time: the chat
(``flare_exp.metrics.crimson.messages``) through the judge's chat template with the generation prompt,
tokenized as the template writes it (no further special tokens), bf16 weights; decoded with the judge's own
generation_config.json where it has one, else greedily up to 8,192 new tokens; the reply is the decoded
sequence after the decoded prompt (special tokens skipped). Here the same, ``batch_size`` reports at a time
(left padding; length-sorted, a repeated pair judged once; ``batch_size=1`` is the package's way), journaled
and shared over ranks as GREEN's judge (``flare_exp.metrics.judge_journal``).

``decode_loop``: auto takes the graph decode loop on a GPU where the judge allows it, generate elsewhere;
graph asks for it (an error where the judge does not allow it). It does not for CRIMSON's own judge,
MedGemma-4B: its layers alternate sliding-window and global attention, and the loop's static cache and
per-token mask are for global attention only (and Gemma 3's multimodal model places tokens without the rope
deltas the loop reads). A text-only judge with global attention only takes the loop.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from flare_exp.metrics.crimson import crimson_score, make_prompt, messages, parse_judgment, summarise
from flare_exp.io import model_dir_digest
from flare_exp.metrics.judge_journal import JournaledJudge, judge_dir
from flare_exp.models.decoding import DecodeSettings, decoder_for
from flare_exp.runtime import check_choice

PACKAGE_MAX_NEW_TOKENS = 8192  # the package's cap when the judge has no generation_config.json
JUDGE_DTYPES = ("bfloat16", "float16", "float32")


def graph_loop_refusal(model) -> str | None:
    """Why the graph decode loop cannot decode this judge as generate does, or None when it can."""
    text = model.config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or []) or getattr(text, "use_sliding_window", False):
        return "its sliding-window attention layers (the loop's static cache and mask are for global attention)"
    if getattr(model.config, "vision_config", None) is not None and not model.config.model_type.startswith("qwen"):
        return f"{model.config.model_type}'s multimodal token positions (the loop reads Qwen-VL's rope deltas)"
    return None


class CrimsonJudge(JournaledJudge):
    name, section = "CRIMSON judge", "eval.crimson"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_new_tokens: int | None = None,
                 decode_loop: str = "auto", journal: str | Path | None = None, identity: str = ""):
        """A loaded judge (``from_pretrained``). max_new_tokens: a tighter cap than the package's (state it)."""
        self.model, self.tokenizer, self.device = model, tokenizer, str(model.device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.config = self._package_generation_config()
        refusal = graph_loop_refusal(model)
        self.decoder = decoder_for(model, DecodeSettings("eval.crimson", decode_loop, refusal=refusal))
        self.decoding = "graph" if self.decoder.graph else f"generate{f' ({refusal})' if refusal else ''}"
        self.identity = json.dumps([identity, max_new_tokens])
        self.journal = Path(journal) if journal else None

    @classmethod
    def from_pretrained(cls, model_path: str | Path, dtype: str = "bfloat16", device: str | None = None,
                        **settings) -> "CrimsonJudge":
        """The judge as the package's pipeline loads it: bf16, left padding, the judge's own chat template."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from flare_exp.models.checkpoint_files import load_whole

        check_choice("eval.crimson.dtype", dtype, JUDGE_DTYPES)
        path = judge_dir("eval.crimson.model_path", model_path, "rajpurkarlab/medgemma-4b-it-crimson --local-dir DIR "
                         "(~8.6 GB; accept MedGemma's terms on the hub first)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if not getattr(tokenizer, "chat_template", None):  # GREEN's judge given here: no chat template of its own
            raise ValueError(f"eval.crimson.model_path={path}: its tokenizer has no chat template, which CRIMSON's "
                             "prompt needs: is it another judge's folder? Point it at the CRIMSON judge's own folder")
        model = load_whole(AutoModelForCausalLM, "eval.crimson.model_path", path,
                           dtype=getattr(torch, dtype)).to(device).eval()
        return cls(model, tokenizer, identity=json.dumps([str(path.resolve()), model_dir_digest(path), dtype]), **settings)

    def _package_generation_config(self):
        """The judge's generation_config.json as it stands where it has one (the package passes it whole),
        else greedy to 8,192 new tokens; our max_new_tokens on top when set."""
        config = copy.deepcopy(self.model.generation_config)
        if config._from_model_config:
            config.do_sample, config.max_new_tokens = False, PACKAGE_MAX_NEW_TOKENS
        if self.max_new_tokens is not None:
            config.max_new_tokens = min(config.max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def render_pair(self, reference: str, candidate: str) -> str:
        return self.tokenizer.apply_chat_template(messages(make_prompt(reference, candidate)), tokenize=False,
                                                  add_generation_prompt=True)

    def generate(self, texts: list[str]) -> list[str]:
        """One batch's replies: the decoded sequence after the decoded prompt, as the pipeline cuts it."""
        import torch

        enc = self.tokenizer(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k != "token_type_ids"}
        prompt = enc["input_ids"].shape[1]
        budget = self.config.max_new_tokens or max(self.config.max_length - prompt, 0)
        new = None
        if budget > 0:
            new = self.decoder.new_tokens(enc, budget, self.config.pad_token_id, self.config,
                                          "the CRIMSON judge's decode step")
        if new is not None:
            sequences = torch.cat([enc["input_ids"], new], dim=1)
        else:
            with torch.inference_mode():
                sequences = self.model.generate(**enc, generation_config=self.config)
        full = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode(enc["input_ids"], skip_special_tokens=True)
        return [text[len(p):] for text, p in zip(full, prompts)]

    def score(self, references: list[str], candidates: list[str]) -> tuple[dict, list[dict]]:
        per_sample = []
        for ref, cand, text in zip(references, candidates, self.judge(references, candidates)):
            judgment = parse_judgment(text)
            scored = None if judgment is None else crimson_score(judgment)
            per_sample.append({"reference": ref, "candidate": cand, "judge_output": text,
                               "parsed": judgment is not None, "crimson": scored and scored["crimson"],
                               "error_counts": scored and scored["error_counts"]})
        return {"crimson_decoding": self.decoding, **summarise(per_sample)}, per_sample


def crimson_fields(judge: CrimsonJudge | None, rows: list[dict], samples_file: Path) -> dict:
    """CRIMSON's fields for eval's report rows (``answer``, ``prediction``, ``id``) and its per-sample file; a
    note when no judge is configured."""
    from flare_exp.io import write_jsonl

    if judge is None:
        return {"crimson_score": None,
                "crimson_note": "not computed: eval.crimson.model_path is not set (no CRIMSON judge configured)"}
    summary, per_sample = judge.score([r["answer"] for r in rows], [r["prediction"] for r in rows])
    write_jsonl(samples_file, [{"id": r["id"], **s} for r, s in zip(rows, per_sample)])
    return summary
