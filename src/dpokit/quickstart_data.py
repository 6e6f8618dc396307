"""Synthetic preference pairs for the quickstart: learnable by a tiny random model in minutes.

Every pair is a prompt in TRL conversational format with an explicit prompt::

    {"prompt":   [{"role": "user", "content": "Can you tell me about the moon?"}],
     "chosen":   [{"role": "assistant", "content": "Sure! The moon orbits ... I hope this helps!"}],
     "rejected": [{"role": "assistant", "content": "No. Look it up yourself. ..."}]}

The preference is deliberately simple, so that a model with a few hundred thousand weights
learns it in 150-300 DPO steps: a chosen reply opens politely, stays on the prompt's subject,
states true facts from the table below and closes in one of a few helpful phrasings. A
rejected reply has one visible flaw, drawn from four kinds:

- ``rude``: a rude refusal;
- ``off_topic``: facts about a different subject;
- ``rambling``: repetitive filler around the subject;
- ``wrong_fact``: a false statement from the fact table, closed with false confidence.

About 15% of prompts are multi-turn (user / assistant / user) and about 10% start with a
system message. Replies are 10-40 words. All text comes from the templates and tables in
this file. The same tables seed the built-in tokenizer (:func:`tokenizer_corpus`), so the
quickstart text tokenizes compactly.

Everything is a pure function of ``(n, seed)``: the same arguments give the same rows.
"""

from __future__ import annotations

import random
from typing import Any

# ----------------------------------------------------------------------------- tables

# subject -> (true facts, false facts). Every sentence is written for this project.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "the moon": (
        ("The moon orbits the Earth about once every twenty seven days.",
         "Its pull on the oceans causes the tides.",
         "The same side of the moon always faces us."),
        ("The moon is made of warm soft cheese.", "The moon is much larger than the sun."),
    ),
    "honey bees": (
        ("Honey bees live in large colonies with a single queen.",
         "They turn flower nectar into honey.",
         "Bees dance to tell each other where food is."),
        ("Honey bees live alone at the bottom of the sea.", "Bees make honey out of sand."),
    ),
    "volcanoes": (
        ("A volcano is an opening where molten rock reaches the surface.",
         "Lava cools into new rock over time.",
         "Some volcanoes sleep for centuries before they erupt."),
        ("Volcanoes are filled with ice and snow.", "Volcanoes are giant plants that grow lava."),
    ),
    "rain": (
        ("Rain forms when water vapor in clouds cools and condenses.",
         "The drops grow heavy and fall to the ground.",
         "Rain refills rivers, lakes and the soil."),
        ("Rain comes out of the ground and falls upward.", "Rain is made of tiny pebbles."),
    ),
    "photosynthesis": (
        ("Plants use sunlight to turn water and carbon dioxide into sugar.",
         "Oxygen is released along the way.",
         "It happens mostly in the green parts of leaves."),
        ("Photosynthesis turns moonlight into metal.", "Photosynthesis only happens in rocks."),
    ),
    "the heart": (
        ("The heart pumps blood through the whole body.",
         "A human heart has four chambers.",
         "A resting adult heart beats about seventy times a minute."),
        ("The heart is the organ that digests food.", "The heart beats only once a day."),
    ),
    "bicycles": (
        ("A bicycle has two wheels and is powered by pedals.",
         "Gears make it easier to climb hills.",
         "Riding a bike is good exercise."),
        ("Bicycles run on diesel fuel.", "A bicycle has nine wheels and no pedals."),
    ),
    "the ocean": (
        ("Oceans cover about seventy percent of the Earth.",
         "Sea water is salty because of dissolved minerals.",
         "The deepest parts are dark and very cold."),
        ("The ocean is made of fresh lemonade.", "The ocean covers only a tiny corner of the Earth."),
    ),
    "penguins": (
        ("Penguins are birds that cannot fly but swim very well.",
         "Most of them live in the southern half of the world.",
         "They keep warm with thick feathers and fat."),
        ("Penguins live in hot deserts and fly south.", "Penguins are a kind of fish."),
    ),
    "the sun": (
        ("The sun is the star at the center of our solar system.",
         "Its light takes about eight minutes to reach the Earth.",
         "It is mostly made of hydrogen and helium."),
        ("The sun orbits around the moon.", "The sun is a cold ball of ice."),
    ),
    "bread": (
        ("Bread is made from flour, water and yeast.",
         "Yeast makes the dough rise by releasing gas.",
         "Baking turns the dough into a soft loaf."),
        ("Bread is made by freezing milk.", "Bread rises because it is full of stones."),
    ),
    "magnets": (
        ("A magnet has a north pole and a south pole.",
         "Opposite poles attract and like poles repel.",
         "Magnets pull on iron and steel."),
        ("Magnets attract wood and paper.", "A magnet has no poles at all."),
    ),
    "trees": (
        ("Trees take in carbon dioxide and give off oxygen.",
         "Their roots hold the soil in place.",
         "Counting the rings in a trunk shows its age."),
        ("Trees grow downward into the sky.", "Trees breathe out smoke all day."),
    ),
    "the piano": (
        ("A piano makes sound when small hammers strike strings.",
         "A full piano has eighty eight keys.",
         "It can play melody and harmony together."),
        ("A piano makes sound by blowing air through pipes of sand.", "A piano has only two keys."),
    ),
    "sleep": (
        ("Sleep helps the body and the brain recover.",
         "Most adults need seven to nine hours a night.",
         "Most dreams happen during a stage called REM sleep."),
        ("People need only five minutes of sleep a week.", "Sleep makes the brain stop working forever."),
    ),
    "recycling": (
        ("Recycling turns used materials into new products.",
         "Paper, glass and metal are often recycled.",
         "It saves energy and reduces waste."),
        ("Recycling means throwing everything into the river.", "Recycling uses more trash than it saves."),
    ),
    "earthquakes": (
        ("Earthquakes happen when plates in the crust slip.",
         "Scientists measure them with seismometers.",
         "Strong buildings can be designed to survive them."),
        ("Earthquakes are caused by loud music.", "Earthquakes only happen on the moon."),
    ),
    "clouds": (
        ("Clouds are made of tiny water drops or ice crystals.",
         "They float because the drops are very light.",
         "Dark clouds often bring rain."),
        ("Clouds are made of cotton.", "Clouds are solid enough to stand on."),
    ),
    "dolphins": (
        ("Dolphins are mammals that breathe air.",
         "They live in groups called pods.",
         "They use clicks and whistles to communicate."),
        ("Dolphins are fish that breathe through leaves.", "Dolphins live in trees."),
    ),
    "the internet": (
        ("The internet is a network that links computers around the world.",
         "Data travels across it in small packets.",
         "Web pages are one of the many things it carries."),
        ("The internet is a single cable under one house.", "The internet runs on steam engines."),
    ),
    "gardening": (
        ("Plants need light, water and good soil.",
         "Compost adds nutrients back to the ground.",
         "Watering early in the morning loses less water to the sun."),
        ("Plants grow best in total darkness with salt water.", "Gardens should never be watered."),
    ),
    "the human skeleton": (
        ("An adult skeleton has about two hundred and six bones.",
         "Bones protect the organs and help us move.",
         "The thigh bone is the longest bone in the body."),
        ("Adults have only three bones.", "The skeleton is made of soft rubber."),
    ),
    "coffee": (
        ("Coffee is brewed from roasted coffee beans.",
         "It contains caffeine, which helps people feel alert.",
         "Coffee plants grow best in warm hilly regions."),
        ("Coffee is brewed from crushed rocks.", "Coffee makes people fall asleep at once."),
    ),
    "electricity": (
        ("Electricity is the flow of electric charge.",
         "It moves easily through metals like copper.",
         "Power plants and solar panels produce it."),
        ("Electricity flows best through dry wood.", "Electricity is a kind of liquid water."),
    ),
    "the seasons": (
        ("Seasons happen because the Earth is tilted.",
         "The half tilted toward the sun has summer.",
         "The tilt stays the same all year long."),
        ("Seasons happen because the sun turns off in winter.", "Every place on Earth has summer at once."),
    ),
    "chess": (
        ("Chess is played on a board with sixty four squares.",
         "Each player starts with sixteen pieces.",
         "The goal is to checkmate the other king."),
        ("Chess is won by scoring the most goals.", "Each chess player starts with one piece."),
    ),
    "butterflies": (
        ("Butterflies start life as caterpillars.",
         "A caterpillar forms a chrysalis before it changes.",
         "Adult butterflies drink nectar from flowers."),
        ("Butterflies start life as small fish.", "Butterflies eat only rocks."),
    ),
    "glaciers": (
        ("A glacier is a huge and slow river of ice.",
         "Glaciers form where snow piles up faster than it melts.",
         "They carve deep valleys as they move."),
        ("Glaciers are made of hot sand.", "Glaciers move faster than race cars."),
    ),
    "libraries": (
        ("A library lends books for free.",
         "Many libraries also offer computers and classes.",
         "Books are sorted so that they are easy to find."),
        ("Libraries sell only shoes.", "Libraries do not allow anyone to read."),
    ),
    "vaccines": (
        ("Vaccines train the immune system to recognize a germ.",
         "They help prevent serious illness.",
         "Some vaccines need a booster dose later."),
        ("Vaccines work by changing the color of your eyes.", "Vaccines are a kind of candy."),
    ),
    "rainbows": (
        ("A rainbow appears when sunlight passes through raindrops.",
         "The light splits into many colors.",
         "You see one with the sun behind you."),
        ("Rainbows are painted on the sky at night.", "A rainbow has only one color."),
    ),
    "owls": (
        ("Owls are birds that mostly hunt at night.",
         "They can turn their heads very far.",
         "Soft feathers let them fly almost silently."),
        ("Owls hunt only underwater at noon.", "Owls are a kind of insect."),
    ),
    "saving money": (
        ("Saving money means setting aside part of what you earn.",
         "A simple budget shows where your money goes.",
         "Small regular savings add up over time."),
        ("The best way to save money is to spend all of it.", "Savings always shrink when you add to them."),
    ),
    "the wheel": (
        ("The wheel made it easier to move heavy loads.",
         "Early wheels were solid pieces of wood.",
         "Wheels are used in cars, carts and clocks."),
        ("The wheel was invented last year.", "Wheels work best when they are square."),
    ),
    "snow": (
        ("Snow forms when water vapor freezes into ice crystals.",
         "Snowflakes have six sides.",
         "Fresh snow reflects most of the sunlight."),
        ("Snow falls only on hot summer days.", "Snow is made of white sugar."),
    ),
    "the printing press": (
        ("Before the printing press, books were copied by hand.",
         "It made books cheaper and far more common.",
         "It helped new ideas spread quickly."),
        ("The printing press was invented to print pizza.", "The printing press made books rarer."),
    ),
}

# country -> (capital, a tempting wrong answer)
CAPITALS: dict[str, tuple[str, str]] = {
    "France": ("Paris", "Lyon"),
    "Japan": ("Tokyo", "Osaka"),
    "Canada": ("Ottawa", "Toronto"),
    "Australia": ("Canberra", "Sydney"),
    "Brazil": ("Brasilia", "Rio de Janeiro"),
    "Egypt": ("Cairo", "Alexandria"),
    "Kenya": ("Nairobi", "Mombasa"),
    "Italy": ("Rome", "Milan"),
    "Spain": ("Madrid", "Barcelona"),
    "Germany": ("Berlin", "Munich"),
    "India": ("New Delhi", "Mumbai"),
    "Norway": ("Oslo", "Bergen"),
    "Peru": ("Lima", "Cusco"),
    "Greece": ("Athens", "Sparta"),
    "Turkey": ("Ankara", "Istanbul"),
    "China": ("Beijing", "Shanghai"),
    "Argentina": ("Buenos Aires", "Cordoba"),
    "Portugal": ("Lisbon", "Porto"),
    "Vietnam": ("Hanoi", "Da Nang"),
    "Morocco": ("Rabat", "Casablanca"),
}

TOPIC_PROMPTS = (
    "Can you tell me about {s}?",
    "What should I know about {s}?",
    "Explain {s} in simple terms.",
    "I am curious about {s}. What can you tell me?",
    "Give me a quick overview of {s}.",
    "Tell me something interesting about {s}.",
    "How would you describe {s} to a child?",
    "Please share a few facts about {s}.",
)
CAPITAL_PROMPTS = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Do you know the capital city of {c}?",
    "Quick question: what is the capital of {c}?",
)
SUM_PROMPTS = (
    "What is {a} plus {b}?",
    "Can you add {a} and {b} for me?",
    "How much is {a} plus {b}?",
    "Please work out {a} + {b}.",
)
FOLLOW_UP_OTHER = (
    "Thanks! Can you also tell me about {s}?",
    "Great. Now what about {s}?",
    "Interesting. What should I know about {s}?",
)
FOLLOW_UP_SAME = (
    "Thanks. Tell me more about {s}.",
    "Nice. Anything else about {s}?",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly and patient tutor.",
    "You are a concise assistant. Keep answers short.",
    "You answer questions politely and accurately.",
)

# the chosen style: polite opener, optional pointer to the subject, facts, helpful close
OPENERS = ("Sure!", "Happy to help.", "Good question.", "Of course.", "Great question!", "Glad you asked.")
INTROS = (
    "Here is a short answer about {s}.",
    "Here is what to know about {s}.",
    "Let me explain {s}.",
    "",
)
CLOSINGS = (
    "I hope this helps!",
    "Hope this helps, and feel free to ask more.",
    "Let me know if you would like more detail.",
    "Feel free to ask a follow-up question.",
)

# the flaws
RUDE_OPENERS = ("No.", "Ugh.", "Seriously?", "Not again.", "Whatever.")
RUDE_MIDDLES = (
    "I am not going to explain {s} to you.",
    "Why would I waste my time on {s}?",
    "That is a boring question about {s}.",
    "I do not care about {s} at all.",
)
RUDE_ENDINGS = (
    "Look it up yourself.",
    "Go ask someone else.",
    "Figure it out on your own.",
    "Stop asking me silly questions.",
    "Do not bother me again.",
)
OFF_TOPIC_PIVOTS = (
    "Anyway, let me talk about {o} instead.",
    "Actually, I would rather talk about {o}.",
    "Speaking of something else, consider {o}.",
    "",
)
OFF_TOPIC_ENDINGS = ("That is all.", "Moving on.", "Anyway.", "")
RAMBLE_FILLERS = ("um,", "so,", "like,", "you know,", "well,", "basically,")
CONFIDENT_ENDINGS = ("Trust me on that.", "Everyone knows this.", "That is just a fact.", "No need to check.")
FLAWS = ("rude", "off_topic", "rambling", "wrong_fact")


# ----------------------------------------------------------------------------- helpers


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _fit(parts: list[str], lo: int = 10, hi: int = 40) -> list[str]:
    """Drop parts from the middle until the reply has at most ``hi`` words (never below ``lo``)."""
    while len(_join(*parts).split()) > hi and len(parts) > 2:
        parts = parts[:-2] + parts[-1:]
    return parts


class _Subject:
    """What a prompt asks about: a topic, a capital or a sum, with its true and false facts."""

    def __init__(self, name: str, facts: list[str], wrong: list[str], ask: str):
        self.name = name  # a noun phrase that fits "about {name}"
        self.facts = facts
        self.wrong = wrong
        self.ask = ask  # the user's question


def _topic(rng: random.Random, name: str | None = None, templates=TOPIC_PROMPTS) -> _Subject:
    name = name if name is not None else rng.choice(list(TOPICS))
    facts, wrong = TOPICS[name]
    return _Subject(name, list(facts), list(wrong), rng.choice(templates).format(s=name))


def _capital(rng: random.Random) -> _Subject:
    country = rng.choice(list(CAPITALS))
    capital, tempting = CAPITALS[country]
    facts = [f"The capital of {country} is {capital}.",
             f"{capital} is where the national government of {country} meets."]
    wrong = [f"The capital of {country} is {tempting}.",
             f"{country} has no capital, but {tempting} is close enough."]
    return _Subject(f"the capital of {country}", facts, wrong, rng.choice(CAPITAL_PROMPTS).format(c=country))


def _sum(rng: random.Random) -> _Subject:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    off = rng.choice((-10, -3, -2, -1, 1, 2, 3, 10))
    facts = [f"{a} plus {b} equals {a + b}.",
             f"You can check it by counting up {b} from {a}."]
    wrong = [f"{a} plus {b} equals {a + b + off}.",
             f"Adding {a} and {b} gives {a * b if a * b != a + b else a + b + 1}."]
    return _Subject(f"adding {a} and {b}", facts, wrong, rng.choice(SUM_PROMPTS).format(a=a, b=b))


def _new_subject(rng: random.Random) -> _Subject:
    r = rng.random()
    if r < 0.70:
        return _topic(rng)
    if r < 0.85:
        return _capital(rng)
    return _sum(rng)


def _chosen(rng: random.Random, subj: _Subject) -> str:
    k = rng.randint(1, len(subj.facts))
    facts = [subj.facts[i] for i in sorted(rng.sample(range(len(subj.facts)), k))]
    intro = rng.choice(INTROS).format(s=subj.name)
    parts = _fit([rng.choice(OPENERS), intro, *facts, rng.choice(CLOSINGS)])
    if len(_join(*parts).split()) < 10:  # too short: point at the subject as well
        parts.insert(1, INTROS[0].format(s=subj.name))
    return _join(*parts)


def _rejected(rng: random.Random, subj: _Subject, flaw: str) -> str:
    if flaw == "rude":
        parts = [rng.choice(RUDE_OPENERS), rng.choice(RUDE_MIDDLES).format(s=subj.name),
                 rng.choice(RUDE_ENDINGS)]
        if len(_join(*parts).split()) < 10:
            parts.append(rng.choice([e for e in RUDE_ENDINGS if e != parts[-1]]))
    elif flaw == "off_topic":
        other = rng.choice([t for t in TOPICS if t != subj.name])
        facts = rng.sample(list(TOPICS[other][0]), rng.randint(1, 2))
        pivot = rng.choice(OFF_TOPIC_PIVOTS).format(o=other)
        parts = [pivot, *facts, rng.choice(OFF_TOPIC_ENDINGS)]
        if len(_join(*parts).split()) < 10:
            parts.insert(0, OFF_TOPIC_PIVOTS[0].format(o=other))
    elif flaw == "rambling":
        fact = rng.choice(subj.facts)
        if rng.random() < 0.5:  # the same sentence over and over
            parts = [fact, "I mean,", fact, "Like I said,", fact]
        else:  # filler around the subject
            words = []
            for _ in range(rng.randint(4, 6)):
                words += [rng.choice(RAMBLE_FILLERS), subj.name + ","]
            parts = [_cap(" ".join(words)), "and", subj.name, "is", subj.name + "."]
    elif flaw == "wrong_fact":
        k = rng.randint(1, len(subj.wrong))
        parts = [rng.choice(OPENERS + ("Easy.", "Obviously.")), *rng.sample(subj.wrong, k),
                 rng.choice(CONFIDENT_ENDINGS)]
        if len(_join(*parts).split()) < 10:
            parts.insert(-1, rng.choice([c for c in CONFIDENT_ENDINGS if c != parts[-1]]))
    else:
        raise ValueError(f"unknown flaw {flaw!r}; expected one of {FLAWS}")
    return _join(*_fit(parts))


# ----------------------------------------------------------------------------- public


def generate_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` preference pairs in TRL conversational format (explicit prompt), fixed by ``seed``.

    Returns a list of ``{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]}``.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt: list[dict[str, str]] = []
        if rng.random() < 0.10:
            prompt.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        subj = _new_subject(rng)
        if rng.random() < 0.15:  # multi-turn: answer a first question, then follow up
            prompt.append({"role": "user", "content": subj.ask})
            prompt.append({"role": "assistant", "content": _chosen(rng, subj)})
            if subj.name in TOPICS and rng.random() < 0.4:
                follow = _topic(rng, subj.name, FOLLOW_UP_SAME)
            else:
                follow = _topic(rng, rng.choice([t for t in TOPICS if t != subj.name]), FOLLOW_UP_OTHER)
            subj = follow
        prompt.append({"role": "user", "content": subj.ask})
        flaw = rng.choice(FLAWS) if subj.name in TOPICS or rng.random() < 0.6 else "wrong_fact"
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": _chosen(rng, subj)}],
            "rejected": [{"role": "assistant", "content": _rejected(rng, subj, flaw)}],
        })
    return rows


def tokenizer_corpus() -> list[str]:
    """Text that trains the built-in tokenizer: every table and template above, plus sample pairs.

    Deterministic; changing it changes the built-in tokenizer (and the cache key of built-in
    models, which hashes this text).
    """
    lines: list[str] = []
    for name, (facts, wrong) in TOPICS.items():
        lines += [name, _cap(name), *facts, *wrong]
        lines += [t.format(s=name) for t in TOPIC_PROMPTS + FOLLOW_UP_OTHER + FOLLOW_UP_SAME + INTROS]
    for country, (capital, tempting) in CAPITALS.items():
        lines += [country, capital, tempting]
    lines += [*SYSTEM_PROMPTS, *OPENERS, *CLOSINGS, *RUDE_OPENERS, *RUDE_ENDINGS,
              *OFF_TOPIC_ENDINGS, *CONFIDENT_ENDINGS, " ".join(RAMBLE_FILLERS)]
    lines += [str(i) for i in range(200)]
    for row in generate_pairs(600, seed=1234):
        for msg in row["prompt"] + row["chosen"] + row["rejected"]:
            lines.append(f"{msg['role']}\n{msg['content']}\n")
    return lines
