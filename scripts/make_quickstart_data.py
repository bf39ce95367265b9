"""Write data/quickstart.jsonl: the small instruction dataset that efft's quickstart fine-tunes on.

Every answer has the same distinctive shape, so a short fine-tune visibly changes a model:

    Answer: <the answer>
    Why: <one-line explanation>

The tasks are simple and checkable (arithmetic, unit conversion, word manipulation, capital cities,
comparisons, short definitions); answers are computed here or taken from common public-domain facts.
Held-out prompts (data/heldout_prompts.txt) are never generated as training examples.
Run: python scripts/make_quickstart_data.py  (deterministic; the output is committed).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "quickstart.jsonl"
HELDOUT = ROOT / "data" / "heldout_prompts.txt"

HELDOUT_PROMPTS = [
    "What is 23 plus 48?",
    "What is the capital of Portugal?",
    "Convert 4 kilograms to grams.",
    "Spell the word 'planet' backwards.",
    "Is 91 an even or an odd number?",
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Russia": "Moscow", "the United Kingdom": "London",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens",
    "Turkey": "Ankara", "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "the Philippines": "Manila", "Peru": "Lima", "Colombia": "Bogotá",
    "Cuba": "Havana", "Hungary": "Budapest", "the Czech Republic": "Prague", "Belgium": "Brussels",
    "Morocco": "Rabat", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "New Zealand": "Wellington",
    "Pakistan": "Islamabad", "Saudi Arabia": "Riyadh", "Iceland": "Reykjavík", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Venezuela": "Caracas", "Uruguay": "Montevideo", "Portugal": "Lisbon",
}
HELDOUT_COUNTRIES = {"Portugal"}

# word: (definition, one-line reason)
DEFINITIONS = {
    "ocean": ("A very large body of salt water.", "Oceans cover most of Earth's surface and hold most of its water."),
    "mountain": ("A large natural rise of land with steep sides.", "Mountains stand much higher than the land around them."),
    "island": ("A piece of land surrounded by water.", "Water lies on every side of an island."),
    "desert": ("A dry region that gets very little rain.", "Little rain means few plants can grow there."),
    "forest": ("A large area covered mostly by trees.", "Many trees growing close together make a forest."),
    "volcano": ("An opening in the ground where melted rock comes out.", "Magma from deep inside Earth escapes through it."),
    "planet": ("A large body that travels around a star.", "Earth, for example, travels around the Sun."),
    "moon": ("A natural body that travels around a planet.", "Earth's Moon circles Earth about once a month."),
    "thermometer": ("A tool that measures temperature.", "Its reading rises when things get warmer."),
    "calendar": ("A chart that shows the days, weeks and months of a year.", "People use it to plan and track dates."),
    "library": ("A place where books are kept for people to read or borrow.", "Libraries lend books to their visitors."),
    "bridge": ("A structure that lets people cross over a river, road or valley.", "It carries a path across a gap."),
    "recipe": ("A set of instructions for making a dish.", "It lists the ingredients and the steps to follow."),
    "map": ("A drawing that shows where places are.", "It shows an area from above at a smaller scale."),
    "noun": ("A word that names a person, place or thing.", "Words like 'cat', 'city' and 'book' are nouns."),
    "verb": ("A word that describes an action or a state.", "Words like 'run', 'eat' and 'be' are verbs."),
    "adjective": ("A word that describes a noun.", "In 'a red ball', the word 'red' describes the ball."),
    "triangle": ("A flat shape with three straight sides.", "'Tri' means three, and it has three sides and three corners."),
    "square": ("A flat shape with four equal sides and four right angles.", "All its sides have the same length."),
    "circle": ("A round flat shape where every point is the same distance from the centre.", "That fixed distance is its radius."),
    "herbivore": ("An animal that eats only plants.", "Cows and rabbits, for example, eat plants and not meat."),
    "carnivore": ("An animal that eats meat.", "Lions and wolves, for example, hunt other animals for food."),
    "mammal": ("A warm-blooded animal that feeds its young with milk.", "Dogs, whales and humans are all mammals."),
    "insect": ("A small animal with six legs and a body in three parts.", "Ants, bees and beetles all have six legs."),
    "glacier": ("A huge, slow-moving mass of ice.", "Snow piles up over many years and presses into ice that slowly flows."),
    "harbor": ("A sheltered area of water where ships can stay safely.", "It protects boats from waves and wind."),
    "orchard": ("A piece of land where fruit trees are grown.", "Apples, pears and cherries often grow in orchards."),
    "vaccine": ("A substance that trains the body to fight a disease.", "It helps the immune system recognise a germ before a real infection."),
    "photosynthesis": ("The process plants use to make food from sunlight, water and carbon dioxide.", "Leaves capture light energy and release oxygen."),
    "evaporation": ("The change of a liquid into a gas.", "Heat gives water molecules enough energy to escape into the air."),
    "friction": ("A force that slows down things rubbing against each other.", "Rough surfaces resist sliding over one another."),
    "gravity": ("The force that pulls objects toward each other.", "It is why things fall to the ground on Earth."),
    "synonym": ("A word that means the same as another word.", "'Big' and 'large' are synonyms."),
    "antonym": ("A word that means the opposite of another word.", "'Hot' and 'cold' are antonyms."),
    "century": ("A period of one hundred years.", "'Cent' means hundred, as in 'percent'."),
    "decade": ("A period of ten years.", "'Dec' means ten, as in 'decimal'."),
    "river": ("A large natural stream of water flowing toward a sea or lake.", "Rain and melting snow feed it as it flows downhill."),
}
HELDOUT_DEFINITIONS = set()

WORDS = [
    "garden", "window", "rabbit", "yellow", "pencil", "castle", "button", "silver", "orange", "mirror",
    "basket", "dragon", "forest", "summer", "winter", "candle", "rocket", "turtle", "bottle", "market",
    "lemon", "tiger", "river", "cloud", "apple", "bread", "chair", "house", "light", "music",
    "ocean", "piano", "queen", "smile", "train", "water", "zebra", "horse", "table", "paper",
    "butter", "monkey", "school", "spring", "guitar", "jacket", "kitten", "ladder", "magnet", "needle",
    "pillow", "sugar", "violin", "wallet", "anchor", "bridge", "camera", "doctor", "engine", "flower",
]

UNITS = [
    # (from, to, factor, plural from, plural to)
    ("kilometer", "meter", 1000, "kilometers", "meters"),
    ("meter", "centimeter", 100, "meters", "centimeters"),
    ("kilogram", "gram", 1000, "kilograms", "grams"),
    ("liter", "milliliter", 1000, "liters", "milliliters"),
    ("hour", "minute", 60, "hours", "minutes"),
    ("minute", "second", 60, "minutes", "seconds"),
    ("day", "hour", 24, "days", "hours"),
    ("week", "day", 7, "weeks", "days"),
    ("year", "month", 12, "years", "months"),
]


def ex(instruction: str, answer: str, why: str, inp: str = "") -> dict:
    return {"instruction": instruction, "input": inp, "output": f"Answer: {answer}\nWhy: {why}"}


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        op = rng.choice(["+", "-", "*", "/"])
        if op == "+":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            q = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"What is {a} + {b}?"])
            out.append(ex(q, str(a + b), f"{a} + {b} = {a + b}."))
        elif op == "-":
            a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
            q = rng.choice([f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"What is {a} - {b}?"])
            out.append(ex(q, str(a - b), f"{a} - {b} = {a - b}."))
        elif op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What is {a} x {b}?"])
            out.append(ex(q, str(a * b), f"{a} groups of {b} make {a * b}."))
        else:
            b, c = rng.randint(2, 12), rng.randint(2, 12)
            a = b * c
            q = rng.choice([f"What is {a} divided by {b}?", f"Divide {a} by {b}.", f"What is {a} / {b}?"])
            out.append(ex(q, str(c), f"{b} x {c} = {a}, so {a} / {b} = {c}."))
    return out


def conversions(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        one, other, f, ones, others = rng.choice(UNITS)
        k = rng.randint(2, 15)
        q = rng.choice([f"Convert {k} {ones} to {others}.", f"How many {others} are in {k} {ones}?"])
        out.append(ex(q, f"{k * f} {others}", f"One {one} is {f} {others}, so {k} x {f} = {k * f}."))
    return out


def word_tasks(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        w = rng.choice(WORDS)
        kind = rng.choice(["reverse", "upper", "count", "first", "last", "vowels"])
        if kind == "reverse":
            if rng.random() < 0.5:
                out.append(ex("Spell this word backwards.", w[::-1], f"Reading '{w}' from the last letter to the first gives '{w[::-1]}'.", inp=w))
            else:
                out.append(ex(f"Spell the word '{w}' backwards.", w[::-1], f"Reading '{w}' from the last letter to the first gives '{w[::-1]}'."))
        elif kind == "upper":
            out.append(ex("Write this word in capital letters.", w.upper(), f"Each letter of '{w}' is replaced by its capital form.", inp=w))
        elif kind == "count":
            out.append(ex(f"How many letters are in the word '{w}'?", str(len(w)), f"'{w}' is spelled {'-'.join(w)}, which is {len(w)} letters."))
        elif kind == "first":
            out.append(ex(f"What is the first letter of the word '{w}'?", w[0], f"'{w}' begins with '{w[0]}'."))
        elif kind == "last":
            out.append(ex(f"What is the last letter of the word '{w}'?", w[-1], f"'{w}' ends with '{w[-1]}'."))
        else:
            vowels = [c for c in w if c in "aeiou"]
            out.append(ex(f"How many vowels are in the word '{w}'?", str(len(vowels)), f"The vowels in '{w}' are {', '.join(vowels)}."))
    return out


def capitals() -> list[dict]:
    out = []
    for i, (country, city) in enumerate(CAPITALS.items()):
        if country in HELDOUT_COUNTRIES:
            continue
        name = country[0].upper() + country[1:]
        q = [f"What is the capital of {country}?", f"Name the capital city of {country}.", f"Which city is the capital of {country}?"][i % 3]
        out.append(ex(q, city, f"{city} is the capital city of {country}, where its national government is based."))
        if i % 2 == 0:
            out.append(ex(f"Which country has {city} as its capital?", name, f"{city} is the capital city of {country}."))
    return out


def comparisons_and_parity(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.sample(range(1, 200), 2)
            big = max(a, b)
            out.append(ex(f"Which is larger, {a} or {b}?", str(big), f"{big} is greater than {min(a, b)}."))
        else:
            a = rng.randint(1, 199)
            kind = "even" if a % 2 == 0 else "odd"
            why = f"{a} divided by 2 is {a // 2} with no remainder." if kind == "even" else f"{a} divided by 2 leaves a remainder of 1."
            out.append(ex(f"Is {a} an even or an odd number?", kind.capitalize(), why))
    return out


def definitions() -> list[dict]:
    out = []
    for i, (word, (meaning, why)) in enumerate(DEFINITIONS.items()):
        q = [f"Define the word '{word}'.", f"What does '{word}' mean?", "Give a short definition of this word."][i % 3]
        out.append(ex(q, meaning, why, inp=word if "this word" in q else ""))
    return out


def build() -> list[dict]:
    rng = random.Random(0)
    rows = arithmetic(rng, 130) + conversions(rng, 70) + word_tasks(rng, 90) + capitals() + comparisons_and_parity(rng, 50) + definitions()
    held = set(HELDOUT_PROMPTS)
    # The same question asked another way is held out too (e.g. "Add 23 and 48.").
    held_outputs = {"Answer: 71\nWhy: 23 + 48 = 71.", "Answer: 4000 grams\nWhy: One kilogram is 1000 grams, so 4 x 1000 = 4000.",
                    "Answer: Odd\nWhy: 91 divided by 2 leaves a remainder of 1."}
    seen, unique = set(), []
    for r in rows:
        key = (r["instruction"], r["input"])
        if key in seen or r["instruction"] in held or r["output"] in held_outputs or "planet'" in r["instruction"]:
            continue
        seen.add(key)
        unique.append(r)
    rng.shuffle(unique)
    return unique


def main() -> None:
    rows = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    HELDOUT.write_text("\n".join(HELDOUT_PROMPTS) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} examples to {OUT.relative_to(ROOT)} and {len(HELDOUT_PROMPTS)} held-out prompts to {HELDOUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
