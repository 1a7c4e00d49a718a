"""The data engine, top to bottom: datasets → samples → encoded examples → mixed → split → packed → cached.

`prepare_data` is what `peftkit train` and `peftkit data` call; everything it does is counted
in a DataReport, written to data_report.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from peftkit.config.load import dataset_specs
from peftkit.config.schema import DataArgs, DatasetSpec
from peftkit.constants import IGNORE_INDEX
from peftkit.data import cache
from peftkit.data.encode import Encoding, class_names
from peftkit.data.formats import (
    FORMATS,
    Message,
    Sample,
    Where,
    rename_columns,
    sft_messages,
    with_system,
)
from peftkit.data.labels import TOO_SHORT, Encoded
from peftkit.data.packing import pack_examples, pack_stream
from peftkit.data.report import (
    DataReport,
    DatasetCounts,
    Drops,
    bad_record_reason,
    describe_example,
    percentiles,
)
from peftkit.data.sources import iter_records
from peftkit.data.template import stop_token_ids
from peftkit.errors import ConfigError, DataError
from peftkit.model.heads import head_of
from peftkit.model.loading import has_images

logger = logging.getLogger("peftkit")
_CHUNK = 1000  # samples tokenized per call


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset or IterableDataset of input_ids / labels (/ position_ids when packed)
    eval: Any | None
    report: DataReport
    processor: Any = None  # an image-text model's processor: batches read the examples' `images` through it


def iter_samples(spec: DatasetSpec, args: DataArgs, drops: Drops | None = None) -> Iterator[tuple[Sample, tuple[str, str]]]:
    """(sample, (file, location)) for the first max_samples records of a dataset.

    A bad record raises its DataError, or with `drops` given (on_bad_record: skip) is counted there.
    """
    convert = FORMATS[spec.format or args.format]
    empty: list[str] = []  # records whose answer is empty: kept (they teach stopping at once), but said
    for n, (file, location, record) in enumerate(iter_records(spec.path, args.txt_document, spec.split)):
        if spec.max_samples and n >= spec.max_samples:
            break
        loc = location if isinstance(location, str) else f"record {location}"
        try:
            if isinstance(record, DataError):
                raise record
            sample = convert(rename_columns(record, spec.columns), Where(file, loc), spec.tags)
            messages = sample.get("messages")
            if "chosen" not in sample and messages and messages[-1]["role"] == "assistant" \
                    and not messages[-1]["content"].strip() and not messages[-1].get("tool_calls"):
                empty.append(f"{file}: {loc}")
            yield with_system(sample, args.system), (file, loc)
        except DataError as e:
            if drops is None:
                raise
            drops.add(bad_record_reason(e.field, e.reason), f"{file}: {loc}")
    if empty:
        logger.warning("%s: %d record(s) with an empty answer (first: %s) are trained to answer nothing at once; "
                       "remove them if that is not intended", spec.path, len(empty), empty[0])


def file_specs(paths: list[str], args: DataArgs) -> list[DatasetSpec]:
    """DatasetSpecs for plain paths, with the data-level format, columns, tags and max_samples."""
    return _specs(replace(args, train=list(paths)), "train")


class Dialogue(NamedTuple):
    """A conversation SFT trains on, where it was read, and the tools its record lists."""

    messages: list[Message]
    where: tuple[str, str]
    tools: list[dict[str, Any]] | None = None
    images: list[str] | None = None  # the images its messages show, in order (data/images.py references)


def conversations(spec: DatasetSpec, args: DataArgs, limit: int | None = None) -> list[Dialogue]:
    """The conversations SFT trains on from one dataset (documents have none), at most `limit` of them."""
    out = []
    for sample, where in iter_samples(spec, args):
        messages = sft_messages(sample)
        if messages is not None:
            out.append(Dialogue(messages, where, sample.get("tools"), sample.get("images")))
            if len(out) == limit:
                break
    return out


def load_messages(paths: list[str], args: DataArgs) -> list[Dialogue]:
    """Every record of the files as the conversation SFT trains on (for prediction and export checks)."""
    return [item for spec in file_specs(paths, args) for item in conversations(spec, args)]


def _encode(samples: list[Sample], wheres: list[tuple[str, str]], tokenizer: Any,
            encoding: Encoding) -> list[tuple[Encoded, str]]:
    out: list[tuple[Encoded, str]] = []
    for start in range(0, len(samples), _CHUNK):
        part = wheres[start : start + _CHUNK]
        for examples, (file, loc) in zip(encoding(tokenizer, samples[start : start + _CHUNK], part), part):
            out += [(ex, f"{file}: {loc}") for ex in examples]
    if has_images(encoding.processor):  # an image-text run: every example has the column the collator reads
        for ex, _ in out:
            ex.extra.setdefault("images", [])
    return out


def _encode_batch(batch: dict[str, list[Any]], tokenizer: Any, encoding: Encoding) -> dict[str, list[Any]]:
    """datasets.map form of `_encode` (samples and examples travel as JSON: their nesting varies too much for Arrow)."""
    samples = [json.loads(s) for s in batch["sample"]]
    encoded = _encode(samples, list(zip(batch["file"], batch["location"])), tokenizer, encoding)
    return {"example": [json.dumps(asdict(ex)) for ex, _ in encoded], "where": [w for _, w in encoded]}


def encode_dataset(spec: DatasetSpec, args: DataArgs, tokenizer: Any, stage: str = "sft",
                   classes: list[str] | None = None, processor: Any = None) -> tuple[Any, DatasetCounts]:
    """One dataset encoded for `stage` (in `preprocessing_num_workers` processes if more than one) and its counts;
    records with images through an image-text model's `processor`."""
    from datasets import Dataset

    skip = args.on_bad_record == "skip"
    encoding = Encoding(args.cutoff_len, args.mask, stage, classes, strict=not skip, reasoning=args.reasoning,
                        processor=processor)
    counts = DatasetCounts(spec.path, spec.format or args.format)
    samples, wheres = [], []
    for sample, where in iter_samples(spec, args, counts.drops if skip else None):
        samples.append(sample)
        wheres.append(where)
    counts.records = len(samples) + counts.drops.total
    workers = args.preprocessing_num_workers or 1
    if workers > 1 and len(samples) > 1:
        raw = Dataset.from_dict({"sample": [json.dumps(s, ensure_ascii=False) for s in samples],
                                 "file": [w[0] for w in wheres], "location": [w[1] for w in wheres]})
        columns = raw.map(
            _encode_batch, batched=True, batch_size=_CHUNK, num_proc=workers, remove_columns=raw.column_names,
            keep_in_memory=True, new_fingerprint=f"peftkit-{id(raw)}",
            fn_kwargs={"tokenizer": tokenizer, "encoding": encoding},
        ).to_dict()
        encoded = [(Encoded(**json.loads(e)), w) for e, w in zip(columns["example"], columns["where"])]
    else:
        encoded = _encode(samples, wheres, tokenizer, encoding)
    kept: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    for ex, where in encoded:
        if ex.drop:
            counts.drops.add(ex.drop, where)
            continue
        for key, value in {"input_ids": ex.input_ids, "labels": ex.labels, **ex.extra}.items():
            kept.setdefault(key, []).append(value)
        counts.truncated += int(ex.truncated)
    if spec.format == "text" and not args.packing:
        kept = _join_documents(kept, args.cutoff_len, counts)
    counts.examples = len(kept["input_ids"])
    return Dataset.from_dict(kept), counts


def _join_documents(kept: dict[str, list[Any]], cutoff_len: int, counts: DatasetCounts) -> dict[str, list[Any]]:
    """Documents (each ending with EOS) joined into one stream and cut into full blocks of cutoff_len.

    The last block is shorter; it is kept (nothing is discarded) and its length reported.
    """
    stream = [token for ids in kept["input_ids"] for token in ids]
    blocks = [stream[i : i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    if blocks and len(blocks[-1]) < 2:
        counts.drops.add(TOO_SHORT, f"{counts.path}: the last token of the joined documents")
        blocks.pop()
    counts.last_block_tokens = len(blocks[-1]) if blocks else 0
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def _mix(parts: list[Any], args: DataArgs) -> Any:
    from datasets import concatenate_datasets, interleave_datasets

    if len(parts) == 1:
        return parts[0]
    if args.mix_strategy == "concat":
        return concatenate_datasets(parts)
    stopping = "first_exhausted" if args.mix_strategy == "interleave_under" else "all_exhausted"
    return interleave_datasets(parts, probabilities=args.interleave_probs, seed=args.seed, stopping_strategy=stopping)


def _specs(args: DataArgs, key: str) -> list[DatasetSpec]:
    specs, issues = dataset_specs(args, key)
    if issues:
        raise ConfigError(issues)
    return specs


def prepare_data(args: DataArgs, tokenizer: Any, stage: str = "sft", processor: Any = None) -> PreparedData:
    """Train (and eval) datasets for `stage`, from the cache when nothing that shapes them changed; records with
    images through an image-text model's `processor`."""
    train_specs, eval_specs = _specs(args, "train"), _specs(args, "eval")
    if not train_specs:
        raise ConfigError(["data.train: missing — the file(s) to train on"])
    if args.streaming:
        return _prepare_streaming(train_specs, eval_specs, args, tokenizer, stage, processor)
    key = cache.fingerprint(train_specs, eval_specs, args, tokenizer, stage,
                            _images_key([*train_specs, *eval_specs], args, processor))
    cached = _from_cache(key, args, processor)
    if cached is not None:
        return cached

    report = DataReport(cutoff_len=args.cutoff_len, mask=args.mask, stage=stage)
    if head_of(stage).classes:
        report.classes = _classes(train_specs, args)
    train = _encode_train(train_specs, args, tokenizer, stage, report, processor)
    train, eval_ds = _eval_split(train, eval_specs, args, tokenizer, stage, report.classes, processor)
    _describe(report, train, eval_ds, tokenizer, processor)
    if head_of(stage).end_of_turn:
        _check_end_of_turn_supervised(tokenizer, train[:20]["labels"], train_specs)

    if args.packing:
        _check_no_images(train, eval_ds)
        train = _pack(train, args.cutoff_len)
        report.packing = {"rows": len(train), "efficiency": round(report.tokens / (len(train) * args.cutoff_len), 4)}
        eval_ds = _pack(eval_ds, args.cutoff_len) if eval_ds is not None else None
    if key:
        cache.save_cache(key, {"train": train, "eval": eval_ds}, report.as_dict())
    return PreparedData(train, eval_ds, report, processor)


def _images_key(specs: list[DatasetSpec], args: DataArgs, processor: Any) -> str | None:
    """For an image-text run, what the cache key adds: the processor's configuration and the bytes of every image
    the records refer to (an image changed in place is a new key). None for a text run."""
    if not has_images(processor):
        return None
    from peftkit.data.images import digest

    refs = [ref for spec in specs for sample, _ in iter_samples(spec, args, Drops()) for ref in sample.get("images", [])]
    config = processor.to_json_string() + str(processor.chat_template)  # its image processor and token counts too
    return digest(refs) + hashlib.sha256(config.encode()).hexdigest()


def _check_no_images(*splits: Any) -> None:
    """data.packing refused for records with images: isolation of packed image records (their pixel inputs, the
    3-D rope positions of Qwen-VL models) is not proven, so their loss could differ from the records one by one."""
    if any(ds is not None and "images" in ds.column_names and any(ds["images"]) for ds in splits):
        _refuse_packed_images()


def _refuse_packed_images() -> None:
    raise ConfigError([
        "data.packing: records with images are not packed (peftkit has not proven a packed row of image records "
        "equal to the records one by one: image inputs and Qwen-VL's 3-D rope positions would have to restart per "
        "record). Set data.packing: false"])


def _from_cache(key: str | None, args: DataArgs, processor: Any = None) -> PreparedData | None:
    """The cached datasets for `key`, or None: a miss, no key (nothing to fingerprint), or overwrite_cache."""
    if key and not args.overwrite_cache:
        hit = cache.load_cache(key)
        if hit:
            splits, saved = hit
            logger.info("tokenized data from the cache %s (data.overwrite_cache: true rebuilds it)", cache.cache_dir(key))
            return PreparedData(splits["train"], splits.get("eval"), DataReport.from_dict(saved), processor)
    return None


def _encode_train(specs: list[DatasetSpec], args: DataArgs, tokenizer: Any, stage: str, report: DataReport,
                  processor: Any = None) -> Any:
    """The training datasets encoded, counted in `report` and mixed; an empty result is an error, said with the counts."""
    parts = []
    for spec in specs:
        part, counts = encode_dataset(spec, args, tokenizer, stage, report.classes, processor)
        parts.append(part)
        report.datasets.append(counts)
    train = _mix(parts, args)
    if not len(train):
        raise DataError(", ".join(s.path for s in specs), None, None,
                        "no example left to train on:\n" + report.summary())
    return train


def _eval_split(train: Any, eval_specs: list[DatasetSpec], args: DataArgs, tokenizer: Any, stage: str,
                classes: list[str] | None, processor: Any = None) -> tuple[Any, Any | None]:
    """(train, eval): eval from its own datasets, else split off train by val_size, else none."""
    eval_ds = None
    if eval_specs:
        eval_parts = [encode_dataset(spec, args, tokenizer, stage, classes, processor)[0] for spec in eval_specs]
        eval_ds = _mix(eval_parts, DataArgs(mix_strategy="concat"))
    elif args.val_size:
        size = int(args.val_size) if args.val_size >= 1 else args.val_size
        split = train.train_test_split(test_size=size, seed=args.seed)
        train, eval_ds = split["train"], split["test"]
    return train, eval_ds


def _describe(report: DataReport, train: Any, eval_ds: Any | None, tokenizer: Any, processor: Any = None) -> None:
    """Fill `report` with the unpacked datasets' sizes, lengths, images and an example (packing would hide them)."""
    lengths, report.supervised_tokens = _token_stats(train)
    report.examples, report.tokens = len(train), sum(lengths)
    report.length_percentiles = percentiles(lengths)
    report.eval_examples = len(eval_ds) if eval_ds is not None else 0
    report.example = describe_example(tokenizer, train[0])
    if has_images(processor) and any(train["images"]):
        from peftkit.data.images import image_token_ids

        marks = image_token_ids(processor)
        rows = [(len(refs), sum(t in marks for t in ids)) for refs, ids in zip(train["images"], train["input_ids"])
                if refs]
        report.images = {"examples": len(rows), "images": sum(n for n, _ in rows),
                         "tokens": percentiles([t for _, t in rows])}
        report.example = describe_example(tokenizer, next(row for row in train if row["images"]))
    if "desirable" in train.column_names:  # kto: both kinds, since a run without one of them learns nothing useful
        desirable = sum(train["desirable"])
        report.judged = {"desirable": desirable, "undesirable": len(train) - desirable}


def _classes(specs: list[DatasetSpec], args: DataArgs) -> list[str]:
    labels = [sample["label"] for spec in specs for sample, _ in iter_samples(spec, args, Drops())]
    if not labels:
        raise DataError(", ".join(s.path for s in specs), None, "label", "no classification record to train on")
    return class_names(labels)


def _token_stats(ds: Any) -> tuple[list[int], int]:
    """Example lengths and the number of supervised tokens, computed in Arrow (no Python lists of ids)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    lengths = pc.list_value_length(table.column("input_ids")).to_pylist()
    if not pa.types.is_list(table.column("labels").type):  # cls: one class per example
        return lengths, len(lengths)
    labels = pc.list_flatten(table.column("labels"))
    return lengths, int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)


def _pack(ds: Any, cutoff_len: int) -> Any:
    from datasets import Dataset

    return Dataset.from_list(pack_examples(ds.to_list(), cutoff_len))


def _prepare_streaming(train_specs: list[DatasetSpec], eval_specs: list[DatasetSpec], args: DataArgs,
                       tokenizer: Any, stage: str, processor: Any = None) -> PreparedData:
    """IterableDatasets read and tokenized as the trainer asks for them; packing on the fly."""
    from datasets import IterableDataset

    def examples(spec: DatasetSpec) -> Iterator[dict[str, list[int]]]:
        drops = Drops()
        chunk: list[tuple[Sample, tuple[str, str]]] = []
        for item in iter_samples(spec, args, drops if args.on_bad_record == "skip" else None):
            chunk.append(item)
            if len(chunk) == _CHUNK:
                yield from _kept(chunk, drops)
                chunk = []
        yield from _kept(chunk, drops)
        for reason, entry in drops.reasons.items():  # the stream's end: say what was left out
            logger.warning("%s: dropped %d: %s (first: %s)", spec.path, entry["count"], reason, entry["first"])

    encoding = Encoding(args.cutoff_len, args.mask, stage, strict=args.on_bad_record == "error",
                        reasoning=args.reasoning, processor=processor)

    def _kept(chunk: list[tuple[Sample, tuple[str, str]]], drops: Drops) -> Iterator[dict[str, Any]]:
        for ex, where in _encode([s for s, _ in chunk], [w for _, w in chunk], tokenizer, encoding):
            if args.packing and ex.extra.get("images"):
                _refuse_packed_images()
            if ex.drop:
                drops.add(ex.drop, where)
            else:
                yield {"input_ids": ex.input_ids, "labels": ex.labels, **ex.extra}

    def stream(specs: list[DatasetSpec], mix: DataArgs) -> Any:
        parts = [IterableDataset.from_generator(examples, gen_kwargs={"spec": s}) for s in specs]
        mixed = _mix(parts, mix)
        if not args.packing:
            return mixed
        return IterableDataset.from_generator(lambda: pack_stream(iter(mixed), args.cutoff_len))

    train = stream(train_specs, args)
    first = next(iter(examples(train_specs[0])), None)
    if first is None:
        raise DataError(train_specs[0].path, None, None, "no example to train on")
    report = DataReport(datasets=[DatasetCounts(s.path, s.format or args.format) for s in train_specs],
                        cutoff_len=args.cutoff_len, mask=args.mask, streaming=True,
                        example=describe_example(tokenizer, first), stage=stage)
    _check_end_of_turn_supervised(tokenizer, [first["labels"]], train_specs)
    eval_ds = stream(eval_specs, DataArgs(mix_strategy="concat")) if eval_specs else None
    return PreparedData(train, eval_ds, report, processor)


def _check_end_of_turn_supervised(tokenizer: Any, labels: list[list[int]], specs: list[DatasetSpec]) -> None:
    """Warn once if no example (of the first few; truncation may cut the end) supervises an end-of-turn token."""
    if all(spec.format == "text" for spec in specs):  # documents have no turns
        return
    labels = [row for row in labels if any(t != IGNORE_INDEX for t in row)]
    stops = set(stop_token_ids(tokenizer))
    if labels and not any(stops.intersection(row) for row in labels):  # (grpo's prompts supervise nothing)
        logger.warning(
            "WARNING: the chat template leaves the end-of-turn token outside the labels: the model will not "
            "learn to stop. Use a template whose assistant turn ends with %s (data.template).", tokenizer.eos_token,
        )


def encode_records(paths: list[str], args: DataArgs, tokenizer: Any, stage: str,
                   classes: list[str] | None = None, processor: Any = None) -> list[tuple[Sample, str, Encoded]]:
    """Every example of `paths` beside its record and that record's location (rm / dpo / cls: one per record,
    kto: two for a preference pair; a dropped one says why).

    Evaluation writes one line per record, so it needs each example beside the record it came from.
    """
    items = [item for spec in file_specs(paths, args) for item in iter_samples(spec, args)]
    encoding = Encoding(args.cutoff_len, args.mask, stage, classes, reasoning=args.reasoning, processor=processor)
    out = []
    for start in range(0, len(items), _CHUNK):
        part = items[start : start + _CHUNK]
        for (sample, (file, loc)), examples in zip(part, encoding(tokenizer, [s for s, _ in part], [w for _, w in part]),
                                                   strict=True):
            out += [(sample, f"{file}: {loc}", ex) for ex in examples]
    return out


def build_dataset(paths: list[str], args: DataArgs, tokenizer: Any, stage: str = "sft",
                  classes: list[str] | None = None, processor: Any = None) -> tuple[Any, DataReport]:
    """One unpacked, uncached dataset of `paths` for `stage` (for evaluation and tests)."""
    report = DataReport(cutoff_len=args.cutoff_len, mask=args.mask, stage=stage, classes=classes)
    parts = []
    for spec in file_specs(paths, args):
        part, counts = encode_dataset(spec, replace(args, packing=False), tokenizer, stage, classes, processor)
        parts.append(part)
        report.datasets.append(counts)
    ds = _mix(parts, DataArgs(mix_strategy="concat"))
    report.examples = len(ds)
    return ds, report
