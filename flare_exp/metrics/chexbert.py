"""CheXbert 14-label clinical efficacy (the literature's "CE"), computed with the real CheXbert labeler.

The labeler (Smit et al. 2020): a BERT encoder, the [CLS] state, 13 heads of 4 classes (blank, positive,
negative, uncertain) and one head of 2 for "No Finding". Its weights (``chexbert.pth``) load from
``eval.chexbert.path``, the encoder's config and tokenizer from ``eval.chexbert.encoder_path``. Labels are
binarised (positive = 1; uncertain = 1 only with ``uncertain_as_positive``), then precision / recall / F1 are
reported micro, macro and example-based, each under its own name: they differ by ~0.2 and must not be mixed.
"""
from __future__ import annotations

from pathlib import Path

def build_labeler(encoder_path):
    import torch
    from transformers import BertConfig, BertModel

    class CheXbertLabeler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig.from_pretrained(encoder_path))
            hidden = self.bert.config.hidden_size
            self.dropout = torch.nn.Dropout(0.1)
            self.linear_heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 4) for _ in range(13)] +
                                                    [torch.nn.Linear(hidden, 2)])

        def forward(self, input_ids, attention_mask):
            cls = self.dropout(self.bert(input_ids=input_ids, attention_mask=attention_mask)[0][:, 0])
            return [head(cls) for head in self.linear_heads]

    return CheXbertLabeler()


class CheXbert:
    def __init__(self, path, encoder_path, batch_size: int = 16, device: str | None = None):
        import torch
        from transformers import AutoTokenizer

        path = Path(path) if path else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"eval.chexbert.path={path}: no chexbert.pth there. Download CheXbert's "
                                    "chexbert.pth (stanfordmlgroup/CheXbert, 1.31 GB) and pass its path")
        if not encoder_path or not (Path(encoder_path) / "config.json").exists():
            raise FileNotFoundError(f"eval.chexbert.encoder_path={encoder_path}: needs a local bert-base-uncased "
                                    "dir (config.json + tokenizer files)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        self.model = build_labeler(encoder_path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state_dict", state)
        # Saved from nn.DataParallel: keys start with "module.".
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
        self.model.to(self.device).eval()
        self.batch_size = batch_size

    def label(self, reports: list[str]) -> list[list[int]]:
        """Class per condition per report: 0 blank, 1 positive, 2 negative, 3 uncertain."""
        import torch

        out = []
        for start in range(0, len(reports), self.batch_size):
            chunk = [" ".join(str(r or "").split()) or "." for r in reports[start:start + self.batch_size]]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=512)
            with torch.inference_mode():
                logits = self.model(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            classes = torch.stack([l.argmax(dim=-1) for l in logits], dim=1)
            out += classes.tolist()
        return out


def binarise(labels: list[list[int]], uncertain_as_positive: bool) -> list[list[int]]:
    positive = {1, 3} if uncertain_as_positive else {1}
    return [[int(c in positive) for c in row] for row in labels]


def efficacy(pred: list[list[int]], gold: list[list[int]]) -> dict:
    """Precision / recall / F1 over binary label matrices: micro, macro (over conditions), example-based."""
    def prf(tp, fp, fn):
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    n_labels = len(gold[0]) if gold else 0
    counts = [[0, 0, 0] for _ in range(n_labels)]
    example = []
    for prow, grow in zip(pred, gold):
        tp = sum(p and g for p, g in zip(prow, grow))
        fp = sum(p and not g for p, g in zip(prow, grow))
        fn = sum(g and not p for p, g in zip(prow, grow))
        example.append(prf(tp, fp, fn) if (tp + fp + fn) else (1.0, 1.0, 1.0))
        for j, (p, g) in enumerate(zip(prow, grow)):
            counts[j][0] += p and g
            counts[j][1] += p and not g
            counts[j][2] += g and not p
    micro = prf(*(sum(c[i] for c in counts) for i in range(3)))
    per_label = [prf(*c) for c in counts]
    macro = tuple(sum(x[i] for x in per_label) / n_labels for i in range(3)) if n_labels else (0.0,) * 3
    ex = tuple(sum(x[i] for x in example) / len(example) for i in range(3)) if example else (0.0,) * 3
    out = {}
    for name, (p, r, f) in (("micro", micro), ("macro", macro), ("example", ex)):
        out.update({f"chexbert_precision_{name}": p, f"chexbert_recall_{name}": r, f"chexbert_f1_{name}": f})
    return out
