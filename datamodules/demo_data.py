"""The demo data set: coloured shapes, captioned in six languages.

Everything here is generated deterministically from a seed, so nothing binary lives in git:
the demo base is trained on it (``scripts/make_demo_base.py``), stage 1 reads its parallel
text shards, stages 2-3 its image-text shards (img2dataset layout, with json metadata that
carries an aesthetic score rewarding large, centred shapes on a clean background).

Captions vary a lot on purpose. The demo LLM is random, so the adapter has no meaning to
generalise from: a phrasing it never saw is a gamble (DESIGN.md measured about 45%). The
cure is variety - many core phrasings per language, including the plain ones a user types
("a red circle", "赤い円"), optional prefixes and requests ("create ", "给我"), style tags
(", 4k"), details in any order, synonyms, casing and punctuation - so that what the adapter
learns is "find the colour and the shape". `evaluation.demo_eval` checks it on requests worded
in ways no caption uses (evaluation/prompts/demo_heldout.json).

A fifth of the samples show two shapes of different colours ("a red circle and a blue
square"), so the demo can measure attribute binding: which colour goes with which shape.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
LANGUAGES = ("en", "zh", "fr", "de", "es", "ja")
SIZES = ("small", "medium", "large")
POSITIONS = ("centre", "top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("white", "black", "grey", "noisy")

# Saturated, clearly separated hues; backgrounds are all grey shades, so the shape is the
# only saturated thing in an image and its colour can be read back
# (`evaluation.demo_readback.dominant_colour`).
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40)}
BACKGROUND_LEVEL = {"white": 240, "black": 15, "grey": 128, "noisy": 128}
# Radius as a fraction of the image side, per size word.
RADIUS = {"small": (0.16, 0.22), "medium": (0.24, 0.30), "large": (0.32, 0.40)}

DATA_VERSION = "5"  # bump when the generator changes: cached shards are then rebuilt
# Share of samples that show two shapes ("a red circle and a blue square"): the demo's
# attribute-binding data. Their two colours differ and so do their two shapes, so an image
# that swaps the attributes is wrong.
PAIR_FRACTION = 0.2
# Radius of each shape in a pair (fraction of the side): two shapes side by side at 16 px.
PAIR_RADIUS = (0.15, 0.19)


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn, where, and on what."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    radius: float  # fraction of the image side
    cx: float  # centre, fraction of the image side
    cy: float

    def aesthetic_score(self) -> float:
        """0-10: large, centred shapes on a clean background score high (what stage 3 selects)."""
        size_term = (self.radius - 0.16) / (0.40 - 0.16)
        centre_term = 1.0 - min(1.0, np.hypot(self.cx - 0.5, self.cy - 0.5) / 0.32)
        clean_term = 0.0 if self.background == "noisy" else 1.0
        return round(float(10.0 * (0.4 * size_term + 0.4 * centre_term + 0.2 * clean_term)), 3)

    @property
    def objects(self) -> tuple["Scene", ...]:
        return (self,)


@dataclass(frozen=True)
class PairScene:
    """Two shapes side by side on one background, named in caption order (`first` is not
    always the left one: the caption binds colours to shapes, never to places)."""

    first: Scene
    second: Scene

    @property
    def objects(self) -> tuple[Scene, Scene]:
        return (self.first, self.second)

    @property
    def background(self) -> str:
        return self.first.background

    def aesthetic_score(self) -> float:
        """The single-shape score of one shape as large as both, at their midpoint."""
        a, b = self.first, self.second
        merged = Scene(a.colour, a.shape, a.size, "centre", a.background, radius=float(np.hypot(a.radius, b.radius)),
                       cx=(a.cx + b.cx) / 2, cy=(a.cy + b.cy) / 2)
        return merged.aesthetic_score()

    def labels(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]


def sample_scene(rng: random.Random) -> Scene:
    size = rng.choice(SIZES)
    radius = rng.uniform(*RADIUS[size])
    position = rng.choice(POSITIONS) if rng.random() < 0.6 else "centre"
    margin = radius + 0.02
    if position == "centre":
        cx = cy = 0.5
        cx += rng.uniform(-0.04, 0.04)
        cy += rng.uniform(-0.04, 0.04)
    else:
        cy = margin if position.startswith("top") else 1.0 - margin
        cx = margin if position.endswith("left") else 1.0 - margin
    return Scene(
        colour=rng.choice(COLOURS),
        shape=rng.choice(SHAPES),
        size=size,
        position=position,
        background=rng.choice(BACKGROUNDS),
        radius=radius,
        cx=min(max(cx, margin), 1 - margin),
        cy=min(max(cy, margin), 1 - margin),
    )


def sample_pair_scene(rng: random.Random) -> PairScene:
    """Two shapes of different colours and different shapes, one on each half."""
    colours = rng.sample(COLOURS, 2)
    shapes = rng.sample(SHAPES, 2)
    background = rng.choice(BACKGROUNDS)
    sides = [0.26, 0.74]
    rng.shuffle(sides)
    objects = []
    for colour, shape, cx in zip(colours, shapes, sides):
        radius = rng.uniform(*PAIR_RADIUS)
        cy = 0.5 + rng.uniform(-0.12, 0.12)
        margin = radius + 0.02
        objects.append(Scene(colour=colour, shape=shape, size="small", position="centre", background=background,
                             radius=radius, cx=cx + rng.uniform(-0.02, 0.02), cy=min(max(cy, margin), 1 - margin)))
    return PairScene(*objects)


def sample_any_scene(rng: random.Random) -> Scene | PairScene:
    """What the demo shards hold: a single shape, or (`PAIR_FRACTION` of them) a pair."""
    return sample_pair_scene(rng) if rng.random() < PAIR_FRACTION else sample_scene(rng)


# ----------------------------------------------------------------------------- rendering


def render(scene: Scene | PairScene, size: int, rng: random.Random, supersample: int = 4,
           shape: tuple[int, int] | None = None) -> Image.Image:
    """Draw the scene (one shape or a pair) at `size` px (anti-aliased by supersampling).
    `shape` (h, w), sides even and at least `size`: a wider or taller picture, the scene in
    its middle `size` square and the background around it (the mixed-aspect demo set that
    exercises buckets)."""
    height, width = shape or (size, size)
    s, sh, sw = size * supersample, height * supersample, width * supersample
    np_rng = np.random.default_rng(rng.getrandbits(32))
    level = BACKGROUND_LEVEL[scene.background] + rng.randint(-10, 10)
    canvas = np.full((sh, sw, 3), level, dtype=np.float32)
    if scene.background == "noisy":
        # Grey clutter: blobs of random grey, still unsaturated.
        blobs = np_rng.uniform(40, 215, size=(height // 2, width // 2, 1)).astype(np.float32)
        canvas = np.kron(blobs, np.ones((2 * supersample, 2 * supersample, 1), np.float32)).repeat(3, axis=2)
    if shape is None:
        yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
    else:  # in units of the middle square's side, 0..1 inside it
        rows, cols = np.mgrid[0:sh, 0:sw] + 0.5
        yy, xx = (rows - (sh - s) / 2) / s, (cols - (sw - s) / 2) / s
    for drawn in scene.objects:
        colour = np.array(RGB[drawn.colour], np.float32) + np_rng.uniform(-12, 12, size=3)
        canvas[_shape_mask(drawn, xx, yy)] = colour
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.resize((width, height), Image.BOX)


def _shape_mask(scene: Scene, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    dx, dy, r = xx - scene.cx, yy - scene.cy, scene.radius
    if scene.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if scene.shape == "square":
        half = r * 0.85  # equal area-ish with the circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # upward triangle inscribed in the circle
    top, base = -r, r * 0.75
    half_width = (dy - top) / (base - top) * r * 1.05
    return (dy >= top) & (dy <= base) & (np.abs(dx) <= half_width)


def mixed_shapes(size: int) -> list[tuple[int, int]]:
    """(h, w) of the mixed-aspect demo images: the square and 5:4, 3:2 and 2:1 both ways, the
    shorter side `size` (sides even: the noisy background is drawn in 2 x 2 blocks)."""
    longs = sorted({size, *(2 * round(size * ratio / 2) for ratio in (1.25, 1.5, 2.0))})
    return [(size, size)] + [pair for long in longs[1:] for pair in ((size, long), (long, size))]


# ----------------------------------------------------------------------------- captions
# The phrase tables are data, in demo_phrases.json. `lexicon`, per language: colour, shape and
# size words (a list is a set of synonyms drawn at random, its first entry the plain word
# used by `plain_prompts`), core templates, sentences, prefixes, details (position,
# background), joiners and long-caption sentences: str.format templates over the fields of
# `_fields`. Japanese colours come as adjectives (赤い円) and as nouns (`colour_noun`: 赤色の円).
# `de_gender`: German adjectives decline, and each noun's grammatical gender picks the ending.
# `plain_prompts`: the phrasings a user would type, the demo's evaluation prompts.
# Editing a phrase changes the generated data: bump DATA_VERSION with it.
_PHRASES = json.loads(resources.files("datamodules").joinpath("demo_phrases.json").read_text(encoding="utf-8"))
LEXICON: dict[str, dict] = _PHRASES["lexicon"]
PLAIN_PROMPTS: dict[str, list[str]] = _PHRASES["plain_prompts"]
_DE_GENDER: dict[str, str] = _PHRASES["de_gender"]
PLAIN_BINDING: dict[str, str] = _PHRASES.get("plain_binding", {})
# Phrase lists kept beside the lexicon (one line per language in the file), merged into it:
# `object`, noun phrases of one shape for two-shape captions; `pair`, how two are joined;
# `request`, verbs before a noun phrase ("create "); `tag`, style words after one (", 4k");
# `filler`, a language's most frequent words, strewn around some captions (`_strewn`).
for _key in ("object", "pair", "request", "tag", "filler"):
    for _lang, _phrases in _PHRASES.get(_key, {}).items():
        if _lang in LEXICON:
            LEXICON[_lang][_key] = _phrases
_missing = [lang for lang in LANGUAGES
            if lang not in LEXICON or lang not in PLAIN_PROMPTS or lang not in PLAIN_BINDING
            or any(key not in LEXICON[lang] for key in ("object", "pair", "request", "tag", "filler"))]
if _missing:
    raise ValueError(f"demo_phrases.json has no phrases for the demo language(s) {_missing}")


def _pick(rng: random.Random, options):
    return rng.choice(options) if isinstance(options, (list, tuple)) else options


def _de_fields(colour: str, noun: str, size: str) -> dict[str, str]:
    """German declension for indefinite/definite articles in nominative, accusative, dative."""
    g = _DE_GENDER[noun]
    nom_end = {"m": "er", "n": "es", "f": "e"}[g]
    acc_end = {"m": "en", "n": "es", "f": "e"}[g]
    return {
        "c_nom": colour + nom_end, "c_acc": colour + acc_end, "c_def": colour + "e", "c_dat": colour + "en",
        "z_nom": size + nom_end if size else "",
        "e_nom": {"m": "", "n": "", "f": "e"}[g], "e_acc": {"m": "en", "n": "", "f": "e"}[g],
        "r_nom": {"m": "r", "n": "s", "f": ""}[g],
        "art_nom": {"m": "der", "n": "das", "f": "die"}[g], "Art_nom": {"m": "Der", "n": "Das", "f": "Die"}[g],
        "art_gen": {"m": "des", "n": "des", "f": "der"}[g],
        "C": colour.capitalize(),
    }


def _fields(lang: str, scene: Scene, rng: random.Random) -> dict[str, str]:
    lex = LEXICON[lang]
    shape = _pick(rng, lex["shape"][scene.shape])
    size = _pick(rng, lex["size"][scene.size])
    fields = {
        "c": _pick(rng, lex["colour"][scene.colour]),
        "s": shape,
        "z": size,
        "p": _pick(rng, lex["position"][scene.position]),
        "b_plain": lex["bg_plain"][scene.background],
        "z_plain": lex.get("z_plain", {}).get(scene.size, size),
    }
    if lang == "de":
        fields.update(_de_fields(fields["c"], shape, size))
    elif lang == "ja":
        fields["C"] = lex["colour_noun"][scene.colour] + ("色" if rng.random() < 0.5 and scene.colour != "yellow" else "")
    return fields


def _tidy(text: str) -> str:
    return " ".join(text.split()).replace(" ,", ",").strip(" ,")


def caption(lang: str, scene: Scene, rng: random.Random, details: tuple[str, ...] = (), long: bool = False) -> str:
    """One caption of `scene` in `lang`, mentioning the listed details (size, position, background)."""
    lex = LEXICON[lang]
    f = _fields(lang, scene, rng)
    if long:
        return "".join(s.format(**f) + ("" if lang in ("zh", "ja") else " ") for s in lex["long"]).strip()
    is_sentence = rng.random() < 0.3
    core = rng.choice(lex["sentence"] if is_sentence else lex["core"])
    text = core.format(**f)
    if not is_sentence:
        text = _framed(lex, text, rng)
    extra = []
    for d in details:
        if d == "size" and "{z" not in core:
            continue  # sizes read naturally only inside the noun phrase
        if d == "position":
            extra.append(f["p"])
        elif d == "background":
            extra.append(_pick(rng, lex["background"][scene.background]))
    rng.shuffle(extra)
    for e in extra:
        text += rng.choice(lex["joiner"]) + e
    return _finished(lang, lex, text, rng)


def _framed(lex: dict, text: str, rng: random.Random) -> str:
    """Sometimes a prefix ("a picture of ") or a request ("create ") before a noun phrase."""
    draw = rng.random()
    if draw < 0.3:
        return rng.choice(lex["prefix"]) + text
    if draw < 0.5:
        return rng.choice(lex["request"]) + text
    return text


def _finished(lang: str, lex: dict, text: str, rng: random.Random) -> str:
    """Style tag, casing and final punctuation, at random: words around the colour and the
    shape that say nothing about them, which the adapter must learn to read past."""
    if rng.random() < 0.2:
        text += rng.choice(lex["tag"])
    if rng.random() < 0.3:
        text = _strewn(lang, lex, text, rng)
    text = _tidy(text)
    if rng.random() < 0.3:
        text = text[:1].upper() + text[1:]
    if rng.random() < 0.2:
        text += "。" if lang in ("zh", "ja") else "."
    return text


def _strewn(lang: str, lex: dict, text: str, rng: random.Random) -> str:
    """A few of the language's most frequent words before or after the caption, in no order.

    The demo LLM is random and reads bytes: it has never seen ordinary words, so a word that
    merely looks like a colour word ("ver", to see, against "verde") could pass for one. A
    real LLM has read them all. Word salad from a frequency list shows the adapter ordinary
    words carrying no colour or shape; it never forms a held-out request (tested)."""
    words = rng.sample(lex["filler"], rng.randint(1, 4))
    space = "" if lang in ("zh", "ja") else " "
    salad = space.join(words)
    if rng.random() < 0.5:
        return salad + rng.choice((": ", ", ", " ") if space else ("：", "，", "")) + text
    return text + (", " if space else "，") + salad


def pair_caption(lang: str, scene: PairScene, rng: random.Random) -> str:
    """A caption of a two-shape scene in `lang`, naming the shapes in the scene's order."""
    lex = LEXICON[lang]
    a, b = (rng.choice(lex["object"]).format(**_fields(lang, obj, rng)) for obj in scene.objects)
    return _finished(lang, lex, _framed(lex, rng.choice(lex["pair"]).format(a=a, b=b), rng), rng)


def parallel_captions(scene: Scene | PairScene, rng: random.Random) -> dict[str, str]:
    """The same scene in every language, mentioning the same details (a parallel sample)."""
    if isinstance(scene, PairScene):
        return {lang: pair_caption(lang, scene, rng) for lang in LANGUAGES}
    long = rng.random() < 0.05
    details = tuple(d for d in ("position", "background", "size") if rng.random() < 0.3)
    return {lang: caption(lang, scene, rng, details, long) for lang in LANGUAGES}


def _plain_fields(lang: str, colour: str, shape: str, suffix: str = "") -> dict[str, str]:
    """The plain colour and shape words (each list's first entry), as the templates of
    `plain_prompts` / `plain_binding` name them; `suffix` numbers the second object's."""
    lex = LEXICON[lang]
    noun = lex["shape"][shape][0]
    word = lex["colour"][colour]
    word = word[0] if isinstance(word, list) else word
    fields = {"colour" + suffix: word, "shape" + suffix: noun}
    if lang == "de":
        declined = _de_fields(word, noun, "")
        fields["colour" + suffix + "_nom"] = declined["c_nom"]
        fields["colour" + suffix + "_acc"] = declined["c_acc"]
        fields["ein" + suffix] = "ein" + declined["e_nom"]
        fields["ein" + suffix + "_acc"] = "ein" + declined["e_acc"]
    return fields


def phrased_prompts(lang: str, templates: list[str]) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x shape x template: `templates` name the plain
    words as {colour} and {shape} (German also {colour_nom}, {colour_acc}, {ein}, {ein_acc})."""
    return [(template.format(**_plain_fields(lang, colour, shape)), colour, shape)
            for colour in COLOURS for shape in SHAPES for template in templates]


def plain_prompts(lang: str) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x shape x plain template of `lang`."""
    return phrased_prompts(lang, PLAIN_PROMPTS[lang])


def binding_prompts(lang: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(prompt, [(colour, shape), (colour, shape)]) for every pair of two different colours on
    two different shapes, in the plain pair phrasing of `lang` ("a red circle and a blue
    square"): the demo's attribute-binding prompts, 72 per language."""
    out = []
    for colour, colour2 in ((c1, c2) for c1 in COLOURS for c2 in COLOURS if c1 != c2):
        for shape, shape2 in ((s1, s2) for s1 in SHAPES for s2 in SHAPES if s1 != s2):
            fields = {**_plain_fields(lang, colour, shape), **_plain_fields(lang, colour2, shape2, "2")}
            out.append((PLAIN_BINDING[lang].format(**fields), [(colour, shape), (colour2, shape2)]))
    return out


# ----------------------------------------------------------------------------- shards


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_demo_shards(
    out_dir: str | Path,
    *,
    num_samples: int,
    samples_per_shard: int,
    seed: int,
    image_size: int,
    prefix: str,
    with_images: bool,
    parallel_in_json: bool = False,
    shapes: list[tuple[int, int]] | None = None,
) -> list[Path]:
    """Write parallel text shards and, with images, the img2dataset layout for the later stages.

    Text: ``KEY.txt`` (English) with the other languages in ``KEY.<lang>.txt`` or, with
    `parallel_in_json` (one tar member instead of five: shards 3x smaller), in ``KEY.json``.
    Images: ``KEY.png`` + ``KEY.txt`` + ``KEY.json`` (captions per language, aesthetic score),
    `image_size` square, or each of a size drawn from `shapes` ((h, w), see `render`).
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for shard_start in range(0, num_samples, samples_per_shard):
        path = out_dir / f"{prefix}-{shard_start // samples_per_shard:05d}.tar"
        # A name of this process's own: several processes (the ranks of one job, or several
        # jobs) may write the same shard at once, and each must rename only its own file.
        tmp = _private_name(path)
        with _removed_on_error(tmp), wds.TarWriter(str(tmp)) as sink:
            for i in range(shard_start, min(num_samples, shard_start + samples_per_shard)):
                scene = sample_any_scene(rng)
                captions = parallel_captions(scene, rng)
                sample = {"__key__": f"{i:08d}", "txt": captions["en"]}
                if with_images:
                    shape = rng.choice(shapes) if shapes else None
                    height, width = shape or (image_size, image_size)
                    sample["png"] = _png_bytes(render(scene, image_size, rng, shape=shape))
                    sample["json"] = json.dumps(
                        {
                            "caption": captions["en"],
                            "captions": captions,
                            "width": width,
                            "height": height,
                            "aesthetic_score": scene.aesthetic_score(),
                            # what is drawn, in caption order: one shape, or two for a pair
                            "objects": [{"colour": o.colour, "shape": o.shape} for o in scene.objects],
                        },
                        ensure_ascii=False,
                    ).encode()
                elif parallel_in_json:
                    sample["json"] = json.dumps({k: v for k, v in captions.items() if k != "en"}, ensure_ascii=False).encode()
                else:
                    for lang in LANGUAGES[1:]:
                        sample[f"{lang}.txt"] = captions[lang]
                sink.write(sample)
        os.replace(tmp, path)  # atomic: a half-written shard never looks finished
        paths.append(path)
    return paths


def _private_name(path: Path) -> Path:
    """A temporary name next to `path` (same filesystem, so the rename is atomic) that no other
    process uses, on this machine or another one sharing the folder."""
    import socket

    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


@contextlib.contextmanager
def _removed_on_error(tmp: Path):
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str, timeout: float = 3600.0):
    """Hold an exclusive lock on `lock_path` while generating `what`: the first process
    generates, the others wait here and then reuse its result.

    flock: the kernel releases the lock when its holder dies, so a killed rank never leaves a
    stale lock. Where the filesystem has no locks (or after `timeout`), go on without one:
    every file is written under a private name and renamed, so the worst case is the work
    done twice, never a broken file or a crash.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(lock_path, "a") as handle:
        locked, waiting, deadline = False, False, time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if not waiting:
                    log.info("Another process is generating %s: waiting for it (%s)", what, lock_path)
                    waiting = True
                if time.monotonic() > deadline:
                    log.warning("Still locked after %.0f s: generating %s here too (%s)", timeout, what, lock_path)
                    break
                time.sleep(0.5)
            except OSError as err:  # e.g. a network filesystem mounted without locks
                log.warning("Cannot lock %s (%s): generating %s without a lock", lock_path, err, what)
                break
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("LINGUADIFF_CACHE")
    return Path(root) if root else Path(__file__).resolve().parents[1] / ".cache"


# text: stage 1; images: 16 px squares; images-mixed: the same scenes on pictures of mixed
# aspect ratios (`mixed_shapes`), for aspect-ratio buckets (configs/data/demo_buckets.yaml).
DEMO_KINDS = ("text", "images", "images-mixed")


def ensure_demo_data(kind: str, root: str | Path | None = None, image_size: int = 16) -> Path:
    """Generate one part of the demo data set on first use; return its folder.

    `kind` "text": ``train-*.tar`` / ``val-*.tar`` parallel text shards (stage 1); "images":
    the image-text shards (stages 2-3). A marker file records the generator version, so a
    changed generator rebuilds it and a half-finished build is redone. Safe when several
    processes ask at once (the ranks of a job, other jobs sharing the cache): one generates
    under a lock, the others wait and reuse its shards.
    """
    if kind not in DEMO_KINDS:
        raise ValueError(f"demo data kind must be one of {', '.join(DEMO_KINDS)}, got {kind!r}")
    folder = (Path(root) if root else default_cache_dir() / "demo_data") / kind
    marker = folder / f"COMPLETE-v{DATA_VERSION}-{image_size}px"
    if marker.exists():
        return folder
    # Every rank of a job (and any other job sharing the cache) comes here at once on first
    # use: one generates, the others wait for it and reuse its shards.
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / ".generating.lock", f"the demo {kind} shards"):
        if not marker.exists():
            _generate_demo_data(kind, folder, image_size)
            tmp = _private_name(marker)
            with _removed_on_error(tmp):
                tmp.write_text("ok\n")
                os.replace(tmp, marker)  # the marker appears only once every shard is in place
    return folder


def _generate_demo_data(kind: str, folder: Path, image_size: int) -> None:
    log.info("Generating the demo %s shards in %s (first use)...", kind, folder)
    if kind == "text":
        # The training shards carry the translations in KEY.json, the validation shards in
        # KEY.<lang>.txt: the demo exercises both layouts the reader accepts.
        write_demo_shards(folder, num_samples=24000, samples_per_shard=2000, seed=1, image_size=image_size,
                          prefix="train", with_images=False, parallel_in_json=True)
        write_demo_shards(folder, num_samples=600, samples_per_shard=300, seed=2, image_size=image_size,
                          prefix="val", with_images=False)
    else:
        shapes = mixed_shapes(image_size) if kind == "images-mixed" else None
        write_demo_shards(folder, num_samples=8000, samples_per_shard=1000, seed=3, image_size=image_size,
                          prefix="train", with_images=True, shapes=shapes)
        write_demo_shards(folder, num_samples=400, samples_per_shard=200, seed=4, image_size=image_size,
                          prefix="val", with_images=True, shapes=shapes)


def demo_shard_urls(stage: int, split: str, images: str = "square") -> str:
    """Brace-expanded URLs of the demo shards a stage reads (generating them on first use);
    `images`: square | mixed (aspect ratios, for buckets)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if images not in ("square", "mixed"):
        raise ValueError(f"demo images must be 'square' or 'mixed', got {images!r}")
    if stage == 1:
        folder = ensure_demo_data("text")
        return str(folder / ("train-{00000..00011}.tar" if split == "train" else "val-00000.tar"))
    folder = ensure_demo_data("images" if images == "square" else "images-mixed")
    return str(folder / ("train-{00000..00007}.tar" if split == "train" else "val-{00000..00001}.tar"))
