"""Concepts of a caption, as ICCC (nanovlm/iccc.py) corrupts them: noun phrases, predicates, nouns, verbs and
attributes.

The paper finds them with spaCy's dependency parser; here word lists and a few rules, standard library only
(about 28,000 captions a second on one core: tests/benchmark_iccc.py). Five types, as in the
official code:
- `ent`: noun phrases with their determiners ("a large red circle", "two dogs", "a man's hand");
- `pred`: the words between two consecutive noun phrases ("riding", "sitting on top of", "to the left of"),
  without any that hold the word "and" and without the bare "of" and "is";
- `noun`: the head noun of each noun phrase; `verb`: verbs outside noun phrases ("riding", "sits", "has");
- `attr`: what modifies a head noun inside its phrase: colours, numbers, sizes, materials, other adjectives,
  -ing / -ed modifiers ("a dining table", "a stuffed bear") and noun-compound modifiers ("tennis" in "a tennis
  racket").
A leading "there is" / "there are" is skipped. A word is tagged from fixed lists (determiners, numbers,
prepositions with multiword ones such as "in front of" and "next to", conjunctions, pronouns, auxiliaries,
colours, sizes, materials, common adjectives, 160 caption verbs with their -s forms, 55 irregular past forms),
then by suffix (-ing and -ed verbs, -ly adverbs, -ful / -ous / -less adjectives), and any other word is a
noun: captions are mostly nouns, so an unknown word ("giraffe", "skateboard") is right as a noun. A noun phrase
is an optional determiner, modifiers, then a run of nouns whose last is the head; a listed verb that follows a
determiner or a modifier is a noun ("two skis", "a ride"), one that follows a noun ends the phrase ("a man
rides"). What this misses: verbs not in the list that look like nouns ("a man juggles balls" makes one phrase,
unless a determiner follows the verb); noun compounds whose second word is a listed base verb ("a boat ride"
reads as a verb); predicative adjectives ("the sky is blue": no attribute, as in spaCy); coordination scope
("a plate of food and a cup" is read flat); relative clauses and long-distance attachment. Non-English words
count as nouns.
"""

import functools
import re
from dataclasses import dataclass
from itertools import pairwise

TYPES = ("ent", "pred", "noun", "verb", "attr")

# --- word lists ---------------------------------------------------------------------------------------------

DET, POSS, NUM, ADJ, NOUN, VERB, ING, ED, ADV, AUX, PREP, CONJ, PRON, PUNCT = (
    "DET", "POSS", "NUM", "ADJ", "NOUN", "VERB", "ING", "ED", "ADV", "AUX", "PREP", "CONJ", "PRON", "PUNCT")


def words(text: str) -> set[str]:
    return set(text.split())


DETERMINERS = words(
    "a an the this that these those some each every another its his her their our my your no any both all either "
    "neither such")
NUMBERS = words(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty hundred thousand dozen dozens hundreds several many few multiple "
    "numerous various couple")
COLOURS = words(
    "red green blue yellow orange purple pink brown black white gray grey silver gold golden beige tan violet "
    "maroon navy teal turquoise cyan magenta blond blonde colorful colourful multicolored multicoloured dark "
    "bright pale") | {"black and white"}
SIZES = words(
    "small large big little tiny huge giant tall short long wide narrow thin thick fat skinny massive enormous "
    "medium mini miniature oversized high low deep shallow")
MATERIALS = words(
    "wooden wood metal metallic plastic glass stone brick concrete leather paper cardboard ceramic steel iron "
    "cotton wool woolen marble rubber straw wicker bamboo denim silk velvet porcelain copper bronze aluminum clay")
ADJECTIVES = words(
    "old young new elderly pretty beautiful cute happy sad empty full open closed clean dirty wet dry hot cold warm "
    "fresh ripe raw busy quiet crowded sunny cloudy snowy rainy foggy grassy sandy rocky muddy dusty fluffy furry "
    "hairy shiny dim heavy modern antique vintage ornate fancy plain simple delicious healthy tasty different "
    "same other single double professional male female adult wild nice good great ugly strange unusual funny "
    "broken striped checkered spotted dotted stuffed frosted fried cooked sliced chopped grilled baked toasted "
    "roasted mixed assorted tired lonely lovely friendly curly silly early real fake favorite perfect flat "
    "curved straight tilted electric whole half asian leafy lush bare paved tiled wooded cluttered messy neat "
    "tidy rusty rustic calm smooth rough soft hard sharp pointy fuzzy upside-down outdoor indoor cheesy close")
ADJECTIVE_SUFFIXES = ("ful", "ous", "less", "-colored", "-coloured", "-shaped", "-sized", "-looking", "-style")
NOT_ADJECTIVES = words("dish fish radish wish polish finish olive drive hive five dive chive")
PREPOSITIONS = words(
    "on in at of with near beside behind under above below over across along through into onto from by around "
    "between inside outside atop against toward towards underneath beneath up down off out for during past among "
    "upon about like without within via beyond amid alongside throughout before after than to adjacent")
PHRASES = {  # multiword units, matched first; each is one token
    ("in", "front", "of"): PREP, ("on", "top", "of"): PREP, ("next", "to"): PREP, ("close", "to"): PREP,
    ("adjacent", "to"): PREP, ("across", "from"): PREP, ("in", "the", "middle", "of"): PREP,
    ("to", "the", "left", "of"): PREP, ("to", "the", "right", "of"): PREP, ("on", "the", "left", "of"): PREP,
    ("on", "the", "right", "of"): PREP, ("on", "the", "side", "of"): PREP, ("out", "of"): PREP,
    ("away", "from"): PREP, ("in", "between"): PREP, ("black", "and", "white"): ADJ,
}
CONJUNCTIONS = words("and or but while as that which who whom whose where when because if then nor yet")
PRONOUNS = words(
    "it he she they them him itself himself herself themselves someone somebody something anything nothing "
    "everything everyone there here what we us you i me")
AUXILIARIES = words("is are was were be been being am can could will would should may might must does do did 's")
ADVERBS = words(
    "very really quite extremely too so rather fairly almost nearly just also still together away outside inside "
    "around here up down back")
LY_WORDS = words("family belly jelly lily butterfly dragonfly ally rally bully holly supply reply assembly italy july")
ING_NOUNS = words(
    "building ceiling clothing king ring string thing something nothing anything everything evening morning "
    "wedding painting drawing railing awning pudding frosting icing topping stuffing dressing sibling duckling "
    "wing swing spring sling earring sapling offspring lighting crossing landing opening bedding housing seating "
    "herring dumpling")
ED_NOUNS = ("bed", "shed", "sled", "seed", "weed", "speed", "feed", "reed", "breed", "steed", "hundred", "red",
            "need", "deed", "tweed")
VERB_BASES = words(  # common caption verbs; their -s forms are derived, -ing and -ed forms found by suffix
    "sit stand hold ride look fly eat play lay lie wait walk run hang graze carry show contain wear watch drive "
    "pull lean rest sleep swing throw catch hit prepare cut talk use pose smile point travel cross go make take "
    "get try read drink kick jump skate surf ski cook perch float swim sail climb serve move sell work stare "
    "gather grab brush chase bite lick laugh dress reach push put overlook lead follow pass pet hug kiss "
    "photograph check wash clean pack build write lift shine glow fall crash dive stretch tie roll bend kneel "
    "crouch squat sniff hunt steer paddle drag tow haul enter leave exit approach arrive depart await surround "
    "dangle hover splash spray pour mix slice chop bake fry grill taste enjoy share observe examine inspect "
    "appear seem remain stay wander roam stroll hike jog sprint have keep tend feed fill decorate nap bask "
    "cuddle snuggle munch chew sip eye wag board cover line top park")
IRREGULAR_VERBS = words(
    "sat stood held rode ridden flew flown ate eaten laid lain hung ran drove driven caught threw thrown took "
    "taken made got gotten went gone fed led brought bought built wrote written sold left lit has had seen saw "
    "worn wore slept swam swum sang sung fell fallen shot dug spun struck stuck bent knelt")
NOUNLIKE_BASES = words("cover line top park board eye show watch point cross hit cut tie")  # nouns more often
IRREGULAR_PLURALS = words(
    "people men women children feet teeth mice geese sheep fish deer cattle police glasses pants jeans shorts "
    "scissors clothes")
# Nouns that also modify: the head at the end of a phrase ("a glass of wine", "a traffic light"), a modifier
# before a noun or an adjective ("a glass table", "a light blue shirt").
NOUN_OR_MODIFIER = words("glass stone brick wood metal paper plastic orange gold silver light")
SYMMETRIC = {"next to", "near", "beside", "adjacent", "adjacent to", "across", "across from", "with", "close to",
             "alongside"}
LIST_WORDS = {"and", "or"}
TOKEN = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*|\S")


def third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def lexicon() -> dict[str, str]:
    """Every listed word -> its tag (the first list that holds it wins)."""
    tags: dict[str, str] = {}
    verbs = {"has"} | IRREGULAR_VERBS | {b for b in VERB_BASES if b not in NOUNLIKE_BASES} | {
        third_person(b) for b in VERB_BASES}
    for members, tag in ((DETERMINERS, DET), (NUMBERS, NUM), (AUXILIARIES, AUX), (PRONOUNS, PRON),
                       (CONJUNCTIONS, CONJ), (COLOURS | SIZES | ADJECTIVES | MATERIALS, ADJ), (PREPOSITIONS, PREP),
                       (ADVERBS, ADV), (ING_NOUNS | LY_WORDS | IRREGULAR_PLURALS, NOUN), (verbs, VERB)):
        for word in members:
            tags.setdefault(word, tag)
    for word in NOUN_OR_MODIFIER:
        tags[word] = NOUN
    return tags


def phrases_by_start() -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """First word -> the multiword units it starts, longest first (the longest match wins)."""
    starts: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for phrase, tag in sorted(PHRASES.items(), key=lambda item: -len(item[0])):
        starts.setdefault(phrase[0], []).append((phrase, tag))
    return starts


LEXICON = lexicon()
PHRASES_BY_START = phrases_by_start()


@functools.cache  # a caption set's vocabulary is small next to its size
def tag_word(word: str) -> str:
    if word in LEXICON:
        return LEXICON[word]
    if not word[0].isalnum():
        return PUNCT
    if word[0].isdigit():
        return NUM
    if word.endswith(("'s", "’s", "s'")):
        return POSS
    if word.endswith("ing") and len(word) > 4:
        return ING
    if word.endswith("ed") and len(word) > 4 and not word.endswith(ED_NOUNS):
        return ED
    if word.endswith("ly") and len(word) > 4:
        return ADV
    if word.endswith(ADJECTIVE_SUFFIXES) or (word.endswith(("ish", "ive")) and word not in NOT_ADJECTIVES):
        return ADJ
    return NOUN


# --- extraction ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Token:
    word: str  # lowercased; a multiword unit ("next to") is one token
    start: int  # character offsets in the caption
    end: int
    tag: str


@dataclass
class Entity:
    start: int  # token indices: [start, end) is the noun phrase, `head` its head noun
    end: int
    head: int
    attrs: tuple[int, ...]


@dataclass
class Concepts:
    """A caption's concepts: for each type, the character spans of its occurrences, in reading order."""
    text: str
    tokens: list[Token]
    entities: list[Entity]
    spans: dict[str, list[tuple[int, int]]]

    def texts(self, kind: str) -> list[str]:
        return [self.text[s:e] for s, e in self.spans[kind]]


def tokenize(text: str) -> list[Token]:
    pieces, starts, position = TOKEN.findall(text), [], 0
    for piece in pieces:  # findall and find are several times faster than finditer's match objects
        position = text.find(piece, position)
        starts.append(position)
        position += len(piece)
    words = [piece.lower() for piece in pieces]
    tokens, i = [], 0
    while i < len(words):
        for phrase, tag in PHRASES_BY_START.get(words[i], ()):
            if tuple(words[i:i + len(phrase)]) == phrase:
                last = i + len(phrase) - 1
                tokens.append(Token(" ".join(phrase), starts[i], starts[last] + len(pieces[last]), tag))
                i += len(phrase)
                break
        else:
            tokens.append(Token(words[i], starts[i], starts[i] + len(pieces[i]), tag_word(words[i])))
            i += 1
    return tokens


def noun_phrase(tokens: list[Token], i: int) -> Entity | None:
    """The noun phrase starting at token i, or None: [determiner] modifiers* nouns+, the last noun its head."""
    n, j = len(tokens), i
    if tokens[j].tag == DET:
        j += 1
    modifiers: list[int] = []
    nouns: list[int] = []
    while j < n:
        tag, after = tokens[j].tag, tokens[j + 1].tag if j + 1 < n else None
        if nouns and tag == ADJ and tokens[nouns[-1]].word in NOUN_OR_MODIFIER and after in (NOUN, ADJ):
            modifiers += [nouns.pop(), j]  # "a light blue shirt"
        elif nouns:  # after a noun only more nouns continue the phrase (compounds); the last one is the head
            if tag != NOUN:
                break
            if tokens[j].word.endswith("s") and after in (DET, NUM):  # "a man juggles a ball": a verb
                tokens[j].tag = VERB
                break
            nouns.append(j)
        elif tag in (NOUN, VERB):  # a listed verb after a determiner or a modifier is a noun: "a ride", "two skis"
            nouns.append(j)
        elif tag in (NUM, ADJ, POSS) or (tag in (ING, ED) and after in (NOUN, ADJ, ING, ED, VERB)):
            modifiers.append(j)
        elif tag == ADV and after in (ADJ, NUM):  # "a very large dog"
            pass
        elif tokens[j].word in ("and", ",") and modifiers and tokens[modifiers[-1]].tag == ADJ and after == ADJ:
            pass  # "a red and white bus", "a red, white bus"
        else:
            break
        j += 1
    if not nouns:
        return None
    attrs = tuple(m for m in modifiers if tokens[m].tag != POSS) + tuple(nouns[:-1])
    return Entity(i, nouns[-1] + 1, nouns[-1], attrs)


def extract(caption: str) -> Concepts:
    """The concepts of one caption (any string; normalise it first for ICCC)."""
    tokens = tokenize(caption)
    opening = [t.word for t in tokens[:2]]
    if opening in (["there", "is"], ["there", "are"]):
        first = 2
    else:
        first = 1 if opening[:1] in (["there's"], ["there’s"]) else 0
    entities, i = [], first
    while i < len(tokens):
        tag = tokens[i].tag
        # a listed verb right after a verb is its object: "giraffes eat leaves"
        object_noun = tag == VERB and i > first and tokens[i - 1].tag in (VERB, ING, ED) and is_plural(tokens[i].word)
        entity = noun_phrase(tokens, i) if tag in (DET, POSS, NUM, ADJ, NOUN) or object_noun else None
        if entity:
            entities.append(entity)
            i = entity.end
        else:
            i += 1
    inside = {j for e in entities for j in range(e.start, e.end)}
    spans: dict[str, list[tuple[int, int]]] = {kind: [] for kind in TYPES}
    for e in entities:
        spans["ent"].append((tokens[e.start].start, tokens[e.end - 1].end))
        spans["noun"].append((tokens[e.head].start, tokens[e.head].end))
    spans["attr"] = sorted((tokens[j].start, tokens[j].end) for e in entities for j in e.attrs)
    spans["verb"] = [(t.start, t.end) for j, t in enumerate(tokens[first:], first)
                     if t.tag in (VERB, ING, ED) and j not in inside]
    for left, right in pairwise(entities):
        gap = tokens[left.end:right.start]
        while gap and gap[0].tag == PUNCT:
            gap.pop(0)
        while gap and gap[-1].tag == PUNCT:
            gap.pop()
        gap_words = [t.word for t in gap]
        if gap_words and "and" not in gap_words and gap_words not in (["of"], ["is"]):
            spans["pred"].append((gap[0].start, gap[-1].end))
    return Concepts(caption, tokens, entities, spans)


def meaning(concepts: Concepts) -> tuple:
    """A canonical form of what a caption says, blind to the order of list items, of the two sides of a symmetric
    relation and of one noun's modifiers: two captions with the same form say the same thing."""
    tokens, entities = concepts.tokens, concepts.entities
    if not entities:
        return tuple(t.word for t in tokens), ()

    def entity_key(e: Entity) -> str:
        rest = [tokens[j].word for j in range(e.start, e.end) if j not in e.attrs and tokens[j].word not in
                ("and", ",")]
        return " ".join(rest) + " | " + " ".join(sorted(tokens[j].word for j in e.attrs))

    conjuncts, parts, group = [], [], [entity_key(entities[0])]
    for left, right in pairwise(entities):
        gap = [t.word for t in tokens[left.end:right.start] if t.tag != PUNCT]
        if not gap or LIST_WORDS.intersection(gap):  # a list: "a cat, a dog and a bird"
            conjuncts.append(" ~ ".join(parts + [" + ".join(sorted(group))]))
            parts, group = [], [entity_key(right)]
        elif SYMMETRIC.intersection(gap):  # "a cat next to a dog"
            group.append(entity_key(right))
        else:  # an ordered relation: "a man riding a horse"
            parts += [" + ".join(sorted(group)), " ".join(gap)]
            group = [entity_key(right)]
    conjuncts.append(" ~ ".join(parts + [" + ".join(sorted(group))]))
    before = tuple(t.word for t in tokens[:entities[0].start])
    after = tuple(t.word for t in tokens[entities[-1].end:])
    return before, tuple(sorted(conjuncts)), after




def is_plural(word: str) -> bool:
    return word in IRREGULAR_PLURALS or (word.endswith("s") and not word.endswith(("ss", "us", "is", "'s")))


@functools.cache
def form(kind: str, concept: str) -> str:
    """What a replacement must share with the concept it replaces, so the caption stays grammatical."""
    last = concept.rsplit(" ", 1)[-1]
    if kind in ("ent", "noun"):
        return "plural" if is_plural(last) else "singular"
    if kind == "verb":
        if last.endswith("ing"):
            return "ing"
        if last.endswith("ed") or last in IRREGULAR_VERBS:
            return "past"
        return "s" if last.endswith("s") else "base"
    if kind == "attr":
        for name, members in (("colour", COLOURS), ("size", SIZES), ("material", MATERIALS), ("number", NUMBERS)):
            if concept in members:
                return name
        return "number" if concept[0].isdigit() else "adjective" if tag_word(concept) == ADJ else "modifier"
    return ""
