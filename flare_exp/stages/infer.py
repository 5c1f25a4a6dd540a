"""infer stage: predictions for a prepared split, an Excel sheet for reading them, and (test split) a FLARE
submission.

Fixes the original scripts' make_val_sheet.py: the prompt carries the generation prompt (theirs did not, so
the base model continued the user's text and fine-tuned outputs began with "assistant"), every view of a
sample goes in, only the new tokens are decoded, and generation is batched (length-sorted, left-padded). Predictions are
appended to predictions.jsonl batch by batch, so a preempted job resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from flare_exp.card import sized_infer_batch
from flare_exp.compile_cache import prepare_gpu_run
from flare_exp.data.decoding import check_records_window
from flare_exp.data.prepared_split import read_prepared_split
from flare_exp.data.rejects import SplitCheck, describe_rejected, rejected_questions, what_the_split_lacks
from flare_exp.data.vision import VisionChat
from flare_exp.io import atomic_dir, write_json, write_jsonl
from flare_exp.models.batch_decoding import (Decoder, check_inputs_ahead, decode_in_parts, decode_settings,
                                             image_device, inputs_ahead)
from flare_exp.models.image_reading import batches_with_images, image_threads
from flare_exp.models.checkpoints import adapter_identity, checkpoint_label, resolve_adapter
from flare_exp.models.grouped_attention import attention_used
from flare_exp.models.loading import load_model
from flare_exp.reports.sheets import write_sheet
from flare_exp.run.layout import FOREIGN_PREDICTIONS, PREDICTIONS, SPARE_PREDICTIONS, summary_name
from flare_exp.run.layout import RANK_PREDICTIONS as RANK_JOURNAL
from flare_exp.run.lock import check_still_held
from flare_exp.run.stage import Stage, infer_input_file
from flare_exp.runtime import abspath, barrier, check_choice, ranks
from flare_exp.stages.infer_resume import prediction_row, usable_predictions


STAGE = Stage(
    name="infer",
    help="predictions + an Excel sheet, or a FLARE submission (infer.split=test)",
    reads=("infer.input_file", "infer.checkpoint"),
    defaults={"infer.input_file": "{data.prepared_dir}/{infer.split}.jsonl"},
    deciding=("data.root", "model", "infer"),
    free=(
        "model speed", "infer.batch_size", "infer.num_samples", "infer.sort_by_length", "infer.bucket_by_task",
        "infer.cache_implementation", "infer.decode_loop", "infer.merge_adapter", "infer.image_device",
        "infer.inputs_ahead", "infer.image_threads", "infer.keep_long_cache", "infer.profile_batch"),
    budget=("infer.num_samples",),
    fingerprinted=("infer.input_file",),
    starts_from="infer.checkpoint",
    resumable=("predictions.jsonl", "predictions.rank*.jsonl", "predictions.beyond_num_samples.jsonl"),
    ranks="several",
    loads_model=True,
    feeds_from={"infer.checkpoint": ("rl", "sft")},
    pipeline_step=True,
    reads_doc="`infer.checkpoint` (none = base model; a run, pipeline or adapter dir), `infer.split`",
    writes_doc=("`predictions.jsonl`, `predictions.xlsx`, `submission/` (test split: `predictions.json` to upload, "
                "and per dataset; `submission_subset/` when `infer.num_samples`, prepare's rejects or a dataset the "
                "split lacks leave questions out; whole or absent), `infer_summary.json`"),
)

log = logging.getLogger(__name__)


def timed_batch(decode: Decoder, records: list[dict], images, number: int, run_dir: Path) -> list[str]:
    """One batch decoded, timed (the decoded text waits for the GPU) and logged at debug level with the graph
    loop's KV cache length (the benchmark reads these records); infer.profile_batch profiles that batch."""
    from flare_exp.profiling import Profiled

    profile = Profiled() if decode.inf.profile_batch == number else None
    if profile:
        profile.start()
    t0 = time.perf_counter()
    texts = decode_in_parts(decode, records, images)
    seconds = time.perf_counter() - t0
    if profile:
        profile.stop(run_dir / "profile.txt", f"batch {number} ({len(records)} reports)")
    length = getattr(decode.decoding.loop, "cache_length", None)
    log.debug("batch %d: %d reports in %.3f s, graph loop KV cache %s", number, len(records), seconds, length,
              extra={"batch_seconds": seconds, "loop_cache_length": length})
    return texts


SUBMISSION_FILE = "predictions.json"  # every answer in one list: the file FLARE's evaluator reads


def submitted_record(row: dict) -> dict:
    """A test question's record as its question file gives it, with the model's Answer (the baselines' form;
    FLARE joins it to its ground truth on ImageName||Question). Rows prepared before the record was kept: its
    fields rebuilt."""
    if isinstance(row.get("question_record"), dict):
        return {**row["question_record"], "Answer": row["prediction"]}
    return {"TaskType": row["raw_task_type"], "Modality": row.get("modality", "Xray"), "ImageName": row["image_name"],
            "Question": row.get("raw_question", row["question"]), "Answer": row["prediction"], "Split": "test"}


def say_lacking(lacking: dict, folder: str) -> None:
    """The warning for a test submission that lacks whole datasets, by why (``what_the_split_lacks``)."""
    why = {"datasets_without_questions": "prepare read no question of theirs under the test split's FLARE folders "
                                         "(their files missing or empty), while other splits have them: put their "
                                         "testing/ question files in place",
           "datasets_left_out": "data.datasets left them out of prepare, while testing/ holds their question "
                                "files: prepare with every dataset FLARE scores"}
    for key, datasets in lacking.items():
        log.warning("infer: the test split has no question of %s (%s, then rerun stage=prepare and this infer, each "
                    "with overwrite=true): the files are in %s/, not submission/; FLARE scores every question an "
                    "upload lacks as wrong", ", ".join(datasets), why[key], folder)


def write_submission(out_dir: Path, rows: list[dict], questions: int, rejected: dict | None = None,
                     checked: SplitCheck | None = None) -> Path:
    """FLARE's format: the question records with Answer filled in, all in predictions.json (what FLARE's
    evaluator reads) and split by dataset (<dataset>_predictions.json); FLARE joins them to its ground truth on
    ImageName||Question. Written to submission/ when ``rows`` answer all ``questions`` of the
    split (those prepare rejected included: ``rejected``), the split lacks no dataset and is prepare's as written
    (``checked``: ``what_the_split_lacks``), else to submission_subset/ (a question missing from an upload scores
    as wrong), each reason said in the log."""
    lacking, unverified = checked or ({}, None)
    short = len(rows) < questions
    folder = out_dir / ("submission_subset" if short or lacking or unverified else "submission")
    if lacking:
        say_lacking(lacking, folder.name)
    if unverified:
        log.warning("infer: whether these %d test questions are all of the split's is not known: %s. The files are in "
                    "%s/, not submission/; for an upload, infer the test.jsonl prepare wrote (infer.split=test)",
                    len(rows), unverified, folder.name)
    if short:
        cut = questions - ((rejected or {}).get("count") or 0) - len(rows)  # the split's records not asked for
        reasons = [f"{describe_rejected(rejected, 'test')} have none: fix what each reject names (its image, or the "
                   "question record itself), then rerun stage=prepare and this infer, each with overwrite=true"
                   ] if rejected else []
        why = "; ".join(reasons + ([f"{cut} left out by infer.num_samples"] if cut > 0 else []))
        log.warning("infer: %d of the %d test questions answered (%s): the files are in %s/, not submission/; FLARE "
                    "scores every question an upload lacks as wrong", len(rows), questions, why, folder.name)
    rebuilt = sum(not isinstance(r.get("question_record"), dict) for r in rows)
    if rebuilt:
        log.warning("infer: %d of the %d test questions were prepared before prepare kept each question's record: "
                    "their submission records are rebuilt (Split 'test', Modality 'Xray'), not the question files' "
                    "own. Prepare again (stage=prepare overwrite=true) and rerun this infer for the records as given",
                    rebuilt, len(rows))
    by_dataset: dict[str, list] = {}
    for r in rows:
        by_dataset.setdefault(r["dataset"], []).append(submitted_record(r))
    import shutil

    # whole or not at all: a kill leaves no folder of some datasets (its tree is removed at the run's next start)
    with atomic_dir(folder, ".submission-") as tmp:
        write_json(tmp / SUBMISSION_FILE, [record for records in by_dataset.values() for record in records])
        for dataset, records in by_dataset.items():
            write_json(tmp / f"{dataset}_predictions.json", records)
    other = out_dir / ("submission_subset" if folder.name == "submission" else "submission")
    if other.is_dir():  # an earlier attempt's, of other predictions (infer.num_samples changed): not beside these
        shutil.rmtree(other)
        log.info("infer: %s/ of an earlier attempt removed: %s/ holds this run's answers", other.name, folder.name)
    return folder


def check_settings(cfg) -> None:
    decode_settings(cfg.infer, cfg.model.backend).check()
    check_inputs_ahead(cfg.infer.inputs_ahead)
    if not cfg.infer.input_file:  # else the split names no file
        check_choice("infer.split", cfg.infer.split, ("train", "val", "test"))


def predict(cfg, todo: list[dict], journal: Path, label: str, done: dict,
            adapter: dict | None) -> tuple[int, float, str | None]:
    """Generate predictions for ``todo``, appended to ``journal`` batch by batch, each row naming the adapter
    (path and sha256: ``used_adapter``) that made it; (generated, seconds, what decoded them: decode_loop,
    decode_attention and how the inputs were built)."""
    inf = cfg.infer
    loaded = load_model(cfg.model, init_from=inf.checkpoint, training=False, seed=cfg.seed,
                        merge_adapter=inf.merge_adapter)
    chat = VisionChat(loaded.processor, abspath(cfg.data.root), image_device(inf.image_device, loaded.model))
    decode = Decoder(loaded.model, chat, inf, cfg.model.backend)
    full_batches = len(todo) // inf.batch_size
    if decode.decoding.cache == "static":
        log.info("infer: %d reports, batch %d: static KV cache, decode step compiled by the first full batch%s",
                 len(todo), inf.batch_size, "" if full_batches >= 4 else
                 f" (only {full_batches} full batch(es): infer.cache_implementation=dynamic skips compiling, "
                 "which may finish sooner)")
    todo = decoding_order(todo, chat, inf)
    bar = tqdm(total=len(todo), desc=f"infer {label}", unit="report")
    generated, elapsed = 0, 0.0
    ahead = inputs_ahead(decode)
    with open(journal, "a", encoding="utf-8") as f, ahead or contextlib.nullcontext():
        start = time.perf_counter()  # reports/s over the whole loop: reading, processing, writing included
        batches = batches_with_images(chat, todo, inf.batch_size, ahead, image_threads(inf.image_threads))
        for number, (chunk, images) in enumerate(batches, 1):
            predicted = timed_batch(decode, chunk, images, number, journal.parent)
            check_still_held()  # stopped past the takeover wait: the journal is another's now
            for r, p in zip(chunk, predicted):
                row = prediction_row(r, p, label, adapter)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[r["id"]] = row
            f.flush()
            generated += len(chunk)
            elapsed = time.perf_counter() - start
            bar.update(len(chunk))
            bar.set_postfix(reports_per_s=f"{generated / max(elapsed, 1e-9):.2f}")
    bar.close()
    return generated, elapsed, {"decode_loop": decode.decoding.used,  # what ran
                                "decode_attention": attention_used(loaded.model),
                                "inputs": ahead.state() if ahead is not None else "in turn"}


# Task types by how long their answers run (a report, a list of labels, one label, a number): with
# infer.bucket_by_task the longest come first, and a task type not listed with the one-label answers.
ANSWER_LENGTH_RANK = {"report_generation": 3, "multi_label": 2, "classification": 1, "regression": 0}


def decoding_order(todo: list[dict], chat: VisionChat, inf) -> list[dict]:
    """The order the records are decoded in (predictions.jsonl keeps the input's order). infer.sort_by_length:
    longest prompt first, so similar lengths share a batch (less padding; the loop's cache shrinks as prompts
    do). infer.bucket_by_task: grouped by task type first, longest answers first, so a batch's rows end near
    the same token and the loop stops for the whole batch (it stops when every row has ended) instead of short
    answers idling while a report in their batch goes on."""
    prompt = (lambda r: chat.sequence_length(r, with_answer=False)) if inf.sort_by_length else (lambda r: 0)
    if inf.bucket_by_task:
        return sorted(todo, key=lambda r: (ANSWER_LENGTH_RANK.get(r.get("task_type"), 1), prompt(r)), reverse=True)
    return sorted(todo, key=prompt, reverse=True) if inf.sort_by_length else todo


def used_adapter(cfg) -> dict | None:
    """infer.checkpoint's adapter (a finished run's final adapter; checkpoints.resolve_adapter) by its real path
    (links followed: every spelling of one adapter gives one label, also across a resume) and sha256; None for
    the base model."""
    if not cfg.infer.checkpoint:
        return None
    return adapter_identity(resolve_adapter(abspath(cfg.infer.checkpoint)).resolve())


def run(cfg, out_dir: Path) -> dict:
    check_settings(cfg)
    prepare_gpu_run(cfg)
    cfg, batch_choice = sized_infer_batch(cfg)
    inf = cfg.infer
    source = abspath(infer_input_file(cfg))
    records = read_prepared_split(source)
    check_records_window(records, cfg.data.image_window, source)
    rejected = rejected_questions(source)  # the split's questions prepare left out: FLARE still scores them
    questions, by_id = len(records) + ((rejected or {}).get("count") or 0), {r["id"]: r for r in records}
    # the datasets prepare recorded the split as lacking, and whether the file read is prepare's split as written
    # (a prepared test.jsonl as infer.input_file is a test submission all the same; a copy or part is not known)
    checked = what_the_split_lacks(source, records)
    split_ids = set(by_id)
    if inf.num_samples and inf.num_samples > 0:
        records = records[:inf.num_samples]
    if not records:
        raise ValueError(f"{source}: no records to predict")
    adapter = used_adapter(cfg)
    label = inf.label or checkpoint_label(adapter["path"] if inf.checkpoint else None)  # what it names
    rank, world = ranks()
    done = usable_predictions(out_dir, by_id, adapter, writer=rank == 0)
    barrier()  # the set-aside rows written before any rank appends
    mine = records[rank::world]  # each rank its share; rank 0 merges them in input order below
    todo = [r for r in mine if r["id"] not in done]
    if done:
        log.info("resuming: %d of %d predictions already in %s", len(mine) - len(todo), len(mine), out_dir)
    journal = out_dir / (PREDICTIONS if world == 1 else RANK_JOURNAL.format(rank=rank))
    generated, elapsed, decoded_by = predict(cfg, todo, journal, label, done, adapter) if todo else (0, 0.0, None)
    if world > 1:
        import torch.distributed as dist

        counts = [None] * world
        dist.all_gather_object(counts, (generated, elapsed, decoded_by))
        dist.barrier()  # every rank's journal is complete
        if rank != 0:
            return {"rank": rank, "generated_now": generated}
        generated, elapsed = sum(c[0] for c in counts), max(c[1] for c in counts)
        decoded_by = next((c[2] for c in counts if c[2]), None)
        done = usable_predictions(out_dir, by_id, adapter, writer=False, quiet=True)  # every rank's rows
    return finish(cfg, out_dir, records, done, label, generated, elapsed, decoded_by, world, batch_choice, questions,
                  split_ids, rejected, adapter, checked)


def finish(cfg, out_dir: Path, records: list[dict], done: dict, label: str, generated: int, elapsed: float,
           decoded_by: dict | None, world: int, batch_choice: dict | None = None, questions: int = 0,
           split_ids: set | None = None, rejected: dict | None = None, adapter: dict | None = None,
           checked: SplitCheck | None = None) -> dict:
    """One predictions file in input order (the ranks' journals merged into it), the sheet, the summary.
    ``split_ids``: every record's id in the split (default: those asked for); ``rejected``: the split's questions
    prepare left out (data/rejects.py); ``adapter``: this run's (``used_adapter``, computed once per run);
    ``checked``: the datasets the split has no question of, and why it cannot be checked (``what_the_split_lacks``)."""
    inf, pred_path = cfg.infer, out_dir / PREDICTIONS
    missing = [r["id"] for r in records if r["id"] not in done]
    if missing:
        raise RuntimeError(f"infer: {len(missing)} records have no prediction after all ranks finished "
                           f"(first: {missing[0]}); rerun to complete them")
    rows = [done[r["id"]] for r in records]  # the input's order
    check_still_held()  # the files below are the run's record: not written into a dir that is another's now
    asked = {r["id"] for r in records}
    split_ids = asked if split_ids is None else split_ids
    foreign = [row for key, row in done.items() if key not in split_ids]
    if foreign:  # a row edited by hand, or another split's journal: no record of this split is answered by it
        write_jsonl(out_dir / FOREIGN_PREDICTIONS, foreign)
        log.warning("infer: %d prediction row(s) name an id in no record of this split (first: %s; edited by hand, "
                    "or another split's journal?): left out of %s, kept in %s", len(foreign), foreign[0].get("id"),
                    pred_path.name, FOREIGN_PREDICTIONS)
    spare = [row for key, row in done.items() if key not in asked and key in split_ids]
    if spare:  # an earlier attempt with a larger infer.num_samples: the file holds what the summary counts
        write_jsonl(out_dir / SPARE_PREDICTIONS, spare)  # kept for an attempt that asks for them again
        log.warning("infer: %d predictions of an earlier attempt are not among the %d records asked for "
                    "(infer.num_samples=%s): left out of %s, kept in %s", len(spare), len(rows), inf.num_samples,
                    pred_path.name, SPARE_PREDICTIONS)
    else:
        (out_dir / SPARE_PREDICTIONS).unlink(missing_ok=True)  # every one of them is in the predictions now
    write_jsonl(pred_path, rows)  # one row per record, in input order (the journals are in decoding order)
    for journal in out_dir.glob(RANK_JOURNAL.format(rank="*")):
        journal.unlink()  # merged above
    write_sheet(out_dir / "predictions.xlsx", rows, label, adapter=adapter)
    submission = (write_submission(out_dir, rows, questions, rejected, checked)
                  if all(r["answer"] is None for r in rows) else None)
    unknown = bool(rejected) and rejected["count"] is None  # rejects no split can be told of: maybe this one's
    if unknown:
        log.warning("infer: %s may have no prediction: the predictions cover %d questions, %s", describe_rejected(
            rejected, inf.split), len(rows), "and the submission may lack some" if submission else "maybe not all")
    elif rejected and not submission:
        log.warning("infer: %s have no prediction: the predictions cover %d of the split's %d questions",
                    describe_rejected(rejected, inf.split), len(rows), questions)
    summary = {"predictions": str(pred_path), "sheet": str(out_dir / "predictions.xlsx"), "label": label,
               "checkpoint": inf.checkpoint, "adapter": adapter, "split": split_of(rows, inf.split), "samples": len(rows),
               "generated_now": generated,
               "reports_per_second": round(generated / elapsed, 3) if elapsed else None,
               "batch_size": inf.batch_size, "batch_size_choice": batch_choice, "max_new_tokens": inf.max_new_tokens,
               **(decoded_by or {"decode_loop": None, "inputs": None}),  # none decoded now (all resumed)
               **({"decoded_by_note": f"decode_loop and inputs are this attempt's, which made {generated} of the "
                                      f"{len(rows)} predictions; an earlier attempt made the others"}
                  if decoded_by and generated < len(rows) else {}),
               # model.liger_kernel=true is in config.yaml; inference loads without them (models/loading.py)
               **({"liger_kernel": "off: training kernels"} if cfg.model.liger_kernel else {}),
               "rejected_at_prepare": (f"up to {rejected['at_most']}, split unknown" if unknown else
                                       rejected["count"] if rejected else 0),
               "world_size": world, **(submission_record(submission, unknown, len(rows) < questions, checked)
                                        if submission else {})}
    write_json(out_dir / summary_name("infer"), summary)
    return summary


def submission_record(submission: Path, unknown: bool, short: bool, checked: SplitCheck | None) -> dict:
    """infer_summary.json's part on the submission: complete (true), not (false: questions or datasets known to
    be missing) or null (not known: rejects of no known split, or a file not held against prepare's record)."""
    lacking, unverified = checked or ({}, None)
    complete = False if short or lacking else None if unknown or unverified else True
    return {"submission": str(submission), "submission_complete": complete, **lacking,
            **({"submission_unverified": unverified} if unverified else {})}


def split_of(rows: list[dict], configured: str) -> str:
    """The split the records name, where they all name one (an infer.input_file's too), else infer.split."""
    named = {r.get("split") for r in rows}
    return named.pop() if len(named) == 1 and isinstance(next(iter(named)), str) else configured
