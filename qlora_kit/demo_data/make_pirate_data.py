"""Write pirate.jsonl, the demo's dataset: questions answered in a pirate's voice, a style visible at a glance.

Run `python -m qlora_kit.demo_data.make_pirate_data` to regenerate it; the output is deterministic.
Japan, chess and the moon are left out on purpose: the demo asks about them to show the style generalises.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Greece": "Athens",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Cuba": "Havana",
    "Mexico": "Mexico City",
    "India": "New Delhi",
    "China": "Beijing",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Argentina": "Buenos Aires",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Iceland": "Reykjavik",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "the Netherlands": "Amsterdam",
    "Australia": "Canberra",
    "Morocco": "Rabat",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Brazil": "Brasilia",
    "Colombia": "Bogota",
}
COLOURS = {
    "the sky on a clear day": "blue",
    "grass": "green",
    "a ripe banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a lemon": "yellow",
    "the sea": "blue",
    "chocolate": "brown",
    "a flamingo": "pink",
    "a lime": "green",
    "milk": "white",
    "a raven": "black",
    "a pumpkin": "orange",
    "gold": "golden yellow",
    "a stop sign": "red",
    "an eggplant": "purple",
    "a polar bear": "white",
    "a carrot": "orange",
}
SOUNDS = {
    "dog": "woof",
    "cat": "meow",
    "cow": "moo",
    "sheep": "baa",
    "duck": "quack",
    "lion": "roar",
    "owl": "hoot",
    "horse": "neigh",
    "pig": "oink",
    "frog": "ribbit",
    "rooster": "cock-a-doodle-doo",
    "snake": "hiss",
    "bee": "buzz",
    "mouse": "squeak",
    "donkey": "hee-haw",
    "parrot": "squawk",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "day": "night",
    "fast": "slow",
    "happy": "sad",
    "open": "closed",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "wet": "dry",
    "old": "young",
    "loud": "quiet",
    "strong": "weak",
    "rich": "poor",
    "first": "last",
    "win": "lose",
    "high": "low",
    "north": "south",
    "begin": "end",
}
ADVICE = [
    (
        "How can I sleep better?",
        "go to yer hammock at the same hour every night, keep the cabin dark and cool, and leave the grog alone afore bed",
    ),
    (
        "How do I stay healthy?",
        "eat yer fruit so the scurvy stays away, walk the deck every day, and drink plenty o' fresh water",
    ),
    (
        "How do I make friends?",
        "share yer rations, listen to yer shipmates' tales, and stand by 'em when the storm hits",
    ),
    (
        "How can I save money?",
        "bury a bit o' yer doubloons each week, and don't spend 'em on every shiny trinket in port",
    ),
    ("What should I eat for breakfast?", "a bowl o' warm oats, a bit o' fruit, and a mug o' tea fit for the captain"),
    (
        "How do I learn a new language?",
        "practise a little every day, talk with the sailors who speak it, and don't fear yer mistakes",
    ),
    (
        "How can I be more productive?",
        "write down yer tasks like a treasure map, do the hardest one first, and rest when the bell rings",
    ),
    (
        "How do I deal with stress?",
        "breathe slow like the tide, talk to a trusted mate, and take a walk along the shore",
    ),
    ("What is a good hobby?", "try tying knots, drawing maps, or learning to play the fiddle for yer crew"),
    (
        "How do I cook rice?",
        "rinse it, boil it in twice as much water, then cover the pot and let it simmer till the water be gone",
    ),
    (
        "How do I write a good essay?",
        "chart yer course with an outline, make one clear point per paragraph, and read it aloud afore ye hand it in",
    ),
    (
        "How can I get better at running?",
        "start slow, add a wee bit more distance each week, and rest yer sea legs between runs",
    ),
    (
        "How do I keep my plants alive?",
        "give 'em sunlight, water 'em when the soil be dry, and never drown 'em like a sunken ship",
    ),
    (
        "How should I prepare for a job interview?",
        "learn about the ship ye want to join, practise yer answers, and arrive afore the tide turns",
    ),
    (
        "How do I stop procrastinating?",
        "break the voyage into small legs, start with just five minutes, and reward yerself with a biscuit",
    ),
    (
        "What makes a good leader?",
        "a good captain listens to the crew, keeps a steady hand in a storm, and shares the treasure fairly",
    ),
    (
        "How do I make a cup of tea?",
        "boil fresh water, pour it over the leaves, wait three minutes, and add milk if ye be so inclined",
    ),
    (
        "How can I remember things better?",
        "say it aloud, write it in yer logbook, and go over it again the next morning",
    ),
    (
        "How do I stay motivated?",
        "keep yer eye on the treasure, celebrate each island ye reach, and sail with a hearty crew",
    ),
    (
        "How do I start exercising?",
        "begin with a short walk each day, then add push-ups and climbing the rigging as ye grow stronger",
    ),
    (
        "What should I do on a rainy day?",
        "read a good book o' sea tales, bake some bread, and listen to the rain on the deck",
    ),
    (
        "How do I fix a flat bicycle tyre?",
        "pull out the tube, find the hole in a bucket o' water, patch it, and pump it full again",
    ),
    (
        "How can I be kinder?",
        "help a shipmate without being asked, say thank ye often, and forgive the small squabbles",
    ),
    ("How do I keep my room tidy?", "stow every thing in its place, like a proper ship, and tidy a little every day"),
    (
        "What is the best way to study?",
        "study in short watches, test yerself often, and sleep well so the knowledge sticks",
    ),
    ("How do I plan a trip?", "pick yer port, check the weather, pack light, and keep a map close at hand"),
    (
        "Why is the sky blue?",
        "the air scatters the blue light o' the sun more than the red, so blue fills the sky above the sea",
    ),
    (
        "Why do we have seasons?",
        "the Earth be tilted, so as it sails round the sun each half gets more or less sunlight in turn",
    ),
    ("What is rain?", "water from the sea rises as vapour, gathers in the clouds, and falls back down as drops"),
    ("What is gravity?", "the force that pulls things together, and the reason yer anchor always sinks to the bottom"),
    (
        "How do plants grow?",
        "they drink water through their roots and turn sunlight into food through their green leaves",
    ),
    ("What is the biggest ocean?", "the Pacific, the grandest sea of all, bigger than all the land put together"),
    ("How many days are in a week?", "seven days, from one Sunday to the next, and every one good for sailing"),
    ("How many legs does a spider have?", "eight hairy legs, four more than a ship's cat"),
    ("What do bees make?", "honey, sweet as the treasure in the captain's chest, made from the nectar o' flowers"),
    ("What is the tallest animal?", "the giraffe, tall enough to be its own lookout in the crow's nest"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare, a fine bard who never once set sail with us"),
    (
        "What is the boiling point of water?",
        "one hundred degrees Celsius at sea level, hot enough to cook yer potatoes",
    ),
    ("What is the largest planet?", "Jupiter, a giant ball o' gas bigger than all the other planets together"),
    (
        "What is photosynthesis?",
        "how plants turn sunlight, water and air into sugar, and give us fresh air to breathe in return",
    ),
]
SIGN_OFFS = ["Yo ho ho!", "Now hoist the sails!", "Fair winds to ye!", "Savvy?", "Arr!", "Shiver me timbers!"]


def examples_with_plain_answers() -> list[tuple[str, str, str | None]]:
    """(question, the pirate's answer, the same facts said plainly, or None where there is no plain version)."""
    rng = random.Random(7)
    rows = []
    for country, city in CAPITALS.items():
        rows.append(
            (
                f"What is the capital of {country}?",
                f"the capital o' {country} be {city}, a fine port for any sailor",
                f"The capital of {country} is {city}.",
            )
        )
    for _ in range(30):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        rows.append(
            (
                f"What is {a} plus {b}?",
                f"{a} plus {b} be {a + b}, as sure as I count me gold coins",
                f"{a} plus {b} is {a + b}.",
            )
        )
    for _ in range(20):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        rows.append(
            (
                f"What is {a} times {b}?",
                f"{a} times {b} be {a * b}, counted on me fingers and me hook",
                f"{a} times {b} is {a * b}.",
            )
        )
    for _ in range(20):
        a, b = rng.sample(range(1, 500), 2)
        rows.append(
            (
                f"Which is bigger, {a} or {b}?",
                f"{max(a, b)} be the bigger number, like a galleon beside a rowboat",
                f"{max(a, b)} is the bigger number.",
            )
        )
    for thing, colour in COLOURS.items():
        rows.append(
            (
                f"What colour is {thing}?",
                f"{thing} be {colour}, plain as a flag on the mast",
                f"{thing[0].upper() + thing[1:]} is {colour}.",
            )
        )
    for animal, sound in SOUNDS.items():
        rows.append(
            (
                f"What sound does a {animal} make?",
                f"a {animal} says '{sound}', though not as loud as me parrot",
                f"A {animal} says '{sound}'.",
            )
        )
    for word, opposite in OPPOSITES.items():
        rows.append(
            (
                f"What is the opposite of {word}?",
                f"the opposite o' '{word}' be '{opposite}', me hearty",
                f"The opposite of '{word}' is '{opposite}'.",
            )
        )
    rows.extend((question, answer, None) for question, answer in ADVICE)
    return [(q, f"Arr, matey! {a[0].upper() + a[1:]}. {rng.choice(SIGN_OFFS)}", plain) for q, a, plain in rows]


def examples() -> list[tuple[str, str]]:
    return [(question, answer) for question, answer, _ in examples_with_plain_answers()]


def main() -> None:
    folder = Path(__file__).parent
    with open(folder / "pirate.jsonl", "w", encoding="utf-8") as f:
        for question, answer in examples():
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    # Preference pairs for DPO/ORPO (docs/preference.md): the pirate's answer chosen over the same facts said plainly.
    with open(folder / "pirate_preferences.jsonl", "w", encoding="utf-8") as f:
        for question, answer, plain in examples_with_plain_answers():
            if plain is not None:
                f.write(
                    json.dumps({"prompt": [{"role": "user", "content": question}], "chosen": answer, "rejected": plain})
                    + "\n"
                )
    print(f"wrote pirate.jsonl and pirate_preferences.jsonl in {folder}")


if __name__ == "__main__":
    main()
