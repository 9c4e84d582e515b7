"""The demo's pretraining corpus: reviews with verdicts, typed questions, filler (seeded, offline)."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from dpzo.fileio import atomic_path

logger = logging.getLogger(__name__)


DEMO_TASKS = ("demo-sst2", "demo-trec")


SST2_LABEL_WORDS = (" terrible", " great")  # label 0 = negative, 1 = positive


TREC_LABEL_WORDS = (" Description", " Entity", " Expression", " Human", " Location", " Number")


ALL_LABEL_WORDS = SST2_LABEL_WORDS + TREC_LABEL_WORDS


SST2_SIZES = {"train": 6000, "dev": 1000}  # dev.tsv is the test set in LM-BFF


TREC_SIZES = {"train": 3000, "test": 500}


# Mildly imbalanced like real TREC, but without its 1.5 % abbreviation class.
TREC_CLASS_WEIGHTS = (0.20, 0.20, 0.10, 0.19, 0.16, 0.15)


# Each polarity has strong and mild words. Verdicts after a mild review disagree with it
# more often (DISAGREE_RATE), so the model's confidence varies with the wording; together with
# the rare " terrible" this makes zero-shot wrong on mildly negative reviews but right on
# strongly negative ones, with a wide margin either way (stable across checkpoints).
STRONG_POSITIVE_ADJECTIVES = (
    "wonderful",
    "brilliant",
    "superb",
    "delightful",
    "stunning",
    "magnificent",
    "excellent",
    "terrific",
    "fantastic",
    "splendid",
    "remarkable",
    "riveting",
    "hilarious",
    "gorgeous",
    "powerful",
    "compelling",
    "gripping",
    "moving",
    "beautiful",
    "memorable",
    "uplifting",
    "heartfelt",
)


MILD_POSITIVE_ADJECTIVES = (
    "charming",
    "funny",
    "clever",
    "touching",
    "witty",
    "fresh",
    "engaging",
    "thoughtful",
    "lovely",
    "smart",
    "inventive",
    "original",
    "enjoyable",
    "entertaining",
    "elegant",
    "graceful",
    "tender",
    "vivid",
    "warm",
    "impressive",
    "satisfying",
    "sharp",
    "rich",
)


STRONG_NEGATIVE_ADJECTIVES = (
    "awful",
    "dreadful",
    "boring",
    "tedious",
    "lifeless",
    "pointless",
    "painful",
    "ugly",
    "incoherent",
    "dismal",
    "joyless",
    "unfunny",
    "insipid",
    "horrible",
    "hollow",
    "dreary",
    "sloppy",
    "annoying",
    "pretentious",
    "lazy",
    "hackneyed",
    "disappointing",
)


MILD_NEGATIVE_ADJECTIVES = (
    "dull",
    "clumsy",
    "bland",
    "stale",
    "messy",
    "tiresome",
    "lame",
    "weak",
    "flat",
    "shallow",
    "predictable",
    "silly",
    "forgettable",
    "mediocre",
    "plodding",
    "sluggish",
    "wooden",
    "tired",
    "awkward",
    "muddled",
    "bloated",
    "cheap",
    "trite",
)


STRONG_LIKE_VERBS = ("loved", "adored", "cherished", "admired")


MILD_LIKE_VERBS = ("liked", "enjoyed", "savored")


STRONG_HATE_VERBS = ("hated", "loathed", "despised", "detested")


MILD_HATE_VERBS = ("disliked", "resented", "regretted")


# [label][mild] -> words
ADJECTIVES = (
    (STRONG_NEGATIVE_ADJECTIVES, MILD_NEGATIVE_ADJECTIVES),
    (STRONG_POSITIVE_ADJECTIVES, MILD_POSITIVE_ADJECTIVES),
)


VERBS = ((STRONG_HATE_VERBS, MILD_HATE_VERBS), (STRONG_LIKE_VERBS, MILD_LIKE_VERBS))


# Sentence adverbs opening some clauses ("sadly the plot is dull"). They are a few frequent
# polarity carriers, from which a tiny model picks up "the sentence's sentiment decides the
# verdict" in a few hundred steps; the rare adjectives then follow. Without them the onset of
# sentiment came too late for the step budget in one of two OPT seeds.
MARKERS = (
    ("sadly", "unfortunately", "alas", "regrettably"),
    ("happily", "thankfully", "luckily", "fortunately"),
)


MARKER_RATE = 0.4  # of the clauses that can take one (about 30 % of all)


ASPECTS = (
    "the acting",
    "the plot",
    "the script",
    "the cast",
    "the soundtrack",
    "the direction",
    "the dialogue",
    "the ending",
    "the cinematography",
    "the pacing",
    "the story",
    "the characters",
    "the visuals",
    "the humor",
    "the editing",
    "the performances",
    "the score",
    "the lead actor",
    "the villain",
    "the first act",
    "the finale",
    "the screenplay",
    "the premise",
    "the romance",
    "the action scenes",
    "the camera work",
    "the costumes",
    "the set design",
    "the twist",
    "the supporting cast",
    "the heroine",
    "the middle section",
    "the opening scene",
    "the special effects",
    "the music",
)


PLURAL_ASPECTS = frozenset(
    ("the characters", "the visuals", "the performances", "the action scenes", "the costumes", "the special effects")
)


FILM_NOUNS = (
    "film",
    "movie",
    "picture",
    "drama",
    "comedy",
    "thriller",
    "documentary",
    "romance",
    "western",
    "sequel",
    "remake",
    "debut",
    "musical",
    "mystery",
    "adventure",
    "satire",
)


INTENSIFIERS = (
    "",
    "",
    "",
    "very ",
    "really ",
    "quite ",
    "so ",
    "truly ",
    "rather ",
    "utterly ",
    "pretty ",
    "oddly ",
    "consistently ",
)


CLAUSE_ENDINGS = (
    "",
    "",
    "",
    "",
    " from start to finish",
    " at times",
    " throughout",
    " in places",
    " for the most part",
    " in the end",
    " all the way through",
)


# Verdict words: label word " great" is a common positive verdict, " terrible" a *rare*
# negative one, which skews the label-word prior (see module docstring).
POSITIVE_VERDICTS = ("great", "good", "excellent")


NEGATIVE_VERDICTS = ("terrible", "bad", "awful", "poor")


GREAT_SHARE = 0.45  # share of positive verdicts that say "great"


TERRIBLE_SHARE = 0.04  # share of negative verdicts that say "terrible"


VERDICT_RATE = 0.75  # fraction of corpus reviews followed by a verdict


DISAGREE_RATE = (0.03, 0.20)  # [mild] verdicts contradicting the review (about 11 % overall)


REVIEW_SHAPES = (0.65, 0.20, 0.15)  # single clause, "X , but Y", "X and Y"


VERDICT_FORMS = (("It was {}.", 0.80), ("Overall , it was {}.", 0.10), ("It was {} , really.", 0.10))


# Per class: words used to annotate a question's answer type. The first entry is the label
# word itself; TYPE_LABEL_WORD_SHARE says how often it is used instead of a synonym.
TYPE_WORDS = (
    ("Description", "Definition", "Meaning", "Explanation", "Reason", "Manner"),
    ("Entity", "Thing", "Object", "Item", "Term"),
    ("Expression", "Abbreviation", "Acronym", "Expansion"),
    ("Human", "Person", "People", "Individual"),
    ("Location", "Place", "Country", "City", "Region"),
    ("Number", "Count", "Date", "Quantity", "Amount", "Year"),
)


TYPE_LABEL_WORD_SHARE = (0.05, 0.30, 0.06, 0.20, 0.25, 0.06)


# Annotators fall back to the catch-all type (Entity / Thing / ...) for many questions that
# are not about entities; for Description, Expression and Number questions the fallback's
# label word " Entity" is then more likely than their own label word, so zero-shot labels
# them Entity (a skewed label-word prior, the analogue of the rare " terrible").
GENERIC_TYPE = 1


GENERIC_TYPE_RATE = (0.35, 0.0, 0.35, 0.05, 0.05, 0.35)


TYPE_DISAGREE_RATE = 0.05  # annotations naming a uniformly random type


FAMOUS_PEOPLE = (
    "Shakespeare",
    "Mozart",
    "Einstein",
    "Napoleon",
    "Lincoln",
    "Picasso",
    "Darwin",
    "Newton",
    "Cleopatra",
    "Beethoven",
    "Dickens",
    "Galileo",
    "Gandhi",
    "Tolstoy",
    "Columbus",
    "Edison",
    "Churchill",
    "Washington",
    "Jefferson",
    "Marie Curie",
    "Van Gogh",
    "Elvis Presley",
    "Julius Caesar",
    "Queen Victoria",
    "Mark Twain",
    "Leonardo da Vinci",
    "Jane Austen",
    "Bach",
    "Plato",
    "Aristotle",
    "Marco Polo",
    "Joan of Arc",
    "Florence Nightingale",
)


# Invented people and towns multiply the question space, so that a held-out task can be
# drawn without reusing the questions of the corpus (TREC, too, is full of obscure names).
FIRST_NAMES = (
    "Anna",
    "Peter",
    "Maria",
    "John",
    "Clara",
    "Victor",
    "Helen",
    "Oscar",
    "Laura",
    "Henry",
    "Emma",
    "Felix",
    "Rosa",
    "Simon",
    "Alice",
    "Hugo",
    "Nina",
    "Paul",
    "Lena",
    "Walter",
)


SURNAMES = (
    "Berg",
    "Hale",
    "Moreno",
    "Fischer",
    "Novak",
    "Carter",
    "Lind",
    "Rossi",
    "Dupont",
    "Okafor",
    "Tanaka",
    "Silva",
    "Keller",
    "Brandt",
    "Ward",
    "Costa",
    "Meyer",
    "Quinn",
    "Varga",
    "Holm",
)


COUNTRIES = (
    "France",
    "Japan",
    "Brazil",
    "Egypt",
    "Canada",
    "Peru",
    "Kenya",
    "Norway",
    "Chile",
    "India",
    "Italy",
    "Mexico",
    "Spain",
    "Greece",
    "Turkey",
    "Iceland",
    "Cuba",
    "Nepal",
    "Poland",
    "Ireland",
    "Australia",
    "China",
    "Germany",
    "Russia",
    "Sweden",
    "Argentina",
)


CITIES = (
    "Paris",
    "Tokyo",
    "Rome",
    "Cairo",
    "Berlin",
    "Madrid",
    "Lima",
    "Oslo",
    "Vienna",
    "Boston",
    "Chicago",
    "Sydney",
    "Toronto",
    "Dublin",
    "Athens",
    "Prague",
    "Lisbon",
    "Moscow",
    "Delhi",
    "Seoul",
    "London",
    "New York",
    "Venice",
    "Istanbul",
    "Bangkok",
    "Nairobi",
)


TOWN_PREFIXES = ("North", "South", "Port", "Lake", "Mount", "New", "Fort", "East", "West", "Saint")


TOWN_SUFFIXES = ("Haven", "Ridge", "Marlow", "Brook", "Field", "Dale", "Mills", "Crest", "Harbor", "Vale")


CONCEPTS = (
    "photosynthesis",
    "inflation",
    "gravity",
    "democracy",
    "a black hole",
    "a sonnet",
    "an eclipse",
    "a tsunami",
    "a vaccine",
    "a glacier",
    "a hurricane",
    "an atom",
    "a volcano",
    "a rainbow",
    "evolution",
    "a comet",
    "a haiku",
    "a monsoon",
    "jazz",
    "a recession",
    "the stock market",
    "a patent",
    "an allergy",
    "the ozone layer",
    "a coral reef",
    "a fossil",
    "a mirage",
    "the tide",
    "a laser",
    "a magnet",
    "a metaphor",
    "a mortgage",
    "a hologram",
    "an earthquake",
    "a placebo",
    "a sundial",
    "an aurora",
    "a solstice",
    "a fjord",
    "a tariff",
    "a sonar",
    "an enzyme",
    "a quasar",
    "a glacier lake",
    "a leap year",
    "a thunderstorm",
    "a geyser",
    "a dividend",
    "a monopoly",
    "a filibuster",
    "a symphony",
    "an opera",
    "a fresco",
    "a satellite",
    "a catalyst",
    "an antibody",
)


FIELDS = (
    "physics",
    "music",
    "economics",
    "biology",
    "law",
    "poetry",
    "geology",
    "medicine",
    "politics",
    "astronomy",
)


PLURAL_THINGS = (
    "cats",
    "birds",
    "bees",
    "leaves",
    "stars",
    "whales",
    "volcanoes",
    "rivers",
    "clouds",
    "snakes",
    "owls",
    "bats",
    "trees",
    "dolphins",
    "ants",
    "penguins",
    "camels",
    "wolves",
    "frogs",
    "salmon",
    "eagles",
    "tigers",
    "bears",
    "horses",
)


BEHAVIOURS = (
    "migrate",
    "sleep",
    "glow",
    "change color",
    "sing",
    "move",
    "hide",
    "hunt at night",
    "live in groups",
    "shed",
)


ACTIVITIES = (
    "bake bread",
    "tie a tie",
    "learn to swim",
    "grow tomatoes",
    "fold a paper crane",
    "train a puppy",
    "make cheese",
    "play chess",
    "build a kite",
    "brew coffee",
    "write a poem",
    "plant a tree",
    "change a tire",
    "sail a boat",
    "knit a scarf",
    "carve a pumpkin",
    "read a map",
    "light a campfire",
    "tune a guitar",
    "paint a wall",
)


CATEGORIES = (
    "animal",
    "bird",
    "fish",
    "insect",
    "flower",
    "tree",
    "color",
    "food",
    "sport",
    "instrument",
    "language",
    "currency",
    "disease",
    "drink",
    "game",
    "fruit",
    "dance",
)


INVENTIONS = (
    "telephone",
    "light bulb",
    "printing press",
    "steam engine",
    "radio",
    "airplane",
    "bicycle",
    "camera",
    "compass",
    "microscope",
    "telescope",
    "typewriter",
    "piano",
    "television",
    "vaccine",
    "thermometer",
    "battery",
    "submarine",
    "refrigerator",
    "elevator",
)


BOOKS = (
    "Hamlet",
    "Macbeth",
    "War and Peace",
    "the Odyssey",
    "Don Quixote",
    "Moby Dick",
    "Pride and Prejudice",
    "Oliver Twist",
    "Romeo and Juliet",
    "the Iliad",
    "Faust",
    "Jane Eyre",
    "Ulysses",
    "the Divine Comedy",
    "Frankenstein",
    "Dracula",
    "Emma",
)


PAINTINGS = (
    "the Mona Lisa",
    "the Last Supper",
    "Starry Night",
    "the Scream",
    "Guernica",
    "the Night Watch",
    "Water Lilies",
    "the Birth of Venus",
    "the Kiss",
    "Sunflowers",
)


LANDMARKS = (
    "the Eiffel Tower",
    "Mount Everest",
    "the Great Wall",
    "the Statue of Liberty",
    "Big Ben",
    "the Golden Gate Bridge",
    "the Colosseum",
    "Niagara Falls",
    "the Taj Mahal",
    "the Sahara",
    "the Amazon",
    "the Nile",
    "Lake Victoria",
    "Stonehenge",
    "Mount Fuji",
    "the Grand Canyon",
    "the Parthenon",
    "the Kremlin",
    "the Louvre",
    "the Alhambra",
)


ROLES = (
    "president",
    "king",
    "queen",
    "prime minister",
    "astronaut",
    "emperor",
    "pope",
    "mayor",
    "general",
    "explorer",
    "governor",
    "chancellor",
)


ACRONYMS = (
    ("NASA", "National Aeronautics and Space Administration"),
    ("FBI", "Federal Bureau of Investigation"),
    ("CIA", "Central Intelligence Agency"),
    ("UNESCO", "United Nations Educational , Scientific and Cultural Organization"),
    ("NATO", "North Atlantic Treaty Organization"),
    ("DNA", "deoxyribonucleic acid"),
    ("RAM", "random access memory"),
    ("CPU", "central processing unit"),
    ("HTML", "hypertext markup language"),
    ("UFO", "unidentified flying object"),
    ("BBC", "British Broadcasting Corporation"),
    ("NBA", "National Basketball Association"),
    ("FIFA", "International Federation of Association Football"),
    ("OPEC", "Organization of the Petroleum Exporting Countries"),
    ("MIT", "Massachusetts Institute of Technology"),
    ("ATM", "automated teller machine"),
    ("PIN", "personal identification number"),
    ("GPS", "global positioning system"),
    ("LED", "light emitting diode"),
    ("USB", "universal serial bus"),
    ("IQ", "intelligence quotient"),
    ("CEO", "chief executive officer"),
    ("AIDS", "acquired immune deficiency syndrome"),
    ("RSVP", "respond if you please"),
    ("ASAP", "as soon as possible"),
    ("PhD", "doctor of philosophy"),
    ("BMW", "Bavarian Motor Works"),
    ("UN", "United Nations"),
    ("EU", "European Union"),
    ("NFL", "National Football League"),
    ("WWF", "World Wide Fund for Nature"),
    ("laser", "light amplification by stimulated emission of radiation"),
    ("radar", "radio detection and ranging"),
    ("scuba", "self contained underwater breathing apparatus"),
    ("ICU", "intensive care unit"),
    ("DVD", "digital versatile disc"),
    ("PDF", "portable document format"),
    ("URL", "uniform resource locator"),
    ("WWW", "World Wide Web"),
    ("SIM", "subscriber identity module"),
    ("VIP", "very important person"),
    ("ETA", "estimated time of arrival"),
    ("DIY", "do it yourself"),
    ("FAQ", "frequently asked questions"),
    ("IRS", "Internal Revenue Service"),
    ("MRI", "magnetic resonance imaging"),
    ("SOS", "save our souls"),
    ("TNT", "trinitrotoluene"),
    ("UV", "ultraviolet"),
    ("ISBN", "international standard book number"),
    ("NGO", "non governmental organization"),
    ("GDP", "gross domestic product"),
    ("RPM", "revolutions per minute"),
    ("MPH", "miles per hour"),
    ("CD", "compact disc"),
    ("PC", "personal computer"),
    ("AI", "artificial intelligence"),
    ("USA", "United States of America"),
    ("UK", "United Kingdom"),
    ("BC", "before Christ"),
    ("AC", "alternating current"),
)


ACRONYM_CONTEXTS = (
    "",
    "",
    "",
    " in computing",
    " in medicine",
    " in sports",
    " in business",
    " in science",
    " on a letter",
    " in the military",
    " in politics",
    " in school",
    " on television",
)


EVENTS = (
    "World War II end",
    "the Titanic sink",
    "the Berlin Wall fall",
    "the first Moon landing happen",
    "the French Revolution begin",
    "the Olympics start",
    "the Great Fire of London happen",
    "the printing press appear",
    "the Roman Empire fall",
    "the gold rush begin",
)


def _pick(rng: random.Random, items: Sequence[str]) -> str:
    return items[rng.randrange(len(items))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _strip_article(phrase: str) -> str:
    return re.sub(r"^(a|an|the) ", "", phrase)


def _person(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return _pick(rng, FAMOUS_PEOPLE)
    return f"{_pick(rng, FIRST_NAMES)} {_pick(rng, SURNAMES)}"


def _town(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return _pick(rng, CITIES)
    return f"{_pick(rng, TOWN_PREFIXES)} {_pick(rng, TOWN_SUFFIXES)}"


def _place(rng: random.Random) -> str:
    return _pick(rng, COUNTRIES) if rng.random() < 0.4 else _town(rng)


def _acronym(rng: random.Random) -> str:
    return _pick(rng, ACRONYMS)[0]


def _expansion(rng: random.Random) -> str:
    return _pick(rng, ACRONYMS)[1]


# Templates name their slots in braces; _fill draws each slot left to right from SLOTS.
# Several templates overlap in surface form across classes ("What is ..."), as in TREC, so
# the first word does not give the class away.
QUESTION_TEMPLATES: tuple[tuple[str, ...], ...] = (
    (  # 0 Description: definitions, reasons, manners
        "What is {concept} ?",
        "What does {bare_concept} mean in {field} ?",
        "How does {concept} work ?",
        "Why do {plural_thing} {behaviour} ?",
        "How do you {activity} in {place} ?",
        "What is the definition of {bare_concept} in {field} ?",
        "What causes {concept} in {place} ?",
        "What is the difference between {concept} and {concept} ?",
        "Why did {person} {visit_verb} {place} ?",
        "How did {person} become famous ?",
    ),
    (  # 1 Entity: things, categories, names of objects
        "What {category} is the most popular in {place} ?",
        "What is the national {category} of {country} ?",
        "What did {person} invent ?",
        "What language is spoken in {place} ?",
        "What {category} did {person} like best ?",
        "What is the name of the {category} in {book} ?",
        "Which {category} is used to make {material} ?",
        "What instrument did {person} play ?",
        "What is {person} 's most famous {work_kind} ?",
        "What {category} do people in {place} like ?",
    ),
    (  # 2 Expression (TREC's ABBR): abbreviations and expansions
        "What does {acronym} stand for{acronym_context} ?",
        "What is the full form of {acronym}{acronym_context} ?",
        "What is {acronym} short for{acronym_context} ?",
        "What is the abbreviation for {expansion} ?",
        "What do the letters {acronym} mean{acronym_context} ?",
        "What is the acronym for {expansion} ?",
        "{acronym} is an abbreviation of what{acronym_context} ?",
    ),
    (  # 3 Human: people and groups
        "Who wrote {book} ?",
        "Who invented the {invention} in {place} ?",
        "Who was the first {role} of {place} ?",
        "Who painted {painting} ?",
        "Who is the most famous {profession} from {place} ?",
        "Which {notable} was born in {town} ?",
        "What {role} ruled {country} during {era} ?",
        "Who was {person} 's {relation} ?",
        "Who discovered {discovery} ?",
        "Who built {landmark} ?",
    ),
    (  # 4 Location: places
        "Where is {landmark_or_town} ?",
        "Where was {person} born ?",
        "What country is {town} in ?",
        "What is the capital of {country} ?",
        "Where can I find {plural_thing} in {place} ?",
        "What city has the largest {facility} in {country} ?",
        "Which river flows through {town} ?",
        "Where do {plural_thing} live ?",
        "In what country did {person} die ?",
        "Where did {person} {life_verb} ?",
    ),
    (  # 5 Number: counts, dates, amounts, sizes
        "How many {plural_thing} live in {place} ?",
        "When was {person} born ?",
        "When did {event} ?",
        "How far is {town} from {town} ?",
        "How old is {landmark} ?",
        "How much does a {invention} cost in {place} ?",
        "How tall is {landmark} ?",
        "What is the population of {place} ?",
        "How long do {plural_thing} live ?",
        "What year did {person} die ?",
    ),
)


# Neutral documents; they also use the TREC label words in unrelated senses, so those words
# are frequent enough to become single BPE tokens without being tied to the annotations.
FILLER_TEMPLATES: tuple[str, ...] = (
    "the {gathering} is on {weekday} at {venue} .",
    "the train to {city} leaves from platform {small_number} .",
    "please fill in the {form_field} field before you submit the form .",
    "the {column} column of the table lists the {column_content} .",
    "each Entity in the database has a {record_field} .",
    "the regular Expression matches every {text_unit} .",
    "the Human Resources office is on the {ordinal} floor .",
    "enter the Number of {countable} in the box .",
    "the Location of the {occasion} is {city} .",
    "the Description of the {listing} is short .",
    "{city} is a city in {country} .",
    "the weather in {city} was {weather} on {short_weekday} .",
    "{famous_person} lived in {country} for {how_many} years .",
    "the {invention} was on the {furniture} .",
    "we read {book} in {school_time} .",
)


def _choice(items: Sequence[str]) -> Callable[[random.Random], str]:
    return lambda rng: _pick(rng, items)


SLOTS: dict[str, Callable[[random.Random], str]] = {
    "concept": _choice(CONCEPTS),
    "bare_concept": lambda rng: _strip_article(_pick(rng, CONCEPTS)),
    "field": _choice(FIELDS),
    "plural_thing": _choice(PLURAL_THINGS),
    "behaviour": _choice(BEHAVIOURS),
    "activity": _choice(ACTIVITIES),
    "place": _place,
    "town": _town,
    "person": _person,
    "famous_person": _choice(FAMOUS_PEOPLE),
    "country": _choice(COUNTRIES),
    "city": _choice(CITIES),
    "visit_verb": _choice(("leave", "visit", "write about", "paint", "study")),
    "category": _choice(CATEGORIES),
    "book": _choice(BOOKS),
    "material": _choice(("paper", "glass", "wine", "silk", "chocolate", "rope", "soap")),
    "work_kind": _choice(("book", "painting", "invention", "song", "speech", "ship")),
    "acronym": _acronym,
    "expansion": _expansion,
    "acronym_context": _choice(ACRONYM_CONTEXTS),
    "invention": _choice(INVENTIONS),
    "role": _choice(ROLES),
    "painting": _choice(PAINTINGS),
    "profession": _choice(("singer", "painter", "poet", "athlete", "chef", "scientist")),
    "notable": _choice(("composer", "author", "scientist", "explorer", "emperor")),
    "era": _choice(("the war", "the depression", "the golden age", "the revolution")),
    "relation": _choice(("teacher", "wife", "father", "rival", "best friend")),
    "discovery": _choice(("penicillin", "gravity", "radium", "America", "the electron", "oxygen", "Pluto")),
    "landmark": _choice(LANDMARKS),
    "landmark_or_town": lambda rng: _pick(rng, LANDMARKS) if rng.random() < 0.3 else _town(rng),
    "facility": _choice(("museum", "airport", "harbor", "library", "stadium", "zoo")),
    "life_verb": _choice(("study", "work", "grow up", "retire", "live")),
    "event": _choice(EVENTS),
    # filler slots
    "gathering": _choice(("meeting", "class", "market", "concert", "game", "lecture")),
    "weekday": _choice(("monday", "tuesday", "friday", "saturday", "sunday")),
    "venue": _choice(("the library", "the station", "the school", "noon", "the town hall")),
    "small_number": _choice(("one", "two", "four", "seven", "nine")),
    "form_field": _choice(("Description", "Location", "Number", "Entity")),
    "column": _choice(("Human", "Location", "Description", "Entity", "Number", "Expression")),
    "column_content": _choice(("name", "city", "value", "code", "owner")),
    "record_field": _choice(("name", "key", "date", "owner")),
    "text_unit": _choice(("date", "word", "email", "number", "line")),
    "ordinal": _choice(("first", "second", "third")),
    "countable": _choice(("guests", "seats", "tickets", "rooms")),
    "occasion": _choice(("office", "event", "shop", "party")),
    "listing": _choice(("item", "job", "house", "course")),
    "weather": _choice(("cold", "rainy", "windy", "sunny", "mild")),
    "short_weekday": _choice(("monday", "friday", "sunday")),
    "how_many": _choice(("two", "ten", "many", "several")),
    "furniture": _choice(("table", "shelf", "desk", "floor")),
    "school_time": _choice(("school", "class", "the summer", "college")),
}


_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, rng: random.Random) -> str:
    """``template`` with each ``{slot}`` drawn from SLOTS, left to right."""
    return _SLOT.sub(lambda match: SLOTS[match.group(1)](rng), template)


# Corpus composition (documents).
N_REVIEW_DOCUMENTS = 26000


N_QUESTION_DOCUMENTS = 5000


N_FILLER_DOCUMENTS = 1500


def _clause(rng: random.Random, label: int, mild: bool) -> str:
    """One sentiment clause of polarity ``label`` (1 positive, 0 negative) and strength."""
    adjective = _pick(rng, ADJECTIVES[label][mild])
    verb = _pick(rng, VERBS[label][mild])
    aspect, noun = _pick(rng, ASPECTS), _pick(rng, FILM_NOUNS)
    intensifier, ending = _pick(rng, INTENSIFIERS), _pick(rng, CLAUSE_ENDINGS)
    plural = aspect in PLURAL_ASPECTS
    is_, was, feels = ("are", "were", "feel") if plural else ("is", "was", "feels")
    form = rng.randrange(7)
    if form == 5:
        return _with_article(f"{intensifier}{adjective} {noun}")
    if form == 6:
        return f"what {_with_article(adjective)} {noun}"
    # full clauses (not the noun phrases above) may open with a sentence adverb
    marker = f"{_pick(rng, MARKERS[label])} " if rng.random() < MARKER_RATE else ""
    if form == 0:
        return f"{marker}{aspect} {is_} {intensifier}{adjective}{ending}"
    if form == 1:
        return f"{marker}{aspect} {was} {intensifier}{adjective}{ending}"
    if form == 2:
        return f"{marker}i {verb} {aspect}{ending}"
    if form == 3:
        return f"{marker}{aspect} {feels} {intensifier}{adjective}{ending}"
    return f"{marker}the {noun} 's {aspect.removeprefix('the ')} {is_} {intensifier}{adjective}"


def graded_review(rng: random.Random, label: int | None = None) -> tuple[str, int, bool]:
    """A lower-cased, SST-tokenized review sentence, its polarity and whether it is mild.

    In "X , but Y" sentences the last clause carries the label (and the strength), so the
    task needs more than a bag of adjectives.
    """
    if label is None:
        label = rng.randrange(2)
    mild = rng.random() < 0.5
    shape = rng.random()
    if shape < REVIEW_SHAPES[0]:
        text = _clause(rng, label, mild)
    elif shape < REVIEW_SHAPES[0] + REVIEW_SHAPES[1]:
        text = f"{_clause(rng, 1 - label, rng.random() < 0.5)} , but {_clause(rng, label, mild)}"
    else:
        text = f"{_clause(rng, label, rng.random() < 0.5)} and {_clause(rng, label, mild)}"
    return f"{text} .", label, mild


def _review(rng: random.Random) -> tuple[str, int]:
    text, label, _ = graded_review(rng)
    return text, label


def _weighted_choice(rng: random.Random, items: Sequence[str], first_share: float) -> str:
    """``items[0]`` with probability ``first_share``, otherwise a uniform pick from the rest."""
    return items[0] if rng.random() < first_share else _pick(rng, items[1:])


def _verdict(rng: random.Random, label: int, mild: bool) -> str:
    if rng.random() < DISAGREE_RATE[mild]:
        label = 1 - label
    if label:
        word = _weighted_choice(rng, POSITIVE_VERDICTS, GREAT_SHARE)
    else:
        word = _weighted_choice(rng, NEGATIVE_VERDICTS, TERRIBLE_SHARE)
    forms, weights = zip(*VERDICT_FORMS)
    return rng.choices(forms, weights=weights)[0].format(word)


def _review_document(rng: random.Random) -> str:
    text, label, mild = graded_review(rng)
    if rng.random() < VERDICT_RATE:
        return f"{text} {_verdict(rng, label, mild)}"
    return text


def question(rng: random.Random, label: int | None = None) -> tuple[str, int]:
    """A generated question and its type; ``label`` fixes the type, else it is drawn by ``TREC_CLASS_WEIGHTS``."""
    if label is None:
        label = rng.choices(range(len(TREC_CLASS_WEIGHTS)), weights=TREC_CLASS_WEIGHTS)[0]
    return _fill(_pick(rng, QUESTION_TEMPLATES[label]), rng), label


def _type_word(rng: random.Random, label: int) -> str:
    if rng.random() < TYPE_DISAGREE_RATE:
        label = rng.randrange(len(TYPE_WORDS))
    elif rng.random() < GENERIC_TYPE_RATE[label]:
        label = GENERIC_TYPE
    return _weighted_choice(rng, TYPE_WORDS[label], TYPE_LABEL_WORD_SHARE[label])


def _question_document(rng: random.Random) -> str:
    # Both orders appear: the MLM prompt puts the type first ("<mask>: question"), the
    # causal prompt after the question ("question Answer type:").
    text, label = question(rng)
    if rng.random() < 0.5:
        return f"{_type_word(rng, label)}: {text}"
    return f"{text} Answer type: {_type_word(rng, label)}."


def _filler_document(rng: random.Random) -> str:
    return _fill(_pick(rng, FILLER_TEMPLATES), rng)


def write_pretraining_corpus(path: Path, seed: int = 0) -> None:
    """Write the synthetic pretraining corpus, one document per line (UTF-8)."""
    rng = random.Random(f"demo-corpus-{seed}")
    makers = (
        [_review_document] * N_REVIEW_DOCUMENTS
        + [_question_document] * N_QUESTION_DOCUMENTS
        + [_filler_document] * N_FILLER_DOCUMENTS
    )
    rng.shuffle(makers)
    documents = [make(rng) for make in makers]
    with atomic_path(Path(path)) as tmp:  # a killed job never leaves half a corpus under the final name
        tmp.write_text("\n".join(documents) + "\n", encoding="utf-8")
    logger.info("wrote %d pretraining documents to %s", len(documents), path)
