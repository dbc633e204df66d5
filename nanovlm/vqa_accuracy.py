"""VQA accuracy as the official VQA evaluator computes it (Antol et al., "VQA: Visual Question Answering", ICCV 2015).

A prediction earns full credit when at least three of the (usually ten) human answers agree with it:

    Acc(a) = min(#humans that said a / 3, 1),

averaged over the ten subsets of nine humans that leave one human out. With k of the ten humans matching, this is
[k * min(1, (k-1)/3) + (10-k) * min(1, k/3)] / 10: 0, 0.3, 0.6, 0.9 and 1.0 for k = 0, 1, 2, 3 and 4 or more.

Before comparing, the evaluator (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py) normalises the
prediction: punctuation is stripped, the text lowercased, number words turned into digits, articles dropped and
apostrophe-less contractions given their apostrophe. This module reproduces that processing with its quirks, because
published VQA numbers are measured with it.
"""

import re

# Apostrophe-less spellings -> the canonical contraction (the evaluator's table, 120 entries). The table is kept whole,
# quirks included: the keys with capitals ("Im", "Ive", "Id've", "I'dve") can never match because words are
# lowercased before the lookup, "let's" and "she's" map to themselves, and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = {"a", "an", "the"}

# The 21 marks the evaluator strips, in its order (the order matters: each is replaced in the running text). Neither
# "." (handled below), ":" nor "'" is among them, so "10:30" and "o'clock" keep theirs.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# A comma between two digits ("1,000") anywhere in the text makes every mark be deleted rather than spaced out.
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The evaluator's pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a lookahead for the literal text "<=digit",
# which can never match where a "." starts, so the pattern deletes every period not followed by a digit ("3.5" stays).
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The evaluator passes re.UNICODE (= 32) where re.sub takes its count, so at most 32 periods are deleted.
MAX_PERIODS_DELETED = 32


def strip_punctuation(text: str) -> str:
    """The evaluator's punctuation step: each mark is deleted when it touches a space in the original text (or the
    text holds a digit,digit comma), and otherwise replaced by a space, so "t-shirt" becomes "t shirt" while
    "red, white" becomes "red white"; then periods not followed by a digit are deleted."""
    delete_marks = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The decision looks at the original text, the replacement acts on the text processed so far.
        if delete_marks or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=MAX_PERIODS_DELETED)


def normalize_answer(text: str) -> str:
    """The evaluator's full processing of a predicted answer: tabs and newlines become spaces, the text is stripped,
    punctuation handled by `strip_punctuation`, then the words are lowercased, number words up to ten become digits,
    articles are dropped and apostrophe-less contractions are mapped through `CONTRACTIONS`.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = [NUMBER_WORDS.get(word, word) for word in strip_punctuation(text).lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy of one predicted answer against the human answers to its question.

    Antol et al. (ICCV 2015), as computed by the official evaluator: with m_i the number of humans other than
    human i whose answer equals the normalised prediction,

        accuracy = (1/n) * sum_i min(m_i / 3, 1)        (n = number of humans, 10 in VQAv2/TextVQA/VizWiz).

    The prediction goes through `normalize_answer`. The human answers are treated as the evaluator treats them: when
    they are not all identical, each goes through the punctuation step only (`strip_punctuation`: no lowercasing,
    no number words, no articles, no contractions, not even a final strip); when all are identical they are used
    as given. The evaluator relies on the released annotations being normalised already, so a human answer such as
    "Dog" or "dog!" (which becomes "dog ") can never be matched. LLaVA's TextVQA script (the mmf evaluator) instead
    normalises the human answers fully and can score a little higher.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer; got an empty answers list")
    predicted = normalize_answer(prediction)
    if len(set(answers)) > 1:
        answers = [strip_punctuation(answer) for answer in answers]
    matches = [answer == predicted for answer in answers]
    matching = sum(matches)
    # Leaving human i out removes their own vote from the count of matching humans.
    return sum(min(1.0, (matching - left_out) / 3) for left_out in matches) / len(answers)
