"""Write the small example datasets that ship in examples/data/.

Run from the repository root (the output is deterministic, so re-running changes nothing):

    .venv/bin/python examples/data/make_examples.py

Writes:
  train.jsonl   480 conversations in `messages` format (the demo's training set)
  eval.jsonl     48 conversations held out from the same generator (the demo's eval set)
  alpaca.jsonl   64 rows in alpaca `instruction`/`input`/`output` format (tests, docs)

The tasks are short and highly regular (country capitals, one-digit sums, opposites, word
reversal, counting letters) so that LoRA on a tiny random model visibly lowers the loss within a
couple of hundred steps. The answers are facts or exact computations, never model output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima",
    "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow",
    "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Cuba": "Havana", "Ghana": "Accra", "Nepal": "Kathmandu", "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "open": "closed",
    "happy": "sad", "light": "dark", "early": "late", "full": "empty", "old": "new", "hard": "soft",
    "left": "right", "high": "low", "wet": "dry", "rich": "poor", "strong": "weak", "near": "far",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "rain", "bird", "fish", "star", "moon", "road",
         "milk", "rock", "ship", "door", "king", "wolf", "leaf", "snow"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen"]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def capital(rng: random.Random) -> tuple[str, str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice([f"What is the capital of {country}?", f"Name the capital of {country}.",
                           f"Which city is the capital of {country}?"])
    return question, f"The capital of {country} is {CAPITALS[country]}.", "Name the capital of this country.", country


def addition(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    question = rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."])
    return question, f"{a} + {b} = {a + b}.", "Add the two numbers.", f"{a} and {b}"


def opposite(rng: random.Random) -> tuple[str, str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    question = rng.choice([f"What is the opposite of {word}?", f"Give the opposite of the word {word}."])
    return question, f"The opposite of {word} is {OPPOSITES[word]}.", "Give the opposite of the word.", word


def reverse(rng: random.Random) -> tuple[str, str, str, str]:
    word = rng.choice(WORDS)
    question = rng.choice([f"Reverse the word {word}.", f"Spell {word} backwards."])
    return question, f"{word} reversed is {word[::-1]}.", "Reverse the word.", word


def count_letters(rng: random.Random) -> tuple[str, str, str, str]:
    word = rng.choice(WORDS)
    question = f"How many letters are in the word {word}?"
    return question, f"The word {word} has {NUMBER_WORDS[len(word)]} letters.", "Count the letters.", word


TASKS = [capital, addition, opposite, reverse, count_letters]


def conversation(rng: random.Random) -> dict:
    """One row in `messages` format: mostly single-turn, some with a system prompt or two turns."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    for _ in range(2 if rng.random() < 0.15 else 1):
        question, answer, _, _ = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def alpaca_row(rng: random.Random) -> dict:
    _, answer, instruction, item = rng.choice(TASKS)(rng)
    return {"instruction": instruction, "input": item, "output": answer}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    here = Path(__file__).resolve().parent
    rng = random.Random(20240611)
    rows = [conversation(rng) for _ in range(528)]
    write_jsonl(here / "train.jsonl", rows[:480])
    write_jsonl(here / "eval.jsonl", rows[480:])
    write_jsonl(here / "alpaca.jsonl", [alpaca_row(rng) for _ in range(64)])


if __name__ == "__main__":
    main()
