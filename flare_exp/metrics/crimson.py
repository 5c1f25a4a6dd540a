"""CRIMSON (Baharoon et al.), the second report judge of FLARE 2026's baseline evaluator, as the crimson-score
package (0.2.0) computes it: a judge (rajpurkarlab/medgemma-4b-it-crimson) lists the abnormal findings of the
reference and the candidate with a clinical significance each, matches them, and names false findings,
missing findings and attribute errors, as JSON; the score weighs them.

- The judge's input (``make_prompt``): the package's prompt in the form its MedGemma judge was trained on
  (without the significance examples and attribute guidelines it adds for other judges, and without patient
  context), as a user turn after the package's system turn, through the judge's chat template.
- The parser (``parse_judgment``): JSON as the package reads it, with its repairs tried in its order (curly
  quotes escaped, ``["":[`` and a key missing its opening quote mended first; then as it is, without
  orphan strings, with invalid backslash escapes doubled, with stray quotes inside strings escaped); the
  first of duplicate keys kept. An output none of them reads (or whose content the score cannot use) has no
  score, as in the package's batch call, and is left out of the mean and counted.
- The score (``crimson_score``): findings weigh 1 (urgent), 0.5 (actionable, not urgent), 0.25 (not
  actionable, not urgent; also any other or missing level), 0 (benign, expected); attribute errors 0.5
  (significant), 0 (negligible), 0.25 otherwise. A matched reference finding counts its weight, reduced by
  weight / (weight + its attribute errors' weights) when it has any; false findings weigh as the candidate's
  findings, missed ones as the reference's. S = (matched credit - false) / reference weight; with no
  reference weight: 1 without errors, else -(false + missed + 1). A negative S becomes -e / (1 + e) with
  e = false - matched credit when e > 0, else 0. Rounded to 4 decimals. Range (-1, 1].
"""
from __future__ import annotations

import json
import re

SYSTEM_TURN = "You are an expert radiology evaluator that assesses the accuracy of radiology reports."
SIGNIFICANCE_WEIGHTS = {"urgent": 1.0, "actionable_not_urgent": 0.5, "not_actionable_not_urgent": 0.25,
                        "benign_expected": 0.0}
SEVERITY_WEIGHTS = {"significant": 0.5, "negligible": 0.0}
OTHER_WEIGHT = 0.25  # a level or severity the table does not name
ATTRIBUTE_KINDS = ("location", "severity", "descriptor", "measurement", "certainty", "unspecific",
                   "overinterpretation", "temporal")

# ---- the prompt's parts (the judge's input, word for word; its doubled braces are in the text) -----------

OBJECTIVE = (
    'Objective:\n'
    '\n'
    'Evaluate the accuracy of predicted chest X-ray (CXR) findings compared to reference (ground truth) '
    'findings.\n'
    'Only evaluate positive findings, not normal findings. Focus on clinical accuracy.')

STEPS = (
    'Task:\n'
    'Perform this evaluation in TWO STEPS:\n'
    '\n'
    'STEP 1: Extract All Positive Findings\n'
    'For BOTH reference and predicted reports, identify each ABNORMAL/POSITIVE finding exactly as '
    'written, including all descriptors, locations, severity terms, and measurements. List each finding '
    'as it appears in the original text.\n'
    'If a single sentence contains multiple distinct findings, split them into separate entries (e.g., '
    '"bilateral pleural effusions and bibasilar atelectasis" should be two findings: "bilateral pleural '
    'effusions" and "bibasilar atelectasis").\n'
    'When splitting, carry over shared qualifiers (certainty terms like "suggestive of", "consistent '
    'with", "suspicious for", as well as shared descriptors like location or severity) to EACH resulting '
    'finding so no context is lost.\n'
    'For each finding (both reference and predicted), assign a clinical_significance level.\n'
    'Assign each reference finding a sequential ID starting with "R" (R1, R2, R3, ...) and each '
    'predicted finding a sequential ID starting with "P" (P1, P2, P3, ...).\n'
    '\n'
    'IMPORTANT: Include all abnormal findings in the reference_findings and predicted_findings lists '
    '(not just clinically significant ones). Do not include normal findings.\n'
    '\n'
    'STEP 2: Compare and Classify Errors\n'
    'Using the assigned IDs, match findings between reference and predicted, then identify errors in '
    'these 3 categories.')

SIGNIFICANCE_LEVELS = (
    'Clinical significance levels (used for findings):\n'
    '    - "urgent": Requires immediate action / life-threatening\n'
    '    - "actionable_not_urgent": Would change treatment plan but not immediately critical\n'
    '    - "not_actionable_not_urgent": Minor discrepancy with minimal clinical impact (but still worth '
    'noting)\n'
    '    - "benign_expected": Benign/expected finding with no clinical relevance (age-related changes)')

SIGNIFICANCE_USE = (
    'Apply these significance levels as follows:\n'
    "- reference_findings and predicted_findings: classify each FINDING's clinical significance\n"
    '- missing_findings (b) and false_findings (a): Do NOT include clinical_significance.\n'
    '  Their weights are derived automatically from reference_findings and predicted_findings '
    'respectively.')

SEVERITY_LEVELS = (
    'Attribute error severity (used ONLY for attribute_errors):\n'
    '    - "significant": The attribute difference affects treatment or could lead to mismanagement\n'
    '    - "negligible": The attribute difference is clinically insignificant and would not affect '
    'treatment')

ERROR_KINDS = (
    'Error categories:\n'
    '    a) False findings: Positive findings in predicted that are NOT present in reference\n'
    '    b) Missing findings: Positive findings in reference but MISSING from predicted\n'
    '    c) Attribute errors: Matched finding has incorrect or incomplete attributes including:\n'
    '        - Location/laterality: Errors in anatomical location or side specification (left vs right '
    'lung, different lobes). \n'
    '        - Severity/extent: Errors in the degree or size characterization of the finding (small vs '
    'large, mild vs severe, minimal vs moderate)\n'
    '        - Morphological descriptors: Errors in the shape, appearance, or characteristics of the '
    'finding (well-defined vs irregular margins, solid vs ground-glass density)\n'
    '        - Measurements: Errors in quantitative size specifications (3 cm vs 1.5 cm for lesions, '
    'nodule diameter discrepancies)\n'
    '        - Certainty: Errors in the confidence level of the finding (definite finding vs "possible" '
    'or "suspicious for")\n'
    '        - Unspecific: Predicted finding is too vague or non-specific compared to the reference '
    '(reference says "pneumothorax" but predicted says "lucency")\n'
    '        - Overinterpretation: Predicted finding makes an unsupported diagnostic leap beyond the '
    'imaging finding (reference says "opacity" but predicted says "mass")\n'
    '        - Temporal/comparison: Errors in temporal descriptors or comparison with prior studies '
    '(missing "new", "worsening", "resolved", "stable", "unchanged")')

MATCHING = (
    'Matching criteria:\n'
    '- A finding matches if the core finding is present in both (e.g., "pleural effusion", '
    '"pneumothorax")\n'
    '- A finding still matches even if location differs (location mismatch is an attribute error, not a '
    'match failure)\n'
    '- One reference finding CAN match multiple predicted findings (one-to-many). For example, if R1 is '
    '"bilateral pleural effusions" and the predicted report splits it into P1 "left pleural effusion" '
    'and P2 "right pleural effusion", then both {{R1, P1}} and {{R1, P2}} are valid matches.\n'
    '- For matched findings, check all attributes (location, severity, descriptors, measurements, '
    'certainty, unspecific, overinterpretation, temporal)\n'
    '- If any attributes differ, add separate entries to attribute_errors for each distinct issue, '
    'referencing both the reference ID (ref_id) and predicted ID (pred_id)\n'
    '- Any reference finding whose ID does not appear in matched_findings MUST be in missing_findings\n'
    '- Any predicted finding whose ID does not appear in matched_findings MUST be in false_findings')

ATTRIBUTE_ERRORS = (
    'For attribute_errors, also specify which error types apply from: ["location", "severity", '
    '"descriptor", "measurement", "certainty", "unspecific", "overinterpretation", "temporal"]\n'
    'For each attribute_error, provide the ref_id and pred_id of the matched pair, and a brief '
    '"explanation" describing what the discrepancy is.\n'
    '\n'
    'IMPORTANT: A matched finding pair can appear in attribute_errors MULTIPLE TIMES if it has multiple '
    'distinct issues.\n'
    'Each attribute error should be a separate entry with its own severity classification and '
    'explanation.\n'
    'For example, if a finding has both a location error and a severity error, create two separate '
    'entries with the same ref_id and pred_id.')

OUTPUT = (
    'Output Format:\n'
    'Return ONLY valid JSON (no markdown, no explanation) in this exact format:\n'
    '{{\n'
    '    "reference_findings": [\n'
    '        {{"id": "R1", "finding": "<finding text>", "clinical_significance": '
    '"urgent|actionable_not_urgent|not_actionable_not_urgent|benign_expected"}},\n'
    '        ...\n'
    '    ],\n'
    '    "predicted_findings": [\n'
    '        {{"id": "P1", "finding": "<finding text>", "clinical_significance": '
    '"urgent|actionable_not_urgent|not_actionable_not_urgent|benign_expected"}},\n'
    '        ...\n'
    '    ],\n'
    '    "matched_findings": [\n'
    '        {{"ref_id": "R1", "pred_id": "P1"}},\n'
    '        {{"ref_id": "R1", "pred_id": "P2"}},\n'
    '        ...\n'
    '    ],\n'
    '    "errors": {{\n'
    '        "false_findings": [\n'
    '            "P3",\n'
    '            ...\n'
    '        ],\n'
    '        "missing_findings": [\n'
    '            "R2",\n'
    '            ...\n'
    '        ],\n'
    '        "attribute_errors": [\n'
    '            {{"ref_id": "R1", "pred_id": "P1", "severity": "significant|negligible", "error_types": '
    '["location|severity|descriptor|measurement|certainty|unspecific|overinterpretation|temporal"], '
    '"explanation": "<brief description of the discrepancy>"}},\n'
    '            ...\n'
    '        ]\n'
    '    }}\n'
    '}}')

NOTES = (
    'IMPORTANT NOTES:\n'
    '- If a category has no items, use an empty array [].\n'
    '- A single reference finding ID (R1, R2, ...) may appear in multiple matched_findings pairs '
    '(one-to-many matching). Any reference ID that does not appear in ANY matched pair MUST be in '
    'missing_findings.\n'
    '- Every predicted finding ID (P1, P2, ...) must appear in EXACTLY ONE place: either in '
    'matched_findings or in false_findings.\n'
    '- A missing finding CANNOT also appear in attribute_errors. If a reference finding is completely '
    'absent from the predicted findings, its ID goes ONLY in missing_findings.\n'
    '- If a finding is classified as unspecific (in attribute_errors with "unspecific" error type), it '
    'is NOT a missing finding. Unspecific findings are PRESENT in the predicted report but too vague - '
    'they should appear in predicted_findings list and NOT in missing_findings.')


def make_prompt(reference, candidate) -> str:
    """The package's prompt for one pair (a list of findings is joined with spaces, as it does)."""
    joined = [" ".join(text) if isinstance(text, list) else text for text in (reference, candidate)]
    parts = [OBJECTIVE, f"Reference Findings (Ground Truth):\n{joined[0]}",
             f"Predicted Findings (Candidate):\n{joined[1]}", STEPS, SIGNIFICANCE_LEVELS, SIGNIFICANCE_USE,
             SEVERITY_LEVELS, ERROR_KINDS, MATCHING, ATTRIBUTE_ERRORS, OUTPUT, NOTES]
    return "\n\n".join(parts)


def messages(prompt: str) -> list[dict]:
    """The package's chat: its system turn, then the prompt."""
    return [{"role": "system", "content": SYSTEM_TURN}, {"role": "user", "content": prompt}]


# ---- the parser ---------------------------------------------------------------------------------------------

_HYBRID_ARRAY = re.compile(r'\[""\s*:\s*\[')
_KEY_WITHOUT_OPENING_QUOTE = re.compile(r'([\]}"0-9]\s*,\s*|{\s*)([a-zA-Z_][a-zA-Z0-9_]*")')
_ORPHAN_AFTER_COMMA = re.compile(r',\s*"[^"]*"\s*(?=\s*[,}])(?!\s*:)')
_ORPHAN_FIRST = re.compile(r'(?<=\{)\s*"[^"]*"\s*,\s*(?=")')
_BAD_ESCAPE = re.compile(r'\\(?!["\\/bfnrtu])')


def _first_key_wins(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _load(text: str):
    return json.loads(text, object_pairs_hook=_first_key_wins)


def _delimits(text: str, i: int) -> bool:
    """Whether the quote at ``i`` opens or closes a JSON key or value (else it is prose inside a string)."""
    before = text[i - 1] if i > 0 else ""
    after = text[i + 1] if i + 1 < len(text) else ""
    if before in (":", "[", "{") or after in (":", "]", "}"):
        return True
    if before == ",":
        ahead_of_comma = text[i - 2] if i >= 2 else ""
        return ahead_of_comma in ('"', "]", "}") or ahead_of_comma.isdigit()
    if after == ",":
        past_comma = text[i + 2] if i + 2 < len(text) else ""
        return past_comma in ('"', "[", "{") or past_comma.isdigit()
    return False


def _escape_stray_quotes(text: str, attempts: int = 50):
    """Loads ``text``, escaping one stray quote at a time just before where the decoder stops (up to 5
    characters back), until it loads; raises when no quote there can be escaped."""
    for _ in range(attempts):
        try:
            return _load(text)
        except json.JSONDecodeError as error:
            for i in range(error.pos, max(0, error.pos - 5) - 1, -1):
                if i < len(text) and text[i] == '"' and (i == 0 or text[i - 1] != "\\") and not _delimits(text, i):
                    text = text[:i] + '\\"' + text[i + 1:]
                    break
            else:
                raise
    raise json.JSONDecodeError("no more quotes to escape", text, 0)


def parse_judgment(response: str):
    """The judge's JSON, or None where the package's parser gives up."""
    text = (response or "").replace("\u201c", '\\"').replace("\u201d", '\\"')
    text = text.replace("\u2018", "\\'").replace("\u2019", "\\'")
    text = _KEY_WITHOUT_OPENING_QUOTE.sub(r'\1"\2', _HYBRID_ARRAY.sub("[", text))
    doubled = _BAD_ESCAPE.sub(r"\\\\", text)
    attempts = [lambda: _load(text), lambda: _load(_ORPHAN_FIRST.sub("", _ORPHAN_AFTER_COMMA.sub("", text))),
                lambda: _load(doubled), lambda: _escape_stray_quotes(text), lambda: _escape_stray_quotes(doubled)]
    for attempt in attempts:
        try:
            return attempt()
        except (json.JSONDecodeError, ValueError):
            continue
    return None


# ---- the score ----------------------------------------------------------------------------------------------

def _weights_by_id(findings: list) -> dict:
    return {f["id"]: SIGNIFICANCE_WEIGHTS.get(f.get("clinical_significance", ""), OTHER_WEIGHT) for f in findings}


def _matched_credit(matched: list, reference_weight: dict, attribute_errors: list) -> float:
    """Each matched reference finding once: its weight, scaled down by its attribute errors' weights."""
    errors_of: dict = {}
    for error in attribute_errors:
        errors_of.setdefault(error["ref_id"], []).append(error)
    credit, counted = 0.0, set()
    for match in matched:
        ref = match["ref_id"]
        if ref in counted:
            continue
        counted.add(ref)
        weight = reference_weight.get(ref, 0.0)
        penalty = sum(SEVERITY_WEIGHTS.get(e.get("severity", ""), OTHER_WEIGHT) for e in errors_of.get(ref, []))
        credit += weight if not errors_of.get(ref) else (weight * weight / (weight + penalty)
                                                         if weight + penalty > 0 else 0.0)
    return credit


def crimson_score(judgment) -> dict | None:
    """The pair's score and its parts from the judge's JSON; None where the package's scoring fails on it
    (not an object, an entry without the id it needs, ...)."""
    try:
        return _score(judgment)
    except (AttributeError, KeyError, TypeError):
        return None


def _score(judgment: dict) -> dict:
    errors = judgment.get("errors", {})
    references, candidates = judgment.get("reference_findings", []), judgment.get("predicted_findings", [])
    matched, attribute_errors = judgment.get("matched_findings", []), errors.get("attribute_errors", [])
    reference_weight, candidate_weight = _weights_by_id(references), _weights_by_id(candidates)
    false = sum(candidate_weight.get(i, 0.0) for i in errors.get("false_findings", []))
    missed = sum(reference_weight.get(i, 0.0) for i in errors.get("missing_findings", []))
    total = sum(SIGNIFICANCE_WEIGHTS.get(f.get("clinical_significance", ""), OTHER_WEIGHT) for f in references)
    if total == 0 and not references:
        total = len(matched) + missed
    credit = _matched_credit(matched, reference_weight, attribute_errors)
    if total == 0:
        s = 1.0 if false == 0 and missed == 0 else -(false + missed + 1)
    else:
        s = (credit - false) / total
    excess = false - credit
    score = s if s >= 0 else (-excess / (1 + excess) if excess > 0 else 0)
    counts = {"false_findings": len(errors.get("false_findings", [])),
              "missing_findings": len(errors.get("missing_findings", [])), "attribute_errors": len(attribute_errors),
              **{f"{kind}_errors": sum(kind in e.get("error_types", []) for e in attribute_errors)
                 for kind in ATTRIBUTE_KINDS}}
    return {"crimson": round(score, 4), "error_counts": counts, "reference_weight": total, "matched_credit": credit,
            "false_weight": false, "missed_weight": missed, "S": s}


def summarise(per_sample: list[dict]) -> dict:
    """The mean score over the scored pairs, how many the judge's output left unscored, the mean counts."""
    scored = [s for s in per_sample if s["crimson"] is not None]
    out = {"crimson_score": sum(s["crimson"] for s in scored) / len(scored) if scored else None,
           "crimson_n": len(scored)}
    if len(scored) < len(per_sample):
        out["crimson_unscored"] = len(per_sample) - len(scored)
    if scored:
        out["crimson_error_counts_mean"] = {k: sum(s["error_counts"][k] for s in scored) / len(scored)
                                            for k in scored[0]["error_counts"]}
    return out
