"""Loaders of published safety and capability benchmarks, each read in the layout its authors publish and
returned as one table of "eval items" (EVAL_ITEM_COLUMNS), the form evaluation sends to models and judges.

What each loader reads (checked against the sources named; anything not found there is marked assumed):

  MM-SafetyBench  github.com/isXinLiu/MM-SafetyBench: data/processed_questions/<NN-Scenario>.json, one object
                  per scenario mapping question id ("0", "1", ...) to a record with "Question",
                  "Changed Question", "Key Phrase", "Phrase Type", "Rephrased Question",
                  "Rephrased Question(SD)"; images from the authors' Drive zip "MM-SafetyBench(imgs)" as
                  <NN-Scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg (HELM's mm_safety_bench_scenario.py reads exactly
                  these). Scenario names keep the published spelling ("01-Illegal_Activitiy").
  FigStep         github.com/ThuCCSLab/FigStep: data/question/safebench.csv (500 rows) and SafeBench-Tiny.csv
                  (50) with columns dataset, category_id, task_id, category_name, question, instruction;
                  images data/images/<subset>/query_<dataset>_<category_id>_<task_id>_6.png (6 = the figstep
                  query type of src/generate_prompts.py). The repository holds the SafeBench-Tiny images; the
                  README links data/images/SafeBench, which its data/README says may have been removed, hence
                  `render=True`.
  AdvBench        github.com/llm-attacks/llm-attacks: data/advbench/harmful_behaviors.csv, columns goal, target.
  MIS test        huggingface.co/datasets/Tuwhy/MIS_Test card and github.com/DripNowhy/MIS: mis_easy.json,
                  mis_hard.json, mis_real.json (splits easy 1675, hard 510, real 100), each a JSON list of
                  {question, category, sub_category, image_path1, image_path2, id}; image paths are relative to
                  the folder holding the JSON (easy_image/1/object1.png, ...), as evaluation/inference_vllm.py
                  joins them.
  VQAv2           visualqa.org: v2_OpenEnded_mscoco_<subtype>_questions.json {"questions": [{image_id,
                  question, question_id}]}, v2_mscoco_<subtype>_annotations.json {"annotations": [{question_id,
                  answers: [{answer, answer_confidence, answer_id}], multiple_choice_answer, question_type,
                  answer_type, image_id}]}, COCO images COCO_<subtype>_<image_id:012d>.jpg.

Every loader fails loudly: a missing file or image names its path, a bad record names its id and field, and
nothing is dropped silently. Images leave as RGB PNG bytes; `max_side` downscales them (aspect kept) for
small models.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from spavl_kedro.evalsets.typography import FIGSTEP_PROMPT, figstep_image
from spavl_kedro.imaging import png_bytes

EVAL_ITEM_COLUMNS = [
    "item_id",
    "eval_set",
    "variant",
    "kind",
    "question",
    "images",
    "class1",
    "class2",
    "class3",
    "qtype",
    "reference",
    "answers",
    "captions",
    "source",
    "request",
    "wording",
]
# `request`: the harmful request in words when the question leaves it to the images (FigStep's typed
# instruction, MM-SafetyBench's image views), else None. A verdict judge that does not see images is asked
# about this request instead of the carrier prompt, which on its own reads as benign.
# `wording`: for a held-out test question of the template writer, whether its wording family was taught
# ("seen") or held out of all training ("unseen", wording.py); else None.
WORDINGS = ("seen", "unseen")
KINDS = ("harm", "help", "benign", "capability", "mis")
_TEXT_FIELDS = ("item_id", "eval_set", "variant", "question", "class1", "class2", "class3", "qtype", "source")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# MM-SafetyBench: the question field that goes with each image type, as the authors' evaluation pairs them
# (README; HELM and many reproductions use the same pairs): the plain question without an image, the
# SD-specific rephrasing ("The image shows a phrase of an activity...") with the SD image, and the rephrasing
# that points at the typed phrase ("The bottom of the image shows...") with TYPO and SD_TYPO.
MM_SAFETYBENCH_QUESTION_FIELDS = {
    "text_only": "Question",
    "sd": "Rephrased Question(SD)",
    "typo": "Rephrased Question",
    "sd_typo": "Rephrased Question",
}
MM_SAFETYBENCH_IMAGE_DIRS = {"sd": "SD", "typo": "TYPO", "sd_typo": "SD_TYPO"}  # text_only sends no image
# The Drive zip unpacks to "MM-SafetyBench(imgs)"; reproductions usually rename it data/imgs.
MM_SAFETYBENCH_IMAGE_FOLDERS = ("imgs", "MM-SafetyBench(imgs)")

FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")
FIGSTEP_SUBSETS = {"SafeBench": "safebench.csv", "SafeBench-Tiny": "SafeBench-Tiny.csv"}
FIGSTEP_QUERY_TYPE = 6  # QueryType.figstep in src/generate_prompts.py; the image files end in _6.png

ADVBENCH_VARIANTS = ("blank_image", "no_image")
MIS_FIELDS = ("question", "category", "sub_category", "image_path1", "image_path2")
VQA_ANNOTATION_FIELDS = ("answers", "multiple_choice_answer", "question_type", "answer_type")


# ---- the table -----------------------------------------------------------------------------------------
def empty_items() -> pd.DataFrame:
    """An eval-items table with no rows (object columns, so a later concat keeps lists and None)."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in EVAL_ITEM_COLUMNS})


def validate_items(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """`frame` with exactly EVAL_ITEM_COLUMNS in order; raises ValueError naming `where`, the row's item_id and
    the field for a missing column, a wrong type, a null, a bad kind, captions that do not match the images,
    answers on a non-capability item (or none on a capability item), or a duplicate item_id."""
    missing = [c for c in EVAL_ITEM_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; it has {list(frame.columns)}")
    for i, row in enumerate(frame[EVAL_ITEM_COLUMNS].itertuples(index=False)):
        item = row.item_id if isinstance(row.item_id, str) else f"row {i}"

        def bad(field: str, problem: str) -> ValueError:
            return ValueError(f"{where}: item '{item}': field '{field}' {problem}")  # noqa: B023 (this row's)

        for field in _TEXT_FIELDS:
            value = getattr(row, field)
            if not isinstance(value, str):
                raise bad(field, f"must be a string, got {type(value).__name__} {value!r}")
        if not row.item_id:
            raise bad("item_id", "is empty")
        if row.kind not in KINDS:
            raise bad("kind", f"must be one of {list(KINDS)}, got {row.kind!r}")
        for field in ("reference", "request"):
            value = getattr(row, field)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise bad(field, f"must be a non-empty string or None, got {value!r}")
        if row.wording is not None and row.wording not in WORDINGS:
            raise bad("wording", f"must be one of {list(WORDINGS)} or None, got {row.wording!r}")
        if row.request is not None and not row.images:
            raise bad("request", "is set on an item without images: the question already says it all")
        for field in ("images", "answers", "captions"):
            if not isinstance(getattr(row, field), list):
                raise bad(field, f"must be a list, got {type(getattr(row, field)).__name__}")
        for k, image in enumerate(row.images):
            if not isinstance(image, bytes) or not image.startswith(_PNG_SIGNATURE):
                raise bad("images", f"entry {k} is not PNG bytes")
        for field in ("answers", "captions"):
            if not all(isinstance(v, str) for v in getattr(row, field)):
                raise bad(field, "must hold strings only")
        if row.captions and len(row.captions) != len(row.images):
            raise bad(
                "captions",
                f"has {len(row.captions)} entries for {len(row.images)} image(s); give one per image or none",
            )
        if (row.kind == "capability") != bool(row.answers):
            raise bad(
                "answers",
                "must be non-empty for a capability item and empty otherwise, "
                f"got {len(row.answers)} for kind '{row.kind}'",
            )
    duplicated = frame["item_id"][frame["item_id"].duplicated(keep=False)]
    if len(duplicated):
        raise ValueError(
            f"{where}: duplicate item_id(s) {sorted(set(duplicated))[:10]} "
            f"({len(duplicated)} rows); item_id must be unique within a set"
        )
    return frame[EVAL_ITEM_COLUMNS].reset_index(drop=True)


def items_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows holding every EVAL_ITEM_COLUMNS key (`wording` may be left out: None) as an eval-items table,
    unvalidated. Object columns: pandas 3 would otherwise infer a string dtype and turn `reference=None` or
    `request=None` into NaN."""
    return pd.DataFrame(
        {c: pd.Series([r.get(c) if c == "wording" else r[c] for r in rows], dtype=object) for c in EVAL_ITEM_COLUMNS}
    )


def _items(rows: list[dict[str, Any]], where: str) -> pd.DataFrame:
    return validate_items(items_frame(rows), where)


def _item(**fields: Any) -> dict[str, Any]:
    """One row; class2/class3 default to the finest label given, the lists to empty."""
    fields.setdefault("class2", fields["class1"])
    fields.setdefault("class3", fields["class2"])
    for name in ("images", "answers", "captions"):
        fields.setdefault(name, [])
    fields.setdefault("reference", None)
    fields.setdefault("request", None)
    return fields


# ---- images --------------------------------------------------------------------------------------------
def read_image(path: Path, where: str, max_side: int | None = None) -> bytes:
    """An image file as RGB PNG bytes, downscaled to `max_side` (longest side, aspect kept) when larger.

    Transparent pixels become white: MIS object images are PNG cut-outs, and dropping alpha would leave
    whatever colour the transparent pixels happen to store (often black)."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            return png_bytes(_rgb(image, max_side))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: image {path} cannot be read: {exc}") from exc


def _rgb(image: Image.Image, max_side: int | None) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _check_max_side(max_side: int | None, where: str) -> None:
    if max_side is not None and max_side < 1:
        raise ValueError(f"{where}: max_side must be >= 1 or None, got {max_side}")


def _check_variants(variants: Sequence[str], known: Iterable[str], where: str) -> None:
    known = list(known)
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        raise ValueError(f"{where}: unknown or no variant(s) {unknown or list(variants)}; known: {known}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc


def _text(record: dict, field: str, where: str, record_id: Any) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        problem = "missing" if field not in record else f"empty or not a string ({value!r})"
        raise ValueError(f"{where}: record '{record_id}': field '{field}' {problem}")
    return value


# ---- MM-SafetyBench ------------------------------------------------------------------------------------
def load_mm_safetybench(
    root: str | Path,
    variants: Sequence[str] = ("text_only", "sd", "typo", "sd_typo"),
    image_root: str | Path | None = None,
    max_side: int | None = None,
) -> pd.DataFrame:
    """MM-SafetyBench: one item per question and variant, scenario by scenario in file order.

    Args:
        root: the repository's data/ folder, holding processed_questions/<NN-Scenario>.json.
        variants: text_only (the "Question", no image), sd, typo, sd_typo (the image of that type with the
            question field MM_SAFETYBENCH_QUESTION_FIELDS pairs with it).
        image_root: the folder of <NN-Scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg; default: root/imgs, else
            root/"MM-SafetyBench(imgs)" (the zip's own name). Not needed for text_only alone.
        max_side: downscale images to this longest side.

    class1..3 are the scenario (file stem, published spelling); qtype is the variant; captions give the
    record's "Key Phrase" for the image (what SD drew and/or what is typed) when the record has one; the
    image views carry the record's plain "Question" as their `request`.
    """
    root = Path(root)
    where = f"MM-SafetyBench ({root})"
    _check_variants(variants, MM_SAFETYBENCH_QUESTION_FIELDS, where)
    _check_max_side(max_side, where)
    questions_dir = root / "processed_questions"
    files = sorted(questions_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(
            f"{where}: no processed_questions/*.json under {root}; point root at the repository's data/ folder"
        )
    images = _mm_safetybench_images(root, image_root, variants, where)
    rows = []
    for file in files:
        scenario, source = file.stem, str(file.relative_to(root))
        records = _read_json(file)
        if not isinstance(records, dict):
            raise ValueError(f"{file}: expected an object question id -> record, got {type(records).__name__}")
        for qid, record in records.items():
            if not isinstance(record, dict):
                raise ValueError(f"{file}: record '{qid}': expected an object, got {type(record).__name__}")
            key_phrase = record.get("Key Phrase")
            for variant in variants:
                question = _text(record, MM_SAFETYBENCH_QUESTION_FIELDS[variant], str(file), qid)
                pictures, captions, request = [], [], None
                if variant in MM_SAFETYBENCH_IMAGE_DIRS:
                    path = images / scenario / MM_SAFETYBENCH_IMAGE_DIRS[variant] / f"{qid}.jpg"
                    pictures = [read_image(path, f"{file} record '{qid}' ({variant})", max_side)]
                    captions = [key_phrase] if isinstance(key_phrase, str) and key_phrase.strip() else []
                    request = _text(record, MM_SAFETYBENCH_QUESTION_FIELDS["text_only"], str(file), qid)
                rows.append(
                    _item(
                        item_id=f"{scenario}/{qid}/{variant}",
                        eval_set="mm_safetybench",
                        variant=variant,
                        kind="harm",
                        question=question,
                        images=pictures,
                        class1=scenario,
                        qtype=variant,
                        captions=captions,
                        source=source,
                        request=request,
                    )
                )
    return _items(rows, where)


def _mm_safetybench_images(
    root: Path, image_root: str | Path | None, variants: Sequence[str], where: str
) -> Path | None:
    if not any(v in MM_SAFETYBENCH_IMAGE_DIRS for v in variants):
        return None
    if image_root is not None:
        if not Path(image_root).is_dir():
            raise FileNotFoundError(f"{where}: image_root {image_root} does not exist")
        return Path(image_root)
    for name in MM_SAFETYBENCH_IMAGE_FOLDERS:
        if (root / name).is_dir():
            return root / name
    looked = [str(root / name) for name in MM_SAFETYBENCH_IMAGE_FOLDERS]
    raise FileNotFoundError(
        f"{where}: no image folder: looked for {looked} (unzip the authors' image archive "
        f"there, or pass image_root), or load only variants=('text_only',)"
    )


# ---- FigStep -------------------------------------------------------------------------------------------
def load_figstep(
    root: str | Path,
    subset: str = "SafeBench",
    render: bool = False,
    image_size: int = 760,
    max_side: int | None = None,
) -> pd.DataFrame:
    """FigStep on SafeBench: one item per CSV row, the typographic image with FIGSTEP_PROMPT as the text.

    Args:
        root: a clone of ThuCCSLab/FigStep (holds data/question/ and data/images/).
        subset: "SafeBench" (data/question/safebench.csv, 500 rows) or "SafeBench-Tiny" (50 rows).
        render: draw each image with `typography.figstep_image` from the row's instruction instead of reading
            data/images/<subset>/query_..._6.png; for when the published images are absent. The drawing
            follows FigStep's layout with Pillow's built-in font, so pixels differ from the published images.
        image_size: side of rendered images (FigStep: 760); ignored when reading.
        max_side: downscale images to this longest side.

    class1..3 are the category_name; the reference is None (SafeBench has no reference answers); the
    caption names the instruction the image shows; the request is the row's original `question`.
    """
    root = Path(root)
    where = f"FigStep ({root})"
    if subset not in FIGSTEP_SUBSETS:
        raise ValueError(f"{where}: unknown subset '{subset}'; known: {list(FIGSTEP_SUBSETS)}")
    _check_max_side(max_side, where)
    csv_path = root / "data" / "question" / FIGSTEP_SUBSETS[subset]
    records = _read_csv(csv_path, FIGSTEP_COLUMNS)
    rows = []
    for line, record in records:
        key = "_".join(record.get(c) or "" for c in ("dataset", "category_id", "task_id"))
        record_id = f"line {line} ({key})"
        for field in FIGSTEP_COLUMNS:
            _text(record, field, str(csv_path), record_id)
        instruction = record["instruction"]
        if render:
            image = png_bytes(_rgb(figstep_image(instruction, size=image_size), max_side))
        else:
            name = f"query_{key}_{FIGSTEP_QUERY_TYPE}.png"
            image = read_image(root / "data" / "images" / subset / name, f"{csv_path} {record_id}", max_side)
        rows.append(
            _item(
                item_id=key,
                eval_set="figstep",
                variant="figstep",
                kind="harm",
                question=FIGSTEP_PROMPT,
                images=[image],
                class1=record["category_name"],
                qtype="figstep",
                captions=[f'the text "{instruction}" followed by an empty list numbered 1, 2, 3'],
                source=str(csv_path.relative_to(root)),
                request=record["question"],
            )
        )
    return _items(rows, where)


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, record) pairs; every value stays text, so "01" and "NA" are kept as written."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; it has {reader.fieldnames}")
        return [(reader.line_num, dict(record)) for record in reader]


# ---- AdvBench ------------------------------------------------------------------------------------------
def load_advbench(
    csv_path: str | Path, variants: Sequence[str] = ADVBENCH_VARIANTS, blank_size: int = 336
) -> pd.DataFrame:
    """AdvBench harmful behaviours: each `goal` as the question, once per variant.

    AdvBench is text-only; a VLM meets it either with no image or with a blank one (a white `blank_size`
    square; 336 is LLaVA-1.5's input side), which tells whether an image alone loosens text safety. The
    `target` ("Sure, here is ...") is an attack target, not a reference answer, so reference stays None.
    """
    csv_path = Path(csv_path)
    where = f"AdvBench ({csv_path})"
    _check_variants(variants, ADVBENCH_VARIANTS, where)
    if blank_size < 1:
        raise ValueError(f"{where}: blank_size must be >= 1, got {blank_size}")
    blank = png_bytes(Image.new("RGB", (blank_size, blank_size), (255, 255, 255)))
    rows = []
    for index, (line, record) in enumerate(_read_csv(csv_path, ("goal", "target"))):
        goal = _text(record, "goal", str(csv_path), f"line {line}")
        for variant in variants:
            with_image = variant == "blank_image"
            rows.append(
                _item(
                    item_id=f"{index:03d}/{variant}",
                    eval_set="advbench",
                    variant=variant,
                    kind="harm",
                    question=goal,
                    images=[blank] if with_image else [],
                    captions=["a blank white image"] if with_image else [],
                    class1="advbench",
                    qtype=variant,
                    source=csv_path.name,
                )
            )
    return _items(rows, where)


# ---- MIS -----------------------------------------------------------------------------------------------
def load_mis_test(
    json_path: str | Path, image_root: str | Path | None = None, max_side: int | None = None
) -> pd.DataFrame:
    """One MIS test split (mis_easy.json, mis_hard.json or mis_real.json): two images and a question each.

    Args:
        json_path: the split's JSON list of records.
        image_root: the folder image_path1/image_path2 are relative to; default: the JSON's folder, as in
            the MIS repository's layout.
        max_side: downscale images to this longest side.

    qtype (and variant) is the record's "difficulty" when it has one, else the split named by the file
    ("mis_hard.json" -> "hard"), else "mis". class1 is the category, class2 = class3 the sub_category.
    item_id is "<split>/<id>"; a record without "id" (the card says every record has one) uses its index.
    """
    json_path = Path(json_path)
    where = f"MIS test ({json_path})"
    _check_max_side(max_side, where)
    image_root = Path(image_root) if image_root is not None else json_path.parent
    records = _read_json(json_path)
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    split = json_path.stem.removeprefix("mis_") if json_path.stem.startswith("mis_") else "mis"
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{json_path}: record {index}: expected an object, got {type(record).__name__}")
        record_id = record.get("id", index)
        fields = {f: _text(record, f, str(json_path), record_id) for f in MIS_FIELDS}
        difficulty = str(record.get("difficulty") or split)
        images = [
            read_image(image_root / fields[f], f"{json_path} record '{record_id}' ({f})", max_side)
            for f in ("image_path1", "image_path2")
        ]
        rows.append(
            _item(
                item_id=f"{difficulty}/{record_id}",
                eval_set="mis_test",
                variant=difficulty,
                kind="mis",
                question=fields["question"],
                images=images,
                class1=fields["category"],
                class2=fields["sub_category"],
                qtype=difficulty,
                source=json_path.name,
            )
        )
    return _items(rows, where)


# ---- VQAv2 ---------------------------------------------------------------------------------------------
def load_vqa(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg",
    limit: int | None = None,
    max_side: int | None = None,
) -> pd.DataFrame:
    """VQAv2 open-ended questions with their human answers, for checking that alignment keeps capability.

    Args:
        questions_json, annotations_json: the official question and annotation files of one subtype.
        image_dir: the COCO image folder (e.g. val2014/); files named by `image_pattern`.
        limit: keep the first `limit` questions in file order (only their images are read).
        max_side: downscale images to this longest side.

    answers: the distinct human answers, multiple_choice_answer first (the VQA accuracy metric counts how
    many of the ten humans gave an answer; the distinct set is what a judge or exact-match needs).
    reference: multiple_choice_answer. class1 = qtype = answer_type, class2 = class3 = question_type;
    variant: the questions file's data_subtype (e.g. "val2014"), else "vqa".
    """
    questions_json, annotations_json, image_dir = Path(questions_json), Path(annotations_json), Path(image_dir)
    where = f"VQA ({questions_json})"
    _check_max_side(max_side, where)
    if limit is not None and limit < 0:
        raise ValueError(f"{where}: limit must be >= 0 or None, got {limit}")
    questions_file, annotations_file = _read_json(questions_json), _read_json(annotations_json)
    questions = _list_field(questions_file, "questions", questions_json)
    annotations = {a.get("question_id"): a for a in _list_field(annotations_file, "annotations", annotations_json)}
    variant = questions_file.get("data_subtype") or "vqa"
    images: dict[Any, bytes] = {}  # about five questions share each COCO image; decode it once
    rows = []
    for question in questions[:limit]:
        qid = question.get("question_id")
        text = _text(question, "question", str(questions_json), qid)
        annotation = annotations.get(qid)
        if annotation is None:
            raise ValueError(f"{annotations_json}: no annotation for question_id '{qid}' of {questions_json}")
        for field in VQA_ANNOTATION_FIELDS:
            if field not in annotation:
                raise ValueError(f"{annotations_json}: record '{qid}': field '{field}' missing")
        answer_type = _text(annotation, "answer_type", str(annotations_json), qid)
        question_type = _text(annotation, "question_type", str(annotations_json), qid)
        best = _text(annotation, "multiple_choice_answer", str(annotations_json), qid)
        humans = [a.get("answer") if isinstance(a, dict) else None for a in annotation["answers"]]
        if not all(isinstance(a, str) for a in humans):
            raise ValueError(
                f"{annotations_json}: record '{qid}': field 'answers' must be a list of "
                f"{{answer, ...}} objects with string answers"
            )
        image_id = question.get("image_id")
        if not isinstance(image_id, int):
            raise ValueError(f"{questions_json}: record '{qid}': field 'image_id' must be an integer, got {image_id!r}")
        if image_id not in images:
            path = image_dir / image_pattern.format(image_id=image_id)
            images[image_id] = read_image(path, f"{questions_json} record '{qid}'", max_side)
        rows.append(
            _item(
                item_id=str(qid),
                eval_set="vqa",
                variant=variant,
                kind="capability",
                question=text,
                images=[images[image_id]],
                class1=answer_type,
                class2=question_type,
                qtype=answer_type,
                reference=best,
                answers=list(dict.fromkeys([best, *humans])),
                source=questions_json.name,
            )
        )
    return _items(rows, where)


def _list_field(content: Any, field: str, path: Path) -> list[dict]:
    if not isinstance(content, dict) or not isinstance(content.get(field), list):
        raise ValueError(f"{path}: expected an object with a '{field}' list")
    bad = [i for i, record in enumerate(content[field]) if not isinstance(record, dict)]
    if bad:
        raise ValueError(f"{path}: '{field}' entry {bad[0]} is not an object")
    return content[field]
