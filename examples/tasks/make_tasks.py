"""Write the two real-model tasks that ship in examples/tasks/, as `messages` JSONL files.

Run from the repository root (the output is deterministic, so re-running changes nothing):

    .venv/bin/python examples/tasks/make_tasks.py

Each task has exact answers and three files:
  train.jsonl     the training rows
  test.jsonl      held-out rows written like the training rows, but every entity (person, city,
                  item, table value) comes from a pool that no training row uses
  test_ood.jsonl  held-out rows further from training: sentence templates never seen in
                  training, and field values outside the training range

orders  pull a customer's order out of a free-text message, as one line of JSON with the keys in
        a fixed order: {"name": ..., "city": ..., "item": ..., "quantity": N}. The base model
        answers in prose or with other keys; the adapter learns the format and to copy the values.
sql     turn a question about a small shop database into one SQL query in a fixed style
        (upper-case keywords, single-quoted strings, a closing semicolon).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

FIRST = ["Priya", "Tomas", "Aiko", "Lena", "Omar", "Sofia", "Mateo", "Chloe", "Ivan", "Amara", "Lucas", "Mei",
         "Noah", "Zara", "Elif", "Jonas", "Nadia", "Felix", "Ines", "Kofi", "Hana", "Diego", "Freya", "Ravi",
         "Maya", "Emil", "Leila", "Oscar", "Yara", "Bruno", "Sana", "Hugo", "Alma", "Tariq", "Vera", "Pablo",
         "Ingrid", "Kenji", "Nora", "Luca", "Esme", "Arjun", "Greta", "Malik", "Rosa", "Sven", "Dalia", "Theo"]
LAST = ["Natarajan", "Novak", "Tanaka", "Fischer", "Haddad", "Rossi", "Garcia", "Martin", "Petrov", "Okafor",
        "Silva", "Chen", "Walsh", "Khan", "Yilmaz", "Berg", "Aziz", "Wagner", "Costa", "Mensah", "Sato",
        "Lopez", "Lund", "Mehta", "Cohen", "Nilsson", "Farah", "Dubois", "Santos", "Moreau", "Iqbal", "Kovacs",
        "Romero", "Hansen", "Nakamura", "Larsen", "Ortiz", "Popescu", "Keller", "Ward", "Reyes", "Sandoval"]
CITIES = ["Lisbon", "Denver", "Osaka", "Leeds", "Cairo", "Porto", "Quito", "Lyon", "Tallinn", "Accra", "Perth",
          "Bergen", "Austin", "Krakow", "Hobart", "Seville", "Turin", "Dublin", "Nairobi", "Bilbao", "Malmo",
          "Lagos", "Boise", "Ghent", "Split", "Graz", "Kyoto", "Tucson", "Zurich", "Riga", "Antwerp", "Halifax",
          "Cusco", "Dakar", "Galway", "Mumbai", "Salta", "Tromso", "Utrecht", "Valencia", "Windhoek", "Yokohama",
          "Aarhus", "Adelaide", "Bologna", "Bremen", "Brno", "Calgary", "Cardiff", "Chennai", "Cordoba", "Dresden",
          "Durban", "Fresno", "Gdansk", "Geneva", "Glasgow", "Hanoi", "Havana", "Helsinki", "Houston", "Innsbruck",
          "Izmir", "Jaipur", "Kampala", "Kaunas", "Kochi", "Leipzig", "Lima", "Linz", "Lublin", "Madison", "Malaga",
          "Marseille", "Medellin", "Memphis", "Mombasa", "Montreal", "Nantes", "Naples", "Oaxaca", "Odense",
          "Omaha", "Oslo", "Ottawa", "Palermo", "Pisa", "Pune", "Quebec", "Recife", "Reno", "Rosario", "Sapporo",
          "Seattle", "Sendai", "Sofia", "Tampere", "Toledo", "Toulouse", "Tunis", "Uppsala", "Verona", "Vilnius",
          "Wellington", "Wroclaw", "Zagreb"]
# Items are built from two disjoint word lists, so held-out items are new phrases, not only new picks.
ITEM_WORDS = ["green", "black", "smoked", "dried", "organic", "spiced", "roasted", "wild", "salted", "sweet",
              "golden", "red", "white", "honey", "lemon", "mint", "ginger", "garlic", "toasted", "raw", "pickled",
              "creamy", "crunchy", "bitter", "fresh", "sour", "mild", "hot", "vanilla", "cocoa"]
ITEM_NOUNS = ["tea", "rice", "beans", "almonds", "lentils", "pasta", "granola", "walnuts", "cashews", "chickpeas",
              "raisins", "oats", "olives", "crackers", "noodles", "peppers", "mustard", "jam", "cookies", "coffee",
              "salsa", "pesto", "quinoa", "barley", "dates", "figs", "prunes", "pretzels", "biscuits", "syrup"]
CONTAINERS = ["jars", "bags", "boxes", "bottles", "packs", "tins"]

ORDER_TEMPLATES = [
    "Hi, this is {name} from {city}. Please send {q} {c} of {item}.",
    "{name} here, in {city}. I'd like {q} {c} of {item}, thanks!",
    "Hello! Could you ship {q} {c} of {item} to {city}? Name: {name}.",
    "Order for {name} ({city}): {q} {c} of {item}.",
    "Good morning, I'm {name} and I live in {city}. I need {q} {c} of {item}.",
    "Please deliver {q} {c} of {item} to {name} in {city}.",
    "{name} from {city} wants {q} {c} of {item}.",
    "Hey, can I get {q} {c} of {item}? I'm {name}, {city}.",
]
ORDER_TEMPLATES_OOD = [
    "Dear shop, my name is {name}. Kindly post {q} {c} of {item} to my address in {city}. Regards.",
    "New request -> customer: {name}; deliver to: {city}; product: {item}; amount: {q} {c}.",
    "Re: restock. {city} branch, contact {name}. We are out of {item} and need {q} {c}.",
]
ORDER_PROMPT = 'Extract the order as JSON with keys name, city, item, quantity.\n\n{message}'

TABLES = {  # table -> (columns a question filters on, columns it selects, number columns)
    "customers": (["city", "country"], ["name", "email"], ["age"]),
    "products": (["category", "brand"], ["name", "sku"], ["price", "stock"]),
    "orders": (["city", "country"], ["id", "status"], ["total", "quantity"]),
}
COUNTRIES = ["Chile", "Kenya", "Norway", "Peru", "Japan", "Ghana", "Spain", "Canada", "Poland", "Egypt", "Nepal",
             "Ireland", "Austria", "Brazil", "Greece", "Mexico", "Finland", "Vietnam", "Morocco", "Uruguay"]
CATEGORIES = ["books", "garden", "toys", "kitchen", "music", "sports", "games", "tools", "bikes", "shoes",
              "lamps", "paint", "maps", "tents", "rugs", "clocks", "hats", "pens", "cups", "soap"]
BRANDS = ["Acme", "Nordlys", "Kestrel", "Umbra", "Solano", "Vireo", "Tamarind", "Quokka", "Halcyon", "Brisa",
          "Corvid", "Zephyr", "Lumen", "Marlow", "Osprey", "Pinto", "Rocket", "Saffron", "Tundra", "Wren"]
FILTER_VALUES = {"city": CITIES, "country": COUNTRIES, "category": CATEGORIES, "brand": BRANDS}
SQL_TEMPLATES = [
    ("How many {table} have {col} '{val}'?", "SELECT COUNT(*) FROM {table} WHERE {col} = '{val}';"),
    ("List the {ncol} of {table} whose {col} is '{val}'.", "SELECT {ncol} FROM {table} WHERE {col} = '{val}';"),
    ("Show all {table} with {num} above {n}.", "SELECT * FROM {table} WHERE {num} > {n};"),
    ("What is the average {num} of {table} with {col} '{val}'?",
     "SELECT AVG({num}) FROM {table} WHERE {col} = '{val}';"),
    ("Count the {table} whose {num} is below {n}.", "SELECT COUNT(*) FROM {table} WHERE {num} < {n};"),
    ("Give the highest {num} among {table} with {col} '{val}'.",
     "SELECT MAX({num}) FROM {table} WHERE {col} = '{val}';"),
]
SQL_TEMPLATES_OOD = [
    ("I need every row of {table} where {col} equals '{val}'.", "SELECT * FROM {table} WHERE {col} = '{val}';"),
    ("Among {table} with {col} '{val}', what is the lowest {num}?",
     "SELECT MIN({num}) FROM {table} WHERE {col} = '{val}';"),
    ("Sum the {num} of {table} whose {col} is '{val}'.", "SELECT SUM({num}) FROM {table} WHERE {col} = '{val}';"),
]
SQL_PROMPT = "Write one SQL query for this question about the shop database.\n\n{question}"


def split_pool(pool: list[str], rng: random.Random, test_share: float = 0.3) -> tuple[list[str], list[str]]:
    """Shuffle a pool and cut it in two disjoint parts (train, test)."""
    items = sorted(pool)
    rng.shuffle(items)
    cut = int(len(items) * (1 - test_share))
    return items[:cut], items[cut:]


def chat_row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def order_row(rng: random.Random, pools: dict, templates: list[str], quantities: range) -> dict:
    name = f"{rng.choice(pools['first'])} {rng.choice(pools['last'])}"
    item = f"{rng.choice(pools['item_word'])} {rng.choice(pools['item_noun'])}"
    city, q = rng.choice(pools["city"]), rng.choice(quantities)
    message = rng.choice(templates).format(name=name, city=city, item=item, q=q, c=rng.choice(CONTAINERS))
    answer = json.dumps({"name": name, "city": city, "item": item, "quantity": q})
    return chat_row(ORDER_PROMPT.format(message=message), answer)


def sql_row(rng: random.Random, values: dict[str, list[str]], templates: list[tuple[str, str]],
            numbers: range) -> dict:
    table = rng.choice(sorted(TABLES))
    filters, selects, nums = TABLES[table]
    question, query = rng.choice(templates)
    col = rng.choice(filters)
    fill = {"table": table, "col": col, "ncol": rng.choice(selects), "num": rng.choice(nums),
            "val": rng.choice(values[col]), "n": rng.choice(numbers)}
    return chat_row(SQL_PROMPT.format(question=question.format(**fill)), query.format(**fill))


def unique_rows(make, count: int) -> list[dict]:
    """Draw rows until `count` distinct ones (a generator may repeat itself)."""
    rows, seen = [], set()
    while len(rows) < count:
        row = make()
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def build_orders(rng: random.Random) -> dict[str, list[dict]]:
    train_pools, test_pools = {}, {}
    for key, pool in (("first", FIRST), ("last", LAST), ("city", CITIES), ("item_word", ITEM_WORDS),
                      ("item_noun", ITEM_NOUNS)):
        train_pools[key], test_pools[key] = split_pool(pool, rng)
    return {
        "train": unique_rows(lambda: order_row(rng, train_pools, ORDER_TEMPLATES, range(1, 13)), 240),
        "test": unique_rows(lambda: order_row(rng, test_pools, ORDER_TEMPLATES, range(1, 13)), 100),
        "test_ood": unique_rows(lambda: order_row(rng, test_pools, ORDER_TEMPLATES_OOD, range(13, 60)), 60),
    }


def build_sql(rng: random.Random) -> dict[str, list[dict]]:
    train_values, test_values = {}, {}
    for col, pool in FILTER_VALUES.items():
        train_values[col], test_values[col] = split_pool(pool, rng)
    return {
        "train": unique_rows(lambda: sql_row(rng, train_values, SQL_TEMPLATES, range(10, 100, 5)), 240),
        "test": unique_rows(lambda: sql_row(rng, test_values, SQL_TEMPLATES, range(10, 100, 5)), 100),
        "test_ood": unique_rows(lambda: sql_row(rng, test_values, SQL_TEMPLATES_OOD, range(100, 1000, 7)), 60),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    for task, build in (("orders", build_orders), ("sql", build_sql)):
        for split, rows in build(random.Random(f"{SEED}:{task}")).items():
            write_jsonl(HERE / task / f"{split}.jsonl", rows)
            print(f"wrote {len(rows):4d} rows to {(HERE / task / f'{split}.jsonl').relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
