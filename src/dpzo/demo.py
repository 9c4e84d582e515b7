"""Offline "embedded demo": a synthetic world small enough to pretrain on a laptop CPU.

The real experiments fine-tune roberta-large / OPT on SST-2 and TREC. None of that can be
downloaded here, so this module generates a stand-in that has the same *interfaces*:

* a pretraining corpus (one short document per line): movie-review-like sentences, some of
  them followed by a verdict sentence ("It was great."), questions annotated with their
  answer type (``Person: Who wrote Hamlet ?`` / ``Who wrote Hamlet ? Answer type: Person.``)
  and neutral filler documents;
* two labelled tasks written in the on-disk layouts LM-BFF uses for SST-2 (GLUE tsv with a
  header) and TREC (headerless csv), so the ordinary task loaders read them unchanged;
* a byte-level BPE tokenizer trained on the corpus and two tiny models (RoBERTa with an MLM
  head, OPT causal LM) pretrained with backprop and saved with ``save_pretrained``, so the
  pipeline loads them with ``AutoTokenizer`` / ``AutoModelFor*.from_pretrained(dir)``
  exactly like real checkpoints.

Design choices that make the prompts *meaningful but improvable*:

* Zero-shot headroom comes from a miscalibrated label-word prior, the way real LMs are
  miscalibrated: in the corpus a negative verdict uses " terrible" only rarely (mostly
  bad / awful / ...), and an answer-type annotation uses the label word itself (" Human",
  " Location", ...) only sometimes, at a different rate per class, otherwise a synonym
  (Person, Place, Count, ...). A fraction of verdicts / annotations disagree with the text,
  so every label word keeps some probability under every input. Zero-shot accuracy is
  therefore clearly above chance but far from perfect, and fine-tuning mostly has to
  re-calibrate the label words, which zeroth-order methods can do in a few hundred steps.
* Deviation from standard MLM (deliberate): a 2-layer RoBERTa trained with ordinary random
  masking (15-40 %) never learns to put the sentiment into the ``<mask>`` of
  ``It was<mask>.``: the signal is a tiny fraction of the masked tokens. We therefore use
  SKEP-style *knowledge masking*: only sentiment words (review adjectives, like/hate verbs,
  verdict words) and answer-type words are candidates, each occurrence is masked with
  probability 0.5, and no other token is masked. The causal OPT model uses the ordinary
  next-token objective.
* LM-BFF's TREC template puts the mask right after ``<s>`` and scores label words *with* a
  leading space (``<s><mask>: question``). So that the model has seen that, half of the
  documents are encoded with a leading space during pretraining (what RoBERTa's
  ``add_prefix_space`` would do).
* Everything is seeded; pretraining length is a step count, never a time budget, because
  zero-shot accuracy swings between nearby checkpoints.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Tasks and their label words (fixed by the real tasks' LM-BFF prompts)
# --------------------------------------------------------------------------------------

DEMO_TASKS = ("demo-sst2", "demo-trec")
SST2_LABEL_WORDS = (" terrible", " great")  # label 0 = negative, 1 = positive
TREC_LABEL_WORDS = (" Description", " Entity", " Expression", " Human", " Location", " Number")
ALL_LABEL_WORDS = SST2_LABEL_WORDS + TREC_LABEL_WORDS

SST2_SIZES = {"train": 6000, "dev": 1000}  # dev.tsv is the test set in LM-BFF
TREC_SIZES = {"train": 3000, "test": 500}
# Mildly imbalanced like real TREC, but without its 1.5 % abbreviation class.
TREC_CLASS_WEIGHTS = (0.20, 0.20, 0.10, 0.19, 0.16, 0.15)

# --------------------------------------------------------------------------------------
# Sentiment lexicon
# --------------------------------------------------------------------------------------

# Each polarity has strong and mild words. Verdicts after a mild review disagree with it
# more often (DISAGREE_RATE), so the model's confidence varies with the wording; together with
# the rare " terrible" this makes zero-shot wrong on mildly negative reviews but right on
# strongly negative ones, with a wide margin either way (stable across checkpoints).
STRONG_POSITIVE_ADJECTIVES = (
    "wonderful", "brilliant", "superb", "delightful", "stunning", "magnificent", "excellent",
    "terrific", "fantastic", "splendid", "remarkable", "riveting", "hilarious", "gorgeous",
    "powerful", "compelling", "gripping", "moving", "beautiful", "memorable", "uplifting",
    "heartfelt",
)
MILD_POSITIVE_ADJECTIVES = (
    "charming", "funny", "clever", "touching", "witty", "fresh", "engaging", "thoughtful",
    "lovely", "smart", "inventive", "original", "enjoyable", "entertaining", "elegant",
    "graceful", "tender", "vivid", "warm", "impressive", "satisfying", "sharp", "rich",
)
STRONG_NEGATIVE_ADJECTIVES = (
    "awful", "dreadful", "boring", "tedious", "lifeless", "pointless", "painful", "ugly",
    "incoherent", "dismal", "joyless", "unfunny", "insipid", "horrible", "hollow", "dreary",
    "sloppy", "annoying", "pretentious", "lazy", "hackneyed", "disappointing",
)
MILD_NEGATIVE_ADJECTIVES = (
    "dull", "clumsy", "bland", "stale", "messy", "tiresome", "lame", "weak", "flat",
    "shallow", "predictable", "silly", "forgettable", "mediocre", "plodding", "sluggish",
    "wooden", "tired", "awkward", "muddled", "bloated", "cheap", "trite",
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
SENTIMENT_WORDS = tuple(word for by_label in ADJECTIVES + VERBS for words in by_label for word in words)
ASPECTS = (
    "the acting", "the plot", "the script", "the cast", "the soundtrack", "the direction",
    "the dialogue", "the ending", "the cinematography", "the pacing", "the story",
    "the characters", "the visuals", "the humor", "the editing", "the performances",
    "the score", "the lead actor", "the villain", "the first act", "the finale",
    "the screenplay", "the premise", "the romance", "the action scenes", "the camera work",
    "the costumes", "the set design", "the twist", "the supporting cast", "the heroine",
    "the middle section", "the opening scene", "the special effects", "the music",
)
PLURAL_ASPECTS = frozenset(
    ("the characters", "the visuals", "the performances", "the action scenes", "the costumes",
     "the special effects")
)
FILM_NOUNS = (
    "film", "movie", "picture", "drama", "comedy", "thriller", "documentary", "romance",
    "western", "sequel", "remake", "debut", "musical", "mystery", "adventure", "satire",
)
INTENSIFIERS = ("", "", "", "very ", "really ", "quite ", "so ", "truly ", "rather ",
                "utterly ", "pretty ", "oddly ", "consistently ")
CLAUSE_ENDINGS = ("", "", "", "", " from start to finish", " at times", " throughout",
                  " in places", " for the most part", " in the end", " all the way through")

# Verdict words: label word " great" is a common positive verdict, " terrible" a *rare*
# negative one, which skews the label-word prior (see module docstring).
POSITIVE_VERDICTS = ("great", "good", "excellent")
NEGATIVE_VERDICTS = ("terrible", "bad", "awful", "poor")
GREAT_SHARE = 0.45  # share of positive verdicts that say "great"
TERRIBLE_SHARE = 0.04  # share of negative verdicts that say "terrible"
VERDICT_RATE = 0.60  # fraction of corpus reviews followed by a verdict
DISAGREE_RATE = (0.04, 0.16)  # [mild] verdicts contradicting the review (10 % overall)
REVIEW_SHAPES = (0.65, 0.20, 0.15)  # single clause, "X , but Y", "X and Y"
VERDICT_FORMS = (("It was {}.", 0.80), ("Overall , it was {}.", 0.10), ("It was {} , really.", 0.10))

# --------------------------------------------------------------------------------------
# Question lexicon (TREC-like); class ids: 0 DESC, 1 ENTY, 2 ABBR (Expression), 3 HUM,
# 4 LOC, 5 NUM
# --------------------------------------------------------------------------------------

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
    "Shakespeare", "Mozart", "Einstein", "Napoleon", "Lincoln", "Picasso", "Darwin", "Newton",
    "Cleopatra", "Beethoven", "Dickens", "Galileo", "Gandhi", "Tolstoy", "Columbus", "Edison",
    "Churchill", "Washington", "Jefferson", "Marie Curie", "Van Gogh", "Elvis Presley",
    "Julius Caesar", "Queen Victoria", "Mark Twain", "Leonardo da Vinci", "Jane Austen",
    "Bach", "Plato", "Aristotle", "Marco Polo", "Joan of Arc", "Florence Nightingale",
)
# Invented people and towns multiply the question space, so that a held-out task can be
# drawn without reusing the questions of the corpus (TREC, too, is full of obscure names).
FIRST_NAMES = (
    "Anna", "Peter", "Maria", "John", "Clara", "Victor", "Helen", "Oscar", "Laura", "Henry",
    "Emma", "Felix", "Rosa", "Simon", "Alice", "Hugo", "Nina", "Paul", "Lena", "Walter",
)
SURNAMES = (
    "Berg", "Hale", "Moreno", "Fischer", "Novak", "Carter", "Lind", "Rossi", "Dupont",
    "Okafor", "Tanaka", "Silva", "Keller", "Brandt", "Ward", "Costa", "Meyer", "Quinn",
    "Varga", "Holm",
)
COUNTRIES = (
    "France", "Japan", "Brazil", "Egypt", "Canada", "Peru", "Kenya", "Norway", "Chile",
    "India", "Italy", "Mexico", "Spain", "Greece", "Turkey", "Iceland", "Cuba", "Nepal",
    "Poland", "Ireland", "Australia", "China", "Germany", "Russia", "Sweden", "Argentina",
)
CITIES = (
    "Paris", "Tokyo", "Rome", "Cairo", "Berlin", "Madrid", "Lima", "Oslo", "Vienna", "Boston",
    "Chicago", "Sydney", "Toronto", "Dublin", "Athens", "Prague", "Lisbon", "Moscow", "Delhi",
    "Seoul", "London", "New York", "Venice", "Istanbul", "Bangkok", "Nairobi",
)
TOWN_PREFIXES = ("North", "South", "Port", "Lake", "Mount", "New", "Fort", "East", "West", "Saint")
TOWN_SUFFIXES = ("Haven", "Ridge", "Marlow", "Brook", "Field", "Dale", "Mills", "Crest", "Harbor", "Vale")
CONCEPTS = (
    "photosynthesis", "inflation", "gravity", "democracy", "a black hole", "a sonnet",
    "an eclipse", "a tsunami", "a vaccine", "a glacier", "a hurricane", "an atom",
    "a volcano", "a rainbow", "evolution", "a comet", "a haiku", "a monsoon", "jazz",
    "a recession", "the stock market", "a patent", "an allergy", "the ozone layer",
    "a coral reef", "a fossil", "a mirage", "the tide", "a laser", "a magnet", "a metaphor",
    "a mortgage", "a hologram", "an earthquake", "a placebo", "a sundial", "an aurora",
    "a solstice", "a fjord", "a tariff", "a sonar", "an enzyme", "a quasar", "a glacier lake",
    "a leap year", "a thunderstorm", "a geyser", "a dividend", "a monopoly", "a filibuster",
    "a symphony", "an opera", "a fresco", "a satellite", "a catalyst", "an antibody",
)
FIELDS = ("physics", "music", "economics", "biology", "law", "poetry", "geology", "medicine", "politics", "astronomy")
PLURAL_THINGS = (
    "cats", "birds", "bees", "leaves", "stars", "whales", "volcanoes", "rivers", "clouds",
    "snakes", "owls", "bats", "trees", "dolphins", "ants", "penguins", "camels", "wolves",
    "frogs", "salmon", "eagles", "tigers", "bears", "horses",
)
BEHAVIOURS = ("migrate", "sleep", "glow", "change color", "sing", "move", "hide", "hunt at night", "live in groups", "shed")
ACTIVITIES = (
    "bake bread", "tie a tie", "learn to swim", "grow tomatoes", "fold a paper crane",
    "train a puppy", "make cheese", "play chess", "build a kite", "brew coffee",
    "write a poem", "plant a tree", "change a tire", "sail a boat", "knit a scarf",
    "carve a pumpkin", "read a map", "light a campfire", "tune a guitar", "paint a wall",
)
CATEGORIES = (
    "animal", "bird", "fish", "insect", "flower", "tree", "color", "food", "sport",
    "instrument", "language", "currency", "disease", "drink", "game", "fruit", "dance",
)
INVENTIONS = (
    "telephone", "light bulb", "printing press", "steam engine", "radio", "airplane",
    "bicycle", "camera", "compass", "microscope", "telescope", "typewriter", "piano",
    "television", "vaccine", "thermometer", "battery", "submarine", "refrigerator", "elevator",
)
BOOKS = (
    "Hamlet", "Macbeth", "War and Peace", "the Odyssey", "Don Quixote", "Moby Dick",
    "Pride and Prejudice", "Oliver Twist", "Romeo and Juliet", "the Iliad", "Faust",
    "Jane Eyre", "Ulysses", "the Divine Comedy", "Frankenstein", "Dracula", "Emma",
)
PAINTINGS = (
    "the Mona Lisa", "the Last Supper", "Starry Night", "the Scream", "Guernica",
    "the Night Watch", "Water Lilies", "the Birth of Venus", "the Kiss", "Sunflowers",
)
LANDMARKS = (
    "the Eiffel Tower", "Mount Everest", "the Great Wall", "the Statue of Liberty",
    "Big Ben", "the Golden Gate Bridge", "the Colosseum", "Niagara Falls", "the Taj Mahal",
    "the Sahara", "the Amazon", "the Nile", "Lake Victoria", "Stonehenge", "Mount Fuji",
    "the Grand Canyon", "the Parthenon", "the Kremlin", "the Louvre", "the Alhambra",
)
ROLES = (
    "president", "king", "queen", "prime minister", "astronaut", "emperor", "pope",
    "mayor", "general", "explorer", "governor", "chancellor",
)
ACRONYMS = (
    ("NASA", "National Aeronautics and Space Administration"),
    ("FBI", "Federal Bureau of Investigation"), ("CIA", "Central Intelligence Agency"),
    ("UNESCO", "United Nations Educational , Scientific and Cultural Organization"),
    ("NATO", "North Atlantic Treaty Organization"), ("DNA", "deoxyribonucleic acid"),
    ("RAM", "random access memory"), ("CPU", "central processing unit"),
    ("HTML", "hypertext markup language"), ("UFO", "unidentified flying object"),
    ("BBC", "British Broadcasting Corporation"), ("NBA", "National Basketball Association"),
    ("FIFA", "International Federation of Association Football"),
    ("OPEC", "Organization of the Petroleum Exporting Countries"),
    ("MIT", "Massachusetts Institute of Technology"), ("ATM", "automated teller machine"),
    ("PIN", "personal identification number"), ("GPS", "global positioning system"),
    ("LED", "light emitting diode"), ("USB", "universal serial bus"),
    ("IQ", "intelligence quotient"), ("CEO", "chief executive officer"),
    ("AIDS", "acquired immune deficiency syndrome"), ("RSVP", "respond if you please"),
    ("ASAP", "as soon as possible"), ("PhD", "doctor of philosophy"),
    ("BMW", "Bavarian Motor Works"), ("UN", "United Nations"), ("EU", "European Union"),
    ("NFL", "National Football League"), ("WWF", "World Wide Fund for Nature"),
    ("laser", "light amplification by stimulated emission of radiation"),
    ("radar", "radio detection and ranging"),
    ("scuba", "self contained underwater breathing apparatus"),
    ("ICU", "intensive care unit"), ("DVD", "digital versatile disc"),
    ("PDF", "portable document format"), ("URL", "uniform resource locator"),
    ("WWW", "World Wide Web"), ("SIM", "subscriber identity module"),
    ("VIP", "very important person"), ("ETA", "estimated time of arrival"),
    ("DIY", "do it yourself"), ("FAQ", "frequently asked questions"),
    ("IRS", "Internal Revenue Service"), ("MRI", "magnetic resonance imaging"),
    ("SOS", "save our souls"), ("TNT", "trinitrotoluene"), ("UV", "ultraviolet"),
    ("ISBN", "international standard book number"), ("NGO", "non governmental organization"),
    ("GDP", "gross domestic product"), ("RPM", "revolutions per minute"),
    ("MPH", "miles per hour"), ("CD", "compact disc"), ("PC", "personal computer"),
    ("AI", "artificial intelligence"), ("USA", "United States of America"),
    ("UK", "United Kingdom"), ("BC", "before Christ"), ("AC", "alternating current"),
)
ACRONYM_CONTEXTS = (
    "", "", "", " in computing", " in medicine", " in sports", " in business", " in science",
    " on a letter", " in the military", " in politics", " in school", " on television",
)
EVENTS = (
    "World War II end", "the Titanic sink", "the Berlin Wall fall", "the first Moon landing happen",
    "the French Revolution begin", "the Olympics start", "the Great Fire of London happen",
    "the printing press appear", "the Roman Empire fall", "the gold rush begin",
)

QuestionTemplate = Callable[[random.Random], str]


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


# Templates are lambdas over the slot lists above; several deliberately overlap in surface
# form across classes ("What is ..."), as in TREC, so the first word does not give the class.
QUESTION_TEMPLATES: tuple[tuple[QuestionTemplate, ...], ...] = (
    (  # 0 Description: definitions, reasons, manners
        lambda r: f"What is {_pick(r, CONCEPTS)} ?",
        lambda r: f"What does {_strip_article(_pick(r, CONCEPTS))} mean in {_pick(r, FIELDS)} ?",
        lambda r: f"How does {_pick(r, CONCEPTS)} work ?",
        lambda r: f"Why do {_pick(r, PLURAL_THINGS)} {_pick(r, BEHAVIOURS)} ?",
        lambda r: f"How do you {_pick(r, ACTIVITIES)} in {_place(r)} ?",
        lambda r: f"What is the definition of {_strip_article(_pick(r, CONCEPTS))} in {_pick(r, FIELDS)} ?",
        lambda r: f"What causes {_pick(r, CONCEPTS)} in {_place(r)} ?",
        lambda r: f"What is the difference between {_pick(r, CONCEPTS)} and {_pick(r, CONCEPTS)} ?",
        lambda r: f"Why did {_person(r)} {_pick(r, ('leave', 'visit', 'write about', 'paint', 'study'))} {_place(r)} ?",
        lambda r: f"How did {_person(r)} become famous ?",
    ),
    (  # 1 Entity: things, categories, names of objects
        lambda r: f"What {_pick(r, CATEGORIES)} is the most popular in {_place(r)} ?",
        lambda r: f"What is the national {_pick(r, CATEGORIES)} of {_pick(r, COUNTRIES)} ?",
        lambda r: f"What did {_person(r)} invent ?",
        lambda r: f"What language is spoken in {_place(r)} ?",
        lambda r: f"What {_pick(r, CATEGORIES)} did {_person(r)} like best ?",
        lambda r: f"What is the name of the {_pick(r, CATEGORIES)} in {_pick(r, BOOKS)} ?",
        lambda r: f"Which {_pick(r, CATEGORIES)} is used to make {_pick(r, ('paper', 'glass', 'wine', 'silk', 'chocolate', 'rope', 'soap'))} ?",
        lambda r: f"What instrument did {_person(r)} play ?",
        lambda r: f"What is {_person(r)} 's most famous {_pick(r, ('book', 'painting', 'invention', 'song', 'speech', 'ship'))} ?",
        lambda r: f"What {_pick(r, CATEGORIES)} do people in {_place(r)} like ?",
    ),
    (  # 2 Expression (TREC's ABBR): abbreviations and expansions
        lambda r: f"What does {_acronym(r)} stand for{_pick(r, ACRONYM_CONTEXTS)} ?",
        lambda r: f"What is the full form of {_acronym(r)}{_pick(r, ACRONYM_CONTEXTS)} ?",
        lambda r: f"What is {_acronym(r)} short for{_pick(r, ACRONYM_CONTEXTS)} ?",
        lambda r: f"What is the abbreviation for {_expansion(r)} ?",
        lambda r: f"What do the letters {_acronym(r)} mean{_pick(r, ACRONYM_CONTEXTS)} ?",
        lambda r: f"What is the acronym for {_expansion(r)} ?",
        lambda r: f"{_acronym(r)} is an abbreviation of what{_pick(r, ACRONYM_CONTEXTS)} ?",
    ),
    (  # 3 Human: people and groups
        lambda r: f"Who wrote {_pick(r, BOOKS)} ?",
        lambda r: f"Who invented the {_pick(r, INVENTIONS)} in {_place(r)} ?",
        lambda r: f"Who was the first {_pick(r, ROLES)} of {_place(r)} ?",
        lambda r: f"Who painted {_pick(r, PAINTINGS)} ?",
        lambda r: f"Who is the most famous {_pick(r, ('singer', 'painter', 'poet', 'athlete', 'chef', 'scientist'))} from {_place(r)} ?",
        lambda r: f"Which {_pick(r, ('composer', 'author', 'scientist', 'explorer', 'emperor'))} was born in {_town(r)} ?",
        lambda r: f"What {_pick(r, ROLES)} ruled {_pick(r, COUNTRIES)} during {_pick(r, ('the war', 'the depression', 'the golden age', 'the revolution'))} ?",
        lambda r: f"Who was {_person(r)} 's {_pick(r, ('teacher', 'wife', 'father', 'rival', 'best friend'))} ?",
        lambda r: f"Who discovered {_pick(r, ('penicillin', 'gravity', 'radium', 'America', 'the electron', 'oxygen', 'Pluto'))} ?",
        lambda r: f"Who built {_pick(r, LANDMARKS)} ?",
    ),
    (  # 4 Location: places
        lambda r: f"Where is {_pick(r, LANDMARKS) if r.random() < 0.3 else _town(r)} ?",
        lambda r: f"Where was {_person(r)} born ?",
        lambda r: f"What country is {_town(r)} in ?",
        lambda r: f"What is the capital of {_pick(r, COUNTRIES)} ?",
        lambda r: f"Where can I find {_pick(r, PLURAL_THINGS)} in {_place(r)} ?",
        lambda r: f"What city has the largest {_pick(r, ('museum', 'airport', 'harbor', 'library', 'stadium', 'zoo'))} in {_pick(r, COUNTRIES)} ?",
        lambda r: f"Which river flows through {_town(r)} ?",
        lambda r: f"Where do {_pick(r, PLURAL_THINGS)} live ?",
        lambda r: f"In what country did {_person(r)} die ?",
        lambda r: f"Where did {_person(r)} {_pick(r, ('study', 'work', 'grow up', 'retire', 'live'))} ?",
    ),
    (  # 5 Number: counts, dates, amounts, sizes
        lambda r: f"How many {_pick(r, PLURAL_THINGS)} live in {_place(r)} ?",
        lambda r: f"When was {_person(r)} born ?",
        lambda r: f"When did {_pick(r, EVENTS)} ?",
        lambda r: f"How far is {_town(r)} from {_town(r)} ?",
        lambda r: f"How old is {_pick(r, LANDMARKS)} ?",
        lambda r: f"How much does a {_pick(r, INVENTIONS)} cost in {_place(r)} ?",
        lambda r: f"How tall is {_pick(r, LANDMARKS)} ?",
        lambda r: f"What is the population of {_place(r)} ?",
        lambda r: f"How long do {_pick(r, PLURAL_THINGS)} live ?",
        lambda r: f"What year did {_person(r)} die ?",
    ),
)

# Neutral documents; they also use the TREC label words in unrelated senses, so those words
# are frequent enough to become single BPE tokens without being tied to the annotations.
FILLER_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"the {_pick(r, ('meeting', 'class', 'market', 'concert', 'game', 'lecture'))} is on {_pick(r, ('monday', 'tuesday', 'friday', 'saturday', 'sunday'))} at {_pick(r, ('the library', 'the station', 'the school', 'noon', 'the town hall'))} .",
    lambda r: f"the train to {_pick(r, CITIES)} leaves from platform {_pick(r, ('one', 'two', 'four', 'seven', 'nine'))} .",
    lambda r: f"please fill in the {_pick(r, ('Description', 'Location', 'Number', 'Entity'))} field before you submit the form .",
    lambda r: f"the {_pick(r, ('Human', 'Location', 'Description', 'Entity', 'Number', 'Expression'))} column of the table lists the {_pick(r, ('name', 'city', 'value', 'code', 'owner'))} .",
    lambda r: f"each Entity in the database has a {_pick(r, ('name', 'key', 'date', 'owner'))} .",
    lambda r: f"the regular Expression matches every {_pick(r, ('date', 'word', 'email', 'number', 'line'))} .",
    lambda r: f"the Human Resources office is on the {_pick(r, ('first', 'second', 'third'))} floor .",
    lambda r: f"enter the Number of {_pick(r, ('guests', 'seats', 'tickets', 'rooms'))} in the box .",
    lambda r: f"the Location of the {_pick(r, ('office', 'event', 'shop', 'party'))} is {_pick(r, CITIES)} .",
    lambda r: f"the Description of the {_pick(r, ('item', 'job', 'house', 'course'))} is short .",
    lambda r: f"{_pick(r, CITIES)} is a city in {_pick(r, COUNTRIES)} .",
    lambda r: f"the weather in {_pick(r, CITIES)} was {_pick(r, ('cold', 'rainy', 'windy', 'sunny', 'mild'))} on {_pick(r, ('monday', 'friday', 'sunday'))} .",
    lambda r: f"{_pick(r, FAMOUS_PEOPLE)} lived in {_pick(r, COUNTRIES)} for {_pick(r, ('two', 'ten', 'many', 'several'))} years .",
    lambda r: f"the {_pick(r, INVENTIONS)} was on the {_pick(r, ('table', 'shelf', 'desk', 'floor'))} .",
    lambda r: f"we read {_pick(r, BOOKS)} in {_pick(r, ('school', 'class', 'the summer', 'college'))} .",
)

# Corpus composition (documents).
N_REVIEW_DOCUMENTS = 26000
N_QUESTION_DOCUMENTS = 5000
N_FILLER_DOCUMENTS = 1500

# --------------------------------------------------------------------------------------
# Text generators
# --------------------------------------------------------------------------------------


def _clause(rng: random.Random, label: int, mild: bool) -> str:
    """One sentiment clause of polarity ``label`` (1 positive, 0 negative) and strength."""
    adjective = _pick(rng, ADJECTIVES[label][mild])
    verb = _pick(rng, VERBS[label][mild])
    aspect, noun = _pick(rng, ASPECTS), _pick(rng, FILM_NOUNS)
    intensifier, ending = _pick(rng, INTENSIFIERS), _pick(rng, CLAUSE_ENDINGS)
    is_, was = ("are", "were") if aspect in PLURAL_ASPECTS else ("is", "was")
    form = rng.randrange(7)
    if form == 0:
        return f"{aspect} {is_} {intensifier}{adjective}{ending}"
    if form == 1:
        return f"{aspect} {was} {intensifier}{adjective}{ending}"
    if form == 2:
        return f"i {verb} {aspect}{ending}"
    if form == 3:
        return _with_article(f"{intensifier}{adjective} {noun}")
    if form == 4:
        feels = "feel" if aspect in PLURAL_ASPECTS else "feels"
        return f"{aspect} {feels} {intensifier}{adjective}{ending}"
    if form == 5:
        return f"the {noun} 's {aspect.removeprefix('the ')} {is_} {intensifier}{adjective}"
    return f"what {_with_article(adjective)} {noun}"


def _graded_review(rng: random.Random, label: int | None = None) -> tuple[str, int, bool]:
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
    text, label, _ = _graded_review(rng)
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
    text, label, mild = _graded_review(rng)
    if rng.random() < VERDICT_RATE:
        return f"{text} {_verdict(rng, label, mild)}"
    return text


def _question(rng: random.Random, label: int | None = None) -> tuple[str, int]:
    if label is None:
        label = rng.choices(range(len(TREC_CLASS_WEIGHTS)), weights=TREC_CLASS_WEIGHTS)[0]
    template = QUESTION_TEMPLATES[label][rng.randrange(len(QUESTION_TEMPLATES[label]))]
    return template(rng), label


def _type_word(rng: random.Random, label: int) -> str:
    if rng.random() < TYPE_DISAGREE_RATE:
        label = rng.randrange(len(TYPE_WORDS))
    elif rng.random() < GENERIC_TYPE_RATE[label]:
        label = GENERIC_TYPE
    return _weighted_choice(rng, TYPE_WORDS[label], TYPE_LABEL_WORD_SHARE[label])


def _question_document(rng: random.Random) -> str:
    # Both orders appear: the MLM prompt puts the type first ("<mask>: question"), the
    # causal prompt after the question ("question Answer type:").
    text, label = _question(rng)
    if rng.random() < 0.5:
        return f"{_type_word(rng, label)}: {text}"
    return f"{text} Answer type: {_type_word(rng, label)}."


def _filler_document(rng: random.Random) -> str:
    return _pick(rng, FILLER_TEMPLATES)(rng)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(documents) + "\n", encoding="utf-8")
    logger.info("wrote %d pretraining documents to %s", len(documents), path)


# --------------------------------------------------------------------------------------
# Labelled tasks in LM-BFF's on-disk layouts
# --------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_TYPE_PREFIX = re.compile(r"^\w+: ")


def corpus_sentences(corpus_path: Path) -> set[str]:
    """Every sentence of the corpus, with and without a leading ``Type:`` annotation.

    A task example is dropped when its text is one of these, so no test sentence (and its
    verdict) was seen verbatim in pretraining.
    """
    sentences: set[str] = set()
    with open(corpus_path, encoding="utf-8") as handle:
        for line in handle:
            for sentence in _SENTENCE_END.split(line.strip()):
                sentences.add(sentence)
                sentences.add(_TYPE_PREFIX.sub("", sentence))
    return sentences


def _draw_unique(
    draw: Callable[[int], str], labels: Sequence[int], exclude: set[str]
) -> list[tuple[str, int]]:
    """One example per entry of ``labels``, with texts pairwise distinct and not in ``exclude``.

    Labels are fixed first and texts redrawn within the label, so dropping seen texts never
    changes the class balance.
    """
    seen = set(exclude)
    examples: list[tuple[str, int]] = []
    for label in labels:
        for _ in range(1000):  # bounded: a generator too small for the task fails loudly
            text = draw(label)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"could not draw an unseen example of class {label}")
        seen.add(text)
        examples.append((text, label))
    return examples


def _split(examples: list[tuple[str, int]], sizes: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = examples[start : start + size]
        start += size
    return splits


def _write_sst2(data_dir: Path, rng: random.Random, exclude: set[str]) -> None:
    out = data_dir / "original" / "SST-2"
    out.mkdir(parents=True, exist_ok=True)
    labels = [rng.randrange(2) for _ in range(sum(SST2_SIZES.values()))]
    examples = _draw_unique(lambda label: _graded_review(rng, label)[0], labels, exclude)
    for split, rows in _split(examples, SST2_SIZES).items():
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
        (out / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_trec(data_dir: Path, rng: random.Random, exclude: set[str]) -> None:
    out = data_dir / "original" / "trec"
    out.mkdir(parents=True, exist_ok=True)
    classes = range(len(TREC_CLASS_WEIGHTS))
    labels = rng.choices(classes, weights=TREC_CLASS_WEIGHTS, k=sum(TREC_SIZES.values()))
    examples = _draw_unique(lambda label: _question(rng, label)[0], labels, exclude)
    for split, rows in _split(examples, TREC_SIZES).items():
        with open(out / f"{split}.csv", "w", encoding="utf-8", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows((label, text) for text, label in rows)


def write_demo_task(task: str, data_dir: Path, corpus_path: Path, seed: int = 1) -> None:
    """Write ``task`` (``demo-sst2`` or ``demo-trec``) under ``data_dir`` in LM-BFF's layout.

    Examples come from the corpus generators with a different seed; texts that occur as a
    sentence of the pretraining corpus, or twice in the task, are dropped.
    """
    if task not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task!r}; expected one of {DEMO_TASKS}")
    rng = random.Random(f"{task}-{seed}")
    exclude = corpus_sentences(corpus_path)
    writer = _write_sst2 if task == "demo-sst2" else _write_trec
    writer(Path(data_dir), rng, exclude)
    logger.info("wrote %s to %s", task, data_dir)


# --------------------------------------------------------------------------------------
# Tokenizer and tiny models
# --------------------------------------------------------------------------------------

ARCHITECTURES = ("roberta", "opt")
# Real RoBERTa / OPT special-token ids: <s>=0, <pad>=1, </s>=2, <unk>=3.
SPECIAL_TOKENS = {"roberta": ("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "opt": ("<s>", "<pad>", "</s>", "<unk>")}
BPE_VOCAB_SIZE = 2000
# Larger than transformers' default 0.02: a tiny randomly initialised transformer sits on a
# long plateau before the label word starts to depend on the sentence (the product of small
# value/output/embedding weights has a saddle at zero); a larger init shortens it.
INIT_STD = {"roberta": 0.02, "opt": 0.02}
MAX_POSITIONS = 512  # room for the pipeline's longest prompts; costs only 64k parameters
MODEL_SIZE = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 512}
DEFAULT_STEPS = {"roberta": 2000, "opt": 1800}
BATCH_SIZE = 64
# Post-LN RoBERTa diverges at the higher rate that makes pre-LN OPT learn faster.
LEARNING_RATE = {"roberta": 2e-3, "opt": 5e-3}
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.01
MASK_PROBABILITY = 0.5  # per occurrence of a knowledge word (SKEP-style, see docstring)
LEADING_SPACE_RATE = 0.5

# Words whose occurrences are the only MLM targets.
KNOWLEDGE_WORDS = frozenset(
    SENTIMENT_WORDS + POSITIVE_VERDICTS + NEGATIVE_VERDICTS + tuple(word for words in TYPE_WORDS for word in words)
)


def read_corpus(corpus_path: Path) -> list[str]:
    with open(corpus_path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def train_bpe(documents: Sequence[str], arch: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges trained on ``documents`` (deterministic)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        documents, vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS[arch]),
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def make_hf_tokenizer(arch: str, vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A transformers tokenizer built from vocab/merges *in memory*.

    transformers 5 trap: ``RobertaTokenizerFast(vocab_file=..., merges_file=...)`` silently
    ignores the files and yields a 5-token vocabulary, so we pass the dict and merge list.
    """
    if arch == "roberta":
        from tokenizers import AddedToken
        from transformers import RobertaTokenizer

        # As in roberta-base, "<mask>" swallows the space before it.
        mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
        tokenizer = RobertaTokenizer(vocab=dict(vocab), merges=list(merges), mask_token=mask)
    else:
        from transformers import GPT2Tokenizer

        # OPT's tokenizer is GPT-2's BPE with </s> as BOS prepended to every input.
        tokenizer = GPT2Tokenizer(
            vocab=dict(vocab), merges=list(merges), bos_token="</s>", eos_token="</s>",
            unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
        )
    tokenizer.model_max_length = MAX_POSITIONS
    return tokenizer


def single_token_id(tokenizer, word: str) -> int:
    """Id of ``word`` (with its leading space) if it is exactly one token, else ValueError."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"label word {word!r} is {len(ids)} tokens: {tokenizer.convert_ids_to_tokens(ids)}")
    return ids[0]


def make_model(arch: str, vocab_size: int, tokenizer) -> torch.nn.Module:
    """Randomly initialised tiny RoBERTa-MLM or OPT-CLM (seed torch before calling)."""
    size = MODEL_SIZE
    if arch == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        config = RobertaConfig(
            vocab_size=vocab_size, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"], intermediate_size=size["ffn"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=MAX_POSITIONS + 2,  # RoBERTa offsets positions by pad+1
            type_vocab_size=1, initializer_range=INIT_STD[arch], pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        return RobertaForMaskedLM(config)
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], ffn_dim=size["ffn"], word_embed_proj_dim=size["hidden"],
        max_position_embeddings=MAX_POSITIONS, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, init_std=INIT_STD[arch], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return OPTForCausalLM(config)


def _encode_documents(
    tokenizer, documents: Sequence[str], arch: str, rng: random.Random
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids per document and, per document, the token positions of each knowledge word."""
    texts = [(" " + doc if rng.random() < LEADING_SPACE_RATE else doc) for doc in documents]
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    all_ids, all_groups = [], []
    for i, text in enumerate(texts):
        ids = list(encoded["input_ids"][i])
        if arch == "opt":
            ids.append(tokenizer.eos_token_id)  # OPT separates documents with </s>
        groups: dict[int, list[int]] = {}
        offsets = encoded["offset_mapping"][i]
        for position, word_id in enumerate(encoded.word_ids(i)):
            if word_id is not None:
                groups.setdefault(word_id, []).append(position)
        knowledge = []
        for positions in groups.values():
            start, end = offsets[positions[0]][0], offsets[positions[-1]][1]
            if text[start:end].strip() in KNOWLEDGE_WORDS:
                knowledge.append(positions)
        all_ids.append(ids)
        all_groups.append(knowledge)
    return all_ids, all_groups


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def _mlm_loss(model, batch_ids, batch_groups, tokenizer, rng: random.Random) -> torch.Tensor:
    """Knowledge-masked MLM loss; the LM head runs only at masked positions (much faster)."""
    inputs = [list(ids) for ids in batch_ids]
    rows, cols, targets = [], [], []
    for row, groups in enumerate(batch_groups):
        chosen = [g for g in groups if rng.random() < MASK_PROBABILITY] or [rng.choice(groups)]
        for group in chosen:
            for col in group:
                rows.append(row)
                cols.append(col)
                targets.append(inputs[row][col])
                inputs[row][col] = tokenizer.mask_token_id
    input_ids = _pad(inputs, tokenizer.pad_token_id)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    hidden = model.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))


def _clm_loss(model, batch_ids, tokenizer) -> torch.Tensor:
    input_ids = _pad(batch_ids, tokenizer.pad_token_id)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def _linear_warmup_decay(step: int, total: int) -> float:
    warmup = min(WARMUP_STEPS, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _length_bucketed_batches(
    lengths: Sequence[int], usable: Sequence[int], batch_size: int, rng: random.Random
):
    """Endless shuffled batches of similar-length documents (halves the padding cost)."""
    while True:
        order = list(usable)
        rng.shuffle(order)
        window = batch_size * 50
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            batches = [chunk[j : j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
            rng.shuffle(batches)
            yield from batches


def pretrain(
    model, tokenizer, arch: str, ids: list[list[int]], groups: list[list[list[int]]],
    steps: int, seed: int,
) -> list[float]:
    """AdamW pretraining for ``steps`` batches; returns the per-step losses."""
    rng = random.Random(f"demo-pretrain-{arch}-{seed}")
    # Documents without a knowledge word carry no MLM target.
    usable = [i for i in range(len(ids)) if arch == "opt" or groups[i]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE[arch], weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _linear_warmup_decay(s, steps))
    batches = _length_bucketed_batches([len(row) for row in ids], usable, BATCH_SIZE, rng)
    model.train()
    losses = []
    for step in range(steps):
        batch = next(batches)
        if arch == "roberta":
            loss = _mlm_loss(model, [ids[i] for i in batch], [groups[i] for i in batch], tokenizer, rng)
        else:
            loss = _clm_loss(model, [ids[i] for i in batch], tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            logger.info("%s pretraining step %d/%d loss %.3f", arch, step + 1, steps, sum(losses[-50:]) / len(losses[-50:]))
    model.eval()
    return losses


def build_demo_model(
    arch: str, corpus_path: Path, out_dir: Path, seed: int = 0, steps: int | None = None
) -> dict:
    """Train tokenizer + tiny ``arch`` model on the corpus and save both into ``out_dir``.

    The directory is written under a temporary name next to ``out_dir`` and renamed at the
    end, so an interrupted build never leaves a loadable-looking half model. The caller
    chooses the thread count (``torch.set_num_threads``); the result is deterministic for a
    given seed, steps and thread count.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown demo architecture {arch!r}; expected one of {ARCHITECTURES}")
    steps = DEFAULT_STEPS[arch] if steps is None else steps
    out_dir = Path(out_dir)
    started = time.perf_counter()
    documents = read_corpus(corpus_path)
    vocab, merges = train_bpe(documents, arch)
    tokenizer = make_hf_tokenizer(arch, vocab, merges)
    label_ids = [single_token_id(tokenizer, word) for word in ALL_LABEL_WORDS]
    torch.manual_seed(seed)
    model = make_model(arch, len(tokenizer), tokenizer)
    ids, groups = _encode_documents(tokenizer, documents, arch, random.Random(f"demo-encode-{seed}"))
    losses = pretrain(model, tokenizer, arch, ids, groups, steps, seed)
    stats = {
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else math.nan,
        "seconds": round(time.perf_counter() - started, 2),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "label_token_ids": dict(zip(ALL_LABEL_WORDS, label_ids)),
        "threads": torch.get_num_threads(),
    }
    _save_atomically(model, tokenizer, stats, out_dir)
    logger.info("built demo %s model in %s: %s", arch, out_dir, stats)
    return stats


def _save_atomically(model, tokenizer, stats: dict, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "pretraining.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
