"""GREEN (Ostmeier et al.) as the GREEN package computes it, which FLARE's evaluator calls for report generation.

An LLM judge (StanfordAIMI/GREEN-radllama2-7b, or another GREEN judge) compares each candidate report with its
reference and lists clinically significant errors (a)-(f), insignificant errors and matched findings.
score = matched / (matched + sum of the six significant error counts); 0 when matched is 0, and those zeros
(outputs the parser cannot read included) are in the mean.

The judge's input is the package's: its prompt (each report cut to 300 words), its chat template fed
``[human: prompt, gpt: ""]`` with the generation prompt (so the text ends with an empty assistant turn, then
``<|assistant|>``), the tokenizer loaded with ``add_eos_token=True`` and left padding, its default special
tokens (BOS, and EOS at the end), truncation to 2,048 tokens, fp16 weights, greedy decoding to a total length
of 2,048 tokens. The whole sequence is decoded and cleaned as the package cleans it.

Parsers (``eval.green.parser``):
- ``package`` (default): the package's rules. A section is ``[<name>]:`` up to a blank line or the end; one
  starting with "No" counts 0; matched findings are the number at the very start of the section followed by a
  period; significant errors are counted per ``(a) ``..``(f) `` line, or per ``(1) ``..``(6) `` line when there
  are no letter lines, the count being the number after ": " followed by a period.
- ``robust``: sections need not be separated by blank lines, counts need no trailing period, and an output
  with no recognisable section is reported as unparsed and left out of the mean (not the package's number).
"""
from __future__ import annotations

import re

SIGNIFICANT = "Clinically Significant Errors"
INSIGNIFICANT = "Clinically Insignificant Errors"
MATCHED = "Matched Findings"
ERROR_TYPES = ["False report of a finding in the candidate", "Missing a finding present in the reference",
               "Misidentification of a finding's anatomic location/position",
               "Misassessment of the severity of a finding",
               "Mentioning a comparison that isn't in the reference",
               "Omitting a comparison detailing a change from a prior study"]
CATEGORY_NAMES = [f"({chr(97 + i)}) {t}" for i, t in enumerate(ERROR_TYPES)]
PARSERS = ("package", "robust")
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


def clean_response(text: str) -> str:
    """The judgment out of the decoded sequence (prompt included), as the package cuts it: after the last
    ``<|assistant|>``, after the explanation heading, without ``</s>`` / ``<unk>``."""
    if "[Explanation]:" in text:
        if "<|assistant|>" in text:
            text = text.split("<|assistant|>")[-1]
        # the package tests for the prompt's own placeholder explanation here, and splits at the first heading
        # when it is there, at the last one otherwise
        text = text.split("[Explanation]:")[1 if "[Explanation]:\n    <Explanation>\n" in text else -1]
    if "<|assistant|>" in text:
        text = text.split("<|assistant|>")[-1]
    return text.replace("</s>", "").replace("<unk>", "")


# ---- the package's parser ----------------------------------------------------------------------------------

def _package_section(text: str, name: str) -> str | None:
    m = re.search(rf"\[{name}\]:\s*(.*?)(?:\n\s*\n|\Z)", text, re.DOTALL)
    return None if m is None else m.group(1)


def _package_errors(section: str | None) -> list[int]:
    counts = [0] * 6
    if section is None or section.startswith("No"):
        return counts
    lines = sorted(re.findall(r"\([a-f]\) .*", section))
    prefixes = [f"({chr(97 + i)}) " for i in range(6)]
    if not lines:
        lines = sorted(re.findall(r"\([1-6]\) .*", section))
        prefixes = [f"({i + 1}) " for i in range(6)]
    for position, prefix in enumerate(prefixes):
        for line in lines:  # the last line of a category that has a count wins, as in the package
            if line.startswith(prefix):
                found = re.findall(r"(?<=: )\b\d+\b(?=\.)", line)
                if found:
                    counts[position] = int(found[0])
    return counts


def _package_matched(section: str | None) -> int:
    if section is None or section.startswith("No"):
        return 0
    found = re.findall(r"^\b\d+\b(?=\.)", section)
    return int(found[0]) if found else 0


def parse_package(text: str) -> dict:
    text = text or ""
    return {"significant": _package_errors(_package_section(text, SIGNIFICANT)),
            "insignificant": _package_errors(_package_section(text, INSIGNIFICANT)),
            "matched": _package_matched(_package_section(text, MATCHED)), "parsed": True}


# ---- the robust parser (eval.green.parser=robust) ---------------------------------------------------------

_SECTION = re.compile(r"\[\s*(Explanation|Clinically Significant Errors|Clinically Insignificant Errors|"
                      r"Matched Findings)\s*\]\s*:?", re.I)


def _robust_sections(text: str) -> dict[str, str]:
    marks = list(_SECTION.finditer(text))
    return {m.group(1).lower(): text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))]
            for i, m in enumerate(marks)}


def _robust_errors(section: str) -> list[int]:
    counts = [0] * 6
    for m in re.finditer(r"\(([a-f])\)[^:\n]*:\s*(\d+)", section, re.I):
        counts[ord(m.group(1).lower()) - 97] = int(m.group(2))
    return counts


def parse_robust(text: str) -> dict:
    sections = _robust_sections(text or "")
    parsed = SIGNIFICANT.lower() in sections or MATCHED.lower() in sections
    matched = None
    if MATCHED.lower() in sections:
        m = re.search(r"\d+", sections[MATCHED.lower()])
        matched = int(m.group(0)) if m else 0
    return {"significant": _robust_errors(sections.get(SIGNIFICANT.lower(), "")),
            "insignificant": _robust_errors(sections.get(INSIGNIFICANT.lower(), "")),
            "matched": matched, "parsed": parsed}


def parse_green(text: str, parser: str = "package") -> dict:
    """Counts from one judge output: {'significant': [6], 'insignificant': [6], 'matched', 'parsed'}."""
    if parser not in PARSERS:
        raise ValueError(f"eval.green.parser={parser!r}: choose package or robust")
    return parse_package(text) if parser == "package" else parse_robust(text)


def green_score(counts: dict) -> float | None:
    """The pair's score; None only for an output the robust parser could not read."""
    if not counts["parsed"]:
        return None
    matched = counts["matched"] or 0
    if matched == 0:
        return 0.0
    return matched / (matched + sum(counts["significant"]))


def package_summary_fails(outputs: list[str]) -> bool:
    """Whether the package's summary, which its scoring call computes after the scores, raises on these
    judgments. Its representative-sentence step keys each judgment's significant errors by category name; a
    judgment whose significant-error section has no ``(a)``..``(f)`` line switches its category names to
    ``(1) ``..``(6) `` for every later judgment; a judgment with such a section adds only the names it has lines
    for (one without the section, or whose section starts with "No", adds them all). A name that no judgment
    added is then looked up and missing (a KeyError), and FLARE's evaluator reports no green_score."""
    names, seen = list(CATEGORY_NAMES), set()
    for text in outputs:
        section = _package_section(text or "", SIGNIFICANT)
        if section is None or section.startswith("No"):
            seen.update(names)
            continue
        lines = re.findall(r"\([a-f]\) .*", section)
        if not lines:
            lines = re.findall(r"\([1-6]\) .*", section)
            names = [f"({i + 1}) " for i in range(6)]
        seen.update(n for n in names if any(line.startswith(n) for line in lines))
    return any(n not in seen for n in names)


def official_green(predictions: list, per_sample: list[dict], max_length: int) -> dict:
    """FLARE's green_score for a group of reports: the package's mean, or None where the package gives FLARE
    no number (its evaluator catches the exception), with the reasons and how many reports cause each:
    a prediction that is not text (null, a number: the package's prompt splits it), a judge input of
    ``max_length`` tokens or more (the package's ``generate(max_length=...)`` then refuses the batch), and
    a summary that fails (``package_summary_fails``). ``per_sample``: the judge's rows (``judge_output``,
    ``judge_input_tokens``). The score is always the package parser's, whatever ``eval.green.parser`` is."""
    reasons = {}
    not_text = sum(not isinstance(p, str) for p in predictions)
    if not_text:
        reasons["prediction not text (null or a number)"] = not_text
    too_long = sum(s["judge_input_tokens"] >= max_length for s in per_sample)
    if too_long:
        reasons[f"judge input of {max_length} tokens or more"] = too_long
    outputs = [s["judge_output"] for s in per_sample]
    if package_summary_fails(outputs):
        reasons["the package's summary fails (a category name no judgment gives)"] = len(outputs)
    # judged beside such an input in the package's batches (eval.green.exact=true): no room left for them either
    starved = sum(s["judge_output"] == "" and s["judge_input_tokens"] < max_length for s in per_sample)
    if reasons:
        return {"green_score": None, "green_score_none": reasons,
                "note": "FLARE's evaluator gets no GREEN number here (the package raises): " +
                        "; ".join(f"{why}: {n}" for why, n in reasons.items()) +
                        ". Our green_score (report_generation's own fields) scores them anyway"
                        + (" (an input that fills the judge's length leaves no room for a judgment: 0" +
                           (f"; {starved} report(s) judged in a batch beside one got no room either and score 0 "
                            "(the package's batches, eval.green.exact=true): our green_score is lower than their "
                            "own judgments would make it)" if starved else
                            "; the reports beside it are judged in their own room)") if too_long else "") + "."}
    scores = [green_score(parse_package(text)) for text in outputs]
    return {"green_score": sum(scores) / len(scores) if scores else None}


def summarise(per_sample: list[dict]) -> dict:
    """The mean and (population) standard deviation of the scores as the package computes them, and per
    error category the share of pairs without such an error (the category's "accuracy" as the package means
    it; computed as intended, which the package does not do once a judgment's significant-error section
    has no "(a)".."(f)" lines); plus the mean counts."""
    import numpy as np

    scored = [s for s in per_sample if s["green"] is not None]
    scores = np.array([s["green"] for s in scored], dtype=float)
    out = {"green_score": float(scores.mean()) if len(scores) else None,
           "green_std": float(scores.std()) if len(scores) else None, "green_n": len(scored)}
    if len(scored) < len(per_sample):
        out["green_unparsed"] = len(per_sample) - len(scored)
    if scored:
        counts = np.array([s["significant"] for s in scored], dtype=float)
        out["green_error_free_share"] = {name: float((counts[:, i] == 0).mean())
                                         for i, name in enumerate(CATEGORY_NAMES)}
        out["green_significant_errors_mean"] = {name: float(counts[:, i].mean())
                                                for i, name in enumerate(CATEGORY_NAMES)}
        out["green_matched_findings_mean"] = float(np.mean([s["matched"] or 0 for s in scored]))
    return out
