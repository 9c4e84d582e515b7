"""Offline "embedded demo": a synthetic world small enough to pretrain on a laptop CPU.

The real experiments fine-tune roberta-large / OPT on SST-2 and TREC. None of that can be
downloaded here, so this module generates a stand-in with the same *interfaces*:

* a pretraining corpus (one short document per line): movie-review-like sentences, three in
  four followed by a verdict sentence ("It was great."), questions annotated with their
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
  miscalibrated. A negative verdict rarely says " terrible" (mostly bad / awful / poor)
  while " great" is the commonest positive one; verdicts after *mild* reviews ("rather
  flat") contradict them far more often than after strong ones. So the model tends to rate
  strongly negative sentences " terrible" but mildly negative ones " great": zero-shot is
  clearly above chance but far from perfect (68-74 % over eight pretrained models), and the
  spread of the negative sentences' scores keeps it from jumping between 50 and 100 %. Likewise answer types are mostly annotated with synonyms
  (Person, Place, Count, ...) and annotators fall back to the catch-all type (" Entity",
  Thing, ...) for many Description / Expression / Number questions, so zero-shot labels those
  " Entity". Fine-tuning mostly has to re-calibrate the label words, which zeroth-order
  methods do within a few hundred steps.
* Deviation from standard MLM (deliberate): with ordinary random masking a 2-layer RoBERTa
  never learns to put the sentiment into the ``<mask>`` of ``It was<mask>.`` within the
  budget (the signal is a tiny fraction of the targets), and SKEP-style masking of the
  sentiment words as well (each with probability 0.5) did not either in 1600 steps (tried
  at learning rate 2e-3). The
  RoBERTa model is therefore trained to fill exactly the prompts' slots: every verdict and
  answer-type word is masked, and nothing else. The causal OPT model uses the ordinary
  next-token objective on every token.
* The label words' dependence on the sentence appears abruptly after a plateau. Three things
  bring it well inside the step budget: untied input/output embeddings (``TIE_EMBEDDINGS``),
  a few frequent sentence adverbs in the reviews (``MARKERS``) and, for OPT, a constant
  learning rate before the final decay (``_lr_factor``).
* LM-BFF's TREC template puts the mask right after ``<s>`` and scores label words *with* a
  leading space (``<s><mask>: question``). So that the model has seen that, half of the
  documents are encoded with a leading space during pretraining (what RoBERTa's
  ``add_prefix_space`` would do).
* Everything is seeded; pretraining length is a step count, never a time budget, because
  zero-shot accuracy swings between nearby checkpoints. Each model takes about 80 s on one
  CPU thread (``DEFAULT_STEPS``).
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .fileio import atomic_path

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
VERDICT_RATE = 0.75  # fraction of corpus reviews followed by a verdict
DISAGREE_RATE = (0.03, 0.20)  # [mild] verdicts contradicting the review (about 11 % overall)
REVIEW_SHAPES = (0.65, 0.20, 0.15)  # single clause, "X , but Y", "X and Y"
VERDICT_FORMS = (
    ("It was {}.", 0.80), ("Overall , it was {}.", 0.10), ("It was {} , really.", 0.10)
)

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
TOWN_SUFFIXES = (
    "Haven", "Ridge", "Marlow", "Brook", "Field", "Dale", "Mills", "Crest", "Harbor", "Vale"
)
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
FIELDS = (
    "physics", "music", "economics", "biology", "law", "poetry", "geology", "medicine",
    "politics", "astronomy",
)
PLURAL_THINGS = (
    "cats", "birds", "bees", "leaves", "stars", "whales", "volcanoes", "rivers", "clouds",
    "snakes", "owls", "bats", "trees", "dolphins", "ants", "penguins", "camels", "wolves",
    "frogs", "salmon", "eagles", "tigers", "bears", "horses",
)
BEHAVIOURS = (
    "migrate", "sleep", "glow", "change color", "sing", "move", "hide", "hunt at night",
    "live in groups", "shed",
)
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
    "discovery": _choice(
        ("penicillin", "gravity", "radium", "America", "the electron", "oxygen", "Pluto")
    ),
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

# --------------------------------------------------------------------------------------
# Text generators
# --------------------------------------------------------------------------------------


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
    text, label = _question(rng)
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


def _split(
    examples: list[tuple[str, int]], sizes: dict[str, int]
) -> dict[str, list[tuple[str, int]]]:
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
        with atomic_path(out / f"{split}.tsv") as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_trec(data_dir: Path, rng: random.Random, exclude: set[str]) -> None:
    out = data_dir / "original" / "trec"
    out.mkdir(parents=True, exist_ok=True)
    classes = range(len(TREC_CLASS_WEIGHTS))
    labels = rng.choices(classes, weights=TREC_CLASS_WEIGHTS, k=sum(TREC_SIZES.values()))
    examples = _draw_unique(lambda label: _question(rng, label)[0], labels, exclude)
    for split, rows in _split(examples, TREC_SIZES).items():
        with atomic_path(out / f"{split}.csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
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
SPECIAL_TOKENS = {
    "roberta": ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
    "opt": ("<s>", "<pad>", "</s>", "<unk>"),
}
BPE_VOCAB_SIZE = 2000  # keeps every label word a single token (checked at build time)
MAX_POSITIONS = 512  # room for the pipeline's longest prompts; costs only 64k parameters
MODEL_SIZE = {"hidden": 128, "layers": 2, "heads": 4, "ffn": 512}
# Untied input/output embeddings: with tied ones, predicting the words of a slot ("the plot
# is ___") pulls all its candidates' embeddings together, so the adjectives' *input*
# embeddings lose their polarity and the label word stays independent of the sentence for
# well over the time budget (measured: no sentiment at all after 1600-2000 steps).
TIE_EMBEDDINGS = False
DEFAULT_STEPS = {"roberta": 1600, "opt": 1200}
BATCH_SIZE = 64
# Post-LN RoBERTa is slow to start (or diverges) at rates that suit pre-LN OPT: at 1e-3 the
# sentiment shows after ~200 steps, at 2e-3 after 600 to 1500 depending on the seed.
LEARNING_RATE = {"roberta": 1e-3, "opt": 5e-3}
WARMUP_STEPS = 100
# Share of the steps over which the rate decays linearly to 0 after a constant phase (see
# _lr_factor); post-LN RoBERTa degrades when kept at its peak rate, so it decays throughout.
DECAY_FRACTION = {"roberta": 1.0, "opt": 0.3}
WEIGHT_DECAY = 0.01
LEADING_SPACE_RATE = 0.5  # see module docstring (LM-BFF's "<s><mask>:" TREC template)
# The MLM targets: the words that fill the prompts' slots (verdicts, answer types).
SLOT_WORDS = frozenset(
    POSITIVE_VERDICTS + NEGATIVE_VERDICTS + tuple(word for words in TYPE_WORDS for word in words)
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
    ignores the files and yields a 5-token vocabulary, so we pass the dict and merge list;
    ``save_pretrained`` then writes a tokenizer.json that ``AutoTokenizer`` reloads as is.
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
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"label word {word!r} is {len(ids)} tokens: {pieces}")
    return ids[0]


def make_model(arch: str, tokenizer) -> torch.nn.Module:
    """Randomly initialised tiny RoBERTa-MLM or OPT-CLM (seed torch before calling)."""
    size = MODEL_SIZE
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": TIE_EMBEDDINGS,
    }
    if arch == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=size["hidden"],
            num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
            intermediate_size=size["ffn"], hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, type_vocab_size=1,
            max_position_embeddings=MAX_POSITIONS + 2,  # RoBERTa offsets positions by pad+1
            **special,
        )
        return RobertaForMaskedLM(config)
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=size["hidden"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], ffn_dim=size["ffn"], word_embed_proj_dim=size["hidden"],
        max_position_embeddings=MAX_POSITIONS, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, **special,
    )
    return OPTForCausalLM(config)


def encode_documents(
    tokenizer, documents: Sequence[str], arch: str, rng: random.Random
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per document and, per document, the token positions of its slot words."""
    texts = [(" " + doc if rng.random() < LEADING_SPACE_RATE else doc) for doc in documents]
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    all_ids, all_slots = [], []
    for i, text in enumerate(texts):
        ids = list(encoded["input_ids"][i])
        if arch == "opt":
            ids.append(tokenizer.eos_token_id)  # OPT separates documents with </s>
        words: dict[int, list[int]] = {}  # pre-tokenizer word -> its token positions
        for position, word_id in enumerate(encoded.word_ids(i)):
            if word_id is not None:
                words.setdefault(word_id, []).append(position)
        offsets = encoded["offset_mapping"][i]
        slots = [
            position
            for positions in words.values()
            if text[offsets[positions[0]][0] : offsets[positions[-1]][1]].strip() in SLOT_WORDS
            for position in positions
        ]
        all_ids.append(ids)
        all_slots.append(slots)
    return all_ids, all_slots


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [list(row) + [value] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.long)


def _mlm_loss(model, batch_ids, batch_slots, tokenizer) -> torch.Tensor:
    """Slot-masked MLM loss; the LM head runs only at the masked positions (much faster)."""
    inputs = [list(ids) for ids in batch_ids]
    rows, cols, targets = [], [], []
    for row, slots in enumerate(batch_slots):
        for col in slots:
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


def _lr_factor(step: int, total: int, decay_fraction: float) -> float:
    """Warm-up, constant, then linear decay to 0 over the last ``decay_fraction`` of the steps.

    A long constant phase matters: the sentence-dependence of the label words appears
    abruptly after a plateau, and a plain linear decay often lowers the rate too early.
    """
    warmup = min(WARMUP_STEPS, max(1, total // 10))
    decay_start = max(warmup, int(total * (1 - decay_fraction)))
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


def _length_bucketed_batches(
    lengths: Sequence[int], usable: Sequence[int], batch_size: int, rng: random.Random
) -> Iterator[list[int]]:
    """Endless shuffled batches of similar-length documents (halves the padding cost)."""
    window = batch_size * 50
    while True:
        order = list(usable)
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            starts = range(0, len(chunk) - batch_size + 1, batch_size)
            batches = [chunk[j : j + batch_size] for j in starts]
            rng.shuffle(batches)
            yield from batches


def pretrain(
    model, tokenizer, arch: str, ids: list[list[int]], slots: list[list[int]], steps: int, seed: int
) -> list[float]:
    """AdamW pretraining for ``steps`` batches; returns the per-step losses."""
    rng = random.Random(f"demo-pretrain-{arch}-{seed}")
    usable = [i for i in range(len(ids)) if arch == "opt" or slots[i]]  # MLM needs a target
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE[arch], weight_decay=WEIGHT_DECAY
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, steps, DECAY_FRACTION[arch])
    )
    batches = _length_bucketed_batches([len(row) for row in ids], usable, BATCH_SIZE, rng)
    model.train()
    losses = []
    for step in range(steps):
        batch = next(batches)
        if arch == "roberta":
            loss = _mlm_loss(model, [ids[i] for i in batch], [slots[i] for i in batch], tokenizer)
        else:
            loss = _clm_loss(model, [ids[i] for i in batch], tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            recent = losses[-50:]
            mean = sum(recent) / len(recent)
            logger.info("%s pretraining step %d/%d loss %.3f", arch, step + 1, steps, mean)
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
    model = make_model(arch, tokenizer)
    ids, slots = encode_documents(tokenizer, documents, arch, random.Random(f"demo-encode-{seed}"))
    losses = pretrain(model, tokenizer, arch, ids, slots, steps, seed)
    stats = {
        "arch": arch,
        "seed": seed,
        "steps": steps,
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None,
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
