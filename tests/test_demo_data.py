"""The demo data set is generated on first use by every process that asks at once (the ranks of
a SLURM job on a fresh clone, several jobs sharing a cache): nobody may crash, wait forever or
read a half-written shard, and the work is done once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from datamodules import demo_data

ROOT = Path(__file__).resolve().parents[1]

# A child process: the real generator with small shards (and a pause, so that the processes
# are certainly generating at the same time), started together through a "go" file.
CHILD = r"""
import logging, sys, time
from pathlib import Path
from datamodules import demo_data

logging.basicConfig(level=logging.INFO)

mode, root, calls, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
real = demo_data.write_demo_shards

def small(out_dir, **kw):
    with open(calls, "a") as f:
        f.write(kw["prefix"] + "\n")
    time.sleep(2.0)
    kw.update(num_samples=min(kw["num_samples"], 60), samples_per_shard=min(kw["samples_per_shard"], 20))
    return real(out_dir, **kw)

demo_data.write_demo_shards = small
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
if mode == "ensure":
    print(demo_data.ensure_demo_data("text", root))
else:  # the shard writer alone, same shards from every process, no lock
    small(root, num_samples=600, samples_per_shard=300, seed=2, image_size=16, prefix="val", with_images=False)
"""


def _at_once(mode: str, root: Path, n: int = 3) -> tuple[list[subprocess.CompletedProcess], list[str]]:
    calls, go = root.parent / f"{mode}-calls.txt", root.parent / f"{mode}-go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, mode, str(root), str(calls), str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    time.sleep(3)  # every child imported and waiting
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results, calls.read_text().split() if calls.exists() else []


def _samples(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return len({Path(m.name).name.split(".")[0] for m in tar.getmembers()})


def test_processes_generating_at_once_all_succeed_and_generate_once(tmp_path):
    root = tmp_path / "cache"
    results, calls = _at_once("ensure", root)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == str(root / "text")
    assert calls == ["train", "val"], f"the data was generated more than once: {calls}"
    folder = root / "text"
    assert sorted(p.name for p in folder.glob("*.tar")) == ["train-00000.tar", "train-00001.tar", "train-00002.tar",
                                                            "val-00000.tar", "val-00001.tar", "val-00002.tar"]
    assert all(_samples(p) == 20 for p in folder.glob("*.tar"))
    assert (folder / f"COMPLETE-v{demo_data.DATA_VERSION}-16px").is_file()
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
    assert "waiting for it" in "".join(r.stderr for r in results)  # the others waited, then reused


def test_shard_writers_racing_on_the_same_shards_never_collide(tmp_path):
    root = tmp_path / "shards"
    results, calls = _at_once("write", root)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert len(calls) == 3  # all wrote, none had to wait
    assert sorted(p.name for p in root.iterdir()) == ["val-00000.tar", "val-00001.tar", "val-00002.tar"]
    assert all(_samples(p) == 20 for p in root.glob("*.tar"))


def test_generation_goes_on_where_the_filesystem_has_no_locks(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    real = demo_data.write_demo_shards
    monkeypatch.setattr(demo_data, "write_demo_shards",
                        lambda out_dir, **kw: real(out_dir, **{**kw, "num_samples": 10, "samples_per_shard": 10}))
    folder = demo_data.ensure_demo_data("images", tmp_path)
    assert sorted(p.name for p in folder.glob("*.tar")) == ["train-00000.tar", "val-00000.tar"]
    assert (folder / f"COMPLETE-v{demo_data.DATA_VERSION}-16px").is_file()
    assert demo_data.ensure_demo_data("images", tmp_path) == folder  # done: reused


# ----------------------------------------------------------------------------- what the captions say

# The part of each colour's word every form of it contains, per language (German declines,
# Japanese has adjective and noun forms): finding it in a caption finds the colour.
COLOUR_STEMS = {
    "en": {c: c for c in demo_data.COLOURS},
    "zh": {"red": "红", "green": "绿", "blue": "蓝", "yellow": "黄"},
    "fr": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"},
    "de": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb"},
    "es": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo"},
    "ja": {"red": "赤", "green": "緑", "blue": "青", "yellow": "黄"},
}


def test_pair_captions_name_both_colours_in_the_scene_order_in_every_language(tmp_path):
    demo_data.write_demo_shards(tmp_path, num_samples=300, samples_per_shard=300, seed=7, image_size=16,
                                prefix="t", with_images=True)
    pairs = 0
    with tarfile.open(tmp_path / "t-00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    for meta in metas:
        objects = meta["objects"]
        assert len(objects) in (1, 2)
        if len(objects) == 1:
            continue
        pairs += 1
        (c1, s1), (c2, s2) = ((o["colour"], o["shape"]) for o in objects)
        assert c1 != c2 and s1 != s2  # swapping the attributes gives a different, wrong image
        for lang, text in meta["captions"].items():
            low = text.lower()
            first, second = low.find(COLOUR_STEMS[lang][c1]), low.find(COLOUR_STEMS[lang][c2])
            assert 0 <= first < second, (lang, text, objects)
    assert 0.12 * len(metas) < pairs < 0.28 * len(metas)  # PAIR_FRACTION = 0.2


def test_binding_prompts_are_every_pair_of_different_colours_on_different_shapes():
    for lang in demo_data.LANGUAGES:
        prompts = demo_data.binding_prompts(lang)
        assert len(prompts) == 72 and len({text for text, _ in prompts}) == 72
        for text, ((c1, s1), (c2, s2)) in prompts:
            assert c1 != c2 and s1 != s2
            low = text.lower()
            assert 0 <= low.find(COLOUR_STEMS[lang][c1]) < low.find(COLOUR_STEMS[lang][c2]), text
    assert demo_data.binding_prompts("de")[0][0] == "ein roter Kreis und ein grünes Quadrat"  # declined per noun
    assert demo_data.binding_prompts("en")[0][0] == "a red circle and a green square"


def test_no_training_caption_uses_a_held_out_phrasing():
    """The held-out set measures wording the adapter never saw: the words around the colour and
    the shape in each held-out template appear in no caption the demo generator writes."""
    import random
    import re

    from evaluation.demo_eval import heldout_prompts, heldout_templates

    rng = random.Random(0)
    captions = {lang: [] for lang in demo_data.LANGUAGES}
    for _ in range(6000):
        for lang, text in demo_data.parallel_captions(demo_data.sample_any_scene(rng), rng).items():
            captions[lang].append(text.lower())
    for lang, templates in heldout_templates().items():
        corpus = "\n".join(captions[lang])
        for template in templates:
            frame = max((part.strip(" ,.:?!？") for part in re.split(r"\{[a-z_]+\}", template)), key=len)
            assert len(frame) >= 2 and frame.lower() not in corpus, (lang, template, frame)
        prompts = heldout_prompts(lang)
        assert len(prompts) == 12 * len(templates)
        assert not {p.lower() for p, _, _ in prompts} & set(captions[lang])
