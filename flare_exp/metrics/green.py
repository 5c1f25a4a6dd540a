"""GREEN (Ostmeier et al.): an LLM judge counts clinically significant errors and matched findings.

score = matched / (matched + sum of the six significant error counts), 0 when nothing matched. The judge
(e.g. StanfordAIMI/GREEN-radllama2-7b, or another GREEN judge) loads from ``eval.green.model_path``; decoding
is greedy and batched. The parser reads counts robustly: sections need not be separated by blank lines, a
count needs no trailing period ("(a) ...: 2" reads 2, where the reference parser reads 0), "No errors" reads
0; an output with no recognisable section is reported as unparsed, never scored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from flare_exp.io import read_journal

log = logging.getLogger(__name__)

SIGNIFICANT = "Clinically Significant Errors"
INSIGNIFICANT = "Clinically Insignificant Errors"
MATCHED = "Matched Findings"
ERROR_TYPES = ["False report of a finding in the candidate", "Missing a finding present in the reference",
               "Misidentification of a finding's anatomic location/position",
               "Misassessment of the severity of a finding",
               "Mentioning a comparison that isn't in the reference",
               "Omitting a comparison detailing a change from a prior study"]
# The judge was trained with this chat format (human -> <|user|>, gpt -> <|assistant|>).
GREEN_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['from'] == 'human' %}\n{{ '<|user|>\n' + message['value'] + "
    "eos_token }}\n{% elif message['from'] == 'system' %}\n{{ '<|system|>\n' + message['value'] + eos_token }}\n"
    "{% elif message['from'] == 'gpt' %}\n{{ '<|assistant|>\n'  + message['value'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def make_prompt(reference: str, candidate: str, max_words: int = 300) -> str:
    reference = " ".join(str(reference).split()[:max_words])
    candidate = " ".join(str(candidate).split()[:max_words])
    criteria = "\n".join(f"    {chr(97 + i)}) {t}." for i, t in enumerate(ERROR_TYPES))
    fmt = ("    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n    ....\n"
           "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>")
    return (
        "Objective: Evaluate the accuracy of a candidate radiology report in comparison to a reference radiology "
        "report composed by expert radiologists.\n\n    Process Overview: You will be presented with:\n\n"
        "    1. The criteria for making a judgment.\n    2. The reference radiology report.\n"
        "    3. The candidate radiology report.\n    4. The desired format for your assessment.\n\n"
        "    1. Criteria for Judgment:\n\n    For each candidate report, determine:\n\n"
        "    The count of clinically significant errors.\n    The count of clinically insignificant errors.\n\n"
        f"    Errors can fall into one of these categories:\n\n{criteria}\n"
        "    Note: Concentrate on the clinical findings rather than the report's writing style. Evaluate only the "
        "findings that appear in both reports.\n\n"
        f"    2. Reference Report:\n    {reference}\n\n    3. Candidate Report:\n    {candidate}\n\n"
        "    4. Reporting Your Assessment:\n\n    Follow this specific format for your output, even if no errors "
        "are found:\n    ```\n    [Explanation]:\n    <Explanation>\n\n"
        f"    [{SIGNIFICANT}]:\n{fmt}\n\n    [{INSIGNIFICANT}]:\n{fmt}\n\n"
        f"    [{MATCHED}]:\n    <The number of matched findings>. <Finding 1>; <Finding 2>; ...; <Finding n>\n    ```\n")


_SECTION = re.compile(r"\[\s*(Explanation|Clinically Significant Errors|Clinically Insignificant Errors|"
                      r"Matched Findings)\s*\]\s*:?", re.I)


def _sections(text: str) -> dict[str, str]:
    marks = list(_SECTION.finditer(text))
    return {m.group(1).lower(): text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))]
            for i, m in enumerate(marks)}


def _error_counts(section: str) -> list[int]:
    counts = [0] * 6
    for m in re.finditer(r"\(([a-f])\)[^:\n]*:\s*(\d+)", section, re.I):
        counts[ord(m.group(1).lower()) - 97] = int(m.group(2))
    return counts


def parse_green(text: str) -> dict:
    """Counts from one judge output: {'significant': [6], 'insignificant': [6], 'matched': int|None, 'parsed'}."""
    sections = _sections(text or "")
    parsed = SIGNIFICANT.lower() in sections or MATCHED.lower() in sections
    matched = None
    if MATCHED.lower() in sections:
        m = re.search(r"\d+", sections[MATCHED.lower()])
        matched = int(m.group(0)) if m else 0
    return {"significant": _error_counts(sections.get(SIGNIFICANT.lower(), "")),
            "insignificant": _error_counts(sections.get(INSIGNIFICANT.lower(), "")),
            "matched": matched, "parsed": parsed}


def green_score(counts: dict) -> float | None:
    if not counts["parsed"]:
        return None
    matched = counts["matched"] or 0
    if matched == 0:
        return 0.0
    return matched / (matched + sum(counts["significant"]))


class GreenJudge:
    def __init__(self, model_path: str | Path, batch_size: int = 8, max_length: int = 2048,
                 max_new_tokens: int = 512, device: str | None = None, journal: str | Path | None = None):
        """journal: a JSONL file where every judgment is appended as soon as its batch finishes, keyed by the
        judge, its settings and the prompt: a preempted eval resumes there, and a pair already judged (a
        repeated prediction, a rerun) is not judged again."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"eval.green.model_path={path} holds no model. On a machine with internet: huggingface-cli "
                "download StanfordAIMI/GREEN-radllama2-7b --local-dir DIR (~13.5 GB; GREEN-RadPhi2 is smaller), "
                "copy DIR here and pass eval.green.model_path=DIR")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.batch_size, self.max_length, self.max_new_tokens = batch_size, max_length, max_new_tokens
        self.identity = json.dumps([str(path.resolve()), max_length, max_new_tokens])
        self.journal = Path(journal) if journal else None

    def render(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"from": "human", "value": prompt}], tokenize=False,
                                                  add_generation_prompt=True, chat_template=GREEN_CHAT_TEMPLATE)

    def key(self, text: str) -> str:
        return hashlib.sha256((self.identity + "\n" + text).encode()).hexdigest()

    def judge(self, references: list[str], candidates: list[str]) -> list[str]:
        import contextlib

        import torch
        from tqdm.auto import tqdm

        texts = [self.render(make_prompt(r, c)) for r, c in zip(references, candidates)]
        keys = [self.key(t) for t in texts]
        judged = {k: row["judge_output"] for k, row in read_journal(self.journal, "key").items()} \
            if self.journal else {}
        todo = [(key, text) for key, text in dict(zip(keys, texts)).items() if key not in judged]
        # similar lengths share a batch (less padding); a too-large batch fails first
        todo.sort(key=lambda item: len(item[1]), reverse=True)
        if judged and todo:
            log.info("GREEN judge: %d judgments reused from %s, %d to go", len(set(keys)) - len(todo),
                     self.journal, len(todo))
        if self.journal:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        with (open(self.journal, "a", encoding="utf-8") if self.journal else contextlib.nullcontext()) as f:
            for start in tqdm(range(0, len(todo), self.batch_size), desc="GREEN judge", unit="batch",
                              disable=len(todo) <= self.batch_size):
                batch_keys, batch = zip(*todo[start:start + self.batch_size])
                enc = self.tokenizer(list(batch), return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False)
                enc = {k: v.to(self.device) for k, v in enc.items() if k != "token_type_ids"}
                with torch.inference_mode():
                    out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=self.tokenizer.pad_token_id)
                outputs = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for key, output in zip(batch_keys, outputs):
                    judged[key] = output
                    if f:
                        f.write(json.dumps({"key": key, "judge_output": output}, ensure_ascii=False) + "\n")
                if f:
                    f.flush()
        return [judged[k] for k in keys]

    def score(self, references: list[str], candidates: list[str]) -> tuple[dict, list[dict]]:
        outputs = self.judge(references, candidates)
        per_sample = []
        for ref, cand, text in zip(references, candidates, outputs):
            counts = parse_green(text)
            per_sample.append({"reference": ref, "candidate": cand, "judge_output": text, **counts,
                               "green": green_score(counts)})
        scored = [s["green"] for s in per_sample if s["green"] is not None]
        summary = {"green": sum(scored) / len(scored) if scored else None, "green_n": len(scored),
                   "green_unparsed": len(per_sample) - len(scored)}
        return summary, per_sample
