"""Answer normalisation, soft scores and answer vocabularies.

- VQA answer normalisation as the official evaluator (GT-Vision-Lab/VQA `vqaEval.py`) and
  hengyuan-hu/bottom-up-attention-vqa `tools/compute_softscore.py` (which LXMERT's VQA data came from) define it:
  `process_punctuation`, `process_digit_article` (number words, articles, contractions), quirks included (the period
  regex is a lookahead typo that removes a '.' unless a digit follows, and at most 32 of them). Reference:
  ../shared/reference/datasets.md §4-5.
- Soft scores 0 / 0.3 / 0.6 / 0.9 / 1 for 0 / 1 / 2 / 3 / >= 4 annotators, counted on the RAW answer strings.
- LXMERT's `convert_ans` (`src/pretrain/qa_answer_table.py`) for the pretraining answer table and VG-QA answers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# Missing-apostrophe forms -> apostrophe forms (the evaluator's table; keys with capitals never match after lower()).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The original pattern "(?!<=\d)(\.)(?!\d)" was meant as a lookbehind; as written it removes any '.' not followed by a
# digit. Its third positional argument (re.UNICODE == 32) became `count`: at most 32 periods go.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """The evaluator's punctuation rule: drop a mark next to a space (or anywhere, if the text has 1,000-style
    numbers), otherwise turn it into a space; then drop periods not followed by a digit."""
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        # the test reads the ORIGINAL text each time; replacements accumulate on `out`
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, restore contractions; single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """compute_softscore.py's `preprocess_answer`: punctuation, digits/articles, then commas removed."""
    return process_digit_article(process_punctuation(answer)).replace(",", "")


def soft_score(count: int) -> float:
    """Score of an answer given by `count` of the 10 annotators (= the official leave-one-out accuracy)."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def vqa_soft_labels(raw_answers: Iterable[str], vocab: dict[str, int] | set[str]) -> dict[str, float]:
    """{answer: score} over the RAW answer strings that are in the vocabulary (as compute_softscore.py)."""
    counts = Counter(raw_answers)
    return {a: soft_score(c) for a, c in counts.items() if a in vocab}


def vqa_vocabulary(mc_answers: Iterable[tuple[int, str]], min_questions: int = 9) -> list[str]:
    """Normalised multiple_choice_answer given for >= `min_questions` distinct questions (3,129 at full scale).

    Args:
        mc_answers: (question_id, multiple_choice_answer) over train2014 + val2014.
    Order: first appearance (the original used Python 2 dict order, which is not reproducible).
    """
    questions: dict[str, set[int]] = {}
    for qid, answer in mc_answers:
        questions.setdefault(normalize_vqa_answer(answer), set()).add(qid)
    return [a for a, qs in questions.items() if len(qs) >= min_questions]


_CONVERT = {"a man": "man", "the man": "man", "a woman": "woman", "the woman": "woman", "one": "1", "two": "2",
            "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
            "grey": "gray"}


def convert_ans(answer: str) -> str:
    """LXMERT's answer canonicalisation for the pretraining QA table (qa_answer_table.py L45-59)."""
    if not answer:
        return ""
    ans = answer.lower()
    if ans[-1] == ".":
        ans = ans[:-1].strip()
    for article in ("a ", "an ", "the "):  # checked in turn, each on the result of the previous
        if ans.startswith(article):
            ans = ans[len(article):].strip()
    return _CONVERT.get(ans, ans)


def qa_answer_table(counts: dict[str, Counter], size: int = 9500) -> list[dict]:
    """The pretraining answer table: the `size` most frequent converted answers over the QA sources.

    How LXMERT's all_ans.json was chosen is not published (airsplay/lxmert #43); this takes the most frequent answers
    (ties by answer text) and lists, like the original, `{"ans", "dsets"}` records sorted by answer. `dsets` uses the
    original's source names ("vqa", "gqa", "visual7w" for VG-QA). Pass LXMERT's all_ans.json to reproduce it exactly.
    """
    total: Counter = Counter()
    for c in counts.values():
        total.update(c)
    top = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    names = {"vqa": "vqa", "gqa": "gqa", "vgqa": "visual7w"}
    return [{"ans": a, "dsets": sorted(names[s] for s, c in counts.items() if a in c)} for a, _ in sorted(top)]
