"""The demo data set: coloured shapes, captioned in six languages.

Everything here is generated deterministically from a seed, so nothing binary lives in git:
the demo base is trained on it (``scripts/make_demo_base.py``), stage 1 reads its parallel
text shards, stages 2-3 its image-text shards (img2dataset layout, with json metadata that
carries an aesthetic score rewarding large, centred shapes on a clean background).

Captions vary a lot on purpose. The demo LLM is random, so the adapter has no meaning to
generalise from: a phrasing it never saw is a gamble (DESIGN.md measured about 45%). The
cure is variety - many core phrasings per language, including the plain ones a user types
("a red circle", "赤い円"), optional prefixes, details in any order, synonyms, casing and
punctuation - so that what the adapter learns is "find the colour and the shape".
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
# only saturated thing in an image and its colour can be read back by `dominant_colour`.
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40)}
BACKGROUND_LEVEL = {"white": 240, "black": 15, "grey": 128, "noisy": 128}
# Radius as a fraction of the image side, per size word.
RADIUS = {"small": (0.16, 0.22), "medium": (0.24, 0.30), "large": (0.32, 0.40)}

DATA_VERSION = "3"  # bump when the generator changes: cached shards are then rebuilt


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


# ----------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int, rng: random.Random, supersample: int = 4) -> Image.Image:
    """Draw the scene at `size` px (anti-aliased by supersampling)."""
    s = size * supersample
    np_rng = np.random.default_rng(rng.getrandbits(32))
    level = BACKGROUND_LEVEL[scene.background] + rng.randint(-10, 10)
    canvas = np.full((s, s, 3), level, dtype=np.float32)
    if scene.background == "noisy":
        # Grey clutter: blobs of random grey, still unsaturated.
        blobs = np_rng.uniform(40, 215, size=(size // 2, size // 2, 1)).astype(np.float32)
        canvas = np.kron(blobs, np.ones((2 * supersample, 2 * supersample, 1), np.float32)).repeat(3, axis=2)
    yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
    dx, dy, r = xx - scene.cx, yy - scene.cy, scene.radius
    if scene.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        half = r * 0.85  # equal area-ish with the circle
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upward triangle inscribed in the circle
        top, base = -r, r * 0.75
        half_width = (dy - top) / (base - top) * r * 1.05
        mask = (dy >= top) & (dy <= base) & (np.abs(dx) <= half_width)
    colour = np.array(RGB[scene.colour], np.float32) + np_rng.uniform(-12, 12, size=3)
    canvas[mask] = colour
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.BOX)


# ----------------------------------------------------------------------------- captions
# Each language: colour/shape words (with the grammatical forms its templates need), core
# templates, details (size, position, background) and long-caption sentences. Templates use
# str.format fields; a core template that already says a detail lists it in its key set.

_EN = {
    "colour": {c: c for c in COLOURS},
    "shape": {"circle": ["circle", "circle", "round circle", "disc"], "square": ["square", "square", "box"],
              "triangle": ["triangle"]},
    "size": {"small": ["small", "little", "tiny"], "medium": ["medium-sized", ""], "large": ["large", "big"]},
    "core": [
        "a {c} {s}", "a {c} {s}", "{c} {s}", "one {c} {s}", "a single {c} {s}", "the {c} {s}",
        "a {s} that is {c}", "a {c} coloured {s}", "a {c}-colored {s}", "a {z} {c} {s}", "one {z} {c} {s}",
    ],
    "sentence": ["{s}, {c}", "the {s} is {c}", "there is a {c} {s}", "{c} {s}, {z}", "the colour of the {s} is {c}"],
    "prefix": ["a picture of ", "an image of ", "a drawing of ", "an illustration of ", "a photo of ",
               "draw ", "please draw ", "show me ", "generate ", "a simple icon of ", "clip art of "],
    "position": {"centre": ["in the centre", "in the middle", "centered"], "top left": ["in the top left corner", "at the top left"],
                 "top right": ["in the top right corner", "at the top right"], "bottom left": ["in the bottom left corner", "at the bottom left"],
                 "bottom right": ["in the bottom right corner", "at the bottom right"]},
    "background": {"white": ["on a white background", "on white"], "black": ["on a black background", "on black"],
                   "grey": ["on a grey background", "on a gray background"], "noisy": ["on a noisy background", "on a cluttered background"]},
    "joiner": [" ", ", "],
    "long": [
        "This is a simple flat drawing with one {c} {s} and nothing else in the frame.",
        "The {s} is filled with a uniform {c} colour and has clean, sharp edges.",
        "The shape is {z} and sits {p}, and the composition is minimal.",
        "The background is {b_plain}, so the {c} {s} stands out clearly.",
        "There is no text, no shadow, no gradient and no other object anywhere in the picture.",
        "The style is that of a children's book illustration, simple, geometric and friendly.",
        "Every pixel of the {s} has the same {c} tone, and the outline is not drawn separately.",
    ],
    "bg_plain": {"white": "white", "black": "black", "grey": "grey", "noisy": "noisy and cluttered"},
}

_ZH = {
    "colour": {"red": ["红色", "红"], "green": ["绿色", "绿"], "blue": ["蓝色", "蓝"], "yellow": ["黄色", "黄"]},
    "shape": {"circle": ["圆形", "圆", "圆圈"], "square": ["正方形", "方形", "方块"], "triangle": ["三角形"]},
    "size": {"small": ["小"], "medium": ["中等大小的", ""], "large": ["大"]},
    "core": [
        "一个{c}的{s}", "一个{c}的{s}", "{c}{s}", "{c}的{s}", "一个{c}{s}", "{z}{c}{s}", "一个{z}的{c}{s}",
        "一个颜色是{c}的{s}",
    ],
    "sentence": ["这是一个{c}的{s}", "{s}是{c}的", "有一个{c}的{s}", "{s}，{c}", "画一个{c}的{s}", "请画一个{c}{s}"],
    "prefix": ["一张图片：", "图片：", "请画：", "插图：", "一幅画：", "画："],
    "position": {"centre": ["在中间", "位于中央", "居中"], "top left": ["在左上角"], "top right": ["在右上角"],
                 "bottom left": ["在左下角"], "bottom right": ["在右下角"]},
    "background": {"white": ["白色背景", "在白色背景上"], "black": ["黑色背景", "在黑色背景上"],
                   "grey": ["灰色背景", "在灰色背景上"], "noisy": ["杂乱的背景", "在嘈杂的背景上"]},
    "joiner": ["，", "，", " "],
    "long": [
        "这是一幅简单的平面图画，画面里只有一个{c}的{s}，没有别的东西。",
        "这个{s}被均匀地涂成{c}，边缘清晰锐利。",
        "图形的大小是{z}，位置{p}，构图非常简洁。",
        "背景是{b_plain}，所以{c}的{s}非常醒目。",
        "画面中没有文字、没有阴影、没有渐变，也没有任何其他物体。",
        "风格像儿童绘本里的插图，简单、几何、友好。",
        "这个{s}的每一个像素都是同样的{c}，轮廓没有单独描边。",
    ],
    "bg_plain": {"white": "白色", "black": "黑色", "grey": "灰色", "noisy": "杂乱的"},
}

_FR = {
    "colour": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"},
    "shape": {"circle": ["cercle", "rond", "disque"], "square": ["carré"], "triangle": ["triangle"]},
    "size": {"small": ["petit"], "medium": ["moyen"], "large": ["grand", "gros"]},
    "core": [
        "un {s} {c}", "un {s} {c}", "{s} {c}", "le {s} {c}", "un seul {s} {c}", "un {z} {s} {c}",
        "un {s} de couleur {c}", "un {s} qui est {c}", "un {s} tout {c}",
    ],
    "sentence": ["le {s} est {c}", "il y a un {s} {c}", "{s}, {c}", "une image d'un {s} {c}", "un dessin d'un {s} {c}",
                 "une photo d'un {s} {c}"],
    "prefix": ["image : ", "dessin : ", "illustration : ", "dessine ", "dessine-moi ", "s'il te plaît, dessine ",
               "montre-moi ", "génère "],
    "position": {"centre": ["au centre", "au milieu"], "top left": ["en haut à gauche"], "top right": ["en haut à droite"],
                 "bottom left": ["en bas à gauche"], "bottom right": ["en bas à droite"]},
    "background": {"white": ["sur fond blanc"], "black": ["sur fond noir"], "grey": ["sur fond gris"],
                   "noisy": ["sur un fond bruité", "sur un fond encombré"]},
    "joiner": [" ", ", "],
    "long": [
        "C'est un dessin plat et simple avec un seul {s} {c} et rien d'autre dans le cadre.",
        "Le {s} est rempli d'un {c} uniforme et ses bords sont nets et précis.",
        "La forme est de taille {z_plain} et se trouve {p}, et la composition est minimale.",
        "Le fond est {b_plain}, si bien que le {s} {c} ressort clairement.",
        "Il n'y a ni texte, ni ombre, ni dégradé, ni aucun autre objet dans l'image.",
        "Le style est celui d'une illustration de livre pour enfants, simple, géométrique et sympathique.",
        "Chaque pixel du {s} a la même teinte {c}, et le contour n'est pas tracé à part.",
    ],
    "bg_plain": {"white": "blanc", "black": "noir", "grey": "gris", "noisy": "bruité et encombré"},
    "z_plain": {"small": "petite", "medium": "moyenne", "large": "grande"},
}

# German adjectives decline; the grammatical gender of each noun picks the ending.
_DE_GENDER = {"Kreis": "m", "Quadrat": "n", "Dreieck": "n", "Viereck": "n", "Kugel": "f"}
_DE = {
    "colour": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb"},
    "shape": {"circle": ["Kreis", "Kreis"], "square": ["Quadrat", "Viereck"], "triangle": ["Dreieck"]},
    "size": {"small": ["klein"], "medium": ["mittelgroß"], "large": ["groß"]},
    "core": [
        "ein {c_nom} {s}", "ein {c_nom} {s}", "{c_nom} {s}", "{art_nom} {c_def} {s}", "ein {z_nom} {c_nom} {s}",
        "ein {s} in {C}", "ein einzelne{r_nom} {c_nom} {s}",
    ],
    "sentence": ["{art_nom} {s} ist {c}", "{s}, {c}", "es gibt ein{e_acc} {c_acc} {s}", "ein Bild von einem {c_dat} {s}",
                 "zeichne ein{e_acc} {c_acc} {s}", "bitte ein{e_acc} {c_acc} {s} zeichnen"],
    "prefix": ["Bild: ", "Zeichnung: ", "Illustration: ", "Foto: ", "Hier ist ", "Zu sehen ist "],
    "position": {"centre": ["in der Mitte", "zentriert"], "top left": ["oben links"], "top right": ["oben rechts"],
                 "bottom left": ["unten links"], "bottom right": ["unten rechts"]},
    "background": {"white": ["auf weißem Hintergrund"], "black": ["auf schwarzem Hintergrund"],
                   "grey": ["auf grauem Hintergrund"], "noisy": ["auf unruhigem Hintergrund"]},
    "joiner": [" ", ", "],
    "long": [
        "Das ist eine einfache flache Zeichnung mit nur einem {c_dat} {s} und sonst nichts im Bild.",
        "{Art_nom} {s} ist gleichmäßig {c} gefüllt und hat klare, scharfe Kanten.",
        "Die Form ist {z} und befindet sich {p}, die Komposition ist minimal.",
        "Der Hintergrund ist {b_plain}, deshalb hebt sich {art_nom} {c_def} {s} deutlich ab.",
        "Es gibt keinen Text, keinen Schatten, keinen Verlauf und kein anderes Objekt im Bild.",
        "Der Stil erinnert an eine Illustration aus einem Kinderbuch, einfach, geometrisch und freundlich.",
        "Jedes Pixel {art_gen} {s}s hat denselben {C}ton, und der Umriss ist nicht extra gezeichnet.",
    ],
    "bg_plain": {"white": "weiß", "black": "schwarz", "grey": "grau", "noisy": "unruhig"},
}

_ES = {
    "colour": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo"},
    "shape": {"circle": ["círculo", "círculo", "disco"], "square": ["cuadrado"], "triangle": ["triángulo"]},
    "size": {"small": ["pequeño"], "medium": ["mediano"], "large": ["grande"]},
    "core": [
        "un {s} {c}", "un {s} {c}", "{s} {c}", "el {s} {c}", "un solo {s} {c}", "un {s} {c} {z}",
        "un {s} de color {c}", "un {s} que es {c}",
    ],
    "sentence": ["el {s} es {c}", "hay un {s} {c}", "{s}, {c}", "el color del {s} es {c}"],
    "prefix": ["una imagen de ", "un dibujo de ", "una foto de ", "una ilustración de ", "dibuja ",
               "por favor, dibuja ", "muéstrame ", "genera "],
    "position": {"centre": ["en el centro", "en el medio"], "top left": ["arriba a la izquierda"],
                 "top right": ["arriba a la derecha"], "bottom left": ["abajo a la izquierda"],
                 "bottom right": ["abajo a la derecha"]},
    "background": {"white": ["sobre fondo blanco"], "black": ["sobre fondo negro"], "grey": ["sobre fondo gris"],
                   "noisy": ["sobre un fondo ruidoso", "sobre un fondo recargado"]},
    "joiner": [" ", ", "],
    "long": [
        "Es un dibujo plano y sencillo con un solo {s} {c} y nada más en el encuadre.",
        "El {s} está relleno de un {c} uniforme y tiene bordes limpios y nítidos.",
        "La figura es {z_plain} y está {p}, y la composición es mínima.",
        "El fondo es {b_plain}, así que el {s} {c} destaca con claridad.",
        "No hay texto, ni sombra, ni degradado, ni ningún otro objeto en la imagen.",
        "El estilo es el de una ilustración de un libro infantil, simple, geométrico y amable.",
        "Cada píxel del {s} tiene el mismo tono {c}, y el contorno no está dibujado aparte.",
    ],
    "bg_plain": {"white": "blanco", "black": "negro", "grey": "gris", "noisy": "ruidoso y recargado"},
    "z_plain": {"small": "pequeña", "medium": "mediana", "large": "grande"},
}

_JA = {
    # adjective form (赤い円) and noun form (赤色の円)
    "colour": {"red": ["赤い", "赤色の"], "green": ["緑の", "緑色の"], "blue": ["青い", "青色の"], "yellow": ["黄色い", "黄色の"]},
    "colour_noun": {"red": "赤", "green": "緑", "blue": "青", "yellow": "黄色"},
    "shape": {"circle": ["円", "丸", "円形"], "square": ["正方形", "四角形", "四角"], "triangle": ["三角形", "三角"]},
    "size": {"small": ["小さい", "小さな"], "medium": ["中くらいの"], "large": ["大きい", "大きな"]},
    "core": [
        "{c}{s}", "{c}{s}", "一つの{c}{s}", "{z}{c}{s}", "{C}の{s}", "色が{C}の{s}",
    ],
    "sentence": ["{s}は{C}です", "{c}{s}があります", "{s}、{C}", "{c}{s}が一つ", "{c}{s}を描いて", "{c}{s}の絵"],
    "prefix": ["絵：", "イラスト：", "画像：", "写真：", "描いて：", "次を描いてください："],
    "position": {"centre": ["中央に", "真ん中に"], "top left": ["左上に"], "top right": ["右上に"],
                 "bottom left": ["左下に"], "bottom right": ["右下に"]},
    "background": {"white": ["白い背景", "白い背景の上"], "black": ["黒い背景", "黒い背景の上"],
                   "grey": ["灰色の背景", "グレーの背景"], "noisy": ["ごちゃごちゃした背景", "ノイズのある背景"]},
    "joiner": ["、", " ", "、"],
    "long": [
        "これはシンプルな平面の絵で、画面には{c}{s}が一つだけあり、ほかには何もありません。",
        "その{s}は均一な{C}で塗られていて、輪郭はくっきりとしています。",
        "図形の大きさは{z_plain}で、{p}あり、構図はとても簡潔です。",
        "背景は{b_plain}なので、{c}{s}がはっきりと目立ちます。",
        "文字も影もグラデーションもなく、ほかの物体も一切ありません。",
        "子ども向けの絵本の挿絵のような、シンプルで幾何学的でやさしいスタイルです。",
        "{s}のすべての画素が同じ{C}で、輪郭線は別に描かれていません。",
    ],
    "bg_plain": {"white": "白", "black": "黒", "grey": "灰色", "noisy": "ごちゃごちゃ"},
    "z_plain": {"small": "小さめ", "medium": "中くらい", "large": "大きめ"},
}

LEXICON = {"en": _EN, "zh": _ZH, "fr": _FR, "de": _DE, "es": _ES, "ja": _JA}


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
    if not is_sentence and rng.random() < 0.35:
        text = rng.choice(lex["prefix"]) + text
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
    text = _tidy(text)
    if rng.random() < 0.3:
        text = text[:1].upper() + text[1:]
    if rng.random() < 0.2:
        text += "。" if lang in ("zh", "ja") else "."
    return text


def parallel_captions(scene: Scene, rng: random.Random) -> dict[str, str]:
    """The same scene in every language, mentioning the same details (a parallel sample)."""
    long = rng.random() < 0.05
    details = tuple(d for d in ("position", "background", "size") if rng.random() < 0.3)
    return {lang: caption(lang, scene, rng, details, long) for lang in LANGUAGES}


# Plain phrasings a user would type, per language: the demo's evaluation prompts.
PLAIN_PROMPTS = {
    "en": ["a {colour} {shape}", "{colour} {shape}"],
    "zh": ["一个{colour}的{shape}", "{colour}{shape}"],
    "fr": ["un {shape} {colour}", "{shape} {colour}"],
    "de": ["ein {colour_nom} {shape}", "{colour_nom} {shape}"],
    "es": ["un {shape} {colour}", "{shape} {colour}"],
    "ja": ["{colour}{shape}", "{colour}{shape}の絵"],
}


def plain_prompts(lang: str) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour x shape x plain template of `lang`."""
    lex = LEXICON[lang]
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            noun = lex["shape"][shape][0]
            word = lex["colour"][colour]
            word = word[0] if isinstance(word, list) else word
            fields = {"colour": word, "shape": noun}
            if lang == "de":
                fields["colour_nom"] = _de_fields(word, noun, "")["c_nom"]
            for template in PLAIN_PROMPTS[lang]:
                out.append((template.format(**fields), colour, shape))
    return out


# ----------------------------------------------------------------------------- reading images back


def dominant_colour(image: Image.Image | np.ndarray, min_saturation: int = 60) -> str | None:
    """The demo colour most pixels are closest to, among saturated pixels (None: nothing drawn)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).reshape(-1, 3).astype(np.float32)
    saturated = rgb.max(1) - rgb.min(1) >= min_saturation
    if saturated.sum() < 2:
        return None
    px = rgb[saturated]
    palette = np.array([RGB[c] for c in COLOURS], np.float32)
    # Compare chromaticity (colour direction), not brightness.
    px_c = px - px.mean(1, keepdims=True)
    pal_c = palette - palette.mean(1, keepdims=True)
    sim = (px_c / (np.linalg.norm(px_c, axis=1, keepdims=True) + 1e-6)) @ (pal_c / np.linalg.norm(pal_c, axis=1, keepdims=True)).T
    votes = np.bincount(sim.argmax(1), minlength=len(COLOURS))
    return COLOURS[int(votes.argmax())]


def shape_mask(image: Image.Image, min_saturation: int = 60) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    return (rgb.max(2) - rgb.min(2)) >= min_saturation


def classify_shape(image: Image.Image) -> str | None:
    """Circle, square or triangle from how much of its bounding box the shape fills."""
    mask = shape_mask(image)
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    # square ~1.0, circle ~0.79, triangle ~0.5 (blurred at 16 px, hence the wide bands)
    if fill > 0.86:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def aesthetic_measure(image: Image.Image) -> float:
    """The demo's aesthetic score read back from pixels (same scale as Scene.aesthetic_score)."""
    mask = shape_mask(image)
    side = mask.shape[0]
    grey = np.asarray(image.convert("L")).astype(np.float32)
    if mask.sum() < 2:
        return 0.0
    ys, xs = np.nonzero(mask)
    radius = np.sqrt(mask.sum() / np.pi) / side
    size_term = float(np.clip((radius - 0.16) / (0.40 - 0.16), 0, 1))
    centre = np.hypot(xs.mean() / side + 0.5 / side - 0.5, ys.mean() / side + 0.5 / side - 0.5)
    centre_term = float(1.0 - min(1.0, centre / 0.32))
    background = grey[~mask]
    clean_term = float(np.clip(1.0 - background.std() / 40.0, 0, 1)) if background.size else 1.0
    return round(10.0 * (0.4 * size_term + 0.4 * centre_term + 0.2 * clean_term), 3)


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
) -> list[Path]:
    """Write parallel text shards and, with images, the img2dataset layout for the later stages.

    Text: ``KEY.txt`` (English) with the other languages in ``KEY.<lang>.txt`` or, with
    `parallel_in_json` (one tar member instead of five: shards 3x smaller), in ``KEY.json``.
    Images: ``KEY.png`` + ``KEY.txt`` + ``KEY.json`` (captions per language, aesthetic score).
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
                scene = sample_scene(rng)
                captions = parallel_captions(scene, rng)
                sample = {"__key__": f"{i:08d}", "txt": captions["en"]}
                if with_images:
                    sample["png"] = _png_bytes(render(scene, image_size, rng))
                    sample["json"] = json.dumps(
                        {
                            "caption": captions["en"],
                            "captions": captions,
                            "width": image_size,
                            "height": image_size,
                            "aesthetic_score": scene.aesthetic_score(),
                            "colour": scene.colour,
                            "shape": scene.shape,
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


def ensure_demo_data(kind: str, root: str | Path | None = None, image_size: int = 16) -> Path:
    """Generate one part of the demo data set on first use; return its folder.

    `kind` "text": ``train-*.tar`` / ``val-*.tar`` parallel text shards (stage 1); "images":
    the image-text shards (stages 2-3). A marker file records the generator version, so a
    changed generator rebuilds it and a half-finished build is redone. Safe when several
    processes ask at once (the ranks of a job, other jobs sharing the cache): one generates
    under a lock, the others wait and reuse its shards.
    """
    if kind not in ("text", "images"):
        raise ValueError(f"demo data kind must be 'text' or 'images', got {kind!r}")
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
        write_demo_shards(folder, num_samples=8000, samples_per_shard=1000, seed=3, image_size=image_size,
                          prefix="train", with_images=True)
        write_demo_shards(folder, num_samples=400, samples_per_shard=200, seed=4, image_size=image_size,
                          prefix="val", with_images=True)


def demo_shard_urls(stage: int, split: str) -> str:
    """Brace-expanded URLs of the demo shards a stage reads (generating them on first use)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if stage == 1:
        folder = ensure_demo_data("text")
        return str(folder / ("train-{00000..00011}.tar" if split == "train" else "val-00000.tar"))
    folder = ensure_demo_data("images")
    return str(folder / ("train-{00000..00007}.tar" if split == "train" else "val-{00000..00001}.tar"))
