"""The prompts an evaluation draws: bundled sets and caption files given by path.

- multilingual (parallel) sets: the same prompts in several languages, index for index, so
  images drawn from prompt i in every language share their seeds and can be compared.
  Bundled: the demo's plain colour x shape prompts (`demo`, with the colour and shape each
  one asks for) and `evaluation/prompts/parallel.json` (16 everyday scenes in en, zh, fr,
  de, es, ja). A user file has the same layout: a json list of ``{"en": ..., "zh": ...}``.
- caption files, MS-COCO style: a COCO captions annotation json
  (``{"annotations": [{"image_id": ..., "caption": ...}]}``, first caption of each image) or
  plain text, one prompt per line. The CLIP score reads them, so they are English.
- long prompts: `evaluation/prompts/long.txt`, 24 English descriptions of about 100 words,
  every one well past CLIP's 77 tokens.
- attribute binding (T2I-CompBench's colour / shape / texture categories):
  `evaluation/prompts/binding.json`, two objects per prompt ("a red book and a yellow vase"),
  each object's attribute and noun in English (the questions a VQA model is asked) and the
  prompt in en, zh, fr, de, es, ja; on the demo, its two-object scenes
  (`demo_data.binding_prompts`), colour binding only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datamodules import demo_data
from linguadiff.config import ConfigError

BUNDLED_DIR = Path(__file__).resolve().parent / "prompts"
BUNDLED_PARALLEL = BUNDLED_DIR / "parallel.json"
BUNDLED_LONG = BUNDLED_DIR / "long.txt"
BUNDLED_BINDING = BUNDLED_DIR / "binding.json"
BINDING_CATEGORIES = ("colour", "shape", "texture")
REFERENCE_LANGUAGE = "en"  # the CLIP score reads English: every language is scored against it


@dataclass(frozen=True)
class ParallelSet:
    """Prompts per language, aligned by index; `labels` are the demo's (colour, shape) per index."""

    name: str
    prompts: dict[str, list[str]]
    labels: list[tuple[str, str]] | None = None

    @property
    def languages(self) -> list[str]:
        return list(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts[REFERENCE_LANGUAGE])


def _check_languages(languages: list[str], option: str = "languages") -> None:
    if REFERENCE_LANGUAGE not in languages:
        raise ConfigError(f"option '{option}' must include '{REFERENCE_LANGUAGE}' (the CLIP score is taken against English)")


def _check_demo_languages(languages: list[str]) -> None:
    _check_languages(languages)
    unknown = [lang for lang in languages if lang not in demo_data.LANGUAGES]
    if unknown:
        raise ConfigError(f"the demo prompts have no language {unknown[0]!r}; they have {', '.join(demo_data.LANGUAGES)}")


def demo_parallel_set(languages: list[str]) -> ParallelSet:
    """The demo's plain prompts ("a red circle", "一个红色的圆形", ...): the same colour x shape x
    template order in every language, so they are parallel as they stand."""
    _check_demo_languages(languages)
    rows = {lang: demo_data.plain_prompts(lang) for lang in languages}
    labels = [(colour, shape) for _, colour, shape in rows[REFERENCE_LANGUAGE]]
    return ParallelSet("demo", {lang: [p for p, _, _ in rows[lang]] for lang in languages}, labels)


def read_parallel_file(path: str | Path, languages: list[str]) -> ParallelSet:
    """A json list of ``{lang: prompt}`` objects; every one must have every wanted language."""
    _check_languages(languages)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"option 'multilingual': no such file {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"option 'multilingual': {path} is not valid json: {err}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"option 'multilingual': {path} must hold a non-empty list of {{language: prompt}} objects")
    for i, row in enumerate(rows):
        missing = [lang for lang in languages if not isinstance(row.get(lang), str) or not row[lang].strip()]
        if missing:
            raise ConfigError(f"option 'multilingual': entry {i} of {path} has no {missing[0]!r} prompt "
                              f"(set languages=[...] to the languages the file has)")
    name = "parallel" if path == BUNDLED_PARALLEL else str(path)
    return ParallelSet(name, {lang: [row[lang].strip() for row in rows] for lang in languages})


def read_captions(path: str | Path) -> list[str]:
    """Prompts from a COCO captions json (first caption per image, in file order) or a text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"option 'captions': no such file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        captions = _coco_captions(path, text)
    if not captions:
        raise ConfigError(f"option 'captions': {path} holds no caption")
    return captions


def _coco_captions(path: Path, text: str) -> list[str]:
    """COCO has about five captions per image; one per image keeps the prompt set as varied as the images."""
    try:
        annotations = json.loads(text)["annotations"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"option 'captions': {path} is not a COCO captions file "
                          f"(expected {{\"annotations\": [{{\"image_id\": ..., \"caption\": ...}}]}}): {err!r}") from None
    first: dict[object, str] = {}
    for entry in annotations:
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if isinstance(caption, str) and caption.strip():
            first.setdefault(entry.get("image_id", len(first)), " ".join(caption.split()))
    return list(first.values())


def read_long_prompts(path: str | Path = BUNDLED_LONG) -> list[str]:
    """The long-prompt set: one prompt per line (bundled by default)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"option 'long_prompts': no such file {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"option 'long_prompts': {path} holds no prompt")
    return prompts


@dataclass(frozen=True)
class BindingItem:
    """One binding prompt: its category, its objects as (attribute, noun) in English, its text per language."""

    category: str
    objects: tuple[tuple[str, str], ...]
    prompts: dict[str, str]


@dataclass(frozen=True)
class BindingSet:
    name: str
    items: list[BindingItem]

    def prompts(self, lang: str) -> list[str]:
        return [item.prompts[lang] for item in self.items]

    def __len__(self) -> int:
        return len(self.items)


def read_binding_file(path: str | Path, languages: list[str]) -> BindingSet:
    """A json list of ``{"category": "colour", "objects": [{"attribute": "red", "noun": "book"}, ...],
    "prompts": {"en": "a red book and a yellow vase", "zh": ...}}``; errors name the file and item."""
    _check_languages(languages)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"option 'binding': no such file {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"option 'binding': {path} is not valid json: {err}") from None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"option 'binding': {path} must hold a non-empty list of binding items")
    items = []
    for i, row in enumerate(rows):
        where = f"option 'binding': item {i} of {path}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not an object")
        if row.get("category") not in BINDING_CATEGORIES:
            raise ConfigError(f"{where}: 'category' must be one of {', '.join(BINDING_CATEGORIES)}, got {row.get('category')!r}")
        objects = row.get("objects")
        if not isinstance(objects, list) or len(objects) < 2:
            raise ConfigError(f"{where}: 'objects' must list at least two {{\"attribute\": ..., \"noun\": ...}} objects")
        pairs = []
        for k, obj in enumerate(objects):
            if not (isinstance(obj, dict) and all(isinstance(obj.get(f), str) and obj[f].strip() for f in ("attribute", "noun"))):
                raise ConfigError(f"{where}: object {k} needs a non-empty English 'attribute' and 'noun', got {obj!r}")
            pairs.append((obj["attribute"].strip(), obj["noun"].strip()))
        prompts = row.get("prompts")
        if not isinstance(prompts, dict):
            raise ConfigError(f"{where}: 'prompts' must be an object of {{language: prompt}}")
        missing = [lang for lang in languages if not isinstance(prompts.get(lang), str) or not prompts[lang].strip()]
        if missing:
            raise ConfigError(f"{where} has no {missing[0]!r} prompt (set languages=[...] to the languages the file has)")
        items.append(BindingItem(row["category"], tuple(pairs), {lang: prompts[lang].strip() for lang in languages}))
    name = "binding" if path == BUNDLED_BINDING else str(path)
    return BindingSet(name, items)


def demo_binding_set(languages: list[str]) -> BindingSet:
    """The demo's two-object scenes ("a red circle and a blue square"), colour binding: the
    same scenes in the same order in every language (checked)."""
    _check_demo_languages(languages)
    rows = {lang: demo_data.binding_prompts(lang) for lang in languages}
    english = rows[REFERENCE_LANGUAGE]
    for lang, lang_rows in rows.items():
        if [objects for _, objects in lang_rows] != [objects for _, objects in english]:
            raise ValueError(f"demo_data.binding_prompts({lang!r}) is not parallel to the English scenes")
    items = [BindingItem("colour", tuple((colour, shape) for colour, shape in objects),
                         {lang: rows[lang][i][0] for lang in languages})
             for i, (_, objects) in enumerate(english)]
    return BindingSet("demo", items)
