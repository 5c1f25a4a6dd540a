"""A small synthetic dataset in the real FLARE Task 5 X-ray layout (README: Data layout), generated from a seed.

It exercises everything prepare must handle: all five X-ray datasets with their raw TaskType strings,
list-valued ImageName (two IU_XRay views, given lateral-first for some records), both IU_XRay file-name
conventions (``_questions_train.json`` and ``_all_val.json``), the seed's ``val/`` prefix, a nested zip,
the comma-containing periapical label, numeric answers, option letters past F, and a test split without
answers.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CHEST_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "No Finding"]
PERIAPICAL_LABELS = ["Caries", "Periapical Lesion", "Impacted Tooth",
                     "Endodontic Treatment, Restorative Treatment, and Complications"]
DENTAL_OPTIONS = ["Normal", "Caries", "Deep caries", "Periapical lesion", "Impacted tooth", "Crown",
                  "Filling", "Implant", "Root canal", "Bridge", "Missing tooth"]  # A..K
IU_SECTIONS = {
    "cardiac": ("Describe the cardiac findings in this chest X-ray.",
                ["The heart size is normal.", "Mild cardiomegaly.", "The cardiomediastinal silhouette is normal."]),
    "lungs": ("Describe the findings in the lungs.",
              ["The lungs are clear.", "No pneumothorax or pleural effusion.",
               "Right lower lobe opacity concerning for pneumonia."]),
    "mediastinum": ("Describe the mediastinum.",
                    ["The mediastinum is unremarkable.", "Normal mediastinal contours."]),
    "bones": ("Describe the bones.",
              ["Degenerative changes of the thoracic spine.", "No acute bony abnormality."]),
}
# (folder, images dir, question-file suffix) per FLARE split.
SPLITS = {
    "training": ("training", "imagesTr", "questions_train"),
    "validation-public": ("val/validation-public", "imagesVal", "questions_val"),
    "validation-hidden": ("validation-hidden", "imagesVal", "questions_val_withGT"),
    "testing": ("testing", "imagesTs", "questions_test"),
}
SPLIT_DATASETS = {
    "training": ["IU_XRay", "chestdr", "dental", "periapical", "boneresorption"],
    "validation-public": ["IU_XRay", "chestdr"],
    "validation-hidden": ["dental", "periapical", "boneresorption"],
    "testing": ["IU_XRay", "chestdr", "dental", "periapical", "boneresorption"],
}


def _png(rng: np.random.Generator, size: int, level: float) -> bytes:
    # Smooth noise whose brightness carries `level`, so images differ in a way a model could pick up.
    base = rng.normal(level * 255, 40, size=(size // 8, size // 8)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _records(dataset: str, split: str, n: int, rng: random.Random, np_rng, size: int, files: dict):
    folder, images_dir, _ = SPLITS[split]
    offset = {"training": 1000, "validation-public": 5000, "validation-hidden": 7000, "testing": 9000}[split]
    out = []
    for i in range(n):
        sid = offset + i
        level = rng.random()
        if dataset == "IU_XRay":
            views = [f"{images_dir}/CXR{sid}_IM-{sid}-0.png", f"{images_dir}/CXR{sid}_IM-{sid}-1.png"]
            for v in views:
                files[f"{dataset}/{v}"] = _png(np_rng, size, level)
            for section, (question, answers) in IU_SECTIONS.items():
                image_name = views if (i + len(section)) % 3 else list(reversed(views))
                out.append(("Report_Generation", image_name, question, rng.choice(answers)))
            continue
        name = f"{images_dir}/{dataset}_{sid:05d}.png"
        files[f"{dataset}/{name}"] = _png(np_rng, size, level)
        if dataset == "chestdr":
            labels = rng.sample(CHEST_LABELS[:-1], rng.randint(1, 3)) if level > 0.2 else ["No Finding"]
            q = "Which findings are present in this chest X-ray? Options: " + ", ".join(CHEST_LABELS) + "."
            out.append(("Multi-label Classification", name, q, ", ".join(labels)))
        elif dataset == "periapical":
            labels = rng.sample(PERIAPICAL_LABELS, rng.randint(1, 2))
            q = "Which conditions are visible in this periapical radiograph? Options: " + "; ".join(
                PERIAPICAL_LABELS) + "."
            out.append(("Multi-label Classification", name, q, ";".join(labels)))
        elif dataset == "dental":
            letters = "ABCDEFGHIJK"
            options = " ".join(f"{letters[k]}. {o}" for k, o in enumerate(DENTAL_OPTIONS))
            q = f"Which option best describes this dental radiograph? {options} Answer with the option letter."
            out.append(("Classification", name, q, letters[int(level * 10.99)]))
        elif dataset == "boneresorption":
            q = "What is the alveolar bone resorption percentage shown in this radiograph?"
            out.append(("regression", name, q, f"{10 + 60 * level:.1f}"))
    return [{"TaskType": t, "Modality": "Xray", "ImageName": img, "Question": q,
             **({} if split == "testing" else {"Answer": a}), "Split": split.split("-")[0]}
            for t, img, q, a in out]


def generate_demo(root: str | Path, seed: int = 0, train_per_dataset: int = 8, val_per_dataset: int = 4,
                  test_per_dataset: int = 2, image_size: int = 96) -> Path:
    """Write the demo tree to ``root`` (atomically: a crash leaves no half tree) and return it."""
    root = Path(root)
    if (root / ".flare_exp_demo").exists():
        return root
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    counts = {"training": train_per_dataset, "validation-public": val_per_dataset,
              "validation-hidden": val_per_dataset, "testing": test_per_dataset}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        for split, datasets in SPLIT_DATASETS.items():
            folder, _, suffix = SPLITS[split]
            for dataset in datasets:
                files: dict[str, bytes] = {}
                records = _records(dataset, split, counts[split], rng, np_rng, image_size, files)
                qname = f"{dataset}_{suffix}.json"
                if dataset == "IU_XRay" and split == "validation-public":
                    qname = "IU_XRay_all_val.json"  # the other IU_XRay naming convention
                files[f"{dataset}/{qname}"] = json.dumps(records, indent=1).encode()
                xray = tmp / folder / "Xray"
                if dataset == "periapical" and split == "training":
                    # Shipped as a zip, as in the real download: prepare unzips it in place.
                    xray.mkdir(parents=True, exist_ok=True)
                    with zipfile.ZipFile(xray / "periapical.zip", "w") as zf:
                        for rel, data in sorted(files.items()):
                            # A fixed timestamp keeps the zip byte-identical for a given seed.
                            zf.writestr(zipfile.ZipInfo(rel, date_time=(2025, 1, 1, 0, 0, 0)), data)
                    continue
                for rel, data in files.items():
                    (xray / rel).parent.mkdir(parents=True, exist_ok=True)
                    (xray / rel).write_bytes(data)
        (tmp / ".flare_exp_demo").write_text(json.dumps({"seed": seed}))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
