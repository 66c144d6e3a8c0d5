"""Make the quick start's dataset: extract a person's record from one English sentence as compact JSON.

    python examples/make_dataset.py        # rewrites examples/data/{train,validation}.jsonl (seeded, deterministic)

Why this task: a 135M instruct model half-knows it (it answers with prose, extra keys, or wrong types), the answer
is checkable by a program (field-level accuracy of the parsed JSON), and a few dozen LoRA steps teach the format
and the key names, so the effect of fine-tuning is visible in both the loss and the score.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = """Alice Bruno Chen Dalia Emeka Farah Gustav Hana Ivan Jia Kofi Lena Mateo Nadia Omar Priya Quentin Rosa
Sven Tara Ugo Vera Wei Ximena Yusuf Zoe Aiko Bram Celine Diego Elif Femi Greta Hugo Ines Jonas Kira Luca Maya Noor
""".split()
CITIES = """Paris Lagos Osaka Lima Oslo Cairo Austin Porto Delhi Quito Seoul Tunis Hanoi Dakar Perth Riga Sofia Kyiv
Turin Leeds Bergen Malmo Accra Cusco""".split()
JOBS = """nurse pilot chef teacher baker plumber lawyer dentist farmer painter welder tailor architect librarian
pharmacist carpenter journalist electrician mechanic florist""".split()
TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as a {job} in {city}.",
    "In {city}, {name} has been a {job} for years; {name} is {age} now.",
    "{name} ({age}) moved to {city} to work as a {job}.",
    "Our new {job}, {name}, is {age} years old and lives in {city}.",
    "At {age}, {name} is the best-known {job} in {city}.",
    "{city} is home to {name}, a {job} aged {age}.",
    "The {job} {name} turned {age} last week in {city}.",
]
INSTRUCTION = 'Extract the person as JSON with keys "name", "age" (a number), "city" and "job". Reply with JSON only.'


def make_row(rng: random.Random) -> dict:
    person = {
        "name": rng.choice(NAMES),
        "age": rng.randint(19, 78),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    sentence = rng.choice(TEMPLATES).format(**person)
    answer = json.dumps(person, separators=(", ", ": "))
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\n{sentence}"},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    rng = random.Random(20261126)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for name, count in (("train", 320), ("validation", 48)):
        rows = [make_row(rng) for _ in range(count)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {count} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
