"""Caption metrics as the COCO caption evaluator computes them: BLEU-1..4 and CIDEr-D, in plain Python.

The evaluator (tylin/coco-caption, packaged as pycocoevalcap) lowercases and tokenizes every caption with the Java
Stanford PTB tokenizer, drops punctuation tokens, and hands space-joined tokens to its scorers. `bleu` and `cider_d`
reproduce its `Bleu(4)` and `Cider()` scorers on such tokenized strings (the tests check equality to 1e-6);
`tokenize` is a pure-Python stand-in for the Java tokenizer, so `caption_scores` is close to, but not guaranteed
bit-identical with, the official numbers (an "approx-PTB" tokenization).
"""

import math
import re
from collections import Counter

# Tokens the evaluator drops after PTB tokenization (its 17 punctuation tokens). The bracket escapes are listed in
# upper case, but CoreNLP's command-line -lowerCase lowercases every token, escapes included, so "-lrb-" survives.
DROPPED_TOKENS = {
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
}

# PTB escapes, as the lowercasing tokenizer writes them. PTB turns a double quote into `` when it opens a quotation
# and '' when it closes one; both are dropped, so which one is written here does not matter.
PTB_ESCAPES = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}

# Characters that always stand alone as tokens.
ALWAYS_SPLIT = re.compile(r"""([;!?"()\[\]{}$%#])""")
# Commas and colons split off unless they sit between digits ("1,000", "10:30" stay whole).
COMMA_OR_COLON = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")
# A quote at either end of a word is a quotation mark, not part of the word ("dogs'" -> "dogs '").
EDGE_QUOTE = re.compile(r"(?<!\S)'|'(?!\S)")
# Clitics PTB splits off the word before them: "man's" -> "man 's", "don't" -> "do n't".
CLITIC = re.compile(r"(?<=\w)(n't|'s|'m|'d|'re|'ve|'ll)(?![a-z])")
# Initialisms keep their final period ("u.s."), as PTB keeps them.
INITIALISM = re.compile(r"(?:[a-z]\.){2,}")

MAX_N = 4
CIDER_SIGMA = 6.0


def tokenize(caption: str) -> str:
    """Lowercase and tokenize a caption roughly as the COCO evaluator's Java PTBTokenizer does, then drop the
    evaluator's punctuation tokens: "A man's dog, running." -> "a man 's dog running".

    This approximates the Java tokenizer, it does not reproduce it: quotes, brackets, clitics ('s n't 'm 'd 're 've
    'll), commas, colons, ellipses, dashes and sentence periods are handled as PTB does, while its rarer rules (known
    abbreviations such as "mr.", "cannot" -> "can not", "gonna" -> "gon na", British-to-American spelling, escaping
    of "/" and "*", URLs and emoticons) are not.
    """
    text = caption.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("...", " ... ").replace("--", " -- ")
    text = ALWAYS_SPLIT.sub(r" \1 ", text)
    text = COMMA_OR_COLON.sub(lambda match: f" {match.group(0)} ", text)
    text = EDGE_QUOTE.sub(" ' ", text)
    text = CLITIC.sub(r" \1", text)
    tokens = []
    for token in text.split():
        # A period ending a word ends the sentence (or an abbreviation PTB does not know) and is split off.
        if token.endswith(".") and token != "..." and len(token) > 1 and not INITIALISM.fullmatch(token):
            tokens += [token[:-1], "."]
        else:
            tokens.append(PTB_ESCAPES.get(token, token))
    return " ".join(token for token in tokens if token not in DROPPED_TOKENS)


def check_inputs(hypotheses: dict[str, str], references: dict[str, list[str]]) -> None:
    """Raise ValueError unless every image has one hypothesis and at least one reference, and nothing else."""
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    without_references = [key for key in hypotheses if key not in references]
    if without_references:
        raise ValueError(f"{len(without_references)} hypothesis ids have no references, e.g. {without_references[:5]}")
    without_hypothesis = [key for key in references if key not in hypotheses]
    if without_hypothesis:
        raise ValueError(f"{len(without_hypothesis)} reference ids have no hypothesis, e.g. {without_hypothesis[:5]}")
    for key, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"image {key!r} needs a non-empty list of reference captions, got {captions!r}")


def ngram_counts(words: list[str], max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram (as a tuple of words) of order 1..max_n."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def bleu(hypotheses: dict[str, str], references: dict[str, list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (Papineni et al., ACL 2002) of tokenized captions, as the COCO evaluator computes it.

    With clipped n-gram matches summed over the corpus, p_k = sum_images sum_kgrams min(count_hyp, max_ref count_ref)
    / sum_images (len_hyp - k + 1), the hypothesis length c = sum len_hyp, and the reference length r = sum over
    images of the reference length closest to the hypothesis (the shorter one on a tie):

        BLEU-N = BP * (prod_{k=1..N} p_k)^(1/N),   BP = exp(1 - r/c) if c < r else 1.

    Like the evaluator, each precision is (matches + 1e-15) / (candidates + 1e-9) and c/r is (c + 1e-15) / (r + 1e-9),
    so an order with no candidate n-grams gives about 0 instead of dividing by zero. Captions are split on whitespace.
    Returns [BLEU-1, ..., BLEU-n].
    """
    check_inputs(hypotheses, references)
    matched, candidates = [0] * n, [0] * n
    hypothesis_length = reference_length = 0
    for key, hypothesis in hypotheses.items():
        words = hypothesis.split()
        counts = ngram_counts(words, n)
        max_reference_counts = Counter()
        reference_lengths = []
        for reference in references[key]:
            reference_words = reference.split()
            reference_lengths.append(len(reference_words))
            max_reference_counts |= ngram_counts(reference_words, n)  # | keeps the larger count of each n-gram
        for gram, count in counts.items():
            matched[len(gram) - 1] += min(count, max_reference_counts[gram])
        for k in range(n):
            candidates[k] += max(0, len(words) - k)
        hypothesis_length += len(words)
        reference_length += min(reference_lengths, key=lambda length: (abs(length - len(words)), length))

    scores, precision_product = [], 1.0
    for k in range(n):
        precision_product *= (matched[k] + 1e-15) / (candidates[k] + 1e-9)
        scores.append(precision_product ** (1 / (k + 1)))
    length_ratio = (hypothesis_length + 1e-15) / (reference_length + 1e-9)
    brevity_penalty = math.exp(1 - 1 / length_ratio) if length_ratio < 1 else 1.0
    return [score * brevity_penalty for score in scores]


def cider_d(hypotheses: dict[str, str], references: dict[str, list[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al., CVPR 2015) of tokenized captions, as the COCO evaluator's `Cider` computes it.

    Each caption becomes, for n = 1..4, a vector g^n of tf-idf weights: tf(g) * log(N / max(1, df(g))), where N is the
    number of images scored and df(g) the number of images whose references contain n-gram g (the idf comes from
    the references of the corpus being evaluated). For a hypothesis c with references s_1..s_m,

        CIDEr-D_n(c, S) = 10/m * sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                          * sum_g min(g^n(c), g^n(s_j)) * g^n(s_j) / (||g^n(c)|| ||g^n(s_j)||),

    with l the length in words, sigma = 6, the similarity left at 0 when either norm is 0, and CIDEr-D = mean over n
    of CIDEr-D_n; the corpus score is the mean over images. The evaluator measures l in bigrams (words - 1), which
    changes no length difference between two non-empty captions, and an empty one scores 0 either way. A corpus of
    one image scores 0 (every idf is log 1 = 0).
    """
    check_inputs(hypotheses, references)
    reference_counts = {key: [ngram_counts(caption.split()) for caption in references[key]] for key in hypotheses}
    document_frequency = Counter()
    for counts_per_reference in reference_counts.values():
        document_frequency.update(set().union(*counts_per_reference))
    log_num_images = math.log(len(hypotheses))

    def tfidf(words: list[str]) -> tuple[list[dict], list[float], int]:
        """Per-order tf-idf vectors, their norms, and the caption's length."""
        vectors = [{} for _ in range(MAX_N)]
        for gram, count in ngram_counts(words).items():
            vectors[len(gram) - 1][gram] = count * (log_num_images - math.log(max(1, document_frequency[gram])))
        norms = [math.sqrt(sum(weight * weight for weight in vector.values())) for vector in vectors]
        return vectors, norms, len(words)

    image_scores = []
    for key, hypothesis in hypotheses.items():
        vectors, norms, length = tfidf(hypothesis.split())
        per_order = [0.0] * MAX_N
        for reference in references[key]:
            reference_vectors, reference_norms, reference_length = tfidf(reference.split())
            length_penalty = math.exp(-((length - reference_length) ** 2) / (2 * CIDER_SIGMA**2))
            for k in range(MAX_N):
                # Clipping the hypothesis weight by the reference weight is the "-D": repeating a word gains nothing.
                similarity = sum(min(weight, reference_vectors[k].get(gram, 0.0)) * reference_vectors[k].get(gram, 0.0)
                                 for gram, weight in vectors[k].items())
                if norms[k] and reference_norms[k]:
                    similarity /= norms[k] * reference_norms[k]
                per_order[k] += similarity * length_penalty
        image_scores.append(sum(per_order) / MAX_N / len(references[key]) * 10)
    return sum(image_scores) / len(image_scores)


def caption_scores(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict:
    """BLEU-4 and CIDEr-D of raw captions (one hypothesis and a list of references per image id), after `tokenize`."""
    check_inputs(hypotheses, references)
    tokenized_hypotheses = {key: tokenize(caption) for key, caption in hypotheses.items()}
    tokenized_references = {key: [tokenize(caption) for caption in references[key]] for key in hypotheses}
    return {
        "BLEU-4": bleu(tokenized_hypotheses, tokenized_references)[3],
        "CIDEr-D": cider_d(tokenized_hypotheses, tokenized_references),
    }
