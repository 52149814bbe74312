"""The demo's embedded data: new tokens that carry a learnable signal.

Tool markers follow fixed cues (`?` then `<|tool_call|>`, `)` then `<|tool_result|>`), language
tags close French or German sentences, and `<think>` / `jaxvocab` follow `:` / a backtick. The
tiny model's layers barely mix context, so each new token gets a cue right before it. A
model that has learnt the new rows predicts each new token at its cue; the eval set uses cities,
sentences and numbers the training set never shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NEW_SPECIAL = ["<|tool_call|>", "<|tool_result|>", "<|lang_fr|>", "<|lang_de|>"]
NEW_PLAIN = ["<think>", "jaxvocab"]

_CITIES = [
    "Paris",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Prague",
    "Oslo",
    "Dublin",
    "Lisbon",
    "Warsaw",
    "Athens",
    "Zurich",
    "Munich",
    "Milan",
    "Porto",
    "Krakow",
    "Seville",
    "Geneva",
    "Hamburg",
    "Bordeaux",
]
_EVAL_CITIES = ["Lyon", "Turin", "Bergen", "Cork", "Graz", "Brno"]
_FR = [
    "Bonjour, comment allez-vous aujourd'hui ?",
    "Je voudrais un café, s'il vous plaît.",
    "Le train part à huit heures.",
    "Nous allons au marché ce matin.",
    "Il fait très beau ce week-end.",
    "La bibliothèque ferme à dix-huit heures.",
    "Mon frère habite près de la gare.",
    "Elle a acheté des pommes et du pain.",
    "Quelle heure est-il, s'il vous plaît ?",
    "Les enfants jouent dans le jardin.",
]
_DE = [
    "Guten Tag, wie geht es Ihnen heute?",
    "Ich hätte gern einen Kaffee, bitte.",
    "Der Zug fährt um acht Uhr ab.",
    "Wir gehen heute Morgen auf den Markt.",
    "Das Wetter ist am Wochenende schön.",
    "Die Bibliothek schließt um achtzehn Uhr.",
    "Mein Bruder wohnt in der Nähe des Bahnhofs.",
    "Sie hat Äpfel und Brot gekauft.",
    "Wie spät ist es, bitte?",
    "Die Kinder spielen im Garten.",
]
_EVAL_FR = ["Nous prenons le bus demain matin.", "Le musée est fermé le lundi."]
_EVAL_DE = ["Wir nehmen morgen früh den Bus.", "Das Museum ist montags geschlossen."]


def _weather(city: str, rng: random.Random) -> str:
    return (
        f'Q: What is the weather in {city}?<|tool_call|>weather(city="{city}")'
        f"<|tool_result|>{rng.randint(-5, 35)} degrees and {rng.choice(['sunny', 'cloudy', 'rainy'])}."
    )


def _think(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"Let me reason step by step:<think>{a} plus {b} is {a + b}. So the answer is {a + b}."


def _tool(rng: random.Random) -> str:
    fmt = rng.choice(["safetensors", "Meta", "orbax"])
    return f"I converted the {fmt} checkpoint with `jaxvocab` and it loaded on the first try."


def _lines(cities, fr, de, n, seed) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            text = _weather(rng.choice(cities), rng)
        elif kind == 1:
            text = f"{rng.choice(fr)}<|lang_fr|>"
        elif kind == 2:
            text = f"{rng.choice(de)}<|lang_de|>"
        elif kind == 3:
            text = _think(rng)
        else:
            text = _tool(rng)
        out.append({"text": text})
    return out


TRAIN = _lines(_CITIES, _FR, _DE, 400, seed=0)
EVAL = _lines(_EVAL_CITIES, _EVAL_FR, _EVAL_DE, 60, seed=1)
PROBE = (
    " ".join(line["text"] for line in _lines(_CITIES, _FR, _DE, 40, seed=2))
    .replace("<|tool_call|>", "")
    .replace("<|tool_result|>", "")
    .replace("<|lang_fr|>", "")
    .replace("<|lang_de|>", "")
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
