"""Two tokenizer methods radgraph 0.1.18 calls and transformers 5 removed, supplied at run time.

radgraph (unmaintained; its copy of allennlp reads the reports) calls ``encode_plus`` and
``build_inputs_with_special_tokens`` on the BERT tokenizer it loads; transformers 5 dropped both from its
tokenizers. The package is not changed or copied: the tokenizers it loads through its own
``cached_transformers.get_tokenizer`` get the two methods, written on transformers 5's public API, where they
lack them (a tokenizer that has them keeps its own). Same word pieces and special tokens as transformers 4.57's
methods: the parses are the same (tested against parses made on 4.57).
"""
from __future__ import annotations

import functools
import logging
import types

log = logging.getLogger(__name__)


def encode_plus(self, text, text_pair=None, **kwargs):
    """transformers 4's encode_plus: one text (or pair) encoded, as __call__ does for a single input."""
    return self(text, text_pair=text_pair, **kwargs)


def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
    """The ids with the tokenizer's special tokens around them ([CLS] a [SEP] (b [SEP]) for BERT), laid out as
    the tokenizer's own post-processor lays out a dummy text (pair)."""
    template = self("a", "b" if token_ids_1 is not None else None, add_special_tokens=True)
    segments, ids, placed = (token_ids_0, token_ids_1), [], set()
    for token_id, segment in zip(template["input_ids"], template.sequence_ids()):
        if segment is None:
            ids.append(token_id)
        elif segment not in placed:
            placed.add(segment)
            ids.extend(segments[segment])
    return ids


SUPPLIED = {"encode_plus": encode_plus, "build_inputs_with_special_tokens": build_inputs_with_special_tokens}


def with_radgraph_methods(tokenizer):
    """The tokenizer, with the methods radgraph calls bound on it where its class lacks them."""
    for name, method in SUPPLIED.items():
        if not hasattr(tokenizer, name):
            setattr(tokenizer, name, types.MethodType(method, tokenizer))
    return tokenizer


def supply_radgraph_tokenizer_methods() -> None:
    """Wrap radgraph's tokenizer loader so what it returns has the methods (idempotent)."""
    from radgraph.allennlp.common import cached_transformers

    load = cached_transformers.get_tokenizer
    if getattr(load, "supplies_radgraph_methods", False):
        return

    @functools.wraps(load)
    def get_tokenizer(model_name: str, **kwargs):
        return with_radgraph_methods(load(model_name, **kwargs))

    get_tokenizer.supplies_radgraph_methods = True
    cached_transformers.get_tokenizer = get_tokenizer
    missing = [name for name in SUPPLIED if not hasattr(cached_transformers.transformers.PreTrainedTokenizerBase, name)]
    if missing:
        log.debug("radgraph: supplying the tokenizer methods this transformers lacks: %s", ", ".join(missing))
