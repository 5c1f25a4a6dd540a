"""The schema's part for reading results (flare_exp/config.py): the eval stage's (the judges GREEN and CRIMSON, the
significance tests, CheXbert, the keyword metrics) and the views of finished runs (sweep_report, runs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from flare_exp.decode_config import DecodeLoopConfig


@dataclass
class KeywordMetricsConfig:
    # utils/metrics.py of a local checkout of medfm-flare/FLARE25-QWen2.5VL: its keyword heuristics are run
    # as they are and reported as keyword_green / keyword_clinical_efficacy (comparison with published numbers).
    module: Optional[str] = None


@dataclass
class GreenConfig(DecodeLoopConfig):
    model_path: Optional[str] = None
    # Prompts judged together (length-sorted). The package judges 8 at a time in input order. The batch is not
    # only speed: a batch shares one total length (max_length), so a judgment that reaches it is cut where its
    # batch-mates leave it, and fp16 near-ties can flip (docs/metrics.md). GREEN-radllama2-7b has no grouped-
    # query attention: its KV cache is 0.5 MiB per token, so a batch of 16 at the full 2,048 tokens is ~16 GiB
    # beside its 13.5 GiB of fp16 weights. auto: sized by the card's memory (flare_exp/card.py: 56 on an 80 GiB
    # card, 96 on an H200; 16 without a GPU); a number is used as it is.
    batch_size: Any = "auto"
    # The package's batching for FLARE's number: 8 at a time in input order, repeats judged again, generate
    # (unless decode_loop=graph), no max_new_tokens. Slower; every judgment as the package makes it.
    exact: bool = False
    # The package's total length (prompt + judgment) and its input truncation.
    max_length: int = 2048
    # A tighter cap on the judgment's tokens; null = the package's (max_length minus the prompt).
    max_new_tokens: Optional[int] = None
    dtype: str = "float16"  # the package's; bfloat16 | float32
    # The attention of its decode steps (as model.decode_attention): split_kv (GPU, Triton) reads each row's
    # cache in slices over many programs and skips padding; grouped and transformers are both transformers'
    # SDPA for this judge (no grouped heads); split_kv, the default, 1.03x the judgments/s of SDPA on an H200 and
    # 1.08-1.10x on an H100 (docs/performance.md; off a GPU it is SDPA). eval.green.exact=true keeps
    # transformers'.
    decode_attention: str = "split_kv"
    # With decode_attention=split_kv: the prompts' common beginning (GREEN's instructions, ~250 of ~800 tokens)
    # is read once per block of rows at each decode step instead of once per row (float32 judgments equal).
    # Off: 1.015x the judgments/s of split_kv alone on an H100, within the runs' spread (docs/performance.md).
    shared_prefix: bool = False
    # decode_loop (flare_exp/decode_config.py): auto takes the graph loop on a GPU, generate on the CPU.
    # package: the GREEN package's parser (its numbers); robust: also reads counts without a trailing period
    # or sections without blank lines, and leaves unreadable outputs out of the mean (not the package's number).
    parser: str = "package"


@dataclass
class CrimsonConfig(DecodeLoopConfig):
    # CRIMSON's judge (rajpurkarlab/medgemma-4b-it-crimson, downloaded): null = CRIMSON not computed.
    model_path: Optional[str] = None
    # Reports judged together (length-sorted, left-padded); 1 is the package's way (its pipeline, one at a time).
    batch_size: int = 8
    # A tighter cap on a judgment's tokens; null = the package's (the judge's generation_config.json, else 8192).
    max_new_tokens: Optional[int] = None
    dtype: str = "bfloat16"  # the package's; float16 | float32
    # decode_loop (flare_exp/decode_config.py): not MedGemma's (sliding-window layers): graph is an error there.


@dataclass
class SignificanceConfig:
    # Comparison mode (several predictions files): paired bootstrap intervals and a paired permutation test
    # per official metric for every pair of runs, on the samples they share. 0 turns it off.
    resamples: int = 1000
    seed: int = 0
    # Paired approximate randomization (the test RadEval reports) beside the permutation test: its trials;
    # 0 turns it off.
    ar_trials: int = 10000
    # The correction across the family of tests in one report (every pair of runs x official metric):
    # holm (family-wise error rate), bh (Benjamini-Hochberg, false discovery rate) or none. Raw and adjusted
    # p-values are both reported.
    correction: str = "holm"


@dataclass
class CheXbertConfig:
    # chexbert.pth (stanfordmlgroup/CheXbert, 1.31 GB) and a local bert-base-uncased dir (config + tokenizer).
    path: Optional[str] = None
    encoder_path: Optional[str] = None
    # Uncertain (class 3) counted as positive (true) or negative (false): it changes results, so it is named.
    uncertain_as_positive: bool = True
    batch_size: int = 16


@dataclass
class EvalConfig:
    # One predictions.jsonl, or several (comparison mode), or run dirs holding one.
    predictions: List[str] = field(default_factory=list)
    green: GreenConfig = field(default_factory=GreenConfig)
    crimson: CrimsonConfig = field(default_factory=CrimsonConfig)
    significance: SignificanceConfig = field(default_factory=SignificanceConfig)
    radgraph: bool = True
    chexbert: CheXbertConfig = field(default_factory=CheXbertConfig)
    keyword_metrics: KeywordMetricsConfig = field(default_factory=KeywordMetricsConfig)
    # Score an unfinished infer run (no DONE marker) as it stands; the report then says "partial: n of N".
    allow_partial: bool = False


@dataclass
class SweepReportConfig:
    sweep_dir: Optional[str] = None
    # The column the jobs are ranked by (best first), e.g. official/report_generation/green_score or
    # reward_last; null: the first official eval metric when the sweep ran eval, else reward_last. Errors
    # (mean_absolute_error, *loss) rank lowest first.
    rank_by: Optional[str] = None


@dataclass
class RunsConfig:
    # stage=runs: these runs (as the listing names them: a run name, sweeps/<sweep>/<job>) compared side by side
    compare: Optional[List[str]] = None
