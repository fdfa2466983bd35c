"""Write json_answers.jsonl: prompt/response pairs for a small instruction task, "answer in a fixed JSON shape".

Each prompt asks for the city and the country named in one sentence; each response is exactly
`{"city": "...", "country": "..."}`. Sentences come from templates crossed with real cities, sampled with a
fixed seed, so running this script again writes the same bytes (a unit test checks it).

    python src/graftune/data/builtin/make_json_answers.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
ROWS = 240
INSTRUCTION = "Extract the city and country as JSON:"

CITIES = [
    ("Lyon", "France"), ("Marseille", "France"), ("Paris", "France"), ("Toulouse", "France"),
    ("Munich", "Germany"), ("Hamburg", "Germany"), ("Berlin", "Germany"), ("Cologne", "Germany"),
    ("Milan", "Italy"), ("Naples", "Italy"), ("Turin", "Italy"), ("Florence", "Italy"),
    ("Seville", "Spain"), ("Valencia", "Spain"), ("Bilbao", "Spain"), ("Madrid", "Spain"),
    ("Porto", "Portugal"), ("Lisbon", "Portugal"), ("Rotterdam", "Netherlands"), ("Utrecht", "Netherlands"),
    ("Antwerp", "Belgium"), ("Ghent", "Belgium"), ("Zurich", "Switzerland"), ("Geneva", "Switzerland"),
    ("Vienna", "Austria"), ("Salzburg", "Austria"), ("Krakow", "Poland"), ("Gdansk", "Poland"),
    ("Prague", "Czechia"), ("Brno", "Czechia"), ("Gothenburg", "Sweden"), ("Malmo", "Sweden"),
    ("Bergen", "Norway"), ("Oslo", "Norway"), ("Aarhus", "Denmark"), ("Tampere", "Finland"),
    ("Manchester", "United Kingdom"), ("Edinburgh", "United Kingdom"), ("Cork", "Ireland"), ("Galway", "Ireland"),
    ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Sapporo", "Japan"), ("Busan", "South Korea"),
    ("Chengdu", "China"), ("Shanghai", "China"), ("Mumbai", "India"), ("Pune", "India"),
    ("Chiang Mai", "Thailand"), ("Hanoi", "Vietnam"), ("Cebu", "Philippines"), ("Bandung", "Indonesia"),
    ("Melbourne", "Australia"), ("Perth", "Australia"), ("Auckland", "New Zealand"), ("Toronto", "Canada"),
    ("Vancouver", "Canada"), ("Chicago", "United States"), ("Denver", "United States"), ("Monterrey", "Mexico"),
    ("Guadalajara", "Mexico"), ("Medellin", "Colombia"), ("Cusco", "Peru"), ("Valparaiso", "Chile"),
    ("Cordoba", "Argentina"), ("Recife", "Brazil"), ("Curitiba", "Brazil"), ("Marrakesh", "Morocco"),
    ("Alexandria", "Egypt"), ("Nairobi", "Kenya"), ("Lagos", "Nigeria"), ("Durban", "South Africa"),
    ("Izmir", "Turkey"), ("Tbilisi", "Georgia"), ("Haifa", "Israel"), ("Dubai", "United Arab Emirates"),
]  # fmt: skip

TEMPLATES = [
    "I flew from {city}, {country} last week.",
    "My sister just moved to {city} in {country}.",
    "The conference will be held in {city}, {country} next spring.",
    "We spent three days in {country}, mostly around {city}.",
    "Our new office opens in {city} ({country}) on Monday.",
    "The package was shipped from a warehouse in {city}, {country}.",
    "Is it true that the best coffee in {country} is found in {city}?",
    "After the match in {city}, the team left {country} by train.",
    "She was born in {city}, a city in {country}.",
    "Please book me a hotel near the station in {city}, {country}.",
    "The festival in {city} draws visitors from all over {country}.",
    "He works remotely from {city}, {country}, for a company abroad.",
]


def generate(seed: int = SEED, rows: int = ROWS) -> list[dict[str, str]]:
    """`rows` distinct (template, city) combinations drawn with `seed`, as prompt/response records."""
    combos = [(template, city, country) for template in TEMPLATES for city, country in CITIES]
    picked = random.Random(seed).sample(combos, rows)
    return [
        {
            "prompt": f"{INSTRUCTION} {template.format(city=city, country=country)}",
            "response": json.dumps({"city": city, "country": country}),
        }
        for template, city, country in picked
    ]


def render(records: list[dict[str, str]]) -> str:
    """The JSONL text, one record a line."""
    return "".join(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    out = Path(__file__).with_name("json_answers.jsonl")
    out.write_text(render(generate()), encoding="utf-8")
    print(f"wrote {out} ({ROWS} rows)")
