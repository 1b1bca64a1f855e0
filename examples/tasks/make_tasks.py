"""Write the two real-model tasks that ship in examples/tasks/, as `messages` JSONL files.

Run from the repository root (the output is deterministic, so re-running changes nothing):

    .venv/bin/python examples/tasks/make_tasks.py

Each task has exact answers and three files:
  train.jsonl     the training rows
  test.jsonl      held-out rows written like the training rows, but every entity (person, city,
                  item, table value) comes from a pool that no training row uses
  test_ood.jsonl  held-out rows further from training: sentence templates never seen in
                  training, and field values outside the training range

orders  pull a customer's order out of a free-text message as four `key: value` lines in a fixed
        order (name, city, item, quantity). The base model answers in prose, JSON or with other
        keys; the adapter learns the format and to copy the values. A value after "key: " is
        written with the same tokens as in the message (" Oslo"), so copying it needs no spelling;
        in JSON ("city": "Oslo") a 135M model has to re-spell every word it has not seen in training.
sql     turn a question about a small shop database into one SQL query in a fixed style
        (upper-case keywords, single-quoted strings, a closing semicolon).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
TRAIN_ROWS = 240

FIRST = ["Priya", "Tomas", "Aiko", "Lena", "Omar", "Sofia", "Mateo", "Chloe", "Ivan", "Amara", "Lucas", "Mei",
         "Noah", "Zara", "Elif", "Jonas", "Nadia", "Felix", "Ines", "Kofi", "Hana", "Diego", "Freya", "Ravi",
         "Maya", "Emil", "Leila", "Oscar", "Yara", "Bruno", "Sana", "Hugo", "Alma", "Tariq", "Vera", "Pablo",
         "Ingrid", "Kenji", "Nora", "Luca", "Esme", "Arjun", "Greta", "Malik", "Rosa", "Sven", "Dalia",
         "Theo", "Aaron", "Abel", "Adele", "Agnes", "Ahmed", "Alba", "Alice", "Anton", "Anya", "Astrid",
         "Axel", "Beatriz", "Bilal", "Camila", "Carla", "Cyrus", "Dario", "Dev", "Edgar", "Elena", "Elias",
         "Emma", "Erik", "Ezra", "Fatima", "Flora", "Gabriel", "Gemma", "Hassan", "Helga", "Ida", "Iris",
         "Isaac", "Jamal", "Jana", "Joel", "Julia", "Kai", "Karim", "Klara", "Laila", "Leon", "Lila", "Linus",
         "Lorenzo", "Maja", "Marco", "Marta", "Milo", "Mira", "Nico", "Nils", "Olga", "Otto", "Paula",
         "Petra", "Quinn", "Rafael", "Rania", "Rita", "Ruben", "Samir", "Sara", "Selin", "Simon", "Stella",
         "Tara", "Tobias", "Uma", "Vikram", "Wanda", "Xavier", "Yusuf", "Zoe"]
LAST = ["Natarajan", "Novak", "Tanaka", "Fischer", "Haddad", "Rossi", "Garcia", "Martin", "Petrov", "Okafor",
        "Silva", "Chen", "Walsh", "Khan", "Yilmaz", "Berg", "Aziz", "Wagner", "Costa", "Mensah", "Sato",
        "Lopez", "Lund", "Mehta", "Cohen", "Nilsson", "Farah", "Dubois", "Santos", "Moreau", "Iqbal",
        "Kovacs", "Romero", "Hansen", "Nakamura", "Larsen", "Ortiz", "Popescu", "Keller", "Ward", "Reyes",
        "Sandoval", "Adams", "Ahmed", "Alvarez", "Andersen", "Baker", "Banerjee", "Bauer", "Becker",
        "Bianchi", "Brown", "Campbell", "Carter", "Castro", "Clarke", "Diaz", "Dimitrov", "Eriksson", "Evans",
        "Ferrari", "Flores", "Fontaine", "Fraser", "Gomez", "Greco", "Gupta", "Hall", "Hoffmann", "Holm",
        "Ibrahim", "Jensen", "Jones", "Kim", "Klein", "Kumar", "Lambert", "Lee", "Lewis", "Marino", "Meyer",
        "Molina", "Morales", "Murphy", "Nguyen", "Novikov", "Olsen", "Park", "Patel", "Perez", "Quinn",
        "Ramos", "Reid", "Richter", "Rivera", "Russo", "Schmidt", "Schulz", "Shah", "Singh", "Smith",
        "Suzuki", "Torres", "Vargas", "Vogel", "Weber", "Wilson", "Wong", "Young", "Zhang", "Ziegler"]
CITIES = ["Lisbon", "Denver", "Osaka", "Leeds", "Cairo", "Porto", "Quito", "Lyon", "Tallinn", "Accra",
          "Perth", "Bergen", "Austin", "Krakow", "Hobart", "Seville", "Turin", "Dublin", "Nairobi", "Bilbao",
          "Malmo", "Lagos", "Boise", "Ghent", "Split", "Graz", "Kyoto", "Tucson", "Zurich", "Riga", "Antwerp",
          "Halifax", "Cusco", "Dakar", "Galway", "Mumbai", "Salta", "Tromso", "Utrecht", "Valencia",
          "Windhoek", "Yokohama", "Aarhus", "Adelaide", "Bologna", "Bremen", "Brno", "Calgary", "Cardiff",
          "Chennai", "Cordoba", "Dresden", "Durban", "Fresno", "Gdansk", "Geneva", "Glasgow", "Hanoi",
          "Havana", "Helsinki", "Houston", "Innsbruck", "Izmir", "Jaipur", "Kampala", "Kaunas", "Kochi",
          "Leipzig", "Lima", "Linz", "Lublin", "Madison", "Malaga", "Marseille", "Medellin", "Memphis",
          "Mombasa", "Montreal", "Nantes", "Naples", "Oaxaca", "Odense", "Omaha", "Oslo", "Ottawa", "Palermo",
          "Pisa", "Pune", "Quebec", "Recife", "Reno", "Rosario", "Sapporo", "Seattle", "Sendai", "Sofia",
          "Tampere", "Toledo", "Toulouse", "Tunis", "Uppsala", "Verona", "Vilnius", "Wellington", "Wroclaw",
          "Zagreb", "Amsterdam", "Athens", "Auckland", "Baghdad", "Bangkok", "Barcelona", "Beirut", "Belfast",
          "Belgrade", "Berlin", "Bogota", "Boston", "Bratislava", "Brisbane", "Brussels", "Bucharest",
          "Budapest", "Buenos Aires", "Canberra", "Cape Town", "Caracas", "Casablanca", "Chicago",
          "Copenhagen", "Dallas", "Delhi", "Detroit", "Dhaka", "Dubai", "Edinburgh", "Florence", "Frankfurt",
          "Hamburg", "Hong Kong", "Istanbul", "Jakarta", "Johannesburg", "Karachi", "Kyiv", "Kolkata",
          "Kuala Lumpur", "La Paz", "Las Vegas", "London", "Los Angeles", "Madrid", "Manila", "Melbourne",
          "Mexico City", "Miami", "Milan", "Minsk", "Montevideo", "Moscow", "Munich", "New York", "Nice",
          "Paris", "Phoenix", "Prague", "Rome", "San Diego", "Santiago", "Sao Paulo", "Seoul", "Shanghai",
          "Singapore", "Stockholm", "Sydney", "Taipei", "Tehran", "Tokyo", "Toronto", "Vancouver", "Vienna",
          "Warsaw", "Winnipeg", "Amman", "Baku", "Tbilisi", "Yerevan", "Almaty", "Tashkent", "Kathmandu",
          "Colombo", "Yangon", "Hamilton", "Dundee", "Aberdeen", "Bristol", "Oxford", "Cambridge", "York",
          "Bordeaux", "Lille", "Strasbourg", "Rotterdam", "Hanover", "Cologne", "Stuttgart", "Nuremberg",
          "Salzburg", "Basel", "Bern", "Lausanne", "Lucerne", "Bergamo", "Genoa", "Trieste", "Granada",
          "Cadiz", "Murcia", "Coimbra", "Faro", "Braga"]
# Items are built from two disjoint word lists, so held-out items are new phrases, not only new picks.
ITEM_WORDS = ["green", "black", "smoked", "dried", "organic", "spiced", "roasted", "wild", "salted", "sweet",
              "golden", "red", "white", "honey", "lemon", "mint", "ginger", "garlic", "toasted", "raw",
              "pickled", "creamy", "crunchy", "bitter", "fresh", "sour", "mild", "hot", "vanilla", "cocoa",
              "almond", "apple", "baked", "banana", "berry", "blue", "brown", "cherry", "chili", "cinnamon",
              "classic", "coconut", "cold", "crispy", "dark", "double", "fig", "grilled", "herbal",
              "hazelnut", "lime", "maple", "nutty", "orange", "peach", "pepper", "plain", "purple", "rustic",
              "sesame", "silver", "smoky", "soft", "spicy", "strong", "sunny", "tangy", "tropical", "warm",
              "whole", "yellow", "zesty"]
ITEM_NOUNS = ["tea", "rice", "beans", "almonds", "lentils", "pasta", "granola", "walnuts", "cashews",
              "chickpeas", "raisins", "oats", "olives", "crackers", "noodles", "peppers", "mustard", "jam",
              "cookies", "coffee", "salsa", "pesto", "quinoa", "barley", "dates", "figs", "prunes",
              "pretzels", "biscuits", "syrup", "bread", "butter", "cereal", "cheese", "chips", "chutney",
              "cocoa", "couscous", "crisps", "flour", "fudge", "gnocchi", "honey", "hummus", "ketchup",
              "muesli", "muffins", "nuts", "paprika", "peanuts", "popcorn", "porridge", "ravioli", "rolls",
              "saffron", "sauce", "seeds", "soup", "spices", "sugar", "toffee", "tortillas", "vinegar",
              "wafers", "waffles", "yogurt"]
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
ORDER_PROMPT = "Extract the order's name, city, item and quantity, one 'key: value' line each.\n\n{message}"

TABLES = {  # table -> (columns a question filters on, columns it selects, number columns)
    "customers": (["city", "country"], ["name", "email"], ["age"]),
    "products": (["category", "brand"], ["name", "sku"], ["price", "stock"]),
    "orders": (["city", "country"], ["id", "status"], ["total", "quantity"]),
}
COUNTRIES = ["Chile", "Kenya", "Norway", "Peru", "Japan", "Ghana", "Spain", "Canada", "Poland", "Egypt",
             "Nepal", "Ireland", "Austria", "Brazil", "Greece", "Mexico", "Finland", "Vietnam", "Morocco",
             "Uruguay"]
CATEGORIES = ["books", "garden", "toys", "kitchen", "music", "sports", "games", "tools", "bikes", "shoes",
              "lamps", "paint", "maps", "tents", "rugs", "clocks", "hats", "pens", "cups", "soap"]
BRANDS = ["Acme", "Nordlys", "Kestrel", "Umbra", "Solano", "Vireo", "Tamarind", "Quokka", "Halcyon", "Brisa",
          "Corvid", "Zephyr", "Lumen", "Marlow", "Osprey", "Pinto", "Rocket", "Saffron", "Tundra", "Wren"]
FILTER_VALUES = {"city": CITIES, "country": COUNTRIES, "category": CATEGORIES, "brand": BRANDS}
SQL_TEMPLATES = [
    ("How many {table} have {col} '{val}'?", "SELECT COUNT(*) FROM {table} WHERE {col} = '{val}';"),
    ("List the {ncol} of {table} whose {col} is '{val}'.",
     "SELECT {ncol} FROM {table} WHERE {col} = '{val}';"),
    ("Show all {table} with {num} above {n}.", "SELECT * FROM {table} WHERE {num} > {n};"),
    ("What is the average {num} of {table} with {col} '{val}'?",
     "SELECT AVG({num}) FROM {table} WHERE {col} = '{val}';"),
    ("Count the {table} whose {num} is below {n}.", "SELECT COUNT(*) FROM {table} WHERE {num} < {n};"),
    ("Give the highest {num} among {table} with {col} '{val}'.",
     "SELECT MAX({num}) FROM {table} WHERE {col} = '{val}';"),
]
SQL_TEMPLATES_OOD = [
    ("I need every row of {table} where {col} equals '{val}'.",
     "SELECT * FROM {table} WHERE {col} = '{val}';"),
    ("Among {table} with {col} '{val}', what is the lowest {num}?",
     "SELECT MIN({num}) FROM {table} WHERE {col} = '{val}';"),
    ("Sum the {num} of {table} whose {col} is '{val}'.",
     "SELECT SUM({num}) FROM {table} WHERE {col} = '{val}';"),
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
    answer = f"name: {name}\ncity: {city}\nitem: {item}\nquantity: {q}"
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


def build_orders(seed: str, train_rows: int) -> dict[str, list[dict]]:
    pool_rng = random.Random(f"{seed}:pools")
    train_pools, test_pools = {}, {}
    for key, pool in (("first", FIRST), ("last", LAST), ("city", CITIES), ("item_word", ITEM_WORDS),
                      ("item_noun", ITEM_NOUNS)):
        train_pools[key], test_pools[key] = split_pool(pool, pool_rng)
    train, test, ood = (random.Random(f"{seed}:{split}") for split in ("train", "test", "test_ood"))
    return {
        "train": unique_rows(lambda: order_row(train, train_pools, ORDER_TEMPLATES, range(1, 13)),
                             train_rows),
        "test": unique_rows(lambda: order_row(test, test_pools, ORDER_TEMPLATES, range(1, 13)), 100),
        "test_ood": unique_rows(lambda: order_row(ood, test_pools, ORDER_TEMPLATES_OOD, range(13, 60)), 60),
    }


def build_sql(seed: str, train_rows: int) -> dict[str, list[dict]]:
    pool_rng = random.Random(f"{seed}:pools")
    train_values, test_values = {}, {}
    for col, pool in FILTER_VALUES.items():
        train_values[col], test_values[col] = split_pool(pool, pool_rng)
    train, test, ood = (random.Random(f"{seed}:{split}") for split in ("train", "test", "test_ood"))
    numbers, ood_numbers = range(10, 100, 5), range(100, 1000, 7)
    return {
        "train": unique_rows(lambda: sql_row(train, train_values, SQL_TEMPLATES, numbers), train_rows),
        "test": unique_rows(lambda: sql_row(test, test_values, SQL_TEMPLATES, numbers), 100),
        "test_ood": unique_rows(lambda: sql_row(ood, test_values, SQL_TEMPLATES_OOD, ood_numbers), 60),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_rows", type=int, default=TRAIN_ROWS, help="training rows per task")
    parser.add_argument("--out", type=Path, default=HERE, help="folder that receives orders/ and sql/")
    args = parser.parse_args(argv)
    for task, build in (("orders", build_orders), ("sql", build_sql)):
        for split, rows in build(f"{SEED}:{task}", args.train_rows).items():
            write_jsonl(args.out / task / f"{split}.jsonl", rows)
            print(f"wrote {len(rows):4d} rows to {args.out / task / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
