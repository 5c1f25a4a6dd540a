"""Build a tiny random RadGraph model in radgraph 0.1.18's on-disk layout, offline, in seconds.

``<model_dir>/<model_type>/{config.json, vocabulary/, weights.th}`` plus a tiny local BERT encoder that
config.json names by path, exactly how a real download is laid out once its encoder is made local. The
radgraph package then loads and runs it through its real code path (DyGIE + allennlp reader), so the reward
and eval code can be tested without the 420 MB weights. Its annotations are random, but deterministic.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

NER_LABELS = ["Anatomy::definitely present", "Observation::definitely present",
              "Observation::definitely absent", "Observation::uncertain"]
RELATION_LABELS = ["modify", "located_at", "suggestive_of"]
_WORDS = ("no acute cardiopulmonary abnormality the heart size is normal lungs are clear pleural effusion "
          "pneumothorax mediastinum unremarkable degenerative changes of thoracic spine mild cardiomegaly right "
          "lower lobe opacity concerning for pneumonia bones contours . , ; 0 1 2 3 4 5 6 7 8 9").split()


# "tiny" for tests and the demo; "base" has radgraph-xl's shapes (a BERT-base encoder, spans up to 8 words) for
# measuring scoring speed (bench/run.py reward).
SIZES = {"tiny": dict(bert=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128), max_length=128, feature_size=8, max_span_width=3,
                      feedforward=dict(num_layers=1, hidden_dims=16)),
         "base": dict(bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                max_position_embeddings=512), max_length=512, feature_size=20, max_span_width=8,
                      feedforward=dict(num_layers=2, hidden_dims=150))}


def _build_bert(out: Path, size: str = "tiny") -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(_WORDS)) + [
        f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(out)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), **SIZES[size]["bert"])
    BertModel(config).save_pretrained(out)


def build_tiny_radgraph(model_dir: str | Path, model_type: str = "radgraph-xl", seed: int = 0,
                        size: str = "tiny") -> Path:
    """Write the random model under ``model_dir/model_type`` (atomically) and return ``model_dir``."""
    import torch

    model_dir = Path(model_dir)
    target = model_dir / model_type
    if (target / "weights.th").exists():
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".radgraph-", dir=model_dir))
    try:
        bert = model_dir / f"{size}-bert"
        if not (bert / "config.json").exists():
            _build_bert(tmp / "bert", size)
            shutil.rmtree(bert, ignore_errors=True)
            (tmp / "bert").rename(bert)
        vocab_dir = tmp / "vocabulary"
        vocab_dir.mkdir()
        (vocab_dir / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
        (vocab_dir / f"{model_type}__ner_labels.txt").write_text("\n".join(["", *NER_LABELS]) + "\n")
        (vocab_dir / f"{model_type}__relation_labels.txt").write_text("\n".join(["", *RELATION_LABELS]) + "\n")
        shape = SIZES[size]
        bert_ref = {"model_name": str(bert.resolve()), "max_length": shape["max_length"]}
        config = {
            "dataset_reader": {"max_span_width": shape["max_span_width"], "token_indexers": {"bert": dict(bert_ref)}},
            "model": {
                "type": "dygie", "embedder": {"token_embedders": {"bert": dict(bert_ref)}},
                "initializer": {}, "module_initializer": {},
                "feature_size": shape["feature_size"], "max_span_width": shape["max_span_width"],
                "target_task": "relation", "feedforward_params": {**shape["feedforward"], "dropout": 0.0},
                "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
                "modules": {
                    "ner": {}, "relation": {"spans_per_word": 0.5},
                    "coref": {"spans_per_word": 0.3, "max_antecedents": 10, "coref_prop": 0},
                    "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                               "loss_weights": {"trigger": 1.0, "arguments": 1.0}},
                },
            },
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        torch.manual_seed(seed)
        model = _instantiate(tmp, config)
        torch.save(model.state_dict(), tmp / "weights.th")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir


def _instantiate(model_path: Path, config: dict):
    """The model radgraph builds from this config (the same classes, so the saved keys match strictly)."""
    import copy

    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie

    vocab = Vocabulary.from_files(str(model_path / "vocabulary"), None, None)
    bert = config["model"]["embedder"]["token_embedders"]["bert"]
    embedder = text_field_embedders.BasicTextFieldEmbedder({"bert": token_embedders.PretrainedTransformerMismatchedEmbedder(
        model_name=bert["model_name"], max_length=bert["max_length"])})
    model_args = copy.deepcopy(config["model"])
    for name in ("type", "embedder", "initializer", "module_initializer"):
        model_args.pop(name)
    return dygie.DyGIE(vocab=vocab, embedder=embedder, **model_args)
